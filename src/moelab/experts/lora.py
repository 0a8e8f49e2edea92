"""``LoRABank``: ``E`` low-rank adapters ``x -> scaling * B_e A_e x`` as one bank.

Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models* (ICLR 2022), and PEFT's LoRA layer
(huggingface/peft ``src/peft/tuners/lora/layer.py``, v0.21): an adapted projection computes
``W x + scaling * B (A dropout(x))`` with ``A [r, d_in]``, ``B [d_out, r]`` and
``scaling = lora_alpha / r``. A bank holds ``E`` such pairs, stacked:

    lora_A [E, r, d_in]      (expert e's A is lora_A[e], PEFT's ``lora_A.weight``)
    lora_B [E, d_out, r]     (expert e's B is lora_B[e], PEFT's ``lora_B.weight``)

so any one expert is an ordinary PEFT LoRA. ``forward_sorted`` runs every expert on its contiguous
group of expert-sorted rows with two grouped GEMMs (``moelab.kernels.grouped_mm``): ``[N, d_in] ->
[N, r] -> [N, d_out]``, never a Python loop over experts where ``torch``'s grouped GEMM accepts the
operands. The frozen base projection ``W x`` is not part of the bank: ``RoutedLoRA`` adds it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import float_in, positive_float, positive_int
from moelab.core.routing import ExpertOrder
from moelab.kernels.grouped_mm import grouped_mm

# PEFT's ``LoraConfig.lora_alpha`` default (peft 0.21.2: ``lora_alpha: int = 8``).
PEFT_DEFAULT_LORA_ALPHA = 8


# --------------------------------------------------------------------------------- pure function
def grouped_lora(
    x_sorted_ND: Tensor, lora_A_ERD: Tensor, lora_B_EOR: Tensor, offsets_E: Tensor, scaling: float
) -> Tensor:
    """``[N, d_out]``: row ``j`` of expert group ``e`` mapped to ``scaling * B_e (A_e x_j)``.

    Args:
        x_sorted_ND: ``[N, d_in]`` rows sorted by expert (expert ``e`` owns rows
            ``offsets[e-1]:offsets[e]``).
        lora_A_ERD: ``[E, r, d_in]``; lora_B_EOR: ``[E, d_out, r]``.
        offsets_E: ``[E]`` int32 cumulative group ends (``ExpertOrder.offsets``), ending at ``N``.
        scaling: ``lora_alpha / r`` (PEFT).

    Two grouped GEMMs (``torch`` grouped_mm where the dtype, device and 16-byte strides allow it:
    fp32 needs ``r`` and ``d_in``, ``d_out`` multiples of 4 on CPU; else a loop over the experts
    with rows, the kernel module's fallback). ``scaling`` multiplies the ``[N, r]`` intermediate,
    the cheapest place (PEFT scales the ``[N, d_out]`` output: equal up to rounding).
    """
    if lora_A_ERD.dim() != 3 or lora_B_EOR.dim() != 3:
        raise ValueError(
            f"lora_A must be [E, r, d_in] and lora_B [E, d_out, r], got {tuple(lora_A_ERD.shape)} "
            f"and {tuple(lora_B_EOR.shape)}"
        )
    if lora_B_EOR.shape[0] != lora_A_ERD.shape[0] or lora_B_EOR.shape[2] != lora_A_ERD.shape[1]:
        raise ValueError(
            f"lora_B {tuple(lora_B_EOR.shape)} does not match lora_A {tuple(lora_A_ERD.shape)}: "
            "expected [E, d_out, r] with the same E and r"
        )
    if x_sorted_ND.dim() != 2 or x_sorted_ND.shape[1] != lora_A_ERD.shape[2]:
        raise ValueError(f"x_sorted must be [N, d_in={lora_A_ERD.shape[2]}], got {tuple(x_sorted_ND.shape)}")
    h_NR = grouped_mm(x_sorted_ND, lora_A_ERD.transpose(1, 2), offsets_E)
    return grouped_mm(h_NR * scaling, lora_B_EOR.transpose(1, 2), offsets_E)


def rank_dense_lora(
    x_TD: Tensor,
    lora_A_ERD: Tensor,
    lora_B_EOR: Tensor,
    weight_TE: Tensor,
    scaling: float,
    add_to: Tensor | None = None,
) -> Tensor:
    """``[T, d_out]``: ``sum_e weight[t, e] * scaling * B_e (A_e x_t)``, every expert at once in rank space.

    When ``E * r`` is small beside the projection's widths (SmolLM2's 576 -> 1536 with 8 experts of
    rank 8: ``E r = 64``), projecting every token through every expert's ``A`` costs a few percent
    of the base GEMM, and so does mixing the ``[T, E r]`` intermediate back through ``B``: two dense
    GEMMs, with the routing applied as a ``[T, E]`` weight on the small intermediate. That avoids
    gathering rows, the ``[T k, d_out]`` per-assignment outputs and the scatter back, which is
    what a routed LoRA's time goes to on CPU. Unselected experts have weight 0 and contribute
    exactly 0 (their ``A`` still receives a zero gradient).

    Args:
        x_TD: ``[T, d_in]``; lora_A_ERD: ``[E, r, d_in]``; lora_B_EOR: ``[E, d_out, r]``;
        weight_TE: ``[T, E]`` combine weights (``Routing.dense()``); scaling: ``alpha / r``.
        add_to: an optional ``[T, d_out]`` (the base projection's fresh output): ``delta`` is then
            accumulated into it in place (``addmm_``, no ``[T, d_out]`` temporary and no extra pass)
            and it is returned. Autograd allows this: a linear layer's backward does not read its
            output.
    """
    e, r, d_in = lora_A_ERD.shape
    h_TER = (x_TD @ lora_A_ERD.reshape(e * r, d_in).T).view(-1, e, r)
    h_TER = h_TER * (weight_TE.to(h_TER.dtype) * scaling).unsqueeze(-1)
    b_OX = lora_B_EOR.permute(1, 0, 2).reshape(lora_B_EOR.shape[1], e * r)
    h_TX = h_TER.reshape(-1, e * r)
    if add_to is None:
        return h_TX @ b_OX.T
    return add_to.addmm_(h_TX, b_OX.T)


class _BaseAndRankDenseLoRA(torch.autograd.Function):
    """``base_and_rank_dense_lora``'s forward and backward, written out (see there)."""

    @staticmethod
    def forward(ctx, x_TD, weight_OD, bias_O, lora_A_ERD, lora_B_EOR, weight_TE, scaling):
        e, r, d_in = lora_A_ERD.shape
        d_out = weight_OD.shape[0]
        a_XD = lora_A_ERD.reshape(e * r, d_in)
        w_cat = torch.cat([weight_OD, a_XD])  # [d_out + E r, d_in]: one GEMM for W x and every A_e x
        if bias_O is None:
            full_TF = x_TD @ w_cat.T
        else:
            full_TF = torch.addmm(torch.cat([bias_O, bias_O.new_zeros(e * r)]), x_TD, w_cat.T)
        h_TX = full_TF[:, d_out:]
        scale_TX = (weight_TE.to(x_TD.dtype) * scaling).repeat_interleave(r, dim=1)
        hw_TX = h_TX * scale_TX
        b_XO = lora_B_EOR.permute(0, 2, 1).reshape(e * r, d_out)  # row e*r + j is B_e[:, j]
        y_TO = full_TF[:, :d_out]
        y_TO.addmm_(hw_TX, b_XO)  # into the GEMM's own output: no [T, d_out] temporary
        ctx.save_for_backward(x_TD, weight_OD, a_XD, b_XO, h_TX, scale_TX, hw_TX)
        ctx.shape = (e, r, d_in, d_out)
        ctx.scaling = scaling
        return y_TO

    @staticmethod
    def backward(ctx, dy_TO):
        x_TD, weight_OD, a_XD, b_XO, h_TX, scale_TX, hw_TX = ctx.saved_tensors
        e, r, d_in, d_out = ctx.shape
        need_x, _, _, need_a, need_b, need_w, _ = ctx.needs_input_grad
        dhw_TX = dy_TO @ b_XO.T
        dh_TX = dhw_TX * scale_TX
        dx = da = db = dw = None
        if need_x:
            dx = (dy_TO @ weight_OD).addmm_(dh_TX, a_XD)
        if need_a:
            da = (dh_TX.T @ x_TD).view(e, r, d_in)
        if need_b:
            db = (hw_TX.T @ dy_TO).view(e, r, d_out).permute(0, 2, 1)
        if need_w:
            dw = (dhw_TX * h_TX).view(-1, e, r).sum(-1) * ctx.scaling
        return dx, None, None, da, db, dw, None


def base_and_rank_dense_lora(
    x_TD: Tensor,
    weight_OD: Tensor,
    bias_O: Tensor | None,
    lora_A_ERD: Tensor,
    lora_B_EOR: Tensor,
    weight_TE: Tensor,
    scaling: float,
) -> Tensor:
    """``[T, d_out]``: a frozen projection plus a rank-dense LoRA mixture in one pass,
    ``x W^T + b + rank_dense_lora(x, A, B, weight, scaling)``.

    The base weight and every expert's ``A`` are stacked into one ``[d_out + E r, d_in]`` matrix,
    so ``W x`` and all ``A_e x`` come out of one GEMM (on CPU the ``E r`` extra columns cost about
    nothing: a GEMM of ``d_out = 576`` columns is not faster than one of 640); the routing weights
    scale the ``[T, E r]`` part, and ``B`` is accumulated into the ``[T, d_out]`` part in place. The
    backward is written out: the base weight and bias get no gradient (they are frozen: callers
    use this only then), ``x``, ``A``, ``B`` and ``weight`` get theirs. The result is a view of
    a ``[T, d_out + E r]`` buffer (row stride ``d_out + E r``).

    Args: ``x [T, d_in]``, ``weight [d_out, d_in]`` and ``bias [d_out]`` (or None) of the frozen
    ``nn.Linear``, ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``, ``weight_TE [T, E]`` combine
    weights, ``scaling``.
    """
    if weight_OD.requires_grad or (bias_O is not None and bias_O.requires_grad):
        raise ValueError(
            "base_and_rank_dense_lora: the base weight and bias must be frozen (requires_grad=False)"
        )
    return _BaseAndRankDenseLoRA.apply(x_TD, weight_OD, bias_O, lora_A_ERD, lora_B_EOR, weight_TE, scaling)


# --------------------------------------------------------------------------------- the bank
@registry.register(
    "bank",
    "lora",
    paper="LoRA (Hu et al., ICLR 2022); PEFT's LoRA layer (huggingface/peft tuners/lora/layer.py)",
    summary="E LoRA adapters scaling * B_e A_e x (d_in -> r -> d_out), PEFT's layout, two grouped low-rank GEMMs",
)
class LoRABank(nn.Module):
    """``E`` LoRA experts ``R^{d_in} -> R^{d_out}`` (a bank: ``moelab.core.bank.Bank``).

    Args:
        num_experts: ``E``.
        d_in, d_out: the adapted projection's input and output widths (they may differ).
        rank: ``r``.
        alpha: PEFT's ``lora_alpha``; ``scaling = alpha / rank``. Default (None): 8, PEFT 0.21's
            ``LoraConfig.lora_alpha`` default.
        dropout: dropout on each expert's input in training (PEFT's ``lora_dropout``); each
            assignment draws its own mask, as ``E`` separate PEFT adapters would. Default 0.
        device, dtype: where the parameters are created.

    Parameters ``lora_A [E, r, d_in]`` and ``lora_B [E, d_out, r]``. Init as PEFT's default LoRA
    init (``init_lora_weights=True``): each ``A_e`` with ``kaiming_uniform_(a=sqrt(5))`` (the
    ``nn.Linear`` init, ``U(±1/sqrt(d_in))``), every ``B_e = 0``, so a fresh bank outputs zeros.
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = positive_int("num_experts", num_experts)
        self.d_in = positive_int("d_in", d_in)
        self.d_out = positive_int("d_out", d_out)
        self.rank = positive_int("rank", rank)
        self.alpha = float(PEFT_DEFAULT_LORA_ALPHA if alpha is None else positive_float("alpha", alpha))
        self.scaling = self.alpha / self.rank
        self.dropout = float_in("dropout", dropout, 0.0, 1.0)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, d_out, rank, **factory))
        self.reset_parameters()

    @classmethod
    def example(cls, num_experts: int, d_in: int, d_out: int) -> LoRABank:
        """A small random bank with a non-zero ``B`` (the property tests build one of every bank)."""
        bank = cls(num_experts, d_in, d_out, rank=2, alpha=4.0)
        with torch.no_grad():
            bank.lora_B.normal_(0.0, 1.0)
        return bank

    def reset_parameters(self) -> None:
        # One kaiming_uniform_ per expert: on the 3-D tensor it would take fan_in = r * d_in.
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _dropout(self, x: Tensor) -> Tensor:
        return nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        """Expert ``e`` on ``x [n, d_in]``: ``scaling * (x A_e^T) B_e^T``, ``[n, d_out]``."""
        return self.scaling * (self._dropout(x_nD) @ self.lora_A[e].T) @ self.lora_B[e].T

    def forward_sorted(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        """All experts on expert-sorted rows ``[N, d_in] -> [N, d_out]`` (``grouped_lora``)."""
        return grouped_lora(self._dropout(x_sorted_ND), self.lora_A, self.lora_B, order.offsets, self.scaling)

    def forward(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        return self.forward_sorted(x_sorted_ND, order)

    def extra_repr(self) -> str:
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return (
            f"num_experts={self.num_experts}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
            f"alpha={self.alpha:g}{drop}"
        )
