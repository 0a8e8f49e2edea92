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
