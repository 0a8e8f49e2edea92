"""``ExpertBank``: E expert MLPs stored as fused 3-D tensors, in transformers 5's layout.

- gated (SwiGLU, GeGLU): ``gate_up_proj [E, 2h, d_in]`` (gate rows first, then up), ``down_proj [E, d_out, h]``;
- plain (GELU, ReLU, SiLU): ``up_proj [E, h, d_in]``, ``down_proj [E, d_out, h]``.

Expert ``e`` computes ``down_e(act(gate_e x) * up_e x)`` (gated) or ``down_e(act(up_e x))``.
Because the layout is transformers', a bank can wrap a pretrained model's experts without
copying (``ExpertBank.from_parameters``). ``d_out`` defaults to ``d_in`` (an FFN); it differs for
a bank that replaces a projection (a ``768 -> 3072`` up-projection, say).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.activations import activation_forward, base_function, get_activation
from moelab.core.checks import positive_int
from moelab.core.routing import ExpertOrder
from moelab.kernels.grouped_mm import grouped_mm


@registry.register(
    "bank",
    "mlp",
    paper="Shazeer et al. 2017 (MoE layer); SwiGLU experts as in Mixtral / DeepSeekMoE (transformers 5 fused layout)",
    summary="E gated or plain MLP experts d_in -> h -> d_out, fused [E, ., .] weights, grouped GEMMs",
)
class ExpertBank(nn.Module):
    """E independent MLP experts (a bank: ``moelab.core.bank.Bank``).

    Args:
        num_experts: ``E``.
        d_model: ``d_in``, the input width.
        hidden: ``h``, each expert's hidden width.
        activation: one of ``swiglu`` (default; Mixtral, OLMoE, Qwen, DeepSeek), ``geglu``,
            ``gelu`` (Switch, GShard), ``relu``, ``silu``.
        d_out: the output width; default ``d_model``.

    ``forward_sorted(x_sorted [N, d_in], order) -> [N, d_out]`` runs every expert on its contiguous
    slice of expert-sorted rows with two grouped GEMMs (``grouped_mm``, the method a quantised
    bank overrides). ``expert_forward(e, x)`` runs one expert with plain ``F.linear`` calls: the
    readable definition the reference executor and the tests use.
    """

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu", *, d_out: int | None = None
    ) -> None:
        super().__init__()
        self._set_shape(num_experts, d_model, hidden, d_model if d_out is None else d_out, activation)
        rows = 2 * hidden if self.gated else hidden
        self._set_weights(
            nn.Parameter(torch.empty(num_experts, rows, d_model)),
            nn.Parameter(torch.empty(num_experts, self.d_out, hidden)),
        )
        self.reset_parameters()

    def _set_shape(self, num_experts: int, d_in: int, hidden: int, d_out: int, activation: str) -> None:
        self.num_experts = positive_int("num_experts", num_experts)
        self.d_in = positive_int("d_model", d_in)
        self.hidden = positive_int("hidden", hidden)
        self.d_out = positive_int("d_out", d_out)
        act = get_activation(activation)
        self.activation, self.gated = act.name, act.gated
        self.act_fn = base_function(act.name)  # the element-wise part (``silu`` for SwiGLU)

    def _set_weights(self, w_in: nn.Parameter, down_proj: nn.Parameter) -> None:
        if self.gated:
            self.gate_up_proj = w_in
        else:
            self.up_proj = w_in
        self.down_proj = down_proj

    @property
    def d_model(self) -> int:
        """The input width (``d_in``); the name transformers' configs use."""
        return self.d_in

    @classmethod
    def from_parameters(cls, w_in: nn.Parameter, down_proj: nn.Parameter, activation: str = "swiglu") -> ExpertBank:
        """Wrap existing fused parameters (e.g. a transformers experts module's) without copying."""
        if w_in.dim() != 3 or down_proj.dim() != 3:
            raise ValueError("w_in and down_proj must be 3-D [E, rows, d_in] and [E, d_out, h]")
        e, rows, d = w_in.shape
        d_out, h = down_proj.shape[1:]
        bank = cls.__new__(cls)
        nn.Module.__init__(bank)
        bank._set_shape(e, d, h, d_out, activation)
        if rows != (2 * h if bank.gated else h) or down_proj.shape[0] != e:
            raise ValueError(
                f"shapes do not match a {activation} bank: w_in {tuple(w_in.shape)}, down_proj {tuple(down_proj.shape)}"
            )
        bank._set_weights(w_in, down_proj)
        return bank

    @classmethod
    def example(cls, num_experts: int, d_in: int, d_out: int) -> ExpertBank:
        """A small random SwiGLU bank (the property tests build one of every registered bank)."""
        return cls(num_experts, d_in, max(4, d_in), "swiglu", d_out=d_out)

    def reset_parameters(self) -> None:
        # Per-expert nn.Linear default init (uniform +-1/sqrt(fan_in)); our choice.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.d_in), 1 / math.sqrt(self.d_in))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    @property
    def w_in(self) -> nn.Parameter:
        """``[E, 2h or h, d_in]``: the input projection (gate and up fused when gated)."""
        return self.gate_up_proj if self.gated else self.up_proj

    def activate(self, h_in: Tensor) -> Tensor:
        """``[N, 2h or h] -> [N, h]``: the expert non-linearity (gated: ``act(gate) * up``)."""
        return activation_forward(h_in, self.activation)

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        """Expert ``e`` on ``x [n, d_in]``, written plainly."""
        h = nn.functional.linear(x_nD, self.w_in[e])
        return nn.functional.linear(self.activate(h), self.down_proj[e])

    def grouped_mm(self, x_NK: Tensor, w_EMK: Tensor, order: ExpertOrder) -> Tensor:
        """``[N, M]``: rows of expert ``e`` times ``w[e]^T``. Override for quantised weights."""
        return grouped_mm(x_NK, w_EMK.transpose(1, 2), order.offsets)

    def forward_sorted(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        """All experts on expert-sorted rows ``[N, d_in] -> [N, d_out]``."""
        h = self.grouped_mm(x_sorted_ND, self.w_in, order)
        return self.grouped_mm(self.activate(h), self.down_proj, order)

    def forward(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        return self.forward_sorted(x_sorted_ND, order)

    def extra_repr(self) -> str:
        out = f", d_out={self.d_out}" if self.d_out != self.d_in else ""
        return (
            f"num_experts={self.num_experts}, d_model={self.d_in}{out}, hidden={self.hidden}, "
            f"activation={self.activation}"
        )


def is_plain_mlp_bank(bank: object) -> bool:
    """Whether ``bank`` computes exactly ``ExpertBank``'s math from its ``w_in``/``down_proj``.

    Executors that read the weights themselves (``fast``, ``triton``) run only such banks: a
    subclass that changes the expert (biases, clamps, another layout, a quantised ``grouped_mm``)
    would be silently ignored by them, so it goes to ``sorted`` or ``reference`` instead.
    """
    cls = type(bank)
    return isinstance(bank, ExpertBank) and all(
        getattr(cls, m) is getattr(ExpertBank, m)
        for m in ("expert_forward", "activate", "grouped_mm", "forward_sorted", "w_in")
    )
