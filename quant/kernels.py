"""Fused products of quantized weight rows with float32 activations: y = W x and Y = X W^T, W never made float.

Modelled on ggml's per-type `ggml_vec_dot_*` (ggml-cpu/quants.c): each block's scales are decoded once and its
quants streamed against the activations, which stay float32 (results match dequantize-then-matmul to float
rounding). Numba kernels, one per type and product, compiled on first use and cached on disk.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .dequant import _f16
from .fp import F16C, bits_f32, e8m0_to_f32_half, f16_hw, f32_bits
from .legacy import KVALUES_IQ4NL
from .types import WEIGHT_TYPES, QType, QTypeLike, QuantError, resolve, row_bytes

F32 = np.float32
U8 = np.uint8
U32 = np.uint32
U64 = np.uint64
LANES = 32  # float32 accumulator lanes per row: four AVX2 registers
GROUP = 256  # weights decoded at a time by the matmul kernels, shared by all activation rows
TILE = 16  # weight rows per matmul task: each slice of the activations is loaded once for all of them
TILE_FLOATS = TILE * GROUP

# matvec needs only contraction (mul+add -> FMA): it keeps one accumulator per lane, so the order of every
# sum is fixed and results do not depend on the thread count. matmul sums each decoded group against many
# activation rows and needs reassociation for LLVM to vectorise those reductions.
_MV_MATH = {"contract"}
_MM_MATH = {"contract", "reassoc"}

# The IQ4_NL codebook as float32 for the matmul decoder (matvec computes it, see _iq4nl).
_IQ4NL_F = KVALUES_IQ4NL.astype(np.float32)
# 2^-s for the field shifts s of the 2-bit quants of Q2_K and Q3_K: a field is taken as (byte & (3 << s))
# and its scale multiplied by 2^-s, which is exact and avoids shifting by a loop variable.
_UNSHIFT = np.float32(2.0) ** -np.arange(8, dtype=np.float32)


@intrinsic
def _stack(typingctx, n, dtype):
    """An uninitialised array of literal length n on the stack. Unlike np.empty it costs nothing, and LLVM
    knows it aliases no argument, so accumulators in it live in vector registers across a whole row."""
    if not isinstance(n, types.IntegerLiteral) or not isinstance(dtype, types.NumberClass):
        return None
    size = n.literal_value
    elt = dtype.instance_type
    arrty = types.Array(elt, 1, "C")

    def codegen(context, builder, sig, args):
        ary = context.make_array(arrty)(context, builder)
        data = cgutils.alloca_once(builder, context.get_value_type(elt), size=size)
        intp = context.get_value_type(types.intp)
        itemsize = context.get_abi_sizeof(context.get_value_type(elt))
        context.populate_array(ary, data=data, shape=[intp(size)], strides=[intp(itemsize)],
                               itemsize=intp(itemsize), meminfo=None)
        return ary._getvalue()

    return arrty(n, dtype), codegen


# ---- scalar helpers: uint8 in, float32 out, written so LLVM keeps the integer work 8 or 32 bits wide ----

@njit(cache=True, inline="always")
def _lo(v: int) -> np.float32:
    return F32(U8(v & U8(15)))


@njit(cache=True, inline="always")
def _hi(v: int) -> np.float32:
    return F32(U8(v >> U8(4)))


@njit(cache=True, inline="always")
def _i8(v: int) -> np.float32:
    return F32(np.int8(v))


@njit(cache=True, inline="always")
def _u32(b: np.ndarray, o: int) -> int:
    return U32(U32(b[o]) | (U32(b[o + 1]) << U32(8)) | (U32(b[o + 2]) << U32(16)) | (U32(b[o + 3]) << U32(24)))


@njit(cache=True, inline="always")
def _q5(nibble: int, qh: np.ndarray, j: int) -> np.float32:
    """A Q5 quant: the 4-bit nibble plus bit j of the bytes qh as its fifth bit (a byte mask test rather than
    a variable shift of a 32-bit word, so that it vectorises in narrow lanes)."""
    return F32(U8(nibble | (U8(16) if qh[j >> 3] & U8(1 << (j & 7)) else U8(0))))


@njit(cache=True, inline="always")
def _f16_bits_to_f32(h: int) -> np.float32:
    """fp16 -> fp32 without a table lookup, so it vectorises; exact for all 65536 patterns (tests check).

    Moving exponent and mantissa into fp32 position and scaling by 2^112 rebiases normals and normalises
    subnormals in one multiply; an all-ones exponent (Inf/NaN) is rebuilt directly."""
    u = U32(h)
    em = U32((u & U32(0x7FFF)) << U32(13))
    f = bits_f32(em) * F32(5.192296858534828e33)
    if (u & U32(0x7C00)) == U32(0x7C00):
        f = bits_f32(em | U32(0x7F800000))
    return bits_f32(f32_bits(f) | U32((u & U32(0x8000)) << U32(16)))


# fp16 as the hot loops read it: F16C's conversion where the CPU has it (the same values, one instruction
# for eight), else the formula above
f16_value = f16_hw if F16C else _f16_bits_to_f32


@njit(cache=True, inline="always")
def _bf16_bits_to_f32(h: int) -> np.float32:
    return bits_f32(U32(h) << U32(16))


@njit(cache=True, inline="always")
def _k4_scales(b: np.ndarray, ds: np.ndarray, ms: np.ndarray, eight: int) -> None:
    """Q4_K/Q5_K: the eight 6-bit scales and mins at b[4:16] (get_scale_min_k4) times d and -dmin.

    Unpacked eight at a time in 64-bit words (as ggml's vec_dot does with its utmp words), so the conversions
    to float run as two 8-wide vector operations; `eight` is 8, passed opaque so LLVM keeps the loop a loop."""
    u0 = U64(_u32(b, 4))
    u1 = U64(_u32(b, 8))
    u2 = U64(_u32(b, 12))
    lo6 = U64(0x3F3F3F3F)
    lo4 = U64(0x0F0F0F0F)
    hi2 = U64(0x30303030)
    q = _stack(2, U64)
    q[0] = (u0 & lo6) | (((u2 & lo4) | ((u0 >> U64(2)) & hi2)) << U64(32))
    q[1] = (u1 & lo6) | ((((u2 >> U64(4)) & lo4) | ((u1 >> U64(2)) & hi2)) << U64(32))
    qb = q.view(U8)
    d = _f16(b, 0)
    dmin = -_f16(b, 2)
    for j in range(eight):
        ds[j] = d * F32(qb[j])
        ms[j] = dmin * F32(qb[8 + j])


@njit(cache=True, inline="always")
def _q3_k_scales(b: np.ndarray, ds: np.ndarray, sixteen: int) -> None:
    """Q3_K: the sixteen 6-bit scales at b[96:108], minus 32, times d; unpacked in 64-bit words like ggml's
    kmask code, then converted sixteen at a time (`sixteen` is 16, opaque to LLVM, as in _k4_scales)."""
    a0 = U64(_u32(b, 96))
    a1 = U64(_u32(b, 100))
    hb = U64(_u32(b, 104))
    lo4 = U64(0x0F0F0F0F)
    lo2 = U64(0x03030303)
    q = _stack(2, U64)
    q[0] = ((a0 & lo4) | ((hb & lo2) << U64(4))) | (((a1 & lo4) | (((hb >> U64(2)) & lo2) << U64(4))) << U64(32))
    q[1] = (((a0 >> U64(4)) & lo4) | (((hb >> U64(4)) & lo2) << U64(4))) | (
        (((a1 >> U64(4)) & lo4) | (((hb >> U64(6)) & lo2) << U64(4))) << U64(32))
    qb = q.view(U8)
    d = _f16(b, 108)
    for j in range(sixteen):
        ds[j] = d * (F32(qb[j]) - F32(32))


@njit(cache=True, inline="always")
def _mv_q8_0(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = _f16(b, 0)
    for l in range(32):
        acc[l] += (d * _i8(b[2 + l])) * xk[l]


@njit(cache=True, inline="always")
def _mv_q4_0(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = _f16(b, 0)
    m = F32(-8) * d
    for l in range(16):
        acc[l] += (d * _lo(b[2 + l]) + m) * xk[l]
        acc[16 + l] += (d * _hi(b[2 + l]) + m) * xk[16 + l]


@njit(cache=True, inline="always")
def _mv_q4_1(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = _f16(b, 0)
    m = _f16(b, 2)
    for l in range(16):
        acc[l] += (d * _lo(b[4 + l]) + m) * xk[l]
        acc[16 + l] += (d * _hi(b[4 + l]) + m) * xk[16 + l]


@njit(cache=True, inline="always")
def _mv_q5_0(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = _f16(b, 0)
    m = F32(-16) * d
    qh = b[2:6]
    for l in range(16):
        acc[l] += (d * _q5(b[6 + l] & U8(15), qh, l) + m) * xk[l]
        acc[16 + l] += (d * _q5(b[6 + l] >> U8(4), qh, l + 16) + m) * xk[16 + l]


@njit(cache=True, inline="always")
def _mv_q5_1(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = _f16(b, 0)
    m = _f16(b, 2)
    qh = b[4:8]
    for l in range(16):
        acc[l] += (d * _q5(b[8 + l] & U8(15), qh, l) + m) * xk[l]
        acc[16 + l] += (d * _q5(b[8 + l] >> U8(4), qh, l + 16) + m) * xk[16 + l]


@njit(cache=True, inline="always")
def _iq4nl(v: int) -> np.float32:
    """KVALUES_IQ4NL[v] without a table lookup, so it vectorises: a quartic through the 16 codebook values
    (least squares, within 0.477 of each) rounded to the nearest integer; tests check all 16 codes."""
    t = F32(U8(v)) - F32(7.5)
    p = (((F32(0.0013247202) * t + F32(0.080958426)) * t + F32(-0.12571198)) * t + F32(11.431296)) * t
    return np.rint(p + F32(-4.2747397))


@njit(cache=True, inline="always")
def _mv_iq4_nl(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = _f16(b, 0)
    for l in range(16):
        v = b[2 + l]
        acc[l] += (d * _iq4nl(v & U8(15))) * xk[l]
        acc[16 + l] += (d * _iq4nl(v >> U8(4))) * xk[16 + l]


@njit(cache=True, inline="always")
def _e2m1(v: int) -> np.float32:
    """KVALUES_MXFP4[v] (fp4 e2m1, doubled) from bits, so it vectorises: magnitude i = v & 7 >= 2 is the
    float32 with bits 0x3F800000 + i << 22 (exponent i >> 1, mantissa bit i & 1), and 0, 1 below that."""
    i = U32(v & U8(7))
    f = bits_f32(U32(U32(0x3F800000) + (i << U32(22))))
    if i < U32(2):
        f = F32(i)
    return bits_f32(f32_bits(f) | U32(U32(v & U8(8)) << U32(28)))


@njit(cache=True, inline="always")
def _mv_mxfp4(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    d = e8m0_to_f32_half(b[0])
    for l in range(16):
        v = b[1 + l]
        acc[l] += (d * _e2m1(v & U8(15))) * xk[l]
        acc[16 + l] += (d * _e2m1(v >> U8(4))) * xk[16 + l]


@njit(cache=True, inline="always")
def _mv_q2_k(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    # layout: scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin
    ds = _stack(16, F32)
    ms = _stack(16, F32)
    d = _f16(b, 80)
    dmin = -_f16(b, 82)
    for i in range(xk.shape[0] // 16):  # 16, opaque to LLVM so that it vectorises the loop
        ds[i] = d * _lo(b[i])
        ms[i] = dmin * _hi(b[i])
    # 2 x 4 chunks, counted from xk's length so that LLVM keeps loops (measured faster here than unrolled)
    for n in range(xk.shape[0] // 128):
        for j in range(xk.shape[0] // 64):
            mask = U8(3 << (2 * j))
            d0 = ds[n * 8 + 2 * j] * _UNSHIFT[2 * j]
            d1 = ds[n * 8 + 2 * j + 1] * _UNSHIFT[2 * j]
            m0 = ms[n * 8 + 2 * j]
            m1 = ms[n * 8 + 2 * j + 1]
            for l in range(16):
                q0 = F32(U8(b[16 + n * 32 + l] & mask))
                q1 = F32(U8(b[32 + n * 32 + l] & mask))
                acc[l] += (d0 * q0 + m0) * xk[n * 128 + j * 32 + l]
                acc[16 + l] += (d1 * q1 + m1) * xk[n * 128 + j * 32 + 16 + l]


@njit(cache=True, inline="always")
def _mv_q3_k(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    # layout: hmask[32], qs[64], scales[12], d; q = 2 low bits + 4 * high bit - 4
    ds = _stack(16, F32)
    _q3_k_scales(b, ds, xk.shape[0] // 16)
    for n in range(2):
        for j in range(4):
            mask = U8(3 << (2 * j))
            hbit = U8(1 << (4 * n + j))
            d0 = ds[n * 8 + 2 * j]
            d1 = ds[n * 8 + 2 * j + 1]
            m0 = F32(-4) * d0
            m1 = F32(-4) * d1
            d0 *= _UNSHIFT[2 * j]
            d1 *= _UNSHIFT[2 * j]
            for l in range(16):
                q0 = F32(U8(b[32 + n * 32 + l] & mask))
                q1 = F32(U8(b[48 + n * 32 + l] & mask))
                acc[l] += (d0 * q0 + (F32(0) if b[l] & hbit else m0)) * xk[n * 128 + j * 32 + l]
                acc[16 + l] += (d1 * q1 + (F32(0) if b[16 + l] & hbit else m1)) * xk[n * 128 + j * 32 + 16 + l]


@njit(cache=True, inline="always")
def _mv_q4_k(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    # layout: d, dmin, scales[12], qs[128]; byte l of chunk c holds sub-block 2c (low) and 2c+1 (high)
    ds = _stack(8, F32)
    ms = _stack(8, F32)
    _k4_scales(b, ds, ms, xk.shape[0] // 32)
    # 4 chunks, counted from xk's length so that LLVM keeps a loop: unrolled, the chunks spill registers
    for c in range(xk.shape[0] // 64):
        d0 = ds[2 * c]
        m0 = ms[2 * c]
        d1 = ds[2 * c + 1]
        m1 = ms[2 * c + 1]
        for l in range(32):
            v = b[16 + c * 32 + l]
            acc[l] += (d0 * _lo(v) + m0) * xk[c * 64 + l]
            acc[l] += (d1 * _hi(v) + m1) * xk[c * 64 + 32 + l]


@njit(cache=True, inline="always")
def _mv_q5_k(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    # layout: d, dmin, scales[12], qh[32], qs[128]; the fifth bit of sub-block s sits at bit s of qh[l]
    ds = _stack(8, F32)
    ms = _stack(8, F32)
    _k4_scales(b, ds, ms, xk.shape[0] // 32)
    for c in range(4):
        d0 = ds[2 * c]
        m0 = ms[2 * c]
        d1 = ds[2 * c + 1]
        m1 = ms[2 * c + 1]
        for l in range(32):
            v = b[48 + c * 32 + l]
            h = b[16 + l]
            q0 = _lo(v) + F32(U8(((h >> U8(2 * c)) & U8(1)) << U8(4)))
            q1 = _hi(v) + F32(U8(((h >> U8(2 * c + 1)) & U8(1)) << U8(4)))
            acc[l] += (d0 * q0 + m0) * xk[c * 64 + l]
            acc[l] += (d1 * q1 + m1) * xk[c * 64 + 32 + l]


@njit(cache=True, inline="always")
def _mv_q6_k(acc: np.ndarray, b: np.ndarray, xk: np.ndarray) -> None:
    # layout: ql[128], qh[64], scales[16] (int8), d; q = (4 low bits | 2 high bits << 4) - 32
    ds = _stack(16, F32)
    d = _f16(b, 208)
    for i in range(xk.shape[0] // 16):  # 16, opaque to LLVM so that it vectorises the loop
        ds[i] = d * _i8(b[192 + i])
    for n in range(2):
        for g in range(4):
            sl = U8(4 * (g >> 1))
            sh = U8(2 * g)
            lo = 64 * n + (g & 1) * 32
            d0 = ds[n * 8 + 2 * g]
            d1 = ds[n * 8 + 2 * g + 1]
            m0 = F32(-32) * d0
            m1 = F32(-32) * d1
            for l in range(16):
                q0 = F32(U8(((b[lo + l] >> sl) & U8(15)) | (((b[128 + 32 * n + l] >> sh) & U8(3)) << U8(4))))
                q1 = F32(U8(((b[lo + 16 + l] >> sl) & U8(15)) | (((b[144 + 32 * n + l] >> sh) & U8(3)) << U8(4))))
                acc[l] += (d0 * q0 + m0) * xk[n * 128 + g * 32 + l]
                acc[16 + l] += (d1 * q1 + m1) * xk[n * 128 + g * 32 + 16 + l]


@njit(cache=True, inline="always")
def _matvec_rows(w: np.ndarray, x: np.ndarray, out: np.ndarray, blk: Callable, bs: int, ts: int) -> None:
    """out[r] = row r of w (blocks of bs weights in ts bytes) . x, one row per parallel task."""
    nb = x.shape[0] // bs
    for r in prange(w.shape[0]):
        acc = _stack(LANES, F32)
        for l in range(LANES):
            acc[l] = F32(0)
        for k in range(nb):
            blk(acc, w[r, k * ts:k * ts + ts], x[k * bs:k * bs + bs])
        s = F32(0)
        for l in range(LANES):
            s += acc[l]
        out[r] = s


@njit(cache=True, inline="always")
def _matvec_float_rows(w: np.ndarray, x: np.ndarray, out: np.ndarray, cvt: Callable) -> None:
    """As _matvec_rows for one-element "blocks" (w holds 16- or 32-bit floats), with a tail when n % 32."""
    n = x.shape[0]
    n32 = n - n % LANES
    for r in prange(w.shape[0]):
        acc = _stack(LANES, F32)
        for l in range(LANES):
            acc[l] = F32(0)
        for k in range(0, n32, LANES):
            wk = w[r, k:k + LANES]
            xk = x[k:k + LANES]
            for l in range(LANES):
                acc[l] += cvt(wk[l]) * xk[l]
        s = F32(0)
        for l in range(LANES):
            s += acc[l]
        for j in range(n32, n):
            s += cvt(w[r, j]) * x[j]
        out[r] = s


@njit(cache=True, inline="always")
def _f32_id(v: np.float32) -> np.float32:
    return v


# ---- block decoders for matmul: y[0:bs] = the block's weights ----
# Some inner loops take their count from y's length (always bs) instead of a constant: LLVM then vectorises
# them as loops rather than unrolling them into scalar code. Which form is faster was measured per type.

@njit(cache=True, inline="always")
def _dq_q8_0(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    for l in range(y.shape[0]):
        y[l] = d * _i8(b[2 + l])


@njit(cache=True, inline="always")
def _dq_q4_0(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    m = F32(-8) * d
    for l in range(y.shape[0] // 2):
        y[l] = d * _lo(b[2 + l]) + m
        y[16 + l] = d * _hi(b[2 + l]) + m


@njit(cache=True, inline="always")
def _dq_q4_1(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    m = _f16(b, 2)
    for l in range(y.shape[0] // 2):
        y[l] = d * _lo(b[4 + l]) + m
        y[16 + l] = d * _hi(b[4 + l]) + m


@njit(cache=True, inline="always")
def _dq_q5_0(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    m = F32(-16) * d
    qh = b[2:6]
    for l in range(16):
        y[l] = d * _q5(b[6 + l] & U8(15), qh, l) + m
        y[16 + l] = d * _q5(b[6 + l] >> U8(4), qh, l + 16) + m


@njit(cache=True, inline="always")
def _dq_q5_1(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    m = _f16(b, 2)
    qh = b[4:8]
    for l in range(16):
        y[l] = d * _q5(b[8 + l] & U8(15), qh, l) + m
        y[16 + l] = d * _q5(b[8 + l] >> U8(4), qh, l + 16) + m


@njit(cache=True, inline="always")
def _dq_iq4_nl(b: np.ndarray, y: np.ndarray) -> None:
    d = _f16(b, 0)
    for l in range(16):
        y[l] = d * _IQ4NL_F[b[2 + l] & U8(15)]
        y[16 + l] = d * _IQ4NL_F[b[2 + l] >> U8(4)]


@njit(cache=True, inline="always")
def _dq_mxfp4(b: np.ndarray, y: np.ndarray) -> None:
    d = e8m0_to_f32_half(b[0])
    for l in range(16):
        y[l] = d * _e2m1(b[1 + l] & U8(15))
        y[16 + l] = d * _e2m1(b[1 + l] >> U8(4))


@njit(cache=True, inline="always")
def _dq_q2_k(b: np.ndarray, y: np.ndarray) -> None:
    ds = _stack(16, F32)
    ms = _stack(16, F32)
    d = _f16(b, 80)
    dmin = -_f16(b, 82)
    sixteen = y.shape[0] // 16
    for i in range(sixteen):
        ds[i] = d * _lo(b[i])
        ms[i] = dmin * _hi(b[i])
    for i in range(sixteen):
        n, j, h = i >> 3, (i >> 1) & 3, i & 1
        mask = U8(3 << (2 * j))
        dl = ds[i] * _UNSHIFT[2 * j]
        ml = ms[i]
        src = b[16 + n * 32 + h * 16:32 + n * 32 + h * 16]
        dst = y[16 * i:16 * i + 16]
        for l in range(sixteen):
            dst[l] = dl * F32(U8(src[l] & mask)) + ml


@njit(cache=True, inline="always")
def _dq_q3_k(b: np.ndarray, y: np.ndarray) -> None:
    ds = _stack(16, F32)
    sixteen = y.shape[0] // 16
    _q3_k_scales(b, ds, sixteen)
    for i in range(sixteen):
        n, j, h = i >> 3, (i >> 1) & 3, i & 1
        mask = U8(3 << (2 * j))
        hbit = U8(1 << (4 * n + j))
        ml = F32(-4) * ds[i]
        dl = ds[i] * _UNSHIFT[2 * j]
        src = b[32 + n * 32 + h * 16:48 + n * 32 + h * 16]
        hm = b[h * 16:h * 16 + 16]
        dst = y[16 * i:16 * i + 16]
        for l in range(sixteen):
            dst[l] = dl * F32(U8(src[l] & mask)) + (F32(0) if hm[l] & hbit else ml)


@njit(cache=True, inline="always")
def _dq_q4_k(b: np.ndarray, y: np.ndarray) -> None:
    ds = _stack(8, F32)
    ms = _stack(8, F32)
    _k4_scales(b, ds, ms, y.shape[0] // 32)
    for c in range(4):
        for l in range(y.shape[0] // 8):
            v = b[16 + c * 32 + l]
            y[c * 64 + l] = ds[2 * c] * _lo(v) + ms[2 * c]
            y[c * 64 + 32 + l] = ds[2 * c + 1] * _hi(v) + ms[2 * c + 1]


@njit(cache=True, inline="always")
def _dq_q5_k(b: np.ndarray, y: np.ndarray) -> None:
    ds = _stack(8, F32)
    ms = _stack(8, F32)
    _k4_scales(b, ds, ms, y.shape[0] // 32)
    for c in range(4):
        for l in range(y.shape[0] // 8):
            v = b[48 + c * 32 + l]
            h = b[16 + l]
            q0 = _lo(v) + F32(U8(((h >> U8(2 * c)) & U8(1)) << U8(4)))
            q1 = _hi(v) + F32(U8(((h >> U8(2 * c + 1)) & U8(1)) << U8(4)))
            y[c * 64 + l] = ds[2 * c] * q0 + ms[2 * c]
            y[c * 64 + 32 + l] = ds[2 * c + 1] * q1 + ms[2 * c + 1]


@njit(cache=True, inline="always")
def _dq_q6_k(b: np.ndarray, y: np.ndarray) -> None:
    ds = _stack(16, F32)
    d = _f16(b, 208)
    sixteen = y.shape[0] // 16
    for i in range(sixteen):
        ds[i] = d * _i8(b[192 + i])
    for i in range(sixteen):
        n, g, h = i >> 3, (i >> 1) & 3, i & 1
        sl = U8(4 * (g >> 1))
        sh = U8(2 * g)
        ml = F32(-32) * ds[i]
        lo = b[64 * n + (g & 1) * 32 + h * 16:64 * n + (g & 1) * 32 + h * 16 + 16]
        hi = b[128 + 32 * n + h * 16:144 + 32 * n + h * 16]
        dst = y[16 * i:16 * i + 16]
        for l in range(sixteen):
            dst[l] = ds[i] * F32(U8(((lo[l] >> sl) & U8(15)) | (((hi[l] >> sh) & U8(3)) << U8(4)))) + ml


@njit(cache=True, inline="always")
def _dot_tile(buf: np.ndarray, X: np.ndarray, out: np.ndarray, r0: int, nr: int, e0: int, ne: int) -> None:
    """out[t, r0 + i] += buf[i * GROUP:][:ne] . X[t, e0:e0 + ne] for i < nr and every activation row t.

    In 4 x 2 tiles (weight rows x activation rows): eight sums share each load, so the loop runs at FMA
    speed rather than load speed. An odd last activation row is paired with itself."""
    m = X.shape[0]
    for t in range(0, m, 2):
        u = min(t + 1, m - 1)
        x0 = X[t, e0:e0 + ne]
        x1 = X[u, e0:e0 + ne]
        i = 0
        while i < nr:
            if i + 4 <= nr:
                b0 = buf[i * GROUP:i * GROUP + ne]
                b1 = buf[(i + 1) * GROUP:(i + 1) * GROUP + ne]
                b2 = buf[(i + 2) * GROUP:(i + 2) * GROUP + ne]
                b3 = buf[(i + 3) * GROUP:(i + 3) * GROUP + ne]
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = F32(0)
                for l in range(ne):
                    a = x0[l]
                    c = x1[l]
                    s00 += b0[l] * a
                    s01 += b1[l] * a
                    s02 += b2[l] * a
                    s03 += b3[l] * a
                    s10 += b0[l] * c
                    s11 += b1[l] * c
                    s12 += b2[l] * c
                    s13 += b3[l] * c
                out[t, r0 + i] += s00
                out[t, r0 + i + 1] += s01
                out[t, r0 + i + 2] += s02
                out[t, r0 + i + 3] += s03
                if u > t:
                    out[u, r0 + i] += s10
                    out[u, r0 + i + 1] += s11
                    out[u, r0 + i + 2] += s12
                    out[u, r0 + i + 3] += s13
                i += 4
            else:
                b0 = buf[i * GROUP:i * GROUP + ne]
                s00 = s10 = F32(0)
                for l in range(ne):
                    s00 += b0[l] * x0[l]
                    s10 += b0[l] * x1[l]
                out[t, r0 + i] += s00
                if u > t:
                    out[u, r0 + i] += s10
                i += 1


@njit(cache=True, inline="always")
def _matmul_rows(w: np.ndarray, X: np.ndarray, out: np.ndarray, dq: Callable, bs: int, ts: int) -> None:
    """out[t, r] = row r of w . X[t]. Each parallel task takes TILE rows; each group of 256 weights of those
    rows is decoded once into a stack buffer and dotted with every activation row, so the weights are read
    once per call whatever the batch, and each slice of X once per TILE rows."""
    rows = w.shape[0]
    nb = X.shape[1] // bs
    gb = GROUP // bs
    for rt in prange((rows + TILE - 1) // TILE):
        buf = _stack(TILE_FLOATS, F32)
        r0 = rt * TILE
        nr = min(TILE, rows - r0)
        for t in range(X.shape[0]):
            for i in range(nr):
                out[t, r0 + i] = F32(0)
        for k0 in range(0, nb, gb):
            nk = min(gb, nb - k0)
            for i in range(nr):
                for j in range(nk):
                    k = k0 + j
                    dq(w[r0 + i, k * ts:k * ts + ts], buf[i * GROUP + j * bs:i * GROUP + j * bs + bs])
            _dot_tile(buf, X, out, r0, nr, k0 * bs, nk * bs)


@njit(cache=True, inline="always")
def _matmul_float_rows(w: np.ndarray, X: np.ndarray, out: np.ndarray, cvt: Callable) -> None:
    """_matmul_rows for the float types, whose rows need no block decoding, only conversion."""
    rows = w.shape[0]
    n = X.shape[1]
    for rt in prange((rows + TILE - 1) // TILE):
        buf = _stack(TILE_FLOATS, F32)
        r0 = rt * TILE
        nr = min(TILE, rows - r0)
        for t in range(X.shape[0]):
            for i in range(nr):
                out[t, r0 + i] = F32(0)
        for e0 in range(0, n, GROUP):
            ne = min(GROUP, n - e0)
            for i in range(nr):
                wk = w[r0 + i, e0:e0 + ne]
                for l in range(ne):
                    buf[i * GROUP + l] = cvt(wk[l])
            _dot_tile(buf, X, out, r0, nr, e0, ne)


# ---- one compiled kernel per type and product (a kernel compiles on its first call) ----

@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_f32(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_float_rows(w, x, out, _f32_id)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_f16(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_float_rows(w, x, out, f16_value)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_bf16(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_float_rows(w, x, out, _bf16_bits_to_f32)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q8_0(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q8_0, 32, 34)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q4_0(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q4_0, 32, 18)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q4_1(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q4_1, 32, 20)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q5_0(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q5_0, 32, 22)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q5_1(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q5_1, 32, 24)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_iq4_nl(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_iq4_nl, 32, 18)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_mxfp4(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_mxfp4, 32, 17)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q2_k(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q2_k, 256, 84)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q3_k(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q3_k, 256, 110)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q4_k(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q4_k, 256, 144)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q5_k(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q5_k, 256, 176)


@njit(cache=True, parallel=True, fastmath=_MV_MATH)
def _matvec_q6_k(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    _matvec_rows(w, x, out, _mv_q6_k, 256, 210)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_f32(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_float_rows(w, X, out, _f32_id)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_f16(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_float_rows(w, X, out, f16_value)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_bf16(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_float_rows(w, X, out, _bf16_bits_to_f32)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q8_0(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q8_0, 32, 34)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q4_0(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q4_0, 32, 18)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q4_1(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q4_1, 32, 20)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q5_0(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q5_0, 32, 22)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q5_1(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q5_1, 32, 24)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_iq4_nl(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_iq4_nl, 32, 18)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_mxfp4(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_mxfp4, 32, 17)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q2_k(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q2_k, 256, 84)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q3_k(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q3_k, 256, 110)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q4_k(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q4_k, 256, 144)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q5_k(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q5_k, 256, 176)


@njit(cache=True, parallel=True, fastmath=_MM_MATH)
def _matmul_q6_k(w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    _matmul_rows(w, X, out, _dq_q6_k, 256, 210)


MATVEC = {
    QType.F32: _matvec_f32, QType.F16: _matvec_f16, QType.BF16: _matvec_bf16,
    QType.Q8_0: _matvec_q8_0, QType.Q4_0: _matvec_q4_0, QType.Q4_1: _matvec_q4_1,
    QType.Q5_0: _matvec_q5_0, QType.Q5_1: _matvec_q5_1, QType.IQ4_NL: _matvec_iq4_nl, QType.MXFP4: _matvec_mxfp4,
    QType.Q2_K: _matvec_q2_k, QType.Q3_K: _matvec_q3_k, QType.Q4_K: _matvec_q4_k,
    QType.Q5_K: _matvec_q5_k, QType.Q6_K: _matvec_q6_k,
}
MATMUL = {
    QType.F32: _matmul_f32, QType.F16: _matmul_f16, QType.BF16: _matmul_bf16,
    QType.Q8_0: _matmul_q8_0, QType.Q4_0: _matmul_q4_0, QType.Q4_1: _matmul_q4_1,
    QType.Q5_0: _matmul_q5_0, QType.Q5_1: _matmul_q5_1, QType.IQ4_NL: _matmul_iq4_nl, QType.MXFP4: _matmul_mxfp4,
    QType.Q2_K: _matmul_q2_k, QType.Q3_K: _matmul_q3_k, QType.Q4_K: _matmul_q4_k,
    QType.Q5_K: _matmul_q5_k, QType.Q6_K: _matmul_q6_k,
}
assert set(MATVEC) == set(MATMUL) == set(WEIGHT_TYPES)

# Element views of the float types' row bytes, so their kernels index elements, not bytes.
_FLOAT_VIEW = {QType.F32: np.float32, QType.F16: np.uint16, QType.BF16: np.uint16}


def _weights(w: np.ndarray, t: QType, n: int) -> np.ndarray:
    """Validate w against n weights per row; return a read-only C-contiguous view in the kernel's element type.

    Read-only views give every caller (writable arrays, read-only memmaps) the same compiled specialisation."""
    if not isinstance(w, np.ndarray):
        raise QuantError(f"weights must be a numpy uint8 array, not {type(w).__name__}")
    if w.dtype != np.uint8:
        raise QuantError(f"weights must be uint8 bytes of {t.name} blocks, not {w.dtype}; use .view(np.uint8)")
    if w.ndim != 2:
        raise QuantError(f"weights must be 2-d (rows, bytes per row), not {w.ndim}-d with shape {w.shape}")
    rb = row_bytes(t, n)
    if w.shape[1] != rb:
        raise QuantError(
            f"weights have {w.shape[1]} bytes per row, but {n} {t.name} weights take {rb}: "
            f"the activation length or the type does not match the matrix"
        )
    w = np.ascontiguousarray(w)
    if t in _FLOAT_VIEW:
        w = w.view(_FLOAT_VIEW[t])
    w = w.view()
    w.flags.writeable = False
    return w


def prepare_weights(w: np.ndarray, qtype: QTypeLike, n: int) -> np.ndarray:
    """The validated kernel view of weights w with n columns, for callers that reuse it (the engine)."""
    return _weights(w, _weight_type(qtype), n)


def _activations(x: np.ndarray, ndim: int, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise QuantError(f"{name} must be a numpy float32 array, not {type(x).__name__}")
    if x.dtype != np.float32:
        raise QuantError(f"{name} must be float32, not {x.dtype}; convert with .astype(np.float32)")
    if x.ndim != ndim:
        raise QuantError(f"{name} must be {ndim}-d, not {x.ndim}-d with shape {x.shape}")
    x = np.ascontiguousarray(x).view()
    x.flags.writeable = False
    return x


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        desc = f"{out.dtype} array of shape {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise QuantError(f"out must be a float32 array of shape {shape}, not a {desc}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise QuantError("out must be C-contiguous and writable")
    return out


def _weight_type(qtype: QTypeLike) -> QType:
    t = resolve(qtype)
    if t not in MATVEC:
        raise QuantError(f"{t.name} is an activation format, not a weight type; weight types: "
                         f"{', '.join(x.name for x in WEIGHT_TYPES)}")
    return t


def matvec(w: np.ndarray, qtype: QTypeLike, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """dequantize(w) @ x for uint8 rows w (rows, row_bytes) of `qtype` and float32 x (n,); returns float32 (rows,).

    Pass `out` (float32, (rows,)) to write the result there instead of allocating."""
    t = _weight_type(qtype)
    x = _activations(x, 1, "x")
    w = _weights(w, t, x.shape[0])
    out = _output(out, (w.shape[0],))
    MATVEC[t](w, x, out)
    return out


def matmul(w: np.ndarray, qtype: QTypeLike, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """X @ dequantize(w).T for uint8 rows w (rows, row_bytes) of `qtype` and float32 X (m, n); returns (m, rows).

    The weights are streamed once for the whole batch; a single activation row takes the matvec kernel."""
    t = _weight_type(qtype)
    X = _activations(X, 2, "X")
    w = _weights(w, t, X.shape[1])
    out = _output(out, (X.shape[0], w.shape[0]))
    if X.shape[0] == 1:
        MATVEC[t](w, X[0], out[0])
    elif X.shape[0]:
        MATMUL[t](w, X, out)
    return out


__all__ = ["MATMUL", "MATVEC", "matmul", "matvec", "prepare_weights"]
