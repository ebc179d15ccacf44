"""ggml-cpu's vec.h float steps that kernels share: exp as ggml_v_expf computes it, and SwiGLU (ggml_vec_swiglu_f32).

Reproducing them step for step (single-rounding FMAs where ggml has them, none where it has none) is what keeps
hotcold's softmax and SiLU values equal to llama.cpp's; the kernels that call them are compiled without
contraction around them (a plain njit call keeps its own fast-math flags when LLVM inlines it).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .fp import bits_f32

F32 = np.float32


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c rounded once (llvm.fma.f32), whatever the fast-math flags."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, f, f]), "llvm.fma.f32")
        return builder.call(fn, args)
    return sig, codegen


_R = F32(float.fromhex("0x1.8p23"))
_LOG2E = F32(float.fromhex("0x1.715476p+0"))
_LN2_HI, _LN2_LO = F32(float.fromhex("0x1.62e4p-1")), F32(float.fromhex("0x1.7f7d1cp-20"))
_C5, _C4 = F32(float.fromhex("0x1.0e4020p-7")), F32(float.fromhex("0x1.573e2ep-5"))
_C3, _C2 = F32(float.fromhex("0x1.555e66p-3")), F32(float.fromhex("0x1.fffdb6p-2"))
_C1 = F32(float.fromhex("0x1.ffffecp-1"))


@njit(cache=True, inline="always")
def v_expf(x: np.float32) -> np.float32:
    """exp(x) as ggml's SIMD ggml_v_expf computes it (ggml-cpu/vec.h, after ARM's optimized routine: max error
    1.45 ulp), step for step with single-rounding FMAs, so that llama.cpp's softmax and SiLU values are
    reproduced; scalar code that LLVM vectorises."""
    z = _fma(x, _LOG2E, _R)
    n = z - _R
    b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    u = b * b
    j = _fma(_fma(_fma(_C5, b, _C4), u, _fma(_C3, b, _C2)), u, _fma(_C1, b, F32(1.0)))
    k = np.int32(n)
    # scalef(j, n) = j * 2^n: in two factors of 2^(k/2), 2^(k - k/2), each a normal float for |k| <= 192
    h = k >> np.int32(1)
    res = j * bits_f32(np.uint32((h + 127) << 23)) * bits_f32(np.uint32((k - h + 127) << 23))
    if abs(n) > F32(192):
        res = F32(np.inf) if n > F32(0) else F32(0)
    return res


@njit(cache=True, error_model="numpy")   # IEEE division (no zero check), so that the loop vectorises
def silu_mul(g: np.ndarray, u: np.ndarray) -> None:
    """g = silu(g) * u in place (SwiGLU's gate), as ggml_vec_swiglu_f32: g / (1 + v_expf(-g)) * u over each
    row's chunks of 16, the last n % 16 with libm's expf."""
    n = g.shape[g.ndim - 1]
    gf, uf = g.reshape(-1), u.reshape(-1)
    simd = n - n % 16
    for r in range(gf.shape[0] // n):
        gr, ur = gf[r * n:(r + 1) * n], uf[r * n:(r + 1) * n]
        for i in range(simd):
            gr[i] = gr[i] / (F32(1) + v_expf(F32(0) - gr[i])) * ur[i]
        for i in range(simd, n):
            gr[i] = gr[i] / (F32(1) + math.exp(-gr[i])) * ur[i]
