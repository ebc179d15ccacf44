"""Integer products of quantized weights with quantized activations: ggml-cpu's vec_dot_type scheme.

Activations are quantized once per matrix input, to Q8_K (256-element blocks, a float32 scale, sums per
16 and per 32) for the K-quants and to Q8_0 (32-element blocks, an fp16-rounded scale, a sum per block) for
the 32-element types, exactly as llama.cpp's x86 code does (quantize_row_q8_K, and quantize_row_q8_0's
AVX2 path: 127/amax, rounded to nearest even). Each weight block is then dotted with the activation block
in integer arithmetic (quant/simd.py) and scaled once per block in float, as in ggml's
ggml_vec_dot_*_q8_K / _q8_0. The activations' error is llama.cpp's own, so results follow llama.cpp's
rather than the float kernels' (kernels.py), which stay for the other types and for CPUs without AVX2.

One kernel per type and shape: `mv` for one activation row (accumulators in registers), `mm` for several,
in tiles of 4 rows x 4 activation rows, each weight block decoded once per tile; up to 8 rows (a decode batch's
rows of one expert) in one pass over each weight row, with a block intrinsic for each row count.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numba import njit, prange

from . import simd
from .fp import f32_round_f16, nearest_int
from .kernels import _stack
from .types import QType
from .vec import silu_mul

F32 = np.float32
MR = 4   # weight rows per matmul tile
MT = 4   # activation rows per matmul tile (unrolled: their accumulators stay in registers)
LANES = 8 * MT  # accumulator lanes per matmul tile
FEW = simd.ROWS  # up to this many activation rows (a decode batch) go through each weight row in one pass
FEW_LANES = 8 * FEW
PREFETCH = 2048  # bytes ahead a one-row kernel asks for its weights (chosen by measurement among 1-4 KiB)


class Acts:
    """Activations (up to n_rows x n) and their Q8_K and Q8_0 forms, preallocated; `bind` points it at new
    float32 values, and each form is made on first use by a kernel that needs it."""

    def __init__(self, n_rows: int, n: int) -> None:
        self.n = n
        self.q8k = np.zeros((n_rows, n), np.int8)
        self.q8k_d = np.zeros((n_rows, max(n // 256, 1)), np.float32)
        self.q8k_b16 = np.zeros((n_rows, max(n // 16, 1)), np.int32)
        self.q8k_m = np.zeros((n_rows, max(n // 32, 1)), np.float32)   # d * sums per 32: Q5_K's mins multiply
        self.q8k_b32 = np.zeros((n_rows, max(n // 32, 1)), np.int16)    # sums per 32: Q4_K's mins multiply
        self.q8kt = np.zeros((n_rows, n), np.int8)                       # q8k in simd.Q8K_ORDER: Q4_K/Q5_K's
        self.q80 = np.zeros((n_rows, n), np.int8)
        self.q80_d = np.zeros((n_rows, max(n // 32, 1)), np.float32)
        self.q80_s = np.zeros((n_rows, max(n // 32, 1)), np.int32)
        self.x: np.ndarray | None = None
        self.rows = 0
        self.have_q8k = self.have_q80 = False
        # the kernels' operands for each weight type, made with the form (row views, not per product)
        self._forms: dict[QType | None, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}   # None: interleaved Q4_K

    def bind(self, x: np.ndarray) -> "Acts":
        """Use float32 x (rows, n), C-contiguous; forms are remade when asked for."""
        self.x, self.rows = x, x.shape[0]
        self.have_q8k = self.have_q80 = False
        self._forms.clear()
        return self

    def need(self, fmt: QType) -> None:
        if fmt == QType.Q8_K and not self.have_q8k:
            r = self.rows
            quantize_q8_k(self.x, self.q8k[:r], self.q8kt[:r], self.q8k_d[:r], self.q8k_b16[:r], self.q8k_m[:r],
                          self.q8k_b32[:r])
            self.have_q8k = True
        elif fmt == QType.Q8_0 and not self.have_q80:
            r = self.rows
            quantize_q8_0(self.x, self.q80[:r], self.q80_d[:r], self.q80_s[:r])
            self.have_q80 = True

    def operands(self, qtype: QType, interleaved: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(quants, scales, sums) that `qtype`'s kernels read (`interleaved`: quant/repack.py's), quantizing on
        first use."""
        ops = self._forms.get(None if interleaved else qtype)
        if ops is None:
            fmt, r = KERNELS[qtype][0], self.rows
            self.need(fmt)
            if interleaved:
                ops = self.q8k[:r], self.q8k_d[:r], self.q8k_b32[:r]
            elif qtype == QType.Q4_K:
                ops = self.q8kt[:r], self.q8k_d[:r], self.q8k_b32[:r]
            elif qtype == QType.Q5_K:
                ops = self.q8kt[:r], self.q8k_d[:r], self.q8k_m[:r]
            elif fmt == QType.Q8_K:
                ops = self.q8k[:r], self.q8k_d[:r], self.q8k_b16[:r]
            else:
                ops = self.q80[:r], self.q80_d[:r], self.q80_s[:r]
            self._forms[None if interleaved else qtype] = ops
        return ops


# ---- activation quantizers ----

_ORDER4 = np.array(simd.Q8K_ORDER[::4], dtype=np.int64) // 4   # Q8K_ORDER moves whole 4-byte groups


@njit(cache=True)
def quantize_q8_k(x: np.ndarray, q: np.ndarray, qt: np.ndarray, d: np.ndarray, b16: np.ndarray, m: np.ndarray,
                  b32: np.ndarray) -> None:
    """Rows of x (T, n) to Q8_K as quantize_row_q8_K: per 256 block iscale = -127 / (the value of largest
    magnitude, the first on ties), q = min(127, nearest_int(iscale * x)), d = 1 / iscale; plus sums per 16 quants,
    d times the sums per 32 in float32 (m: the Q5_K blocks' mins term is then one FMA a row, quant/simd.py), the
    sums per 32 as int16 (b32: Q4_K's mins term, in integers); qt: q in simd.Q8K_ORDER within each block (the
    Q4_K and Q5_K blocks' order). Each step is a loop of its own, so that LLVM vectorises it (the magnitudes compared
    as the integers of their bits, whose order is theirs)."""
    xi = x.view(np.int32)
    q4, qt4 = q.view(np.int32), qt.view(np.int32)
    for t in range(x.shape[0]):
        for k in range(x.shape[1] // 256):
            s = k * 256
            top = np.int32(0)
            for j in range(256):
                top = max(top, np.int32(xi[t, s + j] & np.int32(0x7FFFFFFF)))
            vmax = F32(0)
            for j in range(256):
                if xi[t, s + j] & np.int32(0x7FFFFFFF) == top:
                    vmax = x[t, s + j]
                    break
            if vmax == 0:
                for j in range(256):
                    q[t, s + j] = 0
                for j in range(16):
                    b16[t, k * 16 + j] = 0
                for j in range(8):
                    m[t, k * 8 + j] = 0
                    b32[t, k * 8 + j] = 0
                for j in range(256):
                    qt[t, s + j] = 0
                d[t, k] = 0
                continue
            iscale = F32(F32(-127.0) / vmax)
            for j in range(256):
                q[t, s + j] = min(127, nearest_int(F32(iscale * x[t, s + j])))
            for j in range(16):
                total = np.int32(0)
                for i in range(16):
                    total += np.int32(q[t, s + 16 * j + i])
                b16[t, k * 16 + j] = total
            d[t, k] = F32(1.0) / iscale
            for j in range(8):
                m[t, k * 8 + j] = d[t, k] * F32(b16[t, k * 16 + 2 * j] + b16[t, k * 16 + 2 * j + 1])
                b32[t, k * 8 + j] = b16[t, k * 16 + 2 * j] + b16[t, k * 16 + 2 * j + 1]
            for j in range(64):
                qt4[t, k * 64 + j] = q4[t, k * 64 + _ORDER4[j]]


@njit(cache=True)
def quantize_q8_0(x: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray) -> None:
    """Rows of x (T, n) to Q8_0 as ggml-cpu's x86 quantize_row_q8_0: per 32 block d = amax / 127, quants
    round(x * 127 / amax) to nearest even, d stored as fp16 (here its float32 value); s = sum of the quants."""
    for t in range(x.shape[0]):
        for k in range(x.shape[1] // 32):
            o = k * 32
            amax = F32(0)
            for j in range(32):
                amax = max(amax, abs(x[t, o + j]))
            idv = F32(127.0) / amax if amax != 0 else F32(0)
            total = 0
            for j in range(32):
                v = np.int32(np.rint(x[t, o + j] * idv))
                q[t, o + j] = v
                total += v
            s[t, k] = total
            d[t, k] = f32_round_f16(amax / F32(127.0))


# ---- Q4_K x Q8_K ----
# block_q4_K: d, dmin (fp16), scales[12], qs[128]; byte l of chunk c holds sub-block 2c (low nibble) and 2c+1

@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q4_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray, dst: np.ndarray) -> None:
    """out[0, r] = row r of Q4_K w . the Q8_K activation row (q, d, m of shape (1, .); m: quantize_q8_k's sums
    times d); dst: see _mv_k."""
    _mv_k(w, q, d, m, out, dst, 144, 8, simd.q4_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q4_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = row r of Q4_K w . activation row t, for more than FEW activation rows (see _mm_k); few_ and
    more_ take 1-4 and 5-8 rows (_rows_k): two kernels, so that a first run's two processes compile them at once."""
    _mm_k(w, q, d, m, out, 144, 8, simd.q4_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def few_q4_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, m, out, 144, 8, 2, 4, simd.q4_k_block2, simd.q4_k_block3, simd.q4_k_block4, simd.q4_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def more_q4_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, m, out, 144, 8, 5, 8, simd.q4_k_block5, simd.q4_k_block6, simd.q4_k_block7, simd.q4_k_block8)


# ---- Q5_K and Q6_K x Q8_K ----
# block_q5_K: d, dmin, scales[12], qh[32], qs[128] (the fifth bit of sub-block s is bit s of qh[l]);
# block_q6_K: ql[128], qh[64], scales[16], d. Each block is one intrinsic (quant/simd.py); `b` is the sums the
# type needs (Q5_K: per 32, for the mins; Q6_K: per 16, for its -32 offset).

@njit(cache=True, inline="always")
def _prefetch(w: np.ndarray, o: int, ts: int) -> None:
    """The lines of the block PREFETCH bytes after the one at byte o (ts bytes): a decode GEMV streams each row
    once, and the hardware prefetcher alone leaves the memory bus idle between rows and calls."""
    for j in range((ts + 63) // 64):
        simd.prefetch(w, o + PREFETCH + 64 * j)


@njit(cache=True, inline="always")
def _mv_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, out: np.ndarray, dst: np.ndarray, ts: int,
          bpb: int, block1: Callable, qk: int = 256) -> None:
    """out[0, r] = row r . the activation row: a block of ts bytes against qk activations, bpb sums each. A dst of
    w's shape gets each row once it is read (an expert computed while it is loaded into an arena slot)."""
    nb, rb, fill = w.shape[1] // ts, w.shape[1], dst.shape[0] > 0
    for r in prange(w.shape[0]):
        _group(w, r * rb, nb, ts, q, 0, qk, b, 0, bpb, d, 0, 1, out, r, block1)
        if fill:
            simd.copy(dst, r * rb, w, r * rb, rb)


@njit(cache=True, inline="always")
def _group(w: np.ndarray, ro: int, nb: int, ts: int, q: np.ndarray, n: int, qk: int, b: np.ndarray, nbs: int,
           bpb: int, d: np.ndarray, nd: int, rows: int, out: np.ndarray, r: int, block: Callable) -> None:
    """out[:rows, r] = the weight row at byte ro . activation rows 0..rows-1, which `block` takes at once; the
    accumulators are read only at constant offsets (rows is a constant where this is inlined), so they stay in
    registers."""
    acc = _stack(FEW_LANES, F32)
    for l in range(8 * rows):
        acc[l] = 0
    for k in range(nb):
        _prefetch(w, ro + k * ts, ts)
        block(acc, 0, w, ro + k * ts, q, k * qk, n, b, k * bpb, nbs, d, k, nd)
    for i in range(rows):
        out[i, r] = simd.hsum(acc, 8 * i)


@njit(cache=True, inline="always")
def _rows_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, out: np.ndarray, ts: int, bpb: int, lo: int,
            hi: int, ba: Callable, bb: Callable, bc: Callable, bd: Callable, qk: int = 256) -> None:
    """out[t, r] = row r of w . activation row t for lo <= T <= hi (hi - lo < 4) activation rows (a decode batch's
    rows of one expert): one pass over each weight row with the block for T rows (ba for lo rows, bb for lo + 1,
    ...; lo and hi are constants, so the branches past hi compile to nothing), each weight block decoded once for
    all of them (passes per group of 4, 2 and 1 rows made 3 rows cost as much as 4: bench/int8_rows.py); every
    row's sum is the one-row kernel's, whatever the batch."""
    nb, rb, T = w.shape[1] // ts, w.shape[1], q.shape[0]
    n, nbs, nd = q.shape[1], b.shape[1], d.shape[1]
    for r in prange(w.shape[0]):
        if T == lo:
            _group(w, r * rb, nb, ts, q, n, qk, b, nbs, bpb, d, nd, lo, out, r, ba)
        elif T == lo + 1:
            _group(w, r * rb, nb, ts, q, n, qk, b, nbs, bpb, d, nd, lo + 1, out, r, bb)
        elif T == lo + 2 or hi == lo + 2:
            _group(w, r * rb, nb, ts, q, n, qk, b, nbs, bpb, d, nd, lo + 2, out, r, bc)
        else:
            _group(w, r * rb, nb, ts, q, n, qk, b, nbs, bpb, d, nd, lo + 3, out, r, bd)


@njit(cache=True, inline="always")
def _mv_glu(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray, u: np.ndarray,
            dg: np.ndarray, du: np.ndarray, ts: int, bpb: int, block1: Callable, qk: int = 256) -> None:
    """g = silu(wg . x) * (wu . x) for one activation row x: SwiGLU's gate and up in one parallel pass (each sum
    _mv_k's), then ggml's SwiGLU. dg and du, if not empty, get wg's and wu's rows as they are read (as _mv_k's
    dst)."""
    nb, rb, fill = wg.shape[1] // ts, wg.shape[1], dg.shape[0] > 0
    for r in prange(wg.shape[0]):
        _group(wg, r * rb, nb, ts, q, 0, qk, b, 0, bpb, d, 0, 1, g, r, block1)
        _group(wu, r * rb, nb, ts, q, 0, qk, b, 0, bpb, d, 0, 1, u, r, block1)
        if fill:
            simd.copy(dg, r * rb, wg, r * rb, rb)
            simd.copy(du, r * rb, wu, r * rb, rb)
    silu_mul(g, u)


@njit(cache=True, inline="always")
def _mm_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, out: np.ndarray, ts: int, bpb: int,
          block4: Callable, qk: int = 256) -> None:
    """out[t, r] for more than FEW activation rows (a prompt): tiles of MR weight rows x MT activation rows, each
    weight block decoded once for the MT rows (the last tile overlaps the one before)."""
    rows, nb, rb, T = w.shape[0], w.shape[1] // ts, w.shape[1], q.shape[0]
    n, nbs, nd = q.shape[1], b.shape[1], d.shape[1]
    for rt in prange((rows + MR - 1) // MR):
        accf = _stack(LANES, F32)
        for t0 in range(0, T, MT):
            s = t0 if t0 + MT <= T else max(T - MT, 0)
            for r in range(rt * MR, min(rt * MR + MR, rows)):
                for l in range(LANES):
                    accf[l] = 0
                for k in range(nb):
                    _prefetch(w, r * rb + k * ts, ts)
                    block4(accf, 0, w, r * rb + k * ts, q, s * n + k * qk, n, b, s * nbs + k * bpb, nbs, d,
                           s * nd + k, nd)
                for j in range(MT):
                    if s + j >= t0:
                        out[s + j, r] = simd.hsum(accf, 8 * j)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q5_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray,
          dst: np.ndarray) -> None:
    _mv_k(w, q, d, m, out, dst, 176, 8, simd.q5_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q5_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    _mm_k(w, q, d, m, out, 176, 8, simd.q5_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def few_q5_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, m, out, 176, 8, 2, 4, simd.q5_k_block2, simd.q5_k_block3, simd.q5_k_block4, simd.q5_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def more_q5_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, m, out, 176, 8, 5, 8, simd.q5_k_block5, simd.q5_k_block6, simd.q5_k_block7, simd.q5_k_block8)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q6_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray,
          dst: np.ndarray) -> None:
    _mv_k(w, q, d, b16, out, dst, 210, 16, simd.q6_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q6_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    _mm_k(w, q, d, b16, out, 210, 16, simd.q6_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def few_q6_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, b16, out, 210, 16, 2, 4, simd.q6_k_block2, simd.q6_k_block3, simd.q6_k_block4, simd.q6_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def more_q6_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, b16, out, 210, 16, 5, 8, simd.q6_k_block5, simd.q6_k_block6, simd.q6_k_block7, simd.q6_k_block8)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q2_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray,
          dst: np.ndarray) -> None:
    _mv_k(w, q, d, b16, out, dst, 84, 16, simd.q2_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q2_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    _mm_k(w, q, d, b16, out, 84, 16, simd.q2_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def few_q2_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, b16, out, 84, 16, 2, 4, simd.q2_k_block2, simd.q2_k_block3, simd.q2_k_block4, simd.q2_k_block4)


@njit(cache=True, parallel=True, fastmath={"contract"})
def more_q2_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, b16, out, 84, 16, 5, 8, simd.q2_k_block5, simd.q2_k_block6, simd.q2_k_block7, simd.q2_k_block8)


# ---- Q8_0 and Q4_0 x Q8_0 ----
# block_q8_0: d (fp16), qs[32] (int8): (w + 128) . x - 128 * sum(x) keeps the bytes unsigned for the dot;
# block_q4_0: d, qs[16]: weights d * (nibble - 8): nibble . x - 8 * sum(x). Activations: q, d, s (block sums),
# so a block's d and s are one element each (the drivers' `bpb` is 1, its activation block 32).

@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q8_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray,
          dst: np.ndarray) -> None:
    _mv_k(w, q, d, s, out, dst, 34, 1, simd.q8_0_block1, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q8_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    _mm_k(w, q, d, s, out, 34, 1, simd.q8_0_block4, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def few_q8_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, s, out, 34, 1, 2, 4, simd.q8_0_block2, simd.q8_0_block3, simd.q8_0_block4, simd.q8_0_block4, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def more_q8_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, s, out, 34, 1, 5, 8, simd.q8_0_block5, simd.q8_0_block6, simd.q8_0_block7, simd.q8_0_block8, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q4_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray,
          dst: np.ndarray) -> None:
    _mv_k(w, q, d, s, out, dst, 18, 1, simd.q4_0_block1, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q4_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    _mm_k(w, q, d, s, out, 18, 1, simd.q4_0_block4, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def few_q4_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, s, out, 18, 1, 2, 4, simd.q4_0_block2, simd.q4_0_block3, simd.q4_0_block4, simd.q4_0_block4, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def more_q4_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    _rows_k(w, q, d, s, out, 18, 1, 5, 8, simd.q4_0_block5, simd.q4_0_block6, simd.q4_0_block7, simd.q4_0_block8, 32)


# ---- SwiGLU's gate and up against one activation row ----

@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_q2_k(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
                u: np.ndarray, dg: np.ndarray, du: np.ndarray) -> None:
    _mv_glu(wg, wu, q, d, b, g, u, dg, du, 84, 16, simd.q2_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_q4_k(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
              u: np.ndarray, dg: np.ndarray, du: np.ndarray) -> None:
    _mv_glu(wg, wu, q, d, b, g, u, dg, du, 144, 8, simd.q4_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_q5_k(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
              u: np.ndarray, dg: np.ndarray, du: np.ndarray) -> None:
    _mv_glu(wg, wu, q, d, b, g, u, dg, du, 176, 8, simd.q5_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_q6_k(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
              u: np.ndarray, dg: np.ndarray, du: np.ndarray) -> None:
    _mv_glu(wg, wu, q, d, b, g, u, dg, du, 210, 16, simd.q6_k_block1)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_q8_0(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
              u: np.ndarray, dg: np.ndarray, du: np.ndarray) -> None:
    _mv_glu(wg, wu, q, d, b, g, u, dg, du, 34, 1, simd.q8_0_block1, 32)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_glu_q4_0(wg: np.ndarray, wu: np.ndarray, q: np.ndarray, d: np.ndarray, b: np.ndarray, g: np.ndarray,
              u: np.ndarray, dg: np.ndarray, du: np.ndarray) -> None:
    _mv_glu(wg, wu, q, d, b, g, u, dg, du, 18, 1, simd.q4_0_block1, 32)


# ---- dispatch ----

class Kernels(NamedTuple):
    """A weight type's integer products: its activation format, and the kernels for one activation row, for 2-4 and
    5-8 rows (a decode batch's), and for more (a prompt's)."""
    fmt: QType
    mv: Callable
    few: Callable
    more: Callable
    mm: Callable


KERNELS: dict[QType, Kernels] = {
    QType.Q2_K: Kernels(QType.Q8_K, mv_q2_k, few_q2_k, more_q2_k, mm_q2_k),
    QType.Q4_K: Kernels(QType.Q8_K, mv_q4_k, few_q4_k, more_q4_k, mm_q4_k),
    QType.Q5_K: Kernels(QType.Q8_K, mv_q5_k, few_q5_k, more_q5_k, mm_q5_k),
    QType.Q6_K: Kernels(QType.Q8_K, mv_q6_k, few_q6_k, more_q6_k, mm_q6_k),
    QType.Q8_0: Kernels(QType.Q8_0, mv_q8_0, few_q8_0, more_q8_0, mm_q8_0),
    QType.Q4_0: Kernels(QType.Q8_0, mv_q4_0, few_q4_0, more_q4_0, mm_q4_0),
} if simd.AVAILABLE else {}

def sums_dtype(qtype: QType) -> type:
    """The dtype of the sums `qtype`'s kernels take (the third operand): Q5_K's are float32 (Acts.q8k_m), Q4_K's
    int16 (Acts.q8k_b32)."""
    return {QType.Q5_K: np.float32, QType.Q4_K: np.int16}.get(qtype, np.int32)


# weight type -> the kernel for SwiGLU's gate and up against one row
GLU: dict[QType, Callable] = {QType.Q2_K: mv_glu_q2_k, QType.Q4_K: mv_glu_q4_k, QType.Q5_K: mv_glu_q5_k, QType.Q6_K: mv_glu_q6_k,
                              QType.Q8_0: mv_glu_q8_0, QType.Q4_0: mv_glu_q4_0} if simd.AVAILABLE else {}


NO_FILL = np.zeros((0, 0), dtype=np.uint8)   # a kernel's dst when no arena slot is being filled


def product(w: np.ndarray, qtype: QType, a: Acts, out: np.ndarray, dst: np.ndarray = NO_FILL) -> None:
    """out (rows_x, rows) = the activations bound to `a` times w.T, in integers; `qtype` must be in KERNELS. With
    one activation row, a dst of w's shape (writable bytes) gets w's rows as they are read (else copy w first)."""
    k, T = KERNELS[qtype], a.rows
    if T == 1:
        k.mv(w, *a.operands(qtype), out, dst)
    elif T <= 4:
        k.few(w, *a.operands(qtype), out)
    elif T <= FEW:
        k.more(w, *a.operands(qtype), out)
    else:
        k.mm(w, *a.operands(qtype), out)


def swiglu_product(wg: np.ndarray, wu: np.ndarray, qtype: QType, a: Acts, g: np.ndarray, u: np.ndarray,
                   dg: np.ndarray = NO_FILL, du: np.ndarray = NO_FILL) -> None:
    """g (n, rows) = silu(x . wg.T) * (x . wu.T) for the n <= FEW activation rows bound to `a`, u (n, rows) its
    room for the up product (ggml_vec_swiglu_f32's values, as product then silu_mul give them); `qtype`, both
    matrices', must be in GLU. With one row, gate and up go in one parallel pass, and dg and du (writable, of wg's
    shape) get the weights' rows as they are read; with more, the two products run one after the other (one
    kernel for both would compile for twice as long as the product's)."""
    if a.rows == 1:
        GLU[qtype](wg, wu, *a.operands(qtype), g, u, dg, du)
        return
    if dg.shape[0]:
        raise ValueError("a slot is filled by a one-row SwiGLU only")
    product(wg, qtype, a, g)
    product(wu, qtype, a, u)
    silu_mul(g, u)
