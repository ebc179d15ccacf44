"""An expert as a store hands it out: three matrices wherever they live, and a handle saying when they are there.

A load may still be in flight when its expert is handed out (a prefetch queued for a later layer): the
readiness handle is what compute waits on, just before it reads the expert's bytes. On the CPU the copies
are done by the time `load` returns (`DONE`); on a GPU the handle is the upload's CUDA event
(engine/cuda/arena.py); a disk tier's I/O threads will hand out futures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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
