"""``ExpertBank``: E expert MLPs stored as fused 3-D tensors, in transformers 5's layout.

- gated (SwiGLU, GeGLU): ``gate_up_proj [E, 2h, d]`` (gate rows first, then up), ``down_proj [E, d, h]``;
- plain (GELU, ReLU, SiLU): ``up_proj [E, h, d]``, ``down_proj [E, d, h]``.

Expert ``e`` computes ``down_e(act(gate_e x) * up_e x)`` (gated) or ``down_e(act(up_e x))``.
Because the layout is transformers', a bank can wrap a pretrained model's experts without
copying (``ExpertBank.from_parameters``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import positive_int
from ..ops.grouped_mm import grouped_mm

ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "silu": (F.silu, False),
}


class ExpertBank(nn.Module):
    """E independent MLP experts.

    Args:
        num_experts: ``E``.
        d_model: ``d``.
        hidden: ``h``, each expert's hidden width.
        activation: one of ``swiglu`` (default; Mixtral, OLMoE, Qwen, DeepSeek), ``geglu``,
            ``gelu`` (Switch, GShard), ``relu``, ``silu``.

    ``forward(x_sorted [N, d], offsets [E]) -> [N, d]`` runs every expert on its contiguous slice
    of expert-sorted rows with grouped GEMMs. ``expert_forward(e, x)`` runs one expert with plain
    ``F.linear`` calls: the readable definition the reference backend and the tests use.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.num_experts = positive_int("num_experts", num_experts)
        self.d_model = positive_int("d_model", d_model)
        self.hidden = positive_int("hidden", hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.act_fn, self.gated = ACTIVATIONS[activation]
        in_rows = 2 * hidden if self.gated else hidden
        w_in = nn.Parameter(torch.empty(num_experts, in_rows, d_model))
        if self.gated:
            self.gate_up_proj = w_in
        else:
            self.up_proj = w_in
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.reset_parameters()

    @classmethod
    def from_parameters(
        cls, w_in: nn.Parameter, down_proj: nn.Parameter, activation: str = "swiglu"
    ) -> ExpertBank:
        """Wrap existing fused parameters (e.g. a transformers experts module's) without copying."""
        if w_in.dim() != 3 or down_proj.dim() != 3:
            raise ValueError("w_in and down_proj must be 3-D [E, rows, d] and [E, d, h]")
        e, rows, d = w_in.shape
        h = down_proj.shape[-1]
        bank = cls.__new__(cls)
        nn.Module.__init__(bank)
        bank.num_experts, bank.d_model, bank.hidden = e, d, h
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        bank.activation = activation
        bank.act_fn, bank.gated = ACTIVATIONS[activation]
        if rows != (2 * h if bank.gated else h) or tuple(down_proj.shape) != (e, d, h):
            raise ValueError(
                f"shapes do not match a {activation} bank: w_in {tuple(w_in.shape)}, down_proj {tuple(down_proj.shape)}"
            )
        if bank.gated:
            bank.gate_up_proj = w_in
        else:
            bank.up_proj = w_in
        bank.down_proj = down_proj
        return bank

    def reset_parameters(self) -> None:
        # Per-expert nn.Linear default init (uniform +-1/sqrt(fan_in)); our choice.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    @property
    def w_in(self) -> nn.Parameter:
        """``[E, 2h or h, d]``: the input projection (gate and up fused when gated)."""
        return self.gate_up_proj if self.gated else self.up_proj

    def activate(self, h_in: Tensor) -> Tensor:
        """``[N, 2h or h] -> [N, h]``: the expert non-linearity (gated: ``act(gate) * up``)."""
        if self.gated:
            gate, up = h_in.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(h_in)

    def expert_forward(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert ``e`` on ``x [n, d]``, written plainly."""
        h = F.linear(x_ND, self.w_in[e])
        return F.linear(self.activate(h), self.down_proj[e])

    def forward(self, x_sorted_ND: Tensor, offsets_E: Tensor, counts_E: list[int] | None = None) -> Tensor:
        """All experts on expert-sorted rows. ``offsets_E``: int32 cumulative row ends."""
        h = grouped_mm(x_sorted_ND, self.w_in.transpose(1, 2), offsets_E, counts_E)
        return grouped_mm(self.activate(h), self.down_proj.transpose(1, 2), offsets_E, counts_E)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeekMoE, Qwen2-MoE): one dense MLP of width ``num_shared * hidden``.

    With ``gate=True`` the output is scaled by ``sigmoid(w_g . x)`` per token (Qwen2-MoE's
    ``shared_expert_gate``).
    """

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu", gate: bool = False) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.hidden = positive_int("hidden", hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.act_fn, self.gated = ACTIVATIONS[activation]
        if self.gated:
            self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        if self.gated:
            h = self.act_fn(self.gate_proj(x_TD)) * self.up_proj(x_TD)
        else:
            h = self.act_fn(self.up_proj(x_TD))
        y = self.down_proj(h)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TD)) * y
        return y
