"""moe-perplexity: llama-perplexity's measure of a GGUF model on a text file, with its output lines.

Chunks of -c tokens, each starting with BOS, the second half of each scored; a running estimate per chunk
([1]x,[2]y,... on stdout) and llama.cpp's final line `Final estimate: PPL = X +/- Y`, Y its standard error
(llama.cpp's perplexity.cpp: PPL * sqrt(var(nll) / (count - 1))). The numbers are Model.perplexity's.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from hotcold.engine.api import Model
from hotcold.engine.options import Options

from .flags import Parser, add_options, given, guarded


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-perplexity", description=__doc__.splitlines()[0])
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="GGUF file; or -m")
    p.add_argument("-m", "--model", dest="model", default=None, help="GGUF file, as llama-perplexity's -m")
    p.add_argument("-f", "--file", required=True, help="the text to score")
    add_options(p, Options)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.model is None) == (args.model_pos is None):
        p.error("give the model once: moe-perplexity MODEL -f FILE or -m MODEL -f FILE")
    opts = given(args, Options)

    def run() -> None:
        with open(args.file, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        m = Model.load(args.model or args.model_pos, **opts)
        n_ctx = m.n_ctx if opts.get("n_ctx") else min(512, m.n_ctx)   # llama-perplexity's 512, or what was learnt
        n_tokens = len(m.tokenize(text, add_bos=False))
        if n_tokens < n_ctx:
            raise ValueError(f"{args.file} has {n_tokens} tokens; perplexity needs at least n_ctx={n_ctx} (lower -c)")
        print(f"perplexity: tokenized {n_tokens} tokens; {n_tokens // n_ctx} chunks of n_ctx={n_ctx}", file=sys.stderr)
        t0, nll = time.perf_counter(), []
        for i, chunk in enumerate(m.perplexity_chunks(text, n_ctx), 1):
            nll.append(chunk)
            print(f"[{i}]{math.exp(np.concatenate(nll).mean()):.4f},", end="", flush=True)
        all_nll = np.concatenate(nll)
        mean, count = float(all_nll.mean()), len(all_nll)
        ppl = math.exp(mean)
        var = float((all_nll ** 2).mean()) - mean * mean
        err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
        print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}", flush=True)
        print(f"perplexity: {count} tokens scored in {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    return guarded("moe-perplexity", run)


if __name__ == "__main__":
    sys.exit(main())
