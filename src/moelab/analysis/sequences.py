"""Top-k index tensors in token order, and a routing cut into sequences.

SRP, SCH and the cache simulators read one layer's choices as ``topk_index [T, k]`` in token
order, one tensor per sequence (windows and caches never cross a sequence boundary). This module
validates such tensors (``check_topk_index``), turns a ``[B, T, k]`` tensor or a list of
``[T_i, k_i]`` tensors into a list of sequences (``as_sequences``), and cuts a ``Routing`` into
its sequences from the COO entries (``split_sequences``), without any ``[T, E]`` view.

Ragged routings (capacity drops, expert choice: token ``t`` has its own set ``S_t``, possibly
empty) are ``[T, kmax]`` padded with ``PAD = -1`` ("no request"), as ``Routing.topk_index(fill=-1)``
gives them.

A batch traced as ``[B, S]`` is a routing of ``T = B S`` tokens, batch-major: its sequences are
``routing.topk_index().view(B, S, k)`` or ``split_sequences(routing, [S] * B)``. The flat
``[B S, k]`` index is one long sequence to every function here; nothing can tell it apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moelab.analysis.limits import require_dense
from moelab.core.routing import Routing

PAD = -1  # "no request" in a padded [T, kmax] index (Routing.topk_index(fill=-1))


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------
def check_topk_index(topk_index: object, num_experts: object, name: str = "topk_index") -> Tensor:
    """Validate a ``[T, k]`` (or ``[B, T, k]``) integer tensor of distinct experts per row.

    ``-1`` is padding ("no request"; ``Routing.topk_index(fill=-1)`` of a ragged routing) and may
    repeat within a row; every other entry lies in ``[0, num_experts)`` and is distinct in its row.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(topk_index, Routing):
        raise TypeError(
            f"{name} must be a tensor of expert ids, got a Routing: pass "
            "routing.topk_index().view(B, S, k) for a [B, S] batch, or "
            "moelab.analysis.split_sequences(routing, lengths) for sequences of other lengths"
        )
    if not isinstance(topk_index, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor [T, k] of expert ids, got {type(topk_index).__name__}"
        )
    if topk_index.dim() not in (2, 3):
        raise ValueError(f"{name} must be [T, k] (or [B, T, k]), got shape {tuple(topk_index.shape)}")
    if topk_index.dtype.is_floating_point or topk_index.dtype == torch.bool or topk_index.is_complex():
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {topk_index.dtype}")
    idx = topk_index.long()
    if idx.shape[-1] < 1:
        raise ValueError(f"{name} must have k >= 1 columns, got shape {tuple(idx.shape)}")
    if idx.numel():
        real = idx[idx != PAD]
        if real.numel():
            lo, hi = int(real.min()), int(real.max())
            if lo < 0 or hi >= num_experts:
                raise ValueError(
                    f"{name} must lie in [0, num_experts={num_experts}) (or be {PAD} for padding), "
                    f"got [{lo}, {hi}]"
                )
        srt = idx.sort(dim=-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != PAD)).any()):
            raise ValueError(f"{name} rows must hold distinct experts (a token's top-k has no repeats)")
    return idx


def is_ragged(topk_index: Tensor) -> bool:
    """Whether a (validated) index tensor holds padding, i.e. tokens with fewer than ``k`` experts."""
    return bool((topk_index == PAD).any())


def experts_per_token(topk_index: Tensor) -> Tensor:
    """``[..., T]`` long: ``|S_t|``, the non-padding entries of each row."""
    return (topk_index != PAD).sum(-1)


def as_sequences(topk_index: Tensor | Sequence[Tensor], num_experts: int) -> list[Tensor]:
    """``[T, k]``, ``[B, T, k]`` or a list of ``[T_i, k_i]`` -> list of validated ``[T_i, k]``.

    Sequences of a list narrower than the widest are padded with ``-1`` (no request) to its width.
    """
    if isinstance(topk_index, (Tensor, Routing)):  # a Routing gets check_topk_index's how-to-cut error
        idx = check_topk_index(topk_index, num_experts)
        return [idx] if idx.dim() == 2 else list(idx.unbind(0))
    if not isinstance(topk_index, Sequence) or len(topk_index) == 0:
        raise TypeError(
            "sequences must be a [T, k] / [B, T, k] tensor or a non-empty list of [T_i, k] tensors"
        )
    seqs = [check_topk_index(s, num_experts, name=f"sequences[{i}]") for i, s in enumerate(topk_index)]
    if any(s.dim() != 2 for s in seqs):
        raise ValueError("each sequence must be a [T_i, k] tensor")
    k = max(int(s.shape[1]) for s in seqs)
    return [
        s if s.shape[1] == k else torch.nn.functional.pad(s, (0, k - int(s.shape[1])), value=PAD)
        for s in seqs
    ]


def topk_mask(topk_index: Tensor, num_experts: int) -> Tensor:
    """``[..., T, E]`` bool: ``m[t, e]`` = token ``t`` chose expert ``e`` (padding ``-1`` ignored)."""
    idx = check_topk_index(topk_index, num_experts)
    require_dense("topk_mask", "[..., T, E]", idx[..., 0].numel(), num_experts)
    mask = torch.zeros(*idx.shape[:-1], num_experts + 1, dtype=torch.bool, device=idx.device)
    # Padding goes to an extra column E, dropped afterwards.
    return mask.scatter_(-1, idx.masked_fill(idx == PAD, num_experts), True)[..., :num_experts]


# --------------------------------------------------------------------------------------------------
# a routing cut into sequences
# --------------------------------------------------------------------------------------------------
def _check_lengths(routing: Routing, lengths: object) -> list[int]:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab.Routing, got {type(routing).__name__}")
    if isinstance(lengths, (str, bytes, Tensor)) or not isinstance(lengths, Sequence):
        raise TypeError(
            f"lengths must be a list of sequence lengths (e.g. [S] * B for a [B, S] batch), "
            f"got {type(lengths).__name__}"
        )
    out = []
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"lengths must hold ints >= 0, got {n!r}")
        out.append(n)
    if sum(out) != routing.num_tokens:
        raise ValueError(f"sequence lengths sum to {sum(out)}, the routing has T={routing.num_tokens}")
    return out


def split_sequences(routing: Routing, lengths: Sequence[int]) -> list[Tensor] | None:
    """One layer's routing cut into sequences: ``topk_index [T_i, k]`` per sequence, on CPU.

    ``lengths``: the token count of each sequence, in order (``[S] * B`` for a ``[B, S]`` batch);
    they sum to ``routing.num_tokens``. A routing with the same number ``k`` of experts on every
    token gives plain ``[T_i, k]`` rows: the router's own order when it records one
    (``Routing.top_k``), else ascending expert ids (SRP and the caches read sets; only SCH's
    within-token clock reads the order). Any other routing (capacity drops, expert choice) gives
    ``Routing.topk_index(fill=-1)``'s rows, ``[T_i, kmax]`` padded with ``-1`` ("no request").
    None when the layer has no assignment at all (nothing to request). Works from the COO entries:
    no ``[T, E]`` view, so any number of experts is fine.
    """
    lens = _check_lengths(routing, lengths)
    if routing.num_tokens == 0 or routing.num_assignments == 0:
        return None
    per_tok = routing.experts_per_token().cpu()
    if int(per_tok.min()) != int(per_tok.max()):
        topk = routing.topk_index(fill=PAD).cpu()  # entry order: the router's own order within a token
    elif routing.top_k is not None:
        topk = routing.topk_index().cpu()
    else:
        k = int(per_tok[0])
        # Sort the entries by (token, expert): the rows hold each token's experts in ascending id.
        key = routing.token_index.cpu() * routing.num_experts + routing.expert_index.cpu()
        topk = routing.expert_index.cpu()[torch.sort(key).indices].view(routing.num_tokens, k)
    return list(torch.split(topk, lens))


def nominal_k(experts_per_token: Tensor) -> int:
    """``max(1, round(mean_t |S_t|))`` of ``experts_per_token [T]``: the ``k`` a ragged routing
    stands for (ours)."""
    n = int(experts_per_token.numel())
    mean = float(experts_per_token.sum()) / n if n else 0.0
    return max(1, int(round(mean)))


def ragged_summary(routing: Routing) -> dict[str, float | int | None] | None:
    """How a layer's routing departs from ``k`` experts per token; None when it does not.

    ``experts_per_token_min/mean/max``; ``nominal_k`` = ``max(1, round(mean |S_t|))``;
    ``tokens_without_expert``: share of tokens with ``|S_t| = 0``; ``capacity_dropped``: share of
    the router's requested assignments that capacity dropped (``Routing.drop_rate()``; None when
    the routing records no request counts, e.g. expert choice).
    """
    per_tok = routing.experts_per_token().cpu()
    if routing.num_tokens == 0 or int(per_tok.min()) == int(per_tok.max()):
        return None
    return {
        "experts_per_token_min": int(per_tok.min()),
        "experts_per_token_mean": float(per_tok.double().mean()),
        "experts_per_token_max": int(per_tok.max()),
        "nominal_k": nominal_k(per_tok),
        "tokens_without_expert": float((per_tok == 0).double().mean()),
        "capacity_dropped": routing.drop_rate() if routing.requested is not None else None,
    }
