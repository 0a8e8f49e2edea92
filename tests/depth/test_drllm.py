"""Dr.LLM (moelab.depth.layer_router, moelab.integrations.hf.drllm) against plain references:
window pooling and the losses written out, MCTS against brute force, "execute everywhere" against
the base model, skip / repeat against a hand-written loop, cached decoding against uncached."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from smollm2 import FIBONACCI_IDS, load_smollm2

import moelab.depth.layer_router as lr
import moelab.depth.mcts as mcts
from moelab.core.context import RoutingContext, Session
from moelab.core.routed import override_routing
from moelab.models.config import MoELMConfig
from moelab.models.generate import generate
from moelab.models.lm import MoELM


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_lm(n_layers: int = 4, moe_every: int = 100, seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    cfg = MoELMConfig(
        d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=48, moe_every=moe_every, num_experts=4, top_k=2
    )
    return MoELM(cfg).eval()


def randomize_routers(routers: lr.LayerRouters, seed: int = 0, bias_scale: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers.routers:
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            r.out.bias.add_(torch.randn(3, generator=g) * bias_scale)


def path_logits(model: MoELM, ids_1S: torch.Tensor, path: list[int]) -> torch.Tensor:
    """A hand-written MoELM forward running the blocks of ``path`` in order (one sequence)."""
    ctx = RoutingContext(batch_shape=tuple(ids_1S.shape))
    rope = (model.rope_cos, model.rope_sin)
    x = model.embed(ids_1S)
    for j in path:
        x = model.blocks[j](x, rope, ctx)
    return F.linear(model.norm(x), model.embed.weight)


# -- pure functions ---------------------------------------------------------------------------------
def pool_reference(x_SD: torch.Tensor, w: int, drop_remainder: bool) -> torch.Tensor:
    n = x_SD.shape[0]
    w = min(w, n)
    if drop_remainder:  # the official code
        size = n // w
        return torch.stack([x_SD[j * size : (j + 1) * size].mean(0) for j in range(w)])
    bounds = [math.ceil(j * n / w) for j in range(w + 1)]  # token t in window floor(t w / n)
    return torch.stack([x_SD[bounds[j] : bounds[j + 1]].mean(0) for j in range(w)])


@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("seq_len", [1, 3, 8, 11, 16, 29])
def test_window_mean_pool_matches_a_loop(seq_len, drop_remainder):
    x = torch.randn(2, seq_len, 5, dtype=torch.float64)
    pooled, valid = lr.window_mean_pool(x, 8, drop_remainder=drop_remainder)
    for b in range(2):
        ref = pool_reference(x[b], 8, drop_remainder)
        assert int(valid[b].sum()) == ref.shape[0] and bool(valid[b, : ref.shape[0]].all())
        torch.testing.assert_close(pooled[b, : ref.shape[0]], ref)
        assert bool((pooled[b, ref.shape[0] :] == 0).all())


def test_window_mean_pool_skips_padding_on_either_side():
    x = torch.randn(3, 13, 4, dtype=torch.float64)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, :4] = False  # left padding: 9 real tokens
    mask[1, 10:] = False  # right padding: 10 real tokens
    pooled, valid = lr.window_mean_pool(x, 4, mask)
    for b in range(3):
        real = x[b][mask[b]]
        torch.testing.assert_close(pooled[b], pool_reference(real, 4, False))
    assert bool(valid.all())


def test_window_mean_pool_bad_inputs():
    with pytest.raises(ValueError, match="x_BSD"):
        lr.window_mean_pool(torch.randn(4, 5))
    with pytest.raises(ValueError, match="all padding"):
        lr.window_mean_pool(torch.randn(2, 4, 3), 8, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).bool())
    with pytest.raises(ValueError, match="mask_BS"):
        lr.window_mean_pool(torch.randn(2, 4, 3), 8, torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_windows"):
        lr.window_mean_pool(torch.randn(2, 4, 3), 0)


def test_effective_number_weights_formula():
    counts = [900, 90, 10, 0]
    beta = 0.999
    raw = [(1 - beta) / (1 - beta**n) if n else 0.0 for n in counts]
    present = sum(1 for n in counts if n)
    ref = torch.tensor([r * present / sum(raw) for r in raw])
    torch.testing.assert_close(lr.effective_number_weights(torch.tensor(counts), beta), ref)
    torch.testing.assert_close(lr.effective_number_weights(counts, beta, normalize=False), torch.tensor(raw))
    w = lr.effective_number_weights([5, 50, 500], 0.999)
    assert w[0] > w[1] > w[2]  # rare classes weigh more
    # beta 0: no reweighting
    torch.testing.assert_close(lr.effective_number_weights([3, 7], 0.0), torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        lr.effective_number_weights([1, 2], 1.0)
    with pytest.raises(ValueError, match="counts_C"):
        lr.effective_number_weights([1, -2])


def test_focal_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g)
    target = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    weight = torch.tensor([0.5, 1.0, 2.0])
    terms = []
    for i in range(7):
        p = math.exp(logits[i, target[i]]) / sum(math.exp(v) for v in logits[i].tolist())
        terms.append(-weight[target[i]].item() * (1 - p) ** 2 * math.log(p))
    ref = sum(terms) / len(terms)
    assert lr.focal_loss(logits, target, 2.0, weight).item() == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(lr.focal_loss(logits, target, 0.0), F.cross_entropy(logits, target))
    assert lr.focal_loss(logits, target, 2.0) < F.cross_entropy(logits, target)  # easy examples down-weighted
    with pytest.raises(ValueError, match="target_N"):
        lr.focal_loss(logits, torch.tensor([0, 3, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="gamma"):
        lr.focal_loss(logits, target, -1.0)
    with pytest.raises(ValueError, match="logits_NC"):
        lr.focal_loss(logits[0], target)


def test_paths_and_labels():
    assert mcts.path_to_labels([0, 2, 2, 3], 5) == [1, 0, 2, 1, 0]
    assert mcts.labels_to_path([1, 0, 2, 1, 0]) == [0, 2, 2, 3]
    for labels in itertools.product(range(3), repeat=3):
        assert mcts.path_to_labels(mcts.labels_to_path(list(labels)), 3) == list(labels)
    with pytest.raises(ValueError, match="non-decreasing"):
        mcts.path_to_labels([1, 0], 3)
    with pytest.raises(ValueError, match="max_count"):
        mcts.path_to_labels([1, 1, 1], 3)
    with pytest.raises(ValueError, match="block indices"):
        mcts.path_to_labels([0, 3], 3)
    succ = mcts.path_successors([0, 1, 2])
    assert [1, 2] in succ and [2] in succ and [0] in succ and [0, 0, 1, 2] in succ and [0, 1, 2, 2] in succ
    assert [] not in succ  # at most 2 consecutive entries dropped
    # a block that runs twice is not repeated again
    assert sorted(mcts.path_successors([0, 0, 1])) == [[0], [0, 0], [0, 0, 1, 1], [0, 1], [1]]


# -- MCTS --------------------------------------------------------------------------------------------
def brute_force_shortest(num_layers: int, evaluate) -> list[int] | None:
    best = None
    for labels in itertools.product(range(3), repeat=num_layers):
        path = mcts.labels_to_path(list(labels))
        if evaluate(path):
            key = (len(path), len(set(path)), tuple(path))
            if best is None or key < best[0]:
                best = (key, path)
    return None if best is None else best[1]


@pytest.mark.parametrize(
    ("name", "evaluate", "expected"),
    [
        ("skips", lambda p: {1, 3, 4} <= set(p), [1, 3, 4]),  # the plain path is correct
        ("repeat", lambda p: p.count(3) == 2 and 1 in p, [1, 3, 3]),  # only a repeat makes it correct
    ],
)
def test_mcts_finds_the_known_shortest_correct_path(name, evaluate, expected):
    assert brute_force_shortest(6, evaluate) == expected
    for seed in (0, 1):
        found = mcts.mcts_layer_paths(6, evaluate, num_simulations=400, seed=seed)
        assert found.best_path == expected, (name, seed, found.best_path)
        assert found.labels == mcts.path_to_labels(expected, 6)
        assert found.base_correct == (name == "skips")
        assert all(evaluate(p) for p in found.correct_paths)
        assert found.correct_paths[0] == expected


def test_mcts_defaults_on_a_small_problem_and_options():
    calls = []

    def evaluate(p):
        calls.append(tuple(p))
        return {1, 2} <= set(p)

    found = mcts.mcts_layer_paths(4, evaluate)  # 50 simulations, the paper's constants
    assert found.best_path == brute_force_shortest(4, lambda p: {1, 2} <= set(p)) == [1, 2]
    assert len(calls) == len(set(calls)) == found.num_evaluations  # each path evaluated once
    assert found.num_simulations == 50
    early = mcts.mcts_layer_paths(4, lambda p: {1, 2} <= set(p), stop_saving=1)
    assert early.num_simulations < 50 and len(early.best_path) <= 3
    nothing = mcts.mcts_layer_paths(3, lambda p: False, num_simulations=10)
    assert nothing.best_path is None and nothing.labels == [1, 1, 1] and not nothing.base_correct
    no_repeat = mcts.mcts_layer_paths(4, lambda p: True, num_simulations=40, max_repeat=0)
    assert all(len(set(p)) == len(p) for p in no_repeat.correct_paths)


@pytest.mark.parametrize("seed_per_example", [False, True])
def test_batched_mcts_equals_one_search_per_example(seed_per_example):
    needs = [{1, 3}, {0, 4}, {2}, {1, 2, 3, 4}]
    rounds = []

    def evaluate_many(examples, paths):
        rounds.append(len(examples))
        return [needs[i] <= set(p) for i, p in zip(examples, paths, strict=True)]

    batched = mcts.mcts_layer_paths_batched(
        5, 4, evaluate_many, 30, seed=7, seed_per_example=seed_per_example
    )
    for i, found in enumerate(batched):
        alone = mcts.mcts_layer_paths(
            5, lambda p, i=i: needs[i] <= set(p), 30, seed=7 + i if seed_per_example else 7
        )
        assert found.best_path == alone.best_path and found.correct_paths == alone.correct_paths
    assert rounds[0] == 4 and max(rounds) == 4  # every example's plain path in the first call
    with pytest.raises(ValueError, match="one reward per path"):
        mcts.mcts_layer_paths_batched(3, 2, lambda ex, paths: [True], 5)


def test_penalized_decisions_is_the_official_interpolation():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.2, 1.5], [1.0, 1.1, 0.9]])
    probs = logits.softmax(-1)
    assert torch.equal(lr.penalized_decisions(logits), logits.argmax(-1))
    assert lr.penalized_decisions(logits, -1.0).tolist() == [0, 0, 0]
    assert lr.penalized_decisions(logits, 0.5).tolist() == [1, 1, 1]
    assert lr.penalized_decisions(logits, 1.0).tolist() == [2, 2, 2]
    for p in (-0.8, -0.3, 0.1, 0.7):  # the official continuous_router_decision, written plainly
        for b in range(3):
            skip, ex, rep = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
            if p <= -0.5:
                t = (p + 1) / 0.5
                final = [(1 - t) * skip[c] + t * probs[b, c].item() for c in range(3)]
            elif p <= 0.5:
                t = p + 0.5
                final = [(1 - t) * probs[b, c].item() + t * ex[c] for c in range(3)]
            else:
                t = (p - 0.5) / 0.5
                final = [(1 - t) * ex[c] + t * rep[c] for c in range(3)]
            assert lr.penalized_decisions(logits[b : b + 1], p).item() == max(range(3), key=final.__getitem__)
    with pytest.raises(ValueError, match="router_penalty"):
        lr.penalized_decisions(logits, 1.5)


def test_mcts_bad_inputs():
    with pytest.raises(TypeError, match="evaluate"):
        mcts.mcts_layer_paths(3, "yes")
    with pytest.raises(TypeError, match="evaluate must return"):
        mcts.mcts_layer_paths(3, lambda p: "right")
    with pytest.raises(ValueError, match="random_child_p"):
        mcts.mcts_layer_paths(3, lambda p: True, random_child_p=1.5)
    with pytest.raises(ValueError, match="max_len"):
        mcts.mcts_layer_paths(6, lambda p: True, max_len=4)
    with pytest.raises(ValueError, match="num_layers"):
        mcts.mcts_layer_paths(0, lambda p: True)


# -- the router -------------------------------------------------------------------------------------
def test_layer_router_averages_window_logits():
    torch.manual_seed(0)
    router = lr.LayerRouter(6, hidden=16, num_windows=4, execute_at_init=False)
    x = torch.randn(2, 10, 6)
    pooled, _ = lr.window_mean_pool(x, 4)
    ref = torch.stack(
        [
            torch.stack([router.out(router.act(router.up(pooled[b, j]))) for j in range(4)]).mean(0)
            for b in range(2)
        ]
    )
    torch.testing.assert_close(router(x), ref)
    short = torch.randn(1, 3, 6)  # S < W: 3 windows of one token
    ref = torch.stack([router.out(router.act(router.up(short[0, j]))) for j in range(3)]).mean(0)
    torch.testing.assert_close(router(short)[0], ref)
    assert lr.LayerRouter(6)(x).argmax(-1).tolist() == [1, 1]  # untrained: execute


# -- MoELM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe_every", [100, 1])
def test_execute_everywhere_equals_the_base_moelm(moe_every):
    model = tiny_lm(moe_every=moe_every)
    ids = torch.randint(0, 256, (3, 13))
    with torch.no_grad():
        base = model(ids).logits
        drllm = lr.apply_drllm(model)
        assert torch.equal(model(ids).logits, base)  # untrained routers execute every block
        assert drllm.last_decisions.tolist() == [[1] * 4] * 3
        randomize_routers(drllm.layer_routers)
        with drllm.forcing(torch.ones(3, 4, dtype=torch.long)):
            assert torch.equal(model(ids).logits, base)
        # a routing transform may rewrite the decisions (per sequence): execute everywhere again
        execute = lr.decision_routing(torch.ones(3, dtype=torch.long), 13)
        with override_routing(model, lambda r, site: execute, layers=["depth"]):
            assert torch.equal(model(ids).logits, base)


def test_skip_and_repeat_equal_a_hand_written_loop():
    model = tiny_lm(n_layers=4)
    drllm = lr.apply_drllm(model)
    ids = torch.randint(0, 256, (4, 11))
    decisions = torch.tensor([[1, 0, 2, 1], [0, 0, 1, 2], [2, 2, 2, 2], [1, 1, 0, 0]])
    with torch.no_grad(), drllm.forcing(decisions):
        out = model(ids).logits
    assert drllm.layers_executed.tolist() == [4, 3, 8, 2]
    for b in range(4):
        with torch.no_grad():
            ref = path_logits(model, ids[b : b + 1], mcts.labels_to_path(decisions[b]))
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_routing_is_emitted_per_layer_and_flops_drop_with_skips():
    model = tiny_lm(n_layers=4)
    drllm = lr.apply_drllm(model)
    ids = torch.randint(0, 256, (2, 9))
    decisions = torch.tensor([[0, 1, 2, 0], [1, 0, 2, 1]])
    ctx = RoutingContext()
    with torch.no_grad(), drllm.forcing(decisions):
        model(ids, ctx=ctx)
    assert len(ctx.history) == 4
    for i, r in enumerate(ctx.history):
        assert r.num_experts == 3 and r.num_tokens == 18 and r.top_k == 1
        assert r.expert_index.view(2, 9)[:, 0].tolist() == decisions[:, i].tolist()
        assert r.logits is not None and r.logits.shape == (18, 3)
    routed = model.flops_per_token()
    with torch.no_grad(), drllm.forcing(torch.ones(2, 4, dtype=torch.long)):
        model(ids)
    assert routed < model.flops_per_token()  # 5 of 8 sequence-blocks here, 8 of 8 there
    assert drllm.layer_routers.routers[0].flops > 0


def test_decoding_follows_the_prefill_path():
    model = tiny_lm(n_layers=4)
    drllm = lr.apply_drllm(model, execute_at_init=False)
    randomize_routers(drllm.layer_routers, seed=3, bias_scale=3.0)
    prompt = torch.randint(0, 256, (3, 7))
    session = Session()
    with torch.no_grad():
        model(prompt, ctx=RoutingContext(session=session))
        decided = drllm.last_decisions.clone()
        model(prompt[:, :1], ctx=RoutingContext(session=session))  # a decode step
    assert torch.equal(drllm.last_decisions, decided)
    assert drllm.layer_routers.last_logits is None  # the routers did not run again
    assert set(decided.flatten().tolist()) != {1}  # the random routers skip or repeat something
    cached = generate(model, prompt, 6)
    with drllm.forcing(decided):  # uncached: every step along the prefill's path
        uncached = generate(model, prompt, 6, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("decisions", [[[1, 0, 2, 1], [0, 2, 1, 1], [2, 1, 1, 0]], [[0, 2, 1, 0]] * 3])
def test_cached_generation_equals_uncached_with_skips_and_repeats(decisions):
    model = tiny_lm(n_layers=4, moe_every=2)
    drllm = lr.apply_drllm(model)
    prompt = torch.randint(0, 256, (3, 5))
    with drllm.forcing(torch.tensor(decisions)):
        cached = generate(model, prompt, 7)
        uncached = generate(model, prompt, 7, use_cache=False)
    assert torch.equal(cached, uncached)


def test_apply_save_load_and_remove(tmp_path):
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 10))
    drllm = lr.apply_drllm(model, hidden=16, num_windows=4, execute_at_init=False, router_penalty=-0.3)
    randomize_routers(drllm.layer_routers, bias_scale=2.0)
    assert model.config.depth == "drllm" and model.config.depth_kwargs["hidden"] == 16
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = MoELM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.depth, lr.DrLLM) and loaded.depth.layer_routers.router_penalty == -0.3
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert torch.equal(loaded.depth.last_decisions, drllm.last_decisions)
    removed = lr.remove_drllm(model)
    assert removed is drllm and model.depth is None and model.config.depth is None
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_inputs():
    model = tiny_lm()
    with pytest.raises(TypeError, match="MoELM"):
        lr.apply_drllm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no drllm"):
        lr.remove_drllm(model)
    drllm = lr.apply_drllm(model)
    with pytest.raises(ValueError, match="already has a depth router"):
        lr.apply_drllm(model)
    with pytest.raises(ValueError, match="decisions must be an integer"):
        with drllm.forcing(torch.ones(2, 3, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="decisions must lie"):
        with drllm.forcing(torch.full((2, 4), 3)):
            pass
    with (
        pytest.raises(ValueError, match="forced decisions are for batch"),
        drllm.forcing(torch.ones(2, 4, dtype=torch.long)),
    ):
        model(torch.randint(0, 256, (3, 5)))
    ids = torch.randint(0, 256, (4, 6))
    with pytest.raises(ValueError, match="labels must be an integer"):
        lr.train_layer_routers(model, ids, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        lr.train_layer_routers(model, ids, torch.full((4, 4), 5))
    with pytest.raises(ValueError, match="exactly one set"):
        lr.train_layer_routers(tiny_lm(), ids, torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="routers but the model has"):
        lr.DrLLM(3, 32)(
            torch.randn(1, 2, 32), model.blocks, (model.rope_cos, model.rope_sin), RoutingContext(), None
        )


def two_kinds(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of bytes 0..15 (kind 0) or 100..115 (kind 1), and labels a router can read off
    them: per block skip/execute, execute/skip, execute/repeat, execute."""
    kind = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(0, 16, (n, 8), generator=g) + 100 * kind[:, None]
    return ids, torch.stack([kind, 1 - kind, 1 + kind, torch.ones_like(kind)], dim=1)


def test_router_training_learns_labels_and_keeps_the_base_frozen():
    model = tiny_lm()
    drllm = lr.apply_drllm(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("depth.")}
    g = torch.Generator().manual_seed(0)
    ids, labels = two_kinds(64, g)
    model.train()
    history = lr.train_layer_routers(model, ids, labels, epochs=40, batch_size=16, lr=1e-2)
    assert history[-1] < 0.5 * history[0]
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base did not move
    test, expected = two_kinds(32, g)
    model.eval()
    with torch.no_grad():
        model(test)
    assert (drllm.last_decisions == expected).float().mean() > 0.9


# -- transformers Llama --------------------------------------------------------------------------------
def tiny_llama(n_layers: int = 4, seed: int = 0):
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def llama_path_logits(model, ids_1S: torch.Tensor, path: list[int]) -> torch.Tensor:
    """A hand-written Llama forward through the layers of ``path`` (their class forward)."""
    m = model.model
    h = m.embed_tokens(ids_1S)
    pos = torch.arange(ids_1S.shape[1])[None]
    pe = m.rotary_emb(h, position_ids=pos)
    for j in path:
        layer = m.layers[j]
        h = type(layer).forward(layer, h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return model.lm_head(m.norm(h))


def test_hf_execute_everywhere_equals_the_base_and_remove_restores():
    from moelab.integrations.hf.drllm import DrLLMPatch, apply_drllm, remove_drllm

    model = tiny_llama()
    ids = torch.randint(0, 96, (3, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(ids).logits
        patch = apply_drllm(model)
        assert isinstance(model.drllm, DrLLMPatch)
        assert torch.equal(model(ids).logits, base)
        assert patch.last_decisions.tolist() == [[1] * 4] * 3
        randomize_routers(patch.layer_routers)
        with patch.forcing(torch.ones(3, 4, dtype=torch.long)):
            assert torch.equal(model(ids).logits, base)
            assert torch.equal(model(ids, use_cache=False).logits, base)
    with pytest.raises(ValueError, match="already has"):
        apply_drllm(model)
    remove_drllm(model)
    assert not hasattr(model, "drllm")
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    with pytest.raises(ValueError, match="no Dr.LLM routers"):
        remove_drllm(model)
    with pytest.raises(ValueError, match="Llama-family"):
        apply_drllm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("use_cache", [False, True])
def test_hf_skip_and_repeat_equal_a_hand_written_loop(use_cache):
    from moelab.integrations.hf.drllm import apply_drllm

    model = tiny_llama()
    patch = apply_drllm(model)
    ids = torch.randint(0, 96, (4, 10))
    decisions = torch.tensor([[1, 0, 2, 1], [0, 0, 1, 2], [2, 2, 2, 2], [1, 1, 0, 0]])
    with torch.no_grad(), patch.forcing(decisions):
        out = model(ids, use_cache=use_cache).logits
    assert torch.equal(patch.last_decisions, decisions)
    for b in range(4):
        with torch.no_grad():
            ref = llama_path_logits(model, ids[b : b + 1], mcts.labels_to_path(decisions[b]))
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decisions", [[[1, 0, 2, 1], [0, 2, 1, 1], [2, 1, 1, 0]], [[0, 2, 1, 0]] * 3, None])
def test_hf_cached_generation_equals_uncached(decisions):
    from moelab.integrations.hf.drllm import apply_drllm

    model = tiny_llama()
    patch = apply_drllm(model, execute_at_init=False)
    randomize_routers(patch.layer_routers, seed=5, bias_scale=3.0)
    ids = torch.randint(0, 96, (3, 6))
    if decisions is None:  # the routers decide at prefill; decode steps follow
        with torch.no_grad():
            model(ids)
        forced = patch.last_decisions.clone()
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    else:
        forced = torch.tensor(decisions)
        with patch.forcing(forced):
            cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    x = ids
    with torch.no_grad(), patch.forcing(forced):
        for _ in range(6):
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, x)


def test_hf_router_pooling_ignores_padding_and_training_keeps_the_base():
    from moelab.integrations.hf.drllm import apply_drllm

    model = tiny_llama()
    patch = apply_drllm(model, execute_at_init=False)
    randomize_routers(patch.layer_routers, seed=1)
    ids = torch.randint(0, 96, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad(), patch.forcing(torch.ones(1, 4, dtype=torch.long)):
        model(ids)
        plain = patch.layer_routers.last_logits
        model(padded, attention_mask=mask)
        torch.testing.assert_close(patch.layer_routers.last_logits, plain, atol=1e-5, rtol=1e-5)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("drllm.")}
    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, 96, (24, 8), generator=g)
    labels = torch.stack([(train_ids[:, 0] >= 48).long()] * 4, dim=1) * 2
    history = lr.train_layer_routers(
        model, train_ids, labels, attention_mask=torch.ones_like(train_ids), epochs=4, batch_size=8, lr=1e-2
    )
    assert history[-1] < history[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


@pytest.mark.slow
def test_smollm2_execute_everywhere_equals_the_base(monkeypatch):
    model = load_smollm2(monkeypatch)
    from moelab.integrations.hf.drllm import apply_drllm, remove_drllm

    ids = torch.tensor(FIBONACCI_IDS)

    n = model.config.num_hidden_layers
    with torch.no_grad():
        base = model(ids).logits
        dense = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    patch = apply_drllm(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2), dense)
        skip_last = torch.ones(1, n, dtype=torch.long)
        skip_last[0, n - 2] = 0
        with patch.forcing(skip_last):
            shorter = model(ids).logits
        assert not torch.equal(shorter, base) and torch.isfinite(shorter).all()
    remove_drllm(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_reproduction_runner_smoke(tmp_path):
    from moelab.repro.drllm import DRLLM_REPRODUCTION, SPLITS, digit_sum_problems, run_drllm

    data = digit_sum_problems()
    assert {k: v.shape[0] for k, v in data.items()} == SPLITS
    first = bytes(data["base"][0].tolist()).decode()
    digits = [int(c) for c in first[:7:2]]
    assert first[8:] == f"{sum(digits):02d}"[::-1]  # "a+b+c+d=" then the sum, units first
    all_ids = torch.cat(list(data.values()))
    assert torch.unique(all_ids, dim=0).shape[0] == all_ids.shape[0]  # the splits do not overlap
    model = {"d_model": 16, "n_layers": 2, "n_heads": 2}
    train = {"steps": 3, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "threads": 1}
    rows = run_drllm(
        seed=0, model=model, train=train, out=tmp_path / "s0", num_simulations=2, router_epochs=1
    )
    assert set(rows) == {"base", "drllm", "drllm_budget", "_labels"}
    assert rows["base"]["layers"] == 2.0 and 0.0 <= rows["drllm"]["accuracy"] <= 1.0
    assert 0.0 <= rows["drllm"]["layers"] <= 4.0 and -0.5 <= rows["drllm_budget"]["router_penalty"] <= 0.5
    verdict = DRLLM_REPRODUCTION.judge([rows, rows])
    assert len(verdict["conditions"]) == 2
    assert "held-out problems" in DRLLM_REPRODUCTION.describe(rows)
