"""The integer products at a decode batch's row counts: GB/s of weight bytes for T activation rows.

A decode step of N sequences gives each selected expert a few activation rows (8 sequences of top-2 of 8: about
2.2 rows each); a one-row product streams its weights, several rows make it compute-bound sooner. For each T in
--rows: the expert's down product (--ff x --embd weights against T rows) and its SwiGLU gate and up (two
--embd x --ff matrices) on `threads` threads, over --mats matrices (larger than the last-level cache), and the
one-row product with its weights in L2 (the compute-bound rate). Best of --reps. With --repack (Q4_K), the
weights interleaved by eights as the engine holds them resident (quant/repack.py). Then the activations' quantization
(Acts.need: what each matrix input costs once, whatever reads it) for each T.

    python bench/int8_rows.py [--type Q4_K] [--repack] [--rows 1 2 3 4 8] [--threads 1 2] [--embd 2048] [--ff 5632]
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from hotcold.quant import QType, int8, quantize, repack
from hotcold.quant.types import row_bytes


def best(f, reps: int) -> float:
    out = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_K", choices=[t.name for t in int8.KERNELS])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--embd", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--mats", type=int, default=12, help="matrices of each kind cycled through (past the cache)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--repack", action="store_true", help="Q4_K interleaved by eights (quant/repack.py)")
    args = ap.parse_args()
    t, H, F = QType[args.type], args.embd, args.ff
    if args.repack and t != QType.Q4_K:
        ap.error("--repack is for Q4_K")
    rng = np.random.default_rng(0)
    pack = repack.repack if args.repack else (lambda w: w)
    downs = [pack(quantize(rng.standard_normal((H, F), dtype=np.float32), t)) for _ in range(args.mats)]
    gates = [pack(quantize(rng.standard_normal((F, H), dtype=np.float32), t)) for _ in range(2 * args.mats)]
    small = pack(quantize(rng.standard_normal((256, F), dtype=np.float32), t))
    if args.repack:
        product = lambda w, t, a, out: repack.product(w, a, out)  # noqa: E731
        swiglu = lambda wg, wu, t, a, g, u: repack.swiglu_product(wg, wu, a, g, u)  # noqa: E731
    else:
        product, swiglu = int8.product, int8.swiglu_product
    for a in downs + gates + [small]:
        a.flags.writeable = False
    nbytes = args.mats * H * row_bytes(t, F)   # the plain type's bytes, repacked or not
    label = f"{t.name} repacked" if args.repack else t.name
    print(f"\n{label}: GB/s of weight bytes, best of {args.reps}; down {H}x{F}, gate/up {F}x{H}, {args.mats} of each\n")
    print("| threads | rows | down | gate+up (SwiGLU) | one row, weights in L2 |")
    print("|---:|---:|---:|---:|---:|")
    for th in args.threads:
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        one = np.zeros((1, 256), np.float32)
        a1 = int8.Acts(1, F).bind(rng.standard_normal((1, F), dtype=np.float32))
        product(small, t, a1, one)
        l2 = 256 * row_bytes(t, F) * 200 / best(lambda: [product(small, t, a1, one) for _ in range(200)], args.reps)
        for T in args.rows:
            aF = int8.Acts(T, F).bind(rng.standard_normal((T, F), dtype=np.float32))
            aH = int8.Acts(T, H).bind(rng.standard_normal((T, H), dtype=np.float32))
            out, g, u = np.zeros((T, H), np.float32), np.zeros((T, F), np.float32), np.zeros((T, F), np.float32)
            product(downs[0], t, aF, out)
            glu = T <= int8.FEW
            if glu:
                swiglu(gates[0], gates[1], t, aH, g, u)
            d = best(lambda: [product(w, t, aF, out) for w in downs], args.reps)
            s = best(lambda: [swiglu(gates[i], gates[i + 1], t, aH, g, u)
                              for i in range(0, len(gates), 2)], args.reps) if glu else np.nan
            print(f"| {th} | {T} | {nbytes / d / 1e9:.1f} | {2 * nbytes / s / 1e9:.1f} | {l2 / 1e9:.1f} |", flush=True)
    fmt = int8.KERNELS[t].fmt
    print(f"\nactivations to {fmt.name} (once per matrix input, one thread): microseconds, best of {args.reps} x 200\n")
    print("| rows | x --embd | x --ff |")
    print("|---:|---:|---:|")
    for T in args.rows:
        us = []
        for n in (H, F):
            a = int8.Acts(T, n)
            x = rng.standard_normal((T, n), dtype=np.float32)

            def quantize_acts() -> None:
                for _ in range(200):
                    a.bind(x).need(fmt)
            us.append(best(quantize_acts, args.reps) / 200 * 1e6)
        print(f"| {T} | {us[0]:.1f} | {us[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
