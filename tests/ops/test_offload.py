"""The expert-offloading runtime (moelab.ops.offload): bitwise the in-memory model's outputs, the
cache simulator's hit rates on the same trace, disk storage, prefetch and input errors."""

from __future__ import annotations

import copy

import pytest
import torch

import moelab
from moelab.analysis.cache import simulate_cache
from moelab.experts.bank import ExpertBank
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.ops.offload import ExpertCache, ExpertStore, budget_for, expert_nbytes, offload
from moelab.policies import POLICIES, make_policy


def tiny_lm(router: str = "topk", num_experts: int = 8, top_k: int = 2, seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    kw = {"router_kwargs": {"vocab_size": 64, "d_router": 16}} if router == "pregate" else {}
    cfg = MoELMConfig(
        vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, num_experts=num_experts,
        top_k=top_k, router=router, **kw,
    )  # fmt: skip
    return MoELM(cfg).eval()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prefetch", ["none", "auto"])
def test_outputs_equal_in_memory_model(policy, prefetch):
    model = tiny_lm()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = moelab.generate(model, ids[:, :3], 10)
    off = copy.deepcopy(model)
    rt = offload(off, budget_for(off, 3), policy=policy, prefetch=prefetch)
    with torch.no_grad():
        out = off(ids).logits  # 18 tokens touch more than 3 experts: the overflow path runs too
    assert torch.equal(out, ref)
    assert rt.stats()["overflow"] > 0
    assert torch.equal(moelab.generate(off, ids[:, :3], 10), gen_ref)
    assert not any(p.numel() and "experts" in n for n, p in off.named_parameters())
    rt.close()


def test_pregate_model_and_prefetch_hits():
    model = tiny_lm("pregate", top_k=1)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    gen_ref = moelab.generate(model, ids, 12)
    rates = {}
    for mode in ("none", "pregate"):
        off = copy.deepcopy(model)
        rt = offload(off, budget_for(off, 2), policy="lru", prefetch=mode)
        assert torch.equal(moelab.generate(off, ids, 12), gen_ref)
        s = rt.stats()
        rates[mode] = s["hit_rate"]
        if mode == "pregate":
            # every pre-gate layer after the first uses the first's decision: all prefetched
            assert s["prefetch_hits"] > 0 and s["prefetched"] > 0
        rt.close()
    assert rates["pregate"] > rates["none"]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_live_hit_rate_equals_simulator(policy):
    # One token per layer call (batch 1, a one-token prompt, cached decoding): the runtime's
    # requests are the simulator's per-token requests.
    model = tiny_lm(num_experts=8, top_k=2, seed=3)
    off = copy.deepcopy(model)
    rt = offload(off, budget_for(off, 4), policy=policy)
    rt.record_trace = True
    moelab.generate(off, torch.tensor([[5]]), 30)
    for cache, calls in zip(rt.caches, rt.trace, strict=True):
        trace = torch.cat(calls, 0)
        assert trace.shape == (30, 2)
        sim = simulate_cache(trace, 8, cache.capacity, policy)
        assert (cache.stats.hits, cache.stats.requests) == (sim.hits, sim.requests)
        assert cache.stats.bytes_read == cache.stats.misses * cache.expert_nbytes
    rt.close()


def test_live_lookahead_and_belady_fall_back_to_lru():
    stats = {}
    for policy in ("lru", "lookahead", "belady"):
        off = tiny_lm(seed=4)
        rt = offload(off, budget_for(off, 3), policy=policy)
        moelab.generate(off, torch.tensor([[7]]), 20)
        stats[policy] = rt.stats()
    assert stats["lookahead"] == stats["lru"] == stats["belady"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", [2, 3, 5, 8])
def test_replay_equals_simulator(policy, capacity):
    g = torch.Generator().manual_seed(capacity)
    E = 8
    # A skewed trace (a few hot experts), some tokens with a padded (-1) slot.
    probs = torch.tensor([8.0, 6, 4, 2, 1, 1, 1, 1])
    trace = torch.stack([torch.multinomial(probs, 2, generator=g) for _ in range(60)])
    trace[::7, 1] = -1
    bank = ExpertBank(E, 4, 4)
    store = ExpertStore({0: {"gate_up_proj": bank.w_in, "down_proj": bank.down_proj}})
    cache = ExpertCache(0, store, bank, capacity, make_policy(policy, E, 3), torch.device("cpu"))
    got = cache.replay(trace)
    sim = simulate_cache(trace, E, capacity, policy, lookahead=3)
    assert (got.hits, got.requests) == (sim.hits, sim.requests)


def test_disk_storage_round_trip(tmp_path):
    model = tiny_lm(seed=5)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    gen_ref = moelab.generate(model, ids, 8)
    off = copy.deepcopy(model)
    rt = offload(off, budget_for(off, 4), policy="lfu", storage=tmp_path, prefetch="router")
    assert rt.store.path == tmp_path / "experts.safetensors" and rt.store.path.is_file()
    assert torch.equal(moelab.generate(off, ids, 8), gen_ref)
    # every expert stored on disk equals the in-memory model's
    for i, (_, layer) in enumerate(model.moe_layers()):
        for e in (0, 7):
            rows = rt.store.load(i, e)
            assert sorted(rows) == ["down_proj", "gate_up_proj"]
            assert torch.equal(rows["gate_up_proj"], layer.experts.w_in[e])
            assert torch.equal(rows["down_proj"], layer.experts.down_proj[e])
    s = rt.stats()
    assert s["bytes_read"] == (s["misses"] + s["prefetched"]) * expert_nbytes(model)
    rt.close()


def test_budget_too_small_and_bad_input(tmp_path):
    model = tiny_lm()
    one = expert_nbytes(model)
    with pytest.raises(ValueError, match="top_k=2"):
        offload(copy.deepcopy(model), budget_for(model, 2) - 1)
    with pytest.raises(ValueError, match="policy"):
        offload(copy.deepcopy(model), 10 * one, policy="fifo")
    with pytest.raises(ValueError, match="prefetch"):
        offload(copy.deepcopy(model), 10 * one, prefetch="always")
    with pytest.raises(ValueError, match="budget_bytes"):
        offload(copy.deepcopy(model), 0)
    with pytest.raises(ValueError, match="budget_bytes"):
        offload(copy.deepcopy(model), 1.5e6)
    with pytest.raises(TypeError, match="storage"):
        offload(copy.deepcopy(model), budget_for(model, 4), storage=3)
    with pytest.raises(ValueError, match="does not exist"):
        offload(copy.deepcopy(model), budget_for(model, 4), storage=tmp_path / "no" / "x.safetensors")
    with pytest.raises(TypeError, match="model"):
        offload("model", 10 * one)
    with pytest.raises(ValueError, match="no moelab MoE layer"):
        offload(torch.nn.Linear(2, 2), 10 * one)
    off = copy.deepcopy(model)
    offload(off, budget_for(off, 4))
    with pytest.raises(ValueError, match="already offloaded"):
        offload(off, budget_for(model, 4))
