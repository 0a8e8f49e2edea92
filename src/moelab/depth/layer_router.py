"""Dr.LLM (Heakl et al. 2025, *Dynamic Layer Routing in LLMs*, arXiv 2510.12773; ICLR 2026):
per-layer routers decide, once per sequence, whether each block is skipped, run or run twice.

One router per block reads the hidden state entering the block, mean-pooled over ``W = 8``
contiguous windows of the sequence; a bottleneck MLP ``Linear(d, 128) -> GELU -> Linear(128, 3)``
scores every window and the window logits are averaged. The decision is the argmax over
``{0: skip, 1: execute, 2: repeat}``, made at prefill for the whole sequence; the block then runs
0, 1 or 2 times on that sequence (decode steps of a ``Session`` follow the prefill's path). The
base model is frozen: the routers learn by teacher forcing along paths labelled offline by a
length-penalised Monte-Carlo tree search (``mcts_layer_paths``), with a focal loss (``gamma = 2``)
weighted by effective-number class weights ``(1 - beta) / (1 - beta^n_c)``, ``beta = 0.999``.

Pure parts (functions): ``window_mean_pool``, ``effective_number_weights``, ``focal_loss``,
``path_to_labels`` / ``labels_to_path``, ``path_successors``, ``mcts_layer_paths`` /
``mcts_layer_paths_batched``, ``penalized_decisions``, ``decision_routing`` /
``decisions_of_routing``, ``run_block_times``. State (modules): ``LayerRouter`` (one block's
router), ``LayerRouters`` (all of them, with teacher forcing), ``DrLLM`` (the ``DepthRouter``
registered as ``"drllm"``).
``apply_drllm(model)`` adds routers to a ``MoELM`` without touching its weights;
``train_layer_routers`` trains them. The transformers (Llama-family) version is
``moelab.integrations.hf.drllm``.

Official code read: parameterlab/dr-llm ``models/modeling_llama.py`` (routers, windows, decision
loop), ``data_generation.py`` (MCTS), ``train.py``. Where we differ it is said in
``docs/methods/drllm.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.depth.base import DepthRouter
from moelab.models.blocks import Rope, block_cache

SKIP, EXECUTE, REPEAT = 0, 1, 2
DECISIONS = ("skip", "execute", "repeat")
NUM_DECISIONS = 3

# Defaults, PAPERS.md sec. A.3 and the official code.
NUM_WINDOWS = 8  # W: modeling_llama.py ``self.num_windows = 8``
ROUTER_HIDDEN = 128  # RouterBlock(hidden_dim=128)
FOCAL_GAMMA = 2.0  # README: focal loss, gamma = 2
CLASS_BETA = 0.999  # README: effective-number class weights, beta = 0.999


# -- windowed mean pooling ------------------------------------------------------------------------
def window_mean_pool(
    x_BSD: Tensor, num_windows: int = NUM_WINDOWS, mask_BS: Tensor | None = None, drop_remainder: bool = False
) -> tuple[Tensor, Tensor]:
    """Mean of each of ``W`` contiguous windows of every sequence: ``(pooled [B, W, D], valid [B, W])``.

    A row with ``n`` real tokens (``mask_BS`` True; all tokens without a mask, padding may sit on
    either side) gets ``w = min(W, n)`` windows over its real tokens in order; ``valid[b, j]`` is
    False for windows ``j >= w`` (their ``pooled`` rows are 0). Window boundaries:

    - ``drop_remainder=False`` (our choice): token ``t`` (its rank among the row's real tokens)
      goes to window ``floor(t * w / n)``, so every token counts and the sizes differ by at most 1;
    - ``drop_remainder=True`` (the official code): windows of ``n // w`` tokens, and the last
      ``n - w * (n // w)`` tokens are left out.

    Dr.LLM, PAPERS.md A.3: the router input is this pooling of the hidden state entering a layer.
    """
    if not isinstance(x_BSD, Tensor) or x_BSD.dim() != 3 or not x_BSD.is_floating_point():
        got = f"{x_BSD.dtype} {tuple(x_BSD.shape)}" if isinstance(x_BSD, Tensor) else type(x_BSD).__name__
        raise ValueError(f"x_BSD must be a floating [B, S, D] tensor, got {got}")
    positive_int("num_windows", num_windows)
    b, s, _ = x_BSD.shape
    if mask_BS is None:
        mask_BS = torch.ones(b, s, dtype=torch.bool, device=x_BSD.device)
    elif not isinstance(mask_BS, Tensor) or tuple(mask_BS.shape) != (b, s):
        got = tuple(mask_BS.shape) if isinstance(mask_BS, Tensor) else type(mask_BS).__name__
        raise ValueError(f"mask_BS must be a [B, S] = [{b}, {s}] tensor, got {got}")
    mask = mask_BS.to(device=x_BSD.device).bool()
    n_B = mask.sum(dim=1)
    if b and bool((n_B == 0).any()):
        raise ValueError("every row needs at least one real token (mask_BS has a row that is all padding)")
    w_B = n_B.clamp(max=num_windows)
    rank_BS = mask.long().cumsum(dim=1) - 1  # rank of each real token in its row
    n, w = n_B.clamp(min=1)[:, None], w_B.clamp(min=1)[:, None]
    if drop_remainder:
        size = n // w
        window_BS = rank_BS // size
        keep = mask & (window_BS < w)
    else:
        window_BS = (rank_BS * w) // n
        keep = mask
    window_BS = window_BS.clamp(0, num_windows - 1)
    member_BSW = F.one_hot(window_BS, num_windows).to(x_BSD.dtype) * keep[..., None].to(x_BSD.dtype)
    count_BW = member_BSW.sum(dim=1)
    pooled = torch.einsum("bsw,bsd->bwd", member_BSW, x_BSD) / count_BW.clamp(min=1)[..., None]
    return pooled, count_BW > 0


# -- the losses -----------------------------------------------------------------------------------
def effective_number_weights(
    counts_C: Tensor | Sequence[int], beta: float = CLASS_BETA, normalize: bool = True
) -> Tensor:
    """Class weights ``(1 - beta) / (1 - beta^n_c)`` (Cui et al. 2019, *Class-Balanced Loss Based on
    Effective Number of Samples*; Dr.LLM's README: ``beta = 0.999``), ``[C]`` float32.

    A class with ``n_c = 0`` gets weight 0 (our choice: it never appears as a target). With
    ``normalize`` (Cui et al.'s convention) the weights of the present classes sum to their number.
    """
    counts = torch.as_tensor(counts_C)
    if (
        counts.dim() != 1
        or counts.numel() == 0
        or counts.is_floating_point()
        and not bool(torch.isfinite(counts).all())
    ):
        raise ValueError(
            f"counts_C must be a non-empty 1-D tensor of class counts, got {tuple(counts.shape)}"
        )
    if bool((counts < 0).any()):
        raise ValueError(f"counts_C must be >= 0, got {counts.tolist()}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    n = counts.double()
    present = n > 0
    w = torch.where(
        present,
        (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)),
        torch.zeros_like(n),
    )
    if normalize and bool(present.any()):
        w = w * present.sum() / w.sum()
    return w.float()


def focal_loss(
    logits_NC: Tensor, target_N: Tensor, gamma: float = FOCAL_GAMMA, weight_C: Tensor | None = None
) -> Tensor:
    """Focal loss (Lin et al. 2017) ``mean_i  w_{y_i} (1 - p_{i,y_i})^gamma (-log p_{i,y_i})``, ``p``
    the softmax of ``logits_NC`` (in float32), ``w`` the class weights (1 without). A scalar.

    The mean is over the ``N`` examples (our choice; ``F.cross_entropy(weight=...)`` divides by
    the sum of the weights instead). ``gamma = 0`` and no weights give the cross-entropy.
    """
    if not isinstance(logits_NC, Tensor) or logits_NC.dim() != 2 or not logits_NC.is_floating_point():
        got = tuple(logits_NC.shape) if isinstance(logits_NC, Tensor) else type(logits_NC).__name__
        raise ValueError(f"logits_NC must be a floating [N, C] tensor, got {got}")
    n, c = logits_NC.shape
    if not isinstance(target_N, Tensor) or tuple(target_N.shape) != (n,) or target_N.is_floating_point():
        got = tuple(target_N.shape) if isinstance(target_N, Tensor) else type(target_N).__name__
        raise ValueError(f"target_N must be an integer [N] = [{n}] tensor, got {got}")
    if n and (int(target_N.min()) < 0 or int(target_N.max()) >= c):
        raise ValueError(
            f"target_N must lie in [0, C={c}), got [{int(target_N.min())}, {int(target_N.max())}]"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    if weight_C is not None and (not isinstance(weight_C, Tensor) or tuple(weight_C.shape) != (c,)):
        raise ValueError(
            f"weight_C must be a [C] = [{c}] tensor, got {getattr(weight_C, 'shape', type(weight_C).__name__)}"
        )
    if n == 0:
        return logits_NC.sum() * 0.0
    logp_y = F.log_softmax(logits_NC.float(), dim=-1).gather(1, target_N.long()[:, None]).squeeze(1)
    loss = -((1.0 - logp_y.exp()) ** gamma) * logp_y
    if weight_C is not None:
        loss = loss * weight_C.to(loss.device, torch.float32)[target_N.long()]
    return loss.mean()


# -- layer paths ----------------------------------------------------------------------------------
def penalized_decisions(logits_B3: Tensor, router_penalty: float = -0.5) -> Tensor:
    """``[B]`` long: the argmax of the router's softmax moved towards a fixed decision by
    ``router_penalty`` p in [-1, 1] (the official ``continuous_router_decision``):

    - p in [-1, -0.5]: ``(1 - t) onehot(skip) + t softmax``, ``t = (p + 1) / 0.5``;
    - p in (-0.5, 0.5]: ``(1 - t) softmax + t onehot(execute)``, ``t = p + 0.5``;
    - p in (0.5, 1]: ``(1 - t) onehot(execute) + t onehot(repeat)``, ``t = (p - 0.5) / 0.5``.

    p = -0.5 (default) is the router's own argmax; -1 skips every layer, 0.5 executes every
    layer, 1 repeats every layer: an inference-time budget knob."""
    if (
        isinstance(router_penalty, bool)
        or not isinstance(router_penalty, (int, float))
        or not -1.0 <= router_penalty <= 1.0
    ):
        raise ValueError(f"router_penalty must be a number in [-1, 1], got {router_penalty!r}")
    p = float(router_penalty)
    probs = logits_B3.detach().float().softmax(dim=-1)
    onehot = torch.eye(NUM_DECISIONS, device=probs.device)
    if p <= -0.5:
        t = (p + 1.0) / 0.5
        final = (1 - t) * onehot[SKIP] + t * probs
    elif p <= 0.5:
        t = p + 0.5
        final = (1 - t) * probs + t * onehot[EXECUTE]
    else:
        t = (p - 0.5) / 0.5
        final = ((1 - t) * onehot[EXECUTE] + t * onehot[REPEAT]).expand_as(probs)
    return final.argmax(dim=-1)


# -- the routing a decision emits -----------------------------------------------------------------
def decision_routing(decisions_B: Tensor, seq_len: int, logits_B3: Tensor | None = None) -> Routing:
    """The ``Routing`` of one block's decisions: every token of sequence ``b`` goes to "expert"
    ``decisions_B[b]`` of ``E = 3`` (0 skip, 1 execute, 2 repeat), weight 1, ``top_k = 1``;
    ``logits``/``probs`` are the sequence's router logits (and softmax) repeated over its tokens."""
    b = decisions_B.shape[0]
    t = b * seq_len
    dev = decisions_B.device
    logits = probs = None
    if logits_B3 is not None:
        logits = logits_B3.detach().float().repeat_interleave(seq_len, dim=0)
        probs = logits.softmax(dim=-1)
    return Routing(
        token_index=torch.arange(t, device=dev),
        expert_index=decisions_B.long().repeat_interleave(seq_len),
        weight=torch.ones(t, device=dev),
        num_tokens=t,
        num_experts=NUM_DECISIONS,
        logits=logits,
        probs=probs,
        top_k=1,
        validate=False,
    )


def decisions_of_routing(routing: Routing, batch: int, seq_len: int) -> Tensor:
    """``[B]`` long: each sequence's decision in ``routing`` (possibly rewritten by a routing
    transform). Every token must have exactly one entry and all tokens of a sequence the same one."""
    t = batch * seq_len
    if routing.num_tokens != t or routing.token_index.numel() != t:
        raise ValueError(
            f"a drllm routing needs exactly one entry per token ({t}), got {routing.token_index.numel()}"
        )
    per_token = torch.full((t,), -1, dtype=torch.long, device=routing.expert_index.device)
    per_token[routing.token_index] = routing.expert_index
    if bool((per_token < 0).any()):
        raise ValueError("a drllm routing must give every token one decision; some tokens have none")
    per_seq = per_token.view(batch, seq_len)
    if seq_len and not bool((per_seq == per_seq[:, :1]).all()):
        raise ValueError("drllm decides per sequence: every token of a sequence must get the same decision")
    return (
        per_seq[:, 0] if seq_len else torch.full((batch,), EXECUTE, dtype=torch.long, device=per_token.device)
    )


# -- the routers ----------------------------------------------------------------------------------
class LayerRouter(nn.Module):
    """One block's router: ``Linear(d, hidden) -> GELU(tanh) -> Linear(hidden, 3)`` on each of the
    ``num_windows`` window means of the block input (``window_mean_pool``); the window logits are
    averaged over the row's windows. ``forward(x [B, S, d], mask [B, S] | None) -> logits [B, 3]``.

    ``execute_at_init`` (our choice, default): the last linear starts at weight 0 and bias
    ``(0, 1, 0)``, so an untrained router executes every block (the model is unchanged until the
    routers are trained). False: the official initialisation (transformers' ``_init_weights``:
    weights N(0, 0.02), biases 0).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int = ROUTER_HIDDEN,
        num_windows: int = NUM_WINDOWS,
        drop_remainder: bool = False,
        execute_at_init: bool = True,
    ) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("hidden", hidden)
        positive_int("num_windows", num_windows)
        self.num_windows = num_windows
        self.drop_remainder = bool(drop_remainder)
        self.up = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")  # the official RouterBlock's activation
        self.out = nn.Linear(hidden, NUM_DECISIONS)
        with torch.no_grad():
            if execute_at_init:
                self.out.weight.zero_()
                self.out.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
            else:
                for lin in (self.up, self.out):
                    lin.weight.normal_(0.0, 0.02)
                    lin.bias.zero_()
        self.flops = 0.0

    def forward(self, x_BSD: Tensor, mask_BS: Tensor | None = None) -> Tensor:
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.up.in_features:
            raise ValueError(f"x must be [B, S, d={self.up.in_features}], got {tuple(x_BSD.shape)}")
        w = self.up.weight
        pooled, valid = window_mean_pool(x_BSD.to(w.dtype), self.num_windows, mask_BS, self.drop_remainder)
        logits_BW3 = self.out(self.act(self.up(pooled)))
        v = valid.to(logits_BW3.dtype)[..., None]
        windows = int(valid.sum())
        params = sum(p.numel() for p in self.parameters())
        self.flops += float(x_BSD.shape[0] * x_BSD.shape[1] * x_BSD.shape[2]) + 2.0 * params * windows
        return (logits_BW3 * v).sum(dim=1) / v.sum(dim=1).clamp(min=1)


class LayerRouters(nn.Module):
    """The routers of every block, with teacher forcing (``forcing``) and the last forward's logits.

    ``decide(layer, x [B, S, d], mask) -> (decisions [B] long, logits [B, 3])``: the block's router
    logits and its decision, the argmax (PAPERS.md A.3) moved by ``router_penalty``
    (``penalized_decisions``; the default -0.5 leaves the argmax), or the forced decision while a
    ``forcing(decisions [B, L])`` context is open (the logits are computed either way: teacher
    forcing trains the routers along labelled paths). ``last_logits`` ``[B, L, 3]`` holds the
    logits of the routers that ran in the last forward (after ``begin``), None when none ran.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        hidden: int = ROUTER_HIDDEN,
        num_windows: int = NUM_WINDOWS,
        drop_remainder: bool = False,
        execute_at_init: bool = True,
    ) -> None:
        super().__init__()
        self.num_layers = positive_int("num_layers", num_layers)
        self.routers = nn.ModuleList(
            LayerRouter(d_model, hidden, num_windows, drop_remainder, execute_at_init)
            for _ in range(num_layers)
        )
        self.forced: Tensor | None = None
        self.router_penalty = -0.5  # penalized_decisions: -0.5 is the router's argmax
        self._logits: list[Tensor | None] = [None] * num_layers

    @contextmanager
    def forcing(self, decisions_BL: Tensor | Sequence[Sequence[int]]) -> Iterator[Tensor]:
        """Run every forward inside the block along ``decisions [B, L]`` (0 skip, 1 execute, 2
        repeat) instead of the routers' argmax: teacher forcing, or a hand-chosen path."""
        d = torch.as_tensor(decisions_BL)
        if d.dim() != 2 or d.shape[1] != self.num_layers or d.is_floating_point():
            raise ValueError(
                f"decisions must be an integer [B, L={self.num_layers}] tensor, got {d.dtype} {tuple(d.shape)}"
            )
        if d.numel() and (int(d.min()) < 0 or int(d.max()) > REPEAT):
            raise ValueError(
                f"decisions must lie in {{0 skip, 1 execute, 2 repeat}}, got [{int(d.min())}, {int(d.max())}]"
            )
        before = self.forced
        self.forced = d.long()
        try:
            yield self.forced
        finally:
            self.forced = before

    def begin(self) -> None:
        """Forget the logits of the previous forward."""
        self._logits = [None] * self.num_layers

    def decide(self, layer: int, x_BSD: Tensor, mask_BS: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # the base is frozen: the routers never send gradient into the hidden states
        logits = self.routers[layer](x_BSD.detach(), mask_BS)
        self._logits[layer] = logits
        if self.forced is not None:
            if self.forced.shape[0] != x_BSD.shape[0]:
                raise ValueError(
                    f"forced decisions are for batch {self.forced.shape[0]}, the input has {x_BSD.shape[0]} rows"
                )
            return self.forced[:, layer].to(x_BSD.device), logits
        return penalized_decisions(logits, self.router_penalty), logits

    @property
    def last_logits(self) -> Tensor | None:
        if any(v is None for v in self._logits):
            return None
        return torch.stack(self._logits, dim=1)  # type: ignore[arg-type]


class DrLLM(DepthRouter):
    """Dr.LLM's skip / execute / repeat routing of a ``MoELM``'s blocks (module docstring).

    Args:
        num_layers: blocks in the model (one router each).
        d_model: residual width.
        hidden: router bottleneck width (paper: 128).
        num_windows: ``W`` (paper: 8).
        drop_remainder: window boundaries (``window_mean_pool``; False: ours, True: official).
        execute_at_init: an untrained router executes every block (``LayerRouter``; ours).
        router_penalty: the official decision knob (``penalized_decisions``; -0.5: the argmax,
            the paper's rule). Settable later as ``layer_routers.router_penalty``.

    Each block's decision is emitted as a ``Routing`` (``decision_routing``): tokens -> {skip,
    execute, repeat}; a routing transform may rewrite it (per sequence). With a ``Session`` the
    prefill's decisions ``[B, L]`` are stored in the session and every decode step follows them
    (the routers do not run again); a repeated block keeps a second KV cache (key 1). Rows of one
    batch with different decisions: without a session the block runs on the rows that execute it
    only; with one it runs on every row, the others marked invalid (their cache entries are never
    attended and their outputs are dropped), so all rows share one cache tensor.
    After a forward: ``last_decisions [B, L]``, ``layers_executed [B]`` (block runs per sequence).
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        *,
        hidden: int = ROUTER_HIDDEN,
        num_windows: int = NUM_WINDOWS,
        drop_remainder: bool = False,
        execute_at_init: bool = True,
        router_penalty: float = -0.5,
    ) -> None:
        super().__init__()
        self.layer_routers = LayerRouters(
            num_layers, d_model, hidden, num_windows, drop_remainder, execute_at_init
        )
        penalized_decisions(torch.zeros(1, NUM_DECISIONS), router_penalty)  # validates it
        self.layer_routers.router_penalty = float(router_penalty)
        self.num_layers = num_layers
        self.last_decisions: Tensor | None = None

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> DrLLM:
        return cls(config.n_layers, config.d_model, **kwargs)

    @property
    def causal_at_eval(self) -> bool:
        # the decision reads the whole input (all windows): an earlier token's output depends on
        # later tokens in a full forward; decoding with a Session is causal (decided at prefill)
        return False

    @property
    def layers_executed(self) -> Tensor | None:
        return None if self.last_decisions is None else self.last_decisions.sum(dim=1)

    def forcing(self, decisions_BL: Tensor | Sequence[Sequence[int]]) -> Any:
        """``LayerRouters.forcing``: run along ``decisions [B, L]`` while the context is open."""
        return self.layer_routers.forcing(decisions_BL)

    def extra_repr(self) -> str:
        r = self.layer_routers.routers[0]
        return f"num_layers={self.num_layers}, hidden={r.up.out_features}, num_windows={r.num_windows}"

    def forward(
        self, x: Tensor, blocks: nn.ModuleList, rope: Rope, ctx: RoutingContext, positions: Tensor | None
    ) -> Tensor:
        if len(blocks) != self.num_layers:
            raise ValueError(f"drllm has {self.num_layers} routers but the model has {len(blocks)} blocks")
        b, s, d = x.shape
        slot = ctx.session.slot(self) if ctx.session is not None else None
        stored = None if slot is None else slot.get("decisions")
        if stored is not None and stored.shape[0] != b:
            raise ValueError(f"the session's drllm decisions are for batch {stored.shape[0]}, got {b} rows")
        self.layer_routers.begin()
        taken = []
        for i, blk in enumerate(blocks):
            logits = None
            if stored is not None:  # a decode step: follow the prefill's path
                dec = stored[:, i]
            else:
                dec, logits = self.layer_routers.decide(i, x)
            routing = decision_routing(dec, s, logits)
            out = self.routed(routing, ctx.replace(layer_index=i), x.reshape(-1, d))
            if out is not routing:
                dec = decisions_of_routing(out, b, s)
            taken.append(dec)
            x = run_block_times(x, blk, dec, rope, ctx, positions)
        decisions = (
            torch.stack(taken, dim=1) if taken else torch.zeros(b, 0, dtype=torch.long, device=x.device)
        )
        if slot is not None and stored is None:
            slot["decisions"] = decisions
        self.last_decisions = decisions
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        return x


def run_block_times(
    x_BSD: Tensor,
    block: nn.Module,
    times_B: Tensor,
    rope: Rope,
    ctx: RoutingContext,
    positions_BS: Tensor | None,
) -> Tensor:
    """Run ``block`` ``times_B[b]`` times (0, 1 or 2) on sequence ``b``: the per-sequence schedule
    of a Dr.LLM decision. Application ``a`` (0 or 1) uses the block's KV cache of key ``a``."""
    b, s, _ = x_BSD.shape
    for a in range(2):
        rows = times_B > a
        if not bool(rows.any()):
            break
        cache = block_cache(ctx, block, a)
        if bool(rows.all()):
            x_BSD = block(x_BSD, rope, ctx, positions=positions_BS, cache=cache)
        elif cache is None:
            idx = rows.nonzero().squeeze(1)
            pos = None if positions_BS is None else positions_BS[idx]
            out = block(x_BSD[idx], rope, ctx, positions=pos)
            x_BSD = x_BSD.index_copy(0, idx, out)
        else:
            # one cache tensor for the batch: every row runs, the others as invalid rows
            valid = rows[:, None].expand(b, s)
            if positions_BS is None:
                start = 0 if cache.positions is None else int(cache.positions.max()) + 1
                positions_BS = torch.arange(start, start + s, device=x_BSD.device).expand(b, s)
            out = block(x_BSD, rope, ctx, positions=positions_BS, valid=valid, cache=cache)
            x_BSD = torch.where(rows[:, None, None], out, x_BSD)
    return x_BSD


registry.register(
    "depth",
    "drllm",
    paper="Heakl et al. 2025, Dr.LLM: Dynamic Layer Routing in LLMs (arXiv 2510.12773, ICLR 2026)",
    summary="per-layer routers skip / execute / repeat each block once per sequence; MCTS path labels, focal loss",
)(DrLLM)


# -- applying and training ------------------------------------------------------------------------
def apply_drllm(
    model: nn.Module,
    *,
    hidden: int = ROUTER_HIDDEN,
    num_windows: int = NUM_WINDOWS,
    drop_remainder: bool = False,
    execute_at_init: bool = True,
    router_penalty: float = -0.5,
) -> DrLLM:
    """Add Dr.LLM routers to a ``MoELM`` without touching its weights: ``model.depth`` becomes a
    ``DrLLM`` (on the model's device and dtype) and ``config.depth = "drllm"`` with these options
    in ``config.depth_kwargs``, so ``save_pretrained`` / ``from_pretrained`` round-trip. Returns it.
    ``remove_drllm(model)`` undoes it. For a transformers model: ``moelab.integrations.hf.drllm``."""
    from moelab.models.lm import MoELM

    if not isinstance(model, MoELM):
        raise TypeError(
            f"model must be a moelab MoELM, got {type(model).__name__} (transformers models: moelab.hf.drllm.apply_drllm)"
        )
    if model.depth is not None:
        raise ValueError(f"model already has a depth router ({model.config.depth!r}); remove it first")
    kwargs = {
        "hidden": hidden,
        "num_windows": num_windows,
        "drop_remainder": bool(drop_remainder),
        "execute_at_init": bool(execute_at_init),
        "router_penalty": float(router_penalty),
    }
    router = DrLLM.from_config(model.config, **kwargs)
    ref = model.embed.weight
    router = router.to(device=ref.device, dtype=ref.dtype)
    model.depth = router
    model.config.depth = "drllm"
    model.config.depth_kwargs = kwargs
    return router


def remove_drllm(model: nn.Module) -> DrLLM:
    """Take the Dr.LLM routers off a ``MoELM`` (``apply_drllm`` undone); returns them."""
    router = getattr(model, "depth", None)
    if not isinstance(router, DrLLM):
        raise ValueError(f"model has no drllm depth router (model.depth is {type(router).__name__})")
    model.depth = None
    model.config.depth = None
    model.config.depth_kwargs = {}
    return router


def find_layer_routers(model: nn.Module) -> LayerRouters:
    """The ``LayerRouters`` inside ``model`` (a ``MoELM`` after ``apply_drllm``, a transformers
    model after ``moelab.hf.drllm.apply_drllm``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, LayerRouters)]
    if len(found) != 1:
        raise ValueError(
            f"model must hold exactly one set of Dr.LLM routers (apply_drllm first), found {len(found)}"
        )
    return found[0]


def train_layer_routers(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    epochs: int = 25,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    gamma: float = FOCAL_GAMMA,
    beta: float = CLASS_BETA,
    seed: int = 0,
) -> list[float]:
    """Train a model's Dr.LLM routers on ``(input_ids [N, S], labels [N, L])`` pairs; returns the
    mean loss of each epoch. The base is frozen (only the routers' parameters get gradients; the
    base's ``requires_grad`` flags and train/eval mode are restored afterwards).

    Teacher forcing: each batch runs the model along its labelled paths (``forcing``), every
    router scoring the hidden state that enters its block on that path; the loss is
    ``focal_loss`` over all (sequence, block) pairs with ``effective_number_weights`` of the
    labels' class counts (PAPERS.md A.3). AdamW (lr 1e-3, weight decay 0.01: the paper), linear
    warmup over ``warmup_steps`` (paper: 500) then cosine decay to 0 (the official SFTConfig).
    ``attention_mask [N, S]`` (1 real, 0 padding) is passed to a transformers model.
    """
    routers = find_layer_routers(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be an integer [N, S] tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    n = input_ids.shape[0]
    if (
        not isinstance(labels, Tensor)
        or tuple(labels.shape) != (n, routers.num_layers)
        or labels.is_floating_point()
    ):
        raise ValueError(
            f"labels must be an integer [N, L] = [{n}, {routers.num_layers}] tensor, got {getattr(labels, 'shape', type(labels).__name__)}"
        )
    if n == 0:
        raise ValueError("input_ids must hold at least one example")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > REPEAT):
        raise ValueError("labels must lie in {0 skip, 1 execute, 2 repeat}")
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
    ):
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = next(routers.parameters()).device
    weights = effective_number_weights(
        torch.bincount(labels.reshape(-1).long(), minlength=NUM_DECISIONS), beta
    )
    params = list(routers.parameters())
    own = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        rest = max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / rest)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history: list[float] = []
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in own)
        model.eval()  # the frozen base runs as at inference
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            total_loss = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                ids = input_ids[idx].to(device)
                lab = labels[idx].long().to(device)
                with routers.forcing(lab):
                    if attention_mask is None:
                        model(ids)
                    else:
                        model(ids, attention_mask=attention_mask[idx].to(device))
                logits = routers.last_logits
                if logits is None:
                    raise RuntimeError(
                        "the model's forward ran no Dr.LLM router (is the drllm patch installed?)"
                    )
                loss = focal_loss(logits.reshape(-1, NUM_DECISIONS), lab.reshape(-1), gamma, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * idx.numel()
            history.append(total_loss / n)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return history
