"""Bad-input catalogue (issue #2): each item its own test, checking the exception type and that
the message names the argument. The empty batch is the exception: it returns an empty output."""

from __future__ import annotations

import pytest
import torch

import moelab


@pytest.fixture
def moe():
    return moelab.MoE(16, num_experts=4, top_k=2, aux_losses={"load_balance": 1e-2, "z": 1e-3})


# ------------------------------------------------------------------------------------------ inputs
def test_wrong_d(moe):
    with pytest.raises(ValueError, match=r"x must have last dimension d_model=16.*\(2, 3, 15\)"):
        moe(torch.randn(2, 3, 15))


def test_wrong_d_2d(moe):
    with pytest.raises(ValueError, match=r"x .*d_model=16"):
        moe(torch.randn(5, 17))


@pytest.mark.parametrize("shape", [(16,), (1, 2, 3, 16), ()])
def test_wrong_rank(moe, shape):
    with pytest.raises(ValueError, match=r"x must be \[T, d\] or \[B, S, d\]"):
        moe(torch.randn(shape))


def test_not_a_tensor(moe):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        moe([[0.0] * 16])


def test_integer_input(moe):
    with pytest.raises(TypeError, match="x must be floating point"):
        moe(torch.ones(2, 16, dtype=torch.long))


def test_nan_input(moe):
    x = torch.randn(2, 4, 16)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x contains 1 NaN/Inf"):
        moe(x)


def test_inf_input(moe):
    x = torch.randn(3, 16)
    x[0, 0] = float("inf")
    x[2, 5] = float("-inf")
    with pytest.raises(ValueError, match=r"x contains 2 NaN/Inf"):
        moe(x)


def test_nan_check_can_be_disabled():
    moe = moelab.MoE(16, num_experts=4, check_finite=False)
    x = torch.randn(3, 16)
    x[1, 0] = float("nan")
    assert torch.isnan(moe(x)).any()  # propagates, as asked


def test_mismatched_dtype(moe):
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 .*torch.float32"):
        moe(torch.randn(2, 16, dtype=torch.float64))


def test_mismatched_dtype_bf16(moe):
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16"):
        moe(torch.randn(2, 16, dtype=torch.bfloat16))


def test_bf16_input_accepted_under_autocast(moe):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.shape == (2, 16)


def test_mismatched_device(moe):
    with pytest.raises(ValueError, match=r"x is on meta .* on cpu"):
        moe(torch.empty(2, 16, device="meta"))


@pytest.mark.parametrize("layout", ["transposed_2d", "permuted_3d", "strided_slice"])
def test_non_contiguous_input_is_accepted_and_exact(moe, layout):
    if layout == "transposed_2d":
        x = torch.randn(16, 6).t()
    elif layout == "permuted_3d":
        x = torch.randn(16, 5, 2).permute(2, 1, 0)
    else:
        x = torch.randn(2, 10, 32)[:, ::2, ::2]
    assert not x.is_contiguous() and x.shape[-1] == 16
    moe.eval()
    xa = x.detach().clone().requires_grad_(True)  # same strides
    xb = x.detach().contiguous().requires_grad_(True)
    ya, yb = moe(xa), moe(xb)
    assert ya.shape == x.shape
    assert torch.equal(ya, yb)
    g = torch.randn_like(yb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (0, 3, 16)])
@pytest.mark.parametrize("router", ["topk", "sigmoid_topk", "expert_choice"])
def test_empty_batch_returns_empty_output_with_working_backward(shape, router):
    moe = moelab.MoE(16, num_experts=4, top_k=2, router=router, aux_losses={"load_balance": 1e-2, "z": 1e-3})
    x = torch.randn(shape, requires_grad=True)
    y = moe(x)
    assert y.shape == shape and y.dtype == x.dtype
    (y.sum() + moe.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == shape
    assert moe.aux_loss.item() == 0.0


# -------------------------------------------------------------------------------------- parameters
def test_top_k_greater_than_num_experts():
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts \(4\), got 5"):
        moelab.MoE(16, num_experts=4, top_k=5)


@pytest.mark.parametrize("k", [0, -1])
def test_top_k_below_one(k):
    with pytest.raises(ValueError, match=rf"top_k must be >= 1, got {k}"):
        moelab.MoE(16, num_experts=4, top_k=k)


@pytest.mark.parametrize("e", [0, -3])
def test_num_experts_below_one(e):
    with pytest.raises(ValueError, match=rf"num_experts must be >= 1, got {e}"):
        moelab.MoE(16, num_experts=e)


@pytest.mark.parametrize("cf", [0, 0.0, -1.0])
@pytest.mark.parametrize("router", ["topk", "sigmoid_topk", "expert_choice"])
def test_capacity_factor_not_positive(cf, router):
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0"):
        moelab.MoE(16, num_experts=4, router=router, router_kwargs={"capacity_factor": cf})


def test_float_top_k():
    with pytest.raises(TypeError, match="top_k must be an int, got float"):
        moelab.MoE(16, num_experts=4, top_k=2.0)


def test_bool_top_k():
    with pytest.raises(TypeError, match="top_k must be an int, got bool"):
        moelab.MoE(16, num_experts=4, top_k=True)


def test_float_num_experts():
    with pytest.raises(TypeError, match="num_experts must be an int, got float"):
        moelab.MoE(16, num_experts=4.0)


def test_bad_d_model():
    with pytest.raises(ValueError, match="d_model must be >= 1"):
        moelab.MoE(0)


def test_unknown_router():
    with pytest.raises(ValueError, match=r"unknown router 'switchy'.*topk"):
        moelab.MoE(16, router="switchy")


def test_router_of_wrong_type():
    with pytest.raises(TypeError, match="router must be"):
        moelab.MoE(16, router=torch.nn.Linear(16, 4))


def test_router_of_wrong_shape():
    r = moelab.build_router("topk", d_model=8, num_experts=4)
    with pytest.raises(ValueError, match="router has d_model=8"):
        moelab.MoE(16, num_experts=4, router=r)


def test_unknown_router_keyword():
    with pytest.raises(ValueError, match="num_groups"):
        moelab.MoE(16, router="topk", router_kwargs={"num_groups": 2})


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*sorted.*got 'fastest'"):
        moelab.MoE(16, backend="fastest")


def test_unknown_aux_loss():
    with pytest.raises(ValueError, match=r"aux_losses: unknown loss 'balance'.*load_balance"):
        moelab.MoE(16, aux_losses={"balance": 1e-2})


def test_negative_aux_coefficient():
    with pytest.raises(ValueError, match=r"aux_losses\['z'\] must be a number >= 0"):
        moelab.MoE(16, aux_losses={"z": -1e-3})


def test_aux_losses_not_a_dict():
    with pytest.raises(TypeError, match="aux_losses must be a dict"):
        moelab.MoE(16, aux_losses=["z"])


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        moelab.MoE(16, activation="tanh")


def test_bad_hidden():
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        moelab.MoE(16, hidden=0)


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_bad_shared_experts(bad):
    with pytest.raises(ValueError, match="shared_experts must be"):
        moelab.MoE(16, shared_experts=bad)


def test_experts_of_wrong_shape():
    bank = moelab.ExpertBank(4, 8, 8)
    with pytest.raises(ValueError, match="experts has num_experts=4, d_in=8"):
        moelab.MoE(16, num_experts=4, experts=bank)


def test_router_kwargs_with_a_router_instance_are_refused():
    """Arguments for a router the caller already built would be silently dropped: refuse them."""
    import pytest

    import moelab
    from moelab.routers import TopKRouter

    router = TopKRouter(16, 4, 2)
    with pytest.raises(ValueError, match=r"router_kwargs \['capacity_factor'\] given with a Router instance"):
        moelab.MoE(16, 4, 2, router=router, router_kwargs={"capacity_factor": 1.0})
    assert moelab.MoE(16, 4, 2, router=router).router is router
