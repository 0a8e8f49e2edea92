"""Executor ``atomic``: single-neuron expert pools (PEER, OmniMoE) with a memory-lean autograd.

``y[t] = sum over assignments (t, e, w) of w * act(u_e . x_t) * v_e`` over a pool of ``E ~ 10^6``
experts ``u [E, d_in]``, ``v [E, d_out]`` (``moelab.experts.AtomicBank``). Papers: He, *Mixture of
A Million Experts* (PEER, 2024), Eq. 4; OmniMoE (flash-algo/omni-moe) for the "expert-centric"
weight update (each atomic expert's weights touched once per batch).

Generic code (the ``sorted`` executor, lucidrains/PEER-pytorch) gathers ``u`` and ``v`` rows per
assignment as ``[N, d]`` tensors and autograd keeps both for the backward: at ``T = 4096``
tokens, 8 heads and 16 experts per head, ``N = 524288`` and each is 1 GiB at ``d = 512``.
:func:`atomic_experts` runs a custom ``torch.autograd.Function`` instead that saves ``x``, the
indices, the weights and the ``[N]`` pre-activations ``h = u_e . x_t``: nothing ``[N, d]``,
nothing ``[T, E]``. Three passes:

1. **forward**, token by token: ``h``, ``s = w act(h)``, ``y_t = sum s v_e``.
2. **backward over tokens**: ``g_s = gy_t . v_e`` (rows of ``v`` read again), the router's
   gradient ``grad_w = act(h) g_s``, ``g_h = w act'(h) g_s``, ``grad_x_t = sum g_h u_e``.
3. **backward over experts** (expert-centric): the assignments sorted by expert (one stable sort
   of the ``[N]`` ids); ``grad_u[e] = sum g_h x_t`` and ``grad_v[e] = sum s gy_t`` over each
   expert's assignments, the rows in ascending order. This pass reads no ``u``/``v`` row (only
   the small ``x`` and ``gy``), and each gradient row is finished in one visit.

Two implementations of the passes, equal to ``reference`` forward and backward:

- CPU, float32/float64: ``moelab.kernels.cpu.atomic``, C loops (OpenMP over tokens, then over
  blocks of expert rows) that read each ``u``/``v`` row straight from the table, with no
  temporaries, and write each row of the ``[E, d]`` gradients exactly once (no zero fill then
  read-modify-write). Built on first use; without a C compiler, the PyTorch path.
- anything else (CUDA, bf16/fp16, autocast): a PyTorch path over chunks of ``chunk_size``
  assignments: gathered ``[chunk, d]`` rows and batched GEMVs (``[T, k]`` layouts) or
  ``index_add_`` (other COO routings); pass 3 gathers ``x``/``gy`` rows and ``index_add_``s them
  into zeroed gradients in expert order.

Measured on CPU (1 thread of a shared 2-core Xeon, ``E = 2^18``, ``d = 512``, ``T = 1024``,
``k = 128`` uniform random experts per token, single interleaved runs, indicative): the C forward
74 ms against 200 ms for the chunked PyTorch forward and 310-500 ms for lucidrains/PEER-pytorch's
gather + einsum; forward + backward 0.7-0.9 s against 1.3-1.5 s (PyTorch path) and 1.3-2.1 s
(PEER-pytorch), of which ~0.3 s per ``[E, d]`` gradient is the first touch of its fresh pages,
paid by every implementation. In the PyTorch path, sorting by expert made the gradient scatter
~10 % faster (``index_add_`` into ascending rows, sort included) and row gathers ~25 % faster;
chunks of 1024 assignments beat 4096 and 16384 on CPU. See docs/methods/atomic.md, "The
``atomic`` executor".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.core.activations import activation_backward, activation_forward, get_activation
from moelab.core.routing import Routing
from moelab.experts.atomic import AtomicBank
from moelab.kernels.cpu import atomic as atomic_kernel
from moelab.ops.executors import register_executor

# Assignments per chunk of the PyTorch path (temporaries: a few [chunk, d] tensors), by device
# type. Our choice: 1024 measured best on CPU (module docstring); CUDA is not measured yet, its
# value only keeps kernel launches few (the chunk's rows are ~64 MiB at d = 512).
DEFAULT_CHUNK_SIZE: dict[str, int] = {"cpu": 1024, "cuda": 32768}
FALLBACK_CHUNK_SIZE = 4096  # other device types


def _act(h: Tensor, activation: str) -> Tensor:
    return activation_forward(h, activation)


class AtomicExperts(torch.autograd.Function):
    """The op behind :func:`atomic_experts` (module docstring). Not twice differentiable.

    ``forward(x [T, d_in], weight [N], u [E, d_in], v [E, d_out], expert_index [N],
    token_index [N] or None, top_k, activation, chunk_size) -> y [T, d_out]``. With
    ``token_index`` None the assignments are token-major, ``top_k`` per token (``N = T top_k``).
    ``x``, ``weight`` and the gathered rows share one compute dtype; ``u``/``v`` may be wider
    (their rows are cast per chunk, their gradients come back in their own dtype).
    """

    @staticmethod
    def forward(ctx, x, weight, u, v, expert_index, token_index, top_k, activation, chunk_size):
        use_kernel = _kernel_usable(x, weight, u, v)
        row_start = order = None
        if use_kernel:
            _check_ranges(expert_index, token_index, u.shape[0], x.shape[0])
            if token_index is not None:
                row_start, order = _token_layout(token_index, x.shape[0])
            y, h_N = atomic_kernel.forward(
                x,
                u,
                v,
                expert_index,
                weight,
                0 if token_index is not None else top_k,
                row_start,
                order,
                activation,
            )
        else:
            y, h_N = _forward_chunked(
                x, weight, u, v, expert_index, token_index, top_k, activation, chunk_size
            )
        ctx.save_for_backward(x, weight, u, v, expert_index, token_index, h_N, row_start, order)
        ctx.top_k, ctx.activation, ctx.chunk_size, ctx.use_kernel = top_k, activation, chunk_size, use_kernel
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, u, v, expert_index, token_index, h_N, row_start, order = ctx.saved_tensors
        need_x, need_w, need_u, need_v = ctx.needs_input_grad[:4]
        top_k, activation = ctx.top_k, ctx.activation
        # A stride-0 y.sum() gradient becomes one [T, d_out] buffer: both paths read rows of it.
        gy = gy.to(x.dtype).contiguous()
        grad_x = grad_w = grad_u = grad_v = None
        if ctx.use_kernel:
            grad_x, grad_w, s_N, gh_N = atomic_kernel.backward_tokens(
                gy,
                u,
                v,
                expert_index,
                weight,
                h_N,
                0 if token_index is not None else top_k,
                row_start,
                order,
                activation,
                need_x=need_x,
                need_w=need_w,
                need_s=need_v,
                need_gh=need_u,
            )
        else:
            grad_x, grad_w, s_N, gh_N = _backward_tokens_chunked(
                gy,
                x,
                weight,
                u,
                v,
                expert_index,
                token_index,
                h_N,
                top_k,
                activation,
                ctx.chunk_size,
                need_x=need_x,
                need_w=need_w,
                need_s=need_v,
                need_gh=need_u,
            )
        if need_u or need_v:
            # Expert-centric: the assignments sorted by expert, each table row written in turn.
            sorted_e, perm = torch.sort(expert_index, stable=True)
            tok = perm.div(top_k, rounding_mode="floor") if token_index is None else token_index[perm]
            table_grad = atomic_kernel.table_grad if ctx.use_kernel else _table_grad_chunked
            num_experts = u.shape[0]
            if need_u:
                grad_u = table_grad(x, sorted_e, tok, gh_N[perm], num_experts, **_chunk(ctx, u))
            if need_v:
                grad_v = table_grad(gy, sorted_e, tok, s_N[perm], num_experts, **_chunk(ctx, v))
        return grad_x, grad_w, grad_u, grad_v, None, None, None, None, None


def _chunk(ctx, table: Tensor) -> dict:
    return {} if ctx.use_kernel else {"chunk_size": ctx.chunk_size, "dtype": table.dtype}


def _kernel_usable(x: Tensor, weight: Tensor, u: Tensor, v: Tensor) -> bool:
    return u.is_contiguous() and v.is_contiguous() and atomic_kernel.can_use(x, weight, u, v)


def _check_ranges(
    expert_index: Tensor, token_index: Tensor | None, num_experts: int, num_tokens: int
) -> None:
    """The C loops trust their indices: a bad one must be an error here, not a crash there."""
    if expert_index.numel() == 0:
        return
    lo, hi = torch.aminmax(expert_index)
    if int(lo) < 0 or int(hi) >= num_experts:
        raise ValueError(f"expert_index must lie in [0, {num_experts}), got [{int(lo)}, {int(hi)}]")
    if token_index is not None:
        lo, hi = torch.aminmax(token_index)
        if int(lo) < 0 or int(hi) >= num_tokens:
            raise ValueError(f"token_index_N must lie in [0, {num_tokens}), got [{int(lo)}, {int(hi)}]")


def _token_layout(token_index: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """``(row_start [T + 1], order [N])``: the assignments of token ``t`` are
    ``order[row_start[t] .. row_start[t + 1])`` (a stable sort by token)."""
    order = torch.sort(token_index, stable=True).indices
    row_start = token_index.new_zeros(num_tokens + 1)
    torch.cumsum(torch.bincount(token_index, minlength=num_tokens), 0, out=row_start[1:])
    return row_start, order


def _forward_chunked(x, weight, u, v, expert_index, token_index, top_k, activation, chunk_size):
    """PyTorch path: ``(y, h)``, gathering ``chunk_size`` assignments' rows at a time."""
    t, d_out = x.shape[0], v.shape[1]
    n = expert_index.shape[0]
    dtype = x.dtype
    h_N = x.new_empty(n)
    if token_index is None:
        y = x.new_empty(t, d_out)
        ct = max(1, chunk_size // top_k)  # tokens per chunk
        for t0 in range(0, t, ct):
            t1 = min(t, t0 + ct)
            n0, n1 = t0 * top_k, t1 * top_k
            e_c = expert_index[n0:n1]
            u_c = u.index_select(0, e_c).to(dtype).view(t1 - t0, top_k, -1)
            h_c = torch.bmm(u_c, x[t0:t1].unsqueeze(2), out=h_N[n0:n1].view(t1 - t0, top_k, 1))
            s_c = _act(h_c.view(t1 - t0, 1, top_k), activation).mul_(weight[n0:n1].view(t1 - t0, 1, top_k))
            v_c = v.index_select(0, e_c).to(dtype).view(t1 - t0, top_k, d_out)
            torch.bmm(s_c, v_c, out=y[t0:t1].unsqueeze(1))
    else:
        y = x.new_zeros(t, d_out)
        for n0 in range(0, n, chunk_size):
            n1 = min(n, n0 + chunk_size)
            e_c, t_c = expert_index[n0:n1], token_index[n0:n1]
            u_c = u.index_select(0, e_c).to(dtype)
            h_c = torch.sum(u_c.mul_(x.index_select(0, t_c)), 1, out=h_N[n0:n1])
            s_c = _act(h_c, activation).mul_(weight[n0:n1])
            v_c = v.index_select(0, e_c).to(dtype)
            y.index_add_(0, t_c, v_c.mul_(s_c.unsqueeze(1)))
    return y, h_N


def _backward_tokens_chunked(
    gy, x, weight, u, v, expert_index, token_index, h_N, top_k, activation, chunk_size, *, need_x, need_w,
    need_s, need_gh,
):  # fmt: skip
    """PyTorch path of the token pass: ``(grad_x, grad_w, s, g_h)`` (None where not asked)."""
    t, n = x.shape[0], expert_index.shape[0]
    dtype = x.dtype
    gs_N = x.new_empty(n)  # d loss / d (w act(h)) = gy_t . v_e
    grad_x = None
    if token_index is None:
        ct = max(1, chunk_size // top_k)
        grad_x = x.new_empty(x.shape) if need_x else None
        for t0 in range(0, t, ct):
            t1 = min(t, t0 + ct)
            n0, n1 = t0 * top_k, t1 * top_k
            e_c = expert_index[n0:n1]
            v_c = v.index_select(0, e_c).to(dtype).view(t1 - t0, top_k, -1)
            torch.bmm(v_c, gy[t0:t1].unsqueeze(2), out=gs_N[n0:n1].view(t1 - t0, top_k, 1))
            if need_x:
                gh_c = activation_backward(h_N[n0:n1], gs_N[n0:n1] * weight[n0:n1], activation)
                u_c = u.index_select(0, e_c).to(dtype).view(t1 - t0, top_k, -1)
                torch.bmm(gh_c.view(t1 - t0, 1, top_k), u_c, out=grad_x[t0:t1].unsqueeze(1))
    else:
        grad_x = x.new_zeros(x.shape) if need_x else None
        for n0 in range(0, n, chunk_size):
            n1 = min(n, n0 + chunk_size)
            e_c, t_c = expert_index[n0:n1], token_index[n0:n1]
            v_c = v.index_select(0, e_c).to(dtype)
            torch.sum(v_c.mul_(gy.index_select(0, t_c)), 1, out=gs_N[n0:n1])
            if need_x:
                gh_c = activation_backward(h_N[n0:n1], gs_N[n0:n1] * weight[n0:n1], activation)
                u_c = u.index_select(0, e_c).to(dtype)
                grad_x.index_add_(0, t_c, u_c.mul_(gh_c.unsqueeze(1)))
    a_N = _act(h_N, activation)
    grad_w = a_N * gs_N if need_w else None
    gh_N = activation_backward(h_N, gs_N * weight, activation) if need_gh else None
    s_N = a_N.mul_(weight) if need_s else None
    return grad_x, grad_w, s_N, gh_N


def _table_grad_chunked(src, sorted_e, tok, coef, num_experts, *, chunk_size, dtype):
    """PyTorch path of :func:`moelab.kernels.cpu.atomic.table_grad`: zeros, then ``index_add_`` of
    ``chunk_size`` scaled rows at a time, in expert order."""
    g = src.new_zeros(num_experts, src.shape[1], dtype=dtype)
    for n0 in range(0, sorted_e.shape[0], chunk_size):
        n1 = min(sorted_e.shape[0], n0 + chunk_size)
        rows = src.index_select(0, tok[n0:n1]).mul_(coef[n0:n1].unsqueeze(1))
        g.index_add_(0, sorted_e[n0:n1], rows.to(dtype))
    return g


def atomic_experts(
    x_TD: Tensor,
    expert_index: Tensor,
    weight: Tensor,
    u_ED: Tensor,
    v_EO: Tensor,
    activation: str = "gelu",
    *,
    token_index_N: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``y [T, d_out]``: ``y[t] = sum over assignments (t, e, w) of w * act(u_e . x_t) * v_e``.

    Args:
        x_TD: ``[T, d_in]`` tokens.
        expert_index: ``[T, k]`` long, token-major (token ``t``'s experts in row ``t``; PEER passes
            its ``[T, heads * k]``), or ``[N]`` long with ``token_index_N`` (any COO routing:
            ragged, dropped tokens, expert-major). Duplicates add up.
        weight: the combine weights, the shape of ``expert_index`` (float; the router's gradient
            flows back through it).
        u_ED, v_EO: the pool's tables, ``[E, d_in]`` and ``[E, d_out]``.
        activation: ``gelu`` (exact), ``relu`` or ``silu``.
        token_index_N: ``[N]`` long, each assignment's token; only with a 1-D ``expert_index``.
        chunk_size: assignments per chunk of the PyTorch path (its temporaries are
            ``O(chunk_size * d)``); None: ``DEFAULT_CHUNK_SIZE`` for the device. The C kernel
            needs no chunks.

    Forward and backward never form ``[N, d]`` or ``[T, E]``; only the gradients of ``u`` and
    ``v`` are ``[E, d]`` (module docstring). Compute dtype: autocast's when enabled (``x`` and
    ``weight`` are cast differentiably, table rows per chunk), else ``x``'s, which the tables must
    share. Under ``torch.compile`` it runs eagerly (a graph break), as the ``fast`` executor.
    Indices out of range raise (a ``ValueError`` before the C loops, which trust them).
    """
    act = get_activation(activation)
    if act.gated:
        raise ValueError(f"activation must be gelu, relu or silu (one neuron per expert), got {activation!r}")
    for name, t in (("x_TD", x_TD), ("u_ED", u_ED), ("v_EO", v_EO)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor, got {_describe(t)}")
    if u_ED.shape[1] != x_TD.shape[1]:
        raise ValueError(f"u_ED must be [E, d_in={x_TD.shape[1]}], got {tuple(u_ED.shape)}")
    if v_EO.shape[0] != u_ED.shape[0]:
        raise ValueError(f"v_EO must have E={u_ED.shape[0]} rows like u_ED, got {tuple(v_EO.shape)}")
    if not isinstance(expert_index, Tensor) or expert_index.dtype != torch.long:
        raise TypeError(f"expert_index must be a torch.long tensor, got {_describe(expert_index)}")
    if not isinstance(weight, Tensor) or weight.shape != expert_index.shape or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a float tensor of expert_index's shape {tuple(expert_index.shape)}, got {_describe(weight)}"
        )
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE.get(x_TD.device.type, FALLBACK_CHUNK_SIZE)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    t = x_TD.shape[0]
    if expert_index.dim() == 2:
        if token_index_N is not None:
            raise ValueError("token_index_N must be None when expert_index is [T, k] (token-major)")
        if expert_index.shape[0] != t:
            raise ValueError(f"expert_index must be [T={t}, k], got {tuple(expert_index.shape)}")
        top_k = expert_index.shape[1]
        if top_k == 0:
            return x_TD.new_zeros(t, v_EO.shape[1])
    elif expert_index.dim() == 1:
        if not isinstance(token_index_N, Tensor) or token_index_N.shape != expert_index.shape:
            raise ValueError(
                f"token_index_N must be a [N={expert_index.shape[0]}] long tensor with a 1-D expert_index, "
                f"got {_describe(token_index_N)}"
            )
        if token_index_N.dtype != torch.long:
            raise TypeError(f"token_index_N must be torch.long, got {token_index_N.dtype}")
        top_k = 1
    else:
        raise ValueError(f"expert_index must be [T, k] or [N], got shape {tuple(expert_index.shape)}")

    dev = x_TD.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = x_TD.dtype
        if u_ED.dtype != dtype or v_EO.dtype != dtype:
            raise TypeError(
                f"x has dtype {dtype} but the tables are {u_ED.dtype}/{v_EO.dtype}; cast one of them or run under autocast"
            )
    args = (
        x_TD.to(dtype).contiguous(),
        weight.reshape(-1).to(dtype).contiguous(),
        u_ED,
        v_EO,
        expert_index.reshape(-1).contiguous(),
        None if token_index_N is None else token_index_N.contiguous(),
        top_k,
        act.name,
        chunk_size,
    )
    if torch.compiler.is_compiling():
        return _apply_eagerly(dev, args)
    return _apply(dev, args)


def _apply(device_type: str, args: tuple) -> Tensor:
    with torch.autocast(device_type, enabled=False):
        return AtomicExperts.apply(*args)


# Under torch.compile the op runs eagerly (a graph break around it): its C loops are called through
# ctypes on data pointers and its PyTorch path loops over chunks. The disabled wrapper is built on
# the first compiled call (``torch.compiler.disable`` imports torch._dynamo, which ``import moelab``
# must not pay).
_EAGER: dict[str, object] = {}


def _apply_eagerly(device_type: str, args: tuple) -> Tensor:
    fn = _EAGER.get("apply")
    if fn is None:
        fn = _EAGER["apply"] = torch.compiler.disable(_apply)
    return fn(device_type, args)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"shape {tuple(t.shape)} dtype {t.dtype}"
    return type(t).__name__


def _is_atomic_bank(bank: nn.Module) -> bool:
    return isinstance(bank, AtomicBank)


@register_executor(
    "atomic",
    paper="He 2024 (PEER), Eq. 4; OmniMoE (flash-algo/omni-moe): expert-centric atomic-expert updates",
    summary="AtomicBank pools (PEER, OmniMoE): custom autograd saving only [N] pre-activations; C loops on "
    "CPU (rows read straight from the tables, [E, d] gradients written once, in expert order), chunks elsewhere",
    devices=("cpu", "cuda"),
    supports=_is_atomic_bank,
)
def moe_atomic(x_TD: Tensor, routing: Routing, bank: AtomicBank, *, chunk_size: int | None = None) -> Tensor:
    """Executor ``atomic``: :func:`atomic_experts` with the bank's tables; equals ``moe_reference``.

    Token-major routings (``routing.top_k`` set) take the ``[T, k]`` path; any other COO routing
    the general one. It never calls ``routing.by_expert()`` (whose counts are ``[E]``).
    """
    if routing.top_k is not None:
        t, k = routing.num_tokens, routing.top_k
        return atomic_experts(
            x_TD,
            routing.expert_index.view(t, k),
            routing.weight.view(t, k),
            bank.u,
            bank.v,
            bank.activation,
            chunk_size=chunk_size,
        )
    return atomic_experts(
        x_TD,
        routing.expert_index,
        routing.weight,
        bank.u,
        bank.v,
        bank.activation,
        token_index_N=routing.token_index,
        chunk_size=chunk_size,
    )
