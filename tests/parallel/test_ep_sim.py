"""bench/ep_sim.py's functions on tiny inputs: the step-time model by hand, loads, one simulated step."""

from __future__ import annotations

import numpy as np
import pytest

from bench import ep_sim
from bench.ep_sim import StepModel, draw_loads, simulate, step_time, tile_popularity, zipf_popularity

# Round numbers: 6 d h = 6 FLOPs per assignment at 6 FLOP/s, 1 byte per assignment, NVLink 1 B/s, IB 0.5 B/s.
UNIT = StepModel(d_model=1, expert_hidden=1, bytes_per_elem=1, flops_per_s=6.0, nvlink_bytes_per_s=1.0,
                 ib_bytes_per_s=0.5, gpus_per_node=2)  # fmt: skip


def test_step_time_by_hand():
    # P = 4 ranks on 2 nodes of 2. Rank loads 8, 4, 4, 0: rank s sends load_d / 4 to each d.
    t = step_time(np.array([8.0, 4.0, 4.0, 0.0]), [], UNIT)
    assert t["compute_ms"] == pytest.approx(8e3)  # max load 8 x 6 FLOPs / 6 FLOP/s = 8 s
    # Rank 0 receives 8/4 = 2 B from its node peer (NVLink: 2 s) and from each of the 2 remote
    # ranks (IB: 4 B / 0.5 B/s = 8 s), the slowest link of any rank: 8 s per phase, 16 s for both.
    assert t["comm_ms"] == pytest.approx(16e3)
    assert t["step_ms"] == pytest.approx(24e3)
    # Shipping one expert (3 d h bytes = 3 B) from rank 0 to rank 2 (the other node) in the
    # dispatch: rank 2 then receives 2 + 3 = 5 B over IB (10 s); the combine stays at 8 s.
    t2 = step_time(np.array([8.0, 4.0, 4.0, 0.0]), [(0, 0, 2)], UNIT)
    assert t2["comm_ms"] == pytest.approx(18e3)
    # One rank: no traffic at all.
    assert step_time(np.array([5.0]), [], UNIT)["comm_ms"] == 0.0


def test_loads():
    rng = np.random.default_rng(0)
    p = zipf_popularity(16, 1.0, rng)
    assert p.sum() == pytest.approx(1.0) and p.max() == pytest.approx(1 / sum(1 / i for i in range(1, 17)))
    tiled = tile_popularity(np.array([0.5, 0.25, 0.25]), 6)
    assert tiled.tolist() == pytest.approx([0.25, 0.125, 0.125] * 2)
    assert draw_loads(p, 1000, rng).sum() == 1000
    with pytest.raises(ValueError, match="multiple"):
        tile_popularity(np.ones(3) / 3, 8)


def test_simulate_one_step(monkeypatch):
    monkeypatch.setattr(ep_sim, "TOKENS_PER_RANK", 512)
    rng = np.random.default_rng(0)
    pop = zipf_popularity(32, 1.5, rng)
    rows = {r["placement"]: r for r in simulate(pop, 8, rng)}
    assert list(rows) == list(ep_sim.PLACEMENTS)
    assert rows["plain_ep"]["speedup"] == 1.0
    # Heavy skew: LLEP reaches its budget (alpha = 1.1) and both planners beat plain EP.
    assert rows["llep"]["max_over_mean"] <= 1.1 + 1e-9 and rows["llep"]["shipped"] > 0
    for label in ("llep", "eplb", "eplb_oracle"):
        assert rows[label]["max_over_mean"] < rows["plain_ep"]["max_over_mean"]
        assert rows[label]["speedup"] > 1.0


def test_traced_loads_are_frequencies():
    for freq in ep_sim.traced_moelm(tokens=512).values():
        assert freq.shape == (64,) and freq.sum() == pytest.approx(1.0)


def test_traced_olmoe_loads():
    freqs = ep_sim.traced_olmoe(tokens=256)
    assert list(freqs) == ["olmoe-0", "olmoe-1"]
    for freq in freqs.values():
        assert freq.shape == (64,) and freq.sum() == pytest.approx(1.0)
