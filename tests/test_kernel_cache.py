"""The kernel cache folder follows every kernel source: a change to any of them (not only the kernel's own
file, which is all Numba checks) compiles afresh; a NUMBA_CACHE_DIR the user set is kept."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hotcold import kernel_cache


def _files(tmp: Path, texts: dict[str, str]) -> list[Path]:
    out = []
    for name, text in texts.items():
        p = tmp / name
        p.write_text(text)
        out.append(p)
    return out


def test_any_source_changing_changes_the_folder(tmp_path: Path) -> None:
    for d in "abc":
        (tmp_path / d).mkdir()
    a = _files(tmp_path / "a", {"int8.py": "x", "simd.py": "y"})
    b = _files(tmp_path / "b", {"int8.py": "x", "simd.py": "y"})
    c = _files(tmp_path / "c", {"int8.py": "x", "simd.py": "z"})
    base = tmp_path / "cache"
    assert kernel_cache.cache_dir(a, base) == kernel_cache.cache_dir(b, base)     # same contents, other place
    assert kernel_cache.cache_dir(a, base) != kernel_cache.cache_dir(c, base)     # the inlined helper changed
    assert kernel_cache.cache_dir(a, base).parent == base


def test_the_sources_are_the_compiled_modules() -> None:
    names = {p.name for p in kernel_cache.kernel_sources()}
    assert {"int8.py", "simd.py", "kquants.py", "kernels.py"} <= names
    assert "api.py" not in names and "model.py" not in names          # plain Python: no recompiles for them


def test_old_versions_are_pruned(tmp_path: Path) -> None:
    base = tmp_path / "numba"
    for i in range(6):
        d = base / f"v{i}"
        d.mkdir(parents=True)
        os.utime(d, (1000 + i, 1000 + i))
    kernel_cache._prune(base, base / "v5")
    assert sorted(d.name for d in base.iterdir()) == ["v3", "v4", "v5"][-kernel_cache.KEEP:]


_SHOW = "import hotcold, os, numba; print(os.environ['NUMBA_CACHE_DIR']); print(numba.config.CACHE_DIR)"


def test_import_points_numba_at_the_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _SHOW], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    expect = kernel_cache.cache_dir(kernel_cache.kernel_sources(), tmp_path / "hotcold" / "numba")
    assert out == [str(expect), str(expect)]


def test_a_users_numba_cache_dir_is_kept(tmp_path: Path) -> None:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "mine"), XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _SHOW], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    assert out == [str(tmp_path / "mine")] * 2
    assert not (tmp_path / "hotcold").exists()
