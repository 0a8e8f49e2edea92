"""MixER: a hard top-1 gate refitted outside autograd by K-means, a greedy assignment and least squares.

Paper and code: Nzoyem et al., *MixER: Better Mixture of Experts Routing for Hierarchical
Meta-Learning* (2025); official JAX code ddrous/MixER, ``mixer/learner.py`` (``MixER.gating_function``,
``MixER.__call__``) and ``mixer/trainer.py`` (``train_step_gates``), which this file follows.

The gate input is a *context* ``xi`` (in MixER a learned per-environment vector, not the state):
``gate = softmax(W^T [xi; 1])``; the forward is hard top-1 with weight 1. ``W`` gets no gradient.
Every ``update_every`` optimizer steps, outside autograd:

1. each expert's loss on every buffered context;
2. K-means on the contexts (K = E, L1 distance, mean update, <= 20 iterations, tolerance 1e-4);
   the update is skipped when a cluster empties or K-means does not converge;
3. the median loss of every (cluster, expert);
4. clusters in order each take their lowest-loss expert not yet taken (greedy);
5. ``W = lstsq([xi + N(0, 1e-4^2); 1], one-hot(expert of the context's cluster))``.

Our adaptation to a language model (docs/methods/mixer.md): the context of a token is its hidden
state at the layer (``context="hidden"``) or the running mean of its sequence's hidden states up
to it (``context="prefix"``, a causal stand-in for MixER's per-environment context). Running
every expert through the rest of the network to measure its loss on a token is not cheap, so the
loss of expert ``e`` on token ``t`` is estimated from the gradient at the layer output
(``expert_loss_estimate``):

    L_te = g_t . D_te + (proximal / 2) kappa |D_te|^2,   D_te = E_e(x_t) - E_{c_t}(x_t),   g_t = dL/dy_t,

the first-order change of the task loss had token ``t`` gone to expert ``e`` instead of the
expert ``c_t`` it went to, plus a proximal term (``kappa`` makes it scale-free). Without that term
a move to an unrelated expert is rated about 0 and every refit re-deals most tokens (measured:
40-98% of tokens per refit against a few % with it). ``g_t`` is captured by a gradient hook on
the layer output for a random sample of each training forward's tokens; the experts run on the
buffered tokens only at the refit (``E`` expert calls on ``buffer_size`` rows every
``update_every`` steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moelab.core.bank import check_bank
from moelab.core.checks import float_in, positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router, share
from moelab.core.routing import Routing

CONTEXTS = ("hidden", "prefix")
KMEANS_INITS = ("uniform", "points")
KMEANS_INIT_SCALE = 1e-3  # the official code draws the first centroids from U(-1e-3, 1e-3)


class KMeansResult(NamedTuple):
    """What ``kmeans_l1`` found.

    Attributes:
        centroids: ``[K, D]`` the last centroids.
        assignment: ``[N]`` long, each point's cluster (nearest centroid in L1 before the last
            centroid update, as the official code).
        converged: the centroids moved by at most the tolerance.
        empty_cluster: a cluster lost all its points (the iterations stopped there).
        iterations: iterations run.
    """

    centroids: Tensor
    assignment: Tensor
    converged: bool
    empty_cluster: bool
    iterations: int

    @property
    def ok(self) -> bool:
        """Whether MixER may use this clustering (converged, no empty cluster)."""
        return self.converged and not self.empty_cluster


def kmeans_l1(
    x_ND: Tensor,
    k: int,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    init_KD: Tensor | None = None,
) -> KMeansResult:
    """K-means with L1 assignment and mean update (MixER's ``train_step_gates``, step 2).

    Each iteration assigns every point to its nearest centroid in L1 distance (first index on
    ties), then moves each centroid to the mean of its points. It stops early, unconverged, when
    a cluster is empty, and converged when every centroid coordinate moved by at most
    ``tol + 1e-5 |old|`` (``jnp.allclose(new, old, atol=tol)``, the official test).

    Args:
        x_ND: ``[N, D]`` points.
        k: ``K`` clusters (MixER: the number of experts).
        iters: at most this many iterations (MixER: 20).
        tol: convergence tolerance (MixER: 1e-4).
        generator: draws the initial centroids (on the CPU) when ``init_KD`` is None.
        init_KD: ``[K, D]`` initial centroids (MixER warm-starts from the previous update's);
            default ``U(-1e-3, 1e-3)`` as the official code.
    Returns:
        ``KMeansResult``; computed in ``x``'s dtype on its device.
    """
    if not isinstance(x_ND, Tensor) or x_ND.dim() != 2 or not x_ND.is_floating_point():
        got = tuple(x_ND.shape) if isinstance(x_ND, Tensor) else type(x_ND).__name__
        raise ValueError(f"x_ND must be a floating [N, D] tensor, got {got}")
    k = positive_int("k", k)
    iters = positive_int("iters", iters)
    tol = positive_float("tol", tol)
    n, d = x_ND.shape
    if init_KD is None:
        init = (torch.rand(k, d, generator=generator, dtype=torch.float64) * 2 - 1) * KMEANS_INIT_SCALE
        centroids = init.to(device=x_ND.device, dtype=x_ND.dtype)
    else:
        if not isinstance(init_KD, Tensor) or tuple(init_KD.shape) != (k, d):
            got = tuple(init_KD.shape) if isinstance(init_KD, Tensor) else type(init_KD).__name__
            raise ValueError(f"init_KD must be a [K, D] = [{k}, {d}] tensor, got {got}")
        centroids = init_KD.to(device=x_ND.device, dtype=x_ND.dtype)
    assignment = torch.zeros(n, dtype=torch.long, device=x_ND.device)
    for i in range(iters):
        old = centroids
        assignment = torch.cdist(x_ND, centroids, p=1.0).argmin(dim=1)
        counts = torch.bincount(assignment, minlength=k)
        if bool((counts == 0).any()):
            return KMeansResult(centroids, assignment, False, True, i + 1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x_ND)
        centroids = sums / counts[:, None].to(sums.dtype)
        if torch.allclose(centroids, old, rtol=1e-5, atol=tol):
            return KMeansResult(centroids, assignment, True, False, i + 1)
    return KMeansResult(centroids, assignment, False, False, iters)


def cluster_median(loss_NE: Tensor, assignment_N: Tensor, k: int) -> Tensor:
    """``[K, E]``: the median over each cluster's points of each expert's loss (MixER step 3).

    The median of an even count is the mean of the two middle values (``jnp.median``, which the
    official code uses; ``torch.median`` would return the lower one). An empty cluster's row is NaN.
    """
    if loss_NE.dim() != 2 or assignment_N.shape != loss_NE.shape[:1]:
        raise ValueError(
            f"loss_NE must be [N, E] and assignment_N [N], got {tuple(loss_NE.shape)} and {tuple(assignment_N.shape)}"
        )
    k = positive_int("k", k)
    out = loss_NE.new_full((k, loss_NE.shape[1]), float("nan"))
    for j in range(k):
        rows = loss_NE[assignment_N == j]
        if rows.shape[0]:
            out[j] = torch.quantile(rows, 0.5, dim=0)  # linear interpolation: the two-middle mean
    return out


def greedy_assignment(cost_KE: Tensor) -> Tensor:
    """``[K]`` long: cluster ``j = 0, 1, ...`` in order takes its lowest-cost expert not yet taken.

    MixER's step 4 (ties: the lowest expert index, as a stable argsort). It is greedy, not the
    optimal (Hungarian) assignment: it minimises the costs lexicographically in cluster order.
    NaN costs count as +inf. Needs ``K <= E``.
    """
    if not isinstance(cost_KE, Tensor) or cost_KE.dim() != 2:
        got = tuple(cost_KE.shape) if isinstance(cost_KE, Tensor) else type(cost_KE).__name__
        raise ValueError(f"cost_KE must be a [K, E] tensor, got {got}")
    k, e = cost_KE.shape
    if k > e:
        raise ValueError(f"cost_KE must have K <= E (each cluster needs its own expert), got K={k}, E={e}")
    cost = torch.nan_to_num(cost_KE.detach().double(), nan=float("inf"))
    free = torch.ones(e, dtype=torch.bool, device=cost.device)
    chosen = torch.empty(k, dtype=torch.long, device=cost.device)
    for j in range(k):
        candidates = free.nonzero().flatten()  # ascending: argmin's first index is the lowest expert
        best = candidates[cost[j, candidates].argmin()]
        chosen[j] = best
        free[best] = False
    return chosen


def lstsq_gate(
    ctx_ND: Tensor, targets_NK: Tensor, noise_std: float = 1e-4, generator: torch.Generator | None = None
) -> Tensor:
    """``W [D + 1, K]`` minimising ``|| [ctx + noise, 1] W - targets ||_F`` (MixER step 5).

    ``noise ~ N(0, noise_std^2)`` is drawn on the CPU from ``generator`` (MixER: 1e-4; 0 for none).
    Solved in float64 on the CPU by ``torch.linalg.lstsq`` with the SVD driver ``gelsd``: the
    minimum-norm solution, as ``jnp.linalg.lstsq`` gives, also when ``N < D + 1`` or the contexts
    are rank-deficient. Returned in ``ctx``'s dtype on its device; no autograd graph.
    """
    if not isinstance(ctx_ND, Tensor) or ctx_ND.dim() != 2:
        raise ValueError(
            f"ctx_ND must be an [N, D] tensor, got {getattr(ctx_ND, 'shape', type(ctx_ND).__name__)}"
        )
    if not isinstance(targets_NK, Tensor) or targets_NK.dim() != 2 or targets_NK.shape[0] != ctx_ND.shape[0]:
        raise ValueError(
            f"targets_NK must be an [N, K] tensor with N = {ctx_ND.shape[0]}, "
            f"got {getattr(targets_NK, 'shape', type(targets_NK).__name__)}"
        )
    noise_std = float_in("noise_std", noise_std, 0.0, float("inf"))
    with torch.no_grad():
        a = ctx_ND.detach().to("cpu", torch.float64)
        if noise_std > 0:
            a = a + noise_std * torch.randn(a.shape, generator=generator, dtype=torch.float64)
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], dim=1)
        b = targets_NK.detach().to("cpu", torch.float64)
        w = torch.linalg.lstsq(a, b, driver="gelsd").solution
    dtype = ctx_ND.dtype if ctx_ND.is_floating_point() else torch.float32
    return w.to(device=ctx_ND.device, dtype=dtype)


def expert_loss_estimate(
    bank: nn.Module, x_ND: Tensor, grad_ND: Tensor, expert_N: Tensor, proximal: float = 1.0
) -> Tensor:
    """``[N, E]``: the estimated change of the task loss had row ``n`` gone to expert ``e``.

    Our per-expert loss for an LM. With ``D_ne = E_e(x_n) - E_{c_n}(x_n)`` (``x_n`` the layer
    input, ``c_n`` the expert the row went to, ``g_n = dL/dy_n`` the gradient at the layer output):

        L_ne = g_n . D_ne + (proximal / 2) * kappa * |D_ne|^2,
        kappa = rms_n |g_n| / rms_{n, e != c_n} |D_ne|          (one number per call)

    The first term is the first-order (Taylor) change, exact for a loss linear in the layer output;
    the second a proximal (trust-region) term with the curvature set by ``kappa`` so that the
    estimate does not depend on the scale of the loss or of the outputs. Alone, the first-order
    term rates a move to an unrelated expert near 0 (a random direction), so a refit re-deals
    most tokens; the proximal term makes a move pay for its size, as a real loss does (``proximal
    = 1``: a typical-size move must point against ``g`` with cosine below about -1/2). ``proximal =
    0`` is the first-order estimate. 0 at ``e = c_n``. Runs ``bank.expert_forward`` once per
    expert, without grad.
    """
    check_bank(bank, "bank")
    if x_ND.dim() != 2 or grad_ND.dim() != 2 or expert_N.dim() != 1:
        raise ValueError(
            f"x_ND, grad_ND and expert_N must be [N, d_in], [N, d_out], [N], got "
            f"{tuple(x_ND.shape)}, {tuple(grad_ND.shape)}, {tuple(expert_N.shape)}"
        )
    n = x_ND.shape[0]
    if grad_ND.shape[0] != n or expert_N.shape[0] != n:
        raise ValueError(
            f"x_ND, grad_ND and expert_N must have the same N, got {n}, {grad_ND.shape[0]}, {expert_N.shape[0]}"
        )
    proximal = float_in("proximal", proximal, 0.0, float("inf"))
    ref = next(bank.parameters(), None)
    dtype = ref.dtype if ref is not None else x_ND.dtype
    with torch.no_grad():
        x = x_ND.to(dtype)
        g = grad_ND.float()
        y_NEO = torch.stack([bank.expert_forward(e, x).float() for e in range(bank.num_experts)], 1)
        chosen = expert_N.long()[:, None]
        diff_NEO = y_NEO - y_NEO[torch.arange(n, device=x.device), chosen[:, 0]][:, None]
        loss_NE = (diff_NEO * g[:, None]).sum(-1)
        if proximal > 0 and n:
            sq_NE = diff_NEO.square().sum(-1)
            moved = torch.ones_like(sq_NE, dtype=torch.bool).scatter_(1, chosen, False)
            gap = sq_NE[moved].mean().sqrt() if bool(moved.any()) else sq_NE.new_zeros(())
            if gap > 0:
                kappa = g.square().sum(-1).mean().sqrt() / gap
                loss_NE = loss_NE + 0.5 * proximal * kappa * sq_NE
        return loss_NE


def mixer_gate_update(
    ctx_ND: Tensor,
    loss_NE: Tensor,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    noise_std: float = 1e-4,
    generator: torch.Generator | None = None,
    init_KD: Tensor | None = None,
) -> tuple[Tensor | None, KMeansResult, Tensor | None]:
    """MixER's gate refit, steps 2-5: ``(W [D + 1, E] or None, K-means result, cluster -> expert [E])``.

    ``ctx_ND`` are the contexts, ``loss_NE`` each expert's loss on each (lower is better). ``W`` is
    None (and the gate must stay as it is) when the clustering is not usable (``KMeansResult.ok``).
    """
    e = loss_NE.shape[1]
    km = kmeans_l1(ctx_ND, e, iters, tol, generator, init_KD)
    if not km.ok:
        return None, km, None
    experts_K = greedy_assignment(cluster_median(loss_NE, km.assignment, e))
    targets_NE = nn.functional.one_hot(experts_K[km.assignment], e).to(ctx_ND.dtype)
    return lstsq_gate(ctx_ND, targets_NE, noise_std, generator), km, experts_K


def prefix_mean(x_TD: Tensor, batch_shape: tuple[int, int] | None) -> Tensor:
    """``[T, D]``: each token's mean of its sequence's rows up to and including it (causal).

    ``batch_shape = (B, S)`` splits the tokens into sequences; None (or a shape that does not match
    ``T``) makes them one sequence.
    """
    t, d = x_TD.shape
    b, s = batch_shape if batch_shape is not None and batch_shape[0] * batch_shape[1] == t else (1, t)
    if t == 0:
        return x_TD.float().clone()
    x = x_TD.float().reshape(b, s, d)
    count = torch.arange(1, s + 1, device=x.device, dtype=x.dtype)[None, :, None]
    return (x.cumsum(1) / count).reshape(t, d)


@register_router(
    "mixer",
    paper="MixER (Nzoyem et al. 2025), ddrous/MixER",
    summary="hard top-1 gate softmax(W^T[xi;1]); W refit outside autograd: K-means, greedy expert per cluster, lstsq",
)
class MixERRouter(Router):
    """MixER's gate in an LM (module docstring; docs/methods/mixer.md).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: must be 1: MixER routes each token to one expert with weight 1.
        update_every: refit the gate every this many optimizer steps (``step_end`` calls);
            default 5 (MixER's Lotka-Volterra example, ``gate_update_every``).
        context: the gate input ``xi``: ``"hidden"`` (the token's hidden state, default, ours) or
            ``"prefix"`` (the running mean of its sequence's hidden states, ours).
        buffer_size: contexts kept for the refit, the most recent ones; default 512 (ours).
        tokens_per_step: tokens sampled from each training forward into the buffer; default 128
            (ours).
        kmeans_iters, kmeans_tol: K-means budget; defaults 20 and 1e-4 (MixER's ``max_kmeans``,
            ``convergence_tol``).
        kmeans_init: how a K-means without a previous clustering starts: ``"uniform"``
            (centroids ``U(-1e-3, 1e-3)``, the official code; default) or ``"points"`` (``E``
            distinct buffered contexts, ours: the first iteration then never empties a cluster).
            Either way a successful clustering warm-starts the next one (official).
        noise_std: std of the noise added to the contexts before least squares; default 1e-4
            (MixER's ``noise_level``).
        proximal: weight of the proximal term of the per-expert loss estimate
            (``expert_loss_estimate``); default 1.0 (ours); 0 is the plain first-order estimate.
        seed: seeds the router's own generator (token samples, K-means init, noise), so the refit
            never draws from the global RNG; default None: one draw from the global RNG at
            construction.

    The gate is ``weight [E, d]`` and ``bias [E]`` (``W^T = [weight | bias]``), persistent buffers
    (saved, never trained by gradient), initialised ``U(+-1/sqrt(d + 1))`` as the official code.
    The refit needs the layer's experts: a model calls ``link`` (``MoELM`` does; for a lone
    ``moelab.MoE`` call ``moelab.link_routers([moe])``); an unlinked router routes, but its gate
    never changes.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        *,
        update_every: int = 5,
        context: str = "hidden",
        buffer_size: int = 512,
        tokens_per_step: int = 128,
        kmeans_iters: int = 20,
        kmeans_tol: float = 1e-4,
        kmeans_init: str = "uniform",
        noise_std: float = 1e-4,
        proximal: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        top_k_in_range(top_k, num_experts)
        if top_k != 1:
            raise ValueError(
                f"top_k must be 1: MixER routes each token to exactly one expert (weight 1), got {top_k}"
            )
        self.top_k = 1
        self.update_every = positive_int("update_every", update_every)
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        self.context = context
        self.buffer_size = positive_int("buffer_size", buffer_size)
        self.tokens_per_step = positive_int("tokens_per_step", tokens_per_step)
        self.kmeans_iters = positive_int("kmeans_iters", kmeans_iters)
        self.kmeans_tol = positive_float("kmeans_tol", kmeans_tol)
        if kmeans_init not in KMEANS_INITS:
            raise ValueError(f"kmeans_init must be one of {KMEANS_INITS}, got {kmeans_init!r}")
        self.kmeans_init = kmeans_init
        self.noise_std = float_in("noise_std", noise_std, 0.0, float("inf"))
        self.proximal = float_in("proximal", proximal, 0.0, float("inf"))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.generator = torch.Generator().manual_seed(seed)
        lim = 1.0 / (d_model + 1) ** 0.5
        self.register_buffer(
            "weight", torch.empty(num_experts, d_model).uniform_(-lim, lim, generator=self.generator)
        )
        self.register_buffer("bias", torch.empty(num_experts).uniform_(-lim, lim, generator=self.generator))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_experts, d_model))
        self.register_buffer("has_centroids", torch.zeros((), dtype=torch.bool))
        self.register_buffer("gate_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("gate_skips", torch.zeros((), dtype=torch.long))
        self._hook_handle: Any = None
        self._pending: dict[str, Tensor] | None = None
        self.clear_buffer()

    # -- state kept out of the checkpoint: refilled within a few steps ---------------------------
    def clear_buffer(self) -> None:
        """Forget the buffered contexts (plain tensors, allocated on first use on the data's device)."""
        self._buf: dict[str, Tensor] = {}
        self._buf_count = 0
        self._buf_pos = 0

    @property
    def buffered(self) -> int:
        """How many contexts the buffer holds."""
        return self._buf_count

    def _apply(self, fn, recurse: bool = True):
        # ``model.to(torch.bfloat16)`` must not round the least-squares gate or the centroids; the
        # buffered contexts stay where they were, so they are dropped (refilled within steps).
        super()._apply(fn, recurse)
        self.clear_buffer()
        for name in ("weight", "bias", "centroids"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    # -- routing --------------------------------------------------------------------------------
    def gate_input(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        """``[T, d]`` fp32: the context ``xi`` of each token (``context``)."""
        if self.context == "prefix":
            return prefix_mean(x_TD, ctx.batch_shape)
        return x_TD.float()

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        xi = self.gate_input(x_TD, ctx)
        logits = self.router_logits(xi)  # W^T [xi; 1] with W^T = [weight | bias], no gradient to W
        probs = torch.softmax(logits, dim=-1)
        index = logits.argmax(dim=-1, keepdim=True)
        weight = torch.ones(index.shape, dtype=torch.float32, device=x_TD.device)
        if self.training and torch.is_grad_enabled() and self._hook_handle is not None and x_TD.shape[0]:
            self._sample(x_TD, xi, index[:, 0])
        return Routing.from_topk(index, weight, self.num_experts, logits=logits, probs=probs, validate=False)

    def _sample(self, x_TD: Tensor, xi_TD: Tensor, expert_T: Tensor) -> None:
        t = x_TD.shape[0]
        n = min(t, self.tokens_per_step)
        idx = torch.randperm(t, generator=self.generator)[:n].to(x_TD.device)
        self._pending = {
            "index": idx,
            "x": x_TD.detach()[idx].float(),
            "xi": xi_TD.detach()[idx].float(),
            "expert": expert_T[idx],
        }

    # -- the layer: its experts and its output gradient -----------------------------------------
    def link(self, position: int, layers: Sequence[nn.Module]) -> None:
        layer = layers[position]
        check_bank(getattr(layer, "experts", None), "the linked layer's experts")
        if self._hook_handle is not None:
            self._hook_handle.remove()
        share(self, "layer", layer)
        self._hook_handle = layer.register_forward_hook(self._on_layer_output)

    def _on_layer_output(self, module: nn.Module, args: Any, output: Any) -> None:
        pending, self._pending = self._pending, None
        y = output[0] if isinstance(output, (tuple, list)) else output
        if pending is None or not isinstance(y, Tensor) or not y.requires_grad:
            return

        def capture(grad: Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1])[pending["index"]].float()
            self._push(pending["x"], pending["xi"], g, pending["expert"])

        y.register_hook(capture)

    def _push(self, x: Tensor, xi: Tensor, g: Tensor, expert: Tensor) -> None:
        n = x.shape[0]
        if not self._buf:
            size = self.buffer_size
            self._buf = {
                "x": x.new_zeros(size, x.shape[1]),
                "xi": xi.new_zeros(size, xi.shape[1]),
                "g": g.new_zeros(size, g.shape[1]),
                "expert": expert.new_zeros(size),
            }
        if n > self.buffer_size:  # keep the last rows
            keep = slice(n - self.buffer_size, n)
            x, xi, g, expert = x[keep], xi[keep], g[keep], expert[keep]
            n = self.buffer_size
        rows = (self._buf_pos + torch.arange(n, device=x.device)) % self.buffer_size
        for name, value in (("x", x), ("xi", xi), ("g", g), ("expert", expert)):
            self._buf[name][rows] = value
        self._buf_pos = (self._buf_pos + n) % self.buffer_size
        self._buf_count = min(self.buffer_size, self._buf_count + n)

    # -- the refit --------------------------------------------------------------------------------
    @torch.no_grad()
    def step_end(self) -> None:
        """Count the step; every ``update_every`` steps refit the gate (``update_gate``)."""
        self.steps += 1
        if int(self.steps) % self.update_every == 0:
            self.update_gate()

    @torch.no_grad()
    def update_gate(self) -> bool:
        """MixER's ``train_step_gates`` on the buffered contexts. Returns whether the gate changed.

        Skipped (counted in ``gate_skips``) when the router is unlinked, holds fewer than ``E``
        contexts, or K-means is not usable; after a failed K-means the next one starts afresh.
        """
        layer = self.__dict__.get("layer")
        if layer is None or self._buf_count < self.num_experts:
            self.gate_skips += 1
            return False
        n = self._buf_count
        x, xi, g, expert = (self._buf[k][:n] for k in ("x", "xi", "g", "expert"))
        loss_NE = expert_loss_estimate(layer.experts, x, g, expert, self.proximal)
        xi = xi.to("cpu", torch.float64)
        init = None
        if bool(self.has_centroids):
            init = self.centroids.to("cpu", torch.float64)
        elif self.kmeans_init == "points":
            init = xi[torch.randperm(n, generator=self.generator)[: self.num_experts]]
        w, km, _ = mixer_gate_update(
            xi,
            loss_NE.to("cpu", torch.float64),
            iters=self.kmeans_iters,
            tol=self.kmeans_tol,
            noise_std=self.noise_std,
            generator=self.generator,
            init_KD=init,
        )
        if w is None:
            self.has_centroids.fill_(False)
            self.gate_skips += 1
            return False
        self.weight.copy_(w[:-1].t())
        self.bias.copy_(w[-1])
        self.centroids.copy_(km.centroids)
        self.has_centroids.fill_(True)
        self.gate_updates += 1
        return True

    def metrics(self) -> dict[str, float]:
        """Gate refits done and skipped (K-means failures, too few contexts) so far."""
        return {"mixer_gate_updates": float(self.gate_updates), "mixer_gate_skips": float(self.gate_skips)}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k=1, update_every={self.update_every}, context={self.context!r}, "
            f"buffer_size={self.buffer_size}"
        )
