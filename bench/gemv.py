"""GEMV/GEMM throughput of hotcold's quantized kernels against this machine's copy bandwidth and numpy.

    python bench/gemv.py [--rows 14336 --cols 4096] [--types Q4_K Q8_0 ...] [--reps 7] [--prefill 32]
    python bench/gemv.py --check-cache      # a second process start must compile nothing

For each type: GEMV GB/s of weight bytes on 1 and 2 threads, against np.copyto of a buffer of the same size
(GB/s of bytes read) and against numpy (hotcold dequantize, then w @ x), all measured in this run; then
prefill: one matmul over --prefill activation rows against that many matvecs. Medians of --reps runs.
Weights: legacy types and floats quantized from random normals, the other types random bytes with finite
scales (any bytes are valid blocks, and the kernels' speed does not depend on the values).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from hotcold.quant import WEIGHT_TYPES, QType, block_size, dequantize, matmul, matvec, quantize, resolve, type_size
from hotcold.quant import kernels

# Offsets of the fp16 scale fields in a block of each type (block_q*_* in ggml-common.h).
F16_FIELDS = {
    QType.Q8_0: (0,), QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2),
    QType.IQ4_NL: (0,), QType.MXFP4: (), QType.Q2_K: (80, 82), QType.Q3_K: (108,),
    QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,),
}
QUANTIZE = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1)


def random_weights(t: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, row_bytes) of type t holding finite weights."""
    if t in QUANTIZE:
        out = np.empty((rows, cols // block_size(t) * type_size(t)), dtype=np.uint8)
        for r0 in range(0, rows, 2048):  # in slices, to keep the float source small
            out[r0:r0 + 2048] = quantize(rng.standard_normal((min(2048, rows - r0), cols), dtype=np.float32), t)
        return out
    nb = cols // block_size(t)
    w = rng.integers(0, 256, size=(rows, nb, type_size(t)), dtype=np.uint8)
    if t == QType.MXFP4:
        w[..., 0] = rng.integers(120, 128, size=(rows, nb), dtype=np.uint8)  # e8m0 scales 2^-8 .. 2^-1
    for o in F16_FIELDS[t]:
        h = rng.uniform(1e-3, 1e-1, size=(rows, nb)).astype(np.float16).view(np.uint16)
        w[..., o] = h & 0xFF
        w[..., o + 1] = h >> 8
    return w.reshape(rows, -1)


def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_time(nbytes: int, reps: int) -> float:
    """Median seconds of np.copyto between two buffers of nbytes: the machine's copy bandwidth."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return median_time(lambda: np.copyto(dst, src), reps)


def set_threads(n: int) -> None:
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def kernel_stats(t: QType) -> tuple[int, int]:
    """(cache hits, cache misses) of the type's matvec and matmul dispatchers in this process."""
    hits = misses = 0
    for table in (kernels.MATVEC, kernels.MATMUL):
        st = table[t].stats
        hits += sum(st.cache_hits.values())
        misses += sum(st.cache_misses.values())
    return hits, misses


def bench(args: argparse.Namespace) -> None:
    import numba
    rng = np.random.default_rng(0)
    rows, cols = args.rows, args.cols
    maxthreads = numba.config.NUMBA_NUM_THREADS
    print(f"# hotcold kernels: w ({rows}, {cols}), median of {args.reps}; {os.cpu_count()} CPUs, "
          f"numba {numba.__version__} ({maxthreads} threads), load average {os.getloadavg()[0]:.2f}\n")

    gemv, prefill = [], []
    for t in args.types:
        w = random_weights(t, rows, cols, rng)
        x = rng.standard_normal(cols, dtype=np.float32)
        X = rng.standard_normal((args.prefill, cols), dtype=np.float32)
        y = np.empty(rows, dtype=np.float32)

        set_threads(maxthreads)
        t0 = time.perf_counter()
        matvec(w, t, x, out=y)
        first_mv = time.perf_counter() - t0
        t0 = time.perf_counter()
        matmul(w, t, X[:2])
        first_mm = time.perf_counter() - t0
        hits, misses = kernel_stats(t)

        copy_s = copy_time(w.nbytes, args.reps)
        numpy_s = median_time(lambda: dequantize(w, t) @ x, max(3, args.reps // 2))

        per_thread = {}
        for nt in (1, 2):
            set_threads(nt)
            per_thread[nt] = median_time(lambda: matvec(w, t, x, out=y), args.reps)
        set_threads(maxthreads)
        best = min(per_thread.values())
        gb = w.nbytes / 1e9
        gemv.append((t.name, w.nbytes / 2**20, per_thread[1] * 1e3, gb / per_thread[1], gb / per_thread[2],
                     100 * copy_s / best, numpy_s / best, gb / copy_s, first_mv, first_mm, hits, misses))

        mm_s = median_time(lambda: matmul(w, t, X), max(3, args.reps // 2))
        prefill.append((t.name, args.prefill, mm_s * 1e3, args.prefill / mm_s, best * args.prefill * 1e3,
                        1 / best, best * args.prefill / mm_s))
        print(f"  {t.name}: done", file=sys.stderr, flush=True)

    print("| type | MiB | GEMV ms (1t) | GB/s (1t) | GB/s (2t) | % of copy bandwidth | speed-up vs numpy "
          "dequant+matmul | copy GB/s | first matvec s | first matmul s | cache hits/misses |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in gemv:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.0f}% | {r[6]:.1f}x | "
              f"{r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} | {r[10]}/{r[11]} |")
    print("\n% of copy bandwidth uses the faster of 1 and 2 threads; first calls compile (misses) or load "
          "from numba's cache (hits).\n")
    print(f"| type | prefill m | matmul ms | tokens/s (matmul) | {args.prefill} matvecs ms | tokens/s (matvec) "
          "| speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in prefill:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]:.1f}x |")


def _first_calls(types: list[QType]) -> None:
    """Child of --check-cache: time the first matvec and matmul of each type, report the dispatcher stats."""
    rng = np.random.default_rng(0)
    result = {}
    for t in types:
        w = random_weights(t, 8, 512, rng)
        x = rng.standard_normal(512, dtype=np.float32)
        t0 = time.perf_counter()
        matvec(w, t, x)
        mv = time.perf_counter() - t0
        t0 = time.perf_counter()
        matmul(w, t, rng.standard_normal((3, 512), dtype=np.float32))
        mm = time.perf_counter() - t0
        hits, misses = kernel_stats(t)
        result[t.name] = {"matvec_s": mv, "matmul_s": mm, "hits": hits, "misses": misses}
    print(json.dumps(result))


def check_cache(args: argparse.Namespace) -> int:
    """Run the first calls in two fresh processes sharing an empty numba cache: the second must compile nothing."""
    names = [t.name for t in args.types]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, __file__, "--first-calls", "--types", *names],
                                  env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    print("| type | compile matvec s | compile matmul s | second process matvec s | matmul s | cache hits/misses |")
    print("|---|---:|---:|---:|---:|---|")
    bad = []
    for name in names:
        c, w = cold[name], warm[name]
        print(f"| {name} | {c['matvec_s']:.2f} | {c['matmul_s']:.2f} | {w['matvec_s']:.3f} | {w['matmul_s']:.3f} "
              f"| {w['hits']}/{w['misses']} |")
        if w["misses"] or not w["hits"]:
            bad.append(name)
    if bad:
        print(f"\nFAIL: recompiled in the second process: {', '.join(bad)}")
        return 1
    print(f"\nOK: the second process loaded all {2 * len(names)} kernels from the cache and compiled none.")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=14336)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--types", nargs="+", default=[t.name for t in WEIGHT_TYPES])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--prefill", type=int, default=32, help="activation rows of the prefill matmul")
    p.add_argument("--check-cache", action="store_true", help="check that a second process compiles nothing")
    p.add_argument("--first-calls", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.types = [resolve(t) for t in args.types]
    if args.first_calls:
        _first_calls(args.types)
        return 0
    if args.check_cache:
        return check_cache(args)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
