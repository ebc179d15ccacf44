"""What a loaded model holds in host memory, part by part (Model.memory()).

Arrays are counted by the memory they own, once however many views reach them; arrays over a map (the
model file's pages, which the page cache holds, or an anonymous arena) are left to whoever accounts for the
map, except quant/repack.py's huge-page buffers, each one array's own.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hotcold.quant.repack import HugeBuffer


def owned_bytes(*roots: Any, depth: int = 6) -> int:
    """Bytes of the heap arrays reachable from `roots` through attributes, dataclass fields, lists, tuples
    and dict values; each array counted once, at its owner."""
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def visit(obj: Any, d: int) -> None:
        nonlocal total
        if obj is None or isinstance(obj, (int, float, str, bytes, bool)) or id(obj) in visited or d < 0:
            return
        visited.add(id(obj))
        if isinstance(obj, np.ndarray):
            a = obj
            while isinstance(a.base, np.ndarray):
                a = a.base
            if a.base is None and id(a) not in seen:                 # owns its data (not a map's view)
                seen.add(id(a))
                total += a.nbytes
                return
            buf = a.base.obj if isinstance(a.base, memoryview) else a.base
            if isinstance(buf, HugeBuffer) and id(buf) not in seen:     # its own pages, not a file's
                seen.add(id(buf))
                total += buf.used
            return
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj)
        elif dataclasses.is_dataclass(obj):
            items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        elif hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            items = [getattr(obj, k, None) for k in obj.__slots__]
        else:
            return
        for x in items:
            visit(x, d - 1)

    for r in roots:
        visit(r, depth)
    return total


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where there is none: then nothing is checked against it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
