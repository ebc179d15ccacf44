"""Fused dequantize-and-multiply kernels for NVIDIA GPUs, in Numba's CUDA target: y = W x and Y = X W^T.

The weights stay on the device as their GGML bytes (uint8 rows, F32 rows as float32, F16/BF16 rows as
uint16) and are decoded inside the kernels, with the same per-block semantics as the CPU kernels in
kernels.py and the reference dequantizers in dequant.py (block layouts: ggml-common.h).

Design (one kernel per type and product, all built by `_build` from a per-type block decoder):
  * one warp per weight row, WARPS rows per thread block (blockDim = (32, WARPS); LANES below);
  * a row is split into "parts" of PW contiguous weights (8 for the 32-weight blocks, 16 - one scale
    sub-block - for the 256-weight K-quant super-blocks, 1 for the float types); lane l takes parts
    l, l + 32, ..., so a warp reads a contiguous stretch of the row per step;
  * each part is decoded into a per-thread array and dotted with x; the 32 lane sums are combined with
    a warp-shuffle tree (shfl_down 16, 8, 4, 2, 1) and lane 0 writes the result.
  * The GEMM kernel does the same, decoding each part once per MT activation rows.
Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) has no warp shuffles, so there `_warp_sum` is emulated
through shared memory, summing in the same order; everything else runs the same code.

`numba.cuda` is imported defensively: this module imports (and `available()` answers False) on machines
with neither a GPU nor the simulator.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .kernels import _activations, _weight_type, prepare_weights
from .legacy import KVALUES_IQ4NL, KVALUES_MXFP4
from .types import QType, QTypeLike, QuantError, block_size, row_bytes, type_size

try:  # numba without its CUDA target, or a broken CUDA install, must not break `import hotcold.quant.cuda`
    from numba import config as _config
    from numba import cuda
    _SIM = bool(_config.ENABLE_CUDASIM)
except Exception:  # pragma: no cover - depends on the machine
    cuda = None
    _SIM = False

F32 = np.float32
WARPS = 4   # weight rows (warps) per thread block
# Lanes per row: a warp on the GPU. The simulator runs every thread as a Python thread, so there a row
# gets 4 lanes (each taking 8x the parts): same code and decoding, an eighth of the threads.
LANES = 4 if _SIM else 32
MT = 4      # activation rows each GEMM pass accumulates per decoded part
PWMAX = 16  # largest part: one 16-weight sub-block of a K-quant

# Lookup tables, frozen into the kernels as constant arrays.
_IQ4NL = KVALUES_IQ4NL.astype(np.float32)
_MXFP4 = KVALUES_MXFP4.astype(np.float32)
_E8M0_HALF = (2.0 ** (np.arange(256) - 128.0)).astype(np.float32)    # ggml_e8m0_to_fp32_half
_BF16_POW2 = (2.0 ** (np.arange(256) - 134.0)).astype(np.float32)    # 2^(e - 127 - 7)


def _identity(f: Callable) -> Callable:
    return f


_device: Callable = cuda.jit(device=True) if cuda is not None else _identity
_kernel: Callable = cuda.jit if cuda is not None else _identity


def available() -> bool:
    """True when the kernels can run: a CUDA GPU with its driver, or Numba's simulator (NUMBA_ENABLE_CUDASIM=1)."""
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def simulated() -> bool:
    """True when numba.cuda is the CPU simulator rather than a GPU."""
    return _SIM


# ---- warp reduction ----

if _SIM:
    @_device
    def _warp_sum(v: float) -> float:
        """The shuffle tree below, emulated: the simulator has no warp shuffles. Every thread of the block
        publishes its value to shared memory; lane 0 then replays the tree (same order, same result) on
        the warp's LANES values. Two barriers rather than ten, as each costs much in the simulator; they need
        uniform control flow, which the kernels keep."""
        buf = cuda.shared.array((WARPS, LANES), np.float32)
        w, lane = cuda.threadIdx.y, cuda.threadIdx.x
        cuda.syncthreads()  # the previous call's reads are done
        buf[w, lane] = v
        cuda.syncthreads()
        if lane == 0:
            t = buf[w].copy()
            off = LANES // 2
            while off > 0:
                for l in range(off):
                    t[l] += t[l + off]
                off >>= 1
            v = t[0]
        return v
else:
    @_device
    def _warp_sum(v: float) -> float:
        """Sum of v over the warp's 32 lanes, valid in lane 0: a shfl_down tree (16, 8, 4, 2, 1)."""
        off = 16
        while off > 0:
            v += cuda.shfl_down_sync(0xFFFFFFFF, v, off)
            off >>= 1
        return v


# ---- scalar decoding: bytes are widened to int32 first so no 8-bit arithmetic can wrap ----

@_device
def _half(h: int) -> np.float32:
    """IEEE fp16 bit pattern -> float32, exactly, by arithmetic (device code has no bit casts here):
    (1024 + m) * 2^(e - 25) for normals, m * 2^-24 for subnormals; both products are exact in float32."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        f = F32(np.inf) if m == 0 else F32(np.nan)
    else:
        if e == 0:
            e = 1
        else:
            m |= 0x400
        f = F32(m) * F32(1 << e) * F32(2.0 ** -25)
    return -f if h & 0x8000 else f


@_device
def _bf16(h: int) -> np.float32:
    """bfloat16 bit pattern -> float32: (128 + m) * 2^(e - 134), exact, via a power-of-two table."""
    e = (h >> 7) & 0xFF
    m = h & 0x7F
    if e == 0xFF:
        f = F32(np.inf) if m == 0 else F32(np.nan)
    else:
        if e == 0:
            e = 1
        else:
            m |= 0x80
        f = F32(m) * _BF16_POW2[e]
    return -f if h & 0x8000 else f


@_device
def _u8(w: Any, r: int, o: int) -> int:
    return np.int32(w[r, o])


@_device
def _i8(v: int) -> int:
    return v - ((v & 0x80) << 1)


@_device
def _f16(w: Any, r: int, o: int) -> np.float32:
    """The little-endian fp16 at bytes o, o + 1 of row r (ggml_half)."""
    return _half(_u8(w, r, o) | (_u8(w, r, o + 1) << 8))


@_device
def _scale_min_k4(w: Any, r: int, o: int, j: int) -> tuple[int, int]:
    """6-bit scale and min of sub-block j from the 12 packed bytes at o (get_scale_min_k4)."""
    if j < 4:
        return _u8(w, r, o + j) & 63, _u8(w, r, o + j + 4) & 63
    sc = (_u8(w, r, o + j + 4) & 0xF) | ((_u8(w, r, o + j - 4) >> 6) << 4)
    mn = (_u8(w, r, o + j + 4) >> 4) | ((_u8(w, r, o + j) >> 6) << 4)
    return sc, mn


# ---- part decoders: wv[0:PW] = weights [p*PW, (p+1)*PW) of the block at byte (or element) o of row r ----

@_device
def _dq_f32(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    wv[0] = w[r, o]


@_device
def _dq_f16(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    wv[0] = _half(np.int32(w[r, o]))


@_device
def _dq_bf16(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    wv[0] = _bf16(np.int32(w[r, o]))


@_device
def _dq_q8_0(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q8_0: d, qs[32] (int8)
    d = _f16(w, r, o)
    for i in range(8):
        wv[i] = d * F32(_i8(_u8(w, r, o + 2 + 8 * p + i)))


@_device
def _nibble(w: Any, r: int, o: int, j: int) -> int:
    """Quant j < 32 of a 16-byte nibble array at o: low nibbles hold 0..15, high nibbles 16..31."""
    v = _u8(w, r, o + (j & 15))
    return (v >> 4) if j >= 16 else (v & 0xF)


@_device
def _qh_bit(w: Any, r: int, o: int, j: int) -> int:
    """Bit j of the little-endian 32-bit qh at o, as the fifth bit (16) of a Q5 quant."""
    return ((_u8(w, r, o + (j >> 3)) >> (j & 7)) & 1) << 4


@_device
def _dq_q4_0(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q4_0: d, qs[16]; q - 8
    d = _f16(w, r, o)
    m = F32(-8) * d
    for i in range(8):
        wv[i] = d * F32(_nibble(w, r, o + 2, 8 * p + i)) + m


@_device
def _dq_q4_1(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q4_1: d, m, qs[16]
    d = _f16(w, r, o)
    m = _f16(w, r, o + 2)
    for i in range(8):
        wv[i] = d * F32(_nibble(w, r, o + 4, 8 * p + i)) + m


@_device
def _dq_q5_0(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q5_0: d, qh[4], qs[16]; q - 16
    d = _f16(w, r, o)
    m = F32(-16) * d
    for i in range(8):
        j = 8 * p + i
        wv[i] = d * F32(_nibble(w, r, o + 6, j) | _qh_bit(w, r, o + 2, j)) + m


@_device
def _dq_q5_1(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q5_1: d, m, qh[4], qs[16]
    d = _f16(w, r, o)
    m = _f16(w, r, o + 2)
    for i in range(8):
        j = 8 * p + i
        wv[i] = d * F32(_nibble(w, r, o + 8, j) | _qh_bit(w, r, o + 4, j)) + m


@_device
def _dq_iq4_nl(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_iq4_nl: d, qs[16] (indices into kvalues_iq4nl)
    d = _f16(w, r, o)
    for i in range(8):
        wv[i] = d * _IQ4NL[_nibble(w, r, o + 2, 8 * p + i)]


@_device
def _dq_mxfp4(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_mxfp4: e (e8m0), qs[16] (e2m1 codes, doubled values; the scale is halved to match)
    d = _E8M0_HALF[_u8(w, r, o)]
    for i in range(8):
        wv[i] = d * _MXFP4[_nibble(w, r, o + 1, 8 * p + i)]


@_device
def _dq_q2_k(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q2_K: scales[16] (scale | min << 4), qs[64], d, dmin; sub-block p is 2-bit field (p>>1)&3 of
    # qs[32*(p>>3) + 16*(p&1) + l]
    sc = _u8(w, r, o + p)
    dl = _f16(w, r, o + 80) * F32(sc & 0xF)
    ml = -(_f16(w, r, o + 82) * F32(sc >> 4))
    shift = 2 * ((p >> 1) & 3)
    q = o + 16 + 32 * (p >> 3) + 16 * (p & 1)
    for i in range(16):
        wv[i] = dl * F32((_u8(w, r, q + i) >> shift) & 3) + ml


@_device
def _dq_q3_k(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q3_K: hmask[32], qs[64], scales[12] (6-bit, minus 32), d; q = 2 low bits - 4 if the hmask bit is 0
    lo = (_u8(w, r, o + 96 + p) & 0xF) if p < 8 else (_u8(w, r, o + 88 + p) >> 4)
    hi = (_u8(w, r, o + 104 + (p & 3)) >> (2 * (p >> 2))) & 3
    dl = _f16(w, r, o + 108) * F32((lo | (hi << 4)) - 32)
    n = p >> 3
    j = (p >> 1) & 3
    base = 16 * (p & 1)
    for i in range(16):
        ql = (_u8(w, r, o + 32 + 32 * n + base + i) >> (2 * j)) & 3
        h = (_u8(w, r, o + base + i) >> (4 * n + j)) & 1
        wv[i] = dl * F32(ql - ((h ^ 1) << 2))


@_device
def _dq_q4_k(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q4_K: d, dmin, scales[12], qs[128]; sub-block s = p >> 1 is nibble s & 1 of qs[32*(s>>1) + l]
    s = p >> 1
    sc, mn = _scale_min_k4(w, r, o + 4, s)
    d1 = _f16(w, r, o) * F32(sc)
    m1 = _f16(w, r, o + 2) * F32(mn)
    q = o + 16 + 32 * (s >> 1) + 16 * (p & 1)
    shift = 4 * (s & 1)
    for i in range(16):
        wv[i] = d1 * F32((_u8(w, r, q + i) >> shift) & 0xF) - m1


@_device
def _dq_q5_k(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q5_K: d, dmin, scales[12], qh[32], qs[128]; the fifth bit of sub-block s is bit s of qh[l]
    s = p >> 1
    sc, mn = _scale_min_k4(w, r, o + 4, s)
    d1 = _f16(w, r, o) * F32(sc)
    m1 = _f16(w, r, o + 2) * F32(mn)
    lb = 16 * (p & 1)
    q = o + 48 + 32 * (s >> 1) + lb
    shift = 4 * (s & 1)
    for i in range(16):
        v = ((_u8(w, r, q + i) >> shift) & 0xF) | (((_u8(w, r, o + 16 + lb + i) >> s) & 1) << 4)
        wv[i] = d1 * F32(v) - m1


@_device
def _dq_q6_k(w: Any, r: int, o: int, p: int, wv: Any) -> None:
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d; q = (4 low bits | 2 high bits << 4) - 32
    dl = _f16(w, r, o + 208) * F32(_i8(_u8(w, r, o + 192 + p)))
    n = p >> 3
    g = (p >> 1) & 3
    lb = 16 * (p & 1)
    lo = o + 64 * n + 32 * (g & 1) + lb
    hi = o + 128 + 32 * n + lb
    for i in range(16):
        q = ((_u8(w, r, lo + i) >> (4 * (g >> 1))) & 0xF) | (((_u8(w, r, hi + i) >> (2 * g)) & 3) << 4)
        wv[i] = dl * F32(q - 32)


# ---- kernels ----

def _build(dq: Callable, bs: int, ts: int, parts: int) -> tuple[Callable, Callable]:
    """GEMV and GEMM kernels for blocks of bs weights in ts array elements, decoded `parts` parts at a time."""
    pw = bs // parts

    @_kernel
    def gemv(w, x, out):  # out[r] = row r . x
        lane = cuda.threadIdx.x
        r = cuda.blockIdx.x * WARPS + cuda.threadIdx.y
        wv = cuda.local.array(PWMAX, np.float32)
        acc = F32(0)
        if r < w.shape[0]:
            for t in range(lane, x.shape[0] // bs * parts, LANES):
                k = t // parts
                p = t - k * parts
                dq(w, r, k * ts, p, wv)
                xo = k * bs + p * pw
                for i in range(pw):
                    acc += wv[i] * x[xo + i]
        acc = _warp_sum(acc)  # every lane of every warp gets here: the shuffle needs the whole warp
        if lane == 0 and r < w.shape[0]:
            out[r] = acc

    @_kernel
    def gemm(w, X, out):  # out[t, r] = row r . X[t]
        # Correct, not tuned: each warp re-reads X for its row. Faster: several rows per warp, X tiles in
        # shared memory, and for large batches dequantized tiles fed to tensor-core MMA.
        lane = cuda.threadIdx.x
        r = cuda.blockIdx.x * WARPS + cuda.threadIdx.y
        wv = cuda.local.array(PWMAX, np.float32)
        acc = cuda.local.array(MT, np.float32)
        n = X.shape[0]
        for t0 in range(0, n, MT):
            for j in range(MT):
                acc[j] = F32(0)
            if r < w.shape[0]:
                for t in range(lane, X.shape[1] // bs * parts, LANES):
                    k = t // parts
                    p = t - k * parts
                    dq(w, r, k * ts, p, wv)  # decoded once for up to MT activation rows
                    xo = k * bs + p * pw
                    for j in range(MT):
                        if t0 + j < n:
                            for i in range(pw):
                                acc[j] += wv[i] * X[t0 + j, xo + i]
            for j in range(MT):
                s = _warp_sum(acc[j])
                if lane == 0 and r < w.shape[0] and t0 + j < n:
                    out[t0 + j, r] = s

    return gemv, gemm


_SPECS: dict[QType, tuple[Callable, int]] = {  # decoder, parts per block
    QType.F32: (_dq_f32, 1), QType.F16: (_dq_f16, 1), QType.BF16: (_dq_bf16, 1),
    QType.Q8_0: (_dq_q8_0, 4), QType.Q4_0: (_dq_q4_0, 4), QType.Q4_1: (_dq_q4_1, 4),
    QType.Q5_0: (_dq_q5_0, 4), QType.Q5_1: (_dq_q5_1, 4), QType.IQ4_NL: (_dq_iq4_nl, 4),
    QType.MXFP4: (_dq_mxfp4, 4),
    QType.Q2_K: (_dq_q2_k, 16), QType.Q3_K: (_dq_q3_k, 16), QType.Q4_K: (_dq_q4_k, 16),
    QType.Q5_K: (_dq_q5_k, 16), QType.Q6_K: (_dq_q6_k, 16),
}
# Device row element types (element_type below); blocks are bytes.
_ELEM = {QType.F32: np.dtype(np.float32), QType.F16: np.dtype(np.uint16), QType.BF16: np.dtype(np.uint16)}


def element_type(qtype: QTypeLike) -> np.dtype:
    """The element type of `qtype`'s device rows: F32 rows as float32, F16/BF16 as uint16, blocks as bytes."""
    return _ELEM.get(_weight_type(qtype), np.dtype(np.uint8))


CUDA_MATVEC: dict[QType, Callable] = {}
CUDA_MATMUL: dict[QType, Callable] = {}
for _t, (_dq, _parts) in _SPECS.items():
    _ts = 1 if _t in _ELEM else type_size(_t)  # array elements per block
    CUDA_MATVEC[_t], CUDA_MATMUL[_t] = _build(_dq, block_size(_t), _ts, _parts)


# ---- host API ----

def _require() -> None:
    if not available():
        raise QuantError("no CUDA device: numba.cuda finds no GPU (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")


def _cuda_type(qtype: QTypeLike) -> QType:
    t = _weight_type(qtype)
    if t not in CUDA_MATVEC:  # pragma: no cover - every weight type has a kernel
        raise QuantError(f"no CUDA kernel for {t.name}")
    return t


def to_device_weights(raw: np.ndarray, qtype: QTypeLike, cols: int, stream: Any = 0) -> Any:
    """Copy quantized rows raw (uint8, (rows, row_bytes)) to the device, in the element type the kernels read.

    Validated exactly as kernels.prepare_weights (QuantError on a wrong dtype, shape or byte length)."""
    t = _cuda_type(qtype)
    view = prepare_weights(raw, t, cols)
    _require()
    return cuda.to_device(np.ascontiguousarray(view), stream=stream)


def _device_weights(w: Any, t: QType, cols: int, stream: Any) -> Any:
    if isinstance(w, np.ndarray):
        return to_device_weights(w, t, cols, stream)
    elem = _ELEM.get(t, np.dtype(np.uint8))
    units = cols if t in _ELEM else row_bytes(t, cols)
    if len(w.shape) != 2 or np.dtype(w.dtype) != elem or w.shape[1] != units:
        raise QuantError(
            f"device weights must be {elem} of shape (rows, {units}) for {cols} {t.name} weights per row "
            f"(use to_device_weights), not {w.dtype} of shape {tuple(w.shape)}"
        )
    return w


def _device_activations(x: Any, ndim: int, name: str, stream: Any) -> Any:
    if isinstance(x, np.ndarray):
        return cuda.to_device(_activations(x, ndim, name), stream=stream)
    if np.dtype(x.dtype) != np.float32 or len(x.shape) != ndim:
        raise QuantError(f"{name} must be a {ndim}-d float32 array, not {x.dtype} of shape {tuple(x.shape)}")
    return x


def _device_output(out: Any, shape: tuple[int, ...], stream: Any) -> Any:
    if out is None:
        return cuda.device_array(shape, dtype=np.float32, stream=stream)
    if np.dtype(out.dtype) != np.float32 or tuple(out.shape) != shape:
        raise QuantError(f"out must be a float32 device array of shape {shape}, not {out.dtype} {tuple(out.shape)}")
    return out


def _grid(rows: int) -> tuple[int, tuple[int, int]]:
    return (rows + WARPS - 1) // WARPS, (LANES, WARPS)


def matvec(w_dev: Any, qtype: QTypeLike, x_dev: Any, out_dev: Any = None, stream: Any = 0) -> Any:
    """dequantize(w) @ x on the device; returns the float32 (rows,) device array (out_dev when given).

    w_dev from to_device_weights (or a host uint8 array, copied), x_dev float32 (cols,) on the device or host."""
    _require()
    t = _cuda_type(qtype)
    x = _device_activations(x_dev, 1, "x", stream)
    w = _device_weights(w_dev, t, x.shape[0], stream)
    out = _device_output(out_dev, (w.shape[0],), stream)
    if w.shape[0]:
        blocks, threads = _grid(w.shape[0])
        CUDA_MATVEC[t][blocks, threads, stream](w, x, out)
    return out


def matmul(w_dev: Any, qtype: QTypeLike, X_dev: Any, out_dev: Any = None, stream: Any = 0) -> Any:
    """X @ dequantize(w).T on the device for float32 X (n, cols); returns the float32 (n, rows) device array."""
    _require()
    t = _cuda_type(qtype)
    X = _device_activations(X_dev, 2, "X", stream)
    w = _device_weights(w_dev, t, X.shape[1], stream)
    out = _device_output(out_dev, (X.shape[0], w.shape[0]), stream)
    if w.shape[0] and X.shape[0]:
        blocks, threads = _grid(w.shape[0])
        CUDA_MATMUL[t][blocks, threads, stream](w, X, out)
    return out


__all__ = ["CUDA_MATMUL", "CUDA_MATVEC", "available", "element_type", "matmul", "matvec", "simulated", "to_device_weights"]
