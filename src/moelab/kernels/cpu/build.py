"""Building moelab's small C kernels on first use (shared by ``skinny.py`` and ``atomic.py``).

The system C compiler (``$CC``, else ``cc``/``gcc``; Linux only) builds ``csrc/<name>.c`` with
``-O3 -march=native -fopenmp`` into ``$MOELAB_CACHE/kernels`` (default ``~/.cache/moelab``; a temp
directory when that is not writable), under a name keyed by a hash of the source, the compiler and
the CPU's flags, so a changed source or another machine builds afresh. OpenMP resolves to the
``libgomp`` PyTorch has loaded, so the loops run on PyTorch's thread count. Anything that fails
(no compiler, a compile error, no source in the install) returns None and the caller falls back to
its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")


def cache_dir() -> Path:
    root = os.environ.get("MOELAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moelab")
    return Path(root) / "kernels"


def cpu_id() -> str:
    """The CPU's flags line (what ``-march=native`` compiles for), or the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_kernel(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` compiled (once per source, compiler and CPU) and loaded, or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.system() != "Linux":
        return None
    source = CSRC / f"{name}.c"
    try:
        src = source.read_bytes()
    except OSError:  # an install without the C source
        return None
    key = hashlib.sha256(src + cc.encode() + " ".join(extra_flags).encode() + cpu_id().encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            out = Path(tempfile.gettempdir()) / "moelab-kernels" / out.name
            out.parent.mkdir(parents=True, exist_ok=True)
        # Build next to the target, then rename: concurrent processes never see a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", tmp, *extra_flags]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if proc.returncode != 0:
                return None
            os.replace(tmp, out)
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(out))
    except OSError:
        return None


_HUGE_PAGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14  # linux/mman.h


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux for transparent huge pages on ``[address, address + nbytes)`` before its first
    touch (``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned part). A fresh multi-GiB buffer that a
    kernel writes once (an ``[E, d]`` gradient table of a 2^20-expert pool) then faults in 2 MiB
    pages instead of 4 KiB ones. Only a hint: False (and nothing changed) where THP is off, the
    buffer is small, or the call fails; never an error."""
    start = (address + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False
