"""Scalar float helpers shared by the Numba quantizers and kernels: fp16/bf16/e8m0 conversion and rounding.

Each mirrors the scalar C in llama.cpp's ggml-impl.h / ggml-quants.c bit for bit, so the quantizers
that use them produce the same bytes as `quantize_row_*_ref`.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as uint32 (C's memcpy bit cast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, context.get_value_type(types.uint32))
        elif x.bitwidth < 32:
            v = builder.zext(v, context.get_value_type(types.uint32))
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(x), codegen


@intrinsic
def f16_hw(typingctx, h):
    """fp16 bits -> float32 by the hardware's conversion (F16C's vcvtph2ps, vectorised in loops): the same value as
    f16_to_f32 for every number and infinity. Use only where F16C is there (fp.F16C); elsewhere LLVM calls a
    runtime helper."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


F16C = bool(llvm.get_host_cpu_features().get("f16c"))


# fp16 -> fp32 for every bit pattern, like ggml's ggml_table_f32_f16; Numba freezes it as a constant.
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def f16_to_f32(h: int) -> float:
    return F16_TO_F32[h]


@njit(cache=True, inline="always")
def f32_to_f16(f: float) -> np.uint16:
    """Round-to-nearest-even fp32 -> fp16 bits: ggml_compute_fp32_to_fp16 (scalar path)."""
    f = np.float32(f)
    scale_to_inf = bits_f32(np.uint32(0x77800000))
    scale_to_zero = bits_f32(np.uint32(0x08800000))
    base = (np.float32(abs(f)) * scale_to_inf) * scale_to_zero
    w = f32_bits(f)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = bits_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = f32_bits(base)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        return np.uint16((sign >> np.uint32(16)) | np.uint32(0x7E00))
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(cache=True, inline="always")
def f32_round_f16(f: float) -> np.float32:
    """The float32 value that survives a trip through fp16 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f)))."""
    return F16_TO_F32[f32_to_f16(f)]


@njit(cache=True, inline="always")
def nearest_int(fval: float) -> int:
    """ggml-quants.c nearest_int: add 1.5*2^23 and read the mantissa, i.e. round half to even."""
    val = np.float32(fval) + np.float32(12582912.0)
    i = np.int32(f32_bits(val))
    return (i & np.int32(0x007FFFFF)) - np.int32(0x00400000)


@njit(cache=True, inline="always")
def e8m0_to_f32_half(e: int) -> np.float32:
    """ggml_e8m0_to_fp32_half: 2^(e-128), the MXFP4 block scale already halved."""
    if e < 2:
        return bits_f32(np.uint32(0x00200000) << np.uint32(e))
    return bits_f32(np.uint32(e - 1) << np.uint32(23))
