"""``RoutingContext`` and ``Session``: batch shape, history, slots keyed by module, no side effects."""

from __future__ import annotations

import gc

import pytest
import torch

import moelab
from moelab import MoE, RoutingContext, Session
from moelab.core import Router, Routing
from moelab.models import MoELM, MoELMConfig


class RecordingRouter(Router):
    """A top-1 router that records the context it was handed (what a router can rely on)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__(d_model, num_experts)
        self._init_gate()
        self.seen: list[RoutingContext] = []

    def route(self, x_TD, ctx):
        self.seen.append(ctx)
        w, idx = torch.softmax(self.router_logits(x_TD), -1).topk(1, -1)
        return Routing.from_topk(idx, w, self.num_experts, validate=False)


class CarryRouter(RecordingRouter):
    """Counts calls in a per-forward slot and a per-session slot of its own."""

    def route(self, x_TD, ctx):
        ctx.slot(self)["calls"] = ctx.slot(self).get("calls", 0) + 1
        if ctx.session is not None:
            s = ctx.session.slot(self)
            s["tokens"] = s.get("tokens", 0) + x_TD.shape[0]
        return super().route(x_TD, ctx)


def test_layer_gives_the_router_the_batch_shape_without_touching_the_callers_context():
    router = RecordingRouter(8, 4)
    moe = MoE(8, num_experts=4, top_k=1, router=router)
    ctx = RoutingContext(step=3)
    moe(torch.randn(2, 5, 8), ctx)
    seen = router.seen[-1]
    assert seen.batch_shape == (2, 5) and seen.seq_len == 5 and seen.step == 3
    # v1 wrote ctx.seq_len into the caller's context; v2 derives a context and leaves it alone.
    assert ctx.batch_shape is None and ctx.seq_len is None
    # The one thing the layer adds is its routing, to the shared history.
    assert len(ctx.history) == 1 and ctx.history[0].num_tokens == 10
    moe(torch.randn(7, 8), ctx)  # a flat input: one sequence, no batch shape
    assert router.seen[-1].batch_shape is None and len(ctx.history) == 2


def test_history_holds_earlier_layers_of_this_forward():
    cfg = MoELMConfig(d_model=32, n_layers=3, n_heads=2, num_experts=4, top_k=2, max_seq_len=16)
    model = MoELM(cfg)
    ctx = RoutingContext()
    model(torch.randint(0, 256, (2, 8)), ctx=ctx)
    assert [r.num_tokens for r in ctx.history] == [16, 16, 16]
    assert ctx.token_ids is None  # the model derived its own context; the caller's is unchanged
    # A router in layer i sees the i routings before it.
    lengths = []

    def probe(routing, site):
        lengths.append(len(site.ctx.history))
        return routing

    with moelab.override_routing(model, probe):
        model(torch.randint(0, 256, (1, 4)))
    assert lengths == [0, 1, 2]


def test_slots_are_keyed_by_the_owning_module_and_shared_by_derived_contexts():
    a, b = CarryRouter(8, 4), CarryRouter(8, 4)
    ctx = RoutingContext()
    x = torch.randn(3, 8)
    a(x, ctx), a(x, ctx.replace(layer_index=1)), b(x, ctx)
    assert ctx.slot(a) == {"calls": 2} and ctx.slot(b) == {"calls": 1}
    with pytest.raises(TypeError, match="keyed by the owning module"):
        ctx.slot("rmoe")
    with pytest.raises(ValueError, match="shares history"):
        ctx.replace(history=[])


def test_session_lasts_across_forwards_and_does_not_keep_modules_alive():
    router = CarryRouter(8, 4)
    session = Session()
    for t in (5, 1, 1):
        router(torch.randn(t, 8), RoutingContext(session=session))
        session.advance(t)
    assert session.slot(router) == {"tokens": 7} and session.num_seen_tokens == 7
    del router
    gc.collect()
    assert "owners=0" in repr(session)
    session.reset()
    assert session.num_seen_tokens == 0


def test_bad_context_arguments():
    moe = MoE(8, num_experts=4, top_k=2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="ctx must be a moelab RoutingContext or None, got Tensor"):
        moe(x, torch.zeros(3))
    with pytest.raises(TypeError, match="ctx must be a moelab RoutingContext"):
        moe.router(x[0], {"step": 1})
    with pytest.raises(ValueError, match="batch_shape"):
        RoutingContext(batch_shape=(2,))
    with pytest.raises(TypeError, match="session"):
        RoutingContext(session={})
    with pytest.raises(ValueError, match="num_tokens"):
        Session().advance(-1)


def test_router_keyword_errors_name_the_bad_argument_and_the_public_ones():
    with pytest.raises(ValueError) as err:
        moelab.build_router("topk", d_model=8, num_experts=4, top_kk=2)
    msg = str(err.value)
    assert "does not take 'top_kk'" in msg and "top_k" in msg and "capacity_factor" in msg
    assert msg.count("got") == 0 and "d_model" not in msg and "self" not in msg
