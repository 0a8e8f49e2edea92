"""Expert-bank variants for transformers experts that ``ExpertBank`` cannot express.

``ExpertBank`` holds transformers 5's standard layout (``gate_up_proj [E, 2h, d]`` with gate rows
first, ``down_proj [E, d, h]``, no bias). gpt-oss stores its experts differently, so it gets a
bank here (registered as bank ``clamped_swiglu``). The executors that run any bank run it
unchanged: ``reference`` calls ``expert_forward(e, x)`` and ``sorted`` calls
``forward_sorted(x_sorted, order)``; ``fast`` and ``triton`` decline it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.routing import ExpertOrder
from moelab.experts.bank import ExpertBank
from moelab.kernels.grouped_mm import grouped_mm


def clamped_swiglu(gate_up_N2H: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's gated activation on interleaved ``[gate0, up0, gate1, up1, ...]`` columns.

    ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``, ``out = (u + 1) * g * sigmoid(alpha * g)``
    (gpt-oss, OpenAI 2025; transformers' ``GptOssConfig`` defaults: alpha 1.702, limit 7.0).
    """
    gate = gate_up_N2H[..., ::2].clamp(max=limit)
    up = gate_up_N2H[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


@registry.register(
    "bank",
    "clamped_swiglu",
    paper="gpt-oss (OpenAI 2025): clamped SwiGLU experts with biases, interleaved gate/up columns",
    summary="gpt-oss experts as a bank sharing transformers' parameters (transposed, biased, clamped)",
)
class ClampedSwiGLUExpertBank(ExpertBank):
    """gpt-oss experts as a moelab bank, sharing the original parameters (no copy).

    Storage (transformers' ``GptOssExperts``):

    - ``gate_up_proj [E, d, 2h]``: transposed, gate and up columns interleaved;
    - ``gate_up_proj_bias [E, 2h]``;
    - ``down_proj [E, h, d]`` (transposed), ``down_proj_bias [E, d]``.

    Expert ``e`` on ``x [n, d]``: ``h = x W_e + b_e``; ``y = clamped_swiglu(h) D_e + c_e``.

    ``activation`` is ``"clamped_swiglu"``, which is not one of ``moelab.core.activations``: an
    executor that reads the weights directly instead of calling the bank rejects this bank in its
    ``supports`` check (``is_plain_mlp_bank``).
    """

    activation_name = "clamped_swiglu"

    def __init__(
        self,
        gate_up_proj: nn.Parameter,
        gate_up_proj_bias: nn.Parameter,
        down_proj: nn.Parameter,
        down_proj_bias: nn.Parameter,
        *,
        alpha: float,
        limit: float,
    ) -> None:
        nn.Module.__init__(self)
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(
                f"gate_up_proj and down_proj must be 3-D [E, d, 2h] and [E, h, d], got "
                f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
            )
        e, d, h2 = gate_up_proj.shape
        if h2 % 2:
            raise ValueError(f"gate_up_proj's last dimension must be even (2h), got {h2}")
        h = h2 // 2
        expected = {
            "down_proj": (tuple(down_proj.shape), (e, h, d)),
            "gate_up_proj_bias": (tuple(gate_up_proj_bias.shape), (e, h2)),
            "down_proj_bias": (tuple(down_proj_bias.shape), (e, d)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(
                    f"{name} must have shape {want} to match gate_up_proj {tuple(gate_up_proj.shape)}, got {got}"
                )
        self.num_experts, self.d_in, self.d_out, self.hidden = e, d, d, h
        self.activation = self.activation_name
        self.gated = True
        self.alpha, self.limit = float(alpha), float(limit)
        self.act_fn = lambda x: clamped_swiglu(x, self.alpha, self.limit)
        self.gate_up_proj = gate_up_proj
        self.gate_up_proj_bias = gate_up_proj_bias
        self.down_proj = down_proj
        self.down_proj_bias = down_proj_bias

    @classmethod
    def from_module(cls, experts: nn.Module) -> ClampedSwiGLUExpertBank:
        """Wrap a transformers ``GptOssExperts`` module's parameters."""
        return cls(
            experts.gate_up_proj,
            experts.gate_up_proj_bias,
            experts.down_proj,
            experts.down_proj_bias,
            alpha=experts.alpha,
            limit=experts.limit,
        )

    @classmethod
    def example(cls, num_experts: int, d_in: int, d_out: int) -> ClampedSwiGLUExpertBank:
        """A small random bank (gpt-oss's defaults alpha 1.702, limit 7.0); square: d_out must equal d_in."""
        if d_out != d_in:
            raise ValueError(f"a ClampedSwiGLUExpertBank is square (gpt-oss's layout): d_out={d_out} != d_in={d_in}")
        h = max(4, d_in)

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * 0.2)

        return cls(p(num_experts, d_in, 2 * h), p(num_experts, 2 * h), p(num_experts, h, d_in),
                   p(num_experts, d_in), alpha=1.702, limit=7.0)  # fmt: skip

    def reset_parameters(self) -> None:  # the parameters belong to the wrapped model
        raise NotImplementedError(
            "a ClampedSwiGLUExpertBank wraps existing parameters; it does not own an init"
        )

    def activate(self, h_in: Tensor) -> Tensor:
        return clamped_swiglu(h_in, self.alpha, self.limit)

    @property
    def gate_weight(self) -> Tensor:
        """``[E, h, d]``: the gate columns (even) of the interleaved ``gate_up_proj``, transposed
        (the ERC loss couples router rows with each expert's gate projection)."""
        return self.gate_up_proj[..., ::2].transpose(1, 2)

    def expert_forward(self, e: int, x_ND: Tensor) -> Tensor:
        h = x_ND @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        return self.activate(h) @ self.down_proj[e] + self.down_proj_bias[e]

    def grouped_mm(self, x_NK: Tensor, w_EKM: Tensor, order: ExpertOrder) -> Tensor:
        """``[N, M]``: rows of expert ``e`` times ``w[e]`` (gpt-oss stores ``[E, in, out]``)."""
        return grouped_mm(x_NK, w_EKM, order.offsets)

    def forward_sorted(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        # The expert of each sorted row selects its bias row.
        h = self.grouped_mm(x_sorted_ND, self.gate_up_proj, order)
        h = h + F.embedding(order.expert_index, self.gate_up_proj_bias)
        y = self.grouped_mm(self.activate(h), self.down_proj, order)
        return y + F.embedding(order.expert_index, self.down_proj_bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_in}, hidden={self.hidden}, "
            f"activation=clamped_swiglu(alpha={self.alpha}, limit={self.limit}), bias=True"
        )
