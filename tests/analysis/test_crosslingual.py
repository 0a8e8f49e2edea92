"""Cross-lingual divergence on synthetic parallel data, and the diatheke reader (no apt needed)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.analysis import crosslingual as X
from moelab.core.routing import Routing
from moelab.data import bibles as B


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def js_plain(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def h_plain(p: list[float]) -> float:
    return -sum(a * math.log(a) for a in p if a > 0)


def test_js_zero_for_identical_and_matches_plain_formula():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert float(X.js_divergence(p, p)) == pytest.approx(0.0, abs=1e-12)
    assert float(X.normalized_js(p, p)) == pytest.approx(0.0, abs=1e-12)
    q = torch.tensor([0.4, 0.4, 0.2, 0.0])
    want = js_plain(p.tolist(), q.tolist())
    assert float(X.js_divergence(p, q)) == pytest.approx(want)
    assert float(X.js_divergence(q, p)) == pytest.approx(want)  # symmetric
    m = [(a + b) / 2 for a, b in zip(p.tolist(), q.tolist(), strict=True)]
    assert float(X.normalized_js(p, q)) == pytest.approx(want / h_plain(m))
    mean_h = (h_plain(p.tolist()) + h_plain(q.tolist())) / 2
    assert float(X.normalized_js(p, q, "mean_entropy")) == pytest.approx(want / mean_h)
    assert float(X.normalized_js(p, q, "log2")) == pytest.approx(want / math.log(2))
    assert float(X.normalized_js(p, q, None)) == pytest.approx(want)


def test_normalized_js_bounds_and_batching():
    torch.manual_seed(0)
    p = torch.rand(50, 8) ** 3
    q = torch.rand(50, 8) ** 3
    d = X.normalized_js(p, q)
    assert d.shape == (50,)
    assert bool((d >= 0).all()) and bool((d <= 1 + 1e-12).all())
    # disjoint supports: JS = ln 2, mixture entropy = ln 2 for one-hot p, q -> 1
    assert float(X.normalized_js(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)


def test_js_input_errors():
    with pytest.raises(ValueError, match="non-negative"):
        X.js_divergence(torch.tensor([-0.1, 1.1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="same shape"):
        X.js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="normalize"):
        X.normalized_js(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), "max")


def routing_with_probs(probs: torch.Tensor, k: int = 1) -> Routing:
    top = probs.topk(k, dim=-1)
    return Routing.from_topk(top.indices, top.values, probs.shape[1], probs=probs)


def test_sequence_distribution_is_mean_of_token_probs():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = X.sequence_distribution(routing_with_probs(probs))
    assert q.tolist() == pytest.approx([0.4, 0.15, 0.45])
    # sigmoid-style scores are renormalised per token first
    q2 = X.sequence_distribution(routing_with_probs(probs * 3))
    assert q2.tolist() == pytest.approx([0.4, 0.15, 0.45])
    assert X.split_sequence_distributions(routing_with_probs(probs), [1, 1]).tolist()[1] == pytest.approx(
        [0.1, 0.1, 0.8]
    )


def test_crosslingual_divergence_on_synthetic_parallel_data():
    torch.manual_seed(1)
    E, n = 6, 20
    # layer "shared": both languages route alike; layer "split": language b uses other experts
    base = [torch.softmax(torch.randn(int(torch.randint(3, 9, ())), E), -1) for _ in range(n)]
    shift = torch.tensor([0.0, 0.0, 0.0, 4.0, 4.0, 4.0])
    a = {"shared": [routing_with_probs(p) for p in base], "split": [routing_with_probs(p) for p in base]}
    b = {
        "shared": [routing_with_probs(p) for p in base],
        "split": [routing_with_probs(torch.softmax(p.log() + shift, -1)) for p in base],
    }
    rows = X.crosslingual_divergence(a, b, n_boot=100)
    by = {r["layer"]: r for r in rows}
    assert by["shared"]["divergence"] == pytest.approx(0.0, abs=1e-12)
    assert by["split"]["divergence"] > 0.1
    assert by["split"]["low"] <= by["split"]["divergence"] <= by["split"]["high"]
    want = (
        sum(
            float(X.normalized_js(X.sequence_distribution(x), X.sequence_distribution(y)))
            for x, y in zip(a["split"], b["split"], strict=True)
        )
        / n
    )
    assert by["split"]["divergence"] == pytest.approx(want)
    with pytest.raises(ValueError, match="same non-zero number"):
        X.crosslingual_divergence(a, {"shared": b["shared"][:3], "split": b["split"]})


DIATHEKE_SAMPLE = (
    'Genesis 1:1: <w savlm="strong:H7225">In</w> the beginning, <w>God</w><w>created</w> the heavens.\n'
    '<title canonical="true" type="psalm">A Psalm by David.</title> <l level="1"/>Psalms 3:1: '
    "Yahweh, how my adversaries <note>a footnote</note>have increased!\n"
    "I John 3:16: By this we know love , because he laid down his life for us .\n"
    "(engWEB2015eb)\n"
)


def test_parse_diatheke_output():
    v = X.parse_diatheke(DIATHEKE_SAMPLE)
    assert v == {
        "Genesis 1:1": "In the beginning, God created the heavens.",
        "Psalms 3:1": "Yahweh, how my adversaries have increased!",
        "I John 3:16": "By this we know love, because he laid down his life for us.",
    }


def test_reader_errors_when_diatheke_is_missing(monkeypatch):
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    with pytest.raises(X.DiathekeError, match="apt-get install"):
        X.read_bible("engWEB2015eb")


def test_reader_errors_when_module_is_missing(monkeypatch):
    monkeypatch.setattr(B, "diatheke_modules", lambda: ["spaRV1909eb"])
    with pytest.raises(X.DiathekeError, match="engWEB2015eb"):
        X.read_bible("engWEB2015eb")


def test_parallel_verses_alignment(monkeypatch):
    books = {
        "en": {"Gen 1:1": "In the beginning.", "Gen 1:2": "Only English.", "Gen 1:3": "x" * 50},
        "es": {"Gen 1:1": "En el principio.", "Gen 1:3": "y", "Gen 1:4": "Solo español."},
    }
    monkeypatch.setattr(B, "read_bible", lambda module, key="Gen-Rev": books[module])
    pairs = X.parallel_verses("en", "es")
    assert pairs == [("Gen 1:1", "In the beginning.", "En el principio.")]  # 1:3 fails the length ratio


def test_sequence_distribution_without_probs_reads_the_entries():
    # no probs: each token's combine weights renormalised, averaged over tokens (plain loop below)
    tok = [0, 0, 1, 2, 2, 2, 3]
    exp = [1, 3, 0, 0, 1, 3, 2]
    w = [0.6, 0.2, 0.5, 0.1, 0.1, 0.2, 0.0]  # token 3 has zero weight: a zero row, still a token
    r = Routing(torch.tensor(tok), torch.tensor(exp), torch.tensor(w), num_tokens=4, num_experts=4)
    rows = [[0.0] * 4 for _ in range(4)]
    for t, e, x in zip(tok, exp, w, strict=True):
        rows[t][e] += x
    rows = [[x / sum(row) if sum(row) > 0 else 0.0 for x in row] for row in rows]
    want = [sum(row[e] for row in rows) / 4 for e in range(4)]
    assert X.sequence_distribution(r).tolist() == pytest.approx(want)
    assert torch.allclose(X.token_distributions(r), torch.tensor(rows, dtype=torch.float64))  # dense agrees
    halves = X.split_sequence_distributions(r, [2, 2]).tolist()
    assert halves[0] == pytest.approx([(rows[0][e] + rows[1][e]) / 2 for e in range(4)])
    assert halves[1] == pytest.approx([(rows[2][e] + rows[3][e]) / 2 for e in range(4)])
