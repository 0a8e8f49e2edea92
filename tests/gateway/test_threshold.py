"""The ``threshold`` policy (RouteLLM) and the ``random`` baseline: the MF maths against torch
autograd and torch's Adam, the logistic regression against scikit-learn, calibration on held-out
rows, MF against the random router on held-out APGR, routing and state round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from moelab.gateway import metrics as M
from moelab.gateway.datasets import load_table
from moelab.gateway.evaluate import CachedEmbedder, split_by_id
from moelab.gateway.policies.baselines import RandomPolicy, strong_weak
from moelab.gateway.policies.threshold import (
    ThresholdPolicy,
    adam_step,
    calibrate,
    fit_logistic,
    mf_init,
    mf_logits,
    mf_loss_grads,
    win_labels,
)
from moelab.gateway.policy import ModelInfo, RouteRequest, build_policy


def test_mf_loss_and_grads_match_torch_autograd():
    rng = np.random.default_rng(0)
    params = mf_init(text_dim=12, dim=5, rng=rng)
    q = rng.standard_normal((9, 12))
    y = (rng.uniform(size=9) > 0.5).astype(float)
    loss, grads = mf_loss_grads(params, q, y)
    # the RouteLLM model written in torch: delta(m) = w2 . (normalize(P_m) * (W1 q)), logit = delta_s - delta_w
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    emb = torch.nn.functional.normalize(t["P"], p=2, dim=1)
    proj = torch.tensor(q) @ t["W1"].T
    logit = (emb[1] * proj) @ t["w2"] - (emb[0] * proj) @ t["w2"]
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor(y))
    ref.backward()
    assert loss == pytest.approx(ref.item(), abs=1e-12)
    assert np.allclose(mf_logits(params, q), logit.detach().numpy())
    for k in params:
        assert np.allclose(grads[k], t[k].grad.numpy(), atol=1e-12), k


def test_adam_step_matches_torch_adam():
    rng = np.random.default_rng(1)
    p0 = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    ours = {k: v.copy() for k, v in p0.items()}
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.Adam(theirs.values(), lr=3e-2, weight_decay=1e-2)
    state: dict = {}
    for _ in range(5):
        g = {k: rng.standard_normal(v.shape) for k, v in p0.items()}
        adam_step(ours, g, state, lr=3e-2, weight_decay=1e-2)
        for k, v in theirs.items():
            v.grad = torch.tensor(g[k])
        opt.step()
    for k in p0:
        assert np.allclose(ours[k], theirs[k].detach().numpy(), atol=1e-12)


def test_logistic_regression_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 6))
    y = (x @ rng.standard_normal(6) + 0.3 * rng.standard_normal(200) > 0).astype(float)
    coef, intercept = fit_logistic(x, y, C=0.7)
    ref = LogisticRegression(C=0.7, tol=1e-12, max_iter=10_000).fit(x, y)
    assert np.allclose(coef, ref.coef_[0], atol=1e-5) and intercept == pytest.approx(
        ref.intercept_[0], abs=1e-5
    )


def test_win_labels_and_calibrate():
    weak = np.array([1, 0, 1, 0, 1.0])
    strong = np.array([1, 1, 0, 0, 1.0])
    rows, y = win_labels(weak, strong)  # ties (rows 0, 3, 4) dropped, as RouteLLM's trainer
    assert rows.tolist() == [1, 2] and y.tolist() == [1.0, 0.0]
    rows, y = win_labels(weak, strong, ties="weak")
    assert rows.tolist() == [0, 1, 2, 3, 4] and y.tolist() == [0, 1, 0, 0, 0]
    s = np.arange(100) / 100
    for f in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert np.mean(s >= calibrate(s, f)) == pytest.approx(f, abs=0.011)
    with pytest.raises(ValueError, match="target_strong_fraction"):
        calibrate(s, 1.2)
    with pytest.raises(ValueError, match="ties"):
        win_labels(weak, strong, ties="x")


@pytest.fixture(scope="module")
def mmlu_half():
    """3000 MMLU rows split by id: train on half, test on the other (hashing embeddings, cached)."""
    table = load_table("routellm_mmlu")
    keep = np.sort(np.random.default_rng(0).permutation(len(table))[:3000])
    table = table.rows(keep)
    tr, te = split_by_id(table.ids, seed=0)
    return table.rows(tr), table.rows(te), CachedEmbedder("hashing")


def test_calibration_hits_its_target_on_held_out_rows():
    """The issue's check: within 1% on held-out rows. fit() calibrates on out-of-fold scores of its
    training prompts; the held-out half (all of RouteLLM's MMLU table, 7018 / 7019 rows split by id)
    is unseen. The held-out fraction is a binomial draw: its standard error
    sqrt(f (1 - f) (1/n_cal + 1/n_test)) is 0.68-0.84% here, so 1% is 1.2-1.5 of them. The
    measured misses on this split are 0.49, 0.56 and 0.24 points (docs/methods/threshold.md)."""
    table = load_table("routellm_mmlu")
    tr, te = split_by_id(table.ids, seed=0)
    train, test, emb = table.rows(tr), table.rows(te), CachedEmbedder("hashing")
    for f in (0.2, 0.5, 0.8):
        policy = ThresholdPolicy(scorer="embed_lr", embedder=emb, strong_fraction=f).fit(train)
        held_out = np.mean(policy.scores(test.prompts) >= policy.threshold)
        assert abs(held_out - f) < 0.01, (f, held_out)
    # the same threshold as a request override (router-threshold-<t>) routes the same fraction
    req = [policy.route(_request(p, threshold=policy.threshold)).model == "big" for p in test.prompts[:200]]
    assert np.mean(req) == pytest.approx(np.mean(policy.scores(test.prompts[:200]) >= policy.threshold))


def _held_out_apgr(train, test, emb, scorer):
    policy = ThresholdPolicy(scorer=scorer, embedder=emb).fit(train)
    w, s = test.quality[:, 0], test.quality[:, 1]
    return M.apgr(M.router_sweep(policy.scores(test.prompts), w, s), w.mean(), s.mean())


def test_mf_beats_random_on_held_out_apgr(mmlu_half):
    # hashing embeddings here (fast); docs/gateway.md has the MiniLM numbers on full tables
    train, test, emb = mmlu_half
    gsm = load_table("routellm_gsm8k")
    tr, te = split_by_id(gsm.ids, seed=0)
    for tr_t, te_t, e in ((train, test, emb), (gsm.rows(tr), gsm.rows(te), CachedEmbedder("hashing"))):
        w, s = te_t.quality[:, 0], te_t.quality[:, 1]
        random = M.apgr(M.random_sweep(w, s, iters=10, seed=0), w.mean(), s.mean())
        mf = _held_out_apgr(tr_t, te_t, e, "mf")
        assert mf > random + 0.05, (te_t.name, mf, random)


def _request(prompt="What is 2 + 2?", threshold=None, tags=True):
    models = [
        ModelInfo("small", cost_in=0.1, cost_out=0.1, tags=("weak",) if tags else ()),
        ModelInfo("mid", cost_in=0.5, cost_out=0.5),
        ModelInfo("big", cost_in=1.0, cost_out=3.0, tags=("strong",) if tags else ()),
    ]
    return RouteRequest(prompt=prompt, models=models, threshold=threshold)


def test_route_threshold_override_and_state_round_trip(tmp_path):
    gsm = load_table("routellm_gsm8k")
    small = gsm.rows(np.arange(300))
    policy = build_policy("threshold", scorer="mf", embedder="hashing", epochs=5).fit(small)
    d = policy.route(_request())
    score = float(policy.scores(["What is 2 + 2?"])[0])
    assert d.score == pytest.approx(score) and d.policy == "threshold"
    assert d.model == ("big" if score >= policy.threshold else "small")
    assert policy.route(_request(threshold=0.0)).model == "big"  # request.threshold overrides
    assert policy.route(_request(threshold=1.0 + 1e-9 if score < 1 else 1.0)).model in ("small", "big")
    assert policy.route(_request(threshold=np.nextafter(score, 2))).model == "small"
    # JSON round trip: same scores, same threshold, same embedder
    path = tmp_path / "state.json"
    path.write_text(json.dumps(policy.state_dict()))
    again = ThresholdPolicy(state=str(path))
    assert again.threshold == policy.threshold and again.scorer == "mf"
    assert np.allclose(again.scores(small.prompts[:20]), policy.scores(small.prompts[:20]))
    lr = ThresholdPolicy(scorer="embed_lr", embedder="hashing").fit(small)
    assert np.allclose(ThresholdPolicy(state=lr.state_dict()).scores(["x y"]), lr.scores(["x y"]))


def test_strong_weak_resolution():
    req = _request(tags=False)
    assert strong_weak(req.models) == ("big", "small")  # most / least expensive
    assert strong_weak(_request().models) == ("big", "small")  # tags
    assert strong_weak(req.models, strong="mid") == ("mid", "small")
    assert strong_weak(req.models, fallback=("mid", "big")) == ("mid", "big")
    with pytest.raises(ValueError, match="strong must be one of"):
        strong_weak(req.models, strong="gpt-9")
    with pytest.raises(ValueError, match="at least 2"):
        strong_weak(req.models[:1])


def test_random_policy_sends_one_minus_threshold_strong():
    policy = RandomPolicy(threshold=0.3, seed=0)
    picks = [policy.route(_request()).model for _ in range(4000)]
    assert np.mean([p == "big" for p in picks]) == pytest.approx(0.7, abs=0.03)
    assert {policy.route(_request(threshold=0.0)).model for _ in range(20)} == {"big"}


def test_bad_parameters_and_untrained_use():
    with pytest.raises(ValueError, match="scorer must be one of"):
        ThresholdPolicy(scorer="bert")
    with pytest.raises(ValueError, match="threshold must be a number"):
        ThresholdPolicy(threshold=2)
    with pytest.raises(ValueError, match="embedder must be one of"):
        ThresholdPolicy(embedder="openai")
    with pytest.raises(ValueError, match="bad parameters"):
        build_policy("threshold", temperature=1.0)
    with pytest.raises(RuntimeError, match="not trained"):
        ThresholdPolicy(embedder="hashing").route(_request())
    with pytest.raises(ValueError, match="needs keys"):
        ThresholdPolicy(state={"scorer": "mf"})
    with pytest.raises(TypeError, match="RoutingTable"):
        ThresholdPolicy(embedder="hashing").fit([("prompt", 1, 0)])


def test_gateway_modules_import_without_torch():
    code = (
        "import sys, moelab.gateway.metrics, moelab.gateway.datasets, moelab.gateway.evaluate, "
        "moelab.gateway.policies.threshold, moelab.gateway.policies.baselines, moelab.cli.gateway; "
        "bad = [m for m in ('torch', 'fastapi', 'pydantic', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
