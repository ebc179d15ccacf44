"""moe-run: one-shot completion (-p) or interactive chat over a GGUF model, streamed to stdout.

Generated text goes to stdout, flushed per piece; logs, timings and errors go to stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from hotcold.engine.api import Model
from hotcold.engine.options import Options
from hotcold.engine.sampling import SamplingParams

from .flags import add_options, given, one_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-run", description="Run a GGUF MoE model: `-p PROMPT` for a one-shot "
                                "completion, no -p for an interactive chat (the model's chat template).")
    p.add_argument("model", help="GGUF file (from moe-convert or llama.cpp)")
    p.add_argument("-p", "--prompt", help="complete this prompt and exit")
    p.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate (default 256; -1: until EOS)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("-sys", "--system", default=None, help="system message for the chat")
    add_options(p, Options)
    add_options(p, SamplingParams)
    r = next(g for g in p._action_groups if g.title == "expert residency (see README)")
    r.add_argument("--stats", action="store_true", help="print per-layer expert cache statistics to stderr")
    r.add_argument("--heatmap", default=None, metavar="PNG", help="save a layer x expert activation heatmap")
    return p


def _stats(m: Model) -> None:
    s = m.expert_stats()
    cols = ("tokens", "hits", "misses", "cold", "cold_uploaded", "skipped", "loads", "bytes_moved")
    print("layer " + " ".join(f"{c:>11}" for c in cols) + "   prefetch", file=sys.stderr)
    for i, layer in enumerate(s["layers"]):
        acc = f"{layer['predicted_right'] / layer['predicted']:.2f}" if layer["predicted"] else "-"
        print(f"{i:5d} " + " ".join(f"{layer[c]:>11}" for c in cols) + f"   {acc:>8}", file=sys.stderr)
    acc = f"{s['prefetch_accuracy']:.2f}" if s["prefetch_accuracy"] is not None else "-"
    print("total " + " ".join(f"{s[c]:>11}" for c in cols) + f"   {acc:>8}", file=sys.stderr)
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
    print("tokens: routed through the layer; hits/misses: (token, expert) selections resident or not in the hot "
          "arena; cold: misses computed with the cold copy (cold_uploaded: of those, on the GPU); skipped: misses "
          "dropped by gate weight; loads: hot copies brought in (misses and prefetches); bytes_moved: bytes of hot "
          "copies loaded plus cold copies computed with; prefetch: share of selections predicted", file=sys.stderr)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.n_predict, stop=args.stop or None, ignore_eos=args.ignore_eos,
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
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        history.append({"role": "user", "content": line.rstrip("\n")})
        chunks = m.create_chat_completion(history, stream=True, **_sampling(args))
        reply = _stream(c["choices"][0]["delta"].get("content", "") for c in chunks)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
        if m.verbose:
            _timings(m)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = Model.load(args.model, **given(args, Options))
        if args.prompt is not None:
            _stream(m.generate(args.prompt, **_sampling(args)))
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
    except (ValueError, OSError, ImportError, RuntimeError) as e:   # bad files and options (GGUFError,
        print(f"moe-run: error: {one_line(e)}", file=sys.stderr)       # ChatTemplateError...), missing files, busy
        return 2
    except MemoryError:
        print("moe-run: error: out of memory; lower -c (--ctx-size) or give --ram-budget", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmoe-run: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
