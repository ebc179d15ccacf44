"""Quantization type names, block geometry and input validation.

Block and byte sizes come from gguf-py's `GGML_QUANT_SIZES`, the same table llama.cpp's
`ggml_type_traits` holds, so nothing here restates them.
"""
from __future__ import annotations

from typing import Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QType = GGMLQuantizationType
QTypeLike = Union[GGMLQuantizationType, str, int]

QK_K = 256

# Every type hotcold can quantize, dequantize and multiply with (Q8_K only as an activation format).
SUPPORTED: tuple[QType, ...] = (
    QType.F32, QType.F16, QType.BF16,
    QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_K,
    QType.IQ4_NL, QType.MXFP4,
)

# Types that store weights (Q8_K is only ever an activation format in llama.cpp).
WEIGHT_TYPES: tuple[QType, ...] = tuple(t for t in SUPPORTED if t != QType.Q8_K)


class QuantError(ValueError):
    """Bad input to a quantization routine: the message names the problem and the fix."""


def resolve(qtype: QTypeLike) -> QType:
    """Accept a `GGMLQuantizationType`, its name (any case) or its integer id."""
    if isinstance(qtype, GGMLQuantizationType):
        t = qtype
    elif isinstance(qtype, str):
        try:
            t = GGMLQuantizationType[qtype.strip().upper()]
        except KeyError:
            raise QuantError(
                f"unknown quantization type {qtype!r}; supported: {', '.join(x.name for x in SUPPORTED)}"
            ) from None
    elif isinstance(qtype, (int, np.integer)):
        try:
            t = GGMLQuantizationType(int(qtype))
        except ValueError:
            raise QuantError(f"unknown quantization type id {qtype}") from None
    else:
        raise QuantError(f"quantization type must be a GGMLQuantizationType or its name, not {type(qtype).__name__}")
    if t not in SUPPORTED:
        raise QuantError(
            f"quantization type {t.name} is not supported by hotcold; supported: {', '.join(x.name for x in SUPPORTED)}"
        )
    return t


def block_size(qtype: QType) -> int:
    """Number of weights in one block of `qtype`."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: QType) -> int:
    """Number of bytes in one block of `qtype`."""
    return GGML_QUANT_SIZES[qtype][1]


def row_bytes(qtype: QType, n: int) -> int:
    """Bytes of one row of `n` weights; `n` must be a multiple of the block size."""
    check_row_length(qtype, n)
    return n // block_size(qtype) * type_size(qtype)


def check_row_length(qtype: QType, n: int) -> None:
    bs = block_size(qtype)
    if n % bs != 0:
        raise QuantError(
            f"row length {n} is not a multiple of the {qtype.name} block size {bs}; "
            f"pad the row or pick a type with a smaller block (Q8_0, Q4_0 and F16 use blocks of 32 or 1)"
        )


def byte_shape(shape: tuple[int, ...], qtype: QType) -> tuple[int, ...]:
    """Shape of the uint8 array holding a tensor of float `shape` (gguf.quants.quant_shape_to_byte_shape)."""
    if len(shape) == 0:
        raise QuantError("cannot quantize a 0-d array; give at least one row")
    check_row_length(qtype, shape[-1])
    return (*shape[:-1], shape[-1] // block_size(qtype) * type_size(qtype))


def float_shape(shape: tuple[int, ...], qtype: QType) -> tuple[int, ...]:
    """Shape of the float tensor held by a uint8 array of `shape` (gguf.quants.quant_shape_from_byte_shape)."""
    if len(shape) == 0:
        raise QuantError("quantized data must be at least 1-d")
    ts = type_size(qtype)
    if shape[-1] % ts != 0:
        raise QuantError(
            f"{shape[-1]} bytes per row is not a whole number of {qtype.name} blocks of {ts} bytes; "
            f"the buffer is truncated or holds another type"
        )
    return (*shape[:-1], shape[-1] // ts * block_size(qtype))
