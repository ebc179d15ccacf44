"""The disk tier: experts' bytes read from their GGUF file with `os.preadv` into buffers the store owns, never
through the map, on a small pool of reader threads (a read releases the GIL, so it overlaps the kernels).

Each read is followed by `posix_fadvise(DONTNEED)` on its range, so the page cache does not keep a second copy
of what the store already holds (the budget counts the store's copy only). A read in flight is a `Pending`,
the readiness handle (expert.Ready) that compute waits on; the time spent waiting is the stall the store
reports.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..gguf_file import GGUFFile
from .expert import Expert

_PAGE = os.sysconf("SC_PAGE_SIZE")
Extent = tuple[int, int]                                  # (file offset, bytes)
ReadFn = Callable[[int, list, int], int]                  # os.preadv's shape: (fd, buffers, offset) -> bytes read


def drop_cached(fd: int, off: int, n: int) -> None:
    """Drop the page cache's pages of this range, the pages it shares with its neighbours included (the kernel
    keeps a page only partly inside the range; a dense neighbour's page is simply read again)."""
    start = off // _PAGE * _PAGE
    os.posix_fadvise(fd, start, -(-(off + n) // _PAGE) * _PAGE - start, os.POSIX_FADV_DONTNEED)


class ExpertReadError(OSError):
    """An expert's bytes could not be read from its file."""


class Pending:
    """A read in flight (expert.Ready): `wait` blocks until its bytes are there, counting the stall, and raises
    ExpertReadError if the read failed."""

    __slots__ = ("future", "reader", "what")

    def __init__(self, future: Future, reader: "DiskReader", what: str) -> None:
        self.future, self.reader, self.what = future, reader, what

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        if not self.future.done():
            t0 = time.perf_counter()
            self.future.exception()                       # blocks until it finishes
            self.reader.stall_s += time.perf_counter() - t0
        exc = self.future.exception()
        if exc is not None:
            raise ExpertReadError(f"reading {self.what} from {self.reader.path} failed: {exc}; the expert was "
                                  "dropped and is read again when next needed") from exc

    def __repr__(self) -> str:
        return f"Pending({self.what}, done={self.done()})"


class DiskReader:
    """Reads byte ranges of one file into writable uint8 arrays, now (`read`) or on its threads (`submit`).
    `read_fn` is os.preadv unless a test injects one (to record or to fail reads)."""

    def __init__(self, path: str | Path, threads: int = 2, read_fn: ReadFn | None = None) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)     # no read-ahead past what is asked for
        self.pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="hotcold-read")
        self._read = read_fn
        self._lock = threading.Lock()
        self.bytes_read = 0            # what the threads have read, in bytes
        self.reads = 0                 # ranges read
        self.stall_s = 0.0             # seconds compute waited for reads (counted by Pending.wait)
        self.in_flight = 0             # submitted and not finished

    def read(self, extents: Sequence[Extent], dsts: Sequence[np.ndarray]) -> None:
        """Fill each dst (contiguous, writable, of the extent's size) with its extent's bytes."""
        read = self._read or os.preadv
        for (off, n), dst in zip(extents, dsts):
            mv = memoryview(dst.reshape(-1))
            if len(mv) != n:
                raise ValueError(f"a buffer of {len(mv)} bytes for a {n}-byte range")
            got = 0
            while got < n:
                k = read(self.fd, [mv[got:]], off + got)
                if k <= 0:
                    raise EOFError(f"the file ends {n - got} bytes short of offset {off + n}")
                got += k
            drop_cached(self.fd, off, n)
            with self._lock:
                self.bytes_read += n
                self.reads += 1

    def submit(self, extents: Sequence[Extent], dsts: Sequence[np.ndarray], what: str) -> Pending:
        """`read` on a reader thread; the Pending says when it is done."""
        with self._lock:
            self.in_flight += 1
        fut = self.pool.submit(self._job, extents, dsts)
        return Pending(fut, self, what)

    def _job(self, extents: Sequence[Extent], dsts: Sequence[np.ndarray]) -> None:
        try:
            self.read(extents, dsts)
        finally:
            with self._lock:
                self.in_flight -= 1

    def reset_stats(self) -> None:
        with self._lock:
            self.bytes_read, self.reads, self.stall_s = 0, 0, 0.0

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        try:
            os.close(self.fd)
        except OSError:
            pass


def expert_extents(f: GGUFFile, experts: Sequence[Sequence[Expert]]) -> list[list[tuple[Extent, Extent, Extent]]]:
    """Where each expert's (gate, up, down) bytes lie in `f`, from the map views the loader made of them."""
    return [[tuple(f.extent(m.raw) for m in (e.gate, e.up, e.down)) for e in layer] for layer in experts]


class DiskExperts:
    """One file's experts as the disk tier hands them out: `fill` reads expert (layer, e) into three buffers."""

    def __init__(self, f: GGUFFile, experts: Sequence[Sequence[Expert]], reader: DiskReader) -> None:
        self.layouts = experts                            # the map views: shapes and types, never read
        self.extents = expert_extents(f, experts)
        self.reader = reader
        for layer in self.extents:                                # what an earlier reader left cached goes too
            for x in layer:
                for off, n in x:
                    drop_cached(reader.fd, off, n)

    def fill(self, layer: int, e: int, dsts: Sequence[np.ndarray]) -> Pending:
        return self.reader.submit(self.extents[layer][e], dsts, f"expert {e} of layer {layer}")

    def nbytes(self) -> int:
        return sum(e.nbytes for layer in self.layouts for e in layer)


def views_into(buf: np.ndarray, src: Expert) -> tuple[Expert, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """An Expert laid out like `src` over the start of `buf` (uint8), and its three raw arrays."""
    from ..weights import QMatrix
    mats, off = [], 0
    for m in (src.gate, src.up, src.down):
        mats.append(QMatrix(buf[off:off + m.raw.nbytes].reshape(m.raw.shape), m.qtype, m.rows, m.cols))
        off += m.raw.nbytes
    return Expert(*mats), (mats[0].raw, mats[1].raw, mats[2].raw)


def anonymous(nbytes: int) -> np.ndarray:
    """Zeroed anonymous memory of `nbytes` (uint8), asking for transparent huge pages where THP is `madvise`."""
    import mmap
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    return np.frombuffer(m, dtype=np.uint8)


def resident_copies(disk: DiskExperts) -> tuple[list[list[Expert]], np.ndarray]:
    """Every expert of `disk` read into one buffer of RAM (resident cold copies), in parallel on the reader's
    threads; the experts as views of it, and the buffer."""
    buf = anonymous(disk.nbytes())
    out: list[list[Expert]] = []
    pending: list[Pending] = []
    off = 0
    for i, layer in enumerate(disk.layouts):
        row = []
        for e, src in enumerate(layer):
            view, dsts = views_into(buf[off:off + src.nbytes], src)
            pending.append(disk.fill(i, e, dsts))
            row.append(view)
            off += src.nbytes
        out.append(row)
    for p in pending:
        p.wait()
    return out, buf


class StagedCold:
    """Cold copies read from disk when a miss needs one, into a ring holding one layer's worth: the layer's
    batch is computed before the next layer's reads reuse the ring (`begin`)."""

    def __init__(self, disk: DiskExperts) -> None:
        self.disk = disk
        self.slot_bytes = max((e.nbytes for layer in disk.layouts for e in layer), default=0)
        self.n_slots = max((len(layer) for layer in disk.layouts), default=0)
        self.buf = anonymous(self.n_slots * self.slot_bytes).reshape(self.n_slots, self.slot_bytes)
        self._next = 0

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def begin(self) -> None:
        self._next = 0

    def get(self, layer: int, e: int) -> Expert:
        slot = self._next % max(self.n_slots, 1)
        self._next += 1
        src = self.disk.layouts[layer][e]
        view, dsts = views_into(self.buf[slot], src)
        pending = self.disk.fill(layer, e, dsts)
        return Expert(view.gate, view.up, view.down, ready=pending)
