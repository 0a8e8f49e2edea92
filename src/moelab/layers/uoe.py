"""Union of Experts (UoE), the MLP part: a dense MLP cut into E exact slices, run on the tokens
each slice selects per sequence.

Paper and code: Yang, Lian and Li, *Union of Experts: Adapting Hierarchical Routing to Equivalently
Decomposed Transformer* (arXiv 2503.02495, 2025); official code YujiaoYang-work/UoE,
``language_modeling/model/mlp/UoME_DS.py`` (``U_MLP`` with ``ColumnParallelLinearWithMoE`` /
``RowParallelLinearWithMoE``). The attention part (SMHA) is not here.

**Decomposition** (tensor parallelism's split). A dense MLP of width ``H``,
``MLP(x) = W_out act(W_in x)``, with ``W_in [H, d]`` cut by rows into ``E`` slices of ``h = H / E``
and ``W_out [d_out, H]`` by the matching columns, is exactly the sum of its slices:

    MLP(x) = sum_i W_out_i act(W_in_i x)            (gated: W_gate and W_up cut alike)

so the union of all experts is the dense MLP (``decompose_mlp`` / ``assemble_mlp``). A dense
output bias belongs to no slice: the layer keeps it, always on (``bias``).

**Routing**: ``moelab.routers.uoe`` (router ``uoe_select``): per-token top-k mask, then per
sequence each expert takes its ``ceil(capacity * S * k / E)`` best-scored tokens; the outputs are
summed unweighted (``scale_by_gate`` weights them). With ``k = E`` and every token taken, the
layer is the dense MLP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.activations import get_activation
from moelab.core.checks import positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import build_router, share
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.experts.shared import SharedExperts
from moelab.layers.moe import MoE, MoEWrapper, layer_options
from moelab.ops.dispatchers import Dispatcher
from moelab.routers.uoe import UoESelectRouter

# activation modules of an nn.Sequential(Linear, act, Linear) MLP and their moelab names
_ACTIVATION_MODULES = ((nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.GELU, "gelu"))


def decompose_mlp(w_in: Tensor, w_out: Tensor, num_experts: int, activation: str = "swiglu") -> ExpertBank:
    """Cut a dense MLP into ``num_experts`` slices of its hidden units: an ``ExpertBank`` whose
    experts sum to the MLP exactly.

    Args:
        w_in: ``[H, d]`` (plain activations) or ``[2H, d]`` with the gate rows first, then the up
            rows (gated: moelab's ``DenseFFN.gate_up``, transformers' fused ``gate_up_proj``).
        w_out: ``[d_out, H]`` (``nn.Linear`` layout).
        num_experts: ``E``; must divide ``H``.
        activation: the MLP's (``swiglu``, ``geglu``, ``gelu``, ``relu``, ``silu``).

    Returns:
        ``ExpertBank(E, d, H / E, activation, d_out)`` holding copies: expert ``i`` has hidden
        units ``[i h, (i + 1) h)`` (``gate_up_proj[i] = [gate_i; up_i]``, ``down_proj[i] =
        w_out[:, i h:(i + 1) h]``). Same dtype and device as ``w_in``.
    """
    act = get_activation(activation)
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        if not isinstance(w, Tensor) or w.dim() != 2:
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"{name} must be a 2-D weight, got {got}")
    rows, d = w_in.shape
    if act.gated and rows % 2:
        raise ValueError(f"w_in of a gated ({act.name}) MLP must have 2H rows (gate, then up), got {rows}")
    hidden = rows // 2 if act.gated else rows
    if w_out.shape[1] != hidden:
        raise ValueError(f"w_out must be [d_out, H] with H={hidden} (from w_in), got {tuple(w_out.shape)}")
    e = positive_int("num_experts", num_experts)
    if hidden % e:
        raise ValueError(f"num_experts={e} must divide the MLP's hidden width H={hidden}")
    h, d_out = hidden // e, w_out.shape[0]
    with torch.no_grad():
        if act.gated:
            gate, up = w_in[:hidden].reshape(e, h, d), w_in[hidden:].reshape(e, h, d)
            w_in_E = torch.cat([gate, up], dim=1)
        else:
            w_in_E = w_in.reshape(e, h, d).clone()
        down_E = w_out.reshape(d_out, e, h).permute(1, 0, 2).contiguous()
    return ExpertBank.from_parameters(
        nn.Parameter(w_in_E.to(w_in.dtype)), nn.Parameter(down_E.to(w_in.device, w_in.dtype)), act.name
    )


def assemble_mlp(bank: ExpertBank) -> tuple[Tensor, Tensor]:
    """The dense MLP whose slices are ``bank``'s experts (``decompose_mlp``'s inverse):
    ``(w_in [H or 2H, d], w_out [d_out, H])``, ``H = E h``, gate rows first when gated. Copies."""
    if not isinstance(bank, ExpertBank):
        raise TypeError(f"bank must be an ExpertBank, got {type(bank).__name__}")
    e, h, d = bank.num_experts, bank.hidden, bank.d_in
    with torch.no_grad():
        w = bank.w_in.detach()
        if bank.gated:
            w_in = torch.cat([w[:, :h].reshape(e * h, d), w[:, h:].reshape(e * h, d)], dim=0)
        else:
            w_in = w.reshape(e * h, d).clone()
        w_out = bank.down_proj.detach().permute(1, 0, 2).reshape(bank.d_out, e * h)
    return w_in, w_out


def dense_mlp_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, str]:
    """``(w_in, w_out, b_out, activation)`` of a dense MLP module, for ``UnionOfExperts.from_dense``.

    Reads moelab's dense SwiGLU FFN (``gate_up``, ``down``: ``moelab.models.lm.DenseFFN``), a
    ``SharedExperts`` without its sigmoid gate, or ``nn.Sequential(nn.Linear, ReLU/SiLU/GELU,
    nn.Linear)``. An input bias raises ``ValueError``: its slices would belong to the experts,
    and ``ExpertBank`` experts have none.
    """
    if isinstance(mlp, SharedExperts):
        if mlp.gate is not None:
            raise ValueError("mlp: a SharedExperts with a sigmoid gate is not a plain dense MLP")
        w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if mlp.gated else mlp.up_proj.weight
        return w_in, mlp.down_proj.weight, None, mlp.activation
    if isinstance(getattr(mlp, "gate_up", None), nn.Linear) and isinstance(
        getattr(mlp, "down", None), nn.Linear
    ):
        _no_input_bias(mlp.gate_up)
        return mlp.gate_up.weight, mlp.down.weight, mlp.down.bias, "swiglu"
    if isinstance(mlp, nn.Sequential) and len(mlp) == 3:
        first, act, last = mlp
        name = next((n for cls, n in _ACTIVATION_MODULES if isinstance(act, cls)), None)
        if isinstance(act, nn.GELU) and act.approximate != "none":
            name = None  # moelab's gelu is the exact one
        if isinstance(first, nn.Linear) and isinstance(last, nn.Linear) and name is not None:
            _no_input_bias(first)
            return first.weight, last.weight, last.bias, name
    raise TypeError(
        "mlp must be a moelab DenseFFN (gate_up, down), a SharedExperts, or "
        f"nn.Sequential(nn.Linear, nn.ReLU/SiLU/GELU, nn.Linear); got {type(mlp).__name__}"
    )


def _no_input_bias(linear: nn.Linear) -> None:
    if linear.bias is not None:
        raise ValueError(
            "mlp: the input projection has a bias; its slices would belong to the experts, which "
            "have no biases in an ExpertBank (only an output bias is kept, by the layer)"
        )


class UnionOfExperts(MoEWrapper):
    """UoE's MLP part, ``UoME`` (module docstring; docs/methods/uoe.md).

    The routed part is ``self.moe``, a ``moelab.MoE`` with the ``uoe_select`` router and an
    ``ExpertBank`` of ``E`` slices of width ``hidden``; ``router``, ``experts``, ``aux_loss`` and
    ``aux_terms`` are the inner MoE's (as ``ResidualMoE``), so ``MoELM`` and the monitors find them.
    ``MoELMConfig(router="uoe")`` builds it; its options go in ``router_kwargs``.

    Args:
        d_model: ``d``.
        num_experts: ``E`` (paper: 4).
        top_k: experts each token marks (paper: 2).
        hidden: each slice's width ``h`` (the union is a dense MLP of width ``E h``); default
            ``4 d // top_k`` as ``moelab.MoE``, so ``k`` slices are a top-k MoE's active width.
        router_kwargs: the router's options (``capacity``, ``pad_to_capacity``, ``normalize``,
            ``scale_by_gate``, ``axis``, ``eps``, ``gate_bias``, ``top_k``) and the layer's ``bias``.
        experts: an ``ExpertBank`` to use (``decompose_mlp``'s); else a fresh one (per-expert init,
            as the official code initialises each slice on its own).
        bias: keep a dense output bias ``[d_out]`` (zeros), added to every token; default False.
        activation: the slices' non-linearity (``swiglu``; the official MLP uses GELU).
        shared_experts, shared_hidden, aux_losses, aux_loss_kwargs, backend, dispatcher,
        check_finite: passed to the inner ``moelab.MoE``.

    ``forward(x [B, S, d] or [T, d], ctx=None) -> [..., d_out]``; ``forward_routed`` also returns
    the routing. A ``[T, d]`` input without ``ctx.batch_shape`` is one sequence.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 4,
        top_k: int = 2,
        hidden: int | None = None,
        *,
        router_kwargs: dict[str, Any] | None = None,
        experts: nn.Module | None = None,
        bias: bool | None = None,
        activation: str = "swiglu",
        shared_experts: int | SharedExperts = 0,
        shared_hidden: int | None = None,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        backend: str = "auto",
        dispatcher: str | Dispatcher = "local",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        kw, options = layer_options(router_kwargs, {"bias": bias})
        bias = options["bias"]
        bias = False if bias is None else bias
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if experts is not None and not isinstance(experts, ExpertBank):
            raise TypeError(
                f"experts must be an ExpertBank (slices of a dense MLP), got {type(experts).__name__}"
            )
        if hidden is None:
            hidden = max(1, 4 * positive_int("d_model", d_model) // top_k_in_range(top_k, num_experts))
        router = build_router(UoESelectRouter.name, d_model, num_experts, **{"top_k": top_k, **kw})
        self.moe = MoE(
            d_model,
            num_experts,
            router.top_k,
            hidden,
            router=router,
            experts=experts,
            activation=activation,
            shared_experts=shared_experts,
            shared_hidden=shared_hidden,
            aux_losses=aux_losses,
            aux_loss_kwargs=aux_loss_kwargs,
            backend=backend,
            dispatcher=dispatcher,
            check_finite=check_finite,
        )
        self.d_model, self.num_experts, self.top_k = self.moe.d_model, self.moe.num_experts, self.moe.top_k
        self.d_out = self.moe.d_out
        # a dense output bias belongs to no slice: always on, outside the routing
        self.bias = nn.Parameter(torch.zeros(self.d_out)) if bias else None
        share(self, "router", self.moe.router)
        share(self, "experts", self.moe.experts)

    # -- building from a dense MLP ----------------------------------------------------------------
    @classmethod
    def from_weights(
        cls,
        w_in: Tensor,
        w_out: Tensor,
        num_experts: int = 4,
        top_k: int = 2,
        *,
        b_out: Tensor | None = None,
        activation: str = "swiglu",
        **kwargs: Any,
    ) -> UnionOfExperts:
        """The layer whose experts are the ``E`` slices of the dense MLP ``(w_in, w_out)``
        (``decompose_mlp``) and whose output bias is ``b_out`` (``[d_out]``, or None). Router and
        bias are created in ``w_in``'s dtype and device; ``kwargs`` go to the constructor."""
        bank = decompose_mlp(w_in, w_out, num_experts, activation)
        if b_out is not None and (not isinstance(b_out, Tensor) or tuple(b_out.shape) != (bank.d_out,)):
            got = tuple(b_out.shape) if isinstance(b_out, Tensor) else type(b_out).__name__
            raise ValueError(f"b_out must be [d_out] = [{bank.d_out}], got {got}")
        layer = cls(
            bank.d_in, num_experts, top_k, bank.hidden, experts=bank, bias=b_out is not None,
            activation=bank.activation, **kwargs,
        )  # fmt: skip
        layer.to(device=w_in.device, dtype=w_in.dtype)
        if b_out is not None:
            with torch.no_grad():
                layer.bias.copy_(b_out)
        return layer

    @classmethod
    def from_dense(
        cls, mlp: nn.Module, num_experts: int = 4, top_k: int = 2, **kwargs: Any
    ) -> UnionOfExperts:
        """The layer equal to the dense MLP module ``mlp`` cut into ``num_experts`` slices (see
        ``dense_mlp_weights`` for the modules it reads). ``kwargs`` go to the constructor."""
        w_in, w_out, b_out, activation = dense_mlp_weights(mlp)
        return cls.from_weights(w_in, w_out, num_experts, top_k, b_out=b_out, activation=activation, **kwargs)

    def dense_weights(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(w_in, w_out, b_out)`` of the dense MLP this layer is the union of (copies)."""
        w_in, w_out = assemble_mlp(self.experts)
        return w_in, w_out, None if self.bias is None else self.bias.detach().clone()

    # -- the routed-layer surface -----------------------------------------------------------------
    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the union's output (plus the bias) and the selection that ran."""
        y, routing = self.moe.forward_routed(x, ctx)  # checks x and ctx
        if self.bias is not None:
            y = y + self.bias
        return y, routing

    def extra_repr(self) -> str:
        return f"hidden={self.experts.hidden}, union_hidden={self.num_experts * self.experts.hidden}, bias={self.bias is not None}"


registry.register(
    "layer",
    "uoe",
    paper="Union of Experts (Yang et al. 2025, arXiv 2503.02495), UoME; YujiaoYang-work/UoE UoME_DS.py",
    summary="a dense MLP cut into E exact slices; per-token top-k mask, per-sequence top-capacity token "
    "selection per slice; outputs summed unweighted",
)(UnionOfExperts)
