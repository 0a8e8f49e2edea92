"""DynaMoE (``dynamoe``) against independent references: a per-token Python loop for the
thresholding rules, the depth schedules written out by hand, the k_min / k_max bounds, and
training in MoELM with the schedule taken from the model's depth."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.models import MoELM, MoELMConfig
from moelab.routers.dynamoe import DynaMoERouter, capacity_schedule, dynamic_topk, schedule_shape


# ------------------------------------------------------------------ references written plainly
def percentile_plain(values: list[float], q: float) -> float:
    """numpy's default ("linear") percentile, by hand."""
    s = sorted(values)
    pos = q / 100 * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def dynamic_topk_loop(probs: torch.Tensor, rule: str, value: float, k_min: int, k_max: int) -> torch.Tensor:
    """One token at a time: count the experts at or above the threshold, clip, keep the top ones."""
    t, e = probs.shape
    rows = probs.tolist()
    if rule == "batch_percentile":
        batch_tau = percentile_plain([v for row in rows for v in row], value)
    out = torch.zeros(t, e, dtype=torch.bool)
    for i, row in enumerate(rows):
        tau = {"threshold": value, "percentile": None, "batch_percentile": None}[rule]
        if rule == "percentile":
            tau = percentile_plain(row, value)
        elif rule == "batch_percentile":
            tau = batch_tau
        n = sum(1 for v in row if v >= tau)
        k = min(max(n, k_min), k_max)
        ranked = sorted(range(e), key=lambda j: (-row[j], j))  # most probable first, ties by index
        for j in ranked[:k]:
            out[i, j] = True
    return out


@pytest.mark.parametrize(
    "rule,value",
    [
        ("threshold", 0.125),
        ("threshold", 0.05),
        ("percentile", 75.0),
        ("percentile", 40.0),
        ("batch_percentile", 80.0),
        ("batch_percentile", 50.0),
    ],
)
@pytest.mark.parametrize("k_min,k_max", [(1, 8), (1, 3), (2, 4), (3, 3)])
def test_dynamic_topk_matches_a_per_token_loop(rule, value, k_min, k_max):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(40, 8) * 1.5, -1)
    mask = dynamic_topk(probs, rule, value, k_min, k_max)
    assert torch.equal(mask, dynamic_topk_loop(probs, rule, value, k_min, k_max))
    count = mask.sum(-1)
    assert int(count.min()) >= k_min and int(count.max()) <= k_max


def test_counts_vary_per_token_and_ties_go_to_the_lower_index():
    # a confident token, a flat one, one in between: the threshold rule keeps 1, 4 and 2
    probs = torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.1, 0.1]])
    assert dynamic_topk(probs, "threshold", 0.25, 1, 4).sum(-1).tolist() == [1, 4, 2]
    # capped at 3: of the four tied experts the first three are kept
    assert dynamic_topk(probs, "threshold", 0.25, 1, 3)[1].tolist() == [True, True, True, False]
    # k_min tops up the confident token with its next most probable (tie: expert 1)
    assert dynamic_topk(probs, "threshold", 0.25, 2, 4)[0].tolist() == [True, True, False, False]
    # the per-token percentile keeps a fixed count when the probabilities are distinct (our doc)
    distinct = torch.softmax(torch.randn(50, 8), -1)
    assert set(dynamic_topk(distinct, "percentile", 75.0, 1, 8).sum(-1).tolist()) == {8 - math.ceil(0.75 * 7)}


def test_dynamic_topk_edge_cases_and_errors():
    assert dynamic_topk(torch.zeros(0, 4), "threshold", 0.3, 1, 2).shape == (0, 4)
    one = dynamic_topk(torch.tensor([[0.1, 0.6, 0.3]]), "percentile", 100.0, 1, 3)
    assert one.tolist() == [[False, True, False]]  # the 100th percentile is the max
    assert dynamic_topk(torch.tensor([[0.1, 0.6, 0.3]]), "threshold", 0.0, 1, 3).all()  # tau 0 keeps all
    with pytest.raises(ValueError, match="rule"):
        dynamic_topk(torch.rand(3, 4), "topp", 0.5, 1, 2)
    with pytest.raises(ValueError, match="value"):
        dynamic_topk(torch.rand(3, 4), "threshold", 1.5, 1, 2)
    with pytest.raises(ValueError, match="value"):
        dynamic_topk(torch.rand(3, 4), "percentile", 101.0, 1, 2)
    with pytest.raises(ValueError, match="k_min"):
        dynamic_topk(torch.rand(3, 4), "threshold", 0.5, 3, 2)
    with pytest.raises(ValueError, match="k_max"):
        dynamic_topk(torch.rand(3, 4), "threshold", 0.5, 1, 5)
    with pytest.raises(ValueError, match="probs_TE"):
        dynamic_topk(torch.rand(4), "threshold", 0.5, 1, 2)


# ------------------------------------------------------------------ schedules, by hand
@pytest.mark.parametrize(
    "name,layers,expected",
    [
        ("uniform", 4, [4, 4, 4, 4]),
        ("descending", 4, [4, 3, 2, 1]),  # 4 - 3 * l / 3
        ("ascending", 4, [1, 2, 3, 4]),
        ("descending", 6, [4, 3, 3, 2, 2, 1]),  # 1 + 3 * (1, .8, .6, .4, .2, 0), halves up: 3.4->3, 2.8->3
        ("ascending", 5, [1, 2, 3, 3, 4]),  # 1 + 3 * (0, .25, .5, .75, 1): 1.75->2, 2.5->3, 3.25->3
        ("pyramid", 5, [1, 3, 4, 3, 1]),  # 1 + 3 * (0, .5, 1, .5, 0)
        ("pyramid", 4, [1, 4, 4, 1]),  # both middle layers peak
        ("pyramid", 6, [1, 3, 4, 4, 3, 1]),
        ("valley", 5, [4, 3, 1, 3, 4]),  # 1 + 3 * (1, .5, 0, .5, 1)
        ("valley", 6, [4, 3, 1, 1, 3, 4]),
        ("wave", 6, [4, 1, 4, 1, 4, 1]),  # period 2: high, low, ...
    ],
)
def test_capacity_schedules_by_hand(name, layers, expected):
    assert capacity_schedule(name, layers, 1, 4) == expected


def test_schedule_special_cases_and_errors():
    for name in ("uniform", "descending", "ascending", "pyramid", "valley", "wave"):
        assert capacity_schedule(name, 1, 1, 4) == [4]  # the only layer: k_high
        assert capacity_schedule(name, 5, 3, 3) == [3] * 5  # k_low = k_high
    assert capacity_schedule("pyramid", 2, 1, 4) == capacity_schedule("valley", 2, 1, 4) == [4, 4]
    assert capacity_schedule("wave", 6, 1, 4, wave_period=4) == [4, 3, 1, 3, 4, 3]  # 1 + 3*(1,.5,0,.5,..)
    assert schedule_shape("descending", 3) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="schedule"):
        capacity_schedule("random", 4, 1, 4)
    with pytest.raises(ValueError, match="k_low"):
        capacity_schedule("descending", 4, 5, 4)
    with pytest.raises(ValueError, match="num_layers"):
        capacity_schedule("descending", 0, 1, 4)
    with pytest.raises(ValueError, match="wave_period"):
        capacity_schedule("wave", 4, 1, 4, wave_period=1)


# ------------------------------------------------------------------ the router
def test_router_routes_by_the_rule_with_renormalised_or_raw_gates():
    torch.manual_seed(1)
    r = DynaMoERouter(16, 8, top_k=4, rule="threshold", value=0.1)
    x = torch.randn(30, 16)
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), -1)
    mask = dynamic_topk_loop(probs.detach(), "threshold", 0.1, 1, 4)
    assert out.top_k is None and torch.equal(out.mask(), mask)
    expected = probs * mask / (probs * mask).sum(-1, keepdim=True)
    torch.testing.assert_close(out.dense(), expected)
    assert torch.equal(out.token_index, out.token_index.sort().values)  # token-major COO
    raw = DynaMoERouter(16, 8, top_k=4, rule="threshold", value=0.1, normalize=False)
    raw.weight.data.copy_(r.weight.data)
    torch.testing.assert_close(raw(x).dense(), probs * mask)
    assert out.experts_per_token().min() >= 1 and out.experts_per_token().max() <= 4


def test_link_takes_the_capacity_from_the_schedule_and_metrics_report_it():
    routers = [
        DynaMoERouter(8, 8, top_k=4, schedule="descending", rule="threshold", value=0.0) for _ in range(4)
    ]
    layers = [torch.nn.Module() for _ in routers]
    for layer, r in zip(layers, routers, strict=True):
        layer.router = r
    moelab.core.router.link_routers(layers)
    assert [r.capacity for r in routers] == [4, 3, 2, 1]
    x = torch.randn(10, 8)
    for r in routers:  # tau = 0 keeps every expert, so each token gets exactly the capacity
        r.train()
        assert r(x).experts_per_token().tolist() == [r.capacity] * 10
    assert routers[1].metrics() == {"mean_active_experts": 3.0, "capacity": 3.0}
    assert math.isnan(routers[1].metrics()["mean_active_experts"])  # reset by the read
    routers[2].metrics()
    routers[2].eval()
    routers[2](x)
    assert math.isnan(routers[2].metrics()["mean_active_experts"])  # eval forwards are not counted
    assert DynaMoERouter(8, 8, top_k=4, schedule="descending").capacity == 4  # unlinked: one layer


def test_causal_at_eval_only_without_the_batch_percentile():
    assert DynaMoERouter(8, 4, rule="percentile").causal_at_eval
    assert not DynaMoERouter(8, 4, rule="batch_percentile").causal_at_eval


@pytest.mark.parametrize("t", [0, 1, 7])
@pytest.mark.parametrize("rule", ["threshold", "percentile", "batch_percentile"])
def test_lone_moe_forward_and_backward(t, rule):
    torch.manual_seed(2)
    moe = moelab.MoE(16, num_experts=4, top_k=3, router="dynamoe", router_kwargs={"rule": rule})
    x = torch.randn(t, 16, requires_grad=True)
    y, routing = moe.forward_routed(x)
    (y.square().sum() + moe.aux_loss).backward()
    assert y.shape == (t, 16) and torch.isfinite(y).all()
    assert routing.num_tokens == t and routing.num_assignments <= 3 * t
    if t:
        assert moe.router.weight.grad is not None and torch.isfinite(moe.router.weight.grad).all()
        if t > 1:
            assert moe.router.weight.grad.abs().sum() > 0  # renormalised gates: a lone token gets 0


@pytest.mark.parametrize("schedule", ["descending", "pyramid"])
def test_trains_in_moelm_without_nan(schedule):
    torch.manual_seed(3)
    cfg = MoELMConfig(
        d_model=32,
        n_layers=3,
        n_heads=2,
        max_seq_len=32,
        num_experts=6,
        top_k=3,
        router="dynamoe",
        router_kwargs={"schedule": schedule},
    )
    model = MoELM(cfg)
    caps = [m.router.capacity for _, m in model.moe_layers()]
    assert caps == capacity_schedule(schedule, 3, 1, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        moelab.core.router.step_end(model)
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for (_, m), cap in zip(model.moe_layers(), caps, strict=True):
        active = m.router.metrics()["mean_active_experts"]
        assert 1.0 <= active <= cap


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"schedule": "random"}, "schedule"),
        ({"rule": "topp"}, "rule"),
        ({"rule": "threshold", "value": 2.0}, "value"),
        ({"rule": "percentile", "value": -1.0}, "value"),
        ({"k_low": 3, "top_k": 2}, "k_low"),
        ({"k_min": 2, "k_low": 1}, "k_min"),
        ({"k_min": 0}, "k_min"),
        ({"top_k": 9}, "top_k"),
        ({"wave_period": 1}, "wave_period"),
        ({"value": "0.1"}, "value"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("dynamoe", d_model=8, num_experts=8, **kwargs)
