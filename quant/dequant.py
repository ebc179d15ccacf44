"""Numba dequantizers for every supported type, bit-identical to `gguf.quants.dequantize`.

Each block function evaluates the same float32 expressions in the same order as gguf-py's numpy
code (which mirrors `dequantize_row_*` in ggml-quants.c), so results agree to the last bit.
"""
from __future__ import annotations

import numpy as np
from typing import Callable

from numba import njit, prange

from .fp import F16_TO_F32, bits_f32, e8m0_to_f32_half
from .legacy import KVALUES_IQ4NL, KVALUES_MXFP4
from .types import QType, block_size, type_size

F32 = np.float32


@njit(cache=True, inline="always")
def _f16(b: np.ndarray, o: int) -> np.float32:
    return F16_TO_F32[np.int64(b[o]) | (np.int64(b[o + 1]) << 8)]


@njit(cache=True, inline="always")
def scale_min_k4(j: int, q: np.ndarray, o: int) -> tuple[int, int]:
    """6-bit scale and min of sub-block j from the 12 packed bytes at q[o:] (get_scale_min_k4)."""
    if j < 4:
        return np.int64(q[o + j] & 63), np.int64(q[o + j + 4] & 63)
    sc = np.int64(q[o + j + 4] & 0xF) | (np.int64(q[o + j - 4] >> 6) << 4)
    m = np.int64(q[o + j + 4] >> 4) | (np.int64(q[o + j] >> 6) << 4)
    return sc, m


@njit(cache=True)
def dq_f32(b: np.ndarray, y: np.ndarray) -> None:
    for j in range(y.shape[0]):
        u = np.uint32(b[4 * j]) | (np.uint32(b[4 * j + 1]) << 8) | (np.uint32(b[4 * j + 2]) << 16) | (np.uint32(b[4 * j + 3]) << 24)
        y[j] = bits_f32(u)


@njit(cache=True)
def dq_f16(b: np.ndarray, y: np.ndarray) -> None:
    for j in range(y.shape[0]):
        y[j] = _f16(b, 2 * j)


@njit(cache=True)
def dq_bf16(b: np.ndarray, y: np.ndarray) -> None:
    for j in range(y.shape[0]):
        y[j] = bits_f32((np.uint32(b[2 * j]) << 16) | (np.uint32(b[2 * j + 1]) << 24))


@njit(cache=True)
def dq_q4_0(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    for j in range(16):
        y[j] = d * F32(np.int8((b[2 + j] & 0xF)) - 8)
        y[j + 16] = d * F32(np.int8((b[2 + j] >> 4)) - 8)


@njit(cache=True)
def dq_q4_1(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    m = _f16(b, 2)
    for j in range(16):
        y[j] = d * F32(b[4 + j] & 0xF) + m
        y[j + 16] = d * F32(b[4 + j] >> 4) + m


@njit(cache=True)
def dq_q5_0(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    qh = np.uint32(b[2]) | (np.uint32(b[3]) << 8) | (np.uint32(b[4]) << 16) | (np.uint32(b[5]) << 24)
    for j in range(16):
        h0 = (qh >> j) & 1
        h1 = (qh >> (j + 16)) & 1
        y[j] = d * F32(np.int64((b[6 + j] & 0xF) | (h0 << 4)) - 16)
        y[j + 16] = d * F32(np.int64((b[6 + j] >> 4) | (h1 << 4)) - 16)


@njit(cache=True)
def dq_q5_1(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    m = _f16(b, 2)
    qh = np.uint32(b[4]) | (np.uint32(b[5]) << 8) | (np.uint32(b[6]) << 16) | (np.uint32(b[7]) << 24)
    for j in range(16):
        h0 = (qh >> j) & 1
        h1 = (qh >> (j + 16)) & 1
        y[j] = d * F32((b[8 + j] & 0xF) | (h0 << 4)) + m
        y[j + 16] = d * F32((b[8 + j] >> 4) | (h1 << 4)) + m


@njit(cache=True)
def dq_q8_0(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    for j in range(32):
        y[j] = F32(np.int8(b[2 + j])) * d


@njit(cache=True)
def dq_q2_k(b: np.ndarray, y: np.ndarray) -> None:
    # layout: scales[16] qs[64] d dmin
    d = _f16(b, 80)
    dmin = _f16(b, 82)
    for e in range(256):
        k = e // 16
        sc = b[k]
        dl = d * F32(sc & 0xF)
        ml = dmin * F32(sc >> 4)
        n = e // 128
        j = (e % 128) // 32
        q = (b[16 + n * 32 + e % 32] >> (2 * j)) & 3
        y[e] = dl * F32(q) - ml


@njit(cache=True)
def dq_q3_k(b: np.ndarray, y: np.ndarray) -> None:
    # layout: hmask[32] qs[64] scales[12] d
    d = _f16(b, 108)
    for e in range(256):
        k = e // 16
        lo = np.int64(b[96 + k] & 0xF) if k < 8 else np.int64(b[96 + k - 8] >> 4)
        hi = (np.int64(b[104 + k % 4]) >> (2 * (k // 4))) & 3
        dl = d * F32(np.int64(lo | (hi << 4)) - 32)
        n = e // 128
        j = (e % 128) // 32
        l = e % 32
        ql = (b[32 + n * 32 + l] >> (2 * j)) & 3
        h = (b[l] >> (n * 4 + j)) & 1
        y[e] = dl * F32(np.int64(ql) - ((h ^ 1) << 2))


@njit(cache=True)
def dq_q4_k(b: np.ndarray, y: np.ndarray) -> None:
    # layout: d dmin scales[12] qs[128]
    d = _f16(b, 0)
    dmin = _f16(b, 2)
    for c in range(4):
        for hi in range(2):
            sc, m = scale_min_k4(2 * c + hi, b, 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            for l in range(32):
                q = (b[16 + c * 32 + l] >> (4 * hi)) & 0xF
                y[c * 64 + hi * 32 + l] = d1 * F32(q) - m1


@njit(cache=True)
def dq_q5_k(b: np.ndarray, y: np.ndarray) -> None:
    # layout: d dmin scales[12] qh[32] qs[128]
    d = _f16(b, 0)
    dmin = _f16(b, 2)
    for c in range(4):
        for hi in range(2):
            sc, m = scale_min_k4(2 * c + hi, b, 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            for l in range(32):
                q = ((b[48 + c * 32 + l] >> (4 * hi)) & 0xF) | (((b[16 + l] >> (2 * c + hi)) & 1) << 4)
                y[c * 64 + hi * 32 + l] = d1 * F32(q) - m1


@njit(cache=True)
def dq_q6_k(b: np.ndarray, y: np.ndarray) -> None:
    # layout: ql[128] qh[64] scales[16] (int8) d
    d = _f16(b, 208)
    for e in range(256):
        n = e // 128
        g = (e % 128) // 32
        l = e % 32
        ql = (b[64 * n + (g & 1) * 32 + l] >> (4 * (g >> 1))) & 0xF
        qh = (b[128 + 32 * n + l] >> (2 * g)) & 3
        dl = d * F32(np.int8(b[192 + e // 16]))
        y[e] = dl * F32(np.int64(ql | (qh << 4)) - 32)


@njit(cache=True)
def dq_q8_k(b: np.ndarray, y: np.ndarray) -> None:
    # layout: float d, int8 qs[256], int16 bsums[16] (dequantize_row_q8_K)
    d = bits_f32(np.uint32(b[0]) | (np.uint32(b[1]) << 8) | (np.uint32(b[2]) << 16) | (np.uint32(b[3]) << 24))
    for j in range(256):
        y[j] = d * F32(np.int8(b[4 + j]))


@njit(cache=True)
def dq_iq4_nl(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    for j in range(16):
        y[j] = d * F32(KVALUES_IQ4NL[b[2 + j] & 0xF])
        y[j + 16] = d * F32(KVALUES_IQ4NL[b[2 + j] >> 4])


@njit(cache=True)
def dq_mxfp4(b: np.ndarray, y: np.ndarray) -> None:
    d = e8m0_to_f32_half(b[0])
    for j in range(16):
        y[j] = d * F32(KVALUES_MXFP4[b[1 + j] & 0xF])
        y[j + 16] = d * F32(KVALUES_MXFP4[b[1 + j] >> 4])


# Dispatch codes for the single cached driver below (an if-chain compiles once; closures would not cache).
_ORDER = (
    QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_K, QType.IQ4_NL, QType.MXFP4,
)
_CODE = {t: i for i, t in enumerate(_ORDER)}


@njit(cache=True, inline="always")
def _dq_block(code: int, b: np.ndarray, y: np.ndarray) -> None:
    if code == 0:
        dq_f32(b, y)
    elif code == 1:
        dq_f16(b, y)
    elif code == 2:
        dq_bf16(b, y)
    elif code == 3:
        dq_q4_0(b, y)
    elif code == 4:
        dq_q4_1(b, y)
    elif code == 5:
        dq_q5_0(b, y)
    elif code == 6:
        dq_q5_1(b, y)
    elif code == 7:
        dq_q8_0(b, y)
    elif code == 8:
        dq_q2_k(b, y)
    elif code == 9:
        dq_q3_k(b, y)
    elif code == 10:
        dq_q4_k(b, y)
    elif code == 11:
        dq_q5_k(b, y)
    elif code == 12:
        dq_q6_k(b, y)
    elif code == 13:
        dq_q8_k(b, y)
    elif code == 14:
        dq_iq4_nl(b, y)
    else:
        dq_mxfp4(b, y)


@njit(cache=True, parallel=True)
def _dequant_blocks(raw: np.ndarray, out: np.ndarray, code: int, ts: int, bs: int) -> None:
    for i in prange(out.shape[0] // bs):
        _dq_block(code, raw[i * ts:(i + 1) * ts], out[i * bs:(i + 1) * bs])


@njit(cache=True, inline="always")
def _rows(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int, dq: Callable) -> None:
    for t in range(ids.shape[0]):
        r = ids[t]
        if r < 0 or r >= raw.shape[0]:
            raise IndexError("row index out of range")
        for i in range(out.shape[1] // bs):
            dq(raw[r, i * ts:(i + 1) * ts], out[t, i * bs:(i + 1) * bs])


# One row kernel per type (an embedding lookup compiles its own type's decoder only).
@njit(cache=True)
def _rows_f32(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_f32)


@njit(cache=True)
def _rows_f16(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_f16)


@njit(cache=True)
def _rows_bf16(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_bf16)


@njit(cache=True)
def _rows_q4_0(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q4_0)


@njit(cache=True)
def _rows_q4_1(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q4_1)


@njit(cache=True)
def _rows_q5_0(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q5_0)


@njit(cache=True)
def _rows_q5_1(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q5_1)


@njit(cache=True)
def _rows_q8_0(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q8_0)


@njit(cache=True)
def _rows_q2_k(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q2_k)


@njit(cache=True)
def _rows_q3_k(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q3_k)


@njit(cache=True)
def _rows_q4_k(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q4_k)


@njit(cache=True)
def _rows_q5_k(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q5_k)


@njit(cache=True)
def _rows_q6_k(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q6_k)


@njit(cache=True)
def _rows_q8_k(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_q8_k)


@njit(cache=True)
def _rows_iq4_nl(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_iq4_nl)


@njit(cache=True)
def _rows_mxfp4(raw: np.ndarray, ids: np.ndarray, out: np.ndarray, ts: int, bs: int) -> None:
    _rows(raw, ids, out, ts, bs, dq_mxfp4)


def dequantize_flat(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """Dequantize a flat uint8 buffer of whole blocks into a new flat float32 array (the float types by
    numpy: exact, and nothing to compile for a model's norms and routers)."""
    if qtype == QType.F32:
        return raw.view("<f4").astype(np.float32)
    if qtype == QType.F16:
        return raw.view("<f2").astype(np.float32)
    if qtype == QType.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    ts, bs = type_size(qtype), block_size(qtype)
    if bs == 1 and raw.size % (ts * 256) == 0:
        ts, bs = ts * 256, 256  # group scalars so each parallel task does real work
    out = np.empty(raw.size // ts * bs, dtype=np.float32)
    _dequant_blocks(raw, out, _CODE[qtype], ts, bs)
    return out


def dequantize_rows(raw: np.ndarray, qtype: QType, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[t] = the dequantized row ids[t] of raw (rows, row_bytes), without allocating (an embedding
    lookup); out is float32 (len(ids), cols), ids int64. An id outside [0, rows) raises IndexError."""
    ts, bs = type_size(qtype), block_size(qtype)
    if bs == 1:
        ts, bs = ts * out.shape[1], out.shape[1]  # a float row is one "block"
    _ROWS[qtype](raw, ids, out, ts, bs)
    return out


_ROWS = {t: globals()[f"_rows_{t.name.lower()}"] for t in _ORDER}
