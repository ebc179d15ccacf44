"""The hot tier's memory: equal expert slots in one preallocated buffer, and which expert each holds.

Residency is kept as arrays, updated on every load and drop, so that asking which of a layer's experts
are resident (ERAS, hit tests) costs no scan over the slots. This arena is RAM; cuda.arena.CudaArena
puts the buffer in VRAM by overriding `_allocate` and `_place`.
"""
from __future__ import annotations

import mmap
from typing import Any, ClassVar

import numpy as np

from ..kernels import copy_expert
from ..weights import QMatrix
from .expert import DONE, Expert, Fill, Filling
from .policies import Key


_MADV_POPULATE_WRITE = 23


class Arena:
    """`n_slots` slots of `slot_bytes` for the experts of `n_layer` x `n_expert`; never grows."""
    fills_while_computing: ClassVar[bool] = True   # load_filling: the slot written by the expert's first compute

    def __init__(self, n_slots: int, slot_bytes: int, n_layer: int, n_expert: int) -> None:
        self.slot_bytes = slot_bytes
        self.buf = self._allocate(max(n_slots, 0), slot_bytes)
        self.free = list(range(n_slots - 1, -1, -1))
        self.slot_of: dict[Key, int] = {}
        self.experts: dict[Key, Expert] = {}
        self.mask = np.zeros((n_layer, max(n_expert, 1)), dtype=bool)  # (layer, expert) is resident
        self._views: dict[tuple[int, Any], Expert] = {}                # (slot, layout) -> the slot as an Expert
        if n_slots > 0 and type(self)._place is Arena._place:
            _warm_copy()                                               # compiled at load, not in the first prompt

    def _allocate(self, n_slots: int, slot_bytes: int) -> Any:
        """Anonymous memory asking for transparent huge pages (THP is often `madvise` only): the GEMVs stream
        slots as they stream the file's mapping, whose page cache the kernel may hold in large folios."""
        size = n_slots * slot_bytes
        if size == 0:
            return np.empty((n_slots, slot_bytes), dtype=np.uint8)
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
            m.madvise(_MADV_POPULATE_WRITE)
        except (AttributeError, OSError):
            pass
        return np.frombuffer(m, dtype=np.uint8).reshape(n_slots, slot_bytes)

    def _view(self, slot: int, src: Expert) -> Expert:
        """`slot` as an Expert laid out like `src`, made once per layout (every expert of a layer shares one)."""
        g, u, d = src.gate, src.up, src.down
        layout = (g.qtype, g.raw.shape, u.qtype, u.raw.shape, d.qtype, d.raw.shape, g.cols, d.cols)
        view = self._views.get((slot, layout))
        if view is None:
            mats, off = [], 0
            for m in (src.gate, src.up, src.down):
                mats.append(QMatrix(self.buf[slot, off:off + m.raw.nbytes].reshape(m.raw.shape), m.qtype, m.rows, m.cols))
                off += m.raw.nbytes
            view = self._views[(slot, layout)] = Expert(*mats, ready=DONE)
        return view

    def _place(self, slot: int, src: Expert) -> Expert:
        """Copy `src`'s three matrices into `slot`; the returned Expert views the slot (the copy is done)."""
        view = self._view(slot, src)
        raws = (src.gate.raw, src.up.raw, src.down.raw)
        if all(r.flags.c_contiguous for r in raws):
            copy_expert(self.buf[slot], *raws)
        else:                                                          # a strided view: numpy copies it
            for r, dst in zip(raws, (view.gate, view.up, view.down)):
                np.copyto(dst.raw, r)
        return view

    @property
    def n_slots(self) -> int:
        return self.buf.shape[0]

    @property
    def used_bytes(self) -> int:
        return len(self.slot_of) * self.slot_bytes

    def resident(self, layer: int) -> np.ndarray:
        """(E,) bool view: which of the layer's experts are in the arena."""
        return self.mask[layer]

    def begin(self) -> None:
        """A new layer's batch starts (a device arena recycles its staging slots)."""

    def stage(self, src: Expert) -> Expert | None:
        """A transient copy of a cold expert where this arena computes, or None (RAM: the cold copy is
        already in host memory, so there is nothing to stage)."""
        return None

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def load(self, key: Key, src: Expert) -> Expert:
        """Queue `src` into a free slot; the result's `ready` says when its bytes are there."""
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.mask[key] = True
        self.experts[key] = self._place(slot, src)
        return self.experts[key]

    def load_filling(self, key: Key, src: Expert) -> Expert:
        """Take a free slot for `src` without copying: the result computes from `src` and writes the slot as it
        reads (Filling); the slot's expert is ready once that is done. `src`'s matrices must be C-contiguous (the
        kernels write rows at their offsets)."""
        slot = self.free.pop()
        view = self._view(slot, src)
        self.slot_of[key] = slot
        self.mask[key] = True
        self.experts[key] = resident = Expert(view.gate, view.up, view.down, ready=Fill(src, view))
        return Filling(src.gate, src.up, src.down, slot=resident)

    def failed(self) -> list[Key]:
        """Residents whose load failed (a disk read): the store drops them before it trusts the arena again."""
        return []

    def drop(self, key: Key) -> None:
        self.free.append(self.slot_of.pop(key))
        self.mask[key] = False
        del self.experts[key]


class MappedArena(Arena):
    """A RAM budget that holds every expert of a file mapped in RAM: the slots are the file's own pages, so a load
    copies nothing. A copy would only hold the same bytes twice (llama.cpp's mmap serves them the same way)."""
    fills_while_computing = False

    def _allocate(self, n_slots: int, slot_bytes: int) -> Any:
        return np.empty((n_slots, 0), dtype=np.uint8)

    def _place(self, slot: int, src: Expert) -> Expert:
        return src


def ram_arena(n_slots: int, slot_bytes: int, n_layer: int, n_expert: int, n_experts: int) -> Arena:
    """The CPU's hot arena for `n_experts` experts in all: the file's pages where the budget holds them all
    (MappedArena), else `n_slots` slots of their own."""
    return (MappedArena if n_slots >= n_experts else Arena)(n_slots, slot_bytes, n_layer, n_expert)


def _warm_copy() -> None:
    """The slot copy's one specialisation (file bytes, read-only, into a slot's bytes) compiled or loaded now."""
    src = np.zeros((1, 1), dtype=np.uint8)
    src.flags.writeable = False
    copy_expert(np.zeros(3, dtype=np.uint8), src, src, src)


class DiskArena(Arena):
    """The arena filled from the disk tier: a load queues a read of the expert's file bytes into its slot on
    the reader's threads and hands out the slot with the read as its readiness (experts.disk)."""
    fills_while_computing = False

    def __init__(self, n_slots: int, slot_bytes: int, n_layer: int, n_expert: int, disk: Any = None) -> None:
        super().__init__(n_slots, disk.slot_bytes(), n_layer, n_expert)   # whole pages per matrix for O_DIRECT
        self.disk = disk                                               # experts.disk.DiskExperts
        self._pending: dict[int, Any] = {}                             # slot -> its last read
        self._failed: list[Key] = []
        self._disk_views: dict[tuple, tuple[Expert, tuple]] = {}       # (slot, layout) -> views, read spans

    def load(self, key: Key, src: Expert) -> Expert:
        slot = self.free.pop()
        prev = self._pending.pop(slot, None)
        if prev is not None and not prev.done():                       # an evicted read still writing here
            prev.future.exception()
        vk = (slot, self.disk.key(*key))
        made = self._disk_views.get(vk)
        if made is None:
            made = self._disk_views[vk] = self.disk.views(key[0], key[1], self.buf[slot])
        view, dsts = made
        pending = self.disk.fill(key[0], key[1], dsts)
        pending.future.add_done_callback(lambda f, key=key: f.exception() is not None and self._failed.append(key))
        self._pending[slot] = pending
        self.slot_of[key] = slot
        self.mask[key] = True
        self.experts[key] = expert = Expert(view.gate, view.up, view.down, ready=pending)
        return expert

    def failed(self) -> list[Key]:
        out, self._failed = [k for k in self._failed if k in self.slot_of], []
        return out
