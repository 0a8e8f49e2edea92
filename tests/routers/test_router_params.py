"""Routers reject bad parameters with an error that names the argument."""

from __future__ import annotations

import pytest
import torch

import moelab

ROUTERS = ["topk", "sigmoid_topk", "expert_choice"]

# (argument named in the message, overrides, exception)
COMMON_BAD = [
    ("top_k", dict(top_k=9), ValueError),  # > E
    ("top_k", dict(top_k=0), ValueError),
    ("top_k", dict(top_k=-2), ValueError),
    ("top_k", dict(top_k=2.0), TypeError),
    ("top_k", dict(top_k=True), TypeError),
    ("num_experts", dict(num_experts=0), ValueError),
    ("num_experts", dict(num_experts=-1), ValueError),
    ("num_experts", dict(num_experts=8.0), TypeError),
    ("d_model", dict(d_model=0), ValueError),
    ("d_model", dict(d_model="64"), TypeError),
    ("capacity_factor", dict(capacity_factor=0), ValueError),
    ("capacity_factor", dict(capacity_factor=0.0), ValueError),
    ("capacity_factor", dict(capacity_factor=-1.5), ValueError),
    ("capacity_factor", dict(capacity_factor=float("nan")), ValueError),
    ("capacity_factor", dict(capacity_factor=float("inf")), ValueError),
    ("capacity_factor", dict(capacity_factor="1.0"), TypeError),
]


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize(
    "arg,over,exc", COMMON_BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(COMMON_BAD)]
)
def test_bad_common_parameters(name, arg, over, exc):
    kw = dict(d_model=64, num_experts=8, top_k=2)
    kw.update(over)
    with pytest.raises(exc, match=arg):
        moelab.build_router(name, **kw)


TOKEN_CHOICE_BAD = [
    ("drop_policy", dict(drop_policy="random"), ValueError),
    ("eval_capacity_factor", dict(eval_capacity_factor=0), ValueError),
    ("scale", dict(scale=0.0), ValueError),
    ("scale", dict(scale=-1.0), ValueError),
]


@pytest.mark.parametrize("name", ["topk", "sigmoid_topk"])
@pytest.mark.parametrize("arg,over,exc", TOKEN_CHOICE_BAD)
def test_bad_token_choice_parameters(name, arg, over, exc):
    with pytest.raises(exc, match=arg):
        moelab.build_router(name, d_model=16, num_experts=8, top_k=2, **over)


@pytest.mark.parametrize(
    "arg,over,exc",
    [
        ("jitter", dict(jitter=-0.1), ValueError),
        ("jitter", dict(jitter=1.0), ValueError),
        ("second_expert_policy", dict(second_expert_policy="random"), ValueError),
        ("second_expert_threshold", dict(second_expert_threshold=0), ValueError),
    ],
)
def test_bad_topk_parameters(arg, over, exc):
    with pytest.raises(exc, match=arg):
        moelab.build_router("topk", d_model=16, num_experts=8, top_k=2, **over)


@pytest.mark.parametrize(
    "arg,over",
    [
        ("num_groups", dict(num_groups=3)),  # does not divide E
        ("num_groups", dict(num_groups=0)),
        ("topk_groups", dict(num_groups=4, topk_groups=5)),
        ("topk_groups", dict(num_groups=4, topk_groups=0)),
        ("top_k", dict(num_groups=4, topk_groups=1, top_k=3)),  # 1 group of 2 experts < k
        ("bias_update_rate", dict(bias_update_rate=-1e-3)),
    ],
)
def test_bad_sigmoid_group_and_bias_parameters(arg, over):
    kw = dict(d_model=16, num_experts=8, top_k=2)
    kw.update(over)
    with pytest.raises(ValueError, match=arg):
        moelab.build_router("sigmoid_topk", **kw)


def test_unknown_router_and_unknown_keyword():
    with pytest.raises(ValueError, match="router 'nope'.*topk"):
        moelab.build_router("nope", d_model=8, num_experts=4)
    with pytest.raises(ValueError, match="num_groups"):
        moelab.build_router("topk", d_model=8, num_experts=4, num_groups=2)


def test_router_input_checks_name_x():
    r = moelab.build_router("topk", d_model=8, num_experts=4)
    with pytest.raises(ValueError, match="x"):
        r(torch.randn(2, 3, 8))  # routers take [T, d]
    with pytest.raises(ValueError, match="d_model=8"):
        r(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x"):
        r(torch.ones(3, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "name, kwargs, arg",
    [
        ("topk", {"jitter": "0.01"}, "jitter"),
        ("topk", {"jitter": 1.0}, "jitter"),
        ("sigmoid_topk", {"bias_update_rate": "1e-3"}, "bias_update_rate"),
        ("sigmoid_topk", {"bias_update_rate": -1e-3}, "bias_update_rate"),
    ],
)
def test_bad_noise_and_rate_parameters_name_the_argument(name, kwargs, arg):
    with pytest.raises((TypeError, ValueError), match=arg):
        moelab.build_router(name, d_model=8, num_experts=4, **kwargs)


def test_switch_preset_accepts_overrides():
    r = moelab.TopKRouter.switch(8, 4, top_k=2, capacity_factor=None)
    assert r.top_k == 2 and r.capacity.factor is None and r.normalize is False and r.jitter == 1e-2
