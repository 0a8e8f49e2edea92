"""PEER (layer and router ``peer``) and OmniMoE (layer and router ``omni``) against the whole forward
written plainly: per token and per head, every one of the ``N`` pair scores brute-forced, the top
``k`` sorted out by hand, their softmax (PEER) or probabilities (OmniMoE), and
``sum_e w_e act(u_e . x) v_e`` (+ the dense SwiGLU branch for OmniMoE); the BatchNorm with set
running statistics (eval) and with batch statistics computed plainly (training). Also: gradients
reach every parameter and match the reference's; T = 0 and T = 1; causality at eval only; no
``[T, N]`` tensor at N = 2^20; bad arguments; MoELM training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import moelab
import moelab.layers.pools  # noqa: F401  (registers layers "peer" and "omni")
from moelab import registry
from moelab.experts.atomic import AtomicBank
from moelab.layers.moe import MoE
from moelab.layers.pools import PEER, OmniMoE
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.routers.product_key import OmniRouter, PEERRouter, RowBatchNorm

D = torch.float64


# --------------------------------------------------------------------------------- references
def plain_batch_norm(x_TC: Tensor, norm: RowBatchNorm, batch_stats: bool) -> Tensor:
    """BatchNorm written out: batch mean and biased variance, or the running statistics."""
    if batch_stats:
        mean = x_TC.sum(0) / x_TC.shape[0]
        var = ((x_TC - mean) ** 2).sum(0) / x_TC.shape[0]
    else:
        mean, var = norm.running_mean, norm.running_var
    y = (x_TC - mean) / torch.sqrt(var + norm.eps)
    return y * norm.weight + norm.bias if norm.affine else y


def top_pairs(scores: dict[int, Tensor], k: int) -> list[int]:
    """The ``k`` best experts of a brute-forced ``{expert: score}``: by score, ties by lower id."""
    return sorted(scores, key=lambda e: (-float(scores[e].detach()), e))[:k]


def atomic(bank: AtomicBank, e: int, x_D: Tensor, act) -> Tensor:
    return act(torch.dot(bank.u[e], x_D)) * bank.v[e]


def reference_peer(layer: PEER, x_TD: Tensor, batch_stats: bool) -> tuple[Tensor, list[list[int]]]:
    """PEER's forward token by token; also each token's experts in routing order."""
    r = layer.router
    q = x_TD @ r.query_weight.T
    if r.query_norm is not None:
        q = plain_batch_norm(q, r.query_norm, batch_stats)
    n, half, dk = r.num_keys, r.d_key // 2, r.d_key
    act = {"gelu": lambda z: F.gelu(z), "relu": torch.relu, "silu": F.silu}[layer.experts.activation]
    rows, chosen = [], []
    for t in range(x_TD.shape[0]):
        y, mine = x_TD.new_zeros(layer.d_model), []
        for h in range(r.heads):
            qa, qb = q[t, h * dk : h * dk + half], q[t, h * dk + half : (h + 1) * dk]
            scores = {
                i * n + j: torch.dot(qa, r.sub_keys_a[h, i]) + torch.dot(qb, r.sub_keys_b[h, j])
                for i in range(n)
                for j in range(n)
            }
            best = top_pairs(scores, r.top_k)
            s = torch.stack([scores[e] for e in best])
            w = torch.relu(s) if r.non_competing_scores else torch.exp(s) / torch.exp(s).sum()
            for e, we in zip(best, w, strict=True):
                y = y + we * atomic(layer.experts, e, x_TD[t], act)
            mine += best
        rows.append(y)
        chosen.append(mine)
    return torch.stack(rows), chosen


def reference_omni(layer: OmniMoE, x_TD: Tensor, batch_stats: bool) -> tuple[Tensor, list[list[int]]]:
    """OmniMoE's forward token by token: pair probabilities p_x[i] p_y[j] over all n^2 pairs."""
    r = layer.router
    a = plain_batch_norm(x_TD @ r.weight_x.T, r.norm_x, batch_stats)
    b = plain_batch_norm(x_TD @ r.weight_y.T, r.norm_y, batch_stats)
    px = torch.exp(a) / torch.exp(a).sum(-1, keepdim=True)
    py = torch.exp(b) / torch.exp(b).sum(-1, keepdim=True)
    n = r.num_keys
    dense = layer.shared_experts
    rows, chosen = [], []
    for t in range(x_TD.shape[0]):
        probs = {i * n + j: px[t, i] * py[t, j] for i in range(n) for j in range(n)}
        best = top_pairs(probs, r.top_k)
        y = x_TD.new_zeros(layer.d_model)
        for e in best:
            y = y + probs[e] * atomic(layer.experts, e, x_TD[t], F.silu)
        g = x_TD[t] @ dense.gate_proj.weight.T
        u = x_TD[t] @ dense.up_proj.weight.T
        y = y + (F.silu(g) * u) @ dense.down_proj.weight.T  # the dense branch, unweighted
        rows.append(y)
        chosen.append(best)
    return torch.stack(rows), chosen


def randomise_norms(layer: torch.nn.Module, seed: int) -> None:
    """Running statistics and affine parameters away from their (0, 1) init."""
    g = torch.Generator().manual_seed(seed)
    for m in layer.modules():
        if isinstance(m, RowBatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=D))
            m.running_var.copy_(torch.rand(c, generator=g, dtype=D) + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(c, generator=g, dtype=D) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=D) * 0.3)


def make_peer(**kw) -> PEER:
    torch.manual_seed(kw.pop("seed", 0))
    rk = {"heads": 2, "d_key": 6, **kw.pop("router_kwargs", {})}
    layer = PEER(kw.pop("d_model", 8), kw.pop("num_experts", 25), kw.pop("top_k", 3), router_kwargs=rk, **kw)
    layer = layer.to(D)
    with torch.no_grad():  # sub-keys on the scale of the queries: well-separated scores
        layer.router.sub_keys_a.normal_()
        layer.router.sub_keys_b.normal_()
    randomise_norms(layer, 1)
    return layer


def make_omni(**kw) -> OmniMoE:
    torch.manual_seed(kw.pop("seed", 0))
    layer = OmniMoE(
        kw.pop("d_model", 8), kw.pop("num_experts", 27), kw.pop("top_k", 5), kw.pop("hidden", 12), **kw
    )
    layer = layer.to(D)
    randomise_norms(layer, 2)
    return layer


def grads(module: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------------- equal to the loop
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "options",
    [{}, {"router_kwargs": {"non_competing_scores": True}}, {"router_kwargs": {"query_batchnorm": False}}],
    ids=["paper", "relu_scores", "no_batchnorm"],
)
def test_peer_equals_a_plain_per_token_loop_forward_and_backward(training, options):
    layer = make_peer(**options)
    layer.train(training)
    x = torch.randn(6, 8, dtype=D, requires_grad=True)
    y, routing = layer.forward_routed(x)
    # the layer runs the routing it returns: heads * k entries per token, over N, no dense view
    assert routing.num_experts == 25 and routing.top_k == 2 * 3
    assert routing.logits is None and routing.probs is None
    x_ref = x.detach().clone().requires_grad_(True)
    ref, chosen = reference_peer(layer, x_ref, batch_stats=training)
    assert routing.topk_index().tolist() == chosen
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = grads(layer)
    layer.zero_grad()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, want in grads(layer).items():
        torch.testing.assert_close(got[name], want, msg=name)
        assert got[name].abs().sum() > 0, name  # every parameter learns


@pytest.mark.parametrize("training", [False, True])
def test_omni_equals_a_plain_per_token_loop_forward_and_backward(training):
    layer = make_omni()  # N = 27: n = 5, experts 25 and 26 unreachable (official floor(sqrt(N)))
    layer.train(training)
    x = torch.randn(7, 8, dtype=D, requires_grad=True)
    y, routing = layer.forward_routed(x)
    assert routing.num_experts == 27 and routing.top_k == 5 and routing.probs is None
    assert int(routing.expert_index.max()) < 25
    x_ref = x.detach().clone().requires_grad_(True)
    ref, chosen = reference_omni(layer, x_ref, batch_stats=training)
    assert routing.topk_index().tolist() == chosen
    torch.testing.assert_close(y, ref)
    # the weights are the pair probabilities, not renormalised: they sum to less than 1
    assert (routing.weight.view(7, 5).sum(-1) < 1).all()
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = grads(layer)
    layer.zero_grad()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, want in grads(layer).items():
        torch.testing.assert_close(got[name], want, msg=name)
        assert got[name].abs().sum() > 0, name


def test_training_updates_running_statistics_as_batchnorm1d():
    layer = make_omni()
    layer.train()
    norm = layer.router.norm_x
    old_mean, old_var = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(9, 8, dtype=D)
    layer(x)
    a = x @ layer.router.weight_x.T
    torch.testing.assert_close(norm.running_mean, 0.9 * old_mean + 0.1 * a.mean(0))
    torch.testing.assert_close(norm.running_var, 0.9 * old_var + 0.1 * a.var(0, unbiased=True))
    assert int(norm.num_batches_tracked) == 1
    # and it normalises as torch's BatchNorm1d(affine=False) does, in training and at eval
    ref = torch.nn.BatchNorm1d(5, affine=False).to(D)
    ref.running_mean.copy_(old_mean)
    ref.running_var.copy_(old_var)
    fresh = RowBatchNorm(5, affine=False).to(D)
    fresh.running_mean.copy_(old_mean)
    fresh.running_var.copy_(old_var)
    torch.testing.assert_close(fresh(a), ref(a))
    torch.testing.assert_close(fresh.running_var, ref.running_var)
    fresh.eval(), ref.eval()
    torch.testing.assert_close(fresh(a), ref(a))


def test_backend_reference_and_sorted_agree():
    """The layers go through the executor: the reference executor gives the same output."""
    x = torch.randn(5, 8, dtype=D)
    for make in (make_peer, make_omni):
        a, b = make(backend="sorted").eval(), make(backend="reference").eval()
        torch.testing.assert_close(a(x), b(x))
        assert isinstance(a, MoE) and isinstance(a.experts, AtomicBank)


# --------------------------------------------------------------------------------- T = 0, T = 1, causality
@pytest.mark.parametrize("make", [make_peer, make_omni], ids=["peer", "omni"])
def test_one_token_in_training_uses_the_running_statistics(make):
    """BatchNorm1d raises on one row in training; here one row is normalised as at eval, and the
    running statistics stay as they were."""
    layer = make()
    x = torch.randn(1, 8, dtype=D, requires_grad=True)
    stats = {k: v.clone() for k, v in layer.state_dict().items() if "running" in k or "tracked" in k}
    layer.train()
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for k, v in layer.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    layer.eval()
    torch.testing.assert_close(y.detach(), layer(x).detach())


@pytest.mark.parametrize("make", [make_peer, make_omni], ids=["peer", "omni"])
def test_no_tokens(make):
    layer = make().train()
    x = torch.zeros(0, 8, dtype=D, requires_grad=True)
    y, routing = layer.forward_routed(x)
    assert y.shape == (0, 8) and routing.num_assignments == 0
    y.sum().backward()
    assert all(torch.isfinite(b).all() for b in layer.buffers())


@pytest.mark.parametrize("make", [make_peer, make_omni], ids=["peer", "omni"])
def test_causal_at_eval_only(make):
    layer = make()
    assert layer.router.causal_at_eval
    x = torch.randn(6, 8, dtype=D)
    x2 = x.clone()
    x2[3:] = torch.randn(3, 8, dtype=D) * 3
    layer.eval()
    torch.testing.assert_close(layer(x)[:3], layer(x2)[:3])  # running statistics: per token
    layer.train()
    assert not torch.allclose(layer(x)[:3], layer(x2)[:3])  # batch statistics see later tokens


# --------------------------------------------------------------------------------- the routers alone
class LargestTensor(TorchDispatchMode):
    """Records the largest element count and any dimension of size ``n`` among op outputs."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.largest, self.hit = n, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
                self.hit |= self.n in t.shape
        return out


@pytest.mark.parametrize(
    "router",
    [
        lambda: PEERRouter(8, 2**20, 16, heads=2, d_key=8),
        lambda: OmniRouter(8, 2**20, 16),
    ],
    ids=["peer", "omni"],
)
def test_routers_over_a_million_experts_never_allocate_T_by_N(router):
    torch.manual_seed(0)
    r = router().train()
    x = torch.randn(16, 8, requires_grad=True)
    with LargestTensor(2**20) as rec:
        routing = r(x)
        routing.weight.sum().backward()
    assert routing.num_experts == 2**20 and routing.logits is None and routing.probs is None
    assert not rec.hit and rec.largest <= 16 * 2 * 1024, rec.largest  # [T*H, n] scores at most
    assert int(routing.expert_index.max()) < 2**20


def test_peer_router_in_a_plain_moe_layer():
    """Router ``peer`` alone, in a lone ``moelab.MoE`` with an MLP bank: heads * k experts per token."""
    moe = moelab.MoE(16, num_experts=16, top_k=2, router="peer", router_kwargs={"heads": 3})
    for shape in [(2, 5, 16), (1, 16), (0, 16)]:
        x = torch.randn(*shape, requires_grad=True)
        y, routing = moe.forward_routed(x)
        y.sum().backward()
        assert y.shape == x.shape and routing.top_k == 6
    moe = moelab.MoE(16, num_experts=16, top_k=3, router="omni")
    y = moe(torch.randn(4, 16))
    y.sum().backward()
    assert moe.router.weight_x.grad.abs().sum() > 0


def test_omni_router_weights_are_pair_probabilities():
    """Brute force over the full [T, n^2] product of the two softmaxes (small N, built only here)."""
    torch.manual_seed(3)
    r = OmniRouter(8, 49, 6).eval()
    x = torch.randn(5, 8)
    routing = r(x)
    a, b = r.side_logits(x)
    full = (a.softmax(-1).unsqueeze(2) * b.softmax(-1).unsqueeze(1)).reshape(5, 49)
    values, index = full.topk(6, dim=-1)
    assert torch.equal(routing.topk_index(), index)
    torch.testing.assert_close(routing.weight.view(5, 6), values)


# --------------------------------------------------------------------------------- arguments, registry, model
@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: PEER(8, 24, 2), "num_experts must be a perfect square"),
        (lambda: PEERRouter(8, 24, 2), "num_experts must be a perfect square"),
        (lambda: PEER(8, 16, 2, router_kwargs={"d_key": 7}), "d_key must be even"),
        (lambda: PEER(8, 16, 2, router_kwargs={"heads": 0}), "heads must be >= 1"),
        (lambda: PEER(8, 16, 17), "top_k must be <= num_experts"),
        (lambda: PEER(8, 16, 2, 64), "hidden must be None for PEER"),
        (lambda: PEER(8, 16, 2, router_kwargs={"dim_key": 4}), "does not take 'dim_key'"),
        (lambda: PEER(8, 16, 2, router_kwargs={"activation": "swiglu"}), "activation must be a plain"),
        (lambda: OmniRouter(8, 20, 17), r"top_k must be <= floor\(sqrt\(num_experts\)\)\^2 = 16"),
        (lambda: OmniMoE(8, 16, 2, shared_experts=1), "shared_experts must be 0"),
        (lambda: OmniMoE(8, 16, 2, router_kwargs={"activation": "relu"}), "activation must be a plain"),
        (lambda: OmniMoE(8, 16, 2, router_kwargs={"heads": 2}), "does not take 'heads'"),
        (lambda: OmniMoE(8, 16, 2, 0), "hidden must be >= 1"),
    ],
)
def test_bad_arguments_name_themselves(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="query_batchnorm must be a bool"):
        PEERRouter(8, 16, 2, query_batchnorm=1)


def test_registered_and_built_by_moelm_with_router_kwargs():
    assert {"peer", "omni"} <= set(registry.names("layer")) and {"peer", "omni"} <= set(
        registry.names("router")
    )
    cfg = MoELMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        num_experts=64,
        top_k=4,
        router="peer",
        router_kwargs={"heads": 2, "d_key": 8, "non_competing_scores": True},
        aux_losses={},
    )
    ffn = MoELM(cfg).blocks[0].ffn
    assert isinstance(ffn, PEER) and ffn.router.heads == 2 and ffn.router.d_key == 8
    assert ffn.router.non_competing_scores and ffn.router.top_k == 4
    cfg = MoELMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        num_experts=64,
        top_k=4,
        router="omni",
        expert_hidden=48,
        router_kwargs={"top_k": 8},
        aux_losses={},
    )
    ffn = MoELM(cfg).blocks[1].ffn
    assert isinstance(ffn, OmniMoE) and ffn.shared_experts.hidden == 48 and ffn.router.top_k == 8


def test_state_dict_round_trip():
    a = make_peer().eval()
    b = PEER(8, 25, 3, router_kwargs={"heads": 2, "d_key": 6}).to(D).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8, dtype=D)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name,kwargs", [("peer", {"heads": 2}), ("omni", {})])
def test_moelm_trains_a_few_steps_without_nan(name, kwargs):
    torch.manual_seed(0)
    cfg = MoELMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        num_experts=256,
        top_k=4,
        router=name,
        router_kwargs=kwargs,
        aux_losses={},
    )
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    ids = torch.randint(0, 256, (4, 32), generator=g)  # one batch: its loss must fall
    for _ in range(8):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        moelab.step_end(model)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("make", [make_peer, make_omni], ids=["peer", "omni"])
def test_expert_usage_counts_the_eval_forwards_since_training(make):
    layer = make()
    router = layer.router
    assert math.isnan(router.metrics()["expert_usage"])
    layer.eval()
    seen = set()
    for seed in range(2):
        _, routing = layer.forward_routed(
            torch.randn(3, 8, dtype=D, generator=torch.Generator().manual_seed(seed))
        )
        seen |= set(routing.expert_index.tolist())
    assert router.metrics()["expert_usage"] == pytest.approx(len(seen) / layer.num_experts)
    layer.train()
    layer(torch.randn(3, 8, dtype=D))
    assert math.isnan(router.metrics()["expert_usage"])
