"""Every registered router, and every routed layer, trains a small MoELM for 50 steps without NaN.

The acceptance bar of the router zoo: each method runs end to end in the model, with its paper
settings (``moelab.train.settings.PAPER_SETTINGS``: its losses and arguments), on token ids and,
for the routers that read them, token types.
"""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.models import MoELM, MoELMConfig
from moelab.train.settings import PAPER_SETTINGS, default_aux_losses

NAMES = [m.name for m in moelab.list_methods("router")] + [
    m.name for m in moelab.list_methods("layer") if m.name != "moe"
]
TOP_K = {"mixer": 1}  # MixER is hard top-1 by definition


@pytest.mark.parametrize("name", NAMES)
def test_trains_50_steps_in_moelm_without_nan(name):
    torch.manual_seed(0)
    paper = PAPER_SETTINGS.get(name, {})
    kwargs = dict(paper.get("router_kwargs", {}))
    if name == "rmoe":
        kwargs["hidden_size"] = 16
    cfg = MoELMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=16,
        num_experts=4,
        top_k=TOP_K.get(name, 2),
        router=name,
        router_kwargs=kwargs,
        aux_losses=dict(paper.get("aux_losses", default_aux_losses())),
    )
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        ids = torch.randint(0, 256, (4, 16), generator=g)
        types = (ids >= 128).long()  # two "modalities" that the ids determine
        out = model(ids, labels=ids, token_types=types)
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.isfinite(gr).all() for gr in grads), name
        opt.step()
        moelab.step_end(model)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses), (name, losses)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids, token_types=types).logits).all()
