"""Glider: a local router of PHATGOOSE gate vectors plus a global bias from instruction embeddings.

Paper: Li et al., *Glider: Global and Local Instruction-Driven Expert Router* (2024); official code
UNITES-Lab/glider, ``src/peft/tuners/molora/{layers,model}.py`` (``MoLoRALinearLayer.forward``,
``MoLoRAModel.update_routing_bias``), ``src/finetune_gate.py`` and ``src/scripts/paper-eval.sh``,
which this module follows. The local router is PHATGOOSE's (Muqeeth et al., *Learning to Route
Among Specialized Experts for Zero-Shot Generalization*, ICML 2024), whose code Glider reuses.

For a wrapped projection with input ``h [d]``, ``E`` LoRA experts (one per held-in task) with gate
vectors ``v_e [d]``, task-instruction embeddings ``t_e [m]`` and the query's instruction embedding
``q [m]``::

    LN(x)      = (x - mean(x)) / sqrt(var(x) + 1e-5)        LayerNorm without affine (code)
    local_e    = LN(h) . LN(v_e) * sqrt(1 / d)               PHATGOOSE's standardised gate
    global_e   = cos(t_e, q)                                 one value per sequence and expert
    logits_e   = local_e + scale * global_e
    p          = softmax(logits);  S = top-k(p);  w_e = p_e / (sum_{S} p + 1e-6) for e in S
    y          = W0 h + sum_{e in S} w_e * scaling * B_e A_e h

Defaults: ``top_k = 2`` and ``scale = 100`` (T0 held-in; 1000 for T0 held-out, 3 for FLAN), from
``paper-eval.sh``; ``scale = 0`` (or no query) is PHATGOOSE's routing.

PHATGOOSE stage 1, which builds each task's expert and gate vector (``finetune.py``, then
``finetune_gate.py``, ``TuningStrategy.LAST_EXPERT_LORA`` / ``LAST_EXPERT_GATE``), base frozen:

1. ``phase "lora"``: the task's LoRA alone, ungated (``y = W0 h + scaling B A h``);
2. ``phase "gate"``: the LoRA frozen, a gate vector ``v`` from zero (``reset_gates_to_zero``)
   trained alone: ``y = W0 h + sigmoid(v . h) * scaling B A h`` (``v . h`` on the raw ``h``:
   the code's ``gate_only_last_expert`` path; the LayerNorms are for routing only).

Here both are a ``RoutedLoRA`` of one expert whose router is a ``GliderRouter`` with
``gating="none"`` / ``"sigmoid"`` (``apply_phatgoose``, ``phatgoose_phase``, ``task_expert``);
``assemble`` stacks ``E`` such experts and gate vectors into one Glider mixture (router
``gating="topk"``). The query embedding is per sequence and reaches the routers through
``queries(model, query_emb_BM)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.lora.apply import apply, mixture_layers
from moelab.lora.presets import MIXTURE_PRESETS, MixturePreset

GLIDER_TOP_K = 2  # paper-eval.sh: moe_top_k=2
GLIDER_SCALE_HELD_IN = 100.0  # paper-eval.sh: T0 held-in (and T0-BBH), bias_routing_scale=100
GLIDER_SCALE_HELD_OUT = 1000.0  # paper-eval.sh: T0 held-out
GLIDER_SCALE_FLAN = 3.0  # paper-eval.sh: FLAN-BBH / FLAN-BBL
MINILM_DIM = 384  # all-MiniLM-L6-v2's embedding width (the paper uses nomic-embed; ours MiniLM)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, the code's router_input_layer_norm
RENORM_EPS = 1e-6  # the code's top-k renormalisation: w / (sum + 1e-6)
# PHATGOOSE's LoRA as Glider's code configures it (utils/config.py): rank 16, lora_alpha 1 (the
# scaling 1/r of PHATGOOSE's own LoRA).
PHATGOOSE_RANK = 16
PHATGOOSE_ALPHA = 1.0
GATINGS = ("topk", "sigmoid", "none")
PHASES = ("lora", "gate")


# ---------------------------------------------------------------------------------- pure math
def glider_local_logits(x_TD: Tensor, gates_ED: Tensor, eps: float = LAYER_NORM_EPS) -> Tensor:
    """``[T, E]`` fp32: PHATGOOSE's local router logits ``LN(x_t) . LN(v_e) * sqrt(1 / d)``.

    ``LN`` is a LayerNorm without affine parameters (standardise over ``d``, biased variance,
    ``eps`` inside the square root), applied to every token ``x [T, d]`` and to every gate vector
    ``v [E, d]`` (Glider's ``router_input_layer_norm`` and ``apply_layer_norm_to_gate``).
    """
    if x_TD.dim() != 2 or gates_ED.dim() != 2 or x_TD.shape[1] != gates_ED.shape[1]:
        raise ValueError(
            f"x must be [T, d] and gates [E, d] with the same d, got {tuple(x_TD.shape)} and {tuple(gates_ED.shape)}"
        )
    d = x_TD.shape[1]
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        x_TD = F.layer_norm(x_TD.float(), (d,), eps=eps)
        v_ED = F.layer_norm(gates_ED.float(), (d,), eps=eps)
        return (x_TD @ v_ED.T) * math.sqrt(1.0 / d)


def glider_global_bias(task_emb_EM: Tensor, query_emb_BM: Tensor) -> Tensor:
    """``[B, E]`` fp32: ``cos(t_e, q_b)``, the cosine between each expert's task-instruction
    embedding ``t [E, m]`` and each sequence's query-instruction embedding ``q [B, m]``
    (``torch.nn.functional.cosine_similarity``, eps 1e-8: the code's ``update_routing_bias``)."""
    if task_emb_EM.dim() != 2 or query_emb_BM.dim() != 2 or task_emb_EM.shape[1] != query_emb_BM.shape[1]:
        raise ValueError(
            f"task embeddings must be [E, m] and query embeddings [B, m] with the same m, got "
            f"{tuple(task_emb_EM.shape)} and {tuple(query_emb_BM.shape)}"
        )
    return F.cosine_similarity(query_emb_BM.float()[:, None, :], task_emb_EM.float()[None, :, :], dim=-1)


def glider_routing(
    local_logits_TE: Tensor, global_bias_TE: Tensor | None, scale: float, top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Glider's combined routing. Returns ``(logits [T, E], probs [T, E], weight [T, k], index [T, k])``.

    ``logits = local + scale * global`` (just ``local`` when ``global_bias`` is None), ``probs =
    softmax(logits)`` in fp32, the ``top_k`` most probable experts, their probabilities divided by
    ``their sum + 1e-6`` (the code's renormalisation).
    """
    logits = local_logits_TE.float()
    if global_bias_TE is not None:
        if global_bias_TE.shape != local_logits_TE.shape:
            raise ValueError(
                f"global bias must match the local logits [T, E] = {tuple(local_logits_TE.shape)}, got "
                f"{tuple(global_bias_TE.shape)}"
            )
        logits = logits + scale * global_bias_TE.float()
    probs = torch.softmax(logits, dim=-1)
    weight, index = torch.topk(probs, top_k_in_range(top_k, probs.shape[1]), dim=-1)
    return logits, probs, weight / (weight.sum(-1, keepdim=True) + RENORM_EPS), index


def phatgoose_gate(x_TD: Tensor, gates_ED: Tensor) -> tuple[Tensor, Tensor]:
    """PHATGOOSE's stage-1 gate: ``(logits [T, E] = x . v_e, gates [T, E] = sigmoid(x . v_e))`` in
    fp32, on the raw input (no LayerNorm: the code's ``gate_only_last_expert`` path)."""
    if x_TD.dim() != 2 or gates_ED.dim() != 2 or x_TD.shape[1] != gates_ED.shape[1]:
        raise ValueError(
            f"x must be [T, d] and gates [E, d] with the same d, got {tuple(x_TD.shape)} and {tuple(gates_ED.shape)}"
        )
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        logits = x_TD.float() @ gates_ED.float().T
    return logits, torch.sigmoid(logits)


def per_token(per_sequence_BE: Tensor, batch_shape: tuple[int, int] | None, num_tokens: int) -> Tensor:
    """``[T, E]``: a per-sequence ``[B, E]`` value repeated over each sequence's tokens.

    ``batch_shape`` is the layer input's ``(B, S)`` (``RoutingContext.batch_shape``); a flat input
    (None) is one sequence, so ``B`` must be 1. A ``ValueError`` when ``B`` does not match."""
    b = per_sequence_BE.shape[0]
    if batch_shape is None:
        if b != 1:
            raise ValueError(
                f"query embeddings: {b} sequences given, but the layer input is a flat [T, d] (one "
                "sequence); feed the model [B, S, ...] inputs or give one query embedding [1, m]"
            )
        return per_sequence_BE.expand(num_tokens, -1)
    if batch_shape[0] != b or batch_shape[0] * batch_shape[1] != num_tokens:
        raise ValueError(
            f"query embeddings: {b} sequences given, but the layer input has batch shape {batch_shape} "
            f"({num_tokens} tokens); give one query embedding per sequence, [B={batch_shape[0]}, m]"
        )
    return per_sequence_BE.repeat_interleave(batch_shape[1], dim=0)


# ---------------------------------------------------------------------------------- the router
@register_router(
    "glider",
    paper="Glider (Li et al. 2024), code UNITES-Lab/glider src/peft/tuners/molora; PHATGOOSE (Muqeeth et al. 2024)",
    summary="softmax top-k of LN(h).LN(v_e)/sqrt(d) (PHATGOOSE gate vectors) + scale * cos(task "
    "instruction emb_e, query emb); sigmoid(v.h) gate for PHATGOOSE stage 1",
)
class GliderRouter(Router):
    """Glider's router over ``E`` task experts (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts per token; default 2 (paper-eval.sh).
        scale: the global bias's scale; default 100 (held-in; 1000 held-out, 3 FLAN); 0 is PHATGOOSE.
        embedding_dim: ``m``, the width of the instruction embeddings; default 384 (MiniLM, ours).
        gating: ``"topk"`` (the Glider mixture), ``"sigmoid"`` (PHATGOOSE stage 1's gate training:
            every expert, weight ``sigmoid(v_e . h)``) or ``"none"`` (every expert, weight 1:
            stage 1's LoRA training).

    State: ``weight [E, d]``, the gate vectors ``v_e`` (raw: the LayerNorm is applied in the
    forward; zero-initialised for the stage-1 gatings, as the code's ``reset_gates_to_zero``,
    ``nn.Linear``'s init otherwise); the buffer ``task_embeddings [E, m]`` (zeros until set: a
    zero embedding has cosine 0 with every query); ``query_embeddings``, ``[B, m]`` or None, set by
    ``queries(model, ...)`` for the next forwards (not saved). Without a query, or with
    ``scale = 0``, the routing is the local router alone.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = GLIDER_TOP_K,
        *,
        scale: float = GLIDER_SCALE_HELD_IN,
        embedding_dim: int = MINILM_DIM,
        gating: str = "topk",
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.scale = check_scale(scale)
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an int >= 1, got {embedding_dim!r}")
        self.gating = check_gating(gating)
        self._init_gate(bias=False)
        if self.gating != "topk":
            nn.init.zeros_(self.weight)
        self.register_buffer("task_embeddings", torch.zeros(num_experts, embedding_dim))
        self.query_embeddings: Tensor | None = None

    @property
    def embedding_dim(self) -> int:
        return int(self.task_embeddings.shape[1])

    def set_task_embeddings(self, task_emb_EM: Tensor) -> None:
        """Copy ``[E, m]`` task-instruction embeddings into the buffer (a ``ValueError`` on a wrong shape)."""
        if not isinstance(task_emb_EM, Tensor) or tuple(task_emb_EM.shape) != tuple(
            self.task_embeddings.shape
        ):
            got = tuple(task_emb_EM.shape) if isinstance(task_emb_EM, Tensor) else type(task_emb_EM).__name__
            raise ValueError(
                f"task embeddings must be [E, m] = {tuple(self.task_embeddings.shape)}, got {got}"
            )
        with torch.no_grad():
            self.task_embeddings.copy_(task_emb_EM.to(self.task_embeddings))

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        num_tokens, e = x_TD.shape[0], self.num_experts
        if self.gating != "topk":
            if self.gating == "sigmoid":
                logits, weight_TE = phatgoose_gate(x_TD, self.weight)
            else:
                logits = x_TD.new_zeros(num_tokens, e, dtype=torch.float32)
                weight_TE = torch.ones_like(logits)
            index = torch.arange(e, device=x_TD.device).expand(num_tokens, e)
            return Routing.from_topk(index, weight_TE, e, logits=logits, probs=weight_TE, validate=False)
        local = glider_local_logits(x_TD, self.weight)
        bias = None
        if self.query_embeddings is not None and self.scale != 0.0:
            bias_BE = glider_global_bias(
                self.task_embeddings, self.query_embeddings.to(self.task_embeddings.device)
            )
            bias = per_token(bias_BE, ctx.batch_shape, num_tokens)
        logits, probs, weight, index = glider_routing(local, bias, self.scale, self.top_k)
        return Routing.from_topk(index, weight, e, logits=logits, probs=probs, validate=False)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, scale={self.scale:g}, "
            f"embedding_dim={self.embedding_dim}, gating={self.gating!r}"
        )


def check_scale(scale: object) -> float:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def check_gating(gating: object) -> str:
    if gating not in GATINGS:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    return str(gating)


def glider_routers(model: nn.Module) -> dict[str, GliderRouter]:
    """``{qualified name: GliderRouter}`` of ``model`` (itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, GliderRouter)}


def _require_routers(model: nn.Module, what: str) -> dict[str, GliderRouter]:
    routers = glider_routers(model)
    if not routers:
        raise ValueError(
            f"{what}: this {type(model).__name__} has no Glider router (moelab.lora.apply(..., method='glider'), "
            "apply_phatgoose or assemble)"
        )
    return routers


@contextmanager
def queries(model: nn.Module, query_emb_BM: Tensor | None) -> Iterator[dict[str, GliderRouter]]:
    """Route ``model``'s next forwards with per-sequence query-instruction embeddings ``[B, m]``
    (one row per sequence of the batch; ``[1, m]`` or ``[m]`` for a flat ``[T, d]`` input or a
    single sequence), or None for the local router alone. Sets them on every ``GliderRouter``;
    the previous ones come back on exit. Yields the routers by name."""
    routers = _require_routers(model, "queries")
    if query_emb_BM is not None:
        if not isinstance(query_emb_BM, Tensor) or not query_emb_BM.is_floating_point():
            raise TypeError(f"query_emb_BM must be a float tensor [B, m] or None, got {query_emb_BM!r:.60}")
        if query_emb_BM.dim() == 1:
            query_emb_BM = query_emb_BM[None]
        m = {r.embedding_dim for r in routers.values()}
        if query_emb_BM.dim() != 2 or query_emb_BM.shape[0] < 1 or {query_emb_BM.shape[1]} != m:
            raise ValueError(
                f"query_emb_BM must be [B, m] with m = {sorted(m)} (the task embeddings' width), got "
                f"{tuple(query_emb_BM.shape)}"
            )
        query_emb_BM = query_emb_BM.detach()
    before = {name: r.query_embeddings for name, r in routers.items()}
    for r in routers.values():
        r.query_embeddings = query_emb_BM
    try:
        yield routers
    finally:
        for name, r in routers.items():
            r.query_embeddings = before[name]


# ---------------------------------------------------------------------------------- the preset
GLIDER_PRESET = MixturePreset(
    name="glider",
    paper="Glider (Li et al. 2024, arXiv 2410.07172); code UNITES-Lab/glider src/peft/tuners/molora, "
    "src/scripts/paper-eval.sh; local router from PHATGOOSE (Muqeeth et al., ICML 2024)",
    summary="per-task LoRA experts with PHATGOOSE gate vectors (stage 1), routed by softmax top-2 of "
    "LN(h).LN(v)/sqrt(d) + 100 * cos(task instruction, query instruction) (MiniLM embeddings)",
    router="glider",
    top_k=GLIDER_TOP_K,
    router_kwargs={"scale": GLIDER_SCALE_HELD_IN},
)
# A hook into the shared preset table (presets.py is not ours to edit), as remix.py does.
MIXTURE_PRESETS.setdefault("glider", GLIDER_PRESET)
registry.register("lora", "glider", paper=GLIDER_PRESET.paper, summary=GLIDER_PRESET.summary)(
    MIXTURE_PRESETS["glider"]
)


# ---------------------------------------------------------------------------------- PHATGOOSE stage 1
def apply_phatgoose(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    rank: int = PHATGOOSE_RANK,
    alpha: float = PHATGOOSE_ALPHA,
    dropout: float = 0.0,
) -> list[str]:
    """Put one task's PHATGOOSE adapter on ``model``: on every projection ``targets`` names, a
    ``RoutedLoRA`` of one LoRA expert (``rank``, ``alpha``; defaults 16 and 1, Glider's config)
    whose ``GliderRouter`` holds the gate vector (zeros). Starts in phase ``"lora"``
    (``phatgoose_phase``). ``moelab.lora.remove`` takes it off. Returns the wrapped names."""
    names = apply(
        model,
        targets,
        num_experts=1,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        router="glider",
        top_k=1,
        router_kwargs={"scale": 0.0, "gating": "none"},
        aux_losses={},
    )
    phatgoose_phase(model, "lora")
    return names


def phatgoose_phase(model: nn.Module, phase: str) -> list[nn.Parameter]:
    """Switch a ``apply_phatgoose`` model to stage 1's ``phase`` and return the parameters it trains.

    - ``"lora"``: the expert ungated (router ``gating="none"``); ``lora_A`` / ``lora_B`` train.
    - ``"gate"``: the gate vector reset to zero (the code's ``reset_gates_to_zero``) and gating
      ``sigmoid(v . h)``; only the gate vector trains, the LoRA is frozen.

    The base stays frozen in both."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    layers = mixture_layers(model)
    routers = [layer.router for layer in layers.values() if isinstance(layer.router, GliderRouter)]
    if not routers or len(routers) != len(layers) or any(layer.num_experts != 1 for layer in layers.values()):
        raise ValueError(
            f"model: this {type(model).__name__} has no PHATGOOSE adapter (one-expert mixtures with a Glider "
            "router: moelab.lora.glider.apply_phatgoose)"
        )
    trained: list[nn.Parameter] = []
    for layer in layers.values():
        router = layer.router
        bank = layer.bank.parameters()
        if phase == "lora":
            router.gating = "none"
            router.weight.requires_grad_(False)
            for p in bank:
                p.requires_grad_(True)
                trained.append(p)
        else:
            router.gating = "sigmoid"
            with torch.no_grad():
                router.weight.zero_()
            router.weight.requires_grad_(True)
            trained.append(router.weight)
            for p in bank:
                p.requires_grad_(False)
    return trained


@dataclass
class TaskExpert:
    """One task's PHATGOOSE expert, by wrapped module name: ``lora_A [r, d_in]``, ``lora_B
    [d_out, r]``, ``gate [d_in]`` (the trained gate vector), and the LoRA's ``alpha``."""

    lora_A: dict[str, Tensor]
    lora_B: dict[str, Tensor]
    gate: dict[str, Tensor]
    alpha: float

    @property
    def rank(self) -> int:
        return int(next(iter(self.lora_A.values())).shape[0])


def task_expert(model: nn.Module) -> TaskExpert:
    """The expert and gate vector of a ``apply_phatgoose`` model (detached copies)."""
    layers = mixture_layers(model)
    if not layers or any(
        layer.num_experts != 1 or not isinstance(layer.router, GliderRouter) for layer in layers.values()
    ):
        raise ValueError(
            f"model: this {type(model).__name__} has no PHATGOOSE adapter (moelab.lora.glider.apply_phatgoose)"
        )
    alphas = {layer.bank.alpha for layer in layers.values()}
    if len(alphas) != 1:
        raise ValueError(f"model: its adapters have different alphas {sorted(alphas)}")
    return TaskExpert(
        lora_A={n: layer.bank.lora_A[0].detach().clone() for n, layer in layers.items()},
        lora_B={n: layer.bank.lora_B[0].detach().clone() for n, layer in layers.items()},
        gate={n: layer.router.weight[0].detach().clone() for n, layer in layers.items()},
        alpha=float(alphas.pop()),
    )


def assemble(
    model: nn.Module,
    experts: Sequence[TaskExpert],
    task_embeddings: Tensor | None = None,
    *,
    scale: float = GLIDER_SCALE_HELD_IN,
    top_k: int = GLIDER_TOP_K,
) -> list[str]:
    """Build a Glider mixture on ``model`` (the base the experts were trained on, without adapters)
    from ``E`` task experts: ``moelab.lora.apply(..., method="glider")`` on the experts' modules,
    expert ``e``'s ``lora_A`` / ``lora_B`` copied to ``bank.lora_A[e]`` / ``lora_B[e]`` and its gate
    vector to ``router.weight[e]`` of every layer, ``task_embeddings [E, m]`` into every router
    (None: zeros of width 384, the local router alone). Returns the wrapped module names.
    """
    experts = list(experts)
    if not experts or not all(isinstance(x, TaskExpert) for x in experts):
        raise TypeError("experts must be a non-empty sequence of TaskExpert (moelab.lora.glider.task_expert)")
    names = list(experts[0].lora_A)
    for i, x in enumerate(experts):
        if list(x.lora_A) != names or list(x.lora_B) != names or list(x.gate) != names:
            raise ValueError(
                f"experts[{i}] adapts other modules than experts[0]: {sorted(x.lora_A)} vs {sorted(names)}"
            )
        if x.rank != experts[0].rank or x.alpha != experts[0].alpha:
            raise ValueError(
                f"experts[{i}] has rank {x.rank}, alpha {x.alpha}; experts[0] rank {experts[0].rank}, "
                f"alpha {experts[0].alpha}: a bank holds one rank and scaling"
            )
    e = len(experts)
    if task_embeddings is None:
        task_embeddings = torch.zeros(e, MINILM_DIM)
    if not isinstance(task_embeddings, Tensor) or task_embeddings.dim() != 2 or task_embeddings.shape[0] != e:
        got = (
            tuple(task_embeddings.shape)
            if isinstance(task_embeddings, Tensor)
            else type(task_embeddings).__name__
        )
        raise ValueError(f"task_embeddings must be [E={e}, m], got {got}")
    wrapped = apply(
        model,
        names,
        method="glider",
        num_experts=e,
        rank=experts[0].rank,
        alpha=experts[0].alpha,
        top_k=top_k,
        router_kwargs={"scale": check_scale(scale), "embedding_dim": int(task_embeddings.shape[1])},
    )
    layers = mixture_layers(model)
    with torch.no_grad():
        for name in wrapped:
            layer = layers[name]
            for i, x in enumerate(experts):
                layer.bank.lora_A[i].copy_(x.lora_A[name])
                layer.bank.lora_B[i].copy_(x.lora_B[name])
                layer.router.weight[i].copy_(x.gate[name])
            layer.router.set_task_embeddings(task_embeddings)
    return wrapped
