"""``moelab.generate``: greedy or sampled decoding with a KV cache, for ``MoELM`` and its depth routers.

    model.eval()
    out = moelab.generate(model, prompt_ids, max_new_tokens=64)                      # greedy
    out = moelab.generate(model, prompt_ids, 64, do_sample=True, temperature=0.8, top_p=0.95, seed=0)

With ``use_cache=True`` (default) the prompt runs once (prefill) and each new token runs alone,
attending to the keys and values cached in a ``moelab.Session``: every attention keeps its own
cache, so a block that a depth router skips for a token stores nothing for it, and a block that a
recursion runs several times keeps one cache per application. ``use_cache=False`` recomputes the
whole sequence for every new token: the reference the cache must match (greedy, fp32: token for
token, for every router whose evaluation forward is causal, ``Router.causal_at_eval``; a
non-causal router, expert choice for instance, routes the decoded tokens differently from a full
forward, and the two paths may then differ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.context import RoutingContext, Session


def sample_next(
    logits_BV: Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token ``[B]`` from last-position logits ``[B, V]``: argmax, or a sample from the
    softmax at ``temperature`` restricted to the ``top_k`` most likely tokens and to the smallest
    set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020)."""
    if not do_sample:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs_sorted = sorted_logits.softmax(dim=-1)
        drop_sorted = probs_sorted.cumsum(dim=-1) - probs_sorted >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(
    model: Any, input_ids: Any, max_new_tokens: Any, temperature: float, top_k: Any, top_p: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a moelab MoELM), got {type(model).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [B, S] integer tensor, got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row (the prompt)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or None, got {top_p!r}")
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_seq_len={limit}"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each row of ``input_ids [B, S]`` by ``max_new_tokens`` tokens; returns ``[B, S + n]``.

    ``model``: a ``MoELM`` (any router, any depth router), or any module whose
    ``forward(ids, ctx=RoutingContext(session=...))`` returns an object with ``logits [B, S, V]``
    and honours the session. The model runs in eval mode (restored afterwards). Sampling draws
    from ``generator``, or from a fresh one seeded with ``seed``. A row that emits ``eos_token_id``
    is padded with it; decoding stops early once every row has. ``use_cache``: see the module
    docstring.
    """
    _check(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        ids = input_ids.long()
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        session = Session() if use_cache else None
        step_ids = ids
        for _ in range(max_new_tokens):
            if session is not None:
                logits = model(step_ids, ctx=RoutingContext(session=session)).logits[:, -1]
            else:
                logits = model(ids).logits[:, -1]
            nxt = sample_next(
                logits,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            step_ids = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        return ids
    finally:
        model.train(was_training)
