"""How each transformers MoE family routes, written as moelab routers, banks and shared experts.

One ``Family`` per supported model family. Each maps the family's MoE block onto the spine
``Router -> Routing -> ExpertBank (+ SharedExperts)`` and shares every parameter and buffer with
the original modules (no copies):

| family | block | moelab router | bank |
|---|---|---|---|
| OLMoE, Qwen2-MoE, Qwen3-MoE | ``*SparseMoeBlock`` | ``topk``, ``normalize=norm_topk_prob`` | ``ExpertBank`` |
| Mixtral | ``MixtralSparseMoeBlock`` | ``topk``, ``normalize=True``, ``jitter`` | ``ExpertBank`` |
| DeepSeek-V3 | ``DeepseekV3MoE`` | ``sigmoid_topk`` with groups, bias, scale | ``ExpertBank`` |
| gpt-oss | ``GptOssMLP`` | ``topk``, ``normalize=True``, ``bias=True`` | ``ClampedSwiGLUExpertBank`` |

gpt-oss's router takes the top-k of the logits and a softmax over those k values; that is the
full softmax's top-k renormalised (softmax is monotone and ``exp(l_i) / sum_topk exp(l_j)`` is
the same number), so the core ``topk`` router expresses it with no special path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.core.activations import activation_for
from moelab.core.router import Router
from moelab.experts.bank import ExpertBank
from moelab.experts.shared import SharedExperts
from moelab.integrations.hf.banks import ClampedSwiGLUExpertBank
from moelab.routers.sigmoid_topk import SigmoidTopKRouter
from moelab.routers.topk import TopKRouter

# transformers activation classes -> the element-wise function moelab's table calls it.
_BASE_OF_CLASS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu", "ReLU": "relu"}


def moelab_activation(act_fn: nn.Module, gated: bool = True) -> str:
    """The moelab activation equal to transformers' ``act_fn`` (gated: ``act(gate) * up``)."""
    name = type(act_fn).__name__
    base = _BASE_OF_CLASS.get(name)
    if name == "GELU" and getattr(act_fn, "approximate", "none") != "none":
        name, base = "GELU(approximate='tanh')", None
    act = None if base is None else activation_for(base, gated)
    if act is None:
        kind = "gated" if gated else "plain"
        ok = sorted(k for k, b in _BASE_OF_CLASS.items() if activation_for(b, gated))
        raise ValueError(f"{kind} experts activation {name} has no moelab equivalent; supported: {ok}")
    return act


def _on_device_of(p: Tensor):
    # Build new router modules where the shared parameters live, so that their own buffers
    # (DeepSeek's load counter) land on the same device.
    return torch.device(p.device)


def topk_router_sharing(gate: nn.Module, overrides: dict | None = None, **settings) -> TopKRouter:
    """A moelab ``topk`` router whose gate weight (and bias) IS ``gate.weight`` (``gate.bias``).

    ``settings`` are the family's own (``normalize``, ``bias``, ``jitter``); ``overrides`` (the
    user's ``router_kwargs``) change any ``TopKRouter`` argument except ``bias``.
    """
    e, d = gate.weight.shape
    kw = {"top_k": int(gate.top_k), **settings, **(overrides or {})}
    bias = bool(settings.get("bias", False))
    if kw.get("bias", bias) != bias:
        raise ValueError(f"router_kwargs cannot change 'bias' of the model's own router (it is {bias})")
    with _on_device_of(gate.weight):
        router = TopKRouter(d, e, **kw)
    router.weight = gate.weight
    if bias:
        router.bias = gate.bias
    return router


def sigmoid_router_sharing(gate: nn.Module, overrides: dict | None = None) -> SigmoidTopKRouter:
    """DeepSeek-V3's router as moelab ``sigmoid_topk``, sharing ``weight`` and ``e_score_correction_bias``.

    ``bias_update_rate=0``: transformers' model never updates its bias, and the patched model
    routes exactly as it does. To train with the aux-loss-free rule of the paper, patch with
    ``router_kwargs={"bias_update_rate": 1e-3}`` and call ``moelab.step_end(model)`` after each
    optimizer step (the update then writes into the model's own buffer).
    """
    e, d = gate.weight.shape
    kw = {
        "top_k": int(gate.top_k),
        "normalize": bool(gate.norm_topk_prob),
        "scale": float(gate.routed_scaling_factor),
        "num_groups": int(gate.num_group),
        "topk_groups": int(gate.topk_group),
        "bias_update_rate": 0.0,
        **(overrides or {}),
    }
    with _on_device_of(gate.weight):
        router = SigmoidTopKRouter(d, e, **kw)
    router.weight = gate.weight
    router.expert_bias = gate.e_score_correction_bias  # the same buffer object
    return router


def bank_sharing(experts: nn.Module) -> ExpertBank:
    """A view of a standard transformers experts module (``gate_up_proj [E, 2h, d]``, ``down_proj [E, d, h]``)."""
    return ExpertBank.from_parameters(
        experts.gate_up_proj, experts.down_proj, moelab_activation(experts.act_fn)
    )


def shared_sharing(mlp: nn.Module, gate: nn.Linear | None = None) -> SharedExperts:
    """``SharedExperts`` whose projections ARE ``mlp.gate_proj/up_proj/down_proj`` (and ``gate``).

    Built on the meta device, then the original ``nn.Linear`` modules are put in place, so no
    weight is allocated or copied.
    """
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear) or lin.bias is not None:
            raise ValueError(f"shared expert {type(mlp).__name__}.{name} must be a bias-free nn.Linear")
    d, h = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    with torch.device("meta"):
        shared = SharedExperts(d, h, moelab_activation(mlp.act_fn), gate=gate is not None)
    shared.gate_proj, shared.up_proj, shared.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if gate is not None:
        shared.gate = gate
    return shared


@dataclass(frozen=True)
class Family:
    """How one transformers MoE family maps onto moelab.

    Attributes:
        name: short family name (``"olmoe"``).
        block_class: class name of the family's MoE block (``OlmoeSparseMoeBlock``).
        gate_attr: the block's attribute holding its router module (``"gate"`` or ``"router"``).
        own_router: ``(block, overrides) -> Router`` routing exactly like the block, sharing its
            parameters; ``overrides`` (a dict, may be empty) changes the router's arguments.
        bank: ``experts module -> ExpertBank`` view of the experts, sharing parameters.
        shared: ``block -> SharedExperts | None``, sharing the always-on expert modules.
        score: how the router's probabilities follow from its logits: ``"softmax"`` or ``"sigmoid"``.
        returns_scores: the block returns ``(hidden, router_scores)`` instead of ``hidden``.
        state_dict_names: ``HFMoE`` key -> the block's key (None: not saved), so that a model
            patched with its own router keeps the original state-dict keys.
    """

    name: str
    block_class: str
    gate_attr: str
    own_router: Callable[[nn.Module, dict], Router]
    bank: Callable[[nn.Module], ExpertBank]
    shared: Callable[[nn.Module], SharedExperts | None]
    score: str = "softmax"
    returns_scores: bool = False
    state_dict_names: dict[str, str | None] = field(default_factory=dict)

    def gate(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.gate_attr)

    def probs(self, logits_TE: Tensor) -> Tensor:
        """``[T, E]`` router probabilities from the gate's logits (what ``Routing.probs`` holds)."""
        x = logits_TE.float()
        return torch.sigmoid(x) if self.score == "sigmoid" else torch.softmax(x, dim=-1)


def _no_shared(block: nn.Module) -> None:
    return None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (keyed by its block class name). Later registrations replace earlier ones."""
    FAMILIES[family.block_class] = family
    return family


_GATE_NAMES = {"router.weight": "gate.weight"}
_QWEN2_SHARED_NAMES = {
    **{
        f"shared_experts.{p}.weight": f"shared_expert.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    },
    "shared_experts.gate.weight": "shared_expert_gate.weight",
}


def _softmax_family(
    name: str, block_class: str, *, normalize: Callable[[nn.Module], bool], shared=_no_shared, names=None
):
    return Family(
        name=name,
        block_class=block_class,
        gate_attr="gate",
        own_router=lambda b, kw: topk_router_sharing(b.gate, kw, normalize=normalize(b)),
        bank=lambda ex: bank_sharing(ex),
        shared=shared,
        state_dict_names={**_GATE_NAMES, **(names or {})},
    )


register_family(
    _softmax_family("olmoe", "OlmoeSparseMoeBlock", normalize=lambda b: bool(b.gate.norm_topk_prob))
)
register_family(
    _softmax_family(
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        normalize=lambda b: bool(b.gate.norm_topk_prob),
        shared=lambda b: shared_sharing(b.shared_expert, b.shared_expert_gate),
        names=_QWEN2_SHARED_NAMES,
    )
)
register_family(
    _softmax_family("qwen3_moe", "Qwen3MoeSparseMoeBlock", normalize=lambda b: bool(b.gate.norm_topk_prob))
)
register_family(
    Family(
        name="mixtral",
        block_class="MixtralSparseMoeBlock",
        gate_attr="gate",
        # Mixtral's code jitters the whole block input in training; moelab's jitter (Switch's
        # definition) jitters the router input only. Same at eval and with the default 0.
        own_router=lambda b, kw: topk_router_sharing(
            b.gate, kw, normalize=True, jitter=float(b.jitter_noise)
        ),
        bank=lambda ex: bank_sharing(ex),
        shared=_no_shared,
        state_dict_names=_GATE_NAMES,
    )
)
register_family(
    Family(
        name="deepseek_v3",
        block_class="DeepseekV3MoE",
        gate_attr="gate",
        own_router=lambda b, kw: sigmoid_router_sharing(b.gate, kw),
        bank=lambda ex: bank_sharing(ex),
        shared=lambda b: shared_sharing(b.shared_experts),
        score="sigmoid",
        state_dict_names={
            **_GATE_NAMES,
            "router.expert_bias": "gate.e_score_correction_bias",
            "router.load_since_step": None,  # moelab's load counter; zero after every step_end
        },
    )
)
register_family(
    Family(
        name="gpt_oss",
        block_class="GptOssMLP",
        gate_attr="router",
        own_router=lambda b, kw: topk_router_sharing(b.router, kw, normalize=True, bias=True),
        bank=lambda ex: ClampedSwiGLUExpertBank.from_module(ex),
        shared=_no_shared,
        returns_scores=True,
    )
)


def family_of(module: nn.Module) -> Family | None:
    """The ``Family`` whose MoE block ``module`` is, or None."""
    return FAMILIES.get(type(module).__name__)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, Family]]:
    """``(name, block, family)`` of every unpatched MoE block of a supported family, in module order."""
    out = []
    for name, m in model.named_modules():
        fam = family_of(m)
        if fam is not None:
            out.append((name, m, fam))
    return out
