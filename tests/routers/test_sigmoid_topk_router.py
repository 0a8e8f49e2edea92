"""DeepSeek-V3 sigmoid top-k: group-limited selection, bias semantics and the sign-rule update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moelab
from moelab.routers import SigmoidTopKRouter, bias_update, sigmoid_topk


def naive_sigmoid_topk(logits, k, bias, normalize, num_groups, topk_groups, scale=1.0):
    """Per token, written from the paper: groups ranked by the sum of their two best biased
    scores, the best ``topk_groups`` groups eligible, top-k biased scores among them, gates from
    the unbiased sigmoid scores."""
    t_all, e = logits.shape
    size = e // num_groups
    idx_rows, w_rows = [], []
    for t in range(t_all):
        s = [1 / (1 + math.exp(-float(v))) for v in logits[t]]
        c = [s[j] + float(bias[j]) for j in range(e)]
        gscore = []
        for g in range(num_groups):
            members = sorted((c[j] for j in range(g * size, (g + 1) * size)), reverse=True)
            gscore.append(sum(members[:2]))
        groups = sorted(range(num_groups), key=lambda g: -gscore[g])[:topk_groups]
        eligible = [j for j in range(e) if j // size in groups]
        chosen = sorted(eligible, key=lambda j: -c[j])[:k]
        gates = [s[j] for j in chosen]
        if normalize:
            gates = [gv / sum(gates) for gv in gates]
        idx_rows.append(chosen)
        w_rows.append([scale * gv for gv in gates])
    return torch.tensor(idx_rows), torch.tensor(w_rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "e,k,groups,topk_groups,normalize",
    [(8, 2, 1, 1, True), (8, 3, 4, 2, True), (12, 4, 4, 2, False), (16, 4, 8, 3, True), (6, 2, 6, 2, True)],
)
def test_sigmoid_topk_matches_brute_force(e, k, groups, topk_groups, normalize):
    gen = torch.Generator().manual_seed(e * 10 + k)
    logits = torch.randn(11, e, generator=gen) * 2
    bias = torch.randn(e, generator=gen) * 0.3
    scores, w, idx = sigmoid_topk(
        logits, k, bias, normalize=normalize, num_groups=groups, topk_groups=topk_groups
    )
    ref_idx, ref_w = naive_sigmoid_topk(logits, k, bias, normalize, groups, topk_groups)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, torch.sigmoid(logits))


def test_router_matches_brute_force_with_scale():
    r = moelab.build_router(
        "sigmoid_topk", d_model=10, num_experts=8, top_k=2, num_groups=4, topk_groups=2, scale=2.5
    )
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(8) * 0.2)
    r.eval()
    x = torch.randn(7, 10)
    routing = r(x)
    ref_idx, ref_w = naive_sigmoid_topk(x @ r.weight.detach().t(), 2, r.expert_bias, True, 4, 2, 2.5)
    assert torch.equal(routing.topk_index(), ref_idx)
    torch.testing.assert_close(routing.weight.detach().view(7, 2).double(), ref_w, rtol=1e-5, atol=1e-6)


def test_group_limit_excludes_experts_outside_the_best_groups():
    # Group 0 = experts {0,1}, group 1 = {2,3}. Expert 2 is the single best, but group 0's two
    # scores sum higher, so with one group allowed the token must pick from {0, 1} only.
    logits = torch.logit(torch.tensor([[0.8, 0.8, 0.95, 0.05]]))
    _, _, idx = sigmoid_topk(logits, 2, None, num_groups=2, topk_groups=1)
    assert sorted(idx[0].tolist()) == [0, 1]
    _, _, idx = sigmoid_topk(logits, 2, None, num_groups=1, topk_groups=1)
    assert sorted(idx[0].tolist()) == [0, 2] or sorted(idx[0].tolist()) == [1, 2]


def test_bias_steers_selection_but_gates_are_unbiased_scores():
    logits = torch.randn(20, 6)
    bias = torch.zeros(6)
    bias[3] = 10.0  # huge: expert 3 always selected
    scores, w, idx = sigmoid_topk(logits, 2, bias, normalize=False)
    assert (idx == 3).any(-1).all()
    torch.testing.assert_close(w, scores.gather(1, idx))  # no bias in the gate
    assert (w < 1).all()
    _, wn, idxn = sigmoid_topk(logits, 2, bias, normalize=True)
    torch.testing.assert_close(wn, scores.gather(1, idxn) / scores.gather(1, idxn).sum(-1, keepdim=True))


def test_bias_update_sign_rule():
    b = torch.tensor([0.0, 0.5, -0.2, 0.1, 0.0])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0, 0.0])  # mean 4
    new = bias_update(b, load, 1e-3)
    expected = [b[i].item() + 1e-3 * (0 if load[i] == 4 else (1 if load[i] < 4 else -1)) for i in range(5)]
    torch.testing.assert_close(new, torch.tensor(expected))


def test_step_end_updates_after_training_forwards_and_resets_the_load():
    r = SigmoidTopKRouter(8, 4, top_k=1, bias_update_rate=0.01)
    assert "expert_bias" in dict(r.named_buffers()) and "expert_bias" not in dict(r.named_parameters())
    x1, x2 = torch.randn(10, 8), torch.randn(6, 8)
    r.train()
    i1, i2 = r(x1).topk_index(), r(x2).topk_index()
    load = torch.bincount(torch.cat([i1, i2]).reshape(-1), minlength=4).float()
    torch.testing.assert_close(r.load_since_step, load)
    before = r.expert_bias.clone()
    moelab.step_end(nn.Sequential(nn.Identity(), nn.ModuleList([r])))  # finds nested routers
    torch.testing.assert_close(r.expert_bias, before + 0.01 * torch.sign(load.mean() - load))
    assert r.load_since_step.sum() == 0
    # No training forward since: a second step_end changes nothing.
    after = r.expert_bias.clone()
    r.step_end()
    torch.testing.assert_close(r.expert_bias, after)


def test_eval_forwards_do_not_accumulate_and_rate_zero_disables():
    r = SigmoidTopKRouter(8, 4, top_k=2)
    r.eval()
    r(torch.randn(12, 8))
    assert r.load_since_step.sum() == 0
    r.step_end()
    assert r.expert_bias.abs().sum() == 0
    off = SigmoidTopKRouter(8, 4, top_k=2, bias_update_rate=0.0)
    off.train()
    off(torch.randn(12, 8))
    off.step_end()
    assert off.expert_bias.abs().sum() == 0 and off.load_since_step.sum() == 0


def test_bias_receives_no_gradient_and_router_weight_does():
    r = SigmoidTopKRouter(8, 4, top_k=2)
    x = torch.randn(12, 8)
    bank = moelab.ExpertBank(4, 8, 8)
    moelab.ops.moe_reference(x, r(x), bank).square().sum().backward()
    assert r.weight.grad.abs().sum() > 0
    assert not r.expert_bias.requires_grad


def test_default_bias_rate_is_the_paper_gamma():
    assert SigmoidTopKRouter(8, 4).bias_update_rate == 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_and_load_stay_fp32_when_the_model_is_cast(dtype):
    # gamma = 1e-3 is below bf16's resolution near 0.5 (2**-8), and bf16 counts are not exact
    # above 256: a model cast to half precision must keep these buffers in fp32.
    r = SigmoidTopKRouter(16, 4, top_k=1).to(dtype).train()
    assert r.expert_bias.dtype == torch.float32 and r.load_since_step.dtype == torch.float32
    assert r.weight.dtype == dtype
    with torch.no_grad():
        r.expert_bias.fill_(0.5)
    x = torch.randn(1500, 16).to(dtype)
    index = r(x).topk_index()
    load = torch.bincount(index.reshape(-1), minlength=4).float()
    torch.testing.assert_close(r.load_since_step, load, rtol=0, atol=0)
    r.step_end()
    torch.testing.assert_close(r.expert_bias, 0.5 + 1e-3 * torch.sign(load.mean() - load), rtol=0, atol=1e-7)
