"""FlyLoRA: the forward against the paper's equation per token, gradients only on B, A frozen and
sparse as specified, the sign-rule bias update (hand-computed counts) through ``moelab.step_end``,
the routing (exactly k per token, equal to the mask, traced and transformable), apply/remove
bit-exact on a tiny transformers Llama, merging, determinism, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_llama import tiny_llama
from torch import nn

import moelab
from moelab.core.routed import override_routing
from moelab.core.routing import Routing
from moelab.lora.flylora import (
    FlyLoRALinear,
    FlyLoRARouter,
    apply_flylora,
    flylora_bias_update,
    flylora_layers,
    flylora_state,
    load_flylora_state,
    merge_flylora,
    merge_lora,
    remove_flylora,
    sparse_random_projection,
)

N_IN, N_OUT, R, K = 24, 20, 8, 3


def layer(seed: int = 0, **kwargs) -> FlyLoRALinear:
    torch.manual_seed(100 + seed)
    fly = FlyLoRALinear(nn.Linear(N_IN, N_OUT), R, K, seed=seed, **kwargs)
    with torch.no_grad():
        fly.lora_B.normal_()
        fly.router.expert_bias.normal_(std=0.3)
    return fly


def reference(fly: FlyLoRALinear, x_TN: torch.Tensor) -> torch.Tensor:
    """The paper's equation, one token at a time, in float64."""
    W, b = fly.base.weight.double(), fly.base.bias.double()
    A, B, d = fly.A.double(), fly.lora_B.double(), fly.expert_bias.double()
    rows = []
    for x in x_TN.double():
        y = A @ x
        idx = torch.topk((y + d).abs(), fly.top_k).indices
        mask = torch.zeros(fly.rank, dtype=torch.float64)
        mask[idx] = 1.0
        rows.append(W @ x + b + (fly.alpha / fly.rank) * B @ (y * mask))
    return torch.stack(rows)


def test_defaults_are_the_papers():
    fly = FlyLoRALinear(nn.Linear(64, 16))
    assert (fly.rank, fly.top_k, fly.alpha, fly.router.bias_update_rate) == (32, 8, 64.0, 1e-3)
    assert fly.scaling == 2.0
    assert torch.equal(fly.lora_B, torch.zeros(16, 32))


def test_A_is_sparse_with_the_specified_rows_and_scale():
    n, r, k = 400, 32, 8
    A = sparse_random_projection(r, n, k, generator=torch.Generator().manual_seed(3))
    p = n * k // r
    assert A.shape == (r, n)
    assert ((A != 0).sum(1) == p).all()
    std = A[A != 0].std().item()
    assert abs(std - 1 / r) < 0.15 / r  # N(0, 1/r^2)
    # A tiny layer still gets one nonzero per row.
    assert ((sparse_random_projection(8, 3, 1) != 0).sum(1) == 1).all()


def test_forward_equals_the_equation_per_token():
    fly = layer()
    x = torch.randn(2, 5, N_IN)
    out = fly(x)
    assert out.shape == (2, 5, N_OUT)
    torch.testing.assert_close(
        out.double().reshape(10, N_OUT), reference(fly, x.reshape(10, N_IN)), rtol=1e-5, atol=1e-5
    )
    # At init (B = 0) the layer is its base.
    fresh = FlyLoRALinear(nn.Linear(N_IN, N_OUT), R, K)
    assert torch.equal(fresh(x), fresh.base(x))


def test_only_B_gets_gradients_and_matches_the_reference():
    fly = layer()
    x = torch.randn(7, N_IN, requires_grad=True)
    trainable = [n for n, p in fly.named_parameters() if p.requires_grad]
    assert trainable == ["lora_B"]
    assert not fly.A.requires_grad and not fly.expert_bias.requires_grad
    grad_out = torch.randn(7, N_OUT)
    fly(x).backward(grad_out)
    assert fly.base.weight.grad is None and fly.base.bias.grad is None
    x_ref = x.detach().double().requires_grad_(True)
    B_ref = fly.lora_B.detach().double().requires_grad_(True)
    with torch.no_grad():
        saved = fly.lora_B.clone()
    A, d = fly.A.double(), fly.expert_bias.double()
    y = x_ref @ A.T
    mask = torch.zeros_like(y).scatter(1, torch.topk((y + d).abs(), K, dim=1).indices, 1.0)
    ref = x_ref @ fly.base.weight.double().T + (fly.alpha / R) * (y * mask) @ B_ref.T
    ref.backward(grad_out.double())
    torch.testing.assert_close(fly.lora_B.grad.double(), B_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(fly.lora_B.detach(), saved)


def test_training_steps_never_change_A_or_the_base():
    fly = layer()
    A0, W0 = fly.A.clone(), fly.base.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in fly.parameters() if p.requires_grad], lr=1e-2)
    fly.train()
    for _ in range(3):
        fly(torch.randn(6, N_IN)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(fly)
    assert torch.equal(fly.A, A0) and torch.equal(fly.base.weight, W0)


def test_bias_update_follows_the_sign_rule_on_hand_counted_selections():
    fly = FlyLoRALinear(nn.Linear(4, 3), rank=4, top_k=2, bias_update_rate=0.5)
    with torch.no_grad():
        fly.router.A.copy_(torch.eye(4))  # y = x: the selection is visible in the input
    fly.train()
    # Token 0 picks ranks {0, 1}, token 1 {0, 2}, token 2 {0, 1}: counts [3, 2, 1, 0], mean 1.5.
    x = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 0.0, -4.0, 0.0], [-5.0, 4.0, 0.0, 0.1]])
    _, routing = fly.forward_routed(x)
    assert torch.equal(fly.router.load_since_step, torch.tensor([3.0, 2.0, 1.0, 0.0]))
    # Eval forwards do not count.
    fly.eval()
    fly(x)
    assert torch.equal(fly.router.load_since_step, torch.tensor([3.0, 2.0, 1.0, 0.0]))
    moelab.step_end(fly)  # the trainer's hook reaches the router
    # d + u sign(k/r - count/T) = 0.5 * sign([0.5 - 1, 0.5 - 2/3, 0.5 - 1/3, 0.5]).
    assert torch.equal(fly.expert_bias, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    assert torch.equal(fly.router.load_since_step, torch.zeros(4))
    fly.update_bias()  # nothing counted since: no change
    assert torch.equal(fly.expert_bias, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    # The function, on its own.
    out = flylora_bias_update(torch.zeros(3), torch.tensor([4.0, 1.0, 1.0]), 0.1)
    assert torch.equal(out, torch.tensor([-0.1, 0.1, 0.1]))


def test_bias_update_rate_zero_disables_it():
    fly = FlyLoRALinear(nn.Linear(4, 3), rank=4, top_k=2, bias_update_rate=0.0).train()
    fly(torch.randn(5, 4))
    fly.update_bias()
    assert torch.equal(fly.expert_bias, torch.zeros(4))


def test_the_bias_balances_rank_usage():
    torch.manual_seed(0)
    fly = FlyLoRALinear(nn.Linear(16, 4), rank=8, top_k=2, bias_update_rate=0.05, seed=1).train()
    x = torch.randn(256, 16) * torch.linspace(0.2, 3.0, 16)  # skewed: some ranks dominate

    def spread() -> float:
        with torch.no_grad():
            counts = fly.router.select(fly.router.project(x)).tokens_per_expert().float()
        return (counts.max() - counts.min()).item()

    before = spread()
    for _ in range(60):
        fly(x)
        fly.update_bias()
    assert spread() < before


def test_routing_has_k_experts_per_token_and_matches_the_mask():
    fly = layer()
    x = torch.randn(9, N_IN)
    _, routing = fly.forward_routed(x)
    routing.check()
    assert isinstance(routing, Routing)
    assert (routing.num_tokens, routing.num_experts, routing.top_k) == (9, R, K)
    assert torch.equal(routing.experts_per_token(), torch.full((9,), K))
    y = x @ fly.A.T
    expected = torch.topk((y + fly.expert_bias).abs(), K, dim=1).indices
    mask = torch.zeros(9, R).scatter(1, expected, 1.0)
    got = torch.zeros(9, R)
    got[routing.token_index, routing.expert_index] = routing.weight
    assert torch.equal(got, mask)
    torch.testing.assert_close(routing.logits, y)


def test_the_routing_is_traced_and_transforms_change_what_runs():
    fly = layer()
    x = torch.randn(6, N_IN)
    with moelab.trace(fly) as tr:
        _, ran = fly.forward_routed(x)
    assert len(tr.layers) == 1
    traced = tr.routing(tr.layers[0])
    assert torch.equal(traced.expert_index.cpu(), ran.expert_index)

    def first_k(routing: Routing, site) -> Routing:
        t = routing.num_tokens
        return Routing(
            token_index=torch.arange(t).repeat_interleave(K),
            expert_index=torch.arange(K).repeat(t),
            weight=torch.ones(t * K),
            num_tokens=t,
            num_experts=routing.num_experts,
            top_k=K,
        )

    with override_routing(fly, first_k):
        out = fly(x)
    y = x @ fly.A.T
    mask = torch.zeros(6, R)
    mask[:, :K] = 1.0
    expected = fly.base(x) + fly.scaling * (y * mask) @ fly.lora_B.T
    torch.testing.assert_close(out, expected)


def test_A_is_deterministic_under_a_seed():
    a, b, c = (FlyLoRALinear(nn.Linear(N_IN, N_OUT), R, K, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.A, b.A) and not torch.equal(a.A, c.A)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        sparse_random_projection(R, N_IN, K, generator=g1), sparse_random_projection(R, N_IN, K, generator=g2)
    )


def test_bf16_keeps_the_bias_in_fp32():
    fly = layer().to(torch.bfloat16)
    assert fly.A.dtype == torch.bfloat16 and fly.lora_B.dtype == torch.bfloat16
    assert fly.expert_bias.dtype == torch.float32
    assert fly(torch.randn(3, N_IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_router_alone_satisfies_the_router_contract():
    router = FlyLoRARouter(N_IN, R, K, generator=torch.Generator().manual_seed(0))
    routing = router(torch.randn(4, N_IN))
    routing.check()
    assert routing.top_k == K and routing.num_experts == R


# ------------------------------------------------------------------ a tiny transformers Llama
transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_apply_trains_only_B_and_remove_restores_bit_exactly():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # a flag remove must restore as it was
    before, modules = snapshot(model), dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    logits0 = model(ids()).logits
    names = apply_flylora(model, TARGETS, rank=8, top_k=2, seed=3)
    assert len(names) == 6 and list(flylora_layers(model)) == names
    assert [layer.layer_index for layer in flylora_layers(model).values()] == list(range(6))
    torch.testing.assert_close(model(ids()).logits, logits0)  # B = 0 at init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(n.endswith("lora_B") for n in trainable)
    # Train a few steps through moelab.step_end, as the trainer does.
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(ids(), labels=ids())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
    assert any(layer.expert_bias.abs().sum() > 0 for layer in flylora_layers(model).values())
    with pytest.raises(ValueError, match="already has LoRA adapter"):
        apply_flylora(model, TARGETS)
    with pytest.raises(
        ValueError, match="already has LoRA mixture"
    ):  # moelab.lora.apply refuses the wrapped names
        moelab.lora.apply(model, TARGETS)
    remove_flylora(model)
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="no FlyLoRA adapter"):
        remove_flylora(model)


def test_state_roundtrip_and_merging():
    model = tiny_llama()
    apply_flylora(model, TARGETS, rank=8, top_k=2, seed=7)
    first = flylora_state(model)
    with torch.no_grad():
        for layer in flylora_layers(model).values():
            layer.lora_B.normal_()
    second = flylora_state(model)
    merged = merge_flylora([first, second])
    for k in merged:
        if k.endswith("lora_A"):
            assert torch.equal(merged[k], first[k])
        else:
            torch.testing.assert_close(merged[k], (first[k] + second[k]) / 2)
    load_flylora_state(model, merged)
    assert flylora_state(model).keys() == merged.keys()
    assert all(torch.equal(flylora_state(model)[k], merged[k]) for k in merged)
    # Same seed, same model: the same A everywhere; another seed cannot be merged.
    other = tiny_llama()
    apply_flylora(other, TARGETS, rank=8, top_k=2, seed=7)
    assert all(torch.equal(flylora_state(other)[k], first[k]) for k in first if k.endswith("lora_A"))
    remove_flylora(other)
    apply_flylora(other, TARGETS, rank=8, top_k=2, seed=8)
    with pytest.raises(ValueError, match="share the frozen A"):
        merge_flylora([first, flylora_state(other)])
    with pytest.raises(ValueError, match="missing keys"):
        load_flylora_state(model, {k: v for k, v in merged.items() if "lora_B" not in k})


def test_merge_lora_averages_A_and_B_separately():
    a = {"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.zeros(4, 2)}
    b = {"x.lora_A": 3 * torch.ones(2, 3), "x.lora_B": 2 * torch.ones(4, 2)}
    merged = merge_lora([a, b])
    assert torch.equal(merged["x.lora_A"], 2 * torch.ones(2, 3))
    assert torch.equal(merged["x.lora_B"], torch.ones(4, 2))
    # The product of the averages is not the average of the products.
    assert not torch.allclose(
        merged["x.lora_B"] @ merged["x.lora_A"],
        (a["x.lora_B"] @ a["x.lora_A"] + b["x.lora_B"] @ b["x.lora_A"]) / 2,
    )


def test_bad_inputs():
    lin = nn.Linear(N_IN, N_OUT)
    with pytest.raises(TypeError, match="base must be a torch nn.Linear"):
        FlyLoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        FlyLoRALinear(lin, rank=4, top_k=5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        FlyLoRALinear(lin, rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        FlyLoRALinear(lin, alpha=-1.0)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator"):
        FlyLoRALinear(lin, seed="0")
    with pytest.raises(ValueError, match="bias_update_rate"):
        FlyLoRALinear(lin, bias_update_rate=-1.0)
    fly = layer()
    with pytest.raises(ValueError, match=r"x must be \[..., d_in=24\]"):
        fly(torch.randn(3, N_IN + 1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fly([1.0] * N_IN)
    with pytest.raises(TypeError, match="x must be floating point"):
        fly(torch.ones(2, N_IN, dtype=torch.long))
    model = tiny_llama()
    with pytest.raises(ValueError, match="match no module"):
        apply_flylora(model, ["nope"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_flylora(model, ["self_attn"])
    with pytest.raises(TypeError, match="seed must be an int"):
        apply_flylora(model, TARGETS, seed=1.5)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        apply_flylora(model, TARGETS, rank=2, top_k=3)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed on an error
    moelab.lora.apply(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA adapter"):
        apply_flylora(model, TARGETS)
    moelab.lora.remove(model)
    with pytest.raises(ValueError, match="no FlyLoRA adapter"):
        remove_flylora(model)
    with pytest.raises(ValueError, match="non-empty list"):
        merge_lora([])
    with pytest.raises(ValueError, match="different keys"):
        merge_lora([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    with pytest.raises(ValueError, match="shape"):
        merge_lora([{"a": torch.ones(1)}, {"a": torch.ones(2)}])
    assert math.isfinite(float(layer()(torch.randn(2, N_IN)).sum().detach()))


def test_generic_remove_restores_a_flylora_model():
    """``moelab.lora.remove`` undoes ``apply_flylora`` as it undoes ``apply``."""
    import moelab.lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model)
    moelab.lora.apply_flylora(model, ["0", "2"], rank=8, top_k=2)
    with pytest.raises(ValueError):
        moelab.lora.apply(model, ["0"])  # one adapter method per model
    moelab.lora.remove(model)
    assert list(model) == modules and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
