"""γ-MoD (moelab.depth.gamma_mod, moelab.hf.gamma_mod) against references: the base model when every
token is protected, plain per-sequence loops of the paper's rules, the aux-loss formula, ARank's
ordering, and uncached greedy decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from smollm2 import FIBONACCI_IDS, load_smollm2

import moelab
import moelab.depth.gamma_mod as gm
from moelab.core.context import RoutingContext, Session
from moelab.core.routing import Routing
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(n_layers: int = 4, moe_every: int = 100, seed: int = 0, **depth) -> MoELM:
    torch.manual_seed(seed)
    cfg = MoELMConfig(
        vocab_size=256,
        d_model=32,
        n_layers=n_layers,
        n_heads=2,
        max_seq_len=48,
        moe_every=moe_every,
        num_experts=4,
        top_k=2,
    )
    if depth:
        cfg = MoELMConfig.from_dict({**cfg.to_dict(), "depth": "gamma_mod", "depth_kwargs": depth})
    return MoELM(cfg)


def converted(base: MoELM, router_std: float = 1.0, **options) -> MoELM:
    """A copy of ``base`` converted to γ-MoD, its router drawn wide enough that decisions vary."""
    model = MoELM(base.config)
    model.load_state_dict(base.state_dict())
    gm.convert(model, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        model.depth.router.weight.normal_(0.0, router_std)
    return model


def ids_of(b: int = 3, s: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def logits_of(model: MoELM, x: torch.Tensor) -> torch.Tensor:
    h = model.norm(x)
    return F.linear(h, model.embed.weight)


def reference_forward(
    model: MoELM, ids: torch.Tensor, protected: torch.Tensor | None, mode: str, decode_from: int | None = None
):
    """γ-MoD written plainly: one sequence at a time, Python sorting and thresholds, the block
    run on a list of kept positions, the MLP output times p (dense blocks only).

    mode: "topk" (training), "paper" (prefill threshold; the decode threshold for positions >=
    ``decode_from``), "causal"."""
    d = model.depth
    rope = (model.rope_cos, model.rope_sin)
    b, s = ids.shape
    rows, kept_all = [], []
    for r in range(b):
        x = model.embed(ids[r : r + 1])
        kept_layers = []
        for i, blk in enumerate(model.blocks):
            if i not in d.layers:
                x = blk(x, rope, RoutingContext())
                continue
            p = torch.softmax(d.router(blk.attn_norm(x)).float(), -1)[0, :, 1]
            prot = [bool(protected[r, t]) if protected is not None else False for t in range(s)]
            score = [float(p[t]) + (1.0 if prot[t] else 0.0) for t in range(s)]
            if mode == "topk":
                n_routable = s - sum(prot)
                k = math.ceil(s - (1 - d.capacity) * n_routable - 1e-9)
                order = sorted(range(s), key=lambda t: -score[t])  # stable: ties keep position order
                keep = sorted(order[:k])
            elif mode == "paper":
                keep = [
                    t
                    for t in range(s)
                    if (
                        score[t] >= d.decode_threshold
                        if decode_from is not None and t >= decode_from
                        else score[t] > d.prefill_threshold
                    )
                ]
            else:
                keep = [t for t in range(s) if score[t] >= d.decode_threshold]
            kept_layers.append(keep)
            if not keep:
                continue
            xs = x[:, keep]
            pos = torch.tensor([keep])
            hid = xs + blk.attn(blk.attn_norm(xs), rope, pos)
            y = blk.ffn(blk.ffn_norm(hid)) * p[keep][None, :, None]
            x = x.clone()
            x[:, keep] = hid + y
        rows.append(logits_of(model, x))
        kept_all.append(kept_layers)
    return torch.cat(rows), kept_all


# -- the base model when every token is protected -------------------------------------------------
@pytest.mark.parametrize("moe_every", [100, 1])
@pytest.mark.parametrize("gate", ["ungated_protected", "none"])
def test_every_token_protected_equals_base_model_exactly(moe_every, gate):
    base = tiny(moe_every=moe_every)
    ids = ids_of()
    types = torch.zeros_like(ids)
    opts = {"gate_protected": False} if gate == "ungated_protected" else {"gate": "none"}
    model = converted(base, layers=[1, 2, 3], protected_types=[0], **opts)
    for train in (True, False):
        base.train(train)
        model.train(train)
        with torch.no_grad():
            ref = base(ids).logits
            out = model(ids, token_types=types)
        assert torch.equal(out.logits, ref)
    # the flops of a fully kept model: the base model's plus the router's
    base(ids)
    model(ids, token_types=types)
    router = 2 * 32 * 2 * 3  # 2 FLOPs x d x 2 outputs x 3 MoD layers, per token
    assert model.flops_per_token() == pytest.approx(base.flops_per_token() + router, rel=1e-9)


def test_every_token_protected_with_the_paper_gate_scales_the_mlp_by_p():
    base = tiny()
    model = converted(base, layers=[1, 3], protected_types=[0])  # gate_protected=True: official
    ids = ids_of()
    types = torch.zeros_like(ids)
    with torch.no_grad():
        ref, kept = reference_forward(model, ids, types == 0, "topk")
        out = model.train()(ids, token_types=types).logits
    assert all(k == list(range(16)) for layers in kept for k in layers)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(out, base(ids).logits, atol=1e-3)  # the gate changes the output


# -- selection against a plain per-sequence loop ----------------------------------------------------
@pytest.mark.parametrize("capacity", [0.5, 0.25, 0.9])
def test_training_forward_equals_per_sequence_loop(capacity):
    base = tiny()
    model = converted(base, layers=[1, 2], capacity=capacity, protected_types=[1]).train()
    ids = ids_of(b=3, s=16)
    types = (torch.rand(3, 16, generator=torch.Generator().manual_seed(5)) < 0.3).long()
    ctx = RoutingContext()
    with torch.no_grad():
        ref, kept = reference_forward(model, ids, types == 1, "topk")
        out = model(ids, token_types=types, ctx=ctx).logits
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # the traced routings name the same tokens; every protected token is among them
    for layer, routing in enumerate(ctx.history):
        chosen = sorted(routing.token_index.tolist())
        expected = sorted(r * 16 + t for r in range(3) for t in kept[r][layer])
        assert chosen == expected
        for r in range(3):
            assert set(torch.nonzero(types[r] == 1).flatten().tolist()) <= set(kept[r][layer])
            n_routable = int((types[r] == 0).sum())
            assert len(kept[r][layer]) == math.ceil(16 - (1 - capacity) * n_routable - 1e-9)


@pytest.mark.parametrize("rule", ["paper", "causal"])
def test_eval_thresholds_equal_per_sequence_loop(rule):
    base = tiny()
    model = converted(base, router_std=0.6, layers=[1, 2, 3], rule=rule, protected_types=[1]).eval()
    ids = ids_of()
    types = (torch.rand(3, 16, generator=torch.Generator().manual_seed(6)) < 0.2).long()
    with torch.no_grad():
        ref, kept = reference_forward(model, ids, types == 1, rule)
        out = model(ids, token_types=types).logits
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    counts = [len(k) for row in kept for k in row]
    assert min(counts) < 16  # the rule skipped tokens (the test exercises the gather)
    if rule == "causal":
        assert min(counts) > 0


def test_selection_rules_by_formula():
    p = torch.tensor([[0.004, 0.006, 0.49, 0.5, 0.9, 0.0]])
    prot = torch.tensor([[False, False, False, False, False, True]])
    paper_prefill = gm.gamma_mod_selection(p, prot, training=False, rule="paper")
    assert paper_prefill.tolist() == [[False, True, True, True, True, True]]
    paper_decode = gm.gamma_mod_selection(p, prot, training=False, rule="paper", decode=True)
    assert paper_decode.tolist() == [[False, False, False, True, True, True]]
    causal = gm.gamma_mod_selection(p, prot, training=False, rule="causal")
    assert torch.equal(causal, paper_decode)
    # training: k = ceil(6 - 0.5 * 5) = 4: the protected token plus the 3 highest routable
    top = gm.gamma_mod_selection(p, prot, training=True)
    assert top.tolist() == [[False, False, True, True, True, True]]
    assert torch.equal(gm.gamma_mod_selection(p, prot, training=False, rule="topk"), top)


def test_topk_count_and_rows_by_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        b, s = 4, int(torch.randint(1, 20, (1,), generator=g))
        c = float(torch.rand((), generator=g).clamp_min(0.05))
        scores = torch.rand(b, s, generator=g)
        n_r = torch.randint(0, s + 1, (b,), generator=g)
        k = gm.gamma_mod_topk_count(s, n_r, c)
        for r in range(b):
            assert int(k[r]) == max(0, min(s, math.ceil(s - (1 - c) * int(n_r[r]) - 1e-9)))
        mask = gm.topk_rows(scores, k)
        for r in range(b):
            best = sorted(range(s), key=lambda t: -float(scores[r, t]))[: int(k[r])]
            assert sorted(torch.nonzero(mask[r]).flatten().tolist()) == sorted(best)
    # float error in (1 - c) * N never adds a token: 10 - 0.1 * 10 = 9, not 10
    assert gm.gamma_mod_topk_count(10, torch.tensor([10]), 0.9).item() == 9
    assert gm.gamma_mod_topk_count(8, torch.tensor([8, 0, 3]), 0.5).tolist() == [4, 8, 7]


def test_decode_uses_decode_rule_and_prefill_the_prefill_rule():
    """The paper's rules with a cache equal an uncached decode that applies the decode rule to
    each new token (a routing transform rewrites the uncached forward's selection that way)."""
    base = tiny()
    model = converted(base, router_std=0.3, layers=[1, 2, 3], rule="paper").eval()
    prompt = ids_of(b=2, s=8)
    steps = 6
    with torch.no_grad():
        s = Session()
        logits = model(prompt, ctx=RoutingContext(session=s)).logits[:, -1]
        cached = []
        for _ in range(steps):
            nxt = logits.argmax(-1)
            cached.append(nxt)
            logits = model(nxt[:, None], ctx=RoutingContext(session=s)).logits[:, -1]
        cached_ids = torch.stack(cached, 1)

        n_prompt = prompt.shape[1]

        def paper_per_token(routing: Routing, site) -> Routing:
            bsz, sl = site.ctx.batch_shape
            p = routing.probs[:, 0]
            pos = torch.arange(sl).repeat(bsz)
            keep = torch.where(pos < n_prompt, p > 0.005, p >= 0.5)
            idx = keep.nonzero().squeeze(1)
            return Routing(
                idx,
                torch.zeros_like(idx),
                p[idx],
                routing.num_tokens,
                1,
                logits=routing.logits,
                probs=routing.probs,
            )

        seq = prompt
        with moelab.override_routing(model, paper_per_token):
            for _ in range(steps):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], 1)
        assert torch.equal(seq[:, n_prompt:], cached_ids)
        # a plain uncached forward judges the generated tokens by the prefill rule instead: the
        # decisions differ on some token (which is why rule="causal" exists)
        ctx_full, ctx_rule = RoutingContext(), RoutingContext()
        model(seq, ctx=ctx_full)
        with moelab.override_routing(model, paper_per_token):
            model(seq, ctx=ctx_rule)
        assert any(
            not torch.equal(a.token_index, b.token_index)
            for a, b in zip(ctx_full.history, ctx_rule.history, strict=True)
        )


# -- auxiliary loss --------------------------------------------------------------------------------
def test_aux_loss_equals_formula():
    base = tiny()
    model = converted(base, layers=[1, 2, 3], aux_coef=0.05).train()
    ids = ids_of()
    ctx = RoutingContext()
    out = model(ids, labels=ids, ctx=ctx)
    expected = 0.0
    for routing in ctx.history:  # log-odds z = l1 - l0: CE(l, y) = BCE-with-logits(z, y)
        target = torch.zeros(routing.num_tokens)
        target[routing.token_index] = 1.0
        expected += F.binary_cross_entropy_with_logits(routing.logits[:, 0].float(), target)
    assert len(ctx.history) == 3
    torch.testing.assert_close(out.aux_loss, 0.05 * expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    out.loss.backward()
    assert model.depth.router.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, labels=ids).aux_loss.item() == 0.0


# -- ARank layer choice ------------------------------------------------------------------------------
def test_select_layers_by_arank_picks_the_lowest():
    from moelab.analysis.arank import arank_per_layer

    base = tiny(n_layers=6)
    with torch.no_grad():  # make attention sharper in some layers, so ranks differ
        for i, blk in enumerate(base.blocks):
            blk.attn.qkv.weight.mul_(1 + 3 * (i % 3))
    ids = ids_of(b=2, s=24)
    scores = arank_per_layer(base, ids)
    order = sorted(range(6), key=lambda i: (scores[i], i))
    assert gm.select_layers_by_arank(base, ids, 2, exclude=()) == sorted(order[:2])
    assert gm.select_layers_by_arank(base, ids, 2, exclude=(), highest=True) == sorted(
        sorted(range(6), key=lambda i: (-scores[i], i))[:2]
    )
    cands = [i for i in order if i not in {0, 1, 2, 5}]
    assert gm.select_layers_by_arank(base, ids, 1) == cands[:1]
    assert gm.select_layers_by_arank(base, ids) == [3, 4]  # count None: every candidate (arank_mod)
    assert gm.select_layers_by_arank(base, ids, 0.5, exclude=[0, -1]) == sorted(
        [i for i in order if i not in {0, 5}][:2]
    )
    # convert(layers="arank") uses it, and ARank of a converted model reads its base schedule
    model = MoELM(base.config)
    model.load_state_dict(base.state_dict())
    gm.convert(model, "arank", input_ids=ids, count=2, exclude=())
    assert model.depth.layers == sorted(order[:2])
    assert gm.select_layers_by_arank(model, ids, 2, exclude=()) == sorted(order[:2])


def test_lowest_arank_layers_by_hand():
    scores = [5.0, 1.0, 3.0, 1.0, 0.5, 9.0, 2.0, 4.0]
    assert gm.lowest_arank_layers(scores, 2, exclude=()) == [1, 4]  # 0.5, then the tie 1.0 -> layer 1 first
    assert gm.lowest_arank_layers(scores, 3, exclude=()) == [1, 3, 4]
    assert gm.lowest_arank_layers(scores) == [3, 4, 5, 6]  # arank_mod: all but 0, 1, 2, 7
    assert gm.lowest_arank_layers(scores, 2) == [3, 4]
    assert gm.lowest_arank_layers(scores, 2, highest=True) == [5, 6]
    assert gm.lowest_arank_layers(scores, 0.5) == [3, 4]
    assert gm.lowest_arank_layers(scores, 1, exclude=[4, -1]) == [1]
    assert gm.arank_mod_layers(8) == [3, 4, 5, 6]


# -- conversion keeps the base --------------------------------------------------------------------
def test_convert_leaves_base_weights_and_round_trips(tmp_path):
    base = tiny(n_layers=6)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in base.state_dict().items()}
    gm.convert(base, capacity=0.25, protected_types=[1], rule="causal")
    after = base.state_dict()
    assert set(after) == set(before) | {"depth.router.weight"}
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].data_ptr() == pointers[k]
    assert base.config.depth == "gamma_mod"
    assert base.config.depth_kwargs["layers"] == [3, 4]  # arank_mod of 6 layers
    assert base.num_parameters() == sum(v.numel() for v in before.values()) + 2 * 32
    ids = ids_of()
    base.eval()
    ref = base(ids).logits
    base.save_pretrained(tmp_path)
    again = MoELM.from_pretrained(tmp_path).eval()
    assert isinstance(again.depth, gm.GammaMoD) and again.depth.config_kwargs() == base.depth.config_kwargs()
    assert torch.equal(again(ids).logits, ref)


def test_registry_builds_from_config():
    model = tiny(layers=[1, 2], capacity=0.5, rule="topk")
    assert isinstance(model.depth, gm.GammaMoD) and model.depth.layers == [1, 2]
    assert not model.depth.causal_at_eval
    assert moelab.registry.get("depth", "gamma_mod").obj is gm.GammaMoD
    ids = ids_of()
    model(ids, labels=ids).loss.backward()
    with moelab.trace(model) as tr:
        model.eval()(ids)
    (name,) = tr.layers
    r = tr.routing(name)
    assert r.num_experts == 1 and r.num_tokens == 2 * 48  # two MoD layers, 3 x 16 tokens each
    assert r.num_assignments == 2 * 3 * 8  # k = ceil(0.5 * 16) per sequence


def test_a_config_with_no_mod_layer_is_refused_clearly():
    with pytest.raises(ValueError, match="leaves no layer"):
        MoELM(MoELMConfig(d_model=32, n_layers=4, n_heads=2, max_seq_len=32, moe_every=99, depth="gamma_mod"))


# -- cached generation ------------------------------------------------------------------------------
@pytest.mark.parametrize(("moe_every", "position_mode"), [(100, "true"), (1, "true"), (100, "compact")])
def test_cached_equals_uncached_greedy_under_the_causal_rule(moe_every, position_mode):
    base = tiny(moe_every=moe_every)
    model = converted(
        base, router_std=1.0, layers=[1, 2, 3], rule="causal", position_mode=position_mode
    ).eval()
    prompt = ids_of(b=3, s=8)
    steps = 10
    with torch.no_grad():
        s = Session()
        ctx = RoutingContext(session=s)
        logits = model(prompt, ctx=ctx).logits[:, -1]
        cached, cached_logits = [], []
        for _ in range(steps):
            cached_logits.append(logits)
            nxt = logits.argmax(-1)
            cached.append(nxt)
            logits = model(nxt[:, None], ctx=RoutingContext(session=s)).logits[:, -1]
        seq = prompt
        plain_ctx = RoutingContext()
        for i in range(steps):
            last = model(seq, ctx=plain_ctx if i == steps - 1 else None).logits[:, -1]
            torch.testing.assert_close(last, cached_logits[i], atol=1e-5, rtol=1e-5)
            seq = torch.cat([seq, last.argmax(-1)[:, None]], 1)
    assert torch.equal(seq[:, 8:], torch.stack(cached, 1))
    kept = [r.num_assignments / r.num_tokens for r in plain_ctx.history if r.num_experts == 1]
    assert all(0.05 < f < 0.95 for f in kept), kept  # tokens both ran and skipped


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(ValueError, match="layers"):
        gm.GammaMoD(32, 4, [4])
    with pytest.raises(ValueError, match="arank_mod"):
        gm.GammaMoD(32, 4)  # arank_mod leaves nothing of 4 layers
    with pytest.raises(ValueError, match="layers"):
        gm.GammaMoD(32, 4, [])
    with pytest.raises(ValueError, match="layers"):
        gm.GammaMoD(32, 4, "first_half")
    for kwargs, match in [
        ({"capacity": 0.0}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"rule": "greedy"}, "rule"),
        ({"gate": "block"}, "gate"),
        ({"position_mode": "relative"}, "position_mode"),
        ({"protected_types": [-1]}, "protected_types"),
        ({"aux_coef": -1.0}, "aux_coef"),
        ({"decode_threshold": 2.0}, "decode_threshold"),
    ]:
        with pytest.raises(ValueError, match=match):
            gm.GammaMoD(32, 4, [1], **kwargs)
    with pytest.raises(TypeError, match="protected_types"):
        gm.GammaMoD(32, 4, [1], protected_types="text")
    with pytest.raises(TypeError, match="gate_protected"):
        gm.GammaMoD(32, 4, [1], gate_protected=1)
    with pytest.raises(TypeError, match="MoELM"):
        gm.convert(torch.nn.Linear(2, 2), [1])
    model = tiny()
    with pytest.raises(ValueError, match="input_ids"):
        gm.convert(model, "arank")
    with pytest.raises(ValueError, match="arank"):
        gm.convert(model, [1], count=2)
    gm.convert(model, [1])
    with pytest.raises(ValueError, match="already"):
        gm.convert(model, [2])
    with pytest.raises(ValueError, match="token_types"):
        gm.protected_of(torch.zeros(5, dtype=torch.long), [0], 2, 3)
    with pytest.raises(ValueError, match="scores"):
        gm.lowest_arank_layers([])
    with pytest.raises(ValueError, match="count"):
        gm.lowest_arank_layers([1.0, 2.0, 3.0], 4, exclude=())
    with pytest.raises(ValueError, match="fraction"):
        gm.lowest_arank_layers([1.0, 2.0, 3.0], 1.5, exclude=())
    with pytest.raises(ValueError, match="excluded"):
        gm.lowest_arank_layers([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="p must"):
        gm.gamma_mod_selection(torch.rand(4), training=True)
    with pytest.raises(ValueError, match="protected"):
        gm.gamma_mod_selection(torch.rand(2, 4), torch.zeros(2, 4), training=True)
    with pytest.raises(ValueError, match="num_routable"):
        gm.gamma_mod_topk_count(4, torch.tensor([5]))
    with pytest.raises(ValueError, match="logits"):
        gm.gamma_mod_aux_loss(torch.rand(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))


# -- transformers Llama ------------------------------------------------------------------------------
def tiny_llama(impl: str = "eager", n_layers: int = 4, seed: int = 0):
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def greedy_uncached(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    seq = ids
    for _ in range(steps):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1)[:, None]], 1)
    return seq


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_every_token_protected_equals_base_and_remove_restores(impl):
    import moelab.hf.gamma_mod as hgm

    model = tiny_llama(impl)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
    mod = hgm.convert(model, [1, 2, 3], protected_types=[0], gate_protected=False)
    assert hgm.gamma_mod_of(model) is mod and not mod.training
    mod.token_types = torch.zeros(2, 64, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    mod.token_types = None
    with torch.no_grad():
        routed = model(ids).logits
    assert not torch.allclose(routed, ref, atol=1e-3)
    for k, v in state.items():  # base weights untouched
        assert torch.equal(model.state_dict()[k], v)
    hgm.remove(model)
    assert set(model.state_dict()) == set(state)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    hgm.convert(model, [2])  # convertible again after remove
    hgm.remove(model)


def test_hf_training_forward_equals_moelm_rule_and_trains():
    import moelab.hf.gamma_mod as hgm

    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    mod = hgm.convert(model, [1, 3], aux_coef=0.1)
    model.train()
    with moelab.trace(model) as tr:
        out = model(ids, labels=ids)
    r = tr.routing(tr.layers[0])
    assert r.num_tokens == 2 * 2 * 12 and r.num_assignments == 2 * 2 * 6  # k = ceil(0.5 * 12)
    expected = 0.0
    for part in tr.records[tr.layers[0]]:
        target = torch.zeros(part.num_tokens)
        target[part.token_index] = 1.0
        expected += F.binary_cross_entropy_with_logits(part.logits[:, 0].float(), target)
    torch.testing.assert_close(mod.aux_loss, 0.1 * expected, atol=1e-6, rtol=1e-5)
    (out.loss + moelab.aux_loss(model)).backward()
    assert mod.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("impl", "position_mode"), [("eager", "true"), ("sdpa", "true"), ("eager", "compact")]
)
def test_hf_cached_generate_equals_uncached_under_the_causal_rule(impl, position_mode):
    import moelab.hf.gamma_mod as hgm

    model = tiny_llama(impl)
    ids = torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(5))
    mod = hgm.convert(model, [1, 2, 3], rule="causal", position_mode=position_mode)
    with torch.no_grad():
        mod.router.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(cached, greedy_uncached(model, ids, 8))
        # a left-padded row generates what it generates alone
        padded, mask = ids.clone(), torch.ones_like(ids)
        padded[1, :3], mask[1, :3] = 0, 0
        batch = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = model.generate(ids[1:2, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[1, 3:], alone[0])


def test_hf_bad_inputs():
    import moelab.hf.gamma_mod as hgm

    model = tiny_llama()
    with pytest.raises(ValueError, match="layer 0"):
        hgm.convert(model, [0, 1])
    with pytest.raises(ValueError, match="input_ids"):
        hgm.convert(model, "arank")
    with pytest.raises(ValueError, match="not γ-MoD converted"):
        hgm.remove(model)
    with pytest.raises(ValueError, match="Llama-family"):
        hgm.convert(torch.nn.Linear(2, 2), [1])
    mod = hgm.convert(model, [1])
    with pytest.raises(ValueError, match="already"):
        hgm.convert(model, [2])
    mod.token_types = torch.zeros(5, 3)
    mod.protected_types = [0]
    with pytest.raises(ValueError, match="token_types"):
        model(torch.zeros(1, 4, dtype=torch.long))
    hgm.remove(model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"):
        hgm.convert(model, [1])


@pytest.mark.slow
def test_smollm2_every_token_protected_equals_base_and_generates_causally(monkeypatch):
    model = load_smollm2(monkeypatch)
    import moelab.hf.gamma_mod as hgm

    ids = torch.tensor(FIBONACCI_IDS)

    with torch.no_grad():
        ref = model(ids).logits
    mod = hgm.convert(model, "arank", input_ids=ids, count=8, protected_types=[0], gate_protected=False)
    assert len(mod.layers) == 8 and 0 not in mod.layers
    mod.token_types = torch.zeros(1, 64, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    hgm.remove(model)
    hgm.convert(model, "arank_mod", rule="causal")
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
        assert torch.equal(cached, greedy_uncached(model, ids, 6))


# -- the reproduction's runner, tiny ---------------------------------------------------------------
def test_reproduction_runner_smoke():
    from moelab.repro.gamma_mod import (
        GAMMA_MOD_MODEL,
        GAMMA_MOD_REPRODUCTION,
        GAMMA_MOD_TRAIN,
        run_gamma_mod_arank,
    )

    model = {**GAMMA_MOD_MODEL, "d_model": 32, "n_heads": 2, "num_experts": 8, "top_k": 2}
    train = {
        "steps": 8,
        "batch_size": 2,
        "warmup_steps": 2,
        "eval_batches": 1,
        "threads": 1,
        **GAMMA_MOD_TRAIN,
    }
    rows = run_gamma_mod_arank(seed=0, model=model, train={**train, "seq_len": 32})
    assert set(rows) == {"base", "low_arank", "high_arank", "_arank"}
    assert len(rows["_arank"]) == 8
    lo, hi = rows["low_arank"], rows["high_arank"]
    assert {lo["first_layer"], lo["last_layer"]}.isdisjoint({hi["first_layer"], hi["last_layer"]})
    assert 3 <= min(lo["first_layer"], hi["first_layer"]) and max(lo["last_layer"], hi["last_layer"]) <= 6
    assert lo["kept"] == hi["kept"] == 0.5 and rows["base"]["kept"] == 1.0
    assert lo["flops_per_token"] < rows["base"]["flops_per_token"]
    assert all(math.isfinite(v) for r in rows.values() for v in r.values())
    assert GAMMA_MOD_REPRODUCTION.judge([rows, rows])["verdict"] in ("holds", "does not hold", "inconclusive")
    assert "ARank per layer" in GAMMA_MOD_REPRODUCTION.describe(rows)
