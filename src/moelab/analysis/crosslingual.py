"""Cross-lingual routing divergence, and a reader for verse-aligned Bibles (SWORD / diatheke).

Bandarkar et al. 2025, "Multilingual Routing in Mixture-of-Experts" (arXiv:2510.04694): for a
sequence ``i`` and a layer ``l``, the routing distribution is the mean of the router's
post-softmax probabilities over the sequence's tokens,

    q_i^(lang, l) = (1 / L_i) sum_t p_t^(l),

and the divergence between two languages at layer ``l`` is an entropy-normalised Jensen-Shannon
divergence between ``q`` of parallel sentences, averaged over sentence pairs. The paper names
the normaliser "entropy"; the exact form was not in the sources we could read, so the default
here (our choice) divides by the entropy of the mixture,

    D(p, q) = JS(p, q) / H((p + q) / 2),     JS(p, q) = H((p+q)/2) - (H(p) + H(q)) / 2,

which lies in ``[0, 1]`` (JS <= H(mixture)) and does not grow with ``log E`` the way raw JS can
for spread-out routers. ``normalize="mean_entropy"`` (divide by ``(H(p)+H(q))/2``), ``"log2"``
(JS / ln 2, the classic [0, 1] scaling) and ``None`` (raw JS, nats) are available.

Routers whose scores are not a distribution (sigmoid) are renormalised per token before
averaging; a routing without ``probs`` falls back to its combine weights, renormalised per token
and read from the COO entries (negative weights count as 0), so that a router over ~10^6 experts,
which never forms ``[T, E]`` probabilities, still gets a sequence distribution ``[E]``. The
divergence stacks one ``[E]`` distribution per sentence and refuses (``ValueError``) beyond the
dense-view limit (``moelab.core.routing.MAX_DENSE_ELEMENTS``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from moelab.analysis.limits import require_dense
from moelab.analysis.stats import CI, CI_ALPHA, NUM_BOOTSTRAP, bootstrap_indices, interval_from_replicates
from moelab.core.routing import Routing
from moelab.data.bibles import (  # noqa: F401  (re-exported: the reader moved to moelab.data, for the tasks)
    ENGLISH_MODULE,
    SPANISH_MODULE,
    DiathekeError,
    diatheke_modules,
    parallel_verses,
    parse_diatheke,
    read_bible,
)

NORMALIZERS = ("mixture_entropy", "mean_entropy", "log2", None)


# --------------------------------------------------------------------------------------------------
# divergences
# --------------------------------------------------------------------------------------------------
def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim of a distribution tensor ``[..., E]``."""
    p = p.double()
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)


def _check_dist(p: object, name: str) -> Tensor:
    if not isinstance(p, Tensor) or p.dim() < 1:
        raise TypeError(f"{name} must be a tensor [..., E] of probabilities, got {type(p).__name__}")
    if bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} must be finite and non-negative")
    s = p.double().sum(-1, keepdim=True)
    if bool((s <= 0).any()):
        raise ValueError(f"{name} has a row summing to 0; cannot normalise it to a distribution")
    return p.double() / s


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) over the last dim; inputs are renormalised to sum to 1."""
    p, q = _check_dist(p, "p"), _check_dist(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    m = (p + q) / 2
    return (entropy(m) - (entropy(p) + entropy(q)) / 2).clamp_min(0.0)


def normalized_js(p: Tensor, q: Tensor, normalize: str | None = "mixture_entropy") -> Tensor:
    """Entropy-normalised JS divergence (see the module docstring); 0 where both are one-hot on the
    same expert (0/0)."""
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
    js = js_divergence(p, q)
    if normalize is None:
        return js
    if normalize == "log2":
        return js / torch.log(torch.tensor(2.0, dtype=torch.float64))
    pn, qn = _check_dist(p, "p"), _check_dist(q, "q")
    denom = entropy((pn + qn) / 2) if normalize == "mixture_entropy" else (entropy(pn) + entropy(qn)) / 2
    return torch.where(denom > 0, js / denom.clamp_min(1e-300), torch.zeros_like(js))


def token_distributions(routing: Routing) -> Tensor:
    """``[T, E]`` float64: each token's routing distribution (``probs`` renormalised, else the
    combine weights ``dense()`` renormalised). Refuses a ``[T, E]`` view that is too large; the
    sequence distributions below do not need one."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab.Routing, got {type(routing).__name__}")
    if routing.probs is None:
        routing.require_dense("token_distributions")
    p = routing.probs if routing.probs is not None else routing.dense()
    p = p.detach().double().cpu().clamp_min(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-300)


def _sequence_sums(routing: Routing, sequence_of_token: Tensor, num_sequences: int) -> Tensor:
    """``[num_sequences, E]``: per sequence, the sum over its tokens of the token distributions."""
    E = routing.num_experts
    if routing.probs is not None:
        p = routing.probs.detach().double().cpu().clamp_min(0)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        return torch.zeros(num_sequences, E, dtype=torch.float64).index_add_(0, sequence_of_token, p)
    # From the entries: w_te / sum_e w_te per token, summed into (sequence, expert) cells.
    tok = routing.token_index.cpu()
    w = routing.weight.detach().double().cpu().clamp_min(0)
    per_token = torch.zeros(routing.num_tokens, dtype=torch.float64).index_add_(0, tok, w)
    w = w / per_token[tok].clamp_min(1e-300)
    cell = sequence_of_token[tok] * E + routing.expert_index.cpu()
    out = torch.zeros(num_sequences * E, dtype=torch.float64).index_add_(0, cell, w)
    return out.view(num_sequences, E)


def sequence_distribution(routing: Routing) -> Tensor:
    """``[E]``: ``q = mean_t p_t`` over the routing's tokens (one sequence)."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab.Routing, got {type(routing).__name__}")
    if routing.num_tokens == 0:
        raise ValueError("routing has no tokens; a sequence distribution needs at least one")
    one = torch.zeros(routing.num_tokens, dtype=torch.long)
    return _sequence_sums(routing, one, 1)[0] / routing.num_tokens


def split_sequence_distributions(routing: Routing, lengths: Sequence[int]) -> Tensor:
    """``[N, E]``: ``q`` of consecutive sequences of the given token ``lengths`` (summing to T)."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab.Routing, got {type(routing).__name__}")
    lengths = [int(n) for n in lengths]
    if any(n < 1 for n in lengths) or sum(lengths) != routing.num_tokens:
        raise ValueError(
            f"lengths must be positive and sum to the routing's T={routing.num_tokens}, got sum {sum(lengths)}"
        )
    require_dense("split_sequence_distributions", "[N, E]", len(lengths), routing.num_experts)
    n = torch.tensor(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), n)
    return _sequence_sums(routing, seq, len(lengths)) / n.double().unsqueeze(1)


def pairwise_divergence(
    q_a: Tensor,
    q_b: Tensor,
    normalize: str | None = "mixture_entropy",
    n_boot: int = NUM_BOOTSTRAP,
    alpha: float = CI_ALPHA,
    seed: int = 0,
) -> CI:
    """Mean over aligned pairs ``(q_a[i], q_b[i])`` of ``normalized_js``, with a bootstrap CI over
    pairs (basic interval, as for SRP/SCH)."""
    if q_a.shape != q_b.shape or q_a.dim() != 2:
        raise ValueError(f"q_a and q_b must be aligned [N, E], got {tuple(q_a.shape)} and {tuple(q_b.shape)}")
    d = normalized_js(q_a, q_b, normalize)
    est = d.mean()
    idx = bootstrap_indices(d.shape[0], n_boot, seed)
    reps = d[idx].mean(1)
    lo, hi = interval_from_replicates(est, reps, alpha, "basic")
    return CI(float(est), float(lo), float(hi), n_boot, float(alpha), "basic")


def crosslingual_divergence(
    routings_a: dict[str, Sequence[Routing]],
    routings_b: dict[str, Sequence[Routing]],
    normalize: str | None = "mixture_entropy",
    n_boot: int = NUM_BOOTSTRAP,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """Per layer: divergence between parallel sentences.

    ``routings_a[layer][i]`` and ``routings_b[layer][i]`` are the routings of sentence ``i`` in the
    two languages (one ``Routing`` per sentence, e.g. ``Trace.records`` when each sentence was run
    in its own forward). Returns ``[{"layer", "divergence", "low", "high", "pairs"}]``.
    """
    rows: list[dict[str, float | str]] = []
    for layer, ra in routings_a.items():
        if layer not in routings_b:
            raise ValueError(f"layer {layer!r} is missing from routings_b")
        rb = routings_b[layer]
        if len(ra) != len(rb) or not ra:
            raise ValueError(
                f"layer {layer!r}: need the same non-zero number of sentences, got {len(ra)} and {len(rb)}"
            )
        require_dense(f"crosslingual_divergence (layer {layer!r})", "[pairs, E]", len(ra), ra[0].num_experts)
        qa = torch.stack([sequence_distribution(r) for r in ra])
        qb = torch.stack([sequence_distribution(r) for r in rb])
        ci = pairwise_divergence(qa, qb, normalize, n_boot=n_boot, seed=seed)
        rows.append(
            {"layer": layer, "divergence": ci.estimate, "low": ci.low, "high": ci.high, "pairs": len(ra)}
        )
    return rows


# --------------------------------------------------------------------------------------------------
# verse-aligned Bibles: the reader lives in moelab.data.bibles (the translation tasks read it too)
# --------------------------------------------------------------------------------------------------
def split_parallel(
    verses: list[tuple[str, str, str]], every: int = 50
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """``(train, held_out)``: every ``every``-th pair held out (deterministic), the rest for training."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 2:
        raise ValueError(f"every must be an int >= 2, got {every!r}")
    return [v for i, v in enumerate(verses) if i % every], verses[::every]


def write_bilingual_corpus(
    verses: list[tuple[str, str, str]], directory: str | Path, langs: tuple[str, str] = ("en", "es")
) -> Path:
    """Write parallel verses as one text file per book and language (``en_Genesis.txt``, ...), a
    verse per line, so that a by-file train/val split (``moelab.data``) holds out whole
    books of both languages. Returns ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    books: dict[tuple[str, str], list[str]] = {}
    for ref, text_a, text_b in verses:
        book = ref.rsplit(" ", 1)[0]
        books.setdefault((langs[0], book), []).append(text_a)
        books.setdefault((langs[1], book), []).append(text_b)
    for (lang, book), lines in books.items():
        name = re.sub(r"[^A-Za-z0-9]+", "_", book)
        (out / f"{lang}_{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
