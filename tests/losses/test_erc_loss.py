"""The ERC loss (expert-router coupling) against the paper's equations written plainly: a double
loop over (i, j) for M and the loss, brute-force nearest rows for eps, the noise bounds, the cost
independent of T, and gradients through both the router and the experts' gate projections."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moelab
import moelab.losses.erc  # noqa: F401  (registers "erc"; the package import comes with the lead)
from moelab.core.router import Router
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.losses import get_loss
from moelab.losses.erc import (
    erc,
    erc_coupling,
    erc_diag_dominance,
    erc_diagnostics,
    erc_epsilon,
    erc_loss,
    erc_proxy_tokens,
    expert_gate_weight,
)
from moelab.models import MoELM, MoELMConfig


# ------------------------------------------------------------------------- references, written plainly
def eps_brute_force(R: torch.Tensor) -> list[float]:
    """eps_i = min over j != i of ||R_i - R_j|| / (2 ||R_i||), by enumerating the pairs."""
    rows = R.double().tolist()
    out = []
    for i, ri in enumerate(rows):
        nearest = min(math.dist(ri, rj) for j, rj in enumerate(rows) if j != i)
        out.append(nearest / (2 * math.sqrt(sum(v * v for v in ri))))
    return out


def coupling_loop(proxy: list[list[float]], w_gate: list[list[list[float]]]) -> list[list[float]]:
    """M[i][j] = || W_g^j proxy_i ||_2 with W_g^j given as [H][d] rows."""
    e = len(proxy)
    M = [[0.0] * e for _ in range(e)]
    for i in range(e):
        for j in range(e):
            act = [sum(w * x for w, x in zip(row, proxy[i], strict=True)) for row in w_gate[j]]
            M[i][j] = math.sqrt(sum(a * a for a in act))
    return M


def erc_loss_loop(M: list[list[float]], alpha: float) -> float:
    """(1/E^2) sum_i sum_{j != i} [relu(M[i][j] - alpha M[i][i]) + relu(M[j][i] - alpha M[i][i])]."""
    e = len(M)
    total = 0.0
    for i in range(e):
        for j in range(e):
            if j != i:
                total += max(0.0, M[i][j] - alpha * M[i][i]) + max(0.0, M[j][i] - alpha * M[i][i])
    return total / e**2


def gate_of(bank: ExpertBank) -> torch.Tensor:
    """Expert j's gate projection read from bank.py's documented layout (gate rows first)."""
    return torch.stack(
        [bank.w_in[j][: bank.hidden] if bank.gated else bank.w_in[j] for j in range(bank.num_experts)]
    )


def moe(e=4, d=12, **kw):
    kw.setdefault("aux_losses", {"erc": 1.0})
    return moelab.MoE(d, num_experts=e, top_k=min(2, e), **kw)


# ------------------------------------------------------------------------- the math
@pytest.mark.parametrize("e,h,d,alpha", [(2, 3, 4, 1.0), (5, 6, 7, 0.5), (8, 4, 3, 0.8)])
def test_coupling_and_loss_match_the_double_loop(e, h, d, alpha):
    torch.manual_seed(e)
    R, W = torch.randn(e, d), torch.randn(e, h, d)
    M = erc_coupling(R, W)
    M_ref = coupling_loop(R.tolist(), W.tolist())
    torch.testing.assert_close(M, torch.tensor(M_ref), rtol=1e-5, atol=1e-6)
    assert erc_loss(M, alpha).item() == pytest.approx(erc_loss_loop(M_ref, alpha), rel=1e-5)
    # with noise: the reference redraws the same uniforms and applies R~_i = R_i * U(1 - eps_i, 1 + eps_i)
    M_noisy = erc_coupling(R, W, noise=True, generator=torch.Generator().manual_seed(7))
    u = torch.rand(e, d, generator=torch.Generator().manual_seed(7)).tolist()
    eps = eps_brute_force(R)
    proxy = [
        [r * (1 - eps[i] + 2 * eps[i] * u[i][k]) for k, r in enumerate(row)]
        for i, row in enumerate(R.tolist())
    ]
    M_ref = coupling_loop(proxy, W.tolist())
    torch.testing.assert_close(M_noisy, torch.tensor(M_ref), rtol=1e-5, atol=1e-6)
    assert erc_loss(M_noisy, alpha).item() == pytest.approx(erc_loss_loop(M_ref, alpha), rel=1e-5)


def test_layer_loss_matches_the_double_loop_on_the_layers_weights():
    torch.manual_seed(0)
    for activation in ("swiglu", "gelu"):  # gated: the gate half of w_in; plain: the input projection
        layer = moe(e=5, d=6, hidden=7, activation=activation, aux_losses={"erc": 1.0},
                    aux_loss_kwargs={"erc": {"alpha": 0.7}}).eval()  # fmt: skip
        layer(torch.randn(3, 6))
        M_ref = coupling_loop(layer.router.weight.tolist(), gate_of(layer.experts).tolist())
        assert layer.aux_terms["erc"].item() == pytest.approx(erc_loss_loop(M_ref, 0.7), rel=1e-5)
        assert expert_gate_weight(layer.experts).shape == (5, 7, 6)


def test_loss_is_zero_when_the_diagonal_dominates_and_counts_both_constraints():
    # diagonal M: every off-diagonal term vanishes, for any alpha in (0, 1]
    assert erc_loss(torch.diag(torch.tensor([1.0, 2.0, 3.0])), 0.5).item() == 0.0
    # one off-diagonal entry above the diagonal of its row (i=0) and of its column's owner (i=1)
    M = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    # row constraint (i=0, j=1): relu(3 - 1) = 2; column constraint (i=1, j=0): relu(M[0,1] - M[1,1]) = 1
    assert erc_loss(M, 1.0).item() == pytest.approx((2 + 1) / 4)
    # alpha < 1 asks for a margin: now the diagonal-dominant matrix is penalised too
    assert erc_loss(torch.tensor([[1.0, 0.8], [0.8, 1.0]]), 0.5).item() == pytest.approx(4 * 0.3 / 4)


@pytest.mark.parametrize("e,d", [(2, 3), (6, 5), (32, 16)])
def test_epsilon_matches_brute_force(e, d):
    torch.manual_seed(e)
    R = torch.randn(e, d, requires_grad=True) * torch.rand(e, 1) * 3
    eps = erc_epsilon(R)
    assert not eps.requires_grad  # a constant of the step
    torch.testing.assert_close(
        eps, torch.tensor(eps_brute_force(R.detach()), dtype=torch.float32), rtol=1e-5, atol=1e-7
    )


def test_epsilon_edge_cases():
    assert erc_epsilon(torch.randn(1, 4)).tolist() == [0.0]  # no other row
    eps = erc_epsilon(torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 0.0]]))
    assert eps[0].item() == 0.0  # a zero row: its proxy token is 0 whatever the noise
    assert eps[1].item() == pytest.approx(4 / (2 * 5))


def test_noise_stays_inside_its_bounds_and_inside_the_cluster():
    torch.manual_seed(1)
    R = torch.randn(6, 8)
    eps = erc_epsilon(R)
    dist = torch.cdist(R.double(), R.double()).fill_diagonal_(float("inf"))
    lo, hi = torch.full_like(R, float("inf")), torch.full_like(R, -float("inf"))
    for s in range(300):
        proxy = erc_proxy_tokens(R, generator=torch.Generator().manual_seed(s))
        delta = proxy / R
        lo, hi = torch.minimum(lo, delta), torch.maximum(hi, delta)
        # ||R~_i - R_i|| <= eps_i ||R_i|| = half the distance to the nearest other row: R~_i stays nearest R_i
        moved = (proxy - R).double().norm(dim=-1)
        assert (moved <= dist.min(-1).values / 2 + 1e-6).all()
        assert torch.equal(torch.cdist(proxy.double(), R.double()).argmin(-1), torch.arange(6))
    assert (lo >= 1 - eps[:, None] - 1e-6).all() and (hi <= 1 + eps[:, None] + 1e-6).all()
    # the draws cover the whole interval (300 uniforms per entry)
    assert ((lo - (1 - eps[:, None])) < 0.05 * eps[:, None]).all()
    assert (((1 + eps[:, None]) - hi) < 0.05 * eps[:, None]).all()


def test_noise_only_in_training_mode_and_only_when_asked():
    torch.manual_seed(2)
    layer = moe()
    x = torch.randn(5, 12)
    routing = layer.router(x)
    clean = erc(routing, layer=layer, noise=False)
    torch.manual_seed(3)
    noisy = erc(routing, layer=layer)
    assert noisy.item() != pytest.approx(clean.item(), rel=1e-7)
    layer.eval()
    state = torch.get_rng_state()
    assert erc(routing, layer=layer).item() == clean.item()
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing


def test_value_does_not_depend_on_the_number_of_tokens():
    torch.manual_seed(4)
    layer = moe(e=8, d=16)
    values = []
    for t in (1, 100):
        x = torch.randn(t, 16)
        torch.manual_seed(123)
        direct = erc(layer.router(x), layer=layer)
        torch.manual_seed(123)
        layer(x)  # the layer's own term: same weights, same noise draw
        values += [direct.item(), layer.aux_terms["erc"].item()]
    assert len(set(values)) == 1, values


def test_gradients_reach_router_rows_and_expert_gate_projections_only():
    torch.manual_seed(5)
    layer = moe(e=4, d=8, hidden=6, aux_losses={"erc": 1.0}, aux_loss_kwargs={"erc": {"alpha": 0.5}})
    with torch.no_grad():  # a router row close to another: both constraints are active
        layer.router.weight[1] = layer.router.weight[0] * 1.1
    loss = erc(layer.router(torch.randn(3, 8)), layer=layer, alpha=0.5, noise=False)
    assert loss.item() > 0
    loss.backward()
    h = layer.experts.hidden
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad[:, :h].abs().sum() > 0
    assert layer.experts.gate_up_proj.grad[:, h:].abs().sum() == 0  # the up half is not W_g
    assert layer.experts.down_proj.grad is None
    # and they are the gradients of the equation: autograd through the plain loops
    R = layer.router.weight.detach().double().requires_grad_()
    W = gate_of(layer.experts).detach().double().requires_grad_()
    M = [[torch.linalg.vector_norm(W[j] @ R[i]) for j in range(4)] for i in range(4)]
    ref = sum(
        torch.relu(M[i][j] - 0.5 * M[i][i]) + torch.relu(M[j][i] - 0.5 * M[i][i])
        for i in range(4) for j in range(4) if j != i
    ) / 16  # fmt: skip
    ref.backward()
    torch.testing.assert_close(layer.router.weight.grad, R.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad[:, :h], W.grad.float(), rtol=1e-4, atol=1e-6)


def test_diagnostics_are_clean_and_detached():
    torch.manual_seed(6)
    layer = moe(e=5, d=6)
    state = torch.get_rng_state()
    diag = erc_diagnostics(layer)
    assert torch.equal(torch.get_rng_state(), state)  # no noise drawn
    M_ref = coupling_loop(layer.router.weight.tolist(), gate_of(layer.experts).tolist())
    dominance = sum(M_ref[i][i] / max(M_ref[i][j] for j in range(5) if j != i) for i in range(5)) / 5
    assert diag["erc_diag_dominance"] == pytest.approx(dominance, rel=1e-5)
    assert diag["erc_epsilon"] == pytest.approx(
        sum(eps_brute_force(layer.router.weight.detach())) / 5, rel=1e-5
    )
    assert erc_diag_dominance(torch.tensor([[2.0, 1.0], [4.0, 1.0]])).item() == pytest.approx((2 + 0.25) / 2)
    one = moe(e=1, d=6)
    one(torch.randn(2, 6))
    assert one.aux_terms["erc"].item() == 0.0 and math.isnan(erc_diagnostics(one)["erc_diag_dominance"])


def test_training_on_erc_alone_raises_diag_dominance():
    torch.manual_seed(7)
    layer = moe(e=6, d=16, aux_loss_kwargs={"erc": {"alpha": 0.5}})
    before = erc_diagnostics(layer)["erc_diag_dominance"]
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 16)
    for _ in range(60):
        opt.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        opt.step()
    after = erc_diagnostics(layer)
    assert after["erc_diag_dominance"] > max(before, 1.5) and layer.aux_terms["erc"].item() < 0.05


# ------------------------------------------------------------------------- in the library
class NoGateRouter(Router):
    """Routes every token to expert 0 with a learned scale: no linear gate weight."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__(d_model, num_experts)
        self.scale = nn.Parameter(torch.ones(()))

    def route(self, x_TD, ctx):
        t = x_TD.shape[0]
        index = torch.zeros(t, 1, dtype=torch.long, device=x_TD.device)
        return Routing.from_topk(index, self.scale.expand(t, 1), self.num_experts)


class OtherLayoutBank(ExpertBank):
    """An ExpertBank subclass that changes what an expert computes: its layout is not ExpertBank's."""

    def expert_forward(self, e, x):
        return super().expert_forward(e, x) * 2


def test_errors_name_what_is_missing():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="router's linear gate weight"):
        moelab.MoE(8, 4, top_k=1, router=NoGateRouter(8, 4), aux_losses={"erc": 1.0})(x)
    layer = moe(e=4, d=8)
    routing = layer.router(x)
    layer.router.weight = nn.Parameter(torch.randn(3, 8))  # not [E, d]
    with pytest.raises(ValueError, match=r"\[E, d\] = \[4, 8\]"):
        erc(routing, layer=layer)
    with pytest.raises(ValueError, match="layer"):
        erc(routing)
    bank = OtherLayoutBank(4, 8, 16)
    with pytest.raises(TypeError, match="gate_weight"):
        moelab.MoE(8, 4, experts=bank, aux_losses={"erc": 1.0})(x)
    bank.gate_weight = bank.w_in[:, :16] * 1.0  # the hook for banks with other layouts
    moelab.MoE(8, 4, experts=bank, aux_losses={"erc": 1.0})(x)
    with pytest.raises(ValueError, match="M_EE"):
        erc_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="w_gate_EHD"):
        erc_coupling(torch.zeros(4, 8), torch.zeros(4, 5, 7))


@pytest.mark.parametrize("alpha", [0, -0.5, 1.5, float("nan"), True, "1"])
def test_bad_alpha_names_the_argument(alpha):
    layer = moe(aux_loss_kwargs={"erc": {"alpha": alpha}})
    with pytest.raises((ValueError, TypeError), match="alpha"):
        layer(torch.randn(2, 12))
    with pytest.raises((ValueError, TypeError), match="alpha"):
        erc_loss(torch.eye(3), alpha)


def test_bad_noise_and_unknown_parameters():
    with pytest.raises(TypeError, match="noise"):
        moe(aux_loss_kwargs={"erc": {"noise": "yes"}})(torch.randn(2, 12))
    with pytest.raises(ValueError, match="beta"):
        moe(aux_loss_kwargs={"erc": {"beta": 1.0}})
    assert get_loss("erc") is erc


@pytest.mark.parametrize("router", ["topk", "sigmoid_topk", "expert_choice", "sinkhorn"])
@pytest.mark.parametrize("shape", [(0, 12), (1, 12), (2, 5, 12)])
def test_lone_moe_forward_backward(router, shape):
    torch.manual_seed(8)
    layer = moelab.MoE(12, 4, 2, router=router, aux_losses={"load_balance": 1e-2, "erc": 0.1})
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    assert y.shape == x.shape and torch.isfinite(layer.aux_terms["erc"])
    assert layer.router.weight.grad.abs().sum() > 0  # ERC alone reaches the router, even with T = 0


def test_trains_in_moelm():
    torch.manual_seed(9)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, max_seq_len=32,
        aux_losses={"load_balance": 1e-2, "erc": 0.1}, aux_loss_kwargs={"erc": {"alpha": 1.0}},
    )  # fmt: skip
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for _, layer in model.moe_layers():
        assert torch.isfinite(layer.aux_terms["erc"])
        assert all(math.isfinite(v) for v in erc_diagnostics(layer).values())
