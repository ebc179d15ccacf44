"""Conversion speed and peak memory: moe-convert against llama.cpp's convert_hf_to_gguf.py, same run.

Generates a Mixtral-shaped bf16 checkpoint of about --gb GB (random weights, the shipped tokenizer),
converts it with both tools to Q8_0 in fresh processes, and prints MB/s of checkpoint read and
peak RSS, with hotcold/llama.cpp ratios.

    python bench/convert.py [--gb 1.0] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import reference_convert  # noqa: E402  (tests/ helper that finds llama.cpp's sources)

HIDDEN, FF, EXPERTS, VOCAB = 1024, 2048, 8, 4096

# Runs a command in-process and reports its own peak RSS, so each tool is measured alone.
_MEASURE = """
import resource, runpy, sys, time
t0 = time.perf_counter()
mode, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
try:
    if mode == "module":
        runpy.run_module(target, run_name="__main__")
    else:
        runpy.run_path(target, run_name="__main__")
except SystemExit as e:
    if e.code not in (None, 0):
        raise
print("RESULT", time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> bytes:
    x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype("<u2").tobytes()


def generate(out: Path, gb: float) -> int:
    """A Mixtral checkpoint of about `gb` GB written tensor by tensor; returns its byte size."""
    per_layer = 2 * (3 * EXPERTS * HIDDEN * FF + 4 * HIDDEN * HIDDEN // 2 * 2 + EXPERTS * HIDDEN + 2 * HIDDEN)
    n_layer = max(1, round((gb * 1e9 - 4 * VOCAB * HIDDEN) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for b in range(n_layer):
        p = f"model.layers.{b}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
                   f"{p}.self_attn.v_proj.weight": (HIDDEN // 2, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
                   f"{p}.block_sparse_moe.gate.weight": (EXPERTS, HIDDEN)}
        for e in range(EXPERTS):
            for w, shape in (("w1", (FF, HIDDEN)), ("w2", (HIDDEN, FF)), ("w3", (FF, HIDDEN))):
                shapes[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"] = shape
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            f.write(_bf16(rng, shape) if len(shape) > 1 else np.full(shape, 0x3F80, "<u2").tobytes())
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN,
              "intermediate_size": FF, "num_hidden_layers": n_layer, "num_attention_heads": 16,
              "num_key_value_heads": 8, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
              "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REPO / "models" / "mixtral-trained" / f, out / f)
    return (out / "model.safetensors").stat().st_size


def measure(mode: str, target: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one run in a fresh process."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, mode, target, *argv], capture_output=True, text=True, env=env)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("RESULT")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{target} failed:\n{r.stderr[-3000:]}")
    _, secs, rss_kb = line.split()
    return float(secs), int(rss_kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size to generate (default 1.0)")
    ap.add_argument("--keep", type=Path, default=None, help="generate into (and keep) this folder")
    args = ap.parse_args()
    src = reference_convert.source_tree()
    if src is None:
        sys.exit("llama.cpp's convert_hf_to_gguf.py not found; set HOTCOLD_LLAMA_CPP_SRC")
    work = Path(tempfile.mkdtemp(prefix="hotcold-bench-"))
    model = args.keep or work / "model"
    try:
        size = generate(model, args.gb) if not (model / "model.safetensors").is_file() else (model / "model.safetensors").stat().st_size
        print(f"checkpoint: {size / 1e6:.0f} MB bf16, {model}", file=sys.stderr)
        import os
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
        runs = {
            "llama.cpp convert_hf_to_gguf.py": measure("path", str(src / "convert_hf_to_gguf.py"),
                                                      [str(model), "--outfile", str(work / "ref.gguf"), "--outtype", "q8_0"], env),
            "hotcold moe-convert": measure("module", "hotcold.cli.convert",
                                           [str(model), str(work / "ours.gguf"), "--type", "q8_0", "--cold-type", "none", "--no-progress"]),
            "hotcold moe-convert + cold q4_k": measure("module", "hotcold.cli.convert",
                                                       [str(model), str(work / "ours2.gguf"), "--type", "q8_0", "--cold-type", "q4_k", "--no-progress"]),
        }
        ref_s, ref_rss = runs["llama.cpp convert_hf_to_gguf.py"]
        print(f"\n{size / 1e6:.0f} MB Mixtral-shaped bf16 checkpoint -> Q8_0 GGUF\n")
        print("| tool | seconds | MB/s read | peak RSS MiB | speed vs llama.cpp | RSS vs llama.cpp |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (s, rss) in runs.items():
            print(f"| {name} | {s:.1f} | {size / 1e6 / s:.0f} | {rss:.0f} | {ref_s / s:.2f}x | {rss / ref_rss:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
