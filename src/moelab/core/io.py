"""Writing safetensors files with ordinary permissions.

``safetensors.torch.save_file`` creates its files with mode 0600, so a model, trace or checkpoint
written for a team could not be read by the group. ``save_safetensors`` serialises the same bytes
(``safetensors.torch.save``) and writes them with ``open``, which honours the umask.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save
from torch import Tensor


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous, no shared storage) to ``path`` as safetensors; mode ``0666 & ~umask``."""
    p = Path(path)
    p.write_bytes(save(tensors, metadata=metadata))
    return p
