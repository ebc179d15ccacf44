"""Where Numba caches the compiled kernels: a folder named by a hash of every kernel source.

Numba keys a cached kernel on its own file's time stamp only, so a kernel with another file's code inlined
(quant/simd.py's intrinsics, the shared drivers of quant/int8.py) is loaded stale after that file alone
changes: old machine code, silently (seen: a fix to simd.py not taking effect). A folder per version of
the sources makes every change a fresh compile. A NUMBA_CACHE_DIR the user set is left as it is.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable

KEEP = 3           # newest cache folders kept; older versions' are removed
_MARKS = (b"njit", b"@intrinsic", b"cuda.jit", b"@vectorize", b"@guvectorize")


def kernel_sources() -> list[Path]:
    """The package's Python files that define compiled code (under hotcold.quant and hotcold.engine)."""
    out = []
    for pkg in ("hotcold.quant", "hotcold.engine"):
        spec = find_spec(pkg)
        for root in spec.submodule_search_locations or []:
            out += [p for p in sorted(Path(root).rglob("*.py")) if any(m in p.read_bytes() for m in _MARKS)]
    return out


def cache_dir(sources: Iterable[Path], base: Path) -> Path:
    """base / a hash of the sources' names and contents (and the Python and Numba versions)."""
    h = hashlib.sha256(sys.version.encode())
    try:
        from importlib.metadata import version
        h.update(version("numba").encode())
    except Exception:  # noqa: BLE001 - no metadata: the Python version and sources still separate caches
        pass
    for p in sources:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return base / h.hexdigest()[:16]


def _prune(base: Path, current: Path) -> None:
    """Remove all but the KEEP most recently used cache folders (other versions of the sources)."""
    try:
        dirs = sorted((d for d in base.iterdir() if d.is_dir() and d != current), key=lambda d: d.stat().st_mtime)
    except OSError:
        return
    for d in dirs[:max(len(dirs) - (KEEP - 1), 0)]:
        shutil.rmtree(d, ignore_errors=True)


def use_kernel_cache() -> None:
    """Point Numba's cache at this version's folder, unless NUMBA_CACHE_DIR is set (then it is the user's)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hotcold" / "numba"
    try:
        d = cache_dir(kernel_sources(), base)
        d.mkdir(parents=True, exist_ok=True)
        os.utime(d)
    except OSError:          # no writable home: Numba's own default (next to the sources)
        return
    _prune(base, d)
    os.environ["NUMBA_CACHE_DIR"] = str(d)   # subprocesses (the precompiling helper) share it
    numba = sys.modules.get("numba")
    if numba is not None:                    # imported before hotcold: its config has read the environment
        numba.config.CACHE_DIR = str(d)
