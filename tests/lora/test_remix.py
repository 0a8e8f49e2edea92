"""ReMix: the layer against its equation written plainly (forward and gradients), the sampler (k
distinct experts, equal weights, Plackett-Luce frequencies), the RLOO surrogate's gradient against
the estimator's formula with the same samples, top-k at inference, ESS on hand cases, and one RLOO
step on a tiny transformers Llama that changes the routers and the LoRA experts only."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_llama import tiny_llama
from torch import Tensor, nn

import moelab
from moelab import RoutingContext, registry
from moelab.lora import apply, mixture_config, mixture_layers, remove
from moelab.lora.remix import (
    REMIX_PRESET,
    ReMixLoRA,
    ReMixRouter,
    effective_num_experts,
    plackett_luce_log_prob,
    remix_rloo_step,
    remix_routers,
    rloo_advantages,
    rloo_surrogate,
    router_effective_num_experts,
    sample_without_replacement,
)


def make_layer(d_in=6, d_out=10, e=5, r=4, seed=0, **kwargs) -> ReMixLoRA:
    torch.manual_seed(seed)
    layer = ReMixLoRA(nn.Linear(d_in, d_out), e, r, alpha=6.0, **kwargs).double()
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    return layer


def plain_output(layer: ReMixLoRA, x: Tensor, subsets_TK: Tensor) -> Tensor:
    """``W0 x + b + sum_{i in S_t} c * scaling * B_i A_i x_t``, token by token."""
    x_TD = x.reshape(-1, layer.d_model)
    bank, c = layer.experts, layer.router.expert_weight
    rows = []
    for t in range(x_TD.shape[0]):
        row = layer.base.weight @ x_TD[t] + layer.base.bias
        for i in subsets_TK[t].tolist():
            row = row + c * bank.scaling * (bank.lora_B[i] @ (bank.lora_A[i] @ x_TD[t]))
        rows.append(row)
    return torch.stack(rows).view(*x.shape[:-1], layer.d_out)


# ---------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("mode", ["sample", "topk"])
@pytest.mark.parametrize("shape", [(2, 5), (7,)])
def test_forward_and_grads_equal_the_equation(mode, shape):
    layer = make_layer(top_k=3, mode=mode)
    layer.train()
    x = torch.randn(*shape, 6, dtype=torch.float64, requires_grad=True)
    ctx = RoutingContext()
    y, routing = layer.forward_routed(x, ctx)
    assert ctx.history[-1] is routing  # it went through RoutedLayer.routed (traced, transformable)
    subsets = routing.topk_index()
    expected = plain_output(layer, x, subsets)
    torch.testing.assert_close(y, expected)
    up = torch.randn_like(y)
    params = [x, layer.experts.lora_A, layer.experts.lora_B]
    got = torch.autograd.grad((y * up).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((expected * up).sum(), params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    # Constant weights: the forward gives the router no gradient.
    assert not routing.weight.requires_grad
    (y * up).sum().backward()
    assert layer.router.weight.grad is None and layer.base.weight.grad is None


def test_sampling_gives_k_distinct_experts_with_equal_weights():
    layer = make_layer(e=6, top_k=3, expert_weight=0.3)
    layer.train()
    _, routing = layer.forward_routed(torch.randn(200, 6, dtype=torch.float64))
    subsets = routing.topk_index()
    assert subsets.shape == (200, 3)
    assert all(len(set(row)) == 3 for row in subsets.tolist())
    assert torch.equal(routing.weight, torch.full((600,), 0.3))
    assert routing.top_k == 3 and float(effective_num_experts(routing)) == pytest.approx(3.0)
    default = make_layer(top_k=2)
    assert default.router.expert_weight == 0.5  # c = 1/k, our default


def test_sampler_frequencies_follow_plackett_luce():
    logits = torch.tensor([[1.0, 0.0, -0.5, 0.7]])
    p = torch.softmax(logits, -1)[0].tolist()
    g = torch.Generator().manual_seed(0)
    draws = sample_without_replacement(logits.expand(40000, 4), 2, generator=g)
    for i, j in [(0, 3), (3, 0), (1, 2)]:
        freq = ((draws[:, 0] == i) & (draws[:, 1] == j)).float().mean().item()
        assert freq == pytest.approx(p[i] * p[j] / (1 - p[i]), abs=0.01)


def test_plackett_luce_log_prob_is_the_sequential_formula_and_normalised():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, dtype=torch.float64)
    index = torch.tensor([[2, 0], [1, 3], [3, 2]])
    got = plackett_luce_log_prob(logits, index)
    for t in range(3):
        p = torch.softmax(logits[t], -1).tolist()
        i, j = index[t].tolist()
        assert float(got[t]) == pytest.approx(math.log(p[i]) + math.log(p[j] / (1 - p[i])), rel=1e-6)
    # Summed over every ordered draw of 2 experts out of 4, the probabilities are 1.
    pairs = torch.tensor(list(itertools.permutations(range(4), 2)))
    total = plackett_luce_log_prob(logits[:1].expand(len(pairs), 4), pairs).exp().sum()
    assert float(total) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------------------------- inference
def test_inference_is_the_deterministic_top_k_with_equal_weights():
    layer = make_layer(e=6, top_k=2)
    layer.eval()
    x = torch.randn(9, 6, dtype=torch.float64)
    _, r1 = layer.forward_routed(x)
    _, r2 = layer.forward_routed(x)
    scores = x.float() @ layer.router.weight.float().T
    expected = torch.topk(scores, 2, dim=1).indices
    assert torch.equal(r1.topk_index(), expected) and torch.equal(r2.topk_index(), expected)
    assert torch.equal(r1.weight, torch.full((18,), 0.5))
    # The sampling mode can be forced either way.
    layer.router.mode = "sample"
    assert layer.router.sampling
    layer.train()
    layer.router.mode = "topk"
    assert not layer.router.sampling


# ---------------------------------------------------------------------------------- RLOO
def test_rloo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 6.0]])
    expected = torch.tensor([[1 - 2.5, 0 - 3.0], [2 - 2.0, 0 - 3.0], [3 - 1.5, 6 - 0.0]])
    torch.testing.assert_close(rloo_advantages(rewards), expected)
    with pytest.raises(ValueError, match="M >= 2"):
        rloo_advantages(torch.ones(1, 3))


def test_rloo_step_gradient_equals_the_estimator_formula():
    """Fixed samples (recorded as they are drawn): the surrogate's router gradient equals
    (1/(M B)) sum_{m,b} (L_mb - mean_{m' != m} L_m'b) * sum_{t in b} grad log pi(S_mt | x_t),
    with grad_W log pi written analytically: (sum_j (e_{i_j} - softmax over the experts not yet
    drawn)) x^T; and the returned loss equals the mean of the plain per-sequence losses."""
    layer = make_layer(e=4, top_k=2)
    layer.train()
    x = torch.randn(3, 4, 6, dtype=torch.float64)  # B = 3 sequences of 4 tokens
    target = torch.randn(3, 4, 10, dtype=torch.float64)
    drawn = []
    layer.router.register_forward_hook(lambda mod, inp, out: drawn.append(out.topk_index().clone()))

    def loss_fn(model, batch):
        return (model(batch) - target).square().mean(dim=(1, 2))

    torch.manual_seed(5)
    loss, surrogate = remix_rloo_step(layer, loss_fn, x, num_samples=3)
    assert len(drawn) == 3
    plain = torch.stack(
        [(plain_output(layer, x, s) - target).square().mean(dim=(1, 2)).detach() for s in drawn]
    )  # [M, B]
    torch.testing.assert_close(loss.detach(), plain.mean())
    grad_w = torch.autograd.grad(surrogate, layer.router.weight, retain_graph=True)[0]
    m_count, b_count = plain.shape
    x_TD = x.reshape(-1, 6)
    logits = x_TD @ layer.router.weight.detach().T
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for m in range(m_count):
        for b in range(b_count):
            baseline = (plain[:, b].sum() - plain[m, b]) / (m_count - 1)
            score = torch.zeros(4, 6, dtype=torch.float64)
            for t in range(b * 4, b * 4 + 4):
                remaining = torch.ones(4, dtype=torch.bool)
                g = torch.zeros(4, dtype=torch.float64)
                for i in drawn[m][t].tolist():
                    q = torch.softmax(logits[t].masked_fill(~remaining, float("-inf")), -1)
                    g = g + torch.nn.functional.one_hot(torch.tensor(i), 4).double() - q
                    remaining[i] = False
                score = score + torch.outer(g, x_TD[t])
            expected = expected + (plain[m, b] - baseline) * score
    expected = expected / (m_count * b_count)
    torch.testing.assert_close(grad_w, expected.to(grad_w.dtype), rtol=1e-5, atol=1e-6)
    # The surrogate reaches the router only; the loss reaches the experts only.
    for p in (layer.experts.lora_A, layer.experts.lora_B):
        assert torch.autograd.grad(surrogate, p, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(loss, layer.router.weight, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(loss, layer.experts.lora_B)[0].abs().sum() > 0


def test_rloo_surrogate_is_the_formula_on_given_numbers():
    losses = torch.tensor([[1.0], [3.0]])
    log_probs = torch.tensor([[-0.5], [-2.0]], requires_grad=True)
    s = rloo_surrogate(losses, log_probs)
    # advantages of R = -L: [-1 - (-3), -3 - (-1)] = [2, -2]; surrogate = -(2 * lp0 - 2 * lp1) / 2
    assert float(s.detach()) == pytest.approx(-(2 * -0.5 - 2 * -2.0) / 2)
    (g,) = torch.autograd.grad(s, log_probs)
    torch.testing.assert_close(g, torch.tensor([[-1.0], [1.0]]))


def test_rloo_step_with_a_scalar_loss_and_bad_inputs():
    layer = make_layer()
    layer.train()
    x = torch.randn(5, 6, dtype=torch.float64)
    loss, surrogate = remix_rloo_step(layer, lambda m, b: m(b).square().mean(), x, num_samples=2)
    assert loss.dim() == 0 and surrogate.dim() == 0
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        remix_rloo_step(layer, lambda m, b: m(b).sum(), x, num_samples=1)
    with pytest.raises(ValueError, match="per-sequence losses"):
        remix_rloo_step(layer, lambda m, b: m(b).sum(1), x, num_samples=2)  # flat input, [T] losses
    with pytest.raises(ValueError, match="no ReMix router"):
        remix_rloo_step(nn.Linear(2, 2), lambda m, b: m(b).sum(), x)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        remix_rloo_step(layer, None, x)
    layer.eval()
    with pytest.raises(ValueError, match="no ReMix router sampled"):
        remix_rloo_step(layer, lambda m, b: m(b).sum(), x)
    assert layer.router.recorded is None  # recording is switched off again
    with pytest.raises(ValueError, match="expert_weight must be > 0"):
        ReMixRouter(6, 4, 2, expert_weight=-1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ReMixRouter(6, 4, 2, mode="greedy")
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        ReMixRouter(6, 4, 5)
    with pytest.raises(TypeError, match="base must be a torch nn.Linear"):
        ReMixLoRA(nn.Conv1d(2, 2, 1), 4, 2)


# ---------------------------------------------------------------------------------- ESS
def test_effective_num_experts_on_hand_cases():
    assert float(effective_num_experts(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))) == pytest.approx(2.0)
    assert float(effective_num_experts(torch.tensor([[0.0, 1.0, 0.0]]))) == pytest.approx(1.0)
    assert float(effective_num_experts(torch.full((3, 4), 0.25))) == pytest.approx(4.0)
    assert float(effective_num_experts(torch.tensor([[1.0, 1.0, 1.0]]))) == pytest.approx(3.0)  # normalised
    # Mean over tokens; a token with no weight (dropped) is left out.
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    assert float(effective_num_experts(w)) == pytest.approx(1.5)
    # 0.8 / 0.2: 1 / (0.64 + 0.04)
    assert float(effective_num_experts(torch.tensor([[0.8, 0.2]]))) == pytest.approx(1 / 0.68)
    assert float(router_effective_num_experts(torch.softmax(torch.tensor([[20.0, 0, 0, 0]]), -1))) < 1.001
    assert float(router_effective_num_experts(torch.full((2, 8), 1 / 8))) == pytest.approx(8.0)
    with pytest.raises(TypeError, match="weights must be a float tensor"):
        effective_num_experts(torch.ones(3, dtype=torch.long))


def test_ess_of_remix_is_k_and_of_a_softmax_router_its_distribution():
    layer = make_layer(e=6, top_k=3)
    layer.train()
    _, routing = layer.forward_routed(torch.randn(10, 6, dtype=torch.float64))
    assert float(effective_num_experts(routing)) == pytest.approx(3.0)
    probs = torch.softmax(routing.logits.detach(), -1)
    manual = (1 / probs.square().sum(1)).mean()
    assert float(router_effective_num_experts(routing)) == pytest.approx(float(manual), rel=1e-6)
    assert layer.router.metrics() == {
        "routing_ess": 3.0,
        "router_ess": pytest.approx(float(manual), rel=1e-6),
    }


# ---------------------------------------------------------------------------------- registry + Llama
def test_registered_as_lora_method_and_router():
    assert registry.get("lora", "remix").obj is REMIX_PRESET
    assert registry.get("router", "remix").obj is ReMixRouter
    assert REMIX_PRESET.router == "remix" and REMIX_PRESET.top_k == 2
    assert "remix" in {m.name for m in moelab.list_methods("lora")}


def test_one_rloo_step_on_a_tiny_llama_changes_only_routers_and_loras():
    model = tiny_llama()
    names = apply(model, ["q_proj", "v_proj"], method="remix", num_experts=4, rank=4)
    assert len(names) == 4 and len(remix_routers(model)) == 4
    config = mixture_config(model)
    assert (config["method"], config["router"], config["top_k"]) == ("remix", "remix", 2)
    with torch.no_grad():  # B = 0 at init would make every sample's loss equal (no router signal)
        for layer in mixture_layers(model).values():
            layer.experts.lora_B.normal_(0.0, 0.5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, batch):
        logits = m(batch).logits[:, :-1]
        ce = nn.functional.cross_entropy(logits.reshape(-1, 96), batch[:, 1:].reshape(-1), reduction="none")
        return ce.view(batch.shape[0], -1).mean(1)

    model.train()
    loss, surrogate = remix_rloo_step(model, loss_fn, ids, num_samples=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    opt.zero_grad()
    (loss + surrogate).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    routers = {k for k in before if k.endswith("router.weight")}
    loras = {k for k in before if k.endswith(("experts.lora_A", "experts.lora_B"))}
    assert len(routers) == 4 and len(loras) == 8
    assert changed == routers | loras
    model.eval()
    with torch.no_grad():
        out1, out2 = model(ids).logits, model(ids).logits
    assert torch.equal(out1, out2)  # top-k at inference: deterministic
    remove(model)
    assert not remix_routers(model)
