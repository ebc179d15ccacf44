"""Attention over an F16 KV cache: fp16 read with F16C's conversion (what the engine uses where the CPU has it)
against the bit formula (its fallback), in one process, alternating; outputs must be bit-identical.

One decode row (T=1), --heads query heads over --kv-heads cached heads of --dim, at each position in --positions;
microseconds per call, medians of --reps rounds of --calls calls, on 1 and 2 threads. Then the batch kernel
(attention_rows_f16, moe-server's decode step): one row of each of --seqs sequences at the same positions.

    python bench/attention.py [--positions 64 192 512] [--heads 16] [--kv-heads 8] [--dim 128] [--seqs 8]
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit

from hotcold.engine import kernels as K
from hotcold.quant.fp import F16C
from hotcold.quant.kernels import _f16_bits_to_f32


@njit(parallel=True, fastmath=K._ATT_MATH)
def attention_formula(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray,
                      scratch: np.ndarray) -> None:
    K._attend(q, k, v, p0, out, scratch, _f16_bits_to_f32, K._round_f16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, nargs="+", default=[64, 192, 512])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seqs", type=int, default=8, help="sequences of the batch kernel's table (one row each)")
    args = ap.parse_args()
    n_ctx = max(args.positions) + 1
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, args.heads, args.dim)).astype(np.float32)
    k, v = (rng.standard_normal((n_ctx, args.kv_heads, args.dim)).astype(np.float16).view(np.uint16) for _ in "kv")
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, n_ctx + args.dim), np.float32)
    print(f"\nattention_f16, one row, {args.heads}/{args.kv_heads} heads of {args.dim}; F16C: {F16C}; us per call\n")
    print("| threads | positions | F16C (engine) | bit formula | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    engines = {"engine": K.attention_f16, "formula": attention_formula}
    for th in (1, 2):
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        for p in args.positions:
            outs = {name: np.zeros((1, args.heads * args.dim), np.float32) for name in engines}
            for name, f in engines.items():
                f(q, k, v, p - 1, outs[name], scratch)
            assert np.array_equal(outs["engine"], outs["formula"]), "the two conversions disagree"
            times: dict[str, list[float]] = {name: [] for name in engines}
            for r in range(args.reps):
                for name in (engines if r % 2 == 0 else list(engines)[::-1]):
                    f, o = engines[name], outs[name]
                    t = time.perf_counter()
                    for _ in range(args.calls):
                        f(q, k, v, p - 1, o, scratch)
                    times[name].append((time.perf_counter() - t) / args.calls * 1e6)
            e, fm = np.median(times["engine"]), np.median(times["formula"])
            print(f"| {th} | {p} | {e:.1f} | {fm:.1f} | {fm / e:.2f}x |", flush=True)
    batch(args, rng)


def batch(args: argparse.Namespace, rng: np.random.Generator) -> None:
    """attention_rows_f16 (moe-server's decode step): one row for each of --seqs sequences, each over its own
    cells of one cache."""
    S, n_ctx = args.seqs, max(args.positions) + 1
    q = rng.standard_normal((S, args.heads, args.dim)).astype(np.float32)
    k, v = (rng.standard_normal((S * n_ctx, args.kv_heads, args.dim)).astype(np.float16).view(np.uint16) for _ in "kv")
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, n_ctx + args.dim), np.float32)
    out = np.zeros((S, args.heads * args.dim), np.float32)
    c0 = np.arange(S, dtype=np.int64) * n_ctx
    print(f"\nattention_rows_f16, one row of each of {args.seqs} sequences; us per call (median of --reps)\n")
    print("| threads | positions | us |")
    print("|---:|---:|---:|")
    for th in (1, 2):
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        for p in args.positions:
            span = np.full(S, p, dtype=np.int64)
            K.attention_rows_f16(q, k, v, c0, span, out, scratch)
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                for _ in range(args.calls):
                    K.attention_rows_f16(q, k, v, c0, span, out, scratch)
                times.append((time.perf_counter() - t) / args.calls * 1e6)
            print(f"| {th} | {p} | {np.median(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
