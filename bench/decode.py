"""Prompt and decode speed of the hotcold engine against llama.cpp on the same files and threads, same run.

Models: the shipped trained Mixtral (converted to Q8_0 and Q4_K) and a generated Mixtral-shaped model
of about --gb GB at Q4_K (written directly as GGUF with valid random blocks). Also cold and warm
start to first token in fresh processes: the warm start must compile nothing (Numba's cache).

    python bench/decode.py [--gb 1.0] [--threads 2] [--prompt 64] [--decode 128]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from hotcold.convert import convert
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.model import Transformer
from hotcold.quant import QType, byte_shape, quantize

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "models" / "mixtral-trained"

# Fresh-process start: load, one prompt token, its logits; prints seconds and Numba compilations.
_START = """
import sys, time
t0 = time.perf_counter()
import numpy as np
from numba.core.registry import CPUDispatcher
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.model import Transformer
m = Transformer.load(GGUFFile(sys.argv[1]))
ctx = m.context(64)
m.forward(np.array([1, 2]), ctx)
m.forward(np.array([3]), ctx)
import gc
misses = sum(sum(o.stats.cache_misses.values()) for o in gc.get_objects() if isinstance(o, CPUDispatcher))
print("START", time.perf_counter() - t0, misses)
"""


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid Q4_K rows: random bytes with small finite fp16 d/dmin (block_q4_K: d, dmin, scales, qs)."""
    raw = rng.integers(0, 256, size=byte_shape((rows, cols), QType.Q4_K), dtype=np.uint8)
    blocks = raw.reshape(-1, 144)
    blocks[:, 0:4] = np.frombuffer(np.array([1e-3, 1e-3], dtype=np.float16).tobytes(), dtype=np.uint8)
    return raw


def generate_gguf(out: Path, gb: float) -> Path:
    """A Mixtral-shaped Q4_K GGUF of about `gb` GB; vocab and metadata from the shipped trained model."""
    src = GGUFFile(convert(TRAINED, out.with_suffix(".src.gguf"), type="f32", cold_type=None, progress=False).path)
    H, F, E, V, heads, kv = 2048, 5632, 8, src.tensors["token_embd.weight"].shape[0], 16, 8
    per_layer = 3 * E * H * F * 144 / 256 + (2 * H * H + 2 * H * H // 2) * 144 / 256
    n_layer = max(1, round(gb * 1e9 / per_layer))
    w = gguf.GGUFWriter(out, "llama")
    for k, v in src.metadata.items():
        if k.startswith("tokenizer.") and k != "tokenizer.chat_template":
            if isinstance(v, list):
                w.add_array(k, v)
            elif isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, int):
                w.add_uint32(k, v)
            elif isinstance(v, str):
                w.add_string(k, v)
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(H // heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    rng = np.random.default_rng(0)
    tensors: list[tuple[str, np.ndarray, QType]] = [
        ("token_embd.weight", quantize(rng.standard_normal((V, H), dtype=np.float32), QType.Q8_0), QType.Q8_0)]
    for b in range(n_layer):
        p = f"blk.{b}."
        tensors += [(p + "attn_norm.weight", np.ones(H, np.float32), QType.F32),
                    (p + "ffn_norm.weight", np.ones(H, np.float32), QType.F32),
                    (p + "attn_q.weight", random_q4_k(H, H, rng), QType.Q4_K),
                    (p + "attn_k.weight", random_q4_k(H // heads * kv, H, rng), QType.Q4_K),
                    (p + "attn_v.weight", random_q4_k(H // heads * kv, H, rng), QType.Q4_K),
                    (p + "attn_output.weight", random_q4_k(H, H, rng), QType.Q4_K),
                    (p + "ffn_gate_inp.weight", rng.standard_normal((E, H), dtype=np.float32), QType.F32),
                    (p + "ffn_gate_exps.weight", random_q4_k(E * F, H, rng).reshape(E, F, -1), QType.Q4_K),
                    (p + "ffn_up_exps.weight", random_q4_k(E * F, H, rng).reshape(E, F, -1), QType.Q4_K),
                    (p + "ffn_down_exps.weight", random_q4_k(E * H, F, rng).reshape(E, H, -1), QType.Q4_K)]
    tensors += [("output_norm.weight", np.ones(H, np.float32), QType.F32),
                ("output.weight", quantize(rng.standard_normal((V, H), dtype=np.float32), QType.Q8_0), QType.Q8_0)]
    for name, data, t in tensors:
        w.add_tensor(name, data, raw_dtype=None if t == QType.F32 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.with_suffix(".src.gguf").unlink()
    return out


def bench_hotcold(path: Path, prompt: list[int], n_decode: int) -> tuple[float, float]:
    m = Transformer.load(GGUFFile(path))
    ctx = m.context(len(prompt) + n_decode + 8)
    m.forward(np.array(prompt[:4]), ctx)  # compile and warm the prompt and the decode paths
    m.forward(np.array(prompt[4:5]), ctx)
    ctx.reset()
    t0 = time.perf_counter()
    logits = m.forward(np.array(prompt), ctx)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits = m.forward(np.array([int(np.argmax(logits[-1]))]), ctx)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def bench_llama_cpp(path: Path, prompt: list[int], n_decode: int, threads: int) -> tuple[float, float]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + n_decode + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    llm.eval(prompt[:4])
    llm.eval(prompt[4:5])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    llm.close()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def start_time(path: Path, cache_dir: Path) -> tuple[float, int]:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    r = subprocess.run([sys.executable, "-c", _START, str(path)], capture_output=True, text=True, check=True, env=env)
    _, secs, misses = next(ln for ln in r.stdout.splitlines() if ln.startswith("START")).split()
    return float(secs), int(misses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()
    import numba
    numba.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="hotcold-decode-"))
    files = {
        "trained Q8_0": convert(TRAINED, work / "t-q8_0.gguf", type="q8_0", cold_type=None, progress=False).path,
        "trained Q4_K": convert(TRAINED, work / "t-q4_k.gguf", type="q4_k", cold_type=None, progress=False).path,
    }
    print(f"generating a {args.gb} GB Mixtral-shaped Q4_K model ...", file=sys.stderr)
    files[f"generated {args.gb:g} GB Q4_K"] = generate_gguf(work / "gen-q4_k.gguf", args.gb)
    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 4000, size=args.prompt - 1)]
    print(f"\n{args.threads} threads, {args.prompt}-token prompt, {args.decode} decoded tokens\n")
    print("| model | MiB | hotcold prompt t/s | llama.cpp prompt t/s | ratio | hotcold decode t/s | "
          "llama.cpp decode t/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in files.items():
        hp, hd = bench_hotcold(path, prompt, args.decode)
        lp, ld = bench_llama_cpp(path, prompt, args.decode, args.threads)
        print(f"| {name} | {path.stat().st_size / 2**20:.0f} | {hp:.1f} | {lp:.1f} | {hp / lp:.2f}x | "
              f"{hd:.1f} | {ld:.1f} | {hd / ld:.2f}x |", flush=True)
    print("\nstart to first token in a fresh process (trained Q8_0), with an empty Numba cache, then warm:")
    cache = work / "numba-cache"
    for label in ("cold start", "warm start"):
        secs, misses = start_time(files["trained Q8_0"], cache)
        print(f"- {label}: {secs:.2f} s, Numba cache misses (compilations): {misses}")


if __name__ == "__main__":
    main()
