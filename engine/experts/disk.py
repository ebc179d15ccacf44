"""The disk tier: experts' bytes read from their GGUF file with `os.preadv` into buffers the store owns, never
through the map, on a small pool of reader threads (a read releases the GIL, so it overlaps the kernels).

The page cache must not keep a second copy of what the store holds (the budget counts the store's copy only):
reads use O_DIRECT where the filesystem allows it, straight from the disk into the store's buffer, which is
laid out for it (each matrix in a span of whole pages, its bytes at the file offset's place in its first
page); elsewhere (tmpfs, some network filesystems) a buffered read is followed by `posix_fadvise(DONTNEED)`
on its range. A read in flight is a `Pending`, the readiness handle (expert.Ready) that compute waits on; the
time spent waiting is the stall the store reports.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..gguf_file import GGUFFile
from .expert import Expert

if TYPE_CHECKING:
    from .planner import ExpertShape

_PAGE = os.sysconf("SC_PAGE_SIZE")
ALIGN = 4096     # O_DIRECT's alignment of offsets, lengths and buffers (a page: enough for every block size)
DIRECT = True    # try O_DIRECT (tests turn it off to run the buffered path)
Extent = tuple[int, int]                                  # (file offset, bytes)
ReadFn = Callable[[int, list, int], int]                  # os.preadv's shape: (fd, buffers, offset) -> bytes read


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def span(off: int, n: int, direct: bool) -> tuple[int, int]:
    """Where a range's bytes start in its buffer and the buffer's length: O_DIRECT reads whole aligned pages, so
    the bytes sit at the offset's place in the first page; a buffered read fills exactly n bytes."""
    if not direct:
        return 0, n
    phase = off % ALIGN
    return phase, _round_up(phase + n)


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

    def __init__(self, path: str | Path, threads: int = 2, read_fn: ReadFn | None = None,
                 direct: bool | None = None) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)     # no read-ahead past what is asked for
        self.dfd = self._open_direct() if (DIRECT if direct is None else direct) else None
        self.pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="hotcold-read")
        self._read = read_fn
        self._lock = threading.Lock()
        self.bytes_read = 0            # what the threads have read, in bytes
        self.reads = 0                 # ranges read
        self.stall_s = 0.0             # seconds compute waited for reads (counted by Pending.wait)
        self.in_flight = 0             # submitted and not finished

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (O_DIRECT); buffers are then laid out by `span`."""
        return self.dfd is not None

    def _open_direct(self) -> int | None:
        """A second descriptor with O_DIRECT, if the filesystem takes it and a probe read works."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError:
            return None
        try:
            os.preadv(fd, [memoryview(anonymous(ALIGN))], 0)
        except OSError:
            os.close(fd)
            return None
        return fd

    def read(self, extents: Sequence[Extent], dsts: Sequence[np.ndarray]) -> None:
        """Fill each dst (contiguous, writable, laid out by `span`) with its extent's bytes."""
        read = self._read or os.preadv
        for (off, n), dst in zip(extents, dsts):
            mv = memoryview(dst.reshape(-1))
            phase, length = span(off, n, self.direct)
            if len(mv) != length:
                raise ValueError(f"a buffer of {len(mv)} bytes for a {n}-byte range (want {length})")
            fd, start, need = (self.dfd, off - phase, phase + n) if self.direct else (self.fd, off, n)
            got = 0
            while got < need:                                 # O_DIRECT at the file's end: a short last page
                k = read(fd, [mv[got:]], start + got)
                if k <= 0:
                    raise EOFError(f"the file ends {need - got} bytes short of offset {start + need}")
                got += k
            if not self.direct:
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
        for fd in (self.fd, self.dfd):
            try:
                if fd is not None:
                    os.close(fd)
            except OSError:
                pass


def expert_extents(f: GGUFFile, experts: Sequence[Sequence[Expert]]) -> list[list[tuple[Extent, Extent, Extent]]]:
    """Where each expert's (gate, up, down) bytes lie in `f`, from the map views the loader made of them."""
    return [[tuple(f.extent(m.raw) for m in (e.gate, e.up, e.down)) for e in layer] for layer in experts]


class DiskExperts:
    """One file's experts as the disk tier hands them out: each expert's buffer size (whole pages per matrix
    under O_DIRECT), and `views`/`fill` to read expert (layer, e) into a buffer of that size."""

    def __init__(self, f: GGUFFile, experts: Sequence[Sequence[Expert]], reader: DiskReader) -> None:
        self.layouts = experts                            # the map views: shapes and types, never read
        self.extents = expert_extents(f, experts)
        self.reader = reader
        for layer in self.extents:                        # what an earlier reader left cached goes too
            for x in layer:
                for off, n in x:
                    drop_cached(reader.fd, off, n)

    def nbytes_of(self, layer: int, e: int) -> int:
        return sum(span(off, n, self.reader.direct)[1] for off, n in self.extents[layer][e])

    def slot_bytes(self) -> int:
        return max((self.nbytes_of(i, e) for i, layer in enumerate(self.layouts) for e in range(len(layer))),
                   default=0)

    def nbytes(self) -> int:
        return sum(self.nbytes_of(i, e) for i, layer in enumerate(self.layouts) for e in range(len(layer)))

    def shape(self, used: int) -> "ExpertShape":
        """What the planner needs to know of these experts, at their buffers' sizes."""
        from .planner import ExpertShape
        return ExpertShape(sum(len(layer) for layer in self.layouts), self.slot_bytes(),
                           max((len(layer) for layer in self.layouts), default=0), self.nbytes(), used)

    def key(self, layer: int, e: int) -> tuple:
        """What the views of (layer, e) in a buffer depend on: the matrices' layouts and where each starts."""
        src = self.layouts[layer][e]
        return tuple((m.qtype, m.rows, m.cols, m.raw.shape, span(off, n, self.reader.direct)[0])
                     for m, (off, n) in zip((src.gate, src.up, src.down), self.extents[layer][e]))

    def views(self, layer: int, e: int, buf: np.ndarray) -> tuple[Expert, tuple[np.ndarray, ...]]:
        """Expert (layer, e) laid out over `buf` (uint8, page-aligned under O_DIRECT), and the spans to read into."""
        from ..weights import QMatrix
        src = self.layouts[layer][e]
        mats, dsts, pos = [], [], 0
        for m, (off, n) in zip((src.gate, src.up, src.down), self.extents[layer][e]):
            phase, length = span(off, n, self.reader.direct)
            dsts.append(buf[pos:pos + length])
            mats.append(QMatrix(buf[pos + phase:pos + phase + n].reshape(m.raw.shape), m.qtype, m.rows, m.cols))
            pos += length
        return Expert(*mats), tuple(dsts)

    def fill(self, layer: int, e: int, dsts: Sequence[np.ndarray]) -> Pending:
        return self.reader.submit(self.extents[layer][e], dsts, f"expert {e} of layer {layer}")


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
        for e in range(len(layer)):
            n = disk.nbytes_of(i, e)
            view, dsts = disk.views(i, e, buf[off:off + n])
            pending.append(disk.fill(i, e, dsts))
            row.append(view)
            off += n
        out.append(row)
    for p in pending:
        p.wait()
    return out, buf


class StagedCold:
    """Cold copies read from disk when a miss needs one, into a ring holding one layer's worth: the layer's
    batch is computed before the next layer's reads reuse the ring (`begin`)."""

    def __init__(self, disk: DiskExperts) -> None:
        self.disk = disk
        self.slot_bytes = disk.slot_bytes()
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
        view, dsts = self.disk.views(layer, e, self.buf[slot])
        return Expert(view.gate, view.up, view.down, ready=self.disk.fill(layer, e, dsts))
