"""Softmax top-k (Switch, GShard, Mixtral, DeepSeek-V2) against a naive per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.routers import TopKRouter, sample_second_expert


def naive_topk(x, w_ED, k, normalize, scale=1.0):
    """Per token: logits by dot products, softmax written out, experts sorted by probability."""
    idx_rows, w_rows = [], []
    xs, ws = x.double(), w_ED.double()
    e = ws.shape[0]
    for t in range(xs.shape[0]):
        logits = [float(xs[t] @ ws[j]) for j in range(e)]
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        p = [v / sum(ex) for v in ex]
        chosen = sorted(range(e), key=lambda j: -p[j])[:k]
        gates = [p[j] for j in chosen]
        if normalize:
            gates = [g / sum(gates) for g in gates]
        idx_rows.append(chosen)
        w_rows.append([scale * g for g in gates])
    return torch.tensor(idx_rows, dtype=torch.long), torch.tensor(w_rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "e,k,normalize,scale",
    [(8, 2, None, 1.0), (8, 2, False, 1.0), (6, 3, True, 2.5), (5, 1, None, 1.0), (4, 4, True, 1.0)],
)
def test_topk_matches_naive_loop(e, k, normalize, scale):
    r = moelab.build_router("topk", d_model=12, num_experts=e, top_k=k, normalize=normalize, scale=scale)
    x = torch.randn(9, 12)
    routing = r(x)
    norm = (k > 1) if normalize is None else normalize
    idx, w = naive_topk(x, r.weight.detach(), k, norm, scale)
    assert routing.top_k == k and routing.requested is None
    assert torch.equal(routing.topk_index(), idx)
    torch.testing.assert_close(routing.weight.view(9, k).double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(9))
    torch.testing.assert_close(routing.logits, x @ r.weight.detach().t(), rtol=1e-5, atol=1e-5)
    assert routing.logits.dtype == torch.float32


def test_switch_k1_default_is_unnormalised_and_router_learns_from_task_loss():
    r = moelab.build_router("topk", d_model=8, num_experts=4, top_k=1)
    assert r.normalize is False
    x = torch.randn(10, 8)
    routing = r(x)
    p_max = routing.probs.max(-1).values
    torch.testing.assert_close(routing.weight, p_max)  # gate = p_i (Switch), not 1
    assert (routing.weight < 1).all()
    bank = moelab.ExpertBank(4, 8, 8)
    moelab.ops.moe_reference(x, routing, bank).square().sum().backward()
    assert r.weight.grad.abs().sum() > 0
    # Renormalising a single gate makes it exactly 1: the router would get no task gradient.
    r1 = moelab.build_router("topk", d_model=8, num_experts=4, top_k=1, normalize=True)
    torch.testing.assert_close(r1(x).weight, torch.ones(10))


def test_router_math_is_fp32_for_bf16_input():
    r = moelab.build_router("topk", d_model=8, num_experts=4, top_k=2).to(torch.bfloat16)
    routing = r(torch.randn(5, 8, dtype=torch.bfloat16))
    assert routing.logits.dtype == torch.float32 and routing.probs.dtype == torch.float32


def test_jitter_only_in_training_and_equals_multiplicative_uniform_noise():
    eps = 0.1
    r = TopKRouter(6, 4, top_k=2, jitter=eps)
    x = torch.randn(20, 6)
    w = r.weight.detach()
    r.eval()
    torch.testing.assert_close(r(x).logits, x @ w.t())
    torch.testing.assert_close(r(x).logits, r(x).logits)  # deterministic at eval
    r.train()
    torch.manual_seed(123)
    got = r(x).logits
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    torch.testing.assert_close(got, (x * noise) @ w.t(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, x @ w.t(), atol=1e-4)  # the noise is real
    assert ((noise >= 1 - eps) & (noise <= 1 + eps)).all()


def test_sample_second_expert_keep_rate_is_min_1_g2_over_threshold():
    # 4 groups of 20k tokens with known renormalised second gates g2. Binomial std <= 0.0036;
    # tolerance 0.02 is > 5 std, while "keep with prob g2" or "always keep" miss by >= 0.05.
    n = 20000
    g2 = torch.tensor([0.05, 0.15, 0.3, 0.45]).repeat_interleave(n)
    weight = torch.stack([1 - g2, g2], dim=1) * 3.0  # unnormalised input: the rule renormalises
    gen = torch.Generator().manual_seed(7)
    keep = sample_second_expert(weight, 0.5, generator=gen)
    assert keep[:, 0].all()
    rates = keep[:, 1].float().view(4, n).mean(1)
    torch.testing.assert_close(rates, torch.tensor([0.1, 0.3, 0.6, 0.9]), atol=0.02, rtol=0)
    # Another threshold: min(1, g2 / 0.2) -> 0.25, 0.75, 1, 1.
    keep = sample_second_expert(weight, 0.2, generator=torch.Generator().manual_seed(8))
    rates = keep[:, 1].float().view(4, n).mean(1)
    torch.testing.assert_close(rates, torch.tensor([0.25, 0.75, 1.0, 1.0]), atol=0.02, rtol=0)


def test_gshard_router_samples_second_expert_only_in_training():
    r = TopKRouter.gshard(8, 4, capacity_factor=None)
    assert r.second_expert_policy == "sampling" and r.normalize
    x = torch.randn(4000, 8) * 3
    r.train()
    torch.manual_seed(0)
    routing = r(x)
    per_tok = routing.experts_per_token()
    assert per_tok.min() >= 1 and per_tok.max() <= 2
    # Every token keeps its first choice (the argmax of the probabilities).
    first = routing.topk_index()[:, 0]
    assert torch.equal(first, routing.probs.argmax(-1))
    g2 = routing.probs.topk(2, -1).values
    g2 = g2[:, 1] / g2.sum(-1)
    expected = torch.clamp(g2 / 0.5, max=1.0).mean().item()
    observed = (per_tok == 2).float().mean().item()
    std = math.sqrt(expected * (1 - expected) / 4000)
    assert abs(observed - expected) < 5 * std + 1e-3
    assert observed < 0.97  # sampling really drops some second experts on this input
    r.eval()
    ev = r(x)
    assert ev.top_k == 2 and ev.num_assignments == 8000


def test_gshard_preset_gives_gshards_capacity_2T_over_E():
    """Defect B (issue 8): GShard's expert capacity is 2S/E (mesh-tensorflow, fairseq), where S is
    the number of tokens. v1's preset plugged cf = 2.0 into a formula that already multiplies by k
    and gave 4S/E. Every token sends both choices to experts 0 and 1 here: each keeps 2S/E."""
    e, t, d = 4, 64, 8
    r = TopKRouter.gshard(d, e, second_expert_policy="all")
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0, 0], r.weight[1, 0] = 2.0, 1.0
    x = torch.zeros(t, d)
    x[:, 0] = 1.0
    routing = r(x)
    assert routing.tokens_per_expert().tolist() == [2 * t // e, 2 * t // e, 0, 0]  # 32 each, not 64


def test_presets():
    s = TopKRouter.switch(8, 4)
    assert (s.top_k, s.normalize, s.jitter, s.capacity.factor, s.capacity.eval_factor) == (1, False, 1e-2, 1.25, 2.0)
    assert s.capacity.drop_policy == "position"
    g = TopKRouter.gshard(8, 4)
    assert (g.top_k, g.normalize, g.capacity.factor, g.capacity.drop_policy) == (2, True, 1.0, "position")
    m = TopKRouter.mixtral(8, 4)
    assert (m.top_k, m.normalize, m.capacity.factor) == (2, True, None)
    d = TopKRouter.deepseek_v2(8, 8)
    assert (d.top_k, d.normalize) == (6, False)
