"""What the expert store costs when it saves nothing: decode speed with the whole file in RAM.

The plain engine (experts read from the file) against the expert cache at a 100% and a 25% budget (LRU, hot
misses, no ERAS): the same greedy generation in fresh processes, alternating, medians of --reps runs. At
100% every expert is copied into the arena once (during the warm-up) and then hit; at 25% misses copy
experts in and evict, which is real work (bytes moved per token are printed).

    python bench/store.py [--decode 128] [--reps 5] [--gb 1.0]
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
path, budget, n_decode = sys.argv[1], sys.argv[2], int(sys.argv[3])
import numpy as np
from hotcold import Model
opts = {} if budget == "plain" else dict(expert_budget=budget, cache_policy="lru", miss="hot")
m = Model(path, n_ctx=n_decode * 3 + 64, **opts)
greedy = dict(temperature=0, ignore_eos=True)
rng = np.random.default_rng(0)
warm = [1] + [int(t) for t in rng.integers(3, 4000, size=31)]
"".join(m.generate(warm, max_tokens=n_decode, **greedy))          # compile; fill the arena
m.reset_expert_stats()
ids = [1] + [int(t) for t in rng.integers(3, 4000, size=31)]
"".join(m.generate(ids, max_tokens=n_decode, **greedy))
s = m.expert_stats()
t = m.timings
print("RESULT", json.dumps([t["gen_tokens"] / t["gen_s"], s["bytes_moved"] / max(s["tokens"], 1), s["hits"] / max(s["hits"] + s["misses"], 1)]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="runs of each configuration, alternating; medians are printed")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    files = bench_models(args.work, args.gb, "hotcold-store-")
    configs = ["plain", "100%", "25%"]
    print(f"\ndecode tokens/s, {args.decode} tokens after a warm-up generation; medians of {args.reps} runs\n")
    print("| model | plain | 100% budget | ratio | 25% budget | ratio | 25%: MiB moved / token | 25%: hit rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in files.items():
        runs: dict[str, list] = {c: [] for c in configs}
        for rep in range(args.reps):
            for c in (configs if rep % 2 == 0 else configs[::-1]):
                runs[c].append(json.loads(_run(_WORKER, str(path), c, str(args.decode))))
        tps = {c: float(np.median([r[0] for r in runs[c]])) for c in configs}
        moved = float(np.median([r[1] for r in runs["25%"]])) / 2**20
        hit = float(np.median([r[2] for r in runs["25%"]]))
        print(f"| {name} | {tps['plain']:.1f} | {tps['100%']:.1f} | {tps['100%'] / tps['plain']:.2f}x | "
              f"{tps['25%']:.1f} | {tps['25%'] / tps['plain']:.2f}x | {moved:.2f} | {hit:.0%} |", flush=True)


if __name__ == "__main__":
    main()
