"""Aggregate decode speed of many sequences at once: moe-server's batch engine against llama.cpp decoding the
same number of sequences in one batch, on the same file and threads, in one run.

For each model (the shipped trained Mixtral at Q8_0, a generated Mixtral-shaped model of about --gb GB at
Q4_K: top-2 of 8 experts) and each stream count N in --streams, a fresh process loads the model, warms up,
then starts N greedy sequences of --prompt random tokens each and times their --decode tokens: hotcold
through hotcold.engine.batch.BatchEngine stepped on the loading thread (what moe-server runs: prompts prefilled together, then one forward
pass per step for all N), llama.cpp through llama-cpp-python's low-level API (one llama_batch of N sequence
ids per step, llama_decode, argmax of each sequence's logits: llama.cpp's batched example). Decode tokens/s
is N x (decode - 1) tokens over the time from the step in which the last sequence got its first token to
the end. The engines alternate, --reps times; medians. hotcold also runs with a 25% expert budget (LRU, hot
misses) and reports the expert bytes moved per generated token.

    python bench/server.py [--streams 1 2 4 8] [--gb 1.0] [--decode 64] [--reps 3] [--threads 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _run, bench_models, median  # noqa: E402


_HOTCOLD = r"""
import json, sys, time
path, n, n_prompt, n_decode, threads, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
import numpy as np
from hotcold import Model
from hotcold.engine.batch import BatchEngine, Request
from hotcold.engine.sampling import SamplingParams
opts = {} if budget == "plain" else dict(expert_budget=budget, cache_policy="lru", miss="hot")
m = Model(path, n_ctx=n_prompt + n_decode + 16, n_seq_max=n, n_batch=max(512, n * n_prompt), n_threads=threads, **opts)
eng = BatchEngine(m)   # stepped on this thread, as moe-server runs it (engine/batch.py)
rng = np.random.default_rng(0)

def run(prompts, n_tok):
    first, last = {}, {}
    def sink(i):
        def emit(ev):
            now = time.perf_counter()
            first.setdefault(i, now)
            if ev.finish is not None:
                last[i] = now
        return emit
    for i, p in enumerate(prompts):
        eng.submit(Request(p, sink(i), SamplingParams(temperature=0), max_tokens=n_tok, ignore_eos=True))
    while eng.step():
        pass
    return max(first.values()), max(last.values())

run([[1] + [int(t) for t in rng.integers(3, 4000, size=n_prompt - 1)] for _ in range(n)], 4)   # warm: compile, fill
m.reset_expert_stats()
c0 = dict(eng.counters)
prompts = [[1] + [int(t) for t in rng.integers(3, 4000, size=n_prompt - 1)] for _ in range(n)]
t_first, t_end = run(prompts, n_decode)
s = m.expert_stats()
gen = eng.counters["completion_tokens"] - c0["completion_tokens"]
print("RESULT", json.dumps([n * (n_decode - 1) / (t_end - t_first), s["bytes_moved"] / max(gen, 1)]))
"""

_LLAMA = r"""
import ctypes, json, sys, time
path, n, n_prompt, n_decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import numpy as np
from hotcold.llama_amx import guard
guard()
import llama_cpp as L
L.llama_backend_init()
mp = L.llama_model_default_params()
model = L.llama_model_load_from_file(path.encode(), mp)
cp = L.llama_context_default_params()
cp.n_ctx = n * (n_prompt + n_decode + 16)
cp.n_batch = cp.n_ubatch = max(512, n * n_prompt)
cp.n_seq_max = n
cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(max(512, n * n_prompt), 0, n)
rng = np.random.default_rng(0)

def fill(entries):
    batch.n_tokens = len(entries)
    for i, (tok, pos, seq, want) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, want
    if L.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")

def argmax(i):
    return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

def run(prompts, n_tok):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    entries, outs = [], []
    for s, p in enumerate(prompts):
        for j, t in enumerate(p):
            entries.append((t, j, s, j == len(p) - 1))
            if j == len(p) - 1:
                outs.append(len(entries) - 1)
    fill(entries)
    toks = [argmax(i) for i in outs]                  # every sequence's first token
    t0 = time.perf_counter()
    for step in range(n_tok - 1):
        fill([(toks[s], len(prompts[s]) + step, s, True) for s in range(len(prompts))])
        toks = [argmax(i) for i in range(len(prompts))]
    return t0, time.perf_counter()

run([[1] + [int(t) for t in rng.integers(3, 4000, size=n_prompt - 1)] for _ in range(n)], 4)
prompts = [[1] + [int(t) for t in rng.integers(3, 4000, size=n_prompt - 1)] for _ in range(n)]
t0, t1 = run(prompts, n_decode)
print("RESULT", json.dumps([n * (n_decode - 1) / (t1 - t0), 0.0]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--decode", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    files = bench_models(args.work, args.gb, "hotcold-server-")
    print(f"\naggregate decode tokens/s of N greedy sequences ({args.prompt}-token prompts, {args.decode} tokens "
          f"each), {args.threads} threads; medians of {args.reps} runs, engines alternating\n")
    print("| model | N | hotcold | x 1 stream | llama.cpp | x 1 stream | ratio | hotcold 25% budget | "
          "25%: MiB moved / token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in files.items():
        base: dict[str, float] = {}
        for n in args.streams:
            runs: dict[str, list] = {"hotcold": [], "llama.cpp": [], "25%": []}
            common = [str(path), str(n), str(args.prompt), str(args.decode), str(args.threads)]
            for rep in range(args.reps):
                order = ["hotcold", "llama.cpp", "25%"] if rep % 2 == 0 else ["25%", "llama.cpp", "hotcold"]
                for e in order:
                    if e == "llama.cpp":
                        runs[e].append(json.loads(_run(_LLAMA, *common)))
                    else:
                        runs[e].append(json.loads(_run(_HOTCOLD, *common, "plain" if e == "hotcold" else "25%")))
            tps = {e: median([r[0] for r in rs]) for e, rs in runs.items()}
            moved = median([r[1] for r in runs["25%"]]) / 2**20
            base.setdefault("hotcold", tps["hotcold"])
            base.setdefault("llama.cpp", tps["llama.cpp"])
            print(f"| {name} | {n} | {tps['hotcold']:.1f} | {tps['hotcold'] / base['hotcold']:.2f}x | "
                  f"{tps['llama.cpp']:.1f} | {tps['llama.cpp'] / base['llama.cpp']:.2f}x | "
                  f"{tps['hotcold'] / tps['llama.cpp']:.2f}x | {tps['25%']:.1f} | {moved:.2f} |", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
