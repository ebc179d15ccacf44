"""Aggregate decode speed of many sequences at once: moe-server's batch engine against llama.cpp decoding the
same number of sequences in one batch, on the same file and threads, in one run.

For each model (the shipped trained Mixtral at Q8_0, a generated Mixtral-shaped model of about --gb GB at
Q4_K: top-2 of 8 experts) and each stream count N in --streams, N greedy sequences of --prompt random tokens
each are started and their --decode tokens timed. hotcold: each fresh process loads one model per N (sharing
the file's pages), warms each up, then runs --rounds rounds over the stream counts, alternating their order, so
that the "x 1 stream" ratios compare runs made side by side; hotcold
through hotcold.engine.batch.BatchEngine stepped on the loading thread (what moe-server runs: prompts prefilled together, then one forward
pass per step for all N), llama.cpp through llama-cpp-python's low-level API (one llama_batch of N sequence
ids per step, llama_decode, argmax of each sequence's logits: llama.cpp's batched example). Decode tokens/s
is N x (decode - 1) tokens over the time from the step in which the last sequence got its first token to
the end. The engines alternate, --reps times; medians. hotcold also runs with a 25% expert budget (LRU, hot
misses) and reports the expert bytes moved per generated token. "experts / layer": the distinct experts a decode
step computes in a layer (counted after the timing, on 16 more tokens): how many experts' weights N sequences
share, which sets the memory-bound ceiling of "x 1 stream" (8 random tokens of top-2 of 8 would touch 7.2).

    python bench/server.py [--streams 1 2 4 8] [--gb 1.0] [--decode 64] [--reps 3] [--rounds 3] [--threads 2]
                           [--models trained generated] [--work DIR] [--no-repack]
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
path, streams, n_prompt, n_decode, threads, budget, rounds, no_repack = (sys.argv[1], [int(x) for x in sys.argv[2].split(",")],
    int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7]), sys.argv[8] == "1")
import numpy as np
from hotcold import Model
from hotcold.engine.batch import BatchEngine, Request
from hotcold.engine.sampling import SamplingParams
opts = {} if budget == "plain" else dict(expert_budget=budget, cache_policy="lru", miss="hot")
opts["no_repack"] = no_repack
rng = np.random.default_rng(0)

def engine(n):
    m = Model(path, n_ctx=n_prompt + n_decode + 16, n_seq_max=n, n_batch=max(512, n * n_prompt), n_threads=threads,
              **opts)
    return m, BatchEngine(m)   # stepped on this thread, as moe-server runs it (engine/batch.py)

def run(eng, prompts, n_tok):
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

def prompts(n):
    return [[1] + [int(t) for t in rng.integers(3, 4000, size=n_prompt - 1)] for _ in range(n)]

engines = {n: engine(n) for n in streams}          # one model per stream count, sharing the file's pages
for n, (m, eng) in engines.items():
    run(eng, prompts(n), 4)                         # warm: compile, fill
out = {n: [] for n in streams}
for r in range(rounds):                             # the counts alternate, so drifts of the machine hit all alike
    for n in (streams if r % 2 == 0 else streams[::-1]):
        m, eng = engines[n]
        m.reset_expert_stats()
        c0 = dict(eng.counters)
        t_first, t_end = run(eng, prompts(n), n_decode)
        gen = eng.counters["completion_tokens"] - c0["completion_tokens"]
        out[n].append([n * (n_decode - 1) / (t_end - t_first), m.expert_stats()["bytes_moved"] / max(gen, 1)])
from hotcold.engine import moe                      # after the timing: the distinct experts a decode step computes
seen = []
groups = moe.Plan.groups
def counted(self, routing):
    gs = list(groups(self, routing))
    seen.append((routing.experts.shape[0], len(gs)))
    return iter(gs)
moe.Plan.groups = counted
experts = {}
for n, (m, eng) in engines.items():
    seen.clear()
    run(eng, prompts(n), min(n_decode, 16))
    per = [g for t, g in seen if t == n]               # decode steps (every sequence one row), per layer
    experts[n] = sum(per) / max(len(per), 1)
moe.Plan.groups = groups
print("RESULT", json.dumps({"tps": out, "experts": experts}))
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
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per engine and configuration")
    ap.add_argument("--rounds", type=int, default=3, help="hotcold: rounds of every stream count in each process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--models", nargs="+", choices=["trained", "generated"], default=["trained", "generated"])
    ap.add_argument("--no-repack", action="store_true", help="hotcold with Q4_K as the file lays it out (moe-run -nr)")
    args = ap.parse_args()
    files = {name: path for name, path in bench_models(args.work, args.gb, "hotcold-server-").items()
             if name.split()[0] in args.models}
    print(f"\naggregate decode tokens/s of N greedy sequences ({args.prompt}-token prompts, {args.decode} tokens "
          f"each), {args.threads} threads; hotcold: medians of {args.reps} processes x {args.rounds} rounds alternating "
          f"the stream counts{' (--no-repack)' if args.no_repack else ''}; llama.cpp: medians of {args.reps} runs, "
          "alternating with hotcold's processes\n")
    print("| model | N | experts / layer | hotcold | x 1 stream | llama.cpp | x 1 stream | ratio | hotcold 25% budget | "
          "25%: MiB moved / token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    streams = ",".join(str(n) for n in args.streams)
    for name, path in files.items():
        hot: dict[str, dict[int, list]] = {"plain": {n: [] for n in args.streams}, "25%": {n: [] for n in args.streams}}
        llama: dict[int, list] = {n: [] for n in args.streams}
        experts: dict[int, list] = {n: [] for n in args.streams}
        for rep in range(args.reps):
            for e in (["plain", "llama.cpp", "25%"] if rep % 2 == 0 else ["25%", "llama.cpp", "plain"]):
                if e == "llama.cpp":
                    for n in args.streams:
                        llama[n].append(json.loads(_run(_LLAMA, str(path), str(n), str(args.prompt), str(args.decode),
                                                        str(args.threads)))[0])
                    continue
                got = json.loads(_run(_HOTCOLD, str(path), streams, str(args.prompt), str(args.decode),
                                      str(args.threads), e, str(args.rounds), "1" if args.no_repack else "0"))
                for n in args.streams:
                    hot[e][n] += got["tps"][str(n)]
                    if e == "plain":
                        experts[n].append(got["experts"][str(n)])
        tps = {e: {n: median([r[0] for r in rs]) for n, rs in d.items()} for e, d in hot.items()}
        ll = {n: median(v) for n, v in llama.items()}
        one = args.streams[0]
        for n in args.streams:
            moved = median([r[1] for r in hot["25%"][n]]) / 2**20
            print(f"| {name} | {n} | {median(experts[n]):.1f} | {tps['plain'][n]:.1f} | {tps['plain'][n] / tps['plain'][one]:.2f}x | "
                  f"{ll[n]:.1f} | {ll[n] / ll[one]:.2f}x | {tps['plain'][n] / ll[n]:.2f}x | {tps['25%'][n]:.1f} | "
                  f"{moved:.2f} |", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
