"""The first run's compile, halved: the kernels a CPU forward pass needs are split in two about equal parts;
a second process compiles one into Numba's on-disk cache while the loading process compiles the other, then
the warm-up finds both. Numba compiles under one lock per process, so two processes are the way to use the
machine's second core for it.

    python -m hotcold.engine.precompile Q8_0 Q4_K --embd Q8_0 --kv f16    (what Model starts by itself)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any, Iterable

import numpy as np
from numba import types as nt
from numba.np.numpy_support import from_dtype

from hotcold.quant import QType

_F32, _U8, _U16, _I8, _I32, _I64 = nt.float32, nt.uint8, nt.uint16, nt.int8, nt.int32, nt.int64


def _a(dtype: Any, ndim: int, readonly: bool = False) -> nt.Array:
    return nt.Array(dtype, ndim, "C", readonly=readonly)


_KERNEL_VIEW = {QType.F32: _F32, QType.F16: _U16, QType.BF16: _U16}  # quant.kernels._FLOAT_VIEW


def _sums(t: QType) -> nt.Array:
    """The type of `t`'s kernels' sums operand (int8.sums_dtype)."""
    from hotcold.quant import int8
    return _a(from_dtype(np.dtype(int8.sums_dtype(t))), 2)


def signatures(weight_types: Iterable[QType], embd: QType, kv_f16: bool, store: bool = True,
               repack: bool = False) -> tuple[list, list]:
    """(kernel, argument types) for every kernel a CPU forward pass calls, in two parts of about equal compile
    time: the loading process's and the helper's; store: with an expert store's arena copies (the loading
    process's part); repack: with the interleaved Q4_K kernels (quant/repack.py) and the repacking itself."""
    from hotcold.quant import dequant, int8
    from hotcold.quant import repack as rp
    from hotcold.quant.kernels import MATMUL, MATVEC

    from . import kernels
    f2, f1 = _a(_F32, 2), _a(_F32, 1)
    mine: list[tuple[Any, tuple]] = [(dequant._ROWS[embd], (_a(_U8, 2, True), _a(_I64, 1), f2, _I64, _I64)),
                                     (kernels.rms_norm, (f2, f1, nt.float64, f2)),
                                     (kernels.rope, (_a(_F32, 3), _a(_I64, 1), f2, f2, nt.boolean)),
                                     (kernels.small_matmul, (f2, _a(_F32, 2, True), f2)),
                                     (kernels.scatter_add, (f2, _a(_I64, 1), f1, f2)),
                                     (kernels.scatter_add_block, (f2, f1, f2)),
                                     (kernels.route_softmax_topk, (f2, _I64, nt.boolean, f1, f1, _a(_I64, 2), f2, f2)),
                                     (kernels.silu_mul, (f2, f2))]
    if store:
        mine.append((kernels.copy_expert, (_a(_U8, 1), *[_a(_U8, 2, True)] * 3)))    # arena loads
    quantizers = {QType.Q8_0: (int8.quantize_q8_0, (f2, _a(_I8, 2), f2, _a(_I32, 2))),
                  QType.Q8_K: (int8.quantize_q8_k, (f2, _a(_I8, 2), _a(_I8, 2), f2, _a(_I32, 2), f2,
                                                      _a(nt.int16, 2)))}
    theirs: list[tuple[Any, tuple]] = []
    for t in dict.fromkeys(weight_types):
        if t in int8.KERNELS:
            k = int8.KERNELS[t]
            w = (_a(_U8, 2, True), _a(_I8, 2), f2, _sums(t), f2)
            mine += [quantizers[k.fmt], (k.mv, (*w, _a(_U8, 2))), (k.few, w), (k.mm, w)]   # mv's last: a slot
            theirs.append((k.more, w))
        else:
            w = _a(_KERNEL_VIEW.get(t, _U8), 2, True)
            mine += [(MATMUL[t], (w, f2, f2)), (MATVEC[t], (w, f1, f1))]
    kv = _a(_U16 if kv_f16 else _F32, 3)
    theirs += [((kernels.attention_f16 if kv_f16 else kernels.attention), (_a(_F32, 3), kv, kv, _I64, f2, f2))]
    if kv_f16:
        theirs += [(kernels.store_f16, (f2, kv)), (kernels.store_kv_f16, (f2, f2, kv, kv, _I64))]
    if repack and QType.Q4_K in weight_types and QType.Q4_K in int8.KERNELS:
        w, u8 = (_a(_U8, 2, True), _a(_I8, 2), f2, _a(nt.int16, 2), f2, _I64), _a(_U8, 2, True)
        mine += [(rp.repack_q4_k, (u8, _a(_U8, 2))), (rp.mv_x8, w),
                 (rp.mv_glu_x8, (u8, u8, _a(_I8, 2), f2, _a(nt.int16, 2), f2, f2, _I64))]
        theirs.append((rp.mm_x8, w))
    glu = [t for t in dict.fromkeys(weight_types) if t in int8.GLU]
    w = _a(_U8, 2, True)
    theirs += [(int8.GLU[t], (w, w, _a(_I8, 2), f2, _sums(t), f2, f2, _a(_U8, 2), _a(_U8, 2))) for t in glu]
    return mine, theirs


def compile_all(sigs: Iterable[tuple[Any, tuple]]) -> None:
    for kernel, sig in sigs:
        kernel.compile(sig)


def start(weight_types: Iterable[QType], embd: QType, kv_f16: bool, repack: bool = False) -> subprocess.Popen | None:
    """The helper process, compiling its part; None where it cannot be started."""
    cmd = [sys.executable, "-m", "hotcold.engine.precompile", *(t.name for t in dict.fromkeys(weight_types)),
           "--embd", embd.name, "--kv", "f16" if kv_f16 else "f32"] + (["--repack"] if repack else [])
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ))
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hotcold.engine.precompile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", help="the model's weight types")
    ap.add_argument("--embd", default="Q8_0")
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16")
    ap.add_argument("--repack", action="store_true", help="with the interleaved Q4_K kernels")
    args = ap.parse_args(argv)
    compile_all(signatures([QType[t] for t in args.types], QType[args.embd], args.kv == "f16",
                           repack=args.repack)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
