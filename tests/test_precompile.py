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


_FIRST_GENERATE = """
import gc, sys
from numba.core.registry import CPUDispatcher
from hotcold import Model

def specialised():
    return {(o.py_func.__qualname__, str(sig)) for o in gc.get_objects() if isinstance(o, CPUDispatcher)
            and o.py_func.__module__.startswith("hotcold") for sig in o.signatures}

m = Model(sys.argv[1], n_ctx=64, expert_budget="25%", miss="adaptive")
before = specialised()
"".join(m.generate([1, 5, 9, 13, 17], max_tokens=6, temperature=0))
print("NEW", ",".join(sorted(q for q, _ in specialised() - before)))
"""


def test_a_cold_store_is_warmed_at_load(trained_q8: Path) -> None:
    """With cold copies in play, the warm-up also runs the cold file's types (which the plain forward does
    not): the first prompt specialises no kernel, so no compile or cache load lands in its timing."""
    r = subprocess.run([sys.executable, "-c", _FIRST_GENERATE, str(trained_q8)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    new = next(ln for ln in r.stdout.splitlines() if ln.startswith("NEW"))[len("NEW "):]
    assert new == "", f"kernels specialised during the first generate: {new}"
