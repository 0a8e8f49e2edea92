"""LoRA on the fused 3-D expert parameters of a transformers MoE model (``target_parameters``).

transformers 5 stores a MoE layer's experts as two fused parameters, ``gate_up_proj [E, 2h, d]``
and ``down_proj [E, d, h]`` (``[E, d_out, d_in]``; gpt-oss keeps them transposed, ``[E, d_in,
d_out]``, and says so with ``experts.is_transposed``). There is no ``nn.Linear`` per expert to wrap,
so the adapter goes on the parameter itself: expert ``e``'s weight becomes

    W_e + scaling * B_e A_e          A [E, r, d_in], B [E, d_out, r], scaling = alpha / r

one LoRA per MoE expert, in PEFT's layout (``moelab.LoRABank``'s), routed by the model's own router:
the token that goes to expert ``e`` gets expert ``e``'s LoRA. It is what PEFT's
``LoraConfig(target_parameters=...)`` does (peft #2527, #3009), written as a
``torch.nn.utils.parametrize`` parametrization, so every experts implementation of transformers
(``set_experts_implementation``: eager, grouped GEMMs, moelab's) reads the adapted weight. The
delta is materialised once per forward (``E d_out d_in r`` multiply-adds, the size of the weight
times ``r``), not per token.

``moelab.lora.apply(model, targets=None, target_parameters=["experts.gate_up_proj",
"experts.down_proj"], rank=8)`` puts them on; ``moelab.lora.remove(model)`` takes them off and the
parameter objects come back untouched.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from moelab.core.checks import positive_int
from moelab.experts.lora import PEFT_DEFAULT_LORA_ALPHA


def expert_lora_delta(A_ERI: Tensor, B_EOR: Tensor, scaling: float, transposed: bool = False) -> Tensor:
    """``[E, d_out, d_in]``: ``scaling * B_e A_e`` for every expert (``[E, d_in, d_out]`` when
    ``transposed``, the layout of a transposed fused parameter)."""
    delta_EOI = torch.bmm(B_EOR, A_ERI) * scaling
    return delta_EOI.transpose(1, 2) if transposed else delta_EOI


class FusedExpertLoRA(nn.Module):
    """The parametrization ``W -> W + scaling * B A`` of one fused ``[E, ., .]`` expert parameter.

    Args:
        weight: the fused parameter (its shape, device and dtype are read; it is not kept).
        rank: ``r``.
        alpha: PEFT's ``lora_alpha`` (default 8, PEFT's); ``scaling = alpha / rank``.
        transposed: the parameter is ``[E, d_in, d_out]`` (gpt-oss) rather than ``[E, d_out, d_in]``.

    ``lora_A [E, r, d_in]`` starts as PEFT's (Kaiming-uniform with ``a = sqrt(5)``, per expert) and
    ``lora_B [E, d_out, r]`` at zero, so the model is unchanged until training moves ``B``.
    """

    def __init__(
        self, weight: Tensor, rank: int, alpha: float | None = None, transposed: bool = False
    ) -> None:
        super().__init__()
        if weight.dim() != 3:
            raise ValueError(
                f"weight must be a fused 3-D expert parameter [E, ., .], got shape {tuple(weight.shape)}"
            )
        self.rank = positive_int("rank", rank)
        self.alpha = float(PEFT_DEFAULT_LORA_ALPHA if alpha is None else alpha)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.transposed = bool(transposed)
        num_experts, rows, cols = weight.shape
        d_in, d_out = (rows, cols) if transposed else (cols, rows)
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.rank, d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, self.rank, **kw))
        for a_RI in self.lora_A.data:
            nn.init.kaiming_uniform_(a_RI, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, weight: Tensor) -> Tensor:
        return weight + expert_lora_delta(self.lora_A, self.lora_B, self.scaling, self.transposed).to(
            weight.dtype
        )

    def extra_repr(self) -> str:
        e, r, d_in = self.lora_A.shape
        return f"num_experts={e}, rank={r}, d_in={d_in}, d_out={self.lora_B.shape[1]}, transposed={self.transposed}"


def find_fused_targets(
    model: nn.Module, target_parameters: str | list[str], matches
) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, owning module, parameter name)`` of every 3-D parameter of ``model``
    that ``target_parameters`` names (``matches(name, targets)``: PEFT's suffix / regex rule), in
    order; a ``ValueError`` when one is not 3-D or nothing matches (listing the 3-D parameters)."""
    found = []
    for name, param in model.named_parameters():
        if not matches(name, target_parameters):
            continue
        if param.dim() != 3:
            raise ValueError(
                f"target_parameters {target_parameters!r} match {name!r} of shape {tuple(param.shape)}; "
                "only fused 3-D expert parameters [E, ., .] can be targeted (name nn.Linear modules in targets)"
            )
        owner_name, _, attr = name.rpartition(".")
        found.append((name, model.get_submodule(owner_name) if owner_name else model, attr))
    if not found:
        fused = sorted({n.rpartition(".")[2] for n, p in model.named_parameters() if p.dim() == 3})
        raise ValueError(
            f"target_parameters {target_parameters!r} match no parameter of the {type(model).__name__}; "
            f"its 3-D parameters end with {fused[:20] or 'nothing (not a fused-experts MoE)'}"
        )
    return found


def add_fused_lora(owner: nn.Module, attr: str, rank: int, alpha: float | None) -> FusedExpertLoRA:
    """Register a ``FusedExpertLoRA`` on ``owner.<attr>`` (transposed when ``owner.is_transposed``)."""
    adapter = FusedExpertLoRA(getattr(owner, attr), rank, alpha, bool(getattr(owner, "is_transposed", False)))
    parametrize.register_parametrization(owner, attr, adapter)
    return adapter


def remove_fused_lora(owner: nn.Module, attr: str) -> None:
    """Take the adapter off ``owner.<attr>``: the original parameter object comes back."""
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)


def fused_lora_of(owner: nn.Module, attr: str) -> FusedExpertLoRA | None:
    """The ``FusedExpertLoRA`` on ``owner.<attr>``, or None."""
    if not parametrize.is_parametrized(owner, attr):
        return None
    found = [p for p in owner.parametrizations[attr] if isinstance(p, FusedExpertLoRA)]
    return found[0] if found else None


def fused_lora_layers(model: nn.Module) -> dict[str, FusedExpertLoRA]:
    """``{qualified parameter name: FusedExpertLoRA}`` of every adapted fused parameter of ``model``."""
    out = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            adapter = fused_lora_of(module, attr)
            if adapter is not None:
                out[f"{name}.{attr}" if name else attr] = adapter
    return out
