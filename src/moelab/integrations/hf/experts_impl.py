"""moelab as a transformers experts implementation: ``model.set_experts_implementation("moelab")``.

transformers 5 dispatches every experts module decorated with ``@use_experts_implementation``
through ``ALL_EXPERTS_FUNCTIONS``: a function ``(experts, hidden_states [T, d], top_k_index [T, k],
top_k_weights [T, k]) -> [T, d]``. ``import moelab.hf`` registers ``"moelab"`` there. The model
keeps its own router; moelab runs the experts: the top-k becomes a ``Routing``
(``Routing.from_topk``), the experts an ``ExpertBank`` view of the module's parameters (built once
per module and cached), and a moelab executor runs ``dispatch -> bank -> combine`` on the local
dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.integrations.hf.banks import ClampedSwiGLUExpertBank
from moelab.integrations.hf.families import moelab_activation
from moelab.ops.dispatchers import LocalDispatcher
from moelab.ops.executors import check_backend_name, resolve_executor

_CACHE_KEY = "_moelab_bank"


def bank_for(experts: nn.Module) -> ExpertBank:
    """The moelab bank view of a transformers experts module, cached on the module.

    The cache lives in the module's ``__dict__`` (not as a submodule), so it never shows in
    ``state_dict`` or ``named_modules``; it is rebuilt when the module's parameters are replaced.
    """
    cached = experts.__dict__.get(_CACHE_KEY)
    if cached is not None and cached.w_in is _w_in(experts) and cached.down_proj is experts.down_proj:
        return cached
    bank = _build_bank(experts)
    experts.__dict__[_CACHE_KEY] = bank
    return bank


def _w_in(experts: nn.Module) -> Tensor:
    return experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj


def _build_bank(experts: nn.Module) -> ExpertBank:
    name = type(experts).__name__
    if name == "GptOssExperts":
        return ClampedSwiGLUExpertBank.from_module(experts)
    problems = []
    if getattr(experts, "has_bias", False):
        problems.append("expert biases")
    if getattr(experts, "is_transposed", False):
        problems.append("transposed weights")
    if not getattr(experts, "is_concatenated", True):
        problems.append("interleaved gate/up rows")
    if getattr(experts, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if problems:
        raise ValueError(
            f"experts_implementation='moelab' cannot run {name}: {', '.join(problems)} have no moelab bank"
        )
    gated = getattr(experts, "has_gate", True)
    return ExpertBank.from_parameters(
        _w_in(experts), experts.down_proj, moelab_activation(experts.act_fn, gated)
    )


def make_experts_forward(backend: str = "auto") -> Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]:
    """An experts function running moelab executor ``backend`` (``"auto"``: the fastest usable)."""
    check_backend_name(backend)
    dispatch = LocalDispatcher()

    def moelab_experts_forward(
        self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> Tensor:
        """``[T, d]``: ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])``."""
        if getattr(self, "_is_expert_parallel", False):
            raise ValueError("experts_implementation='moelab' does not support expert parallelism")
        bank = bank_for(self)
        routing = Routing.from_topk(top_k_index, top_k_weights, bank.num_experts, validate=False)
        executor = resolve_executor(backend, hidden_states.device, bank)
        return dispatch(hidden_states, routing, bank, executor).to(hidden_states.dtype)

    moelab_experts_forward.__name__ = f"moelab_experts_forward_{backend}"
    return moelab_experts_forward


def register_experts_implementation(name: str = "moelab", backend: str = "auto") -> None:
    """Register moelab executor ``backend`` as transformers experts implementation ``name``.

    ``import moelab.hf`` calls ``register_experts_implementation()`` (``"moelab"`` -> ``"auto"``).
    Register more names to pin a backend, e.g. ``register_experts_implementation("moelab_reference",
    "reference")``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, make_experts_forward(backend))
