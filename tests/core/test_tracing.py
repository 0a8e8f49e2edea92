"""``moelab.trace``: what it records, its summary against hand computation, safetensors round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import moelab
from moelab.core import Routing
from moelab.core.stats import router_entropy as routing_entropy
from moelab.core.tracing import Trace


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = moelab.MoE(8, num_experts=4, top_k=2, router="topk")
        self.mid = nn.Linear(8, 8)
        self.second = moelab.MoE(
            8, num_experts=4, top_k=2, router="topk", router_kwargs={"capacity_factor": 0.5}
        )

    def forward(self, x):
        return self.second(self.mid(self.first(x)))


def test_trace_records_each_layer_detached_on_cpu():
    model = TwoLayer()
    x = torch.randn(2, 6, 8)
    with moelab.trace(model) as tr:
        model(x)
        model(x[:1])
    assert tr.layers == ["first", "second"]
    assert [len(tr.records[n]) for n in tr.layers] == [2, 2]
    for name in tr.layers:
        for r in tr.records[name]:
            assert r.weight.device.type == "cpu" and not r.weight.requires_grad and r.weight.grad_fn is None
            assert not r.logits.requires_grad
    r = tr.routing("first")
    assert r.num_tokens == 18 and r.top_k == 2  # both calls, tokens offset
    # The recorded routing is the router's: same choices as running the router on the input.
    model.eval()
    with moelab.trace(model) as tr2:
        model(x)
    again = model.first.router(x.reshape(-1, 8))
    assert torch.equal(tr2.routing("first").expert_index, again.expert_index)
    torch.testing.assert_close(tr2.routing("first").weight, again.weight.detach())
    # Outside the block nothing is recorded any more.
    model(x)
    assert len(tr2.records["first"]) == 1
    with pytest.raises(KeyError, match="not traced"):
        tr2.routing("mid")


def test_trace_needs_a_routed_layer():
    with pytest.raises(ValueError, match="no moelab routed layer"):
        with moelab.trace(nn.Linear(3, 3)):
            pass


def hand_summary(r: Routing):
    e = r.num_experts
    load = [0] * e
    for ex in r.expert_index.tolist():
        load[ex] += 1
    mean = sum(load) / e
    var = sum((v - mean) ** 2 for v in load) / e
    ent = 0.0
    for row in r.probs.tolist():
        s = sum(row)
        ent += -sum((p / s) * math.log(p / s) for p in row if p > 0)
    ent /= r.num_tokens * math.log(e)
    req = r.requested.sum().item() if r.requested is not None else None
    drop = 0.0 if req is None else 1 - r.num_assignments / req
    return dict(max_over_mean=max(load) / mean, cv=math.sqrt(var) / mean, drop_rate=drop, entropy=ent)


def test_summary_matches_hand_computation():
    model = TwoLayer().train()
    with moelab.trace(model) as tr:
        model(torch.randn(3, 8, 8))
    rows = tr.summary()
    assert [row["layer"] for row in rows] == ["first", "second"]
    for row in rows:
        r = tr.routing(row["layer"])
        ref = hand_summary(r)
        assert row["tokens"] == 24 and row["assignments"] == r.num_assignments
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert rows[0]["drop_rate"] == 0.0 and rows[1]["drop_rate"] > 0


def test_entropy_extremes():
    uniform = Routing.from_topk(
        torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 4, probs=torch.full((3, 4), 0.25)
    )
    assert routing_entropy(uniform) == pytest.approx(1.0)
    onehot = torch.zeros(3, 4)
    onehot[:, 2] = 1
    peaked = Routing.from_topk(torch.full((3, 1), 2), torch.ones(3, 1), 4, probs=onehot)
    assert routing_entropy(peaked) == pytest.approx(0.0, abs=1e-6)
    no_probs = Routing.from_topk(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 4)
    assert math.isnan(routing_entropy(no_probs))


def test_save_load_round_trip_is_safetensors(tmp_path):
    model = TwoLayer()
    with moelab.trace(model) as tr:
        model(torch.randn(2, 5, 8))
        model(torch.randn(1, 5, 8))
    path = tmp_path / "trace.safetensors"
    tr.save(path)
    with open(path, "rb") as f:  # a safetensors file: 8-byte header length, then JSON
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert "moelab_trace" in header["__metadata__"]
    with safe_open(str(path), framework="pt") as f:
        assert any(k.endswith("expert_index") for k in f.keys())
    back = Trace.load(path)
    assert back.layers == tr.layers
    for name in tr.layers:
        a, b = tr.routing(name), back.routing(name)
        for field in ("token_index", "expert_index", "weight", "logits", "probs"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert (a.num_tokens, a.num_experts, a.top_k) == (b.num_tokens, b.num_experts, b.top_k)
        if a.requested is None:
            assert b.requested is None
        else:
            assert torch.equal(a.requested, b.requested)
    for ra, rb in zip(tr.summary(), back.summary(), strict=True):
        for key in ra:
            assert ra[key] == rb[key] or (
                isinstance(ra[key], float) and math.isnan(ra[key]) and math.isnan(rb[key])
            )


def test_load_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a moelab trace"):
        Trace.load(path)


def test_token_ids_recorded_through_context(tmp_path):
    moe = moelab.MoE(8, num_experts=4)
    ids = torch.arange(10).view(2, 5)
    with moelab.trace(moe) as tr:
        moe(torch.randn(2, 5, 8), moelab.RoutingContext(token_ids=ids))
    assert torch.equal(tr.tokens(tr.layers[0]), ids.reshape(-1))
    tr.save(tmp_path / "t.safetensors")
    assert torch.equal(Trace.load(tmp_path / "t.safetensors").tokens(tr.layers[0]), ids.reshape(-1))


def test_trace_keeps_each_calls_batch_shape_through_save_and_load(tmp_path):
    moe = moelab.MoE(8, num_experts=4, top_k=2)
    with moelab.trace(moe) as tr:
        moe(torch.randn(2, 3, 8))
        moe(torch.randn(1, 5, 8))
    name = tr.layers[0]
    assert tr.sequence_lengths(name) == [3, 3, 5]
    tr.save(tmp_path / "t.safetensors")
    back = moelab.Trace.load(tmp_path / "t.safetensors")
    assert back.sequence_lengths(name) == [3, 3, 5]
    with moelab.trace(moe) as flat:
        moe(torch.randn(6, 8))  # a flat input: the sequences are unknown
    assert flat.sequence_lengths(name) is None
