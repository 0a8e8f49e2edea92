"""The LoRA-mixture reproductions (``moelab.repro.lora``): packing, the routing metrics against
plain per-token loops, the runner on a tiny budget, and the verdicts on synthetic rows."""

from __future__ import annotations

import math

import pytest
import torch

import moelab.repro.lora as lora_repro
from moelab.core.routing import Routing
from moelab.data.tasks import Example, encode_examples
from moelab.data.tokenizers import ByteTokenizer

TINY_TRAIN = {"pretrain_steps": 3, "steps": 4, "batch_size": 2, "warmup_steps": 1, "threads": 1}
TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2}


def test_pack_examples_keeps_examples_whole_and_in_order():
    tok = ByteTokenizer()
    examples = [Example("p" * n, "t" * m, "x") for n, m in [(3, 2), (5, 1), (2, 2), (30, 1), (4, 3)]]
    enc = encode_examples(examples, tok)
    ids, labels, mask = lora_repro.pack_examples(enc, 12, pad_id=0)
    # reference: each example's real tokens, greedily into rows of 12; the 32-token one dropped
    rows, cur = [], []
    for i in range(len(examples)):
        n = int(enc["attention_mask"][i].sum())
        if n > 12:
            continue
        if len(cur) + n > 12:
            rows.append(cur)
            cur = []
        cur += [(int(enc["input_ids"][i, j]), int(enc["labels"][i, j])) for j in range(n)]
    rows.append(cur)
    assert ids.shape == (len(rows), 12)
    for r, row in enumerate(rows):
        n = len(row)
        assert ids[r, :n].tolist() == [a for a, _ in row]
        assert labels[r, :n].tolist() == [b for _, b in row]
        assert mask[r, :n].all() and not mask[r, n:].any()
        assert (labels[r, n:] == -100).all() and (ids[r, n:] == 0).all()
    with pytest.raises(ValueError, match="no example fits"):
        lora_repro.pack_examples(enc, 2, pad_id=0)


def _naive_metrics(records, num_experts):
    """The metrics of ``routing_metrics``, one token and one assignment at a time."""
    layers = sorted({rec[3] for rec in records})
    out = dict.fromkeys(lora_repro.ROUTING_METRICS, 0.0)
    for layer in layers:
        ent, ress, ess, tokens, assign = 0.0, 0.0, 0.0, 0, 0
        table = {}
        for task, r, valid, lay in records:
            if lay != layer:
                continue
            counts = table.setdefault(task, [0] * num_experts)
            for t in range(r.num_tokens):
                if not bool(valid[t]):
                    continue
                tokens += 1
                p = r.probs[t].tolist()
                ent += -sum(x * math.log(x) for x in p if x > 0) / math.log(num_experts)
                ress += sum(p) ** 2 / sum(x * x for x in p)
                ws = [float(r.weight[a]) for a in range(len(r.token_index)) if int(r.token_index[a]) == t]
                es = [int(r.expert_index[a]) for a in range(len(r.token_index)) if int(r.token_index[a]) == t]
                if ws:
                    ess += sum(ws) ** 2 / sum(w * w for w in ws)
                assign += len(es)
                for e in es:
                    counts[e] += 1
        usage = [sum(c[e] for c in table.values()) for e in range(num_experts)]
        mean = sum(usage) / num_experts
        sd = math.sqrt(sum((u - mean) ** 2 for u in usage) / num_experts)
        total = sum(usage)
        mi = 0.0
        for c in table.values():
            pt = sum(c) / total
            for e in range(num_experts):
                if c[e]:
                    pj = c[e] / total
                    mi += pj * math.log(pj / (pt * usage[e] / total))
        out["entropy"] += ent / tokens
        out["router_ess"] += ress / tokens
        out["ess"] += ess / tokens
        out["experts_per_token"] += assign / tokens
        out["max_over_mean"] += max(usage) / mean
        out["usage_cv"] += sd / mean
        out["task_mi"] += mi / math.log(num_experts)
    return {k: v / len(layers) for k, v in out.items()}


def _random_routing(gen, num_tokens, num_experts):
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=gen), -1)
    tok, exp, w = [], [], []
    for t in range(num_tokens):
        k = int(torch.randint(1, num_experts + 1, (1,), generator=gen))
        chosen = torch.randperm(num_experts, generator=gen)[:k]
        for e in chosen.tolist():
            tok.append(t)
            exp.append(e)
            w.append(float(probs[t, e]))
    return Routing(
        torch.tensor(tok), torch.tensor(exp), torch.tensor(w), num_tokens, num_experts, probs=probs
    )


def test_routing_metrics_match_a_per_token_loop():
    gen = torch.Generator().manual_seed(0)
    records = []
    for task in ("a", "b"):
        valid = torch.rand(10, generator=gen) > 0.3
        for layer in range(3):
            records.append((task, _random_routing(gen, 10, 4), valid, layer))
    got = lora_repro.routing_metrics(records, 4)
    want = _naive_metrics(records, 4)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_routing_metrics_extremes():
    # every token on one expert, weight 1: entropy of one-hot probs 0, ESS 1, max/mean E
    probs = torch.zeros(6, 4)
    probs[:, 2] = 1.0
    r = Routing(torch.arange(6), torch.full((6,), 2), torch.ones(6), 6, 4, probs=probs)
    m = lora_repro.routing_metrics([("a", r, torch.ones(6, dtype=torch.bool), 0)], 4)
    assert m["entropy"] == pytest.approx(0.0, abs=1e-6) and m["router_ess"] == pytest.approx(1.0)
    assert m["ess"] == pytest.approx(1.0) and m["experts_per_token"] == pytest.approx(1.0)
    assert m["max_over_mean"] == pytest.approx(4.0) and m["task_mi"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="empty"):
        lora_repro.routing_metrics([], 4)


MIXTURE_REPS = [r for r in lora_repro.LORA if getattr(r.runner, "func", None) is lora_repro.run_lora_arms]


def test_every_reproduction_is_listed():
    assert [r.name for r in lora_repro.LORA] == [
        "lora_mixer_entropy",
        "dynmole_entropy",
        "remix_ess",
        "flylora_merge",
        "dymoe_forgetting",
    ]
    assert [r.name for r in MIXTURE_REPS] == ["lora_mixer_entropy", "dynmole_entropy", "remix_ess"]


@pytest.mark.parametrize("rep", MIXTURE_REPS, ids=lambda r: r.name)
def test_runner_on_a_tiny_budget(monkeypatch, rep):
    monkeypatch.setattr(lora_repro, "TASK_SIZES", {"train": 24, "val": 6, "test": 0})
    monkeypatch.setattr(lora_repro, "_BASES", {})
    rows = rep.runner(seed=0, model=dict(TINY_MODEL), train=dict(TINY_TRAIN))
    assert set(rows) == {*rep.arms, "_base"}
    for label in rep.arms:
        row = rows[label]
        for key in ("val_loss", "val_loss_early", "ess_early", "router_ess", *lora_repro.ROUTING_METRICS):
            assert math.isfinite(row[key]), (label, key)
        for task in lora_repro.LORA_TASKS:
            assert math.isfinite(row[f"val_loss_{task}"])
        assert 0.0 <= row["entropy"] <= 1.0 + 1e-6
        assert 1.0 <= row["max_over_mean"] <= lora_repro.NUM_EXPERTS
        assert 1.0 <= row["ess"] <= row["experts_per_token"] + 1e-6 <= lora_repro.NUM_EXPERTS + 1e-6
        assert 1.0 - 1e-6 <= row["router_ess"] <= lora_repro.NUM_EXPERTS + 1e-6
        assert row["steps"] == TINY_TRAIN["steps"]
    if rep.method == "lora_mixer":  # hard-soft top-2: two equal weights per token
        for label in rep.arms:
            assert rows[label]["ess"] == pytest.approx(2.0)
    if rep.method == "remix":  # equal weights 1/2 on the top-2 at eval; MoLoRA's softmax weights differ
        assert rows["remix"]["ess"] == pytest.approx(2.0)
        assert rows["mole"]["ess"] < 2.0
    # the arms start from the same base and initialisation: only their losses differ, so
    # after 4 tiny steps the two rows are close but not identical
    a, b = (rows[label] for label in rep.arms)
    assert a["entropy"] != b["entropy"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=0.05)
    assert math.isfinite(rows["_base"]["val_loss"])
    judged = rep.judge([rows, rows])
    assert len(judged["conditions"]) == len(rep.conditions)
    assert isinstance(rep.describe(rows), str)


def test_base_is_pretrained_once_per_seed(monkeypatch):
    monkeypatch.setattr(lora_repro, "_BASES", {})
    settings = {**lora_repro.LORA_TRAIN, **TINY_TRAIN}
    model = {**lora_repro.LORA_MODEL, **TINY_MODEL}
    a = lora_repro.pretrained_base(0, model, settings, False, None)
    b = lora_repro.pretrained_base(0, model, settings, False, None)
    assert len(lora_repro._BASES) == 1 and a is not b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with torch.no_grad():  # a copy: changing it leaves the cached base alone
        next(a.parameters()).add_(1.0)
    c = lora_repro.pretrained_base(0, model, settings, False, None)
    assert torch.equal(next(c.parameters()), next(b.parameters()))
    with pytest.raises(ValueError, match="dense"):
        lora_repro.pretrained_base(0, {**model, "moe_every": 1}, settings, False, None)


def _rows(on, off, **values):
    """Synthetic rows of two arms: ``values`` maps a metric to its (on, off) pair."""
    return {on: {k: v[0] for k, v in values.items()}, off: {k: v[1] for k, v in values.items()}}


def test_lora_mixer_verdicts_on_synthetic_rows():
    rep = lora_repro.LORA_MIXER_ENTROPY
    seeds = [
        _rows("entropy_on", "entropy_off", entropy=(0.50 + d, 0.80), max_over_mean=(1.10 + d, 1.05))
        for d in (0.0, 0.01, 0.02)
    ]
    assert rep.judge(seeds)["verdict"] == "holds"
    # usage much less balanced with the term: the balance condition fails
    worse = [
        _rows("entropy_on", "entropy_off", entropy=(0.50, 0.80), max_over_mean=(1.60 + d, 1.05))
        for d in (0.0, 0.01, 0.02)
    ]
    judged = rep.judge(worse)
    assert judged["verdict"] == "does not hold"
    assert [c["verdict"] for c in judged["conditions"]] == ["holds", "does not hold"]
    # entropy higher with the term
    higher = [
        _rows("entropy_on", "entropy_off", entropy=(0.90 + d, 0.80), max_over_mean=(1.05, 1.05))
        for d in (0.0, 0.01, 0.02)
    ]
    assert rep.judge(higher)["conditions"][0]["verdict"] == "does not hold"
    # one seed: no interval, inconclusive
    assert rep.judge(seeds[:1])["verdict"] == "inconclusive"


def test_dynmole_verdicts_on_synthetic_rows():
    rep = lora_repro.DYNMOLE_ENTROPY
    faster = [
        _rows("tsallis", "no_tsallis", entropy=(0.60 + d, 0.90), val_loss_early=(1.50 + d, 1.60))
        for d in (0.0, 0.01, 0.02)
    ]
    assert rep.judge(faster)["verdict"] == "holds"
    slower = [
        _rows("tsallis", "no_tsallis", entropy=(0.60, 0.90), val_loss_early=(1.70 + d, 1.60))
        for d in (0.0, 0.01, 0.02)
    ]
    judged = rep.judge(slower)
    assert judged["verdict"] == "does not hold"
    assert [c["verdict"] for c in judged["conditions"]] == ["holds", "does not hold"]


def test_arms_follow_the_presets():
    from moelab.lora.presets import MIXTURE_PRESETS

    for rep, method in (
        (lora_repro.LORA_MIXER_ENTROPY, "lora_mixer"),
        (lora_repro.DYNMOLE_ENTROPY, "dynmole"),
    ):
        preset = MIXTURE_PRESETS[method]
        on, off = rep.arms.values()
        assert on.router == off.router == preset.router
        assert on.aux_losses == preset.aux_losses
        assert off.aux_losses == {k: v for k, v in preset.aux_losses.items() if k != "tsallis_entropy"}
        assert rep.runner.keywords == {"method": method, "arms": rep.arms}
    assert lora_repro.LORA_MIXER_ENTROPY.arms["entropy_off"].aux_losses == {"load_balance": 1e-2}


def test_remix_arm_trains_by_rloo(monkeypatch):
    """The ReMix arm's loop calls ``remix_rloo_step`` (M forwards) every step and moves the router."""
    import moelab.lora.remix as remix

    monkeypatch.setattr(lora_repro, "_BASES", {})
    settings = lora_repro._settings({**TINY_TRAIN, "rloo_samples": 2})
    base = lora_repro.pretrained_base(0, {**lora_repro.LORA_MODEL, **TINY_MODEL}, settings, False, None)
    calls = []
    real = remix.remix_rloo_step

    def counting(model, loss_fn, batch, num_samples):
        calls.append(num_samples)
        return real(model, loss_fn, batch, num_samples=num_samples)

    monkeypatch.setattr(remix, "remix_rloo_step", counting)
    from moelab.lora import apply

    model = lora_repro.copy.deepcopy(base)
    torch.manual_seed(0)
    apply(model, list(lora_repro.TARGETS), method="remix", num_experts=4, rank=4)
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n and p.requires_grad}
    assert gates
    ids = torch.randint(0, 256, (6, 40))
    labels = ids.clone()
    labels[:, :20] = -100
    lora_repro.finetune(model, seed=0, train=settings, data=(ids, labels, ids >= 0))
    assert calls == [2] * TINY_TRAIN["steps"]
    moved = [n for n, p in model.named_parameters() if n in gates and not torch.equal(p, gates[n])]
    assert moved  # the experts moved after the first step, then the routers got an RLOO signal


def test_sequence_losses_match_a_per_row_loop():
    torch.manual_seed(0)
    model = torch.nn.Module()
    logits = torch.randn(3, 7, 11)
    model.forward = lambda ids: type("Out", (), {"logits": logits})()
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100
    labels[2, :] = -100  # no targets: 0
    got = lora_repro.sequence_losses(model, torch.zeros(3, 7, dtype=torch.long), labels)
    for b in range(3):
        terms = [
            -torch.log_softmax(logits[b, s], -1)[labels[b, s + 1]]
            for s in range(6)
            if labels[b, s + 1] != -100
        ]
        want = sum(terms) / len(terms) if terms else torch.tensor(0.0)
        assert float(got[b]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def _tiny_merge(monkeypatch):
    monkeypatch.setattr(lora_repro, "TASK_SIZES", {"train": 24, "val": 6, "test": 0})
    monkeypatch.setattr(lora_repro, "_BASES", {})


def test_merge_runner_on_a_tiny_budget(monkeypatch):
    _tiny_merge(monkeypatch)
    rep = lora_repro.FLYLORA_MERGE
    rows = rep.runner(seed=0, model=dict(TINY_MODEL), train=dict(TINY_TRAIN))
    assert set(rows) == {"flylora", "lora", "_base"}
    for label in ("flylora", "lora"):
        row = rows[label]
        for t in lora_repro.MERGE_TASKS:
            assert math.isfinite(row[f"own_{t}"]) and math.isfinite(row[f"merged_{t}"])
            assert row[f"own_{t}"] != rows["_base"][f"own_{t}"]  # the adapter trained
            assert row[f"merged_{t}"] != row[f"own_{t}"]  # the merge is another adapter
        want = sum(row[f"merged_{t}"] - row[f"own_{t}"] for t in lora_repro.MERGE_TASKS) / 2
        assert row["degradation"] == pytest.approx(want)
        assert row["steps"] == TINY_TRAIN["steps"]
    judged = rep.judge([rows, rows])
    assert len(judged["conditions"]) == 1
    assert isinstance(rep.describe(rows), str)


@pytest.mark.parametrize("kind", ["flylora", "lora"])
def test_merging_two_identical_adapters_changes_nothing(monkeypatch, kind):
    """Both tasks the same data: the two adapters train identically, so their average is each of
    them and the degradation is 0 (the states are read, averaged and loaded back exactly)."""
    _tiny_merge(monkeypatch)
    settings = lora_repro._settings(TINY_TRAIN)
    base = lora_repro.pretrained_base(0, {**lora_repro.LORA_MODEL, **TINY_MODEL}, settings, False, None)
    data = lora_repro.single_task_data(0, ("sort",))["sort"]
    row = lora_repro.merge_arm(base, kind, seed=0, train=settings, tasks={"a": data, "b": data})
    assert row["own_a"] == row["own_b"]
    assert row["merged_a"] == pytest.approx(row["own_a"], abs=1e-6)
    assert row["degradation"] == pytest.approx(0.0, abs=1e-6)


def test_adapters_of_one_seed_share_their_start():
    from moelab.models.config import MoELMConfig
    from moelab.models.lm import MoELM

    base = MoELM(MoELMConfig.from_dict({**lora_repro.LORA_MODEL, **TINY_MODEL, "vocab_size": 256}))
    for kind in ("flylora", "lora"):
        a = lora_repro._adapter_state(lora_repro._with_adapter(base, kind, 3), kind)
        b = lora_repro._adapter_state(lora_repro._with_adapter(base, kind, 3), kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if kind == "lora":  # a one-expert mixture of rank MERGE_LORA_RANK: lora_A and lora_B train
            shapes = {k.rpartition(".")[2]: v.shape for k, v in a.items()}
            assert shapes["lora_A"][:2] == (1, lora_repro.MERGE_LORA_RANK)
        else:
            assert any(k.endswith("lora_A") for k in a)
    with pytest.raises(ValueError, match="kind"):
        lora_repro._with_adapter(base, "dora", 0)


def test_remix_verdicts_on_synthetic_rows():
    rep = lora_repro.REMIX_ESS
    m = lora_repro.ESS_MARGIN
    holds = [_rows("remix", "mole", ess=(2.0, 1.2 + d)) for d in (0.0, 0.02, 0.04)]
    assert rep.judge(holds)["verdict"] == "holds"
    # MoLoRA's weights did not collapse: within the margin of ReMix's k = 2
    close = [_rows("remix", "mole", ess=(2.0, 2.0 - m / 4 + d)) for d in (0.0, 0.01, 0.02)]
    assert rep.judge(close)["verdict"] == "does not hold"
    assert rep.judge(holds[:1])["verdict"] == "inconclusive"
    assert rep.conditions[0].text() == f"combine-weight ESS: remix - mole > {m:+g}"
    assert rep.arms["mole"].aux_losses == {} and rep.arms["remix"].router == "remix"
    assert rep.runner.keywords["methods"] == {"remix": "remix", "mole": "mole"}


def test_flylora_merge_verdicts_on_synthetic_rows():
    rep = lora_repro.FLYLORA_MERGE
    less = [_rows("flylora", "lora", degradation=(0.05 + d, 0.30)) for d in (0.0, 0.01, 0.02)]
    assert rep.judge(less)["verdict"] == "holds"
    more = [_rows("flylora", "lora", degradation=(0.40 + d, 0.30)) for d in (0.0, 0.01, 0.02)]
    assert rep.judge(more)["verdict"] == "does not hold"


def test_dymoe_runner_on_a_tiny_budget(monkeypatch):
    monkeypatch.setattr(lora_repro, "TASK_SIZES", {"train": 24, "val": 6, "test": 0})
    monkeypatch.setattr(lora_repro, "_BASES", {})
    rep = lora_repro.DYMOE_FORGETTING
    rows = rep.runner(seed=0, model=dict(TINY_MODEL), train=dict(TINY_TRAIN))
    assert set(rows) == {"tag", "no_tag", "_base"}
    tasks = lora_repro.DYMOE_TASKS
    tag, no_tag = rows["tag"], rows["no_tag"]
    # task 1 is trained once, before the arms part
    assert tag[f"after_{tasks[0]}"] == no_tag[f"after_{tasks[0]}"]
    for row in (tag, no_tag):
        for key in ("val_loss", "forgetting", *(f"{k}_{t}" for k in ("after", "val_loss") for t in tasks)):
            assert math.isfinite(row[key]), key
        # the last task was trained last: its final loss is its loss right after
        assert row[f"val_loss_{tasks[-1]}"] == pytest.approx(row[f"after_{tasks[-1]}"])
        want = sum(row[f"val_loss_{t}"] - row[f"after_{t}"] for t in tasks[:-1]) / (len(tasks) - 1)
        assert row["forgetting"] == pytest.approx(want)
        assert 0.0 <= row["drift"] <= 1.0 and 0.0 <= row["new_typed"] <= 1.0
        assert row["steps"] == TINY_TRAIN["steps"]
    # the same new experts in both arms: only TAG differs, so after 4 tiny steps they are close
    assert tag["val_loss"] == pytest.approx(no_tag["val_loss"], abs=0.05)
    assert tag["val_loss"] != no_tag["val_loss"]
    assert math.isfinite(rows["_base"]["val_loss"])
    assert len(rep.judge([rows, rows])["conditions"]) == 1
    assert isinstance(rep.describe(rows), str)


def test_dymoe_drift_reads_the_new_group_mass(monkeypatch):
    """``new_group_drift`` against the routers' softmax read by hand on the real tokens."""
    from moelab.core.routed import override_routing
    from moelab.lora import apply
    from moelab.lora.dymoe import expand, guidance
    from moelab.models.config import MoELMConfig
    from moelab.models.lm import MoELM

    monkeypatch.setattr(lora_repro, "TASK_SIZES", {"train": 24, "val": 6, "test": 0})
    torch.manual_seed(0)
    model = MoELM(MoELMConfig.from_dict({**lora_repro.LORA_MODEL, **TINY_MODEL, "vocab_size": 256}))
    apply(model, list(lora_repro.TARGETS), method="dymoe", num_experts=2, rank=4)
    expand(model, 2)
    with torch.no_grad():  # make the new group's share differ from token to token
        for name, p in model.named_parameters():
            if name.endswith("weight_new"):
                p.normal_(0.0, 1.0)
    ((_, val),) = lora_repro.single_task_data(0, ("sort",)).values()
    ids, _, mask = val
    seen = []

    def record(routing, site):
        seen.append(torch.softmax(routing.logits.float(), -1)[:, 2:].sum(-1))
        return routing

    model.eval()
    with torch.no_grad(), override_routing(model, record):
        model(ids)
    valid = mask.reshape(-1)
    want = sum(float(m[valid].mean()) for m in seen) / len(seen)
    with guidance(model, tag=True, new_threshold=0.4):
        got = lora_repro.new_group_drift(model, val)
    assert got["drift"] == pytest.approx(want, rel=1e-5)
    assert 0.0 < got["new_typed"] < 1.0


def test_dymoe_verdicts_on_synthetic_rows():
    rep = lora_repro.DYMOE_FORGETTING
    less = [_rows("tag", "no_tag", forgetting=(0.02 + d, 0.10)) for d in (0.0, 0.01, 0.02)]
    assert rep.judge(less)["verdict"] == "holds"
    more = [_rows("tag", "no_tag", forgetting=(0.15 + d, 0.10)) for d in (0.0, 0.01, 0.02)]
    assert rep.judge(more)["verdict"] == "does not hold"
    assert rep.judge(less[:1])["verdict"] == "inconclusive"
