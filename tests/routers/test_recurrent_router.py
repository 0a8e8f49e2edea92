"""RMoE's layerwise recurrent router (``rmoe``) against a naive reference: the recurrence run by
hand, token by token and layer by layer, with ``torch.nn.GRUCell`` / ``RNNCell`` holding copied
weights, then softmax, top-k and renormalisation written plainly. Also: the cell is shared (one
copy in parameters and checkpoints), the state is differentiable across layers, the context slot
is safe against re-runs and misaligned inputs, and the router trains in ``MoELM``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moelab
from moelab.core.router import link_routers
from moelab.models import MoELM, MoELMConfig
from moelab.routers.recurrent import RecurrentCell, RecurrentRouter, gru_cell, rnn_cell


class Holder(nn.Module):
    """A stand-in routed layer: what ``link_routers`` looks at is its ``router``."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router


def linked_routers(n: int, d: int = 12, e: int = 6, k: int = 2, **kw) -> list[RecurrentRouter]:
    routers = [RecurrentRouter(d, e, k, **kw) for _ in range(n)]
    link_routers([Holder(r) for r in routers])
    return routers


def torch_cell(cell: RecurrentCell) -> nn.Module:
    """``torch.nn.GRUCell`` / ``RNNCell`` (tanh) holding a copy of ``cell``'s weights."""
    p = cell.hidden_size
    ref = nn.GRUCell(p, p) if cell.cell_type == "gru" else nn.RNNCell(p, p, nonlinearity="tanh")
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, name).copy_(getattr(cell, name))
    return ref.double()


def reference_routing(routers, xs, k):
    """Per token: ``h = 0``; per layer ``h = Cell(W1 x, h)``, ``z = W2 h``; softmax, top-k by a
    full sort, gates renormalised. Returns per layer ``(logits [T,E], index [T,k], weight [T,k])``."""
    cell = torch_cell(routers[0].cell)
    t = xs[0].shape[0]
    out = [(torch.zeros(t, r.num_experts, dtype=torch.float64), [], []) for r in routers]
    for tok in range(t):
        h = torch.zeros(1, routers[0].hidden_size, dtype=torch.float64)
        for layer, (r, x) in enumerate(zip(routers, xs, strict=True)):
            h = cell((r.in_proj.double() @ x[tok].double())[None], h)  # W1 x for one token: [1, p]
            z = (r.out_proj.double() @ h[0]).detach()
            p = torch.exp(z - z.max())
            p = p / p.sum()
            order = sorted(range(r.num_experts), key=lambda i: -float(p[i]))[:k]
            out[layer][0][tok] = z
            out[layer][1].append(order)
            out[layer][2].append([float(p[i]) / sum(float(p[j]) for j in order) for i in order])
    return [(z, torch.tensor(i), torch.tensor(w, dtype=torch.float64)) for z, i, w in out]


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_matches_a_per_token_reference_with_torch_cells(cell):
    torch.manual_seed(0)
    routers = linked_routers(3, hidden_size=10, cell=cell)
    xs = [torch.randn(9, 12) for _ in routers]
    ctx = moelab.RoutingContext()
    got = [r(x, ctx) for r, x in zip(routers, xs, strict=True)]
    for (z, index, weight), routing in zip(reference_routing(routers, xs, 2), got, strict=True):
        torch.testing.assert_close(routing.logits.double(), z, atol=1e-5, rtol=1e-5)
        assert torch.equal(routing.topk_index().view(9, 2), index)
        torch.testing.assert_close(routing.weight.view(9, 2).double(), weight, atol=1e-5, rtol=1e-5)
        assert routing.logits.dtype == torch.float32


def test_cell_functions_match_torch_cells():
    torch.manual_seed(1)
    for kind, fn in (("gru", gru_cell), ("rnn", rnn_cell)):
        cell = RecurrentCell(7, kind)
        x, h = torch.randn(5, 7), torch.randn(5, 7)
        ref = torch_cell(cell).float()
        ours = fn(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        torch.testing.assert_close(ours, ref(x, h))


def test_routing_is_per_token_and_the_first_layer_starts_from_zero():
    torch.manual_seed(2)
    r0, r1 = linked_routers(2)
    xs = [torch.randn(6, 12), torch.randn(6, 12)]
    ctx = moelab.RoutingContext()
    full = [r0(xs[0], ctx).logits, r1(xs[1], ctx).logits]
    for t in (0, 5):  # each token alone gives the same logits: causal at eval
        c = moelab.RoutingContext()
        alone = [r0(xs[0][t : t + 1], c).logits, r1(xs[1][t : t + 1], c).logits]
        for a, f in zip(alone, full, strict=True):
            torch.testing.assert_close(a[0], f[t])
    # h_0 = 0: the first layer's logits are W2 Cell(W1 x, 0)
    h = r0.cell(xs[0] @ r0.in_proj.T, torch.zeros(6, r0.hidden_size))
    torch.testing.assert_close(full[0], h @ r0.out_proj.T)
    assert r0.causal_at_eval and r1.causal_at_eval


def test_state_is_differentiable_across_layers():
    torch.manual_seed(3)
    routers = linked_routers(3)
    ctx = moelab.RoutingContext()
    routings = [r(torch.randn(5, 12), ctx) for r in routers]
    routings[2].logits.square().sum().backward()  # a loss at layer 2 only
    assert routers[0].in_proj.grad is not None and routers[0].in_proj.grad.abs().sum() > 0
    assert routers[1].in_proj.grad.abs().sum() > 0
    assert routers[0].out_proj.grad is None  # layer 0's head is not on the path to layer 2
    assert routers[0].cell.weight_hh.grad.abs().sum() > 0


def test_rerunning_a_layer_reads_the_same_predecessor_and_misaligned_inputs_fail():
    torch.manual_seed(4)
    r0, r1, r2 = linked_routers(3)
    x0, x1 = torch.randn(4, 12), torch.randn(4, 12)
    ctx = moelab.RoutingContext()
    r0(x0, ctx)
    first = r1(x1, ctx).logits
    r2(torch.randn(4, 12), ctx)
    again = r1(x1, ctx).logits  # the same layer run twice (e.g. recomputation)
    torch.testing.assert_close(again, first)
    with pytest.raises(ValueError, match="T=3.*T=4"):
        r1(torch.randn(3, 12), ctx)
    with pytest.raises(ValueError, match="depth 1.*no state of depth 0"):
        r1(x1, moelab.RoutingContext())  # a later layer needs its predecessor in the context
    # a context reused for a new forward: the first layer starts over, nothing stale is read
    r0(torch.randn(2, 12), ctx)
    assert r1(torch.randn(2, 12), ctx).num_tokens == 2


def small_lm(**over) -> MoELM:
    cfg = dict(
        d_model=32,
        n_layers=3,
        n_heads=2,
        num_experts=4,
        top_k=2,
        max_seq_len=32,
        vocab_size=256,
        router="rmoe",
        router_kwargs={"hidden_size": 16},
    )
    cfg.update(over)
    return MoELM(MoELMConfig(**cfg))


def test_moelm_shares_one_cell_owned_by_the_first_router(tmp_path):
    torch.manual_seed(5)
    model = small_lm().eval()
    routers = [m.router for _, m in model.moe_layers()]
    assert [r.depth for r in routers] == [0, 1, 2]
    assert all(r.cell is routers[0].cell for r in routers)
    assert routers[0].owns_cell and not routers[1].owns_cell
    cell_params = [n for n, _ in model.named_parameters(remove_duplicate=False) if ".cell." in n]
    assert cell_params == [
        f"blocks.0.ffn.router.cell.{w}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    assert sorted(k for k in model.state_dict() if ".cell." in k) == sorted(cell_params)
    in_projs = [n for n, _ in model.named_parameters() if n.endswith("in_proj")]
    assert len(in_projs) == 3  # W1, W2 are per layer
    # save / load: identical logits, and the loaded routers share again
    ids = torch.randint(0, 256, (2, 10))
    before = model(ids).logits
    loaded = MoELM.from_pretrained(model.save_pretrained(tmp_path / "ckpt")).eval()
    assert torch.equal(loaded(ids).logits, before)
    lr = [m.router for _, m in loaded.moe_layers()]
    assert all(r.cell is lr[0].cell for r in lr)


def test_moelm_routes_as_the_reference_with_dense_layers_between():
    """Every MoE layer's logits in a MoELM (MoE every 2nd block) equal the per-token reference
    run on the inputs its router saw: the state skips the dense blocks."""
    torch.manual_seed(6)
    model = small_lm(n_layers=4, moe_every=2).eval()
    routers = [m.router for _, m in model.moe_layers()]
    seen = []
    handles = [r.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for r in routers]
    ctx = moelab.RoutingContext()
    model(torch.randint(0, 256, (2, 5)), ctx=ctx)
    for h in handles:
        h.remove()
    assert len(seen) == 2 and len(ctx.history) == 2
    for (z, index, _), routing in zip(reference_routing(routers, seen, 2), ctx.history, strict=True):
        torch.testing.assert_close(routing.logits.double(), z, atol=1e-5, rtol=1e-5)
        assert torch.equal(routing.topk_index().view(-1, 2), index)


def test_trains_in_moelm_without_nan():
    torch.manual_seed(7)
    model = small_lm(n_layers=2, num_experts=8, router_kwargs={}, aux_losses={"load_balance": 1e-3})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(5):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert model.blocks[0].ffn.router.cell.weight_ih.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 16), (0, 16)])
def test_lone_moe_forward_and_backward(shape):
    torch.manual_seed(8)
    moe = moelab.MoE(16, num_experts=4, top_k=2, router="rmoe", router_kwargs={"hidden_size": 8})
    assert moe.router.owns_cell and moe.router.depth == 0
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    (y.square().sum() + moe.aux_loss).backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    if x.numel():
        assert moe.router.in_proj.grad.abs().sum() > 0 and moe.router.cell.weight_ih.grad.abs().sum() > 0
        y2 = moe(x)  # unlinked: every call starts from h_0 = 0, the same output
        torch.testing.assert_close(y2, y)


def test_router_math_runs_in_fp32():
    torch.manual_seed(9)
    r = RecurrentRouter(8, 4, 2, hidden_size=6).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    assert r(x).logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r.float()(x.float()).logits.dtype == torch.float32


def test_init_std_and_top1():
    torch.manual_seed(10)
    r = RecurrentRouter(64, 8, 1, hidden_size=128, init_std=0.02)
    for p in r.parameters():
        assert abs(float(p.detach().std()) - 0.02) < 0.004
    out = r(torch.randn(3, 64))  # k = 1 keeps the raw probability (not renormalised to 1)
    torch.testing.assert_close(out.weight, out.probs.max(dim=1).values)


@pytest.mark.parametrize(
    "kwargs,arg,exc",
    [
        ({"hidden_size": 0}, "hidden_size", ValueError),
        ({"hidden_size": 2.5}, "hidden_size", TypeError),
        ({"cell": "lstm"}, "cell", ValueError),
        ({"init_std": -1.0}, "init_std", ValueError),
        ({"normalize": "yes"}, "normalize", TypeError),
        ({"top_k": 5}, "top_k", ValueError),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg, exc):
    with pytest.raises(exc, match=arg):
        moelab.build_router("rmoe", d_model=8, num_experts=4, **kwargs)


def test_linking_routers_with_different_cells_fails():
    a, b = RecurrentRouter(8, 4, hidden_size=6), RecurrentRouter(8, 4, hidden_size=5)
    with pytest.raises(ValueError, match="hidden_size=5.*hidden_size=6"):
        link_routers([Holder(a), Holder(b)])
    c = RecurrentRouter(8, 4, hidden_size=6, cell="rnn")
    with pytest.raises(ValueError, match="cell='rnn'"):
        link_routers([Holder(a), Holder(c)])
