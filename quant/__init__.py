"""hotcold.quant: GGML quantization formats, byte-exact with llama.cpp, and Numba kernels over them.

    quantize(x, qtype)   -> uint8 bytes, shape gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
    dequantize(raw, qtype) -> float32, identical to gguf.quants.dequantize
    matvec(w, qtype, x) / matmul(w, qtype, X) -> products with quantized weights (see kernels.py)

Kernels here know nothing of models: they see uint8 matrices and float32 activations.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import kquants, legacy
from .dequant import dequantize_flat, dequantize_rows
from .types import (
    QK_K, SUPPORTED, WEIGHT_TYPES, QType, QTypeLike, QuantError, block_size, byte_shape, float_shape,
    resolve, row_bytes, type_size,
)

__all__ = [
    "QK_K", "SUPPORTED", "WEIGHT_TYPES", "QType", "QuantError", "block_size", "byte_shape", "dequantize", "dequantize_rows",
    "float_shape", "matmul", "matvec", "quantize", "resolve", "row_bytes", "type_size",
]


# Row quantizers: float32 (rows, n) -> fill uint8 (rows, row_bytes).
_QUANTIZERS: dict[QType, Callable[[np.ndarray, np.ndarray], None]] = {
    QType.Q4_0: legacy.quantize_rows_q4_0,
    QType.Q4_1: legacy.quantize_rows_q4_1,
    QType.Q5_0: legacy.quantize_rows_q5_0,
    QType.Q5_1: legacy.quantize_rows_q5_1,
    QType.Q8_0: legacy.quantize_rows_q8_0,
    QType.IQ4_NL: legacy.quantize_rows_iq4_nl,
    QType.MXFP4: legacy.quantize_rows_mxfp4,
    QType.Q2_K: kquants.quantize_rows_q2_k,
    QType.Q3_K: kquants.quantize_rows_q3_k,
    QType.Q4_K: kquants.quantize_rows_q4_k,
    QType.Q5_K: kquants.quantize_rows_q5_k,
    QType.Q6_K: kquants.quantize_rows_q6_k,
    QType.Q8_K: kquants.quantize_rows_q8_k,
}


def _check_finite(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(-1)))
        first = np.unravel_index(int(bad[0]), x.shape)
        raise QuantError(
            f"cannot quantize: {bad.size} non-finite value(s) (NaN or Inf), first at index {tuple(int(i) for i in first)} "
            f"= {x.reshape(-1)[bad[0]]}; fix the source tensor"
        )


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 (ggml_compute_fp32_to_bf16 for finite inputs)."""
    n = x.view(np.uint32).astype(np.uint64)
    return ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


def quantize(x: np.ndarray, qtype: QTypeLike) -> np.ndarray:
    """Quantize the last axis of `x` to `qtype`; returns uint8 bytes laid out as llama.cpp writes them."""
    t = resolve(qtype)
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise QuantError(f"cannot quantize an array of dtype {x.dtype}; pass floats")
    shape = byte_shape(x.shape, t)
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_finite(x)
    if t == QType.F32:
        return x.view(np.uint8).reshape(shape)
    if t == QType.F16:
        h = x.astype(np.float16)
        if not np.isfinite(h).all():  # llama.cpp's ggml_validate_row_data refuses these too
            big = float(np.abs(x).max())
            raise QuantError(f"cannot store {big:g} as F16 (largest is 65504); use BF16 or F32 for this tensor")
        return h.view(np.uint8).reshape(shape)
    if t == QType.BF16:
        return _to_bf16(x).view(np.uint8).reshape(shape)
    rows = x.reshape(-1, x.shape[-1]) if x.size else x.reshape(0, max(x.shape[-1], 1))
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.uint8)
    if rows.shape[0]:
        _QUANTIZERS[t](rows, out)
    return out.reshape(shape)


def dequantize(raw: np.ndarray, qtype: QTypeLike) -> np.ndarray:
    """Dequantize uint8 bytes of `qtype` to float32 of shape gguf.quants.quant_shape_from_byte_shape."""
    t = resolve(qtype)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise QuantError(f"quantized data must be a uint8 byte array, not {raw.dtype}; use .view(np.uint8)")
    shape = float_shape(raw.shape, t)
    return dequantize_flat(np.ascontiguousarray(raw).reshape(-1), t).reshape(shape)


def __getattr__(name: str):
    # The kernels compile on first use; importing them lazily keeps `import hotcold.quant` light.
    if name in ("matvec", "matmul"):
        from . import kernels
        return getattr(kernels, name)
    raise AttributeError(name)
