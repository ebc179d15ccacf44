"""The hot expert tier in GPU memory: the RAM Arena's interface over one preallocated device buffer.

Experts are uploaded as their quantized bytes (never float copies) into equal slots of a single device
allocation sized by the VRAM budget, and computed there by hotcold.quant.cuda's fused dequant kernels.
Uploads are asynchronous: bytes are copied into a page-locked buffer, sent on the upload stream, and the
expert's readiness handle is an event the compute stream waits on, so a prefetched upload overlaps the
layers computed meanwhile (HOBBIT). A few staging slots take cold copies uploaded for one layer's misses
when the miss cost model says that beats computing them on the CPU (experts.cache.ExpertCache decides).
Runs on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) where there is no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hotcold.quant import QType, cuda as qcuda

from ..experts.arena import Arena
from ..experts.expert import Expert
from ..weights import QMatrix
from .memory import Gpu


@dataclass(frozen=True)
class CudaMatrix:
    """A quantized matrix resident on the GPU."""
    dev: Any       # device array (rows, row elements)
    qtype: QType
    rows: int
    cols: int
    nbytes: int

    @classmethod
    def view(cls, dst: Any, m: QMatrix) -> "CudaMatrix":
        """`m`'s shape over device bytes `dst` (1-D uint8) that hold (or will hold) its rows."""
        elem = qcuda.element_type(m.qtype)
        typed = dst.view(elem) if elem != np.uint8 else dst
        return cls(typed.reshape(m.rows, m.raw.nbytes // m.rows // elem.itemsize), m.qtype, m.rows, m.cols,
                   m.raw.nbytes)


class Uploaded:
    """Readiness of an upload: the event recorded on the upload stream after its copy."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()


class Uploader:
    """Copies experts' bytes to device slots through two page-locked buffers, on the upload stream."""

    def __init__(self, gpu: Gpu, nbytes: int) -> None:
        self.gpu = gpu
        self.pinned = [gpu.pinned(max(nbytes, 1), np.uint8) for _ in range(2)]
        self.done: list[Any] = [None, None]
        self.turn = 0

    def upload(self, dst: Any, src: Expert, reused: bool = True) -> Expert:
        """Queue `src`'s three matrices into device bytes `dst`; the result is usable once its `ready` fires.
        `reused`: `dst` held an expert before, which compute queued earlier may still read."""
        i, self.turn = self.turn, self.turn ^ 1
        if self.done[i] is not None:
            self.done[i].synchronize()                                # the buffer's last upload has left
        buf, off, mats = self.pinned[i], 0, []
        for m in (src.gate, src.up, src.down):
            assert isinstance(m, QMatrix), "uploads read experts from host memory"
            n = m.raw.nbytes
            buf[off:off + n] = m.raw.reshape(-1)
            mats.append(CudaMatrix.view(dst[off:off + n], m))
            off += n
        if reused:
            self.gpu.after_compute()                                  # the slot's last reader has run
        dst[:off].copy_to_device(buf[:off], stream=self.gpu.upload)
        self.done[i] = ready = self.gpu.event(self.gpu.upload)
        return Expert(*mats, ready=Uploaded(ready))


class CudaArena(Arena):
    """The Arena's slots in one counted device allocation, plus `stage_slots` slots of `stage_bytes` for
    cold copies uploaded for the current layer (stage() until begin() starts the next)."""
    fills_while_computing = False

    def __init__(self, n_slots: int, slot_bytes: int, n_layer: int, n_expert: int, gpu: Gpu, stage_slots: int = 0,
                 stage_bytes: int = 0) -> None:
        self.gpu = gpu
        super().__init__(n_slots, slot_bytes, n_layer, n_expert)
        self.stage_buf = gpu.empty((stage_slots, stage_bytes), np.uint8, "cold staging slots") if stage_slots else None
        self.uploader = Uploader(gpu, max(slot_bytes, stage_bytes))
        self.staged = 0
        self.filled: set[int] = set()  # slots that have held an expert

    def _allocate(self, n_slots: int, slot_bytes: int) -> Any:
        return self.gpu.empty((n_slots, slot_bytes), np.uint8, "hot expert slots")

    def _place(self, slot: int, src: Expert) -> Expert:
        reused = slot in self.filled
        self.filled.add(slot)
        return self.uploader.upload(self.buf[slot], src, reused)

    def begin(self) -> None:
        self.staged = 0

    def stage(self, src: Expert) -> Expert | None:
        """Upload a cold copy into a free staging slot for this layer; None when all are taken."""
        if self.stage_buf is None or self.staged >= self.stage_buf.shape[0] or src.nbytes > self.stage_buf.shape[1]:
            return None
        self.staged += 1
        return self.uploader.upload(self.stage_buf[self.staged - 1], src)
