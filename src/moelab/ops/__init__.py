"""Expert execution: dispatch/combine and interchangeable backends (reference, sorted, fast)."""

from . import fast as _fast  # noqa: F401  (registers the "fast" CPU backend)
from . import triton as _triton  # noqa: F401  (registers the 'triton' backend; Triton loads lazily)
from .backends import AUTO_PREFERENCE, Backend, backend_names, get_backend, register_backend, resolve_backend
from .dispatch import combine, dispatch
from .grouped_mm import can_use_grouped_mm, grouped_mm, grouped_mm_loop
from .reference import moe_reference
from .sorted import moe_sorted

__all__ = [
    "AUTO_PREFERENCE",
    "Backend",
    "backend_names",
    "can_use_grouped_mm",
    "combine",
    "dispatch",
    "get_backend",
    "grouped_mm",
    "grouped_mm_loop",
    "moe_reference",
    "moe_sorted",
    "register_backend",
    "resolve_backend",
]
