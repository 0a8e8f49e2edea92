"""Plots of a trace: each writes a PNG, draws what the metrics say, and loads matplotlib only when called."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelab
import moelab.analysis as A

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trace() -> moelab.Trace:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        moelab.MoE(16, num_experts=8, top_k=2), moelab.MoE(16, num_experts=4, top_k=1)
    )
    with moelab.trace(model) as tr:
        model(torch.randn(3, 20, 16))
    return tr


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_importing_analysis_loads_neither_matplotlib_nor_transformers():
    code = (
        "import sys, moelab.analysis; "
        "bad = [m for m in ('matplotlib', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_plot_load_draws_load_over_mean(trace, tmp_path):
    fig = A.plot_load(trace, tmp_path / "load.png")
    assert is_png(tmp_path / "load.png")
    img = fig.axes[0].images[0].get_array()
    for i, name in enumerate(trace.layers):
        r = trace.routing(name)
        counts = [0] * r.num_experts
        for e in r.expert_index.tolist():
            counts[e] += 1
        mean = sum(counts) / len(counts)
        assert img[i, : r.num_experts].tolist() == pytest.approx([c / mean for c in counts])
    assert bool(img.mask[1, 4:].all())  # the 4-expert layer has no experts 4..7: masked, grey
    assert fig.axes[0].get_xlabel() == "expert" and len(fig.axes) == 2  # heatmap + colorbar


def test_plot_coactivation_labels_colorbar_and_masked_diagonal(trace, tmp_path):
    fig = A.plot_coactivation(trace, trace.layers[0], tmp_path / "coact.png")
    assert is_png(tmp_path / "coact.png")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert j", "expert i")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in range(8)]
    assert len(fig.axes) == 2  # the panel and its colorbar
    img = ax.images[0].get_array()
    assert bool(img.mask.diagonal().all()) and not bool(img.mask[0, 1])
    # off-diagonal: P(j | i) from plain counts; the colour scale ends at the largest of them
    r = trace.routing(trace.layers[0])
    sets = [set() for _ in range(r.num_tokens)]
    for t, e in zip(r.token_index.tolist(), r.expert_index.tolist(), strict=True):
        sets[t].add(e)
    for i in range(8):
        n_i = sum(1 for s in sets if i in s)
        for j in range(8):
            if i != j:
                want = sum(1 for s in sets if i in s and j in s) / n_i if n_i else 0.0
                assert float(img[i, j]) == pytest.approx(want)
    assert ax.images[0].get_clim()[1] == pytest.approx(float(img.max()))
    # every layer by default; by index; bad selections are named
    assert len(A.plot_coactivation(trace).axes) == 4
    assert A.plot_coactivation(trace, -1).axes[0].get_title() == "layer 1"
    with pytest.raises(ValueError, match="was not traced"):
        A.plot_coactivation(trace, "nope")
    with pytest.raises(ValueError, match="out of range"):
        A.plot_coactivation(trace, 5)
    with pytest.raises(TypeError, match="layer must be"):
        A.plot_coactivation(trace, 1.5)


def test_plot_mutual_information(trace, tmp_path):
    fig = A.plot_mutual_information(trace, tmp_path / "mi.png")
    assert is_png(tmp_path / "mi.png")
    rows = A.trace_metrics(trace)
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([rows[1]["nmi_top1"]])
    one = moelab.Trace()
    one.record("only", trace.routing(trace.layers[0]))
    with pytest.raises(ValueError, match="at least two layers"):
        A.plot_mutual_information(one)
    with pytest.raises(TypeError, match="moelab.Trace"):
        A.plot_load(trace.routing(trace.layers[0]))
