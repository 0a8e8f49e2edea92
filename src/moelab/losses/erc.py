"""ERC, the expert-router coupling loss: router rows act as proxy tokens for their experts.

Paper: Lv, Ma, Ma, Qiao, *Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary
Loss* (2025, arXiv:2512.23447), §3 and the pseudocode of its Fig. 8. No official code; the spec
is ``/work/shared/PAPERS.md`` §3 (notes and a third-party re-implementation).

Row ``R_i`` of the router's gate ``R [E, d]`` is the centre of the tokens routed to expert ``i``,
so it stands in for them. Each proxy token is perturbed within its own cluster,

    eps_i  = min_{j != i} ||R_i - R_j|| / (2 ||R_i||)              (recomputed every call, no grad)
    R~_i   = R_i * delta_i,   delta_i ~ U(1 - eps_i, 1 + eps_i)^d  (element-wise)

so that ``||R~_i - R_i|| <= eps_i ||R_i||`` is at most half the distance to the nearest other
row. Every proxy token goes through every expert's gate (input) projection ``W_g^j [H, d]``:

    M[i, j] = || W_g^j R~_i ||_2                                    (an E x E matrix)

and the loss asks each expert to respond most to its own proxy token (columns) and each proxy
token to excite its own expert most (rows), up to a factor ``alpha``:

    L = (1 / E^2) sum_i sum_{j != i} [ relu(M[i, j] - alpha M[i, i]) + relu(M[j, i] - alpha M[i, i]) ]

Gradients reach both the router rows (through ``R~``) and the experts' gate projections, which
is what couples them. The cost is ``E^2`` activations of width ``H``, independent of the number
of tokens. Defaults: ``alpha = 1`` (the paper's best at 3B, E = 64, k = 8; 0.5 at 15B, E = 256);
noise on (removing it "hurts badly").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.losses.registry import register_loss


# --------------------------------------------------------------------------------- checks
def _matrix(name: str, value: object, rank: int, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must be {what}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    return value


def check_alpha(alpha: object) -> float:
    """``alpha`` in ``(0, 1]``, else a clear error.

    Our choice to refuse ``alpha > 1``: an off-diagonal activation could then exceed the
    diagonal one without penalty, the opposite of the coupling; ``alpha <= 0`` would push every
    activation to zero. The paper uses 1 and 0.5.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"erc: alpha must be a number in (0, 1], got {type(alpha).__name__}")
    if not 0 < alpha <= 1:  # also refuses NaN
        raise ValueError(f"erc: alpha must be in (0, 1], got {alpha}")
    return float(alpha)


# --------------------------------------------------------------------------------- pure functions
def erc_epsilon(R_ED: Tensor) -> Tensor:
    """``[E]`` noise bounds ``eps_i = min_{j != i} ||R_i - R_j|| / (2 ||R_i||)`` (ERC §3).

    A constant of the step: computed without gradient, from the current rows. With ``E = 1``
    (no other row) or a zero row (whose proxy token is 0 whatever the noise), ``eps_i = 0``:
    our choice, the paper does not consider these cases.
    """
    R = _matrix("R_ED", R_ED, 2, "[E, d] (router rows)").detach().float()
    e = R.shape[0]
    if e < 2:
        return R.new_zeros(e)
    # exact pairwise distances ([E, E]; no [E, E, d] intermediate, no Gram-matrix cancellation)
    dist_EE = torch.cdist(R, R, compute_mode="donot_use_mm_for_euclid_dist")
    dist_EE.fill_diagonal_(float("inf"))
    norm_E = R.norm(dim=-1)
    eps = dist_EE.min(dim=-1).values / (2 * norm_E)
    return torch.where(norm_E > 0, eps, torch.zeros_like(eps))


def erc_proxy_tokens(
    R_ED: Tensor, eps_E: Tensor | None = None, *, generator: torch.Generator | None = None
) -> Tensor:
    """``[E, d]`` perturbed proxy tokens ``R~_i = R_i * delta_i``, ``delta_i ~ U(1 - eps_i, 1 + eps_i)^d``.

    ``eps_E`` defaults to ``erc_epsilon(R_ED)``. Differentiable in ``R_ED`` (the noise is a
    constant); ``generator`` makes the draw reproducible.
    """
    R = _matrix("R_ED", R_ED, 2, "[E, d] (router rows)")
    eps = erc_epsilon(R) if eps_E is None else eps_E.detach().float()
    if eps.shape != (R.shape[0],):
        raise ValueError(f"eps_E must have shape [E] = ({R.shape[0]},), got {tuple(eps.shape)}")
    u = torch.rand(R.shape, generator=generator, device=R.device, dtype=torch.float32)
    delta_ED = 1 + eps[:, None] * (2 * u - 1)
    return R.float() * delta_ED


def erc_coupling(
    R_ED: Tensor, w_gate_EHD: Tensor, *, noise: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """``M [E, E]``, ``M[i, j] = || W_g^j R~_i ||_2``: proxy token ``i`` through expert ``j``'s gate.

    Args:
        R_ED: ``[E, d]`` router rows (the proxy tokens).
        w_gate_EHD: ``[E, H, d]`` each expert's gate projection (``nn.Linear`` layout: expert
            ``j`` computes ``W_g^j x``); the paper's ``W_g^j [d, H]`` is its transpose.
        noise: perturb the rows first (``erc_proxy_tokens``); False uses ``R`` itself.
        generator: for the noise draw.
    Returns:
        ``[E, E]`` fp32, differentiable in both inputs. Computed outside autocast: one batched
        ``[E, H, d] @ [d, E]`` product, ``E^2 H`` activations, whatever the number of tokens.
    """
    R = _matrix("R_ED", R_ED, 2, "[E, d] (router rows)")
    W = _matrix("w_gate_EHD", w_gate_EHD, 3, "[E, H, d] (expert gate projections)")
    if W.shape[0] != R.shape[0] or W.shape[2] != R.shape[1]:
        raise ValueError(
            f"w_gate_EHD {tuple(W.shape)} does not match R_ED {tuple(R.shape)}: expected [E, H, d] = "
            f"[{R.shape[0]}, H, {R.shape[1]}]"
        )
    with torch.autocast(device_type=R.device.type, enabled=False):
        proxy_ED = erc_proxy_tokens(R, generator=generator) if noise else R.float()
        act_EHE = torch.matmul(W.float(), proxy_ED.t())  # [j, :, i] = W_g^j R~_i
        return torch.linalg.vector_norm(act_EHE, dim=1).t()  # [i, j]


def erc_loss(M_EE: Tensor, alpha: float = 1.0) -> Tensor:
    """``(1/E^2) sum_i sum_{j != i} [relu(M[i,j] - alpha M[i,i]) + relu(M[j,i] - alpha M[i,i])]``.

    The first term: proxy token ``i`` must excite its own expert more than any other (row ``i``);
    the second: expert ``i`` must respond to its own proxy token more than to any other
    (column ``i``). ``alpha`` in ``(0, 1]`` (``check_alpha``); smaller asks for a larger gap.
    """
    M = _matrix("M_EE", M_EE, 2, "[E, E]")
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"M_EE must be square [E, E], got shape {tuple(M.shape)}")
    alpha = check_alpha(alpha)
    e = M.shape[0]
    bar_E1 = alpha * M.diagonal()[:, None]  # alpha M[i, i], broadcast along row i
    off = ~torch.eye(e, dtype=torch.bool, device=M.device)
    per_pair = torch.relu(M - bar_E1) + torch.relu(M.t() - bar_E1)  # [i, j]: both constraints
    return (per_pair * off).sum() / (e * e)


def erc_diag_dominance(M_EE: Tensor) -> Tensor:
    """``mean_i M[i, i] / max_{j != i} M[i, j]`` (PAPERS.md's cheap check); NaN for ``E = 1``.

    Above 1 when every proxy token excites its own expert most; it rises as ERC couples them.
    """
    M = _matrix("M_EE", M_EE, 2, "[E, E]").float()
    e = M.shape[0]
    if e < 2:
        return M.new_full((), float("nan"))
    others = M.masked_fill(torch.eye(e, dtype=torch.bool, device=M.device), float("-inf"))
    return (M.diagonal() / others.max(dim=-1).values).mean()


# --------------------------------------------------------------------------------- the layer's parts
def router_rows(layer: nn.Module) -> Tensor:
    """``[E, d]``: the layer's router's linear gate weight (the proxy tokens), else a ``ValueError``."""
    router = getattr(layer, "router", None)
    if router is None:
        raise ValueError(f"erc needs a layer with a router; {type(layer).__name__} has none")
    w = getattr(router, "weight", None)
    e = getattr(router, "num_experts", getattr(layer, "num_experts", None))
    d = getattr(router, "d_model", getattr(layer, "d_model", None))
    if (
        not isinstance(w, Tensor)
        or w.dim() != 2
        or (e is not None and w.shape[0] != e)
        or (d is not None and w.shape[1] != d)
    ):
        got = tuple(w.shape) if isinstance(w, Tensor) else "none"
        raise ValueError(
            f"erc needs the router's linear gate weight [E, d] = [{e}, {d}] as proxy tokens; "
            f"router {type(router).__name__} has weight {got}"
        )
    return w


def expert_gate_weight(bank: nn.Module) -> Tensor:
    """``[E, H, d]``: each expert's gate projection, the ``W_g`` of ERC (a view, not a copy).

    - ``ExpertBank`` in its own layout: the gate half of ``w_in`` (gated SwiGLU/GeGLU:
      ``gate_up_proj[:, :h]``, gate rows first) or the input projection ``up_proj`` (plain MLP).
    - Any other bank: its ``gate_weight`` attribute (a tensor or a method returning one) of shape
      ``[E, H, d]``, if it has one; else a ``TypeError``: reading another layout as if it were
      ``ExpertBank``'s would silently couple the wrong weights.
    """
    hook = getattr(bank, "gate_weight", None)
    if hook is not None:
        w = hook() if callable(hook) else hook
        if not isinstance(w, Tensor) or w.dim() != 3:
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"{type(bank).__name__}.gate_weight must be a [E, H, d] tensor, got {got}")
        return w
    cls = type(bank)
    standard = (
        isinstance(bank, ExpertBank)
        and cls.w_in is ExpertBank.w_in
        and cls.expert_forward is ExpertBank.expert_forward
        and bank.w_in.is_floating_point()
    )
    if not standard:
        raise TypeError(
            f"erc needs each expert's gate (input) projection; bank {cls.__name__} does not use "
            "ExpertBank's layout: give it a `gate_weight` property returning [E, H, d]"
        )
    return bank.w_in[:, : bank.hidden] if bank.gated else bank.w_in


def _coupling_parts(layer: object) -> tuple[Tensor, Tensor]:
    if layer is None:
        raise ValueError(
            "erc needs the layer (its router's weight and its experts): call erc(routing, layer=moe)"
        )
    experts = getattr(layer, "experts", None)
    if experts is None:
        raise ValueError(f"erc needs a layer with experts; {type(layer).__name__} has none")
    return router_rows(layer), expert_gate_weight(experts)


# --------------------------------------------------------------------------------- registered loss
@register_loss(
    "erc",
    paper="Expert-router coupling loss (Lv et al. 2025, arXiv:2512.23447), §3 and Fig. 8",
    summary="router rows as noisy proxy tokens through every expert's gate; E^2 activations, independent of T",
)
def erc(
    routing: Routing,
    *,
    ctx: RoutingContext | None = None,
    layer: nn.Module | None = None,
    alpha: float = 1.0,
    noise: bool = True,
) -> Tensor:
    """The ERC loss of ``layer`` (a ``moelab.MoE``: ``layer.router.weight`` and ``layer.experts``).

    ``routing`` and ``ctx`` are not read: the loss depends on the weights only. ``noise``
    perturbs the proxy tokens while ``layer`` is in training mode (our choice: at evaluation the
    term is reported without noise, so it is deterministic). ``alpha`` (default 1.0, the paper's
    best at 3B) sets the required margin; pass it with ``aux_loss_kwargs={"erc": {"alpha": 0.5}}``.
    """
    alpha = check_alpha(alpha)
    if not isinstance(noise, bool):
        raise TypeError(f"erc: noise must be True or False, got {type(noise).__name__}")
    R_ED, w_gate_EHD = _coupling_parts(layer)
    M = erc_coupling(R_ED, w_gate_EHD, noise=noise and layer.training)
    return erc_loss(M, alpha)


def erc_diagnostics(layer: nn.Module) -> dict[str, float]:
    """``{"erc_diag_dominance", "erc_epsilon"}`` of ``layer``, without noise and without gradient.

    ``erc_diag_dominance``: ``mean_i M_ii / max_{j != i} M_ij`` of the clean coupling matrix;
    ``erc_epsilon``: the mean noise bound ``eps_i`` (grows as the router rows separate). PAPERS.md's
    cheap check: both should rise with ERC. Works on any layer with a gate weight and a gate
    projection, with or without ERC in its losses.
    """
    with torch.no_grad():
        R_ED, w_gate_EHD = _coupling_parts(layer)
        M = erc_coupling(R_ED, w_gate_EHD, noise=False)
        eps = erc_epsilon(R_ED)
        mean_eps = float(eps.mean()) if eps.numel() else math.nan
        return {"erc_diag_dominance": float(erc_diag_dominance(M)), "erc_epsilon": mean_eps}


# The trainer records it for layers that train with ERC, and on every layer with
# ``TrainConfig(diagnostics=["erc"])`` (``moelab.train.monitor.router_metrics``).
erc.diagnostics = erc_diagnostics  # type: ignore[attr-defined]

__all__ = [
    "check_alpha",
    "erc",
    "erc_coupling",
    "erc_diag_dominance",
    "erc_diagnostics",
    "erc_epsilon",
    "erc_loss",
    "erc_proxy_tokens",
    "expert_gate_weight",
    "router_rows",
]
