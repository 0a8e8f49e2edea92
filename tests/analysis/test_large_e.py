"""A routing over E = 2^20 experts (product-key pools): what works from the COO entries never
allocates T x E, and what needs a dense view refuses with a ValueError naming itself."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import moelab
import moelab.analysis as A
from moelab.analysis.cache import next_use_table, simulate_cache
from moelab.analysis.crosslingual import split_sequence_distributions, token_distributions
from moelab.analysis.locality import layer_locality
from moelab.analysis.report import AnalysisOptions, analyze_trace, write_report
from moelab.analysis.sequences import ragged_summary
from moelab.core.routing import MAX_DENSE_ELEMENTS

T, E, K = 4096, 2**20, 2
LIMIT = 2**26  # no tensor this large may appear (T x E is 2^32)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (sparse: stored entries)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                n = t._nnz() if t.is_sparse else t.numel()
                if n > self.largest:
                    self.largest, self.op = n, str(func)
        return out


def pool_routing(seed: int) -> moelab.Routing:
    """T tokens, each on two distinct experts drawn from 2^20, with softmax-like weights."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, E, (T, 1), generator=g)
    idx = (first + torch.tensor([0, 1 + seed])) % E
    w = torch.rand(T, K, generator=g)
    return moelab.Routing.from_topk(idx, w / w.sum(1, keepdim=True), E)


@pytest.fixture(scope="module")
def pool_trace() -> moelab.Trace:
    tr = moelab.Trace()
    tr.record("pool.0", pool_routing(0))
    tr.record("pool.1", pool_routing(1))
    return tr


def test_limit_is_the_core_one():
    assert MAX_DENSE_ELEMENTS == LIMIT and T * E > LIMIT


def test_coo_metrics_never_allocate_t_by_e(pool_trace):
    r0, r1 = (pool_trace.routing(n) for n in pool_trace.layers)
    with LargestTensor() as mode:
        summary = pool_trace.summary()
        rows = A.trace_metrics(pool_trace)
        stats = A.routing_stats(r0)
        load = A.expert_load(r0)
        matrix = A.load_matrix(pool_trace)
        top1 = A.top1_experts(r0)
        mi_top1 = A.routing_mutual_information(r0, r1, "top1")
        mi_set = A.routing_mutual_information(r0, r1, "set")
        seqs = A.split_sequences(r0, [256] * 16)
        q = A.sequence_distribution(r0)
        q2 = split_sequence_distributions(r0, [2048, 2048])
        lru_hits = simulate_cache(seqs[0], E, 4, "lru").hits
        ragged = ragged_summary(r0)
    assert mode.largest < LIMIT, f"{mode.op} made a tensor of {mode.largest:,} elements"
    # and the numbers are right, against plain counts
    counts = torch.bincount(r0.expert_index, minlength=E)
    assert stats["max_over_mean"] == pytest.approx(int(counts.max()) / (T * K / E))
    assert stats["dead_experts"] == int((counts == 0).sum())
    assert [s["max_over_mean"] for s in summary] == pytest.approx([r["max_over_mean"] for r in rows])
    assert load.shape == (E,) and float(load.sum()) == pytest.approx(1.0)
    assert matrix.shape == (2, E)
    w = r0.weight.view(T, K)
    want_top1 = torch.where(
        w[:, 0] >= w[:, 1], r0.expert_index.view(T, K)[:, 0], r0.expert_index.view(T, K)[:, 1]
    )
    # equal weights would pick the lower id; random floats make ties vanishingly unlikely
    assert torch.equal(top1, want_top1)
    assert 0 < mi_top1["nmi"] <= 1 and 0 < mi_set["nmi"] <= 1
    assert len(seqs) == 16 and torch.equal(torch.cat(seqs), r0.topk_index())
    assert float(q.sum()) == pytest.approx(1.0) and q2.shape == (2, E)
    assert lru_hits >= 0 and ragged is None


def test_report_skips_dense_analyses_and_keeps_the_rest(pool_trace, tmp_path):
    with LargestTensor() as mode:
        res = analyze_trace(pool_trace, [256] * 16, AnalysisOptions(segment_lengths=(16,), n_boot=10))
    assert mode.largest < LIMIT, f"{mode.op} made a tensor of {mode.largest:,} elements"
    assert res["load"] is None and res["srp"] == {"pool.0": {}, "pool.1": {}} and not res["cache"]
    for name in pool_trace.layers:
        assert "SRP, SCH and the cache curves needs a dense" in res["skipped"][name]
        assert "co-activation not drawn" in res["skipped"][name]
    assert res["metrics"][1]["nmi_set"] > 0
    md = (write_report(res, tmp_path)["markdown"]).read_text()
    assert "## Skipped" in md and "per-expert load not stored" in md


def test_dense_analyses_refuse_clearly(pool_trace):
    r = pool_trace.routing("pool.0")
    idx = r.topk_index()
    with LargestTensor() as mode:
        with pytest.raises(ValueError, match=r"coactivation needs a dense \[E, E\]"):
            A.coactivation(r)
        with pytest.raises(ValueError, match="coactivation needs"):
            A.plot_coactivation(pool_trace, 0)
        with pytest.raises(ValueError, match="^SRP needs a dense"):
            A.srp(idx.view(16, 256, K), E, 16)
        with pytest.raises(ValueError, match="^SRP needs a dense"):
            layer_locality(r, [T])
        with pytest.raises(ValueError, match="^SCH needs a dense"):
            A.sch(idx, E, 16, cache_size=4)
        with pytest.raises(ValueError, match="^topk_mask needs a dense"):
            A.topk_mask(idx, E)
        with pytest.raises(ValueError, match="^next_use_table needs a dense"):
            next_use_table(idx, E)
        with pytest.raises(ValueError, match="'belady' cache simulator needs a dense"):
            simulate_cache(idx, E, 4, "belady")
        with pytest.raises(ValueError, match="^token_distributions needs a dense"):
            token_distributions(r)
        with pytest.raises(ValueError, match="crosslingual_divergence .* needs a dense"):
            A.crosslingual_divergence({"pool.0": [r] * 100}, {"pool.0": [r] * 100})
    assert mode.largest < LIMIT, f"{mode.op} made a tensor of {mode.largest:,} elements before refusing"
