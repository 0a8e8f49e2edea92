"""``moelab.override_routing`` on transformers models patched by ``moelab.hf.patch``."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_tiny import FAMILIES, tiny_ids, tiny_model  # noqa: E402

import moelab  # noqa: E402
import moelab.hf as mh  # noqa: E402
from moelab import Routing  # noqa: E402


def strongest_expert_only(routing: Routing, site) -> Routing:
    """Each token runs its highest-weight expert alone, at that expert's weight."""
    k = routing.top_k
    w, j = routing.weight.view(-1, k).max(-1, keepdim=True)
    idx = routing.expert_index.view(-1, k).gather(1, j)
    return Routing.from_topk(idx, w, routing.num_experts)


@pytest.mark.parametrize("family", FAMILIES)
def test_override_changes_a_patched_model_and_restores_it(family):
    model = tiny_model(family).eval()
    ids = tiny_ids()
    mh.patch(model)
    with torch.no_grad():
        base = model(ids).logits
        with moelab.override_routing(model, strongest_expert_only) as names:
            weak = model(ids).logits
        after = model(ids).logits
    assert len(names) == len(mh.patched_layers(model)) == 2
    assert (weak - base).abs().max() > 1e-4
    torch.testing.assert_close(after, base, rtol=0, atol=0)


def test_override_reaches_only_the_named_layer():
    model = tiny_model("olmoe").eval()
    mh.patch(model)
    first = mh.patched_layers(model)[0][0]
    calls = []

    def spy(routing, site):
        calls.append(site.name)
        return routing

    with torch.no_grad(), moelab.override_routing(model, spy, layers=[first]):
        model(tiny_ids())
    assert calls == [first]
