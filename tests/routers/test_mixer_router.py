"""MixER (``mixer``) against independent references: K-means as a plain loop and on planted
clusters, the greedy assignment against brute force over permutations, least squares against the
normal equations and the pseudo-inverse, the first-order expert loss against re-running the layer
with a token moved to another expert, and the router in ``moelab.MoE`` and ``MoELM``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import moelab
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.routers.mixer import (
    MixERRouter,
    cluster_median,
    expert_loss_estimate,
    greedy_assignment,
    kmeans_l1,
    lstsq_gate,
    mixer_gate_update,
    prefix_mean,
)


def plain_kmeans(points, centroids, iters, tol):
    """K-means with L1 assignment and mean update, in Python lists (MixER's train_step_gates)."""
    points = [list(map(float, p)) for p in points]
    centroids = [list(map(float, c)) for c in centroids]
    for i in range(iters):
        old = [c[:] for c in centroids]
        assign = []
        for p in points:
            dists = [sum(abs(a - b) for a, b in zip(p, c, strict=True)) for c in centroids]
            assign.append(dists.index(min(dists)))
        for j in range(len(centroids)):
            members = [p for p, a in zip(points, assign, strict=True) if a == j]
            if not members:
                return centroids, assign, "empty", i + 1
            centroids[j] = [sum(col) / len(members) for col in zip(*members, strict=True)]
        if all(
            abs(a - b) <= tol + 1e-5 * abs(b)
            for c, o in zip(centroids, old, strict=True)
            for a, b in zip(c, o, strict=True)
        ):
            return centroids, assign, "converged", i + 1
    return centroids, assign, "not converged", iters


@pytest.mark.parametrize(
    "seed,n,d,k,iters", [(0, 40, 3, 3, 20), (1, 25, 5, 4, 20), (2, 60, 2, 5, 3), (3, 10, 4, 4, 20)]
)
def test_kmeans_matches_a_plain_loop(seed, n, d, k, iters):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    init = x[torch.randperm(n, generator=g)[:k]] + 0.01
    res = kmeans_l1(x, k, iters=iters, tol=1e-4, init_KD=init)
    cents, assign, status, it = plain_kmeans(x.tolist(), init.tolist(), iters, 1e-4)
    assert res.assignment.tolist() == assign and res.iterations == it
    assert res.converged == (status == "converged") and res.empty_cluster == (status == "empty")
    torch.testing.assert_close(res.centroids, torch.tensor(cents, dtype=torch.float64))


def test_kmeans_finds_planted_clusters_or_fails_cleanly_from_the_official_start():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 4.0, -4.0], [-4.0, 4.0, 4.0], [4.0, -4.0, 4.0]], dtype=torch.float64)
    label = torch.arange(3).repeat_interleave(30)
    x = centers[label] + 0.3 * torch.randn(90, 3, generator=g, dtype=torch.float64)

    def recovered(res):  # each cluster is one blob, and its centroid is the blob mean
        pairs = {(int(a), int(b)) for a, b in zip(res.assignment, label, strict=True)}
        assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
        for a, b in pairs:
            torch.testing.assert_close(res.centroids[a], x[label == b].mean(0))

    # from one point of each blob (Forgy start)
    res = kmeans_l1(x, 3, init_KD=x[[5, 35, 65]])
    assert res.ok and res.iterations <= 3
    recovered(res)
    # from the official U(-1e-3, 1e-3) start: near 0, a point goes to the centroid best aligned
    # with its sign pattern, so two blobs may share one and leave a cluster empty (then MixER
    # skips the update); otherwise the blobs are found
    ok = 0
    for seed in range(12):
        res = kmeans_l1(x, 3, generator=torch.Generator().manual_seed(seed))
        assert res.ok or (res.empty_cluster and res.iterations == 1)
        if res.ok:
            ok += 1
            recovered(res)
    assert 0 < ok < 12


def test_kmeans_reports_an_empty_cluster_and_non_convergence():
    x = torch.randn(20, 2, dtype=torch.float64)
    far = torch.tensor([[0.0, 0.0], [100.0, 100.0]], dtype=torch.float64)
    res = kmeans_l1(x, 2, init_KD=far)
    assert res.empty_cluster and not res.converged and not res.ok and res.iterations == 1
    res = kmeans_l1(x, 3, iters=1, init_KD=x[:3] + 0.5)
    assert not res.converged and not res.ok
    with pytest.raises(ValueError, match="init_KD"):
        kmeans_l1(x, 3, init_KD=x[:2])
    with pytest.raises(ValueError, match="x_ND"):
        kmeans_l1(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="tol"):
        kmeans_l1(x, 2, tol=0.0)


def test_cluster_median_matches_numpy():
    g = torch.Generator().manual_seed(4)
    loss = torch.randn(31, 5, generator=g, dtype=torch.float64)
    assign = torch.randint(0, 4, (31,), generator=g)
    assign[:4] = torch.arange(4)
    out = cluster_median(loss, assign, 4)
    for j in range(4):
        ref = np.median(loss[assign == j].numpy(), axis=0)  # jnp.median's rule: mean of the two middles
        np.testing.assert_allclose(out[j].numpy(), ref, rtol=0, atol=1e-12)
    assert torch.isnan(cluster_median(loss, torch.zeros(31, dtype=torch.long), 2)[1]).all()


@pytest.mark.parametrize("k,e", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (2, 4), (3, 5)])
def test_greedy_assignment_is_the_lexicographic_minimum_over_permutations(k, e):
    """Brute force: among all injective cluster -> expert maps, the greedy one minimises the costs
    in cluster order (cluster 0's first, then cluster 1's, ...)."""
    for seed in range(10):
        cost = torch.rand(k, e, generator=torch.Generator().manual_seed(seed))
        best = min(
            itertools.permutations(range(e), k), key=lambda p: [float(cost[j, p[j]]) for j in range(k)]
        )
        got = greedy_assignment(cost)
        assert got.tolist() == list(best)
        assert len(set(got.tolist())) == k


def test_greedy_assignment_is_greedy_not_optimal_and_handles_ties_and_nan():
    # cluster 0 takes expert 0 (cost 0), leaving cluster 1 expert 1 (cost 10); the optimum is (1, 0)
    assert greedy_assignment(torch.tensor([[0.0, 1.0], [0.0, 10.0]])).tolist() == [0, 1]
    assert greedy_assignment(torch.zeros(3, 3)).tolist() == [0, 1, 2]  # ties: lowest index
    assert greedy_assignment(torch.tensor([[float("nan"), 5.0], [1.0, 2.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="K <= E"):
        greedy_assignment(torch.zeros(3, 2))


def test_lstsq_gate_matches_normal_equations_and_torch_lstsq():
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (50,), generator=g), 3).double()
    a = torch.cat([ctx, torch.ones(50, 1, dtype=torch.float64)], 1)
    normal = torch.linalg.solve(a.T @ a, a.T @ y)
    w = lstsq_gate(ctx, y, noise_std=0.0)
    assert w.shape == (5, 3)
    torch.testing.assert_close(w, normal, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, torch.linalg.lstsq(a, y).solution, atol=1e-10, rtol=1e-10)
    # the noise is N(0, std^2) from the generator, added to the contexts (not the bias column)
    w = lstsq_gate(ctx, y, noise_std=1e-2, generator=torch.Generator().manual_seed(9))
    noisy = ctx + 1e-2 * torch.randn(
        ctx.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    a = torch.cat([noisy, torch.ones(50, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(w, torch.linalg.solve(a.T @ a, a.T @ y), atol=1e-10, rtol=1e-10)


def test_lstsq_gate_underdetermined_is_the_minimum_norm_solution():
    g = torch.Generator().manual_seed(6)
    ctx = torch.randn(3, 6, generator=g, dtype=torch.float64)  # N = 3 < D + 1 = 7
    y = torch.eye(3, dtype=torch.float64)
    a = torch.cat([ctx, torch.ones(3, 1, dtype=torch.float64)], 1)
    w = lstsq_gate(ctx, y, noise_std=0.0)
    torch.testing.assert_close(w, torch.linalg.pinv(a) @ y, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(a @ w, y, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="targets_NK"):
        lstsq_gate(ctx, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="noise_std"):
        lstsq_gate(ctx, y, noise_std=-1.0)


def test_gate_update_maps_each_planted_cluster_to_its_best_expert():
    g = torch.Generator().manual_seed(7)
    centers = 3 * torch.tensor([[1.0, 1.0, -1.0, 0.5], [-1.0, 1.0, 1.0, -0.5], [1.0, -1.0, 1.0, 1.0]])
    label = torch.arange(3).repeat_interleave(40)
    ctx = (centers[label] + 0.2 * torch.randn(120, 4, generator=g)).double()
    best = torch.tensor([2, 0, 1])  # blob j is best served by expert best[j]
    loss = torch.rand(120, 3, generator=g).double() + 1.0
    loss[torch.arange(120), best[label]] = 0.1 * torch.rand(120, generator=g).double()
    w, km, experts = mixer_gate_update(
        ctx, loss, generator=torch.Generator().manual_seed(0), init_KD=ctx[[0, 50, 100]]
    )
    assert km.ok and w is not None and w.shape == (5, 3)
    route = (torch.cat([ctx, torch.ones(120, 1, dtype=torch.float64)], 1) @ w).argmax(1)
    assert torch.equal(route, best[label])


def linked_moe(d=8, e=3, **kw):
    moe = moelab.MoE(d, e, 1, router="mixer", router_kwargs={"seed": 0, **kw}, aux_losses={})
    moelab.link_routers([moe])
    return moe


def test_routing_is_hard_top1_with_weight_one_and_the_gate_is_the_affine_softmax():
    torch.manual_seed(0)
    r = MixERRouter(8, 4, seed=1)
    x = torch.randn(30, 8)
    out = r(x)
    gate = torch.softmax(torch.cat([x, torch.ones(30, 1)], 1) @ torch.cat([r.weight.T, r.bias[None]], 0), -1)
    assert out.top_k == 1 and out.num_assignments == 30
    assert torch.equal(out.weight, torch.ones(30))
    assert torch.equal(out.expert_index, gate.argmax(1))
    torch.testing.assert_close(out.probs, gate)
    assert not any(True for _ in r.parameters())  # W is never trained by gradient


def test_prefix_context_is_the_causal_running_mean_of_each_sequence():
    torch.manual_seed(1)
    x = torch.randn(2 * 5, 4)
    got = prefix_mean(x, (2, 5))
    for b in range(2):
        for s in range(5):
            torch.testing.assert_close(got[b * 5 + s], x[b * 5 : b * 5 + s + 1].mean(0))
    torch.testing.assert_close(prefix_mean(x, None)[6], x[:7].mean(0))  # no batch shape: one sequence
    moe = moelab.MoE(4, 3, 1, router="mixer", router_kwargs={"context": "prefix", "seed": 0})
    ids = moe.forward_routed(x.view(2, 5, 4))[1].expert_index
    r = moe.router
    assert torch.equal(ids, (got @ r.weight.T + r.bias).argmax(1))


def test_first_order_estimate_is_exact_for_a_loss_linear_in_the_layer_output():
    """Brute force: move one token to expert e, re-run the layer and measure the loss change."""
    torch.manual_seed(2)
    moe = linked_moe(tokens_per_step=5)
    x = torch.randn(12, 8)
    proj = torch.randn(12, 8)
    ctx = moelab.RoutingContext()
    y = moe(x, ctx)  # the router reads the output gradient through a hook on the layer's call
    routing = ctx.history[-1]
    (y * proj).sum().backward()
    r = moe.router
    n = r.buffered
    assert n == 5
    bx, bg, bexp = r._buf["x"][:n], r._buf["g"][:n], r._buf["expert"][:n]
    tok = [int((x == row).all(1).nonzero()) for row in bx]  # which tokens were sampled
    torch.testing.assert_close(bg, proj[tok])  # the captured dL/dy
    assert torch.equal(bexp, routing.expert_index[tok])
    est = expert_loss_estimate(moe.experts, bx, bg, bexp, proximal=0.0)
    base = float((y.detach() * proj).sum())
    with torch.no_grad():
        for i, t in enumerate(tok):
            for e in range(3):
                y2 = y.detach().clone()
                y2[t] = moe.experts.expert_forward(e, x[t : t + 1])[0]
                assert float(est[i, e]) == pytest.approx(float((y2 * proj).sum()) - base, abs=1e-4)
    assert torch.equal(est.gather(1, bexp[:, None]), torch.zeros(n, 1))


def test_proximal_estimate_matches_its_formula_written_plainly():
    torch.manual_seed(8)
    bank = moelab.MoE(6, 4, 1).experts
    x, g = torch.randn(9, 6), torch.randn(9, 6) * 1e-3
    c = torch.randint(0, 4, (9,))
    got = expert_loss_estimate(bank, x, g, c, proximal=0.7)
    with torch.no_grad():
        out = [[bank.expert_forward(e, x[n : n + 1])[0] for e in range(4)] for n in range(9)]
    diffs = [[out[n][e] - out[n][int(c[n])] for e in range(4)] for n in range(9)]
    moved = [float(diffs[n][e].square().sum()) for n in range(9) for e in range(4) if e != int(c[n])]
    kappa = (sum(float(v.square().sum()) for v in g) / 9) ** 0.5 / (sum(moved) / len(moved)) ** 0.5
    for n in range(9):
        for e in range(4):
            ref = float(g[n] @ diffs[n][e]) + 0.5 * 0.7 * kappa * float(diffs[n][e].square().sum())
            assert float(got[n, e]) == pytest.approx(ref, rel=1e-4, abs=1e-9)
    # scale-free: scaling the gradients scales the estimate, so the refit's choices do not change
    torch.testing.assert_close(expert_loss_estimate(bank, x, 1e3 * g, c, proximal=0.7), 1e3 * got)
    with pytest.raises(ValueError, match="proximal"):
        expert_loss_estimate(bank, x, g, c, proximal=-1.0)


def test_gate_update_leaves_no_autograd_graph_and_changes_only_the_gate():
    torch.manual_seed(3)
    moe = linked_moe(update_every=2)
    r = moe.router
    before = r.weight.clone()
    experts_before = [p.detach().clone() for p in moe.experts.parameters()]
    for _ in range(2):
        moe(torch.randn(4, 10, 8)).square().mean().backward()
        moelab.step_end(moe)
    assert int(r.steps) == 2 and int(r.gate_updates) + int(r.gate_skips) == 1
    assert int(r.gate_updates) == 1, r.metrics()
    assert not torch.equal(r.weight, before)
    for t in (r.weight, r.bias, r.centroids, *r._buf.values()):
        assert not t.requires_grad and t.grad_fn is None
    for p, q in zip(moe.experts.parameters(), experts_before, strict=True):
        assert torch.equal(p.detach(), q)  # step_end touches the gate only (no optimizer here)
    assert {"weight", "bias", "steps", "centroids", "gate_updates"} <= {
        k.split(".")[-1] for k in moe.state_dict()
    }


def test_failed_kmeans_keeps_the_gate_and_restarts_the_next_clustering():
    torch.manual_seed(4)
    moe = linked_moe(kmeans_iters=1)
    r = moe.router
    moe(torch.randn(3, 10, 8)).sum().backward()
    before = r.weight.clone()
    assert r.update_gate() is False
    assert torch.equal(r.weight, before) and int(r.gate_skips) == 1 and not bool(r.has_centroids)


def test_unlinked_router_routes_forward_and_backward_but_never_refits():
    torch.manual_seed(5)
    moe = moelab.MoE(8, 4, 1, router="mixer", router_kwargs={"update_every": 1})
    before = moe.router.weight.clone()
    for shape in [(2, 7, 8), (1, 8), (1, 1, 8), (0, 8)]:
        x = torch.randn(*shape, requires_grad=True)
        y = moe(x)
        y.sum().backward()
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        moelab.step_end(moe)
    assert torch.equal(moe.router.weight, before) and int(moe.router.gate_skips) == 4
    assert moe.router.buffered == 0


def test_eval_and_no_grad_forwards_buffer_nothing():
    moe = linked_moe()
    with torch.no_grad():
        moe(torch.randn(5, 8))
    moe.eval()
    moe(torch.randn(5, 8)).sum().backward()
    assert moe.router.buffered == 0 and moe.router.causal_at_eval


def test_trains_in_moelm_with_gate_refits_and_no_nan():
    torch.manual_seed(6)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=1, max_seq_len=32,
        router="mixer", router_kwargs={"update_every": 2}, aux_losses={},
    )  # fmt: skip
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        ids = torch.randint(0, 256, (4, 32))
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
    routers = [layer.router for _, layer in model.moe_layers()]
    assert all(int(r.steps) == 20 for r in routers)
    assert all(int(r.gate_updates) + int(r.gate_skips) == 10 for r in routers)
    assert sum(int(r.gate_updates) for r in routers) > 0
    assert all(torch.isfinite(r.weight).all() for r in routers)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"top_k": 2}, "top_k"),
        ({"update_every": 0}, "update_every"),
        ({"context": "environment"}, "context"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"tokens_per_step": 0}, "tokens_per_step"),
        ({"kmeans_iters": 0}, "kmeans_iters"),
        ({"kmeans_tol": 0.0}, "kmeans_tol"),
        ({"kmeans_init": "kmeans++"}, "kmeans_init"),
        ({"noise_std": -1e-4}, "noise_std"),
        ({"proximal": -1.0}, "proximal"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("mixer", d_model=8, num_experts=4, **kwargs)
