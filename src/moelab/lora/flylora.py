"""FlyLoRA: a frozen sparse random ``A`` as an implicit router over rank-1 experts; only ``B`` trains.

Paper: Zou et al., *FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit
Rank-Wise Mixture-of-Experts* (NeurIPS 2025); official code gfyddha/FlyLoRA (``flylora.py``,
``FlyLoRALinear``; ``merge_lora_adapters.py``, ``fast_lora_average``). For a frozen projection
``W`` and a token ``x [n]``::

    A   [r, n]   frozen, sparse: p = max(1, floor(n k / r)) nonzeros per row, drawn from N(0, 1/r^2)
    y   = A x                                       [r]    the implicit router's scores
    idx = top-k(|y + d|)                                    d [r]: a selection-only bias, no grad
    out = W x + b + (alpha / r) B (y * mask_idx)    B [m, r], zero at init, the only trained weight
    after each optimizer step:   d <- d + u sign(mean(count) - count)

``count`` is how often each rank was selected since the last step; ``mean(count) = T k / r``,
so the rule is ``d <- d + u sign(k / r - count / T)`` (PAPERS.md's form). Defaults (paper and
code): r = 32, k = 8, alpha = 2r = 64, u = 1e-3.

Each rank ``i`` is an expert ``x -> B[:, i] (A_i x)``: the rank-wise top-k is a routing of tokens
to ``E = r`` rank-1 experts with ``top_k = k``. ``FlyLoRALinear`` builds it as a ``moelab.Routing``
and passes it through ``self.routed`` (traced, transformable), then runs it as a masked matmul.

``apply_flylora`` / ``remove_flylora`` wrap a model's projections and restore them bit-exactly
(``moelab.lora.apply``'s rules); ``flylora_state`` / ``load_flylora_state`` read and write the
adapter; ``merge_flylora`` and ``merge_lora`` average adapters (the merging the paper compares).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import float_in, hidden_states, positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext, check_context
from moelab.core.router import Router
from moelab.core.routing import Routing
from moelab.lora.apply import check_model, check_targets, find_linear_targets, remove, swap_in
from moelab.lora.layer import AdaptedLinear, RoutedLoRA, check_projection_input
from moelab.routers.sigmoid_topk import bias_update

# Paper / official code defaults (gfyddha/FlyLoRA flylora.py, FlyLoRALinear.__init__).
FLYLORA_RANK = 32
FLYLORA_TOP_K = 8
FLYLORA_BIAS_UPDATE_RATE = 1e-3  # ``bias_lr``


# ---------------------------------------------------------------------------------- pure math
def sparse_random_projection(
    rank: int, in_features: int, top_k: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """FlyLoRA's frozen ``A [r, n]`` (fp32, on the CPU): each row has ``p = max(1, floor(n k / r))``
    nonzeros at uniformly random columns, drawn from ``N(0, 1/r^2)`` (std ``1/r``), as the code's
    ``A[i, randperm(n)[:p]] = randn(p) / r``. Deterministic under ``generator``'s seed."""
    rank = positive_int("rank", rank)
    in_features = positive_int("in_features", in_features)
    top_k = top_k_in_range(top_k, rank)
    p = max(1, int(in_features * (top_k / rank)))
    # A random permutation per row, vectorised: argsort of uniform noise.
    columns_RP = torch.rand(rank, in_features, generator=generator).argsort(dim=1)[:, :p]
    values_RP = torch.randn(rank, p, generator=generator) / rank
    A_RN = torch.zeros(rank, in_features)
    A_RN.scatter_(1, columns_RP, values_RP)
    return A_RN


def flylora_select(y_TR: Tensor, bias_R: Tensor, top_k: int) -> Tensor:
    """``[T, k]`` long: each token's ranks, ``top-k(|y + d|)``, computed in fp32."""
    return torch.topk((y_TR.float() + bias_R.float()).abs(), top_k, dim=-1).indices


def flylora_delta(y_TR: Tensor, mask_TR: Tensor, B_OR: Tensor, scaling: float) -> Tensor:
    """``[T, m]``: ``scaling * B (y * mask)``, the adapter's output."""
    return F.linear(y_TR * mask_TR.to(y_TR.dtype), B_OR) * scaling


def flylora_bias_update(bias_R: Tensor, count_R: Tensor, rate: float) -> Tensor:
    """FlyLoRA's balance rule ``d + u sign(mean(count) - count)``: the aux-loss-free sign rule
    of DeepSeek-V3 (``moelab.routers.sigmoid_topk.bias_update``), which it is. Returns the new bias."""
    return bias_update(bias_R, count_R, rate)


# ---------------------------------------------------------------------------------- the router
class FlyLoRARouter(Router):
    """FlyLoRA's implicit router: ``y = A x`` with a frozen sparse random ``A``, tokens routed to
    the ``k`` ranks of largest ``|y + d|``.

    Args:
        d_model: ``n``, the wrapped projection's ``in_features``.
        rank: ``r`` = the number of rank-1 experts (default 32, the paper's).
        top_k: ``k``, active ranks per token (default 8).
        bias_update_rate: ``u`` of the sign rule (default 1e-3); 0 disables it.
        generator: where ``A`` comes from (``sparse_random_projection``); None: the global RNG.

    Buffers: ``A [r, n]`` (frozen, no grad, cast with the module), ``expert_bias [r]`` (``d``) and
    ``load_since_step [r]`` (kept fp32). Training forwards count each rank's selections;
    ``step_end()`` (``moelab.step_end(model)``, which the trainer calls after each optimizer step)
    applies the sign rule to the counts since the last step, all-reduced across data-parallel
    ranks, and clears them. The code updates ``d`` inside every training forward instead; without
    gradient accumulation the sequence of ``d`` is the same, with it ours updates once per step.
    """

    def __init__(
        self,
        d_model: int,
        rank: int = FLYLORA_RANK,
        top_k: int = FLYLORA_TOP_K,
        *,
        bias_update_rate: float = FLYLORA_BIAS_UPDATE_RATE,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(d_model, rank)
        self.top_k = top_k_in_range(top_k, rank)
        self.bias_update_rate = float_in("bias_update_rate", bias_update_rate, 0.0, float("inf"))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.register_buffer("A", sparse_random_projection(rank, d_model, self.top_k, generator=generator))
        self.register_buffer("expert_bias", torch.zeros(rank))
        self.register_buffer("load_since_step", torch.zeros(rank))

    @property
    def rank(self) -> int:
        return self.num_experts

    def _apply(self, fn, recurse: bool = True):
        # As SigmoidTopKRouter: a u = 1e-3 step is below bf16's resolution, and bf16 counts are
        # inexact above 256, so the bias and the counts stay fp32 whatever the model is cast to.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "load_since_step"):
            buf = getattr(self, name)
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def project(self, x_TD: Tensor) -> Tensor:
        """``y = A x``, ``[T, r]`` in ``x``'s dtype, differentiable in ``x`` (``A`` has no grad)."""
        return F.linear(x_TD, self.A.to(x_TD.dtype))

    def select(self, y_TR: Tensor) -> Routing:
        """The rank-wise top-k of ``|y + d|`` as a token-major ``Routing`` (``E = r``,
        ``top_k = k``, weight 1: the mask). ``logits`` is ``y`` (fp32, detached). Counts the
        selections for ``step_end`` in training."""
        index_TK = flylora_select(y_TR, self.expert_bias, self.top_k)
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                self.load_since_step += torch.bincount(index_TK.reshape(-1), minlength=self.rank).float()
        t = y_TR.shape[0]
        return Routing(
            token_index=torch.arange(t, device=y_TR.device).repeat_interleave(self.top_k),
            expert_index=index_TK.reshape(-1),
            # The mask: A is frozen, so the selection carries no gradient to learn.
            weight=torch.ones(t * self.top_k, device=y_TR.device),
            num_tokens=t,
            num_experts=self.rank,
            logits=y_TR.detach().float(),
            top_k=self.top_k,
            validate=False,  # token-major with k per token by construction
        )

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        return self.select(self.project(x_TD))

    @torch.no_grad()
    def step_end(self) -> None:
        if self.bias_update_rate == 0:
            return
        load = self.load_since_step.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() > 0:
            self.expert_bias.copy_(flylora_bias_update(self.expert_bias, load, self.bias_update_rate))
        self.load_since_step.zero_()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, rank={self.rank}, top_k={self.top_k}, "
            f"bias_update_rate={self.bias_update_rate}"
        )


# ---------------------------------------------------------------------------------- the layer
class FlyLoRALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` plus a FlyLoRA adapter (module docstring).

    Args:
        base: the projection to adapt, kept as ``self.base`` (same object) and frozen.
        rank: ``r`` (default 32). top_k: ``k`` (default 8). alpha: ``scaling = alpha / r``;
            default ``2 r`` (64 at r = 32), the code's ``alpha or 2.0 * r``.
        bias_update_rate: ``u`` (default 1e-3).
        seed: an int (a fresh generator) or a ``torch.Generator`` (consumed: ``apply_flylora``
            passes one through every layer) for ``A``. Adapters built with the same seed on the
            same model share ``A``, which is what makes averaging their ``B`` meaningful.

    Parameters: ``lora_B [d_out, r]`` (zeros: the layer equals ``base`` at init), the only one
    that trains. ``router`` (``FlyLoRARouter``) holds ``A`` and the bias ``d``.

    ``forward(x [..., d_in], ctx=None) -> [..., d_out]``. ``update_bias()`` applies the sign rule
    now (what ``moelab.step_end(model)`` does for every FlyLoRA layer). ``aux_loss`` is a zero:
    FlyLoRA balances with the bias, not a loss.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = FLYLORA_RANK,
        top_k: int = FLYLORA_TOP_K,
        *,
        alpha: float | None = None,
        bias_update_rate: float = FLYLORA_BIAS_UPDATE_RATE,
        seed: int | torch.Generator = 0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch nn.Linear, got {type(base).__name__}")
        rank = positive_int("rank", rank)
        if isinstance(seed, torch.Generator):
            generator = seed
        elif isinstance(seed, int) and not isinstance(seed, bool):
            generator = torch.Generator().manual_seed(seed)
        else:
            raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
        self.alpha = 2.0 * rank if alpha is None else positive_float("alpha", alpha)
        self.scaling = self.alpha / rank
        weight = base.weight
        router = FlyLoRARouter(
            base.in_features, rank, top_k, bias_update_rate=bias_update_rate, generator=generator
        )
        self.base = base
        self.router = router.to(device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype)
        )
        base.requires_grad_(False)
        self.d_model = base.in_features
        self.d_out = base.out_features
        self.rank = rank
        self.top_k = self.router.top_k
        self.layer_index = 0
        self.context: RoutingContext | None = None
        self.aux_loss: Tensor | None = None

    @property
    def A(self) -> Tensor:
        """The frozen sparse ``A [r, d_in]`` (the router's buffer)."""
        return self.router.A

    @property
    def expert_bias(self) -> Tensor:
        """The selection bias ``d [r]`` (fp32)."""
        return self.router.expert_bias

    def update_bias(self) -> None:
        """Apply the balance rule to the selections counted since the last update (once per
        optimizer step; ``moelab.step_end(model)`` calls it through the router)."""
        self.router.step_end()

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the output and the routing that ran (after any routing transform)."""
        check_projection_input(x, self.d_model)
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        out = self.base(x)
        ctx = self._own_context() if ctx is None else check_context(ctx)
        if x.dim() == 3:
            shape = (x.shape[0], x.shape[1])
            ctx = ctx if ctx.batch_shape == shape else ctx.replace(batch_shape=shape)
        elif ctx.batch_shape is not None:
            ctx = ctx.replace(batch_shape=None)
        x_TD = hidden_states(x.reshape(-1, self.d_model), self.d_model, name="x", ranks=(2,))
        y_TR = self.router.project(x_TD)
        routing = self.routed(self.router.select(y_TR), ctx, x_TD)
        self.aux_loss = out.new_zeros((), dtype=torch.float32)
        # The experts are rank-1 (expert i is B[:, i] A_i x) and y = A x is already computed for
        # the selection, so running the routing is a masked [T, r] x [r, m] matmul: the dense
        # LoRA cost. Gathering rows per expert for grouped GEMMs would move T k rows to save
        # (r - k) / r of an r-wide product, a loss at any r. The mask is read from the routing
        # that came back from ``self.routed``, so routing transforms change what runs.
        mask_TR = torch.zeros_like(y_TR)
        mask_TR.index_put_(
            (routing.token_index, routing.expert_index), routing.weight.to(y_TR.dtype), accumulate=True
        )
        delta_TO = flylora_delta(y_TR, mask_TR, self.lora_B, self.scaling)
        return out + delta_TO.view(out.shape).to(out.dtype), routing

    def _own_context(self) -> RoutingContext:
        if self.context is None:
            return RoutingContext(layer_index=self.layer_index)
        ctx = check_context(self.context, "FlyLoRALinear.context")
        return ctx if ctx.layer_index == self.layer_index else ctx.replace(layer_index=self.layer_index)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_model}, d_out={self.d_out}, rank={self.rank}, top_k={self.top_k}, "
            f"alpha={self.alpha}"
        )


registry.register(
    "lora",
    "flylora",
    paper="FlyLoRA (Zou et al., NeurIPS 2025); code gfyddha/FlyLoRA flylora.py, merge_lora_adapters.py",
    summary="frozen sparse random A as implicit router, rank-wise top-k of |Ax + d|, only B trains, "
    "sign-rule bias balance; merges by averaging",
)(FlyLoRALinear)


# ---------------------------------------------------------------------------------- apply / remove
# The same targets rule and module swapping as ``moelab.lora.apply`` (``find_linear_targets``,
# ``swap_in``); the state sits under its own model attribute (``apply.OTHER_STATES``), which
# ``moelab.lora.remove`` also undoes.
_STATE = "_moelab_flylora"


@dataclass
class _FlyLoRAState:
    config: dict[str, Any]
    wrapped: list[str]
    requires_grad: list[tuple[nn.Parameter, bool]]
    layer_type: type = FlyLoRALinear  # what ``wrapped`` names hold (read by a generic remove)


def flylora_layers(model: nn.Module) -> dict[str, FlyLoRALinear]:
    """``{qualified name: FlyLoRALinear}`` of ``model``, in module order."""
    return {n: m for n, m in check_model(model).named_modules() if isinstance(m, FlyLoRALinear)}


def apply_flylora(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    rank: int = FLYLORA_RANK,
    top_k: int = FLYLORA_TOP_K,
    alpha: float | None = None,
    bias_update_rate: float = FLYLORA_BIAS_UPDATE_RATE,
    seed: int = 0,
) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` that ``targets`` names in a ``FlyLoRALinear``, in place.

    ``targets`` follow ``moelab.lora.apply`` (PEFT's ``target_modules``: names matched as a dotted
    suffix, or one regex). ``rank``, ``top_k``, ``alpha``, ``bias_update_rate``: the layer's.
    ``seed``: one generator seeded with it builds every layer's ``A`` in module order, so two
    adapters applied with the same seed to the same model and targets share every ``A``.

    Returns the wrapped names in module order. Freezes every parameter of ``model`` (only the
    ``lora_B`` train) and remembers the flags. Refuses (``ValueError``) targets matching nothing
    or a module that is not an ``nn.Linear``, and a model that already has an adapter from
    ``moelab.lora``. On an error nothing is changed. ``remove_flylora`` undoes it.
    """
    check_model(model)
    if (
        _STATE in vars(model)
        or flylora_layers(model)
        or any(isinstance(m, RoutedLoRA) for m in model.modules())
    ):
        raise ValueError(
            f"model: this {type(model).__name__} already has LoRA adapter layers from moelab.lora; "
            "remove them first"
        )
    targets = check_targets(targets)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    found = find_linear_targets(model, targets)
    generator = torch.Generator().manual_seed(seed)
    layers, flags = swap_in(
        model,
        found,
        lambda name, module: FlyLoRALinear(
            module, rank, top_k, alpha=alpha, bias_update_rate=bias_update_rate, seed=generator
        ),
    )
    first = next(iter(layers.values()))
    config = {
        "method": "flylora",
        "targets": list(targets) if not isinstance(targets, str) else targets,
        "wrapped": list(layers),
        "rank": rank,
        "top_k": first.top_k,
        "alpha": first.alpha,
        "bias_update_rate": first.router.bias_update_rate,
        "seed": seed,
    }
    vars(model)[_STATE] = _FlyLoRAState(config=config, wrapped=list(layers), requires_grad=flags)
    return list(layers)


def remove_flylora(model: nn.Module) -> None:
    """Undo ``apply_flylora``: the original module objects back, every ``requires_grad`` flag
    restored; ``state_dict()`` equals the one before ``apply_flylora`` bit for bit
    (``moelab.lora.remove``, which undoes either method)."""
    if _STATE not in vars(check_model(model)):
        raise ValueError(f"model: this {type(model).__name__} has no FlyLoRA adapter from apply_flylora")
    remove(model)


# ---------------------------------------------------------------------------------- adapters and merging
def flylora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter of ``model`` (detached copies): ``{name}.lora_A [r, n]`` (frozen),
    ``{name}.lora_B [m, r]`` and ``{name}.expert_bias [r]`` for every FlyLoRA layer."""
    layers = flylora_layers(model)
    if not layers:
        raise ValueError(f"model: this {type(model).__name__} has no FlyLoRA layers")
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_A"] = layer.A.detach().clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().clone()
        state[f"{name}.expert_bias"] = layer.expert_bias.detach().clone()
    return state


def load_flylora_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (``flylora_state``'s keys, exactly) into ``model``'s FlyLoRA layers."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    layers = flylora_layers(model)
    if not layers:
        raise ValueError(f"model: this {type(model).__name__} has no FlyLoRA layers")
    targets = {}
    for name, layer in layers.items():
        targets[f"{name}.lora_A"] = layer.router.A
        targets[f"{name}.lora_B"] = layer.lora_B
        targets[f"{name}.expert_bias"] = layer.router.expert_bias
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(f"state: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, dest in targets.items():
        value = state[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(dest.shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"state[{key!r}] must be a tensor of shape {tuple(dest.shape)}, got {got}")
    with torch.no_grad():
        for key, dest in targets.items():
            dest.copy_(state[key])


def _check_adapters(adapters: object) -> list[Mapping[str, Tensor]]:
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError("adapters must be a non-empty list of adapter state dicts (name -> tensor)")
    for i, a in enumerate(adapters):
        if not isinstance(a, Mapping) or not a or not all(isinstance(v, Tensor) for v in a.values()):
            raise TypeError(f"adapters[{i}] must be a non-empty mapping of names to tensors")
    keys = set(adapters[0])
    for i, a in enumerate(adapters[1:], 1):
        if set(a) != keys:
            diff = sorted(keys.symmetric_difference(a))
            raise ValueError(f"adapters[{i}] has different keys from adapters[0]: {diff[:5]}")
        for k in keys:
            if a[k].shape != adapters[0][k].shape:
                raise ValueError(
                    f"adapters[{i}][{k!r}] has shape {tuple(a[k].shape)}, adapters[0] has "
                    f"{tuple(adapters[0][k].shape)}"
                )
    return list(adapters)


def merge_lora(adapters: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Merge plain LoRA adapters by averaging every tensor separately (``lora_A`` and ``lora_B``
    each averaged, not their products), as the FlyLoRA code's ``fast_lora_average`` does. Keys
    and shapes must agree. The mean is taken in fp32 and returned in each key's dtype."""
    adapters = _check_adapters(adapters)
    return {
        k: torch.stack([a[k].float() for a in adapters]).mean(0).to(adapters[0][k].dtype) for k in adapters[0]
    }


def merge_flylora(adapters: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Merge FlyLoRA adapters (``flylora_state``) by averaging: ``lora_B`` and ``expert_bias`` are
    averaged; ``lora_A`` is frozen and must be the same in every adapter (the same ``seed``), else
    a ``ValueError``: averaging different random ``A`` would not be FlyLoRA's merge. Averaging the
    bias is our choice (the code averages every adapter tensor; the bias only steers selection)."""
    adapters = _check_adapters(adapters)
    for k in adapters[0]:
        if k.endswith("lora_A"):
            for i, a in enumerate(adapters[1:], 1):
                if not torch.equal(a[k], adapters[0][k]):
                    raise ValueError(
                        f"adapters[{i}][{k!r}] differs from adapters[0]'s: FlyLoRA adapters merge only "
                        "when they share the frozen A (build them with the same seed)"
                    )
    merged = merge_lora(adapters)
    for k in merged:
        if k.endswith("lora_A"):  # shared and frozen: kept bit-exact, not re-averaged
            merged[k] = adapters[0][k].clone()
    return merged
