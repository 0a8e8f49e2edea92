"""``AtomicBank``: ``E`` single-neuron experts ``e(x) = act(u_e . x) * v_e`` (PEER's experts).

Paper and code: He, *Mixture of A Million Experts* (PEER, 2024), Eq. 4: expert ``e`` is an MLP
with one hidden neuron, ``f_e(x) = sigma(u_e^T x) v_e``, with ``E ~ 10^6`` of them retrieved by
product keys (``moelab.routers.product_key.product_key_topk``). lucidrains/PEER-pytorch
(``PEER.py``, 6cb671f9) stores ``u`` and ``v`` as ``nn.Embedding(E, d)`` tables and uses exact
GELU for ``sigma``, the default here. OmniMoE (flash-algo/omni-moe) uses the same atomic experts.

Weights are gathered per assignment from ``order.expert_index``: ``forward_sorted`` touches only
the ``N`` rows its assignments name, so its temporaries are ``[N, d]`` (``N`` = assignments) and
nothing has a dimension of size ``E`` except the parameters and their gradients. The bank does not
need the rows sorted at all; it accepts the sorted order the executors give it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.activations import base_function, get_activation
from moelab.core.checks import positive_int
from moelab.core.routing import ExpertOrder


@registry.register(
    "bank",
    "atomic",
    paper="He 2024, Mixture of A Million Experts (PEER), Eq. 4; lucidrains/PEER-pytorch",
    summary="E single-neuron experts act(u_e . x) * v_e, u/v rows gathered per assignment (no [E, ...] temporaries)",
)
class AtomicBank(nn.Module):
    """``E`` single-neuron experts ``R^{d_in} -> R^{d_out}`` (a bank: ``moelab.core.bank.Bank``).

    Args:
        num_experts: ``E`` (PEER: ~10^6).
        d_in: the input width.
        d_out: the output width; default ``d_in``.
        activation: the neuron's non-linearity ``sigma``, one of ``gelu`` (default, exact GELU as
            lucidrains/PEER-pytorch), ``relu``, ``silu``. Gated activations need two neurons and
            are refused.

    Parameters: ``u [E, d_in]`` (input weights) and ``v [E, d_out]`` (output weights), embedding
    tables. Init (our choice; lucidrains uses ``nn.Embedding``'s N(0, 1)): a one-neuron
    ``nn.Linear`` pair, ``u ~ U(+-1/sqrt(d_in))``, ``v ~ U(+-1)``, as ``ExpertBank`` with ``h = 1``.
    """

    def __init__(
        self, num_experts: int, d_in: int, d_out: int | None = None, activation: str = "gelu"
    ) -> None:
        super().__init__()
        self.num_experts = positive_int("num_experts", num_experts)
        self.d_in = positive_int("d_in", d_in)
        self.d_out = positive_int("d_out", d_in if d_out is None else d_out)
        act = get_activation(activation)
        if act.gated:
            raise ValueError(
                f"activation must be a plain (not gated) activation for single-neuron experts, "
                f"one of gelu, relu, silu; got {activation!r}"
            )
        self.activation = act.name
        self.act_fn = base_function(act.name)
        self.u = nn.Parameter(torch.empty(self.num_experts, self.d_in))
        self.v = nn.Parameter(torch.empty(self.num_experts, self.d_out))
        self.reset_parameters()

    @classmethod
    def example(cls, num_experts: int, d_in: int, d_out: int) -> AtomicBank:
        """A small random GELU bank (the property tests build one of every registered bank)."""
        return cls(num_experts, d_in, d_out)

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.u, -1 / math.sqrt(self.d_in), 1 / math.sqrt(self.d_in))
        nn.init.uniform_(self.v, -1.0, 1.0)

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        """Expert ``e`` on ``x [n, d_in]``: ``act(x @ u_e)[:, None] * v_e``, ``[n, d_out]``."""
        return self.act_fn(x_nD @ self.u[e]).unsqueeze(-1) * self.v[e]

    def forward_sorted(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        """``[N, d_in] -> [N, d_out]``: row ``j`` through expert ``order.expert_index[j]``.

        Gathers ``u`` and ``v`` rows per assignment (``[N, d]`` each), so the cost is ``O(N d)``
        whatever ``E`` is; the backward scatters into ``[E, d]`` gradients, parameter-sized.
        """
        e_N = order.expert_index
        if x_sorted_ND.dim() != 2 or x_sorted_ND.shape != (e_N.shape[0], self.d_in):
            raise ValueError(
                f"x_sorted_ND must be [N, d_in] = [{e_N.shape[0]}, {self.d_in}], got {tuple(x_sorted_ND.shape)}"
            )
        u_ND = self.u.index_select(0, e_N)
        v_NO = self.v.index_select(0, e_N)
        h_N = (x_sorted_ND * u_ND).sum(-1)
        return self.act_fn(h_N).unsqueeze(-1) * v_NO

    def forward(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        return self.forward_sorted(x_sorted_ND, order)

    def extra_repr(self) -> str:
        out = f", d_out={self.d_out}" if self.d_out != self.d_in else ""
        return f"num_experts={self.num_experts}, d_in={self.d_in}{out}, activation={self.activation}"
