"""moe-trace: record which experts each prompt of a JSON-lines file uses (eMoE traces, for moe-predictor train).

Every prompt runs from an empty context and generates -n tokens greedily; each MoE layer's selected experts and
gate weights, for the prompt's tokens and the generated ones, and the prompt's mean token embedding are written
to one .npz (engine/trace.py). Progress and a summary go to stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from hotcold.engine.api import Model
from hotcold.engine.options import Options
from hotcold.engine.trace import Traces, read_prompts, trace

from .flags import Parser, add_model, add_options, given, guarded, model_arg

USAGE = "moe-trace MODEL --prompts FILE.jsonl -o TRACES.npz"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-trace", description=__doc__.splitlines()[0])
    add_model(p, "llama-cli")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                   help='one JSON object a line: {"prompt": "...", "task": "..."} (the task label is optional)')
    p.add_argument("-o", "--output", required=True, metavar="TRACES.npz", help="the traces file to write")
    p.add_argument("-n", "--n-predict", type=int, default=32,
                   help="tokens generated greedily after each prompt (default 32; 0: the prompts alone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # tracing with a predictor would record what the predictor already believes
    add_options(p, Options, exclude=("predictor", "predict_every"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    model_arg(p, args, USAGE)
    if args.n_predict < 0:
        p.error(f"-n {args.n_predict}: give the tokens to generate after each prompt (0: trace the prompts alone)")

    def run() -> None:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise ValueError(f"-o {out}: the folder {out.parent} does not exist; create it or write elsewhere")
        prompts = read_prompts(args.prompts)            # a bad line fails before the model loads
        m = Model.load(args.model, **given(args, Options))
        for i, pr in enumerate(prompts, 1):             # named here, not as a bare context error mid-run
            n = len(m.tokenize(pr["prompt"], special=True))
            if n + 1 > m.n_ctx:
                raise ValueError(f"{args.prompts}: prompt {i} has {n} tokens, more than the context of {m.n_ctx} "
                                 "holds with one generated; raise -c (--ctx-size) or shorten the prompt")
        with tqdm(total=len(prompts), desc="tracing", unit="prompt", file=sys.stderr,
                  disable=args.no_progress) as bar:
            traces = trace(m, prompts, max_tokens=args.n_predict, progress=bar.update)
        traces.save(out)                                # a temporary name renamed once complete
        _summary(traces, out)

    return guarded("moe-trace", run, "; lower -c (--ctx-size) or give --ram-budget")


def _summary(t: Traces, out: Path) -> None:
    generated = int(t.output_tokens().sum())
    tasks = sorted(set(t.tasks.tolist()) - {""})
    labels = f", tasks {', '.join(tasks)}" if tasks else ""
    print(f"moe-trace: {t.n_prompts} prompts, {int(t.n_prompt.sum())} prompt tokens and {generated} generated, "
          f"{t.n_layer} MoE layers x {t.n_expert} experts{labels}; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
