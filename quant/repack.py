"""Q4_K repacked for the CPU: eight weight rows interleaved, as llama.cpp's CPU_REPACK buffers hold them.

llama.cpp repacks Q4_K at load (ggml-cpu/repack.cpp, block_q4_Kx8) so that each vector lane works on its own
weight row: a sub-block's scale then multiplies eight rows at once, and the float scaling is one vector FMA for
eight rows instead of a horizontal sum per row. The layout here (quant/simd.py's X8_*) keeps each block's d and
dmin as fp16 and its 6-bit scales and mins unpacked to bytes (1184 bytes for eight rows' blocks, 1152 packed).

Every product's float steps are those of the plain Q4_K kernels (quant/simd.py _accumulate_k4) lane for lane,
so a row's result is the same bits from either layout: repacked and plain copies of one expert can serve the
same request (tests/test_repack.py).
"""
from __future__ import annotations

import mmap
from typing import Callable

import numpy as np
from numba import njit, prange

from . import simd
from .int8 import Acts
from .kernels import _stack
from .types import QType
from .vec import silu_mul

F32 = np.float32
GROUP = 8                    # weight rows per interleaved group
Q4_K_BYTES = 144             # a plain block
X8 = simd.X8_BYTES           # eight rows' blocks
ACC = 8 * simd.X8_ROWS       # accumulator lanes of a pass
# Bytes ahead the kernels prefetch into L2 (prefetcht1) for one activation row and for more (0: none), chosen by
# alternating settings in one process (issue 15's closing note has the figures): several rows ran fastest 8-32 KiB
# ahead into L2, well ahead of 2 KiB into L1 (the plain kernels' int8.PREFETCH); one row, memory-bound, lost with any.
AHEAD_ONE, AHEAD_MORE = 0, 16384


def can_repack(qtype: QType, rows: int) -> bool:
    """Whether a matrix of `qtype` with `rows` rows has an interleaved form (Q4_K, whole groups of eight rows)."""
    return simd.AVAILABLE and qtype == QType.Q4_K and rows % GROUP == 0 and rows > 0


def packed_shape(rows: int, row_bytes: int) -> tuple[int, int]:
    """The interleaved array's shape for a (rows, row_bytes) Q4_K matrix."""
    return rows // GROUP, row_bytes // Q4_K_BYTES * X8


@njit(cache=True, parallel=True)
def repack_q4_k(w: np.ndarray, out: np.ndarray) -> None:
    """out (rows / 8, blocks * X8_BYTES) = Q4_K rows w (rows, blocks * 144) interleaved by eights; scales and
    mins unpacked as ggml's get_scale_min_k4."""
    nb = w.shape[1] // Q4_K_BYTES
    for g in prange(w.shape[0] // GROUP):
        for k in range(nb):
            o = k * X8
            for r in range(GROUP):
                row, s = GROUP * g + r, k * Q4_K_BYTES
                out[g, o + 2 * r] = w[row, s]
                out[g, o + 2 * r + 1] = w[row, s + 1]
                out[g, o + 16 + 2 * r] = w[row, s + 2]
                out[g, o + 16 + 2 * r + 1] = w[row, s + 3]
                for j in range(8):
                    if j < 4:
                        sc, mn = w[row, s + 4 + j] & 63, w[row, s + 8 + j] & 63
                    else:
                        sc = (w[row, s + 8 + j] & 15) | ((w[row, s + j] >> 6) << 4)
                        mn = (w[row, s + 8 + j] >> 4) | ((w[row, s + 4 + j] >> 6) << 4)
                    out[g, o + simd.X8_SCALES + 8 * j + r] = sc
                    out[g, o + simd.X8_MINS + 16 * (j // 2) + 2 * r + j % 2] = mn
                for c in range(4):
                    for i in range(8):
                        for b in range(4):
                            out[g, o + simd.X8_QS + 256 * c + 32 * i + 4 * r + b] = w[row, s + 16 + 32 * c + 4 * i + b]


HUGE = 2 << 20   # a transparent huge page


THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages() -> bool:
    """Whether this kernel gives transparent huge pages to memory advised onto them ("always" or "madvise")."""
    try:
        with open(THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class HugeBuffer(mmap.mmap):
    """Private anonymous memory advised onto transparent huge pages; `used`: the bytes the array over it holds
    (engine/memory.py counts those as the array's own, unlike a file's map)."""
    used = 0


def _empty(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised uint8 array, on transparent huge pages where it spans some (madvise): a stream through a
    matrix then crosses a page every 2 MiB instead of every 4 KiB, as the file's bytes do in the page cache's large
    folios (on 4 KiB pages the interleaved experts decoded one stream slower than the file's layout)."""
    n = shape[0] * shape[1]
    if n < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, np.uint8)
    buf = HugeBuffer(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # shared would be shmem
    buf.used = n
    a = np.frombuffer(buf, np.uint8)
    skip = -a.ctypes.data % HUGE                                   # start on a huge page boundary
    buf.madvise(mmap.MADV_HUGEPAGE, skip, n)
    return a[skip:skip + n].reshape(shape)


def repack(w: np.ndarray) -> np.ndarray:
    """The interleaved copy of Q4_K rows w (uint8, (rows, row_bytes)), read-only; can_repack must hold."""
    out = _empty(packed_shape(*w.shape))
    repack_q4_k(w, out)
    out.flags.writeable = False
    return out


@njit(cache=True, inline="always")
def _x8_group(w: np.ndarray, g: int, q: np.ndarray, d: np.ndarray, b: np.ndarray, s: int, rows: int,
              out: np.ndarray, block: Callable, ahead: int) -> None:
    """out[s:s + rows, 8g:8g + 8] = the interleaved group g . activation rows s..s + rows - 1, which `block` takes
    at once (accumulators at constant offsets: they stay in registers); `ahead`: see AHEAD_ONE."""
    nb, gb, n, nbs, nd = w.shape[1] // X8, w.shape[1], q.shape[1], b.shape[1], d.shape[1]
    acc = _stack(ACC, F32)
    for l in range(8 * rows):
        acc[l] = 0
    for k in range(nb):
        if ahead:
            for j in range(0, X8, 64):
                simd.prefetch_l2(w, g * gb + k * X8 + ahead + j)
        block(acc, 0, w, g * gb + k * X8, q, s * n + k * 256, n, b, s * nbs + k * 8, nbs, d, s * nd + k, nd)
    for i in range(rows):
        for r in range(GROUP):
            out[s + i, GROUP * g + r] = acc[8 * i + r]


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_x8(w: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, out: np.ndarray, ahead: int) -> None:
    """out[0] = the interleaved Q4_K w . one activation row (q: Q8_K quants in natural order, d, b: sums per 32)."""
    for g in prange(w.shape[0]):
        _x8_group(w, g, q, d, b, 0, 1, out, simd.q4_k_x8_block1, ahead)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_x8(w: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, out: np.ndarray, ahead: int) -> None:
    """out[t] = the interleaved Q4_K w . activation row t for two or more rows: passes of eight rows over each
    group (each block decoded once for them), then one for the rest."""
    T = q.shape[0]
    full, rest = T - T % 8, T % 8
    for g in prange(w.shape[0]):
        for s in range(0, full, 8):
            _x8_group(w, g, q, d, b, s, 8, out, simd.q4_k_x8_block8, ahead)
        if rest == 2:
            _x8_group(w, g, q, d, b, full, 2, out, simd.q4_k_x8_block2, ahead)
        elif rest == 3:
            _x8_group(w, g, q, d, b, full, 3, out, simd.q4_k_x8_block3, ahead)
        elif rest == 4:
            _x8_group(w, g, q, d, b, full, 4, out, simd.q4_k_x8_block4, ahead)
        elif rest == 5:
            _x8_group(w, g, q, d, b, full, 5, out, simd.q4_k_x8_block5, ahead)
        elif rest == 6:
            _x8_group(w, g, q, d, b, full, 6, out, simd.q4_k_x8_block6, ahead)
        elif rest == 7:
            _x8_group(w, g, q, d, b, full, 7, out, simd.q4_k_x8_block7, ahead)
        elif rest == 1:
            _x8_group(w, g, q, d, b, full, 1, out, simd.q4_k_x8_block1, ahead)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_x8(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
              u: np.ndarray, ahead: int) -> None:
    """g = silu(wg . x) * (wu . x) for one activation row, gate and up in one parallel pass."""
    for i in prange(wg.shape[0]):
        _x8_group(wg, i, q, d, b, 0, 1, g, simd.q4_k_x8_block1, ahead)
        _x8_group(wu, i, q, d, b, 0, 1, u, simd.q4_k_x8_block1, ahead)
    silu_mul(g, u)


def product(w: np.ndarray, a: Acts, out: np.ndarray) -> None:
    """out (rows_x, rows) = the activations bound to `a` times the interleaved Q4_K w's rows."""
    ops = a.operands(QType.Q4_K, interleaved=True)
    if a.rows == 1:
        mv_x8(w, *ops, out, AHEAD_ONE)
    else:
        mm_x8(w, *ops, out, AHEAD_MORE)


def swiglu_product(wg: np.ndarray, wu: np.ndarray, a: Acts, g: np.ndarray, u: np.ndarray) -> None:
    """g = silu(x . wg.T) * (x . wu.T) for the rows bound to `a` (u: room for the up product), interleaved Q4_K."""
    if a.rows == 1:
        mv_glu_x8(wg, wu, *a.operands(QType.Q4_K, interleaved=True), g, u, AHEAD_ONE)
        return
    product(wg, a, g)
    product(wu, a, u)
    silu_mul(g, u)
