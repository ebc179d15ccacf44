"""Integer products of quantized weights with quantized activations: ggml-cpu's vec_dot_type scheme.

Activations are quantized once per matrix input, to Q8_K (256-element blocks, a float32 scale, sums per
16 and per 32) for the K-quants and to Q8_0 (32-element blocks, an fp16-rounded scale, a sum per block) for
the 32-element types, exactly as llama.cpp's x86 code does (quantize_row_q8_K, and quantize_row_q8_0's
AVX2 path: 127/amax, rounded to nearest even). Each weight block is then dotted with the activation block
in integer arithmetic (quant/simd.py) and scaled once per block in float, as in ggml's
ggml_vec_dot_*_q8_K / _q8_0. The activations' error is llama.cpp's own, so results follow llama.cpp's
rather than the float kernels' (kernels.py), which stay for the other types and for CPUs without AVX2.

One kernel per type and shape: `mv` for one activation row (accumulators in registers), `mm` for several,
in tiles of 4 rows x 4 activation rows, each weight block decoded once per tile.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numba import njit, prange

from . import simd
from .fp import f32_round_f16, nearest_int
from .kernels import _stack
from .fp import F16_TO_F32
from .kquants import _signed_absmax
from .types import QType

F32, I32, U8, U64 = np.float32, np.int32, np.uint8, np.uint64
MR = 4   # weight rows per matmul tile
MT = 4   # activation rows per matmul tile (unrolled: their accumulators stay in registers)
LANES = 8 * MT  # accumulator lanes per matmul tile
CHAINS1 = 32    # a K-quant block's integer sums in four chains of 8 lanes, for one activation row
CHAINS = 32 * MT  # ... for a tile of MT rows


class Acts:
    """Activations (up to n_rows x n) and their Q8_K and Q8_0 forms, preallocated; `bind` points it at new
    float32 values, and each form is made on first use by a kernel that needs it."""

    def __init__(self, n_rows: int, n: int) -> None:
        self.n = n
        self.q8k = np.zeros((n_rows, n), np.int8)
        self.q8k_d = np.zeros((n_rows, max(n // 256, 1)), np.float32)
        self.q8k_b16 = np.zeros((n_rows, max(n // 16, 1)), np.int32)
        self.q8k_b32 = np.zeros((n_rows, max(n // 32, 1)), np.int32)
        self.q80 = np.zeros((n_rows, n), np.int8)
        self.q80_d = np.zeros((n_rows, max(n // 32, 1)), np.float32)
        self.q80_s = np.zeros((n_rows, max(n // 32, 1)), np.int32)
        self.x: np.ndarray | None = None
        self.rows = 0
        self.have_q8k = self.have_q80 = False

    def bind(self, x: np.ndarray) -> "Acts":
        """Use float32 x (rows, n), C-contiguous; forms are remade when asked for."""
        self.x, self.rows = x, x.shape[0]
        self.have_q8k = self.have_q80 = False
        return self

    def need(self, fmt: QType) -> None:
        if fmt == QType.Q8_K and not self.have_q8k:
            r = self.rows
            quantize_q8_k(self.x, self.q8k[:r], self.q8k_d[:r], self.q8k_b16[:r], self.q8k_b32[:r])
            self.have_q8k = True
        elif fmt == QType.Q8_0 and not self.have_q80:
            r = self.rows
            quantize_q8_0(self.x, self.q80[:r], self.q80_d[:r], self.q80_s[:r])
            self.have_q80 = True


# ---- activation quantizers ----

@njit(cache=True)
def quantize_q8_k(x: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, b32: np.ndarray) -> None:
    """Rows of x (T, n) to Q8_K as quantize_row_q8_K: per 256 block iscale = -127 / (the value of largest
    magnitude), q = min(127, nearest_int(iscale * x)), d = 1 / iscale; plus sums per 16 and 32 quants."""
    for t in range(x.shape[0]):
        for k in range(x.shape[1] // 256):
            s = k * 256
            vmax, amax = _signed_absmax(x[t], s, 256)
            if amax == 0:
                for j in range(256):
                    q[t, s + j] = 0
                for j in range(16):
                    b16[t, k * 16 + j] = 0
                for j in range(8):
                    b32[t, k * 8 + j] = 0
                d[t, k] = 0
                continue
            iscale = F32(F32(-127.0) / vmax)
            for j in range(256):
                q[t, s + j] = min(127, nearest_int(F32(iscale * x[t, s + j])))
            for j in range(16):
                total = 0
                for i in range(16):
                    total += q[t, s + 16 * j + i]
                b16[t, k * 16 + j] = total
            for j in range(8):
                b32[t, k * 8 + j] = b16[t, k * 16 + 2 * j] + b16[t, k * 16 + 2 * j + 1]
            d[t, k] = F32(1.0) / iscale


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


# ---- helpers over a weight row given as (w, r, byte offset) ----

@njit(cache=True, inline="always")
def _u32(w: np.ndarray, r: int, o: int) -> int:
    return U64(w[r, o]) | (U64(w[r, o + 1]) << U64(8)) | (U64(w[r, o + 2]) << U64(16)) | (U64(w[r, o + 3]) << U64(24))


@njit(cache=True, inline="always")
def _h(w: np.ndarray, r: int, o: int) -> np.float32:
    """The fp16 at bytes o, o+1 of row r (indexed in place: a row slice would cost a reference count)."""
    return F16_TO_F32[np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8)]


@njit(cache=True, inline="always")
def _k4_scales(w: np.ndarray, r: int, o: int) -> tuple[int, int]:
    """Q4_K / Q5_K: the eight 6-bit scales and the eight 6-bit mins at bytes o+4..o+16, one per byte of a uint64
    each (ggml's utmp / kmask unpacking)."""
    u0, u1, u2 = _u32(w, r, o + 4), _u32(w, r, o + 8), _u32(w, r, o + 12)
    lo6, lo4, hi2 = U64(0x3F3F3F3F), U64(0x0F0F0F0F), U64(0x30303030)
    sc = (u0 & lo6) | (((u2 & lo4) | ((u0 >> U64(2)) & hi2)) << U64(32))
    mn = (u1 & lo6) | ((((u2 >> U64(4)) & lo4) | ((u1 >> U64(2)) & hi2)) << U64(32))
    return sc, mn


@njit(cache=True, inline="always")
def _byte(v: int, i: int) -> int:
    return np.int64((v >> U64(8 * i)) & U64(255))


# ---- Q4_K x Q8_K ----
# block_q4_K: d, dmin (fp16), scales[12], qs[128]; byte l of chunk c holds sub-block 2c (low nibble) and 2c+1

@njit(cache=True, inline="always")
def _q4_k_block(acc: np.ndarray, accm: np.ndarray, accf: np.ndarray, j: int, w: np.ndarray, r: int, o: int,
                q: np.ndarray, qo: int, b32: np.ndarray, bo: int, dx: float, sc: int, mn: int) -> None:
    """One block into token j's accumulators: acc[32j:32j+32] (four chains), accm[8j:], accf[8j:]."""
    base = r * w.shape[1] + o + 16
    for c in range(4):
        simd.madd_u4(acc, 32 * j + 8 * c, w, base + 32 * c, 0, q, qo + 64 * c, _byte(sc, 2 * c))
        simd.madd_u4(acc, 32 * j + 8 * c, w, base + 32 * c, 4, q, qo + 64 * c + 32, _byte(sc, 2 * c + 1))
    simd.mul_u8x8(accm, 8 * j, mn, b32, bo)
    simd.fma4_reset(accf, 8 * j, acc, 32 * j, dx * _h(w, r, o))
    simd.fma_reset(accf, 8 * j, accm, 8 * j, -(dx * _h(w, r, o + 2)))


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q4_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b32: np.ndarray, out: np.ndarray) -> None:
    """out[r] = row r of Q4_K w . the Q8_K activation row (q, d, b32 of shape (1, .)); out (1, rows)."""
    nb = w.shape[1] // 144
    for r in prange(w.shape[0]):
        acc, accm, accf = _stack(CHAINS1, I32), _stack(8, I32), _stack(8, F32)
        for l in range(CHAINS1):
            acc[l] = 0
        for l in range(8):
            acc[l] = 0
            accm[l] = 0
            accf[l] = 0
        for k in range(nb):
            sc, mn = _k4_scales(w, r, k * 144)
            _q4_k_block(acc, accm, accf, 0, w, r, k * 144, q, k * 256, b32, k * 8, d[0, k], sc, mn)
        out[0, r] = simd.hsum(accf, 0)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q4_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b32: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = row r of Q4_K w . activation row t, for activations (T, .); tiles of MR rows x MT rows."""
    rows, nb, T = w.shape[0], w.shape[1] // 144, q.shape[0]
    n, n32 = q.shape[1], b32.shape[1]
    for rt in prange((rows + MR - 1) // MR):
        acc, accm, accf = _stack(CHAINS, I32), _stack(LANES, I32), _stack(LANES, F32)
        for l in range(CHAINS):
            acc[l] = 0
        for t0 in range(0, T, MT):
            for r in range(rt * MR, min(rt * MR + MR, rows)):
                for l in range(LANES):
                    acc[l] = 0
                    accm[l] = 0
                    accf[l] = 0
                for k in range(nb):
                    sc, mn = _k4_scales(w, r, k * 144)
                    for j in range(MT):
                        t = min(t0 + j, T - 1)   # past the last row: recompute it, stored never
                        _q4_k_block(acc, accm, accf, j, w, r, k * 144, q, t * n + k * 256, b32, t * n32 + k * 8,
                                    d[t, k], sc, mn)
                for j in range(min(MT, T - t0)):
                    out[t0 + j, r] = simd.hsum(accf, 8 * j)


# ---- Q5_K x Q8_K ----
# block_q5_K: d, dmin, scales[12], qh[32], qs[128]; the fifth bit of sub-block s sits at bit s of qh[l]

@njit(cache=True, inline="always")
def _q5_k_block(acc: np.ndarray, accm: np.ndarray, accf: np.ndarray, j: int, w: np.ndarray, r: int, o: int,
                q: np.ndarray, qo: int, b32: np.ndarray, bo: int, dx: float, sc: int, mn: int) -> None:
    base = r * w.shape[1] + o
    for c in range(4):
        simd.madd_u5(acc, 32 * j + 8 * c, w, base + 48 + 32 * c, 0, w, base + 16, 2 * c, q, qo + 64 * c,
                     _byte(sc, 2 * c))
        simd.madd_u5(acc, 32 * j + 8 * c, w, base + 48 + 32 * c, 4, w, base + 16, 2 * c + 1, q, qo + 64 * c + 32,
                     _byte(sc, 2 * c + 1))
    simd.mul_u8x8(accm, 8 * j, mn, b32, bo)
    simd.fma4_reset(accf, 8 * j, acc, 32 * j, dx * _h(w, r, o))
    simd.fma_reset(accf, 8 * j, accm, 8 * j, -(dx * _h(w, r, o + 2)))


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q5_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b32: np.ndarray, out: np.ndarray) -> None:
    nb = w.shape[1] // 176
    for r in prange(w.shape[0]):
        acc, accm, accf = _stack(CHAINS1, I32), _stack(8, I32), _stack(8, F32)
        for l in range(CHAINS1):
            acc[l] = 0
        for l in range(8):
            acc[l] = 0
            accm[l] = 0
            accf[l] = 0
        for k in range(nb):
            sc, mn = _k4_scales(w, r, k * 176)
            _q5_k_block(acc, accm, accf, 0, w, r, k * 176, q, k * 256, b32, k * 8, d[0, k], sc, mn)
        out[0, r] = simd.hsum(accf, 0)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q5_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b32: np.ndarray, out: np.ndarray) -> None:
    rows, nb, T = w.shape[0], w.shape[1] // 176, q.shape[0]
    n, n32 = q.shape[1], b32.shape[1]
    for rt in prange((rows + MR - 1) // MR):
        acc, accm, accf = _stack(CHAINS, I32), _stack(LANES, I32), _stack(LANES, F32)
        for l in range(CHAINS):
            acc[l] = 0
        for t0 in range(0, T, MT):
            for r in range(rt * MR, min(rt * MR + MR, rows)):
                for l in range(LANES):
                    acc[l] = 0
                    accm[l] = 0
                    accf[l] = 0
                for k in range(nb):
                    sc, mn = _k4_scales(w, r, k * 176)
                    for j in range(MT):
                        t = min(t0 + j, T - 1)
                        _q5_k_block(acc, accm, accf, j, w, r, k * 176, q, t * n + k * 256, b32, t * n32 + k * 8,
                                    d[t, k], sc, mn)
                for j in range(min(MT, T - t0)):
                    out[t0 + j, r] = simd.hsum(accf, 8 * j)


# ---- Q6_K x Q8_K ----
# block_q6_K: ql[128], qh[64], scales[16] (int8), d; q = (4 low bits | 2 high bits << 4) - 32, and the -32
# is taken out through the activations' sums per 16: sum(sc * (q6 . x)) - 32 * sum(sc * b16)

@njit(cache=True, inline="always")
def _q6_k_block(acc: np.ndarray, accf: np.ndarray, j: int, w: np.ndarray, r: int, o: int, q: np.ndarray, qo: int,
                b16: np.ndarray, bo: int, dx: float) -> np.float32:
    """Adds the block's scaled sums to accf[8j:] and returns its -32 correction (to subtract)."""
    base = r * w.shape[1] + o
    for n in range(2):
        for g in range(4):   # 32 quants: ql nibble (g >> 1) of bytes 64n + 32(g & 1).., qh bits 2g.. of bytes 32n..
            sa = np.int64(np.int8(w[r, o + 192 + 8 * n + 2 * g]))
            sb = np.int64(np.int8(w[r, o + 192 + 8 * n + 2 * g + 1]))
            simd.madd_u6(acc, 32 * j + 8 * g, w, base + 64 * n + 32 * (g & 1), 4 * (g >> 1), w, base + 128 + 32 * n,
                         2 * g, q, qo + 128 * n + 32 * g, sa, sb)
    m = 0
    for i in range(16):
        m += np.int64(np.int8(w[r, o + 192 + i])) * b16[bo + i]
    dd = dx * _h(w, r, o + 208)
    simd.fma4_reset(accf, 8 * j, acc, 32 * j, dd)
    return dd * F32(32 * m)


@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q6_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    nb = w.shape[1] // 210
    b16f = b16.reshape(-1)
    for r in prange(w.shape[0]):
        acc, accf = _stack(CHAINS1, I32), _stack(8, F32)
        for l in range(CHAINS1):
            acc[l] = 0
        for l in range(8):
            acc[l] = 0
            accf[l] = 0
        corr = F32(0)
        for k in range(nb):
            corr += _q6_k_block(acc, accf, 0, w, r, k * 210, q, k * 256, b16f, k * 16, d[0, k])
        out[0, r] = simd.hsum(accf, 0) - corr


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q6_k(w: np.ndarray, q: np.ndarray, d: np.ndarray, b16: np.ndarray, out: np.ndarray) -> None:
    rows, nb, T = w.shape[0], w.shape[1] // 210, q.shape[0]
    n, n16 = q.shape[1], b16.shape[1]
    b16f = b16.reshape(-1)
    for rt in prange((rows + MR - 1) // MR):
        acc, accf, corr = _stack(CHAINS, I32), _stack(LANES, F32), _stack(MT, F32)
        for l in range(CHAINS):
            acc[l] = 0
        for t0 in range(0, T, MT):
            for r in range(rt * MR, min(rt * MR + MR, rows)):
                for l in range(LANES):
                    acc[l] = 0
                    accf[l] = 0
                for j in range(MT):
                    corr[j] = 0
                for k in range(nb):
                    for j in range(MT):
                        t = min(t0 + j, T - 1)
                        corr[j] += _q6_k_block(acc, accf, j, w, r, k * 210, q, t * n + k * 256, b16f,
                                               t * n16 + k * 16, d[t, k])
                for j in range(min(MT, T - t0)):
                    out[t0 + j, r] = simd.hsum(accf, 8 * j) - corr[j]


# ---- Q8_0 x Q8_0 ----
# block_q8_0: d (fp16), qs[32] (int8); (w + 128) . x - 128 * sum(x) keeps the bytes unsigned for the dot

@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q8_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    nb = w.shape[1] // 34
    for r in prange(w.shape[0]):
        acc, accf = _stack(8, I32), _stack(8, F32)
        for l in range(8):
            acc[l] = 0
            accf[l] = 0
        corr = F32(0)
        for k in range(nb):
            simd.dot_s8(acc, 0, w, r * w.shape[1] + k * 34 + 2, q, k * 32)
            dd = _h(w, r, k * 34) * d[0, k]
            simd.fma_reset(accf, 0, acc, 0, dd)
            corr += dd * F32(s[0, k])
        out[0, r] = simd.hsum(accf, 0) - F32(128) * corr


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q8_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    rows, nb, T, n = w.shape[0], w.shape[1] // 34, q.shape[0], q.shape[1]
    for rt in prange((rows + MR - 1) // MR):
        acc, accf, corr = _stack(LANES, I32), _stack(LANES, F32), _stack(MT, F32)
        for t0 in range(0, T, MT):
            for r in range(rt * MR, min(rt * MR + MR, rows)):
                for l in range(LANES):
                    acc[l] = 0
                    accf[l] = 0
                for j in range(MT):
                    corr[j] = 0
                for k in range(nb):
                    dw = _h(w, r, k * 34)
                    for j in range(MT):
                        t = min(t0 + j, T - 1)
                        simd.dot_s8(acc, 8 * j, w, r * w.shape[1] + k * 34 + 2, q, t * n + k * 32)
                        dd = dw * d[t, k]
                        simd.fma_reset(accf, 8 * j, acc, 8 * j, dd)
                        corr[j] += dd * F32(s[t, k])
                for j in range(min(MT, T - t0)):
                    out[t0 + j, r] = simd.hsum(accf, 8 * j) - F32(128) * corr[j]


# ---- Q4_0 x Q8_0 ----
# block_q4_0: d (fp16), qs[16]: weights d * (nibble - 8); nibble . x - 8 * sum(x)

@njit(cache=True, parallel=True, fastmath={"contract"})
def mv_q4_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    nb = w.shape[1] // 18
    for r in prange(w.shape[0]):
        acc, accf = _stack(8, I32), _stack(8, F32)
        for l in range(8):
            acc[l] = 0
            accf[l] = 0
        corr = F32(0)
        for k in range(nb):
            simd.dot_u4x16(acc, 0, w, r * w.shape[1] + k * 18 + 2, q, k * 32)
            dd = _h(w, r, k * 18) * d[0, k]
            simd.fma_reset(accf, 0, acc, 0, dd)
            corr += dd * F32(s[0, k])
        out[0, r] = simd.hsum(accf, 0) - F32(8) * corr


@njit(cache=True, parallel=True, fastmath={"contract"})
def mm_q4_0(w: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray) -> None:
    rows, nb, T, n = w.shape[0], w.shape[1] // 18, q.shape[0], q.shape[1]
    for rt in prange((rows + MR - 1) // MR):
        acc, accf, corr = _stack(LANES, I32), _stack(LANES, F32), _stack(MT, F32)
        for t0 in range(0, T, MT):
            for r in range(rt * MR, min(rt * MR + MR, rows)):
                for l in range(LANES):
                    acc[l] = 0
                    accf[l] = 0
                for j in range(MT):
                    corr[j] = 0
                for k in range(nb):
                    dw = _h(w, r, k * 18)
                    for j in range(MT):
                        t = min(t0 + j, T - 1)
                        simd.dot_u4x16(acc, 8 * j, w, r * w.shape[1] + k * 18 + 2, q, t * n + k * 32)
                        dd = dw * d[t, k]
                        simd.fma_reset(accf, 8 * j, acc, 8 * j, dd)
                        corr[j] += dd * F32(s[t, k])
                for j in range(min(MT, T - t0)):
                    out[t0 + j, r] = simd.hsum(accf, 8 * j) - F32(8) * corr[j]


# ---- dispatch ----

# weight type -> (activation format, kernel for one row, kernel for several)
KERNELS: dict[QType, tuple[QType, Callable, Callable]] = {
    QType.Q4_K: (QType.Q8_K, mv_q4_k, mm_q4_k),
    QType.Q5_K: (QType.Q8_K, mv_q5_k, mm_q5_k),
    QType.Q6_K: (QType.Q8_K, mv_q6_k, mm_q6_k),
    QType.Q8_0: (QType.Q8_0, mv_q8_0, mm_q8_0),
    QType.Q4_0: (QType.Q8_0, mv_q4_0, mm_q4_0),
} if simd.AVAILABLE else {}


def product(w: np.ndarray, qtype: QType, a: Acts, out: np.ndarray) -> None:
    """out (rows_x, rows) = the activations bound to `a` times w.T, in integers; `qtype` must be in KERNELS."""
    fmt, mv, mm = KERNELS[qtype]
    a.need(fmt)
    r = a.rows
    if fmt == QType.Q8_K:
        args = (a.q8k[:r], a.q8k_d[:r], a.q8k_b16[:r] if qtype == QType.Q6_K else a.q8k_b32[:r])
    else:
        args = (a.q80[:r], a.q80_d[:r], a.q80_s[:r])
    (mv if r == 1 else mm)(w, *args, out)
