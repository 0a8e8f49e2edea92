"""``SharedExperts``: always-on experts (DeepSeekMoE, Qwen2-MoE) beside the routed ones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.core.activations import base_function, get_activation
from moelab.core.checks import positive_int


class SharedExperts(nn.Module):
    """Always-on experts: one dense MLP of width ``num_shared * hidden``.

    With ``gate=True`` the output is scaled by ``sigmoid(w_g . x)`` per token (Qwen2-MoE's
    ``shared_expert_gate``). ``d_out`` defaults to ``d_model``.
    """

    def __init__(
        self, d_model: int, hidden: int, activation: str = "swiglu", gate: bool = False, *, d_out: int | None = None
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.hidden = positive_int("hidden", hidden)
        self.d_out = positive_int("d_out", d_model if d_out is None else d_out)
        act = get_activation(activation)
        self.activation, self.gated = act.name, act.gated
        self.act_fn = base_function(act.name)
        if self.gated:
            self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, self.d_out, bias=False)
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
