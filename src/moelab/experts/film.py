"""``FiLMBank``: ``E`` feature-modulated experts ``FME_e(y) = (Γ_e y) ⊙ y + Β_e y`` (MoFME's experts).

Paper and code: Zhang et al., *Efficient Deweather Mixture-of-Experts with Uncertainty-aware
Feature-wise Linear Modulation* (MoFME, AAAI 2024, arXiv 2312.16610); official code
RoyZry98/MoFME-Pytorch ``models/moe/film.py`` (``Modular_Experts``). An expert is not an MLP: it
modulates the output ``y`` of one shared expert block (computed once per token by the layer,
``moelab.layers.mofme``) with a multiplicative and an additive term, both affine maps of ``y``:

    FME_e(y) = (Γ_e y + γ_e) ⊙ y + (Β_e y + β_e)            y ∈ R^d,  FME_e: R^d -> R^d

The form of the maps ``Γ_e`` and ``Β_e`` is the bank's ``modulation``:

- ``"full"`` (default; the official code): ``Γ_e, Β_e ∈ R^{d×d}`` with biases, two
  ``nn.Linear(d, d)`` per expert; ``2d² + 2d`` parameters per expert. Stored fused as
  ``weight [E, 2d, d]`` (the ``Γ`` rows first, then ``Β``) and ``bias [E, 2d]``; ``forward_sorted``
  is one grouped GEMM over the expert-sorted rows.
- ``"low_rank"`` (ours): ``Γ_e = U_e V_eᵀ`` and ``Β_e = P_e Q_eᵀ`` of rank ``r``, with biases;
  ``4dr + 2d`` parameters per expert. ``down [E, 2r, d]`` (``V_eᵀ`` then ``Q_eᵀ``),
  ``gamma_up [E, d, r]``, ``beta_up [E, d, r]``, ``bias [E, 2d]``; three grouped GEMMs.
- ``"diagonal"`` (ours): ``Γ_e = diag(g_e)`` and ``Β_e = diag(b_e)``, with biases: every output
  feature modulated by its own input feature only; ``4d`` parameters per expert (``scale [E, 2d]``,
  ``bias [E, 2d]``), weights gathered per row (``O(N d)``, no GEMM). ``γ_e`` and ``b_e`` both
  multiply ``y`` linearly here (the form keeps the full form's four terms; the redundancy is
  harmless).

The paper describes the modulations as cheap feature-wise operations, the released code uses
full ``d × d`` linears; the cheaper forms are ours (docs/methods/film.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int
from moelab.core.routing import ExpertOrder
from moelab.kernels.grouped_mm import grouped_mm

MODULATIONS = ("full", "low_rank", "diagonal")


def feature_modulation(y_ND: Tensor, gamma_ND: Tensor, beta_ND: Tensor) -> Tensor:
    """``gamma ⊙ y + beta`` (all ``[N, d]``): FiLM (Perez et al. 2018) with both terms computed
    from ``y`` itself, as MoFME's experts do (``gamma = Γ y + γ``, ``beta = Β y + β``)."""
    if not (y_ND.shape == gamma_ND.shape == beta_ND.shape):
        raise ValueError(
            f"y, gamma and beta must have one shape, got {tuple(y_ND.shape)}, {tuple(gamma_ND.shape)}, "
            f"{tuple(beta_ND.shape)}"
        )
    return gamma_ND * y_ND + beta_ND


@registry.register(
    "bank",
    "film",
    paper="MoFME (Zhang et al., AAAI 2024, arXiv 2312.16610); RoyZry98/MoFME-Pytorch models/moe/film.py",
    summary="E feature-modulated experts (Γ_e y + γ_e) ⊙ y + Β_e y + β_e; full d×d (code), low-rank or diagonal maps",
)
class FiLMBank(nn.Module):
    """``E`` feature-modulated experts ``R^d -> R^d`` (a bank: ``moelab.core.bank.Bank``).

    Args:
        num_experts: ``E``.
        d_model: ``d`` (``d_in = d_out = d``: an expert modulates its input).
        modulation: ``"full"`` (default, the official code), ``"low_rank"`` or ``"diagonal"``
            (module docstring).
        rank: ``r`` of ``"low_rank"`` (default ``max(1, d // 8)``, our choice); refused otherwise.

    Init (``nn.Linear``'s default, as the official ``nn.Linear`` modules): every map of fan-in
    ``f`` draws its weights and bias from ``U(±1/sqrt(f))``: ``f = d`` for the full maps and the
    low-rank ``down``, ``f = r`` for the low-rank ``up``, ``f = 1`` for each diagonal entry (a
    one-input linear: ``U(±1)``).

    ``forward_sorted(y_sorted [N, d], order) -> [N, d]`` runs every expert on its contiguous group
    of expert-sorted rows; ``expert_forward(e, y [n, d])`` is the equation written plainly.
    """

    def __init__(self, num_experts: int, d_model: int, modulation: str = "full", rank: int | None = None) -> None:
        super().__init__()
        self.num_experts = positive_int("num_experts", num_experts)
        self.d_in = self.d_out = positive_int("d_model", d_model)
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {modulation!r}")
        self.modulation = modulation
        if modulation != "low_rank" and rank is not None:
            raise ValueError(f"rank is only for modulation='low_rank', got rank={rank!r} with {modulation!r}")
        e, d = self.num_experts, self.d_in
        self.rank = positive_int("rank", max(1, d // 8) if rank is None else rank) if modulation == "low_rank" else None
        if modulation == "full":
            self.weight = nn.Parameter(torch.empty(e, 2 * d, d))
        elif modulation == "low_rank":
            self.down = nn.Parameter(torch.empty(e, 2 * self.rank, d))
            self.gamma_up = nn.Parameter(torch.empty(e, d, self.rank))
            self.beta_up = nn.Parameter(torch.empty(e, d, self.rank))
        else:
            self.scale = nn.Parameter(torch.empty(e, 2 * d))
        self.bias = nn.Parameter(torch.empty(e, 2 * d))
        self.reset_parameters()

    @property
    def d_model(self) -> int:
        return self.d_in

    @classmethod
    def example(cls, num_experts: int, d_in: int, d_out: int) -> FiLMBank:
        """A small random full-modulation bank (the property tests build one of every registered
        bank). Square only: an expert modulates its input, so ``d_out`` must equal ``d_in``."""
        if d_out != d_in:
            raise ValueError(f"a FiLM bank maps R^d to R^d: d_out must equal d_in={d_in}, got {d_out}")
        return cls(num_experts, d_in)

    def reset_parameters(self) -> None:
        d = self.d_in

        def uniform(p: Tensor, fan_in: int) -> None:
            nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

        if self.modulation == "full":
            uniform(self.weight, d)
            uniform(self.bias, d)
        elif self.modulation == "low_rank":
            uniform(self.down, d)
            uniform(self.gamma_up, self.rank)
            uniform(self.beta_up, self.rank)
            # the bias belongs to the up map (fan-in r), as in nn.Linear(r, d)
            uniform(self.bias, self.rank)
        else:
            uniform(self.scale, 1)
            uniform(self.bias, 1)

    # -- one expert, written plainly ----------------------------------------------------------
    def maps(self, e: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(Γ_e [d, d], γ_e [d], Β_e [d, d], β_e [d])``: expert ``e``'s two affine maps as dense
        matrices (for the reference and the tests; ``forward_sorted`` never forms them)."""
        d = self.d_in
        if self.modulation == "full":
            gamma_w, beta_w = self.weight[e, :d], self.weight[e, d:]
        elif self.modulation == "low_rank":
            r = self.rank
            gamma_w = self.gamma_up[e] @ self.down[e, :r]
            beta_w = self.beta_up[e] @ self.down[e, r:]
        else:
            gamma_w, beta_w = torch.diag(self.scale[e, :d]), torch.diag(self.scale[e, d:])
        return gamma_w, self.bias[e, :d], beta_w, self.bias[e, d:]

    def expert_forward(self, e: int, y_nD: Tensor) -> Tensor:
        """Expert ``e`` on ``y [n, d]``: ``(Γ_e y + γ_e) ⊙ y + Β_e y + β_e``, ``[n, d]``."""
        gamma_w, gamma_b, beta_w, beta_b = self.maps(e)
        gamma = nn.functional.linear(y_nD, gamma_w, gamma_b)
        beta = nn.functional.linear(y_nD, beta_w, beta_b)
        return feature_modulation(y_nD, gamma, beta)

    # -- all experts on expert-sorted rows ----------------------------------------------------
    def modulations_sorted(self, y_sorted_ND: Tensor, order: ExpertOrder) -> tuple[Tensor, Tensor]:
        """``(gamma [N, d], beta [N, d])``: each row's ``Γ_e y + γ_e`` and ``Β_e y + β_e``."""
        e_N = order.expert_index
        d = self.d_in
        if y_sorted_ND.dim() != 2 or y_sorted_ND.shape != (e_N.shape[0], d):
            raise ValueError(
                f"y_sorted_ND must be [N, d] = [{e_N.shape[0]}, {d}], got {tuple(y_sorted_ND.shape)}"
            )
        bias_N2D = self.bias.index_select(0, e_N)
        if self.modulation == "full":
            h = grouped_mm(y_sorted_ND, self.weight.transpose(1, 2), order.offsets) + bias_N2D
            return h[:, :d], h[:, d:]
        if self.modulation == "low_rank":
            r = self.rank
            z = grouped_mm(y_sorted_ND, self.down.transpose(1, 2), order.offsets)  # [N, 2r]
            gamma = grouped_mm(z[:, :r].contiguous(), self.gamma_up.transpose(1, 2), order.offsets)
            beta = grouped_mm(z[:, r:].contiguous(), self.beta_up.transpose(1, 2), order.offsets)
            return gamma + bias_N2D[:, :d], beta + bias_N2D[:, d:]
        scale_N2D = self.scale.index_select(0, e_N)
        return (
            scale_N2D[:, :d] * y_sorted_ND + bias_N2D[:, :d],
            scale_N2D[:, d:] * y_sorted_ND + bias_N2D[:, d:],
        )

    def forward_sorted(self, y_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        """``[N, d] -> [N, d]``: row ``j`` through expert ``order.expert_index[j]``."""
        gamma, beta = self.modulations_sorted(y_sorted_ND, order)
        return feature_modulation(y_sorted_ND, gamma, beta)

    def forward(self, y_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        return self.forward_sorted(y_sorted_ND, order)

    def parameters_per_expert(self) -> int:
        """Parameters of one expert: ``2d² + 2d`` (full), ``4dr + 2d`` (low rank), ``4d`` (diagonal)."""
        return sum(p[0].numel() for p in self.parameters())

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank is not None else ""
        return f"num_experts={self.num_experts}, d_model={self.d_in}, modulation={self.modulation!r}{rank}"
