"""RMoE: the layerwise recurrent router, one GRU cell shared by the routers of every layer.

Paper and code: Qiu, Huang, Cheng, Zhou, Wang, Titov, Fu. *Layerwise Recurrent Router for
Mixture-of-Experts* (ICLR 2025, arXiv:2408.06793); qiuzh20/RMoE ``llama_moe_rnn/rnn.py``
(``CustomGRUCell``, ``CustomRNNCell``) and ``llama_moe_rnn/llama_moe_modeling.py``
(``MixtralSparseMoeBlock``, ``LlamaModel``).

At the ``l``-th routed layer, for every token independently (``x`` is the layer input)::

    x'_l = W1_l x                       W1_l: [p, d], per layer, no bias   (paper Eq. 4)
    h_l  = Cell(x'_l, h_{l-1}),  h_0 = 0   one cell shared by all layers    (Eq. 5)
    z_l  = W2_l h_l                     W2_l: [E, p], per layer, no bias   (Eq. 6)

then softmax, top-k and renormalisation of the k gates (Mixtral), experts unchanged. ``Cell`` is
a GRU (``cell="gru"``, the paper's router) or the code's plain tanh RNN (``cell="rnn"``). The
state ``h_l`` passes to the next routed layer of the same forward, with its gradient: the loss
at layer ``l`` trains the projections of every earlier layer through the cell.

The recurrence runs over depth, not over the sequence, so a token's routing depends on that
token alone and the router is causal at evaluation.

In moelab the first router of a model owns the cell; ``link`` makes the later ones reference it
(``moelab.core.router.share``), so it is trained, counted and saved once. The state travels in
the forward's ``RoutingContext``: ``ctx.slot(cell)["hidden"]`` maps each router's place in the
recurrence to the ``[T, p]`` state it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.core.checks import positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router, share
from moelab.core.routing import Routing
from moelab.routers.topk import softmax_topk

CELL_TYPES = ("gru", "rnn")


# --------------------------------------------------------------------------------- pure functions
def gru_cell(
    x_TP: Tensor, h_TP: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor
) -> Tensor:
    """One GRU step (Cho et al. 2014), the equations of RMoE's ``CustomGRUCell`` (paper Eq. 5)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    Args:
        x_TP: ``[T, p_in]`` inputs; h_TP: ``[T, p]`` previous state.
        weight_ih: ``[3p, p_in]``, weight_hh: ``[3p, p]``, bias_ih, bias_hh: ``[3p]``: the
            ``(r, z, n)`` blocks stacked in that order (``torch.nn.GRUCell``'s layout).
    Returns:
        ``[T, p]`` new state.
    """
    i_r, i_z, i_n = F.linear(x_TP, weight_ih, bias_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h_TP, weight_hh, bias_hh).chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    candidate = torch.tanh(i_n + reset * h_n)
    return (1.0 - update) * candidate + update * h_TP


def rnn_cell(
    x_TP: Tensor, h_TP: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor
) -> Tensor:
    """One plain (Elman) RNN step, RMoE's ``CustomRNNCell``: ``h' = tanh(W_i x + b_i + W_h h + b_h)``.

    Shapes: ``x_TP [T, p_in]``, ``h_TP [T, p]``, ``weight_ih [p, p_in]``, ``weight_hh [p, p]``,
    biases ``[p]`` (``torch.nn.RNNCell``'s layout). Returns ``[T, p]``.
    """
    return torch.tanh(F.linear(x_TP, weight_ih, bias_ih) + F.linear(h_TP, weight_hh, bias_hh))


_CELL_FUNCTIONS = {"gru": gru_cell, "rnn": rnn_cell}


def recurrent_router_logits(
    x_TD: Tensor, h_TP: Tensor | None, in_proj_PD: Tensor, out_proj_EP: Tensor, cell: nn.Module
) -> tuple[Tensor, Tensor]:
    """RMoE's router at one layer (paper Eq. 4-6): ``h = cell(W1 x, h_prev)``, ``logits = W2 h``.

    Args:
        x_TD: ``[T, d]`` layer input.
        h_TP: ``[T, p]`` state of the previous routed layer, or None for the first (``h_0 = 0``).
        in_proj_PD: ``W1 [p, d]``; out_proj_EP: ``W2 [E, p]``.
        cell: ``(x [T, p], h [T, p]) -> [T, p]``, e.g. ``RecurrentCell``.
    Returns:
        ``(logits [T, E], h [T, p])``, in the dtype of the inputs (the router passes fp32).
    """
    x_TP = F.linear(x_TD, in_proj_PD)
    if h_TP is None:
        h_TP = x_TP.new_zeros(x_TP.shape[0], in_proj_PD.shape[0])
    h_TP = cell(x_TP, h_TP)
    return F.linear(h_TP, out_proj_EP), h_TP


# --------------------------------------------------------------------------------- the shared cell
class RecurrentCell(nn.Module):
    """The cell RMoE shares across layers: a GRU or a tanh RNN from ``p`` to ``p`` (both the
    input and the state have the router's hidden size ``p``, as in the official code).

    Parameters in ``torch.nn.GRUCell`` / ``RNNCell`` layout: ``weight_ih [g p, p]``,
    ``weight_hh [g p, p]``, ``bias_ih``, ``bias_hh [g p]`` with ``g = 3`` (GRU) or 1 (RNN).
    ``forward(x_TP, h_TP) -> [T, p]`` runs in fp32 with autocast off, whatever the parameters'
    dtype.

    Init (``init_std``): None draws every parameter from ``U(-1/sqrt(p), 1/sqrt(p))``
    (PyTorch's recurrent cells; our choice); a float draws every parameter, biases included,
    from ``N(0, init_std)``, as the official code's ``init_method`` does.
    """

    def __init__(self, hidden_size: int, cell: str = "gru", init_std: float | None = None) -> None:
        super().__init__()
        self.hidden_size = positive_int("hidden_size", hidden_size)
        if cell not in CELL_TYPES:
            raise ValueError(f"cell must be one of {CELL_TYPES}, got {cell!r}")
        self.cell_type = cell
        self.init_std = positive_float("init_std", init_std, allow_none=True)
        rows = (3 if cell == "gru" else 1) * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, hidden_size))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(rows))
        self.bias_hh = nn.Parameter(torch.empty(rows))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if self.init_std is None:
                bound = 1.0 / math.sqrt(self.hidden_size)
                nn.init.uniform_(p, -bound, bound)
            else:
                nn.init.normal_(p, 0.0, self.init_std)

    def forward(self, x_TP: Tensor, h_TP: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TP.device.type, enabled=False):
            return _CELL_FUNCTIONS[self.cell_type](
                x_TP.float(),
                h_TP.float(),
                self.weight_ih.float(),
                self.weight_hh.float(),
                self.bias_ih.float(),
                self.bias_hh.float(),
            )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, cell={self.cell_type!r}"


# --------------------------------------------------------------------------------- the router
@register_router(
    "rmoe",
    paper="Layerwise Recurrent Router for MoE (RMoE, Qiu et al., ICLR 2025); qiuzh20/RMoE",
    summary="per-layer projection into one GRU shared across layers, state carried layer to layer; softmax top-k",
)
class RecurrentRouter(Router):
    """RMoE's layerwise recurrent router (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts per token; default 2 (the official code's ``num_experts_per_tok``).
        hidden_size: ``p``, the width of the projection and of the cell; default 256, the
            official code's ``moe_router_rnn_hidden_size`` (the notes on the paper give 128 for
            its 0.91B model; the code's value is the one we could read).
        cell: ``"gru"`` (default: the paper's router) or ``"rnn"`` (the code's tanh RNN variant).
        normalize: renormalise the k gates to sum to 1. Default (None): True for k > 1 (the
            code, Mixtral), False for k = 1 (ours: a single renormalised gate is 1 and the
            router would learn only from auxiliary losses).
        init_std: None (default, ours): PyTorch's inits, ``U(+-1/sqrt(fan_in))`` for ``W1``,
            ``W2`` (``nn.Linear``'s) and ``U(+-1/sqrt(p))`` for the cell; a float: every router
            parameter from ``N(0, init_std)``, as the code's ``init_method`` (the released code
            leaves ``W1``, ``W2`` uninitialised; Megatron's ``init_method_std`` is 0.02).

    A router built alone owns its cell and behaves as the only routed layer (``h_0 = 0``).
    In a model, ``link`` (called by ``MoELM``) makes every ``rmoe`` router after the first use
    the first one's cell; the routers must then run in depth order within one forward, with one
    ``RoutingContext``. ``depth`` is this router's place among the model's ``rmoe`` routers.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        hidden_size: int = 256,
        cell: str = "gru",
        normalize: bool | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.hidden_size = positive_int("hidden_size", hidden_size)
        if cell not in CELL_TYPES:
            raise ValueError(f"cell must be one of {CELL_TYPES}, got {cell!r}")
        self.cell_type = cell
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
        self.normalize = (top_k > 1) if normalize is None else normalize
        self.init_std = positive_float("init_std", init_std, allow_none=True)
        self.in_proj = nn.Parameter(torch.empty(hidden_size, d_model))  # W1 [p, d]
        self.out_proj = nn.Parameter(torch.empty(num_experts, hidden_size))  # W2 [E, p]
        self.cell = RecurrentCell(hidden_size, cell, init_std)  # replaced by the first's in link
        self.depth = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw ``W1`` and ``W2`` (the cell has its own ``reset_parameters``)."""
        for w in (self.in_proj, self.out_proj):
            if self.init_std is None:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default
            else:
                nn.init.normal_(w, 0.0, self.init_std)

    @property
    def owns_cell(self) -> bool:
        """True when the cell is this router's registered submodule (saved under its name)."""
        return "cell" in self._modules

    def link(self, position: int, layers: Sequence[nn.Module]) -> None:
        """Take the place among the model's ``rmoe`` routers and, after the first, its cell."""
        if getattr(layers[position], "router", None) is not self:
            raise ValueError(f"link: layers[{position}] is not the layer of this router")
        chain = [
            r for r in (getattr(layer, "router", None) for layer in layers) if isinstance(r, RecurrentRouter)
        ]
        self.depth = next(i for i, r in enumerate(chain) if r is self)
        first = chain[0]
        if first is self:
            return
        if (first.hidden_size, first.cell_type) != (self.hidden_size, self.cell_type):
            raise ValueError(
                f"rmoe routers of one model share one cell: the router of routed layer {position} has "
                f"hidden_size={self.hidden_size}, cell={self.cell_type!r}, the first has "
                f"hidden_size={first.hidden_size}, cell={first.cell_type!r}"
            )
        if self.owns_cell:
            del self._modules["cell"]
        share(self, "cell", first.cell)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        states = ctx.slot(self.cell).setdefault("hidden", {})  # depth -> [T, p] state
        h_prev = self._previous_state(states, x_TD.shape[0])
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits, h = recurrent_router_logits(
                x_TD.float(), h_prev, self.in_proj.float(), self.out_proj.float(), self.cell
            )
        # Keyed by depth, not appended: the same layer run twice in one forward (activation
        # recomputation) reads the same predecessor and rewrites its own state.
        states[self.depth] = h
        probs, weight, index = softmax_topk(logits, self.top_k, self.normalize)
        return Routing.from_topk(index, weight, self.num_experts, logits=logits, probs=probs, validate=False)

    def _previous_state(self, states: dict[int, Tensor], num_tokens: int) -> Tensor | None:
        if self.depth == 0:
            return None
        h = states.get(self.depth - 1)
        if h is None:
            raise ValueError(
                f"rmoe router at depth {self.depth} found no state of depth {self.depth - 1} in the "
                "RoutingContext: run the model's routed layers in depth order within one forward and "
                "pass them one context (MoELM does)"
            )
        if h.shape[0] != num_tokens:
            raise ValueError(
                f"rmoe router at depth {self.depth} routes T={num_tokens} tokens but the state of depth "
                f"{self.depth - 1} covers T={h.shape[0]}: the recurrence is per token, so every routed "
                "layer of one forward must see the same tokens"
            )
        return h

    def extra_repr(self) -> str:
        shared = "" if self.owns_cell else ", cell shared"
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
            f"cell={self.cell_type!r}, depth={self.depth}{shared}"
        )
