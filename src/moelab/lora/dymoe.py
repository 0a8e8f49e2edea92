"""LLaVA-DyMoE: continual tuning of a LoRA mixture by adding experts per task (``dymoe``).

Spec: PAPERS.md §B.10 (paper abstract and summaries; no code is published). For each new task,
``expand`` adds experts to every mixture layer and rows to its linear router gate; the old experts
and the old router rows stay frozen. During training of the new task each token is typed by its
router distribution's mass on the old vs the new expert group (``token_types``), **TAG** (token
assignment guidance, ``tag_routing``) steers old and ambiguous tokens away from the new experts,
and the **RSR** pair (routing-score regularisation, ``rsr_separation`` and
``rsr_specialization``) separates the groups and specialises the new experts. The thresholds and
the loss formulas are not published: ours are documented in docs/methods/dymoe.md.

Freezing a slice: the old and the new parts are separate tensors (old: parameters with
``requires_grad=False``, new: trainable) concatenated in forward, so an optimizer built on the
trainable parameters cannot move the old slice at all (a gradient mask would still let weight
decay and stale Adam moments move it). The concatenated ``lora_A [E, r, d_in]`` / ``lora_B`` /
gate ``weight [E, d]`` are what the bank's grouped GEMMs, ``rank_dense_lora`` and the router read,
and what ``state_dict`` saves (the keys of a plain ``RoutedLoRA`` with ``E`` experts), so
``moelab.integrations.peft.save_mixture`` is unchanged. The concatenation copies ``E r (d_in +
d_out) + E d`` numbers per forward, small beside the ``T``-row GEMMs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int
from moelab.core.routed import RoutingSite, override_routing
from moelab.core.router import Router
from moelab.core.routing import Routing
from moelab.experts.lora import LoRABank
from moelab.lora.layer import RoutedLoRA
from moelab.lora.presets import MIXTURE_PRESETS, MixturePreset

# Token types (``token_types``' int8 codes).
OLD, AMBIGUOUS, NEW = 0, 1, 2

# Our choices (the paper's thresholds are N/F): a token is "new" when at least half of its
# routing mass is on the new group, "old" when under 0.2 of it is, ambiguous in between.
DEFAULT_OLD_THRESHOLD = 0.2
DEFAULT_NEW_THRESHOLD = 0.5
# Our choices for the RSR coefficients (N/F): DynMoLE's entropy-loss scale (1e-2).
DEFAULT_SEPARATION_COEF = 1e-2
DEFAULT_SPECIALIZATION_COEF = 1e-2

DYMOE_PRESET = MixturePreset(
    name="dymoe",
    paper="LLaVA-DyMoE (continual visual instruction tuning with dynamic LoRA MoE); PAPERS.md §B.10, no code",
    summary="continual LoRA mixture: per task add experts and router rows (old frozen), TAG + RSR on typed tokens",
    router="topk",
    top_k=2,
    # Our choice: the MoLE baseline's router (softmax top-2, renormalised); the paper's is N/F.
    router_kwargs={"normalize": True},
)
MIXTURE_PRESETS.setdefault("dymoe", DYMOE_PRESET)
registry.register("lora", "dymoe", paper=DYMOE_PRESET.paper, summary=DYMOE_PRESET.summary)(
    MIXTURE_PRESETS["dymoe"]
)


# --------------------------------------------------------------------------------- pure functions
def _check_probs(probs_TE: Tensor, num_new: int) -> None:
    if not isinstance(probs_TE, Tensor) or probs_TE.dim() != 2 or not probs_TE.is_floating_point():
        got = tuple(probs_TE.shape) if isinstance(probs_TE, Tensor) else type(probs_TE).__name__
        raise ValueError(f"probs must be a floating [T, E] tensor, got {got}")
    if isinstance(num_new, bool) or not isinstance(num_new, int) or not 1 <= num_new < probs_TE.shape[1]:
        raise ValueError(
            f"num_new must be an int in [1, E) with E={probs_TE.shape[1]} (the last num_new experts "
            f"are the new group), got {num_new!r}"
        )


def new_group_mass(probs_TE: Tensor, num_new: int) -> Tensor:
    """``[T]``: ``m_t = sum_{e in new} p_te / sum_e p_te``, the share of token ``t``'s router
    distribution on the new group (the last ``num_new`` experts). Divides by the row sum so
    sigmoid routers' scores are read as a distribution too (softmax rows already sum to 1)."""
    _check_probs(probs_TE, num_new)
    total_T = probs_TE.sum(-1).clamp_min(torch.finfo(probs_TE.dtype).tiny)
    return probs_TE[:, -num_new:].sum(-1) / total_T


def token_types(
    probs_TE: Tensor,
    num_new: int,
    old_threshold: float = DEFAULT_OLD_THRESHOLD,
    new_threshold: float = DEFAULT_NEW_THRESHOLD,
) -> Tensor:
    """``[T]`` int8 drift-aware token types: ``NEW`` (2) when ``m_t >= new_threshold``, ``OLD``
    (0) when ``m_t < old_threshold``, ``AMBIGUOUS`` (1) otherwise, with ``m_t`` the new-group mass
    (``new_group_mass``). Thresholds: our choice (the paper's are N/F), ``0 <= old <= new <= 1``.
    No gradient (types are labels)."""
    for name, v in (("old_threshold", old_threshold), ("new_threshold", new_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    if old_threshold > new_threshold:
        raise ValueError(f"old_threshold ({old_threshold}) must be <= new_threshold ({new_threshold})")
    m_T = new_group_mass(probs_TE.detach(), num_new)
    types_T = torch.full(m_T.shape, AMBIGUOUS, dtype=torch.int8, device=m_T.device)
    types_T[m_T >= new_threshold] = NEW
    types_T[m_T < old_threshold] = OLD
    return types_T


def rsr_separation(probs_TE: Tensor, types_T: Tensor, num_new: int) -> Tensor:
    """RSR group separation (our formula; the paper's is N/F), a scalar:

        L_sep = (1/T) sum_t [ type_t != NEW ] * m_t  +  [ type_t == NEW ] * (1 - m_t)

    with ``m_t`` the new-group mass. Old and ambiguous tokens (those TAG steers to the old
    group) are pulled off the new group, new tokens off the old group. Only the new router rows
    train, so the penalty moves the new group's logits. 0 for ``T = 0``."""
    _check_types(types_T, probs_TE)
    m_T = new_group_mass(probs_TE, num_new)
    if m_T.numel() == 0:
        return probs_TE.sum() * 0.0
    is_new_T = types_T == NEW
    return torch.where(is_new_T, 1.0 - m_T, m_T).mean()


def rsr_specialization(probs_TE: Tensor, types_T: Tensor, num_new: int) -> Tensor:
    """RSR new-expert specialisation (our formula; the paper's is N/F), a scalar:

        q_t   = p_t[new] / sum p_t[new]                (the distribution inside the new group)
        L_spe = mean over NEW tokens of  H(q_t) / log(num_new),   H(q) = -sum_e q_e log q_e

    Low when each new token commits to few new experts. Normalised to ``[0, 1]``; 0 when
    ``num_new = 1`` or no token is new."""
    _check_types(types_T, probs_TE)
    _check_probs(probs_TE, num_new)
    is_new_T = types_T == NEW
    if num_new == 1 or not bool(is_new_T.any()):
        return probs_TE.sum() * 0.0
    p_NE = probs_TE[is_new_T][:, -num_new:]
    q_NE = p_NE / p_NE.sum(-1, keepdim=True).clamp_min(torch.finfo(p_NE.dtype).tiny)
    entropy_N = -(torch.special.xlogy(q_NE, q_NE)).sum(-1)
    return entropy_N.mean() / math.log(num_new)


def _check_types(types_T: Tensor, probs_TE: Tensor) -> None:
    if not isinstance(types_T, Tensor) or types_T.dim() != 1 or types_T.is_floating_point():
        raise ValueError("types must be an integer [T] tensor (token_types' output)")
    if isinstance(probs_TE, Tensor) and types_T.shape[0] != probs_TE.shape[0]:
        raise ValueError(f"types has {types_T.shape[0]} tokens, probs has {probs_TE.shape[0]}")


def routing_probs(routing: Routing) -> Tensor:
    """``[T, E]`` the router's distribution: ``routing.probs``, else ``softmax(routing.logits)``."""
    if routing.probs is not None:
        return routing.probs
    if routing.logits is not None:
        return torch.softmax(routing.logits.float(), dim=-1)
    raise ValueError("DyMoE needs the router's scores: the routing has neither probs nor logits")


def tag_routing(routing: Routing, types_T: Tensor, num_new: int) -> Routing:
    """TAG: steer old and ambiguous tokens away from the new group (our rule; the paper's is N/F).

    A token typed ``OLD`` or ``AMBIGUOUS`` that has an entry on a new expert gets its ``n_t``
    entries re-selected as its top-``n_t`` *old* experts by router probability (``n_t`` capped at
    the old group's size), weighted ``p_e * W_t / sum_{selected} p_e`` with ``W_t`` its original
    total weight: the adapter's contribution keeps its size and moves to the old experts. Tokens
    typed ``NEW`` and tokens already on old experts only are untouched (bit for bit). Weights stay
    differentiable through the router's probabilities.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab Routing, got {type(routing).__name__}")
    _check_types(types_T, None)
    if types_T.shape[0] != routing.num_tokens:
        raise ValueError(f"types has {types_T.shape[0]} tokens, the routing has {routing.num_tokens}")
    probs_TE = routing_probs(routing)
    _check_probs(probs_TE, num_new)
    num_old = routing.num_experts - num_new
    tok_N, exp_N = routing.token_index, routing.expert_index
    on_new_N = exp_N >= num_old
    hits_T = torch.zeros(routing.num_tokens, dtype=torch.long, device=tok_N.device)
    hits_T.index_add_(0, tok_N, on_new_N.long())
    steer_T = (types_T != NEW) & (hits_T > 0)
    if not bool(steer_T.any()):
        return routing
    steer_N = steer_T[tok_N]
    # Each entry's rank within its token (entries of one token in their original order).
    order_N = torch.sort(tok_N, stable=True).indices
    sorted_tok = tok_N[order_N]
    count_T = torch.bincount(tok_N, minlength=routing.num_tokens)
    start_T = torch.cumsum(count_T, 0) - count_T
    rank_sorted = torch.arange(tok_N.numel(), device=tok_N.device) - start_T[sorted_tok]
    rank_N = torch.empty_like(rank_sorted)
    rank_N[order_N] = rank_sorted
    keep_N = ~steer_N | (rank_N < num_old)  # a token cannot hold more than num_old old experts
    n_sel_T = count_T.clamp(max=num_old)
    kmax = int(n_sel_T[steer_T].max())
    old_probs_TO = probs_TE[:, :num_old]
    top_p_TK, top_i_TK = torch.topk(old_probs_TO, kmax, dim=-1)
    ranks_TK = torch.arange(kmax, device=tok_N.device).expand_as(top_p_TK)
    selected_TK = ranks_TK < n_sel_T[:, None]
    sel_sum_T = (top_p_TK * selected_TK).sum(-1).clamp_min(torch.finfo(top_p_TK.dtype).tiny)
    total_T = torch.zeros(routing.num_tokens, dtype=routing.weight.dtype, device=tok_N.device)
    total_T = total_T.index_add(0, tok_N, routing.weight)
    r_N = rank_N.clamp(max=kmax - 1)
    new_exp_N = torch.where(steer_N, top_i_TK[tok_N, r_N], exp_N)
    new_w_N = top_p_TK[tok_N, r_N].to(routing.weight.dtype) * (total_T / sel_sum_T.to(total_T.dtype))[tok_N]
    new_w_N = torch.where(steer_N, new_w_N, routing.weight)
    all_kept = bool(keep_N.all())
    return Routing(
        token_index=tok_N if all_kept else tok_N[keep_N],
        expert_index=new_exp_N if all_kept else new_exp_N[keep_N],
        weight=new_w_N if all_kept else new_w_N[keep_N],
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        logits=routing.logits,
        probs=routing.probs,
        aux=dict(routing.aux),
        top_k=routing.top_k if all_kept else None,
        validate=False,
    )


# --------------------------------------------------------------------------------- expansion
def _split_param(frozen: Tensor, new: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    return nn.Parameter(frozen.detach().clone(), requires_grad=False), nn.Parameter(new.detach().clone())


class ExpandedLoRABank(LoRABank):
    """A ``LoRABank`` whose first ``num_frozen`` experts are frozen (module docstring).

    Parameters ``lora_A_frozen [E_old, r, d_in]`` / ``lora_B_frozen`` (``requires_grad=False``)
    and ``lora_A_new [E_new, r, d_in]`` / ``lora_B_new`` (trainable); ``lora_A`` / ``lora_B`` are
    their concatenations, read by ``LoRABank``'s forward (grouped GEMMs) and saved by
    ``state_dict`` under the plain bank's keys. New experts are initialised as ``LoRABank``'s
    (PEFT's: kaiming-uniform ``A``, ``B = 0``), so they add exactly 0 until trained.
    """

    def __init__(self, bank: LoRABank, new_experts: int) -> None:
        nn.Module.__init__(self)  # LoRABank.__init__ would register lora_A as one parameter
        if not isinstance(bank, LoRABank):
            raise TypeError(f"bank must be a moelab LoRABank, got {type(bank).__name__}")
        new_experts = positive_int("new_experts", new_experts)
        old_A, old_B = bank.lora_A.detach(), bank.lora_B.detach()
        fresh = LoRABank(new_experts, bank.d_in, bank.d_out, bank.rank, bank.alpha, bank.dropout)
        fresh = fresh.to(device=old_A.device, dtype=old_A.dtype)
        self.num_frozen = old_A.shape[0]
        self.num_experts = self.num_frozen + new_experts
        self.d_in, self.d_out, self.rank = bank.d_in, bank.d_out, bank.rank
        self.alpha, self.scaling, self.dropout = bank.alpha, bank.scaling, bank.dropout
        self.training = bank.training
        self.lora_A_frozen, self.lora_A_new = _split_param(old_A, fresh.lora_A)
        self.lora_B_frozen, self.lora_B_new = _split_param(old_B, fresh.lora_B)

    @property
    def lora_A(self) -> Tensor:
        return torch.cat([self.lora_A_frozen, self.lora_A_new])

    @property
    def lora_B(self) -> Tensor:
        return torch.cat([self.lora_B_frozen, self.lora_B_new])

    def reset_parameters(self) -> None:
        raise RuntimeError("an ExpandedLoRABank's frozen experts are not re-initialised")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key in ("lora_A", "lora_B"):
            value = getattr(self, key)
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _load_split(self, state_dict, prefix, ("lora_A", "lora_B"), missing, errors)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frozen={self.num_frozen}"


def _load_split(module: nn.Module, state_dict: dict, prefix: str, keys, missing: list, errors: list) -> None:
    """Load the concatenated ``key`` into ``key_frozen`` / ``key_new`` (the saved layout)."""
    for key in keys:
        frozen, new = getattr(module, key + "_frozen"), getattr(module, key + "_new")
        if prefix + key not in state_dict:
            missing.append(prefix + key)
            continue
        value = state_dict.pop(prefix + key)
        want = (frozen.shape[0] + new.shape[0], *frozen.shape[1:])
        if tuple(value.shape) != want:
            errors.append(f"size mismatch for {prefix + key}: copying {tuple(value.shape)}, expected {want}")
            continue
        with torch.no_grad():
            frozen.copy_(value[: frozen.shape[0]])
            new.copy_(value[frozen.shape[0] :])


class _ExpandedGate:
    """Mixin over a ``Router`` class: the linear gate ``weight [E, d]`` (and ``bias [E]``) as a
    frozen old block and a trainable new block, concatenated (module docstring)."""

    @property
    def weight(self) -> Tensor:
        return torch.cat([self.weight_frozen, self.weight_new])

    @property
    def bias(self) -> Tensor | None:
        if "bias_frozen" not in self._parameters:
            return None
        return torch.cat([self.bias_frozen, self.bias_new])

    def _gate_keys(self) -> tuple[str, ...]:
        return ("weight", "bias") if "bias_frozen" in self._parameters else ("weight",)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        split = {f"{k}_{part}" for k in self._gate_keys() for part in ("frozen", "new")}
        for name, p in self._parameters.items():
            if name not in split and p is not None:
                destination[prefix + name] = p if keep_vars else p.detach()
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = b if keep_vars else b.detach()
        for key in self._gate_keys():
            value = getattr(self, key)
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _load_split(self, state_dict, prefix, self._gate_keys(), missing, errors)


_EXPANDED_ROUTER_CLASSES: dict[type, type] = {}


def _expanded_router_class(cls: type) -> type:
    if issubclass(cls, _ExpandedGate):
        return cls
    if cls not in _EXPANDED_ROUTER_CLASSES:
        _EXPANDED_ROUTER_CLASSES[cls] = type(
            f"Expanded{cls.__name__}", (_ExpandedGate, cls), {"__module__": __name__}
        )
    return _EXPANDED_ROUTER_CLASSES[cls]


def expand_router(router: Router, new_experts: int) -> Router:
    """Grow ``router``'s linear gate by ``new_experts`` rows, in place; the old rows frozen.

    The router must be a ``moelab`` ``Router`` whose only ``E``-sized state is the linear gate
    (``weight [E, d]``, optional ``bias [E]``): ``topk``, ``tsallis_topp``, ... New rows are
    initialised as ``Router._init_gate`` (``nn.Linear``'s kaiming-uniform), new bias entries 0.
    Returns the same object (its class becomes ``Expanded<Class>``, a subclass).
    """
    if not isinstance(router, Router):
        raise TypeError(f"router must be a moelab Router, got {type(router).__name__}")
    new_experts = positive_int("new_experts", new_experts)
    weight = getattr(router, "weight", None)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (router.num_experts, router.d_model):
        raise TypeError(
            f"router {type(router).__name__} has no linear gate weight [E={router.num_experts}, "
            f"d={router.d_model}]: DyMoE expands only routers with one"
        )
    gate = {"weight", "bias", "weight_frozen", "weight_new", "bias_frozen", "bias_new"}
    extra = [n for n, _ in router.named_parameters(recurse=True) if n not in gate]
    extra += [n for n, b in router.named_buffers() if b.dim() > 0 and b.shape[0] == router.num_experts]
    if extra:
        raise TypeError(
            f"router {type(router).__name__} holds expert-sized state besides its gate ({extra}); "
            "DyMoE cannot expand it"
        )
    bias = router.bias
    fresh = torch.empty(new_experts, router.d_model, device=weight.device, dtype=weight.dtype)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    for name in ("weight", "bias", "weight_frozen", "weight_new", "bias_frozen", "bias_new"):
        router._parameters.pop(name, None)
        router.__dict__.pop(name, None)
    router.__class__ = _expanded_router_class(type(router))
    router.weight_frozen, router.weight_new = _split_param(weight, fresh)
    if bias is not None:
        router.bias_frozen, router.bias_new = _split_param(bias, bias.new_zeros(new_experts))
    router.num_experts += new_experts
    return router


def expand_layer(layer: RoutedLoRA, new_experts: int) -> RoutedLoRA:
    """Add ``new_experts`` LoRA experts and router rows to one ``RoutedLoRA``, in place.

    Everything the layer held before (old experts, old router rows) is frozen; the new experts
    and rows train. ``layer.expert_groups`` records the group sizes, one per task
    (``[E_0, E_1, ...]``): the last group is the new one.
    """
    if not isinstance(layer, RoutedLoRA):
        raise TypeError(f"layer must be a moelab.lora RoutedLoRA, got {type(layer).__name__}")
    new_experts = positive_int("new_experts", new_experts)
    expand_router(layer.router, new_experts)
    layer.experts = ExpandedLoRABank(layer.experts, new_experts)
    groups = list(getattr(layer, "expert_groups", None) or [layer.num_experts])
    layer.num_experts += new_experts
    layer.expert_groups = [*groups, new_experts]
    return layer


def expand(model_or_layer: nn.Module, new_experts: int) -> dict[str, list[int]]:
    """Start a new task: ``expand_layer`` on every ``RoutedLoRA`` of ``model_or_layer``.

    Returns ``{layer name: expert group sizes}`` (``""`` for a layer given directly). Build the
    optimizer afterwards, on the parameters that require grad (the new experts and router rows).
    """
    if not isinstance(model_or_layer, nn.Module):
        raise TypeError(f"model_or_layer must be a torch nn.Module, got {type(model_or_layer).__name__}")
    positive_int("new_experts", new_experts)
    layers = {n: m for n, m in model_or_layer.named_modules() if isinstance(m, RoutedLoRA)}
    if not layers:
        raise ValueError(f"{type(model_or_layer).__name__} has no RoutedLoRA layer to expand")
    return {n: expand_layer(m, new_experts).expert_groups for n, m in layers.items()}


def expanded_layers(model: nn.Module) -> dict[str, RoutedLoRA]:
    """``{name: layer}`` of the ``RoutedLoRA`` layers of ``model`` that ``expand`` has grown."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return {
        n or type(m).__name__: m
        for n, m in model.named_modules()
        if isinstance(m, RoutedLoRA) and len(getattr(m, "expert_groups", ())) > 1
    }


# --------------------------------------------------------------------------------- training
class DyMoEGuidance:
    """The routing transform of ``guidance``: type tokens, add RSR to the layer's loss, apply TAG.

    On each expanded layer's router routing it computes ``types = token_types(probs, E_new)``
    (kept as ``layer.token_types``, with ``layer.new_group_mass`` for drift measurement), adds
    ``separation_coef * rsr_separation + specialization_coef * rsr_specialization`` to
    ``layer.aux_loss`` (terms ``rsr_separation`` / ``rsr_specialization`` in ``layer.aux_terms``;
    ``RoutedLoRA`` computed those from the same routing just before), and returns
    ``tag_routing(routing, types, E_new)`` when ``tag`` is on, else the routing unchanged.
    """

    def __init__(
        self,
        *,
        tag: bool = True,
        old_threshold: float = DEFAULT_OLD_THRESHOLD,
        new_threshold: float = DEFAULT_NEW_THRESHOLD,
        separation_coef: float = DEFAULT_SEPARATION_COEF,
        specialization_coef: float = DEFAULT_SPECIALIZATION_COEF,
    ) -> None:
        if not isinstance(tag, bool):
            raise TypeError(f"tag must be a bool, got {type(tag).__name__}")
        for name, v in (("separation_coef", separation_coef), ("specialization_coef", specialization_coef)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        token_types(torch.zeros(0, 2), 1, old_threshold, new_threshold)  # checks the thresholds
        self.tag = tag
        self.old_threshold, self.new_threshold = float(old_threshold), float(new_threshold)
        self.separation_coef, self.specialization_coef = float(separation_coef), float(specialization_coef)

    def __call__(self, routing: Routing, site: RoutingSite) -> Routing:
        layer = site.layer
        num_new = layer.expert_groups[-1]
        probs_TE = routing_probs(routing)
        types_T = token_types(probs_TE, num_new, self.old_threshold, self.new_threshold)
        layer.token_types = types_T
        layer.new_group_mass = new_group_mass(probs_TE.detach(), num_new)
        if layer.training and (self.separation_coef or self.specialization_coef):
            sep = rsr_separation(probs_TE, types_T, num_new)
            spe = rsr_specialization(probs_TE, types_T, num_new)
            layer.aux_terms = {**layer.aux_terms, "rsr_separation": sep, "rsr_specialization": spe}
            layer.aux_loss = layer.aux_loss + self.separation_coef * sep + self.specialization_coef * spe
        return tag_routing(routing, types_T, num_new) if self.tag else routing


@contextmanager
def guidance(model: nn.Module, **kwargs: Any) -> Iterator[list[str]]:
    """Train (or evaluate) ``model``'s expanded layers with DyMoE's typing, RSR and TAG.

    ``with guidance(model, tag=True): loss = task_loss(model(x)) + moelab.aux_loss(model)``.
    Keyword arguments are ``DyMoEGuidance``'s. Yields the layer names. ``tag=False`` keeps RSR
    and the typing (the ablation). An ``override_routing`` transform: removed on exit.
    """
    fn = DyMoEGuidance(**kwargs)
    names = set(expanded_layers(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no expanded RoutedLoRA layer: call dymoe.expand first")
    with override_routing(model, fn, layers=lambda n: n in names) as applied:
        yield applied
