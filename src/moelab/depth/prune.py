"""FTP, fine-grained token-wise pruning (Li et al. 2024, *FTP: A Fine-grained Token-wise Pruner for
Large Language Models via Token Routing*, arXiv 2412.11494): tokens skip whole blocks.

In each prunable block some tokens of every sequence *skip the block*: their hidden state passes
through unchanged (the residual), they are neither queries nor keys of its attention, and the
kept tokens run the block among themselves at their true positions (RoPE and causal masking by
position, through the per-sequence gather of ``moelab.depth.gather``). Which tokens skip is
decided by **one global router shared by every prunable block**, a 2-layer MLP (hidden 64, paper)
on four low-dimensional features per token (paper; normalisations ours):

1. **position**: ``p / (max_seq_len - 1)``;
2. **attention received**: from the *previous* block's attention, recomputed on that block's
   input with an explicit ``softmax(q k^T / sqrt(d_h))`` (``block_attention_received``): for key
   ``j``, the mean over heads and over the queries ``i >= j`` that see it of ``n_i P[i, j]``,
   ``n_i`` the keys query ``i`` sees (``attention_received``: 1 for every token under uniform
   attention, so early tokens are not favoured by the causal triangle); the router reads its log;
3. **rank** of that score within the sequence, ``0`` (lowest) ... ``1`` (highest);
4. the block's **target sparsity** ``s_l``.

Per sequence, the ``k = ceil((1 - s_l) S)`` tokens with the highest router logits run the block
(``selection="topk"``, default); ``selection="threshold"`` keeps the tokens whose keep
probability ``sigmoid(z) > 0.5`` instead (a count per sequence; ragged gather).

The pipeline (paper): (1) a genetic search for the per-block sparsities ``s_l`` (mean = the
target) with the *static* router (tokens ranked by the attention they receive),
``search_sparsity_schedule``; (2) train the router, base model frozen, with a guide loss (imitate
the static router), a sparsity-constraint loss and a distillation loss to the dense model
(formulas not published: ours, ``ftp_guide_loss``, ``ftp_sparsity_loss``,
``ftp_distillation_loss``); (3) fine-tune the schedule (the same search, with the trained router).
During training the hard keep mask ``h`` carries a straight-through gradient:
``x + (h + sigma(z) - sg(sigma(z))) * (block(x) - x)``, where ``block(x)`` is the kept-subset
run for kept tokens and a dense no-grad run for skipped ones (forward: exactly the pruned model).

``scorer="hidden_state"``: the baseline router of the paper's ablation, the same MLP on the hidden
state (RMS-normalised, and the block's sparsity) instead of the four features;
``scorer="attention"``: the static router itself (no parameters used).

Pure functions first (shapes in names: ``B`` batch, ``S`` sequence, ``H`` heads), then
``FTPRouter`` and its helpers (``attach_ftp``, ``ftp_loss_fn``, ``pruned_val_loss``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int
from moelab.core.context import RoutingContext
from moelab.core.flops import uncounted
from moelab.depth.base import DepthRouter, run_blocks
from moelab.depth.gather import (
    capacity_count,
    compute_routing,
    gather_tokens,
    gathered_context,
    positions_of,
    ragged_index,
    routing_selection,
    scatter_update,
    topk_per_sequence,
)
from moelab.models.blocks import Rope, apply_rope, block_cache

SCORERS = ("features", "hidden_state", "attention")
SELECTIONS = ("topk", "threshold")
NUM_FEATURES = 4  # position, attention received, its rank, the block's sparsity (paper)
ROUTER_HIDDEN = 64  # paper: a 2-layer MLP with 64 hidden units


# -- features ---------------------------------------------------------------------------------------
def causal_attention_probs(q_BHSE: Tensor, k_BHSE: Tensor, positions_BS: Tensor) -> tuple[Tensor, Tensor]:
    """Explicit causal attention probabilities ``softmax(q k^T / sqrt(E))`` in fp32.

    Query ``i`` sees key ``j`` iff ``positions[j] <= positions[i]`` (positions increase along
    each row). Returns ``(probs [B, H, S, S], mask [B, S, S] bool)``."""
    if q_BHSE.dim() != 4 or q_BHSE.shape != k_BHSE.shape:
        raise ValueError(
            f"q and k must both be [B, H, S, E], got {tuple(q_BHSE.shape)} and {tuple(k_BHSE.shape)}"
        )
    b, _, s, e = q_BHSE.shape
    if positions_BS.shape != (b, s):
        raise ValueError(f"positions must be [B, S] = [{b}, {s}], got {tuple(positions_BS.shape)}")
    scores = (q_BHSE.float() @ k_BHSE.float().transpose(-1, -2)) / math.sqrt(e)
    mask = positions_BS[:, None, :] <= positions_BS[:, :, None]  # [B, query, key]
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)
    return probs, mask


def attention_received(probs_BHSS: Tensor, mask_BSS: Tensor) -> Tensor:
    """``[B, S]``: the attention each key receives, normalised for the causal triangle (our choice).

    ``r_j = mean_h  (1 / m_j) sum_{i: mask[i, j]} n_i P_h[i, j]`` with ``n_i`` the keys query
    ``i`` sees and ``m_j`` the queries that see key ``j``: the mean over the queries that can
    attend ``j`` of its probability relative to uniform attention. Uniform attention gives 1
    everywhere; a plain column sum would favour early tokens, which more queries see."""
    if probs_BHSS.dim() != 4 or mask_BSS.shape != (probs_BHSS.shape[0], *probs_BHSS.shape[2:]):
        raise ValueError(
            f"probs must be [B, H, S, S] and mask [B, S, S], got {tuple(probs_BHSS.shape)} and {tuple(mask_BSS.shape)}"
        )
    m = mask_BSS.to(probs_BHSS.dtype)
    keys_per_query = m.sum(dim=2, keepdim=True)  # n_i: [B, S, 1]
    queries_per_key = m.sum(dim=1).clamp(min=1)  # m_j: [B, S]
    weighted = probs_BHSS.mean(dim=1) * m * keys_per_query
    return weighted.sum(dim=1) / queries_per_key


@torch.no_grad()
def block_attention_received(block: nn.Module, x_BSD: Tensor, rope: Rope, positions_BS: Tensor) -> Tensor:
    """``[B, S]``: ``attention_received`` of ``block``'s attention recomputed on its input ``x``
    (every token, at ``positions``): its norm, the q and k rows of its qkv projection, RoPE, an
    explicit softmax. No gradient (a routing feature)."""
    attn = block.attn
    b, s, d = x_BSD.shape
    h = block.attn_norm(x_BSD)
    bias = attn.qkv.bias[: 2 * d] if attn.qkv.bias is not None else None
    qk = F.linear(h, attn.qkv.weight[: 2 * d], bias)  # qkv's rows are q, then k, then v
    q, k = qk.view(b, s, 2, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    cos, sin = rope
    pc, ps = cos[positions_BS][:, None], sin[positions_BS][:, None]
    q, k = apply_rope(q, pc, ps), apply_rope(k, pc, ps)
    probs, mask = causal_attention_probs(q, k, positions_BS)
    return attention_received(probs, mask)


def rank_in_sequence(scores_BS: Tensor) -> Tensor:
    """``[B, S]`` float: each score's rank within its row, ``0`` for the lowest, ``1`` for the
    highest (``rank / (S - 1)``; ties broken by position, earlier lower; 0 when ``S = 1``)."""
    if scores_BS.dim() != 2:
        raise ValueError(f"scores must be [B, S], got {tuple(scores_BS.shape)}")
    b, s = scores_BS.shape
    order = scores_BS.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s, device=scores_BS.device).expand(b, s))
    return ranks.float() / max(s - 1, 1)


def ftp_features(received_BS: Tensor, positions_BS: Tensor, sparsity: float, max_seq_len: int) -> Tensor:
    """``[B, S, 4]``: FTP's router input (module docstring): ``position / (max_seq_len - 1)``,
    ``log`` of the attention received (0 = uniform; clamped at 1e-6), its rank in the sequence,
    and the block's target sparsity."""
    if received_BS.shape != positions_BS.shape or received_BS.dim() != 2:
        raise ValueError(
            f"received and positions must both be [B, S], got {tuple(received_BS.shape)} and {tuple(positions_BS.shape)}"
        )
    pos = positions_BS.float() / max(max_seq_len - 1, 1)
    score = received_BS.float().clamp(min=1e-6).log()
    rank = rank_in_sequence(received_BS.float())
    sp = torch.full_like(pos, float(sparsity))
    return torch.stack((pos, score, rank, sp), dim=-1)


def keep_count(sparsity: float, seq_len: int) -> int:
    """Tokens of a sequence of ``seq_len`` that run a block of target sparsity ``sparsity``:
    ``ceil((1 - s) S)``, at least 1 (``moelab.depth.gather.capacity_count``)."""
    return capacity_count(1.0 - float(sparsity), seq_len)


def static_keep_targets(received_BS: Tensor, k: int) -> Tensor:
    """``[B, S]`` float: 1 for the ``k`` tokens of each row that receive the most attention (the
    static router's choice, the guide loss's target), 0 elsewhere."""
    target = torch.zeros_like(received_BS, dtype=torch.float32)
    if k:
        target.scatter_(1, topk_per_sequence(received_BS, k), 1.0)
    return target


# -- losses (the paper gives no formulas: all three are our choice) ----------------------------------
def ftp_guide_loss(logits_BS: Tensor, target_BS: Tensor) -> Tensor:
    """Guide loss: ``BCE(sigmoid(z), y)`` averaged over tokens, ``y`` the static router's keep
    decision (``static_keep_targets``)."""
    if logits_BS.shape != target_BS.shape:
        raise ValueError(
            f"logits and target must have one shape, got {tuple(logits_BS.shape)} and {tuple(target_BS.shape)}"
        )
    return F.binary_cross_entropy_with_logits(logits_BS.float(), target_BS.float())


def ftp_sparsity_loss(keep_fraction_L: Tensor, sparsity_L: Tensor) -> Tensor:
    """Sparsity-constraint loss: ``mean_l (kept_l - (1 - s_l))^2``, ``kept_l`` a block's mean keep
    probability (``mean sigmoid(z)`` over its tokens) and ``s_l`` its target sparsity."""
    if keep_fraction_L.shape != sparsity_L.shape or keep_fraction_L.dim() != 1:
        raise ValueError(
            f"keep_fraction and sparsity must both be [L], got {tuple(keep_fraction_L.shape)} and {tuple(sparsity_L.shape)}"
        )
    return (keep_fraction_L.float() - (1.0 - sparsity_L.float().to(keep_fraction_L.device))).square().mean()


def ftp_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Distillation loss: ``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` per position, averaged
    over positions (``[..., V]`` logits of the pruned model and of the dense teacher)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have one shape, got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return kl.mean() * temperature**2


# -- the per-block sparsity search ------------------------------------------------------------------
def _check_sparsity(value: object, count: int) -> list[float]:
    """A float (every prunable block) or one float per prunable block, each in [0, 1)."""
    if isinstance(value, bool):
        raise TypeError(f"sparsity must be a float or a list of {count} floats, got bool")
    if isinstance(value, (int, float)):
        values = [float(value)] * count
    elif isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"sparsity must hold one value per prunable block ({count}), got {len(value)}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise TypeError(f"sparsity must be a list of floats, got {value!r}")
        values = [float(v) for v in value]
    else:
        raise TypeError(f"sparsity must be a float or a list of {count} floats, got {type(value).__name__}")
    for v in values:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1) (the share of tokens that skip a block), got {v}")
    return values


class FTPRouter(DepthRouter):
    """FTP token pruning over a model's blocks (module docstring).

    Args:
        d_model: width of the residual stream (the hidden-state scorer's input).
        num_layers: blocks in the model.
        max_seq_len: the model's longest sequence (normalises the position feature).
        sparsity: the share of each sequence's tokens that skip each prunable block: one float for
            every block (default 0.25, the middle of the paper's 22-30%), or one per prunable block
            (a schedule, e.g. from ``search_sparsity_schedule``).
        layers: the prunable blocks (default: every block but the first; our choice). Block 0
            cannot be pruned: the attention feature comes from the previous block.
        scorer: ``"features"`` (FTP's 4-feature router), ``"hidden_state"`` (the baseline MLP on
            the hidden state) or ``"attention"`` (the static router: attention received).
        selection: ``"topk"`` (exactly ``ceil((1 - s) S)`` tokens per sequence, our default) or
            ``"threshold"`` (``sigmoid(z) > 0.5``; learned scorers only).
        hidden: the router MLP's width (paper: 64).
        guide_coef, sparsity_coef: weights of the guide and sparsity-constraint losses in
            ``aux_loss`` (training only; our choice 0.1 and 1.0).
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int,
        *,
        max_seq_len: int = 256,
        sparsity: float | Sequence[float] = 0.25,
        layers: Iterable[int] | None = None,
        scorer: str = "features",
        selection: str = "topk",
        hidden: int = ROUTER_HIDDEN,
        guide_coef: float = 0.1,
        sparsity_coef: float = 1.0,
    ) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("num_layers", num_layers)
        positive_int("max_seq_len", max_seq_len)
        positive_int("hidden", hidden)
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if scorer == "attention" and selection != "topk":
            raise ValueError(
                "the static scorer 'attention' has no keep probability: it needs selection='topk'"
            )
        for name, c in (("guide_coef", guide_coef), ("sparsity_coef", sparsity_coef)):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {c!r}")
        if layers is None:
            chosen = list(range(1, num_layers))
        else:
            if isinstance(layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise TypeError(f"layers must be a list of block indices (ints), got {layers!r}")
            chosen = sorted(set(layers))
            if any(not 1 <= i < num_layers for i in chosen):
                raise ValueError(
                    f"layers must be block indices in [1, {num_layers}) (block 0 has no previous block's "
                    f"attention to score by), got {chosen}"
                )
        self.layers = chosen
        self.num_layers = num_layers
        self.max_seq_len = max_seq_len
        self.scorer = scorer
        self.selection = selection
        self.guide_coef = float(guide_coef)
        self.sparsity_coef = float(sparsity_coef)
        self.schedule = _check_sparsity(sparsity, len(chosen))
        # one global router shared by every prunable block (paper): the 4-feature MLP, or the
        # baseline's MLP on the hidden state (and the block's sparsity); the static scorer keeps
        # a feature MLP so that it can be trained after the schedule search
        self.feature_mlp = (
            nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 1))
            if scorer != "hidden_state"
            else None
        )
        self.hidden_mlp = (
            nn.Sequential(nn.Linear(d_model + 1, hidden), nn.GELU(), nn.Linear(hidden, 1))
            if scorer == "hidden_state"
            else None
        )
        self.active = True  # False: every block on every token (the dense teacher)
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> FTPRouter:
        return cls(config.d_model, config.n_layers, max_seq_len=config.max_seq_len, **kwargs)

    @property
    def causal_at_eval(self) -> bool:
        # the attention a token receives comes from later queries, and top-k ranks the sequence
        return False

    def extra_repr(self) -> str:
        sched = ", ".join(f"{s:.3f}" for s in self.schedule)
        return (
            f"layers={self.layers}, sparsity=[{sched}], scorer={self.scorer!r}, selection={self.selection!r}"
        )

    # -- state changes ----------------------------------------------------------------------------
    def set_sparsity(self, sparsity: float | Sequence[float]) -> None:
        """Set the per-block sparsity (a float for every prunable block, or a schedule)."""
        self.schedule = _check_sparsity(sparsity, len(self.layers))

    @contextmanager
    def dense(self) -> Iterator[None]:
        """Within the block the model runs every block on every token (the dense teacher)."""
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

    @contextmanager
    def using(
        self, *, scorer: str | None = None, sparsity: float | Sequence[float] | None = None
    ) -> Iterator[None]:
        """Within the block, route with ``scorer`` and/or at ``sparsity`` (the schedule search
        evaluates the static router ``scorer="attention"`` at candidate schedules)."""
        if scorer is not None and scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if scorer == "hidden_state" and self.hidden_mlp is None:
            raise ValueError(
                "this router was built without the hidden-state MLP (scorer='hidden_state' at construction)"
            )
        if scorer == "features" and self.feature_mlp is None:
            raise ValueError(
                "this router was built without the feature MLP (it was built with scorer='hidden_state')"
            )
        old = (self.scorer, self.schedule)
        if scorer is not None:
            self.scorer = scorer
        if sparsity is not None:
            self.set_sparsity(sparsity)
        try:
            yield
        finally:
            self.scorer, self.schedule = old

    # -- scoring ------------------------------------------------------------------------------------
    def router_logits(
        self, x_BSD: Tensor, received_BS: Tensor | None, positions_BS: Tensor, sparsity: float
    ) -> Tensor:
        """``[B, S]`` fp32 logits of the learned scorer (keep probability ``sigmoid``); inputs detached."""
        if self.scorer == "features":
            if received_BS is None:
                raise ValueError("the 'features' scorer needs the attention received")
            feats = ftp_features(received_BS, positions_BS, sparsity, self.max_seq_len)
            assert self.feature_mlp is not None
            mlp = self.feature_mlp
        elif self.scorer == "hidden_state":
            assert self.hidden_mlp is not None
            h = F.rms_norm(x_BSD.detach().float(), (x_BSD.shape[-1],), eps=1e-6)
            feats = torch.cat((h, h.new_full((*h.shape[:2], 1), float(sparsity))), dim=-1)
            mlp = self.hidden_mlp
        else:
            raise ValueError(f"scorer {self.scorer!r} has no learned logits")
        w = mlp[0].weight
        self.flops += 2.0 * sum(p.numel() for p in mlp.parameters()) * x_BSD.shape[0] * x_BSD.shape[1]
        return mlp(feats.to(w.dtype)).squeeze(-1).float()

    def _received(self, prev: nn.Module, x_prev: Tensor, rope: Rope, pos_BS: Tensor) -> Tensor:
        b, s, d = x_prev.shape
        # q and k projections of every token, then q.k over the causal half
        self.flops += 2.0 * b * s * (2 * d * d) + 2.0 * b * s * d * (s + 1) / 2
        return block_attention_received(prev, x_prev, rope, pos_BS)

    # -- the forward ----------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, blocks: nn.ModuleList, rope: Rope, ctx: RoutingContext, positions: Tensor | None
    ) -> Tensor:
        if self.layers and self.layers[-1] >= len(blocks):
            raise ValueError(f"prunable layers {self.layers} do not fit a model of {len(blocks)} blocks")
        if not self.active:
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
            return run_blocks(x, blocks, rope, ctx, positions)
        b, s, d = x.shape
        pos_BS = positions if positions is not None else torch.arange(s, device=x.device).expand(b, s)
        slot_of = {layer: j for j, layer in enumerate(self.layers)}
        learned = self.scorer != "attention"
        guide: list[Tensor] = []
        kept_prob: list[Tensor] = []
        kept_share: list[float] = []
        agree: list[float] = []
        prev_input = x
        for i, blk in enumerate(blocks):
            cache = block_cache(ctx, blk)
            if i not in slot_of:
                prev_input = x
                x = blk(x, rope, ctx, positions=positions, cache=cache)
                continue
            sp = self.schedule[slot_of[i]]
            k = keep_count(sp, s) if s else 0
            everything = k == s and self.selection == "topk" and not self.training
            need_received = not everything and (
                self.scorer != "hidden_state" or (self.training and self.guide_coef > 0)
            )
            received = (
                self._received(blocks[i - 1], prev_input, rope, pos_BS) if need_received and s else None
            )
            prev_input = x
            logits = None
            if learned and not everything and s:
                logits = self.router_logits(x, received, pos_BS, sp)
            # which tokens run the block
            if s == 0 or everything:
                keep_BS = torch.ones(b, s, dtype=torch.bool, device=x.device)
            elif self.selection == "threshold":
                assert logits is not None
                keep_BS = logits > 0
            else:
                scores = logits if logits is not None else received
                keep_BS = torch.zeros(b, s, dtype=torch.bool, device=x.device)
                keep_BS.scatter_(1, topk_per_sequence(scores, k), True)
            if self.training and logits is not None and s:
                prob = torch.sigmoid(logits)
                kept_prob.append(prob.mean())
                if received is not None and self.guide_coef > 0:
                    guide.append(ftp_guide_loss(logits, static_keep_targets(received, k)))
            if received is not None and s and not self.training:
                agree.append(float((keep_BS == static_keep_targets(received, k).bool()).float().mean()))
            keep_BS = self._route(i, keep_BS, logits, ctx, x)
            kept_share.append(float(keep_BS.float().mean()) if s else 1.0)
            x = self._run_kept(blk, x, keep_BS, logits, rope, ctx, positions, pos_BS, cache)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and guide:
            aux = aux + self.guide_coef * torch.stack(guide).mean()
        if self.training and kept_prob and self.sparsity_coef > 0:
            targets = torch.tensor(self.schedule, device=x.device)
            aux = aux + self.sparsity_coef * ftp_sparsity_loss(torch.stack(kept_prob), targets)
        self.aux_loss = aux
        stats = {"kept_fraction": sum(kept_share) / len(kept_share)} if kept_share else {}
        if agree:
            stats["static_agreement"] = sum(agree) / len(agree)
        self.last_stats = stats
        return x

    def _route(
        self, layer: int, keep_BS: Tensor, logits: Tensor | None, ctx: RoutingContext, x: Tensor
    ) -> Tensor:
        """Emit block ``layer``'s ``Routing`` (kept tokens -> the one "compute" slot, weight the
        keep probability, 1 for the static scorer); returns the kept mask of what runs (a routing
        transform may change it)."""
        b, s, d = x.shape
        probs = torch.sigmoid(logits) if logits is not None else None
        weight = probs if probs is not None else torch.ones(b, s, device=x.device)
        routing = compute_routing(
            keep_BS,
            weight,
            None if logits is None else logits.reshape(-1, 1),
            None if probs is None else probs.reshape(-1, 1),
        )
        out = self.routed(routing, ctx.replace(layer_index=layer), x.reshape(-1, d))
        return keep_BS if out is routing else routing_selection(out, b, s, weight)[0]

    def _run_kept(
        self,
        blk: nn.Module,
        x: Tensor,
        keep_BS: Tensor,
        logits: Tensor | None,
        rope: Rope,
        ctx: RoutingContext,
        positions: Tensor | None,
        pos_BS: Tensor,
        cache: Any,
    ) -> Tensor:
        """Block ``blk`` on the kept tokens of each sequence at their true positions; the others
        pass through. In training with a learned scorer, the straight-through mask (module
        docstring) lets the loss reach the router."""
        b, s, d = x.shape
        ste = None
        if self.training and logits is not None and torch.is_grad_enabled():
            prob = torch.sigmoid(logits)
            ste = prob - prob.detach()  # 0 in the forward, d sigma(z) in the backward
        skipped = ~keep_BS
        dense_delta = None
        if ste is not None and bool(skipped.any()):
            # what the block would add to the skipped tokens: the gradient of their 0 mask (run
            # before the kept subset, so the block's own state, e.g. an MoE's aux loss, is the kept run's)
            with torch.no_grad():
                dense_delta = _quiet_run(blk, x, rope, positions, ctx) - x
        if bool(keep_BS.all()):
            if ste is None:
                return blk(x, rope, ctx, positions=positions, cache=cache)
            out = blk(x, rope, ctx, positions=positions, cache=cache)
            return out + ste[..., None].to(x.dtype) * (out - x)  # out exactly, d sigma(z) (out - x) back
        counts = keep_BS.sum(dim=1)
        index, valid = ragged_index(keep_BS)
        if index.shape[1] == 0:
            new = x
        else:
            full_rows = bool((counts == index.shape[1]).all())
            valid_arg = None if full_rows else valid
            x_sel = gather_tokens(x, index)
            pos = positions_of(index, pos_BS)
            inner = gathered_context(ctx, index, s).replace(positions=pos.reshape(-1))
            out = blk(x_sel, rope, inner, positions=pos, valid=valid_arg, cache=cache)
            delta = out - x_sel
            if ste is not None:
                delta = delta * (1.0 + ste.gather(1, index))[..., None].to(delta.dtype)
            new = scatter_update(x, index, delta, valid_arg)
        if dense_delta is not None:
            assert ste is not None
            new = new + (ste * skipped.to(ste.dtype))[..., None].to(x.dtype) * dense_delta
        return new


def _quiet_run(
    blk: nn.Module, x: Tensor, rope: Rope, positions: Tensor | None, ctx: RoutingContext
) -> Tensor:
    """``blk`` on every token, leaving no trace: a fresh context (no shared history or session),
    the modules' FLOP counters and routed counts restored (the straight-through estimator's
    reference run is not part of the pruned model's cost)."""
    quiet = RoutingContext(
        batch_shape=ctx.batch_shape, token_ids=ctx.token_ids, token_types=ctx.token_types, step=ctx.step
    )
    with uncounted(blk):
        return blk(x, rope, quiet, positions=positions)


# -- using FTP on a trained MoELM -------------------------------------------------------------------
def attach_ftp(model: nn.Module, *, freeze_base: bool = True, **kwargs: Any) -> FTPRouter:
    """Give a trained ``MoELM`` an FTP router (``FTPRouter`` options in ``kwargs``); returns it.

    The model's config becomes ``depth="ftp"`` with these options (``save_pretrained`` /
    ``from_pretrained`` keep the router). ``freeze_base``: the model's own parameters stop
    requiring gradients, so training the model trains only the router (FTP trains no base weight).
    """
    from moelab.models.lm import MoELM

    if not isinstance(model, MoELM):
        raise TypeError(f"model must be a moelab MoELM, got {type(model).__name__}")
    if model.depth is not None:
        raise ValueError(
            f"the model already has a depth router ({type(model.depth).__name__}); attach FTP to a plain MoELM"
        )
    router = FTPRouter.from_config(model.config, **kwargs)
    ref = next(model.parameters())
    router.to(device=ref.device)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    model.depth = router
    model.config = dataclasses.replace(model.config, depth="ftp", depth_kwargs=dict(kwargs))
    return router


def ftp_router_of(model: nn.Module) -> FTPRouter:
    """The ``FTPRouter`` of ``model`` (a ``MoELM``, possibly wrapped by DDP)."""
    inner = getattr(model, "module", model)
    router = getattr(inner, "depth", None)
    if not isinstance(router, FTPRouter):
        raise TypeError(
            f"the model has no FTP router (model.depth is {type(router).__name__}); use attach_ftp"
        )
    return router


def ftp_loss_fn(
    distill_coef: float = 1.0, temperature: float = 1.0, ce_coef: float = 0.0
) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """A ``loss_fn(model, batch) -> (loss, metrics)`` for ``moelab.train.Trainer`` that trains an
    FTP router on a frozen ``MoELM`` (our choice of combination; the paper gives none):

        loss = distill_coef * KL(dense || pruned) + guide_coef * guide + sparsity_coef * sparsity
               + ce_coef * CE(pruned)

    The dense teacher is the same model with the router switched off (``FTPRouter.dense``), run
    without gradient. ``task_loss`` (what the trainer reports and evaluates) is the pruned model's
    next-token cross-entropy; in eval mode only that is computed (with ``row_loss`` per window)."""
    for name, c in (("distill_coef", distill_coef), ("ce_coef", ce_coef)):
        if not c >= 0:
            raise ValueError(f"{name} must be >= 0, got {c}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def loss_fn(model: nn.Module, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        ids, types = batch if isinstance(batch, tuple) else (batch, None)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise TypeError(f"the FTP loss takes [B, S] token ids, got {type(ids).__name__}")
        router = ftp_router_of(model)
        kwargs = {} if types is None else {"token_types": types}
        b, s = ids.shape
        metrics: dict[str, Any] = {"count": b * (s - 1), "tokens": b * s}
        if not model.training:
            out = model(ids, labels=ids, **kwargs)
            v = out.logits.shape[-1]
            rows = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none"
            )
            metrics.update(
                task_loss=out.ce_loss, aux_loss=out.aux_loss, row_loss=rows.view(b, s - 1).mean(dim=1)
            )
            return out.ce_loss, metrics
        with torch.no_grad(), router.dense():
            teacher = model(ids, **kwargs).logits
        out = model(ids, labels=ids, **kwargs)
        distill = ftp_distillation_loss(out.logits, teacher, temperature)
        loss = distill_coef * distill + out.aux_loss + ce_coef * out.ce_loss
        metrics.update(task_loss=out.ce_loss, aux_loss=out.aux_loss, distill_loss=distill.detach())
        return loss, metrics

    return loss_fn


@torch.no_grad()
def pruned_val_loss(model: nn.Module, batches: Iterable[Tensor]) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` in eval mode over ``batches`` of
    ``[B, S]`` ids (every predicted token weighted equally); the training mode is restored."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids in batches:
            if isinstance(ids, tuple):
                ids = ids[0]
            out = model(ids, labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(out.ce_loss) * n
            count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("batches must hold at least one window of two or more tokens")
    return total / count


registry.register(
    "depth",
    "ftp",
    paper="Li et al. 2024, FTP: A Fine-grained Token-wise Pruner for Large Language Models via Token Routing (arXiv 2412.11494)",
    summary="tokens skip blocks: one global MLP on 4 features (position, attention received, its rank, block sparsity); GA-searched per-block sparsity",
)(FTPRouter)
