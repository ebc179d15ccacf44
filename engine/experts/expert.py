"""An expert as a store hands it out: three matrices wherever they live, and a handle saying when they are there.

A load may still be in flight when its expert is handed out (a prefetch queued for a later layer): the
readiness handle is what compute waits on, just before it reads the expert's bytes. On the CPU the copies
are done by the time `load` returns (`DONE`); on a GPU the handle is the upload's CUDA event
(engine/cuda/arena.py); a disk tier's I/O threads will hand out futures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Ready(Protocol):
    """When an expert's bytes are in place."""

    def done(self) -> bool: ...

    def wait(self) -> None:
        """Block the calling thread until they are."""


class _Done:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def __repr__(self) -> str:
        return "DONE"


DONE: Ready = _Done()


@dataclass(frozen=True)
class Expert:
    """One gated FFN's matrices (gate, up: (n_ff, n_embd); down: (n_embd, n_ff)): a routed expert, a
    shared expert or a dense layer's FFN. QMatrix on the host, CudaMatrix on the GPU."""
    gate: Any
    up: Any
    down: Any
    ready: Ready = DONE

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class Fill:
    """The readiness of an arena slot whose bytes are written by the first computation with its expert (Filling).
    `wait` copies them itself where that computation did not (a kernel without the fused copy, an interrupted
    pass), so a slot is never read before it holds its expert."""

    def __init__(self, src: Expert, dst: Expert) -> None:
        self._src: Expert | None = src
        self.dst = dst

    def done(self) -> bool:
        return self._src is None

    def filled(self) -> None:
        """The computation wrote every byte of the slot."""
        self._src = None

    def wait(self) -> None:
        if self._src is not None:
            for a, b in ((self._src.gate, self.dst.gate), (self._src.up, self.dst.up), (self._src.down, self.dst.down)):
                np.copyto(b.raw, a.raw)
            self._src = None


@dataclass(frozen=True)
class Filling(Expert):
    """An expert being loaded into an arena slot as it is computed: gate, up and down are the source's matrices,
    and the backend writes each of their rows on to `slot` (ready: its Fill) as its kernels read them, one pass
    over the bytes instead of a copy and then a read; a backend that cannot waits on `slot.ready` (the copy) first."""
    slot: Expert | None = None
