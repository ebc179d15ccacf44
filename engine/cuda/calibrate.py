"""The miss cost model's numbers, measured at load: one cold miss served each way, for 1 and n tokens.

Upload + GPU compute (HOBBIT's placement) against CPU compute where the cold copy lies (Fiddler's);
experts.rules.MissCost interpolates between the two token counts and the store picks per miss.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..config import Activation
from ..experts.expert import Expert
from ..experts.rules import MissCost
from .arena import CudaArena

if TYPE_CHECKING:
    from ..context import RunState
    from .backend import CudaBackend


def _best(f: Callable[[], None], reps: int) -> float:
    """The fastest of `reps` runs after one that compiles."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def calibrate(be: "CudaBackend", arena: CudaArena, cold: Expert, s: "RunState", n: int = 8, reps: int = 2) -> MissCost:
    """Seconds to serve `cold` for 1 and n tokens: staged and computed on the GPU, or computed on the host."""
    n = max(1, min(n, s.ffn.xs.shape[0]))
    x = np.random.default_rng(0).standard_normal((n, s.ffn.xs.shape[1])).astype(np.float32)
    s.ffn.xs[:n].copy_to_device(x, stream=be.stream)

    def gpu(m: int) -> None:
        arena.begin()
        e = arena.stage(cold)
        be.wait(e.ready)
        be.glu(e, be.acts(s.ffn.xs[:m], s.h_acts), s.ffn, s.ffn.y[:m], Activation.SILU)
        be.stream.synchronize()

    def cpu(m: int) -> None:
        be.host.glu(cold, be.host.acts(x[:m], s.host_h_acts), s.host_ffn, s.host_ffn.y[:m], Activation.SILU)

    cost = MissCost(n, (_best(lambda: gpu(1), reps), _best(lambda: gpu(n), reps)),
                    (_best(lambda: cpu(1), reps), _best(lambda: cpu(n), reps)))
    arena.begin()
    return cost
