"""What the expert store costs when it saves nothing: decode speed with the whole file in RAM.

The plain engine (experts read from the file) against the expert cache at a 100% and a 25% budget (LRU, hot
misses, no ERAS): the same greedy generation, alternating. Each of --reps fresh processes loads the three, warms
each up, then runs --rounds rounds of the three in turn (ABC, CBA, ...), so drifts of the machine's speed fall
on all three alike; medians over every run. At 100% on the CPU the arena is the mapped file itself (nothing is
copied); at 25% misses load experts into the arena and evict, which is real work (bytes moved per token are
printed), each decode miss copied by its own computation.

    python bench/store.py [--decode 128] [--reps 3] [--rounds 4] [--gb 1.0] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import _run, bench_models  # noqa: E402


_WORKER = r"""
import json, sys
path, n_decode, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import numpy as np
from hotcold import Model
configs = ["plain", "100%", "25%"]
models = {c: Model(path, n_ctx=n_decode * 3 + 64, **({} if c == "plain" else
                   dict(expert_budget=c, cache_policy="lru", miss="hot"))) for c in configs}
greedy = dict(temperature=0, ignore_eos=True)
rng = np.random.default_rng(0)
warm = [1] + [int(t) for t in rng.integers(3, 4000, size=31)]
prompts = [[1] + [int(t) for t in rng.integers(3, 4000, size=31)] for _ in range(rounds)]   # a new one each round
for m in models.values():
    "".join(m.generate(warm, max_tokens=n_decode, **greedy))      # compile; fill the arena
out = {c: [] for c in configs}
for r in range(rounds):
    for c in (configs if r % 2 == 0 else configs[::-1]):
        m = models[c]
        m.reset_expert_stats()
        "".join(m.generate(prompts[r], max_tokens=n_decode, **greedy))
        s, t = m.expert_stats(), m.timings
        out[c].append([t["gen_tokens"] / t["gen_s"], s["bytes_moved"] / max(s["tokens"], 1),
                       s["hits"] / max(s["hits"] + s["misses"], 1)])
print("RESULT", json.dumps(out))
print("RAW", {c: [round(x[0]) for x in v] for c, v in out.items()}, file=sys.stderr)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="fresh processes, each running every configuration")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the three configurations in each process")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    files = bench_models(args.work, args.gb, "hotcold-store-")
    configs = ["plain", "100%", "25%"]
    print(f"\ndecode tokens/s, {args.decode} tokens after a warm-up generation; medians of {args.reps} processes x "
          f"{args.rounds} alternating rounds\n")
    print("| model | plain | 100% budget | ratio | 25% budget | ratio | 25%: MiB moved / token | 25%: hit rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in files.items():
        runs: dict[str, list] = {c: [] for c in configs}
        for _ in range(args.reps):
            for c, rs in json.loads(_run(_WORKER, str(path), str(args.decode), str(args.rounds))).items():
                runs[c] += rs
        tps = {c: float(np.median([r[0] for r in runs[c]])) for c in configs}
        moved = float(np.median([r[1] for r in runs["25%"]])) / 2**20
        hit = float(np.median([r[2] for r in runs["25%"]]))
        print(f"| {name} | {tps['plain']:.1f} | {tps['100%']:.1f} | {tps['100%'] / tps['plain']:.2f}x | "
              f"{tps['25%']:.1f} | {tps['25%'] / tps['plain']:.2f}x | {moved:.2f} | {hit:.0%} |", flush=True)


if __name__ == "__main__":
    main()
