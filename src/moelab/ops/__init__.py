"""Executing a routing: dispatchers move rows, executors compute the experts (one per file).

- ``executors``: the executor registry, ``"auto"`` resolution;
- ``reference``, ``sorted``, ``fast``, ``triton``, ``atomic``: the executors;
- ``dispatchers``: the dispatcher registry and the ``local`` dispatcher;
- ``all_to_all``: the ``ep`` dispatcher (expert parallelism over ``torch.distributed``);
- ``offload``: expert offloading (a bounded expert cache, prefetch; placement ``offload``);
- ``rows``: ``dispatch`` / ``combine``, the row gather and weighted scatter-back.
"""

from moelab.ops import atomic, fast, reference, sorted, triton  # noqa: F401  (each registers its executor)
from moelab.ops.all_to_all import AllToAllDispatcher
from moelab.ops.atomic import atomic_experts, moe_atomic
from moelab.ops.dispatchers import (
    Dispatcher,
    LocalDispatcher,
    check_rows,
    dispatcher_names,
    get_dispatcher,
    register_dispatcher,
)
from moelab.ops.executors import (
    AUTO_PREFERENCE,
    Executor,
    check_backend_name,
    executor_names,
    get_executor,
    register_executor,
    resolve_executor,
)
from moelab.ops.fast import moe_fast
from moelab.ops.offload import OffloadRuntime, budget_for, offload
from moelab.ops.reference import moe_reference
from moelab.ops.rows import combine, dispatch
from moelab.ops.sorted import moe_sorted
from moelab.ops.triton import moe_triton

__all__ = [
    "AUTO_PREFERENCE",
    "AllToAllDispatcher",
    "Dispatcher",
    "Executor",
    "LocalDispatcher",
    "OffloadRuntime",
    "atomic_experts",
    "budget_for",
    "check_backend_name",
    "check_rows",
    "combine",
    "dispatch",
    "dispatcher_names",
    "executor_names",
    "get_dispatcher",
    "get_executor",
    "moe_atomic",
    "moe_fast",
    "moe_reference",
    "moe_sorted",
    "moe_triton",
    "offload",
    "register_dispatcher",
    "register_executor",
    "resolve_executor",
]
