"""Every kernel under NUMBA_BOUNDSCHECK=1 on valid files: no index out of bounds, anywhere.

Numba kernels do not check indices; a wrong one reads or writes past a buffer silently. This recompiles
everything with bounds checks (into its own cache directory, so the normal cache is left alone) and runs the
micro model of every architecture (tests/micro_models.py) at Q8_0 and Q4_0, the shipped trained model at Q4_K
through prefill in several batches, decode, all-logits passes and the expert store (a 25% arena, adaptive
misses served by cold copies, ERAS, prefetch, a RAM budget). An out-of-bounds access raises IndexError in
the child, which is reported with its traceback. Not in CI: compiling everything twice takes minutes.

    python bench/boundscheck.py [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# one child per model: the kernels compile once into the shared bounds-checked cache
CHILD = r'''
import json, sys, traceback
import numpy as np
from hotcold.engine.api import Model
path, moe = sys.argv[1], sys.argv[2] == "1"
runs = [dict(n_ctx=96, n_batch=16)]
if moe:
    runs += [dict(n_ctx=96, n_batch=16, expert_budget="25%", miss="adaptive", eras_alpha=0.1, prefetch=1),
             dict(n_ctx=96, n_batch=7, expert_budget="50%", miss="cold"),
             dict(n_ctx=96, n_batch=16, ram_budget="90%")]
out = []
for opts in runs:
    try:
        m = Model.load(path, **opts)
        ids = [int(t) for t in np.random.default_rng(0).integers(1, m.n_vocab, size=40)]
        m.logits(ids)                                       # all-logits prefill, 16 (or 7) at a time
        "".join(m.generate(ids[:20], max_tokens=12, temperature=0.7, seed=1))   # prefill + decode
        out.append({"options": opts, "ok": True})
    except Exception:
        out.append({"options": opts, "ok": False, "error": traceback.format_exc()[-3000:]})
print(json.dumps(out))
'''


def models(work: Path) -> list[tuple[str, Path, bool]]:
    sys.path.insert(0, str(REPO / "tests"))
    import micro_models
    from hotcold.convert import convert
    from hotcold.quant import QType
    out = []
    for variant, (_, moe, *_rest) in micro_models.VARIANTS.items():
        for qt in (QType.Q8_0, QType.Q4_0):   # rows of 32: the K-quants run on the trained model
            p = work / f"{variant}-{qt.name.lower()}.gguf"
            if not p.exists():
                micro_models.write(variant, p, qt)
            out.append((p.stem, p, False))   # written directly: no cold copies, no expert hash
    trained = work / "trained-q4_k.gguf"
    if not trained.exists():
        convert(REPO / "models" / "mixtral-trained", trained, type="q4_k", cold_type="q2_k", progress=False)
    out.append((trained.stem, trained, True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the models and the bounds-checked cache")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hotcold-boundscheck-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(work / "numba-cache")}
    bad = 0
    for name, path, moe in models(work):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if moe else "0"], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: the child failed (exit {r.returncode})\n{r.stderr[-3000:]}")
            bad += 1
            continue
        results = json.loads(r.stdout.strip().splitlines()[-1])
        for res in results:
            status = "ok" if res["ok"] else "FAILED"
            print(f"{name:22s} {json.dumps(res['options']):90s} {status}", flush=True)
            if not res["ok"]:
                print(res["error"])
                bad += 1
        print(f"{'':22s} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("no out-of-bounds access" if not bad else f"{bad} runs failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
