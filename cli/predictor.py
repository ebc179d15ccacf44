"""moe-predictor: train eMoE's expert predictor on traces (moe-trace), measure it, and mark the tasks it can skip.

  moe-predictor train TRACES.npz -o PRED.npz        fit a predictor of each prompt's experts per MoE layer
  moe-predictor eval PRED.npz TRACES.npz            top-L accuracy per layer against two baselines (markdown)
  moe-predictor sensitivity MODEL PRED.npz --prompts FILE.jsonl
                                                    per task, how much greedy outputs change with the experts
                                                    restricted to the predicted ones; saved into PRED.npz
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from hotcold.engine.api import Model
from hotcold.engine.options import Options
from hotcold.engine.predictor import (Kind, Net, Predictor, PredictorError, most_frequent, previous_prompt,
                                      top_l_accuracy, train)
from hotcold.engine.sensitivity import task_sensitivity
from hotcold.engine.trace import Traces, read_prompts
from hotcold.keys import predictor_path_for

from .flags import Parser, add_options, given, guarded

PROG = "moe-predictor"


def _count(v: str) -> int:
    """A positive integer argument."""
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: give a positive count")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,sensitivity}")

    t = sub.add_parser("train", help="fit a predictor on traces", description="Fit a predictor of each prompt's "
                       "share of expert selections per MoE layer (prefill and decode) from moe-trace's traces.")
    t.add_argument("traces", metavar="TRACES.npz", help="traces written by moe-trace")
    t.add_argument("-o", "--output", default=None, metavar="PRED.npz", help="the predictor file to write (default: "
                   "MODEL.predictor.npz next to -m's model, which a budget then loads it from)")
    t.add_argument("-m", "--model", default=None, metavar="MODEL", help="the GGUF file the traces are of: the "
                   "predictor goes next to it (MODEL.predictor.npz) unless -o says where")
    t.add_argument("--kind", choices=[k.value for k in Kind], default=Kind.EMBED.value,
                   help="its input: embed, the prompt's mean token embedding (known before the prefill: the only "
                   "kind --predictor loads with); first, the first MoE layer's routing; prev, the layer before's "
                   "(default embed)")
    t.add_argument("--net", choices=[n.value for n in Net], default=Net.LOGISTIC.value,
                   help="softmax regression or one hidden ReLU layer (default logistic)")
    t.add_argument("--hidden", type=_count, default=None, help="with --net mlp: hidden units (default 64)")
    t.add_argument("--steps", type=_count, default=800, help="full-batch Adam steps (default 800)")

    e = sub.add_parser("eval", help="top-L accuracy per layer against baselines", description="Top-L accuracy "
                       "per MoE layer (the share of each prompt's expert selections that fall in the L experts "
                       "predicted for it) of the predictor, of the training prompts' most frequent experts and of "
                       "the previous prompt's experts, as a markdown table. Give traces it was not trained on.")
    e.add_argument("pred_path", metavar="PRED.npz", help="a predictor from moe-predictor train")
    e.add_argument("traces", metavar="TRACES.npz", help="traces of the same model (moe-trace)")
    e.add_argument("--top-l", type=_count, default=None, help="experts predicted per layer (default: a quarter of "
                   "them, what a 25%% --expert-budget holds)")

    s = sub.add_parser("sensitivity", help="measure each task's sensitivity and save it into the predictor",
                       description="For each task label of the prompts, greedy outputs with every layer's experts "
                       "restricted to the predicted top-L against the unrestricted ones; a task whose outputs stay "
                       ">= 85%% equal is insensitive (--predictor then skips its prediction and serves its misses "
                       "cold). Written into PRED.npz.")
    s.add_argument("model", metavar="MODEL", help="the GGUF file the predictor was trained for")
    s.add_argument("pred_path", metavar="PRED.npz", help="a predictor from moe-predictor train (updated in place)")
    s.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='prompts with "task" labels, as moe-trace '
                   "reads them")
    s.add_argument("--top-l", type=_count, default=None, help="experts allowed per layer (default: what "
                   "--expert-budget holds per layer, else a quarter of them)")
    s.add_argument("-n", "--n-predict", type=_count, default=32, help="greedy tokens compared per prompt (default 32)")
    s.add_argument("--per-task", type=_count, default=8, help="prompts measured per task at most (default 8)")
    add_options(s, Options, exclude=("predictor", "predict_every"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if getattr(args, "hidden", None) is not None and args.net != Net.MLP.value:
        p.error("--hidden is the MLP's width: give it with --net mlp")
    body = {"train": _train, "eval": _eval, "sensitivity": _sensitivity}[args.command]
    return guarded(f"{PROG} {args.command}", lambda: body(args))


# --- the subcommands --------------------------------------------------------------------------------------------

def _train(args: argparse.Namespace) -> None:
    if args.output is None and args.model is None:
        raise ValueError("say where the predictor goes: -o PRED.npz, or -m MODEL.gguf for MODEL.predictor.npz next "
                         "to the model")
    out = Path(args.output) if args.output is not None else predictor_path_for(Path(args.model))
    if not out.parent.is_dir():
        raise ValueError(f"-o {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    traces = Traces.load(args.traces)
    if args.model is not None and traces.model and Path(args.model).name != traces.model:
        raise ValueError(f"-m {args.model}: {args.traces} holds traces of {traces.model}, not of this file")
    kind, net = Kind(args.kind), Net(args.net)
    pred = train(traces, kind, net, hidden=args.hidden or 64, steps=args.steps)
    pred.save(out)
    tasks = f", tasks {', '.join(sorted(pred.tasks))}" if pred.tasks else ""
    print(f"{PROG}: trained a predictor ({kind.value}, {net.value}) on {traces.n_prompts} prompts of {traces.model} "
          f"({len(pred.layers)} MoE layers x {pred.n_expert} experts{tasks}); wrote {out}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> None:
    pred = Predictor.load(args.pred_path)
    traces = Traces.load(args.traces)
    _check_pair(pred, traces, args.pred_path, args.traces)
    top_l = _top_l(args.top_l, pred.n_expert)
    actual = traces.usage("all")                                           # (P, L, E)
    if pred.kind is Kind.EMBED:
        predicted = pred.predict_many(features=traces.features)
    else:
        predicted = pred.predict_many(routing=traces.usage("prefill"))
    columns = {"predictor": predicted,
               "most frequent": most_frequent(pred.prior[None], traces.n_prompts),
               "previous prompt": previous_prompt(actual, pred.prior)}
    acc = {name: top_l_accuracy(x, actual, top_l) for name, x in columns.items()}
    print(f"top-{top_l} accuracy of {args.pred_path} ({pred.kind.value} {pred.net.value}) on {traces.n_prompts} "
          f"prompts of {args.traces}: the share of each layer's expert selections among the {top_l} predicted",
          file=sys.stderr)
    rows = [[str(l)] + [f"{a[i]:.3f}" for a in acc.values()] for i, l in enumerate(traces.layers.tolist())]
    rows.append(["mean"] + [f"{a.mean():.3f}" for a in acc.values()])
    _table(["layer", *columns], rows, right=range(1, len(columns) + 1))


def _sensitivity(args: argparse.Namespace) -> None:
    prompts = read_prompts(args.prompts)
    labelled = sorted({q["task"] for q in prompts} - {""})
    if not labelled:
        raise ValueError(f'{args.prompts}: no prompt has a "task" label; sensitivity is measured per task')
    pred = Predictor.load(args.pred_path)
    m = Model.load(args.model, **given(args, Options))
    cfg = m.model.cfg
    pred.check_model(cfg.n_embd, tuple(i for i, moe in enumerate(cfg.moe_layers) if moe), cfg.n_expert, m.path.name)
    per_layer = m.cache.arena.n_slots // len(pred.layers) if m.cache is not None else None
    top_l = _top_l(args.top_l if args.top_l is not None else per_layer, pred.n_expert)
    print(f"{PROG}: measuring {len(labelled)} tasks, top-{top_l} experts per layer, {args.n_predict} tokens per "
          "prompt", file=sys.stderr)
    measured = task_sensitivity(m, pred, prompts, top_l, n=args.n_predict, per_task=args.per_task)
    measured.save(args.pred_path)
    rows = []
    for name in labelled:
        info = measured.tasks[name]
        n = min(sum(q["task"] == name for q in prompts), args.per_task)
        rows.append([name, str(n), f"{info.similarity:.3f}", "yes" if info.sensitive else "no"])
    _table(["task", "prompts", "similarity", "sensitive"], rows, right=(1, 2))
    print(f"{PROG}: wrote the sensitivity of {len(labelled)} tasks into {args.pred_path}", file=sys.stderr)


# --- helpers ----------------------------------------------------------------------------------------------------

def _top_l(given_l: int | None, n_expert: int) -> int:
    """The experts per layer to predict: as given (at most all of them), else a quarter of them."""
    if given_l is None:
        return max(1, math.ceil(n_expert / 4))
    if given_l > n_expert:
        raise ValueError(f"--top-l {given_l}: a layer has only {n_expert} experts")
    return max(given_l, 1)                        # an arena of fewer slots than MoE layers: still one


def _check_pair(pred: Predictor, traces: Traces, pred_path: str, traces_path: str) -> None:
    """A one-line error when the traces are of another model than the predictor was trained for."""
    theirs = (traces.features.shape[1], tuple(traces.layers.tolist()), traces.n_expert)
    if (pred.n_embd, pred.layers, pred.n_expert) != theirs:
        raise PredictorError(
            f"{pred_path} was trained on {pred.model or 'another model'} (n_embd {pred.n_embd}, MoE layers "
            f"{len(pred.layers)}, {pred.n_expert} experts) but {traces_path} traces {traces.model or 'another model'} "
            f"(n_embd {theirs[0]}, MoE layers {len(theirs[1])}, {theirs[2]} experts): evaluate on traces of the "
            "predictor's model")
    if pred.prior is None:
        raise PredictorError(f"{pred_path} has no training usage for the baselines; retrain it with moe-predictor "
                             "train")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    """A markdown table on stdout, numbers (columns in `right`) right-aligned."""
    right = set(right)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    sys.exit(main())
