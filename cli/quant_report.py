"""`moe-quant-report MODEL_DIR`: quantize a checkpoint's weights to each type and report size and error.

Shows what each GGML type would cost and lose on a real model before converting it; the table goes
to stdout, progress to stderr.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hotcold.convert.safetensors_reader import CheckpointError, SafetensorsFile
from hotcold.quant import QuantError, block_size, dequantize, quantize, resolve, row_bytes

from .flags import Parser

DEFAULT_TYPES = "F16,Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,IQ4_NL,Q3_K,Q2_K"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="moe-quant-report", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="Hugging Face model folder with *.safetensors")
    p.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated GGML types (default {DEFAULT_TYPES})")
    args = p.parse_args(argv)
    try:
        types = [resolve(t) for t in args.types.split(",")]
        files = sorted(args.model.glob("*.safetensors")) if args.model.is_dir() else [args.model]
        if not files or not files[0].exists():
            raise CheckpointError(f"no .safetensors files in {args.model}; give a Hugging Face model folder")
        tensors = [(f, t) for f in map(SafetensorsFile, files) for t in f if len(t.shape) == 2]
    except (QuantError, CheckpointError, OSError) as e:
        print(f"moe-quant-report: error: {e}", file=sys.stderr)
        return 2

    stats = {t: [0, 0, 0.0, 0.0, 0.0] for t in types}  # weights, bytes, sum sq err, sum sq, seconds
    for f, info in tqdm(tensors, desc="quantizing", unit="tensor", file=sys.stderr):
        x = f.float32(info.name)
        for t in types:
            if x.shape[1] % block_size(t):
                continue
            start = time.perf_counter()
            q = quantize(x, t)
            s = stats[t]
            s[4] += time.perf_counter() - start
            s[0] += x.size
            s[1] += x.shape[0] * row_bytes(t, x.shape[1])
            s[2] += float(np.sum((dequantize(q, t) - x).astype(np.float64) ** 2))
            s[3] += float(np.sum(x.astype(np.float64) ** 2))
    print(f"{'type':<8}{'bits/weight':>12}{'MiB':>9}{'rel. RMSE':>11}{'quantize MB/s':>15}")
    for t, (n, nbytes, se, ss, sec) in stats.items():
        if n:
            print(f"{t.name:<8}{8 * nbytes / n:>12.3f}{nbytes / 2**20:>9.2f}{(se / ss) ** 0.5:>11.5f}{4 * n / 1e6 / sec:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
