"""moe-convert: Hugging Face safetensors checkpoint -> mixed-precision GGUF plus OUT.cold.gguf."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from hotcold.convert import convert
from hotcold.convert.types_plan import OUTPUT_TYPES

from .flags import Parser, one_line


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(t.name.lower() for t in OUTPUT_TYPES)
    p = Parser(
        prog="moe-convert",
        description="Convert a Hugging Face MoE checkpoint to a GGUF that llama.cpp loads, plus low-bit expert "
                    "copies (OUT.cold.gguf) for hotcold's cache misses.")
    p.add_argument("model_dir", help="folder with config.json, *.safetensors and the tokenizer")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--type", default="q8_0", help=f"type of 2-D weights (default q8_0); one of {names}")
    p.add_argument("--expert-type", default=None, help="type of expert weights (default: --type)")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="type for tensors whose GGUF name matches REGEX; repeatable, first match wins")
    p.add_argument("--cold-type", default="q4_k", help="type of the cold expert copies (default q4_k); 'none' to skip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return p


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    t0 = time.perf_counter()
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so the partial files are removed
    signal.signal(signal.SIGTERM, _terminated)
    try:
        r = convert(args.model_dir, args.out, type=args.type, expert_type=args.expert_type,
                    tensor_type=args.tensor_type, cold_type=args.cold_type, progress=not args.no_progress)
    except (ValueError, OSError) as e:   # ConvertError, CheckpointError, QuantError; missing files, a full disk
        print(f"moe-convert: error: {one_line(e)}; no output written", file=sys.stderr)
        return 2
    except MemoryError:
        print("moe-convert: error: out of memory; no output written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-convert: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    dt = time.perf_counter() - t0
    size = r.path.stat().st_size / 2**20
    print(f"wrote {r.path} ({size:.1f} MiB) in {dt:.1f} s", file=sys.stderr)
    if r.cold_path is not None:
        print(f"wrote {r.cold_path} ({r.cold_path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
