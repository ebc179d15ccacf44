"""The first run's two compiling processes (engine/precompile.py) cover every kernel the warm-up calls:
after both parts are compiled into an empty cache, loading the model compiles nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotcold.quant import simd

_COMPILE_BOTH = """
import sys
from hotcold.engine import precompile
from hotcold.quant import QType
mine, theirs = precompile.signatures([QType[t] for t in sys.argv[1].split(",")], QType[sys.argv[2]], True)
precompile.compile_all(mine + theirs)
"""

_LOAD = """
import gc, sys
from numba.core.registry import CPUDispatcher
from hotcold import Model
Model(sys.argv[1], n_ctx=32)
compiled = [o.py_func.__name__ for o in gc.get_objects() if isinstance(o, CPUDispatcher)
            and o.py_func.__module__.startswith("hotcold") and sum(o.stats.cache_misses.values())]
print("COMPILED", ",".join(sorted(set(compiled))))
"""


@pytest.mark.skipif(not simd.AVAILABLE, reason="the lists name the integer kernels")
def test_both_parts_cover_the_warm_up(trained_q8: Path, tmp_path: Path) -> None:
    from hotcold.engine.gguf_file import GGUFFile
    f = GGUFFile(trained_q8)
    types = sorted({t.qtype.name for t in f.tensors.values() if len(t.shape) >= 2 and t.name != "token_embd.weight"
                    and "_gate_inp" not in t.name})
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _COMPILE_BOTH, ",".join(types), f.tensors["token_embd.weight"].qtype.name],
                   check=True, env=env, timeout=600)
    r = subprocess.run([sys.executable, "-c", _LOAD, str(trained_q8)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    compiled = next(ln for ln in r.stdout.splitlines() if ln.startswith("COMPILED"))[len("COMPILED "):]
    assert compiled == "", f"the warm-up compiled kernels the precompile lists lack: {compiled}"
    assert "compiling kernels" not in r.stderr
