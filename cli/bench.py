"""moe-bench: llama-bench's table for a GGUF model: prompt processing (ppN) and generation (tgN) tokens/s.

As llama-bench measures: ppN evaluates N prompt tokens into an empty context; tgN generates N tokens one at a
time from an empty context; a warm-up run first, then -r repetitions, mean +/- standard deviation. With
--vs-llama-cpp, llama.cpp (llama-cpp-python, its defaults) runs the same tests on the same file in the same
process, alternating with hotcold per repetition, and the table gains its t/s and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np

from hotcold.engine.api import Model
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.options import Options

from .flags import Parser, add_options, given, guarded


def _ints(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: expected comma-separated integers") from None
    if not out or any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"{v!r}: expected non-negative integers")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-bench", description=__doc__.splitlines()[0])
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="GGUF file; or -m")
    p.add_argument("-m", "--model", dest="model", default=None, help="GGUF file, as llama-bench's -m")
    p.add_argument("-p", "--n-prompt", type=_ints, default=[512], help="prompt lengths (default 512)")
    p.add_argument("-n", "--n-gen", type=_ints, default=[128], help="generation lengths (default 128)")
    p.add_argument("-t", "--threads", type=_ints, default=None, help="thread counts (default: all cores)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions of each test (default 5)")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md", help="output format (default md)")
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on the same file, alternating, and print the ratio")
    add_options(p, Options, exclude=("n_threads",))   # -t is a list here, as llama-bench's
    return p


def _tests(reset: Callable[[], None], eval: Callable[[list[int]], None]) -> dict[str, Callable[[list[int]], None]]:
    """llama-bench's two tests over an engine's reset and eval: ppN all at once, tgN one token at a time."""
    def pp(ids: list[int]) -> None:
        reset()
        eval(ids)

    def tg(ids: list[int]) -> None:
        reset()
        for t in ids:
            eval([t])
    return {"pp": pp, "tg": tg}


def _llama(path: Path, n_ctx: int, threads: int) -> tuple[Any, dict[str, Callable[[list[int]], None]]]:
    from hotcold.llama_amx import guard
    guard()   # llama.cpp's AMX buffers fault on some VMs; refused, it runs as on a CPU without AMX
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)
    return llm, _tests(llm.reset, llm.eval)


def _timed(fn: Callable[[list[int]], None], ids: list[int]) -> float:
    t0 = time.perf_counter()
    fn(ids)
    return len(ids) / (time.perf_counter() - t0)


def _describe(f: GGUFFile) -> dict[str, Any]:
    params = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    label = f.get_typed("general.size_label", str) or (f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M")
    types = [t.qtype.name for t in f.tensors.values() if len(t.shape) >= 2]
    main = max(set(types), key=types.count) if types else "?"
    return {"model": f"{f.get_typed('general.architecture', str)} {label} {main}", "size": f.size, "params": params}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.model is None) == (args.model_pos is None):
        p.error("give the model once: moe-bench MODEL or moe-bench -m MODEL")
    if args.repetitions < 1:
        p.error(f"-r {args.repetitions}: give at least 1")
    path = Path(args.model or args.model_pos)
    tests = [("pp", n) for n in args.n_prompt if n] + [("tg", n) for n in args.n_gen if n]
    def run() -> None:
        opts = given(args, Options)
        n_ctx = max([n for _, n in tests] + [16]) + 16
        m = Model.load(path, **{**opts, "n_ctx": max(opts.get("n_ctx", 0), n_ctx)})
        info = _describe(m.file)
        threads = args.threads or [numba.config.NUMBA_NUM_THREADS]
        rng = np.random.default_rng(0)
        rows = []
        for t in threads:
            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
            engines = {"hotcold": _tests(m.reset, m.eval)}
            llm = None
            if args.vs_llama_cpp:
                llm, engines["llama.cpp"] = _llama(path, n_ctx, t)
            for kind, n in tests:
                ids = [int(x) for x in rng.integers(3, m.n_vocab, size=n)]
                samples: dict[str, list[float]] = {e: [] for e in engines}
                for e, fns in engines.items():
                    fns[kind](ids[:min(n, 16)])                            # warm-up, as llama-bench does
                for _ in range(args.repetitions):
                    for e, fns in engines.items():                           # alternating, each repetition
                        samples[e].append(_timed(fns[kind], ids))
                rows.append({**info, "backend": "CPU" if m.gpu is None else "CUDA", "n_threads": t,
                             "test": f"{kind}{n}", **{_key(e): _summary(s) for e, s in samples.items()}})
            if llm is not None:
                llm.close()
        _print(rows, args.output, args.vs_llama_cpp)

    return guarded("moe-bench", run)


def _key(engine: str) -> str:
    return "hotcold" if engine == "hotcold" else "llama_cpp"


def _summary(s: list[float]) -> dict[str, Any]:
    return {"avg_ts": statistics.mean(s), "stddev_ts": statistics.stdev(s) if len(s) > 1 else 0.0, "samples_ts": s}


def _print(rows: list[dict[str, Any]], fmt: str, vs: bool) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    head = ["model", "size", "params", "backend", "threads", "test", "t/s"] + (["llama.cpp t/s", "ratio"] if vs else [])
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" if i < 4 else "---:" for i in range(len(head))) + " |")
    for r in rows:
        h = r["hotcold"]
        cells = [r["model"], f"{r['size'] / 2**30:.2f} GiB", f"{r['params'] / 1e6:.2f} M", r["backend"],
                 str(r["n_threads"]), r["test"], f"{h['avg_ts']:.2f} ± {h['stddev_ts']:.2f}"]
        if vs:
            ll = r["llama_cpp"]
            cells += [f"{ll['avg_ts']:.2f} ± {ll['stddev_ts']:.2f}", f"{h['avg_ts'] / ll['avg_ts']:.2f}x"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
