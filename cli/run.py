"""moe-run: one-shot completion (-p) or interactive chat over a GGUF model, streamed to stdout.

Generated text goes to stdout, flushed per piece; logs, timings and errors go to stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hotcold.engine.api import Model, file_defaults
from hotcold.engine.options import Options
from hotcold.engine.sampling import SamplingParams

from .flags import Parser, add_model, add_options, given, guarded, model_arg


# llama-cli flags for what hotcold does not have: named as such, not mistaken for something else
UNSUPPORTED = ("-fa", "--flash-attn", "--mlock", "--no-mmap", "-ngld", "--n-gpu-layers-draft", "--lora",
               "--lora-scaled", "--control-vector", "-md", "--model-draft", "--grammar", "--grammar-file", "-j",
               "--json-schema", "-i", "--interactive", "-if", "--interactive-first", "-sm", "--split-mode", "-ts",
               "--tensor-split", "-mg", "--main-gpu", "--numa", "-cb", "--cont-batching", "-np", "--parallel",
               "--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale", "--yarn-orig-ctx",
               "-dt", "--defrag-thold", "--mirostat", "--mirostat-lr", "--mirostat-ent", "--typical",
               "--dynatemp-range", "--presence-penalty", "--frequency-penalty", "--dry-multiplier",
               "--xtc-probability", "--jinja", "--chat-template", "--chat-template-file", "-e", "--escape",
               "--keep", "--prompt-cache", "--in-prefix", "--in-suffix", "-tb", "--threads-batch", "-ub",
               "--ubatch-size", "-ot", "--override-tensor", "-dev", "--device-draft", "--log-file")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-run", description="Run a GGUF MoE model: `-p PROMPT` "
                                "for a one-shot completion, no -p (or -cnv) for an interactive chat (the model's "
                                "chat template). Flags are llama-cli's where hotcold has the feature.")
    add_model(p, "llama-cli")
    p.add_argument("-p", "--prompt", help="complete this prompt and exit (with -cnv: the system prompt)")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this file")
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help="tokens to generate: -1 until end of text (or the context), 0 none (default: 256 for a "
                   "completion, to the end of the turn in a chat)")
    p.add_argument("-r", "--reverse-prompt", "--stop", dest="stop", action="append", default=[],
                   help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("-sys", "--system-prompt", "--system", dest="system", default=None,
                   help="system message for the chat")
    conv = p.add_mutually_exclusive_group()
    conv.add_argument("-cnv", "--conversation", dest="conversation", action="store_const", const=True, default=None,
                      help="chat mode (the default without -p)")
    conv.add_argument("-no-cnv", "--no-conversation", dest="conversation", action="store_const", const=False,
                      help="one-shot completion (the default with -p)")
    p.add_argument("--no-display-prompt", action="store_true",
                   help="accepted for llama-cli: hotcold never echoes the prompt, stdout is the generated text")
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="ngl", type=int, default=None, metavar="N",
                   help="llama-cli's layer offload: N > 0 runs on the GPU (--device cuda), 0 on the CPU")
    add_options(p, Options)
    add_options(p, SamplingParams)
    r = next(g for g in p._action_groups if g.title == "expert residency (see README)")
    r.add_argument("--stats", action="store_true", help="print per-layer expert cache statistics to stderr")
    r.add_argument("--heatmap", default=None, metavar="PNG", help="save a layer x expert activation heatmap")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, llama-cli's aliases resolved; a llama-cli flag hotcold lacks is named as such (exit 2)."""
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    for a in argv:
        if a.split("=", 1)[0] in UNSUPPORTED:
            p.error(f"{a.split('=', 1)[0]} is a llama-cli flag that hotcold does not support")
    args = p.parse_args(argv)
    model_arg(p, args, "moe-run MODEL or moe-run -m MODEL")
    if args.file is not None:
        if args.prompt is not None:
            p.error("give the prompt with -p or -f, not both")
        try:
            with open(args.file, encoding="utf-8", errors="replace") as fh:
                args.prompt = fh.read()
        except OSError as e:
            p.error(f"cannot read -f {args.file}: {e.strerror}")
    if args.ngl is not None:
        if args.ngl < 0:
            p.error(f"-ngl {args.ngl}: give 0 (CPU) or a positive count (GPU)")
        if getattr(args, "device", None) is not None and (args.device == "cuda") != (args.ngl > 0):
            p.error(f"-ngl {args.ngl} and --device {args.device} disagree")
        args.device = "cuda" if args.ngl > 0 else "cpu"
    if args.n_predict is not None and args.n_predict < -2:
        p.error(f"-n {args.n_predict}: give -1 (until the end), 0 (none) or a count")
    return args


def _stats(m: Model) -> None:
    s = m.expert_stats()
    cols = ("tokens", "hits", "misses", "hot", "cold", "cold_uploaded", "skipped", "loads", "prefetched", "MiB_moved")

    def row(d: dict) -> list[Any]:
        return [d["tokens"], d["hits"], d["misses"], d["misses"] - d["cold"] - d["skipped"], d["cold"],
                d["cold_uploaded"], d["skipped"], d["loads"], d["prefetched"], f"{d['bytes_moved'] / 2**20:.2f}"]

    print("layer " + " ".join(f"{c:>13}" for c in cols) + "   prefetch", file=sys.stderr)
    for i, layer in enumerate(s["layers"]):
        acc = f"{layer['predicted_right'] / layer['predicted']:.2f}" if layer["predicted"] else "-"
        print(f"{i:5d} " + " ".join(f"{v:>13}" for v in row(layer)) + f"   {acc:>8}", file=sys.stderr)
    acc = f"{s['prefetch_accuracy']:.2f}" if s["prefetch_accuracy"] is not None else "-"
    print("total " + " ".join(f"{v:>13}" for v in row(s)) + f"   {acc:>8}", file=sys.stderr)
    if m.predictor is not None:
        print(f"expert predictor {m.options.predictor}: {s['predictions']} predictions, {s['prediction_reuses']} "
              f"reused, {s['preloaded']} experts loaded ahead, {s['insensitive_prompts']} prompts of insensitive "
              "tasks", file=sys.stderr)
    if m.options.token_lookup:
        print(f"token lookup: {s['token_lookups']} generated tokens predicted from an earlier occurrence",
              file=sys.stderr)
    n = s["tokens"]
    if n:
        print(f"per token: {s['misses'] / n:.2f} misses, {s['bytes_moved'] / n / 2**20:.3f} MiB moved, "
              f"{s.get('disk_bytes', 0) / n / 2**20:.3f} MiB read from disk, stall {s['stall_s'] / n * 1e3:.3f} ms, "
              f"compute {s['compute_s'] / n * 1e3:.3f} ms, {s['major_faults'] / n:.2f} major page faults",
              file=sys.stderr)
        rates = s.get("hit_rate") or {}
        shown = ", ".join(f"{k} {v:.1%}" for k, v in rates.items() if v is not None)
        if shown:
            print(f"served by tier: {shown}", file=sys.stderr)
    print("counts are (token, expert) selections: hits + misses = tokens x experts used; misses = hot (computed at "
          "full precision: loaded into the arena, or read from the file when no slot could be freed) + cold "
          "(computed with the cold copy; cold_uploaded: of those, on the GPU) + skipped (dropped by gate weight); "
          "loads: hot copies brought in, for misses, prefetches (prefetched) and background reads; MiB_moved: "
          "MiB of hot copies loaded plus cold copies computed with; prefetch: share of selections predicted",
          file=sys.stderr)


def _sampling(args: argparse.Namespace, default: int) -> dict[str, Any]:
    n = default if args.n_predict is None else args.n_predict
    return dict(max_tokens=-1 if n < 0 else n, stop=args.stop or None, ignore_eos=args.ignore_eos,
                **given(args, SamplingParams))


def _stream(pieces) -> str:
    text = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        text.append(piece)
    return "".join(text)


def _timings(m: Model) -> None:
    """llama.cpp's llama_perf_context_print lines, then a one-line summary."""
    t, p = m.timings, "hotcold_perf_context_print:"
    print(f"\n{p}        load time = {t['load_s'] * 1e3:10.2f} ms", file=sys.stderr)
    rates = []
    if t.get("prompt_tokens"):
        n, s = t["prompt_tokens"], t["prompt_s"]
        print(f"{p} prompt eval time = {s * 1e3:10.2f} ms / {n:5.0f} tokens ({s * 1e3 / n:8.2f} ms per token, "
              f"{n / max(s, 1e-9):8.2f} tokens per second)", file=sys.stderr)
        rates.append(f"prompt: {n / max(s, 1e-9):.1f} tokens/s")
    if t.get("eval_runs"):
        n, s = t["eval_runs"], t["eval_s"]
        print(f"{p}        eval time = {s * 1e3:10.2f} ms / {n:5.0f} runs   ({s * 1e3 / n:8.2f} ms per token, "
              f"{n / max(s, 1e-9):8.2f} tokens per second)", file=sys.stderr)
        rates.append(f"decode: {n / max(s, 1e-9):.1f} tokens/s")
    if t.get("prompt_tokens"):
        total = t["prompt_s"] + t["gen_s"]
        print(f"{p}       total time = {total * 1e3:10.2f} ms / {t['prompt_tokens'] + t['gen_tokens']:5.0f} tokens",
              file=sys.stderr)
    if rates:
        print(", ".join(rates), file=sys.stderr)


def chat(m: Model, args: argparse.Namespace) -> None:
    """llama-cli's conversation: a reply runs to the end of its turn (or -n); Ctrl-C stops the reply and
    returns to the prompt; an empty line asks again; /exit or Ctrl-D quits."""
    system = args.system if args.system is not None else args.prompt
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print("chat: type a message; Ctrl-C stops a reply, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return
        if not line:                                                     # Ctrl-D
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return
        history.append({"role": "user", "content": line.rstrip("\n")})
        pieces: list[str] = []
        chunks = None
        try:
            chunks = m.create_chat_completion(history, stream=True, **_sampling(args, -1))
            for c in chunks:
                piece = c["choices"][0]["delta"].get("content", "")
                sys.stdout.write(piece)
                sys.stdout.flush()
                pieces.append(piece)
        except KeyboardInterrupt:                                        # the reply stops; the chat goes on
            if chunks is not None:
                chunks.close()
            print("\n[reply stopped]", file=sys.stderr)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
        if m.verbose:
            _timings(m)


def _check_stats_flags(args: argparse.Namespace) -> None:
    """--stats and --heatmap count the expert cache; they are refused before anything runs when they cannot work."""
    opt = Options.parse(**file_defaults(Path(args.model), given(args, Options)))   # as Model.load will see them
    if (args.stats or args.heatmap) and not opt.residency:
        raise ValueError("--stats and --heatmap count what the expert cache does: give --expert-budget (100% counts "
                         "every selection without evicting) or another residency option")
    if args.heatmap:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--heatmap needs matplotlib: pip install 'hotcold[plot]' (matplotlib only)") from None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def run() -> None:
        _check_stats_flags(args)
        m = Model.load(args.model, **given(args, Options))
        conversation = args.conversation if args.conversation is not None else args.prompt is None
        if not conversation:
            if args.n_predict != 0:                                      # -n 0: llama-cli generates nothing
                _stream(m.generate(args.prompt or "", **_sampling(args, 256)))
                print(flush=True)
                if m.verbose:
                    _timings(m)
        else:
            chat(m, args)
        if args.stats:
            _stats(m)
        if args.heatmap:
            m.save_expert_heatmap(args.heatmap)
            print(f"heatmap written to {args.heatmap}", file=sys.stderr)

    return guarded("moe-run", run, "; lower -c (--ctx-size) or give --ram-budget")


if __name__ == "__main__":
    sys.exit(main())
