"""Reference quantizers for the 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4.

Byte-identical to llama.cpp's `quantize_q*` entry points without an importance matrix (what
`llama-quantize` runs): `quantize_row_*_ref` in ggml-quants.c, except IQ4_NL, whose entry point
`quantize_iq4_nl` searches 7 scales either side (ntry=7). All arithmetic is float32 in C order.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .fp import e8m0_to_f32_half, f32_to_f16

QK = 32
F32 = np.float32
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
GROUP_MAX_EPS = F32(1e-15)


@njit(cache=True, inline="always")
def _put_f16(out: np.ndarray, o: int, v: float) -> None:
    h = f32_to_f16(v)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8


@njit(cache=True, inline="always")
def _roundf(v: float) -> float:
    """C roundf (half away from zero); exact in float64 for float32 inputs."""
    a = math.floor(abs(float(v)) + 0.5)
    return -a if v < 0 else a


@njit(cache=True, inline="always")
def _absmax_signed(x: np.ndarray, s: int, n: int) -> float:
    """Value of largest magnitude, first one on ties (the `amax < fabsf(v)` scan)."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(n):
        v = x[s + j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax


@njit(cache=True)
def _q4_0_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    vmax = _absmax_signed(x, s, QK)
    d = F32(vmax / F32(-8.0))
    idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    _put_f16(out, o, d)
    for j in range(QK // 2):
        x0 = F32(x[s + j] * idd)
        x1 = F32(x[s + QK // 2 + j] * idd)
        q0 = min(15, int(F32(x0 + F32(8.5))))
        q1 = min(15, int(F32(x1 + F32(8.5))))
        out[o + 2 + j] = q0 | (q1 << 4)


@njit(cache=True)
def _q4_1_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    vmin = F32(np.finfo(np.float32).max)
    vmax = F32(-np.finfo(np.float32).max)
    for j in range(QK):
        v = x[s + j]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    d = F32(F32(vmax - vmin) / F32(15.0))
    idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    _put_f16(out, o, d)
    _put_f16(out, o + 2, vmin)
    for j in range(QK // 2):
        x0 = F32(F32(x[s + j] - vmin) * idd)
        x1 = F32(F32(x[s + QK // 2 + j] - vmin) * idd)
        q0 = min(15, int(F32(x0 + F32(0.5))))
        q1 = min(15, int(F32(x1 + F32(0.5))))
        out[o + 4 + j] = q0 | (q1 << 4)


@njit(cache=True)
def _q5_0_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    vmax = _absmax_signed(x, s, QK)
    d = F32(vmax / F32(-16.0))
    idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    _put_f16(out, o, d)
    qh = 0
    for j in range(QK // 2):
        x0 = F32(x[s + j] * idd)
        x1 = F32(x[s + QK // 2 + j] * idd)
        q0 = min(31, int(F32(x0 + F32(16.5))))
        q1 = min(31, int(F32(x1 + F32(16.5))))
        out[o + 6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
        qh |= ((q0 & 0x10) >> 4) << j
        qh |= ((q1 & 0x10) >> 4) << (j + QK // 2)
    for k in range(4):
        out[o + 2 + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True)
def _q5_1_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    vmin = F32(np.finfo(np.float32).max)
    vmax = F32(-np.finfo(np.float32).max)
    for j in range(QK):
        v = x[s + j]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    d = F32(F32(vmax - vmin) / F32(31.0))
    idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    _put_f16(out, o, d)
    _put_f16(out, o + 2, vmin)
    qh = 0
    for j in range(QK // 2):
        x0 = F32(F32(x[s + j] - vmin) * idd)
        x1 = F32(F32(x[s + QK // 2 + j] - vmin) * idd)
        q0 = int(F32(x0 + F32(0.5))) & 0xFF
        q1 = int(F32(x1 + F32(0.5))) & 0xFF
        out[o + 8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
        qh |= ((q0 & 0x10) >> 4) << j
        qh |= ((q1 & 0x10) >> 4) << (j + QK // 2)
    for k in range(4):
        out[o + 4 + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True)
def _q8_0_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    amax = F32(0.0)
    for j in range(QK):
        amax = max(amax, abs(x[s + j]))
    d = F32(amax / F32(127.0))
    idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    _put_f16(out, o, d)
    for j in range(QK):
        out[o + 2 + j] = np.uint8(np.int8(_roundf(F32(x[s + j] * idd))))


@njit(cache=True, inline="always")
def _best_index_int8(values: np.ndarray, v: float) -> int:
    """Nearest entry of a sorted int8 table by bisection (best_index_int8 in ggml-quants.c)."""
    n = values.shape[0]
    if v <= values[0]:
        return 0
    if v >= values[n - 1]:
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < values[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if F32(v - F32(values[mu - 1])) < F32(F32(values[mu]) - v) else mu


@njit(cache=True)
def _iq4_nl_block(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray) -> None:
    """quantize_row_iq4_nl_impl with super_block_size = block_size = 32, no weights, ntry = 7."""
    values = KVALUES_IQ4NL
    ntry = 7
    for j in range(QK // 2):
        out[o + 2 + j] = 0
    scale = F32(0.0)
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(QK):
        ax = abs(x[s + j])
        if ax > amax:
            amax = ax
            vmax = x[s + j]
    if not amax < GROUP_MAX_EPS:
        d = F32(-vmax / F32(values[0]))
        idd = F32(F32(1.0) / d)
        sumqx = F32(0.0)
        sumq2 = F32(0.0)
        for j in range(QK):
            xj = x[s + j]
            q = F32(values[_best_index_int8(values, F32(idd * xj))])
            w = F32(xj * xj)
            sumqx += F32(F32(w * q) * xj)
            sumq2 += F32(F32(w * q) * q)
        d = F32(sumqx / sumq2) if sumq2 > 0 else F32(0.0)
        best = F32(d * sumqx)
        for itry in range(-ntry, ntry + 1):
            idd = F32(F32(itry + values[0]) / vmax)
            sumqx = F32(0.0)
            sumq2 = F32(0.0)
            for j in range(QK):
                xj = x[s + j]
                q = F32(values[_best_index_int8(values, F32(idd * xj))])
                w = F32(xj * xj)
                sumqx += F32(F32(w * q) * xj)
                sumq2 += F32(F32(w * q) * q)
            if sumq2 > 0 and F32(sumqx * sumqx) > F32(best * sumq2):
                d = F32(sumqx / sumq2)
                best = F32(d * sumqx)
        scale = d
    _put_f16(out, o, scale)
    idd = F32(F32(1.0) / scale) if scale != 0 else F32(0.0)
    for j in range(QK):
        L[j] = _best_index_int8(values, F32(idd * x[s + j]))
    for j in range(QK // 2):
        out[o + 2 + j] = L[j] | (L[16 + j] << 4)


@njit(cache=True, inline="always")
def _best_index_mxfp4(v: float, e: float) -> int:
    best = 0
    best_err = abs(F32(F32(KVALUES_MXFP4[0]) * e) - v)
    for i in range(1, 16):
        err = abs(F32(F32(KVALUES_MXFP4[i]) * e) - v)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(cache=True)
def _mxfp4_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    amax = F32(0.0)
    for j in range(QK):
        if amax < abs(x[s + j]):
            amax = abs(x[s + j])
    e = 0
    if amax > 0:
        # floorf(log2f(amax)) - 2 + 127, truncated to uint8 as C does
        e = int(F32(F32(math.floor(F32(math.log2(float(amax))))) - F32(2.0) + F32(127.0))) & 0xFF
    d = e8m0_to_f32_half(e)
    out[o] = e
    for j in range(QK // 2):
        q0 = _best_index_mxfp4(x[s + j], d)
        q1 = _best_index_mxfp4(x[s + QK // 2 + j], d)
        out[o + 1 + j] = q0 | (q1 << 4)


@njit(cache=True, parallel=True)
def quantize_rows_q4_0(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK):
            _q4_0_block(x[r], b * QK, out[r], b * 18)


@njit(cache=True, parallel=True)
def quantize_rows_q4_1(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK):
            _q4_1_block(x[r], b * QK, out[r], b * 20)


@njit(cache=True, parallel=True)
def quantize_rows_q5_0(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK):
            _q5_0_block(x[r], b * QK, out[r], b * 22)


@njit(cache=True, parallel=True)
def quantize_rows_q5_1(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK):
            _q5_1_block(x[r], b * QK, out[r], b * 24)


@njit(cache=True, parallel=True)
def quantize_rows_q8_0(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK):
            _q8_0_block(x[r], b * QK, out[r], b * 34)


@njit(cache=True, parallel=True)
def quantize_rows_iq4_nl(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        L = np.empty(QK, dtype=np.uint8)
        for b in range(x.shape[1] // QK):
            _iq4_nl_block(x[r], b * QK, out[r], b * 18, L)


@njit(cache=True, parallel=True)
def quantize_rows_mxfp4(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK):
            _mxfp4_block(x[r], b * QK, out[r], b * 17)
