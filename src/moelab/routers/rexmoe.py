"""ReXMoE: each layer's router chooses among the experts of a group of adjacent layers.

Paper: *ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts* (2025); no official
code (PAPERS.md section 4, from third-party notes).

- **Expert reuse.** Routed layers are grouped ``r`` at a time (``group_size``: layers
  ``[0, r)``, ``[r, 2r)``, ...; a last short group is its own size). Layer ``l``'s router scores
  the union of its group's pools, ``W_r [(g E), d]`` for a group of ``g`` layers, and takes a
  softmax top-k over the ``g E`` candidates (renormalised, as Mixtral). Every layer still owns its
  ``E`` experts: only the router grows.
- **Progressive scaling routing (PSR).** Before the top-k, the logits of the candidates owned by
  other layers are masked to ``-inf``: only the local pool for the first ``psr_local_steps``
  optimizer steps, then a linearly growing number of other-layer candidates until
  ``psr_full_steps``, then all ``g E``.

The cross-layer wiring happens in ``link(position, layers)`` (called by ``MoELM``): the router
grows its gate to the group's ``g E`` rows (the local ``E`` rows keep their initialisation) and
installs on its layer a ``moelab.experts.union.UnionBank`` whose ids are ``[this layer's E experts,
then each other layer of the group in depth order]``. A router that is never linked (a lone
``moelab.MoE``) is plain softmax top-k over its own ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moelab.core.checks import positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.experts.union import UnionBank
from moelab.routers.topk import softmax_topk


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------- pure functions
def reuse_group(position: int, num_layers: int, group_size: int) -> range:
    """The positions of the routed layers whose experts layer ``position`` reuses.

    Groups are ``group_size`` consecutive routed layers, ``[0, r)``, ``[r, 2r)``, ...; the last
    group holds what is left (our choice: the paper groups layers evenly).
    """
    positive_int("num_layers", num_layers)
    positive_int("group_size", group_size)
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < num_layers:
        raise ValueError(f"position must be an int in [0, {num_layers}), got {position!r}")
    start = position // group_size * group_size
    return range(start, min(start + group_size, num_layers))


def psr_num_unmasked(
    step: int | Tensor, num_nonlocal: int, local_steps: int, full_steps: int
) -> int | Tensor:
    """How many non-local candidates PSR lets the router choose after ``step`` optimizer steps.

    ``0`` while ``step < local_steps``; ``num_nonlocal`` from ``full_steps`` on; in between the
    linear ramp ``floor(num_nonlocal * (step - local_steps) / (full_steps - local_steps))``.
    ``step`` may be a 0-d long tensor (the router's buffer): the result is then a tensor on its
    device, computed without a host sync.
    """
    _non_negative_int("num_nonlocal", num_nonlocal)
    _non_negative_int("local_steps", local_steps)
    _non_negative_int("full_steps", full_steps)
    if full_steps < local_steps:
        raise ValueError(f"full_steps ({full_steps}) must be >= local_steps ({local_steps})")
    ramp = full_steps - local_steps
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.is_floating_point():
            raise ValueError(
                f"step must be an int or a 0-d integer tensor, got {step.dtype} {tuple(step.shape)}"
            )
        if ramp == 0:
            return (step >= local_steps).long() * num_nonlocal
        return (step - local_steps).clamp(0, ramp) * num_nonlocal // ramp
    _non_negative_int("step", step)
    if ramp == 0:
        return num_nonlocal if step >= local_steps else 0
    return min(max(step - local_steps, 0), ramp) * num_nonlocal // ramp


def psr_unmask_rank(
    nonlocal_sizes: Sequence[int], distances: Sequence[int], num_local: int, seed: int
) -> Tensor:
    """``[C]`` long: the order in which PSR unmasks the candidates (``-1``: local, never masked).

    Candidates are laid out as the union bank's ids: ``num_local`` local ones, then each other
    layer's pool. Other layers unmask nearest first (``distances``: their distance in routed
    layers; ties keep the given order), and inside a layer in a fixed random order drawn from
    ``seed`` (our choice: the paper does not say which candidates come first).
    """
    if len(nonlocal_sizes) != len(distances):
        raise ValueError("nonlocal_sizes and distances must have one entry per other layer")
    gen = torch.Generator().manual_seed(int(seed))
    rank = [torch.full((num_local,), -1, dtype=torch.long)]
    base = [0] * len(nonlocal_sizes)
    total = 0
    for m in sorted(range(len(nonlocal_sizes)), key=lambda m: distances[m]):  # stable: ties in order
        base[m] = total
        total += nonlocal_sizes[m]
    for m, n in enumerate(nonlocal_sizes):
        rank.append(base[m] + torch.randperm(n, generator=gen))
    return torch.cat(rank)


def psr_allowed(unmask_rank_C: Tensor, num_unmasked: int | Tensor) -> Tensor:
    """``[C]`` bool: the candidates the router may choose (local ones and the first unmasked)."""
    return unmask_rank_C < num_unmasked


def masked_softmax_topk(
    logits_TC: Tensor, top_k: int, normalize: bool, allowed_C: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax top-k over the allowed candidates: the masked logits are ``-inf`` (PSR).

    Returns ``(probs [T, C], weight [T, k], index [T, k])`` as ``softmax_topk``; masked candidates
    have probability 0 and are never chosen. At least ``top_k`` must be allowed (the router's
    local pool always is; not checked here, which would cost a host sync per call).
    """
    if allowed_C is not None:
        logits_TC = logits_TC.masked_fill(~allowed_C, float("-inf"))
    return softmax_topk(logits_TC, top_k, normalize)


# --------------------------------------------------------------------------------- the router
@register_router(
    "rexmoe",
    paper="ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts (2025)",
    summary="softmax top-k over the experts of r adjacent layers (held by reference), "
    "with progressive scaling routing (PSR) unmasking other layers' experts during training",
)
class ReXMoERouter(Router):
    """ReXMoE's router (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``, this layer's own experts.
        top_k: experts per token; default 2 (``moelab.MoE`` passes its ``top_k``).
        group_size: ``r``, routed layers per reuse group; default 2 (PAPERS.md: r = 2-4 is
            best, r = 16-32 collapses). 1 is plain top-k.
        psr: mask other layers' candidates by the PSR schedule; False is plain reuse (every
            candidate from the first step). Default True (the paper's method).
        psr_local_steps: optimizer steps with only the local pool; default 50 (ours: 20% of a
            250-step run; the notes' example is 10k).
        psr_full_steps: the step from which every candidate is allowed (linear growth from
            ``psr_local_steps``); default 150 (ours: keeps the notes' 10k : 30k ratio).
        psr_seed: seed of the fixed order in which a layer's candidates are unmasked; default 0.
        normalize: renormalise the k gates to sum to 1; default (None) True for k > 1, as
            ``topk``.

    State: ``psr_step`` (a persistent buffer, so a resumed run continues the schedule exactly)
    counts optimizer steps; ``moelab.step_end(model)`` increments it. Training and evaluation
    both use the current schedule.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        group_size: int = 2,
        psr: bool = True,
        psr_local_steps: int = 50,
        psr_full_steps: int = 150,
        psr_seed: int = 0,
        normalize: bool | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.local_experts = self.num_experts  # E; num_experts becomes the candidates after link
        self.top_k = top_k_in_range(top_k, num_experts)
        self.group_size = positive_int("group_size", group_size)
        if not isinstance(psr, bool):
            raise TypeError(f"psr must be a bool, got {type(psr).__name__}")
        self.psr = psr
        self.psr_local_steps = _non_negative_int("psr_local_steps", psr_local_steps)
        self.psr_full_steps = _non_negative_int("psr_full_steps", psr_full_steps)
        if self.psr_full_steps < self.psr_local_steps:
            raise ValueError(
                f"psr_full_steps ({psr_full_steps}) must be >= psr_local_steps ({psr_local_steps})"
            )
        self.psr_seed = _non_negative_int("psr_seed", psr_seed)
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
        self.normalize = (top_k > 1) if normalize is None else normalize
        self._init_gate()
        self.register_buffer("psr_step", torch.zeros((), dtype=torch.long))
        # -1 for local candidates; derived from the group layout and psr_seed, so not saved
        self.register_buffer(
            "unmask_rank", torch.full((num_experts,), -1, dtype=torch.long), persistent=False
        )
        self.group: range = range(0, 1)  # positions of the linked group (set by link)

    # -- cross-layer wiring --------------------------------------------------------------------
    def link(self, position: int, layers: Sequence[nn.Module]) -> None:
        """Take the group's experts: grow the gate to ``g E`` rows and install a ``UnionBank``
        (a group of one layer changes nothing).

        ``layers[position]`` must be this router's layer (it needs ``experts``); the group's
        other layers lend their banks by reference. Linking again rebuilds the union and keeps
        the gate when its size is unchanged.
        """
        layers = list(layers)
        group = reuse_group(position, len(layers), self.group_size)
        own = layers[position]
        if getattr(own, "router", None) is not self:
            raise ValueError(f"layers[{position}] is not this router's layer (its router is another module)")
        own_bank = _physical_bank(own, position)
        if own_bank.num_experts != self.local_experts:
            raise ValueError(
                f"layer {position} has {own_bank.num_experts} experts, this router was built for {self.local_experts}"
            )
        others = [j for j in group if j != position]  # depth order
        banks = [_physical_bank(layers[j], j) for j in others]
        # A group of one keeps its own bank as it is (same state_dict keys, every executor).
        bank = UnionBank(own_bank, banks) if banks else own_bank
        self._grow_gate(bank.num_experts)
        self.num_experts = bank.num_experts
        self.group = group
        rank = psr_unmask_rank(
            [b.num_experts for b in banks],
            [abs(j - position) for j in others],
            self.local_experts,
            self.psr_seed * 100_003 + position,  # a different fixed order per layer (ours)
        )
        self.unmask_rank = rank.to(self.weight.device)
        own.experts = bank
        if hasattr(own, "num_experts"):
            own.num_experts = bank.num_experts

    def _grow_gate(self, rows: int) -> None:
        old = self.weight
        if old.shape[0] == rows:
            return
        keep = min(old.shape[0], rows)  # the local rows come first and are kept
        new = torch.empty(rows - keep, self.d_model, device=old.device, dtype=old.dtype)
        # The same init as the local rows (nn.Linear's default), drawn from the global RNG after
        # the model's own initialisation, so every other weight is as in a top-k model.
        nn.init.kaiming_uniform_(new, a=5**0.5)
        self.weight = nn.Parameter(torch.cat([old.detach()[:keep], new], 0), requires_grad=old.requires_grad)

    # -- PSR ------------------------------------------------------------------------------------
    @property
    def num_nonlocal(self) -> int:
        """Candidates owned by other layers (``(g - 1) E`` in a full group)."""
        return self.num_experts - self.local_experts

    def num_unmasked(self) -> int:
        """Non-local candidates the schedule allows at the current ``psr_step``."""
        if not self.psr:
            return self.num_nonlocal
        return int(
            psr_num_unmasked(self.psr_step, self.num_nonlocal, self.psr_local_steps, self.psr_full_steps)
        )

    def allowed_candidates(self) -> Tensor | None:
        """``[C]`` bool mask of the candidates the router may choose now; None without a mask
        (PSR off, or no other layer's experts). Built on the buffers' device, without a sync."""
        if not self.psr or self.num_nonlocal == 0:
            return None
        n = psr_num_unmasked(self.psr_step, self.num_nonlocal, self.psr_local_steps, self.psr_full_steps)
        return psr_allowed(self.unmask_rank, n)

    def step_end(self) -> None:
        with torch.no_grad():
            self.psr_step += 1

    # -- routing --------------------------------------------------------------------------------
    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)  # [T, C], unmasked (z-loss and logit stats see all)
        probs, weight, index = masked_softmax_topk(
            logits, self.top_k, self.normalize, self.allowed_candidates()
        )
        return Routing.from_topk(index, weight, self.num_experts, logits=logits, probs=probs, validate=False)

    def extra_repr(self) -> str:
        psr = (
            f"psr=steps {self.psr_local_steps}->{self.psr_full_steps} (at {int(self.psr_step)})"
            if self.psr
            else "psr=False"
        )
        return (
            f"d_model={self.d_model}, local_experts={self.local_experts}, candidates={self.num_experts}, "
            f"top_k={self.top_k}, group_size={self.group_size}, {psr}"
        )


def _physical_bank(layer: nn.Module, position: int) -> nn.Module:
    """The bank ``layer`` owns: its ``experts``, or the local member of a union already installed."""
    bank = getattr(layer, "experts", None)
    if isinstance(bank, UnionBank):
        bank = bank.local
    if not isinstance(bank, nn.Module) or not hasattr(bank, "forward_sorted"):
        raise ValueError(
            f"routed layer {position} ({type(layer).__name__}) has no expert bank to reuse; "
            "ReXMoE groups layers with an 'experts' bank (moelab.MoE)"
        )
    return bank
