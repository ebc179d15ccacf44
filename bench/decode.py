"""Prompt and decode speed of hotcold against llama.cpp on the same files and threads, in one run.

Models: the shipped trained Mixtral (Q8_0 and Q4_K) and a generated Mixtral-shaped model of about --gb GB at
Q4_K, and the same shape at Q8_0 (written directly as GGUF with valid random blocks). Each measurement runs
in a fresh process that loads the model, warms it up (compiles) and then times what a user times: a
prompt of --prompts tokens, then --decode greedy tokens, through hotcold.Model.generate and
llama_cpp.Llama.generate (llama.cpp's own counters, llama_perf_context). The engines alternate, --reps
times; medians are printed with the ratio hotcold / llama.cpp, the weight bytes decode reads per token
times its tokens/s (GB/s), and the machine's read bandwidth measured in the same run (a multi-threaded sum
of a 1 GiB array). Also the start to first token in a fresh process with an empty Numba cache.

    python bench/decode.py [--gb 1.0] [--threads 1 2] [--prompts 64 512] [--decode 128] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

from hotcold.convert import convert
from hotcold.engine.gguf_file import GGUFFile
from hotcold.quant import QType, byte_shape, quantize

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "models" / "mixtral-trained"

# One engine, one model, one thread count, in a fresh process: warm up, then prompt + decode per prompt length.
_WORKER = r"""
import json, sys, time
engine, path, threads, prompts, n_decode = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
import numpy as np
rng = np.random.default_rng(0)
out = {}
n_ctx = max(prompts) + n_decode + 16
if engine == "hotcold":
    from hotcold import Model
    m = Model(path, n_ctx=n_ctx, n_threads=threads)
    greedy = dict(temperature=0, ignore_eos=True)
    "".join(m.generate([1, 5, 9, 13], max_tokens=4, **greedy))           # compile and warm
    "".join(m.generate([1] + list(range(20, 20 + max(prompts) - 1)), max_tokens=2, **greedy))
    for p in prompts:
        ids = [1] + [int(t) for t in rng.integers(3, 4000, size=p - 1)]
        "".join(m.generate(ids, max_tokens=n_decode, **greedy))
        t = m.timings
        out[p] = (t["prompt_tokens"] / t["prompt_s"], t["gen_tokens"] / t["gen_s"])
else:
    from hotcold.llama_amx import guard
    guard()
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    def run(ids, n):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if i + 1 >= n:
                break
        return llama_cpp.llama_perf_context(llm.ctx)
    run([1, 5, 9, 13], 4)
    run([1] + list(range(20, 20 + max(prompts) - 1)), 2)
    for p in prompts:
        ids = [1] + [int(t) for t in rng.integers(3, 4000, size=p - 1)]
        d = run(ids, n_decode + 1)                                            # the first token ends the prompt
        out[p] = (d.n_p_eval / (d.t_p_eval_ms / 1e3), d.n_eval / (d.t_eval_ms / 1e3))
    llm.close()
print("RESULT", json.dumps(out))
"""

_BANDWIDTH = r"""
import sys, time, numpy as np, numba
from numba import njit, prange
@njit(parallel=True, fastmath=True)
def rsum(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += a[i]
    return s
numba.set_num_threads(int(sys.argv[1]))
a = np.ones(2**28, np.float32)
rsum(a)
ts = []
for _ in range(7):
    t0 = time.perf_counter(); rsum(a); ts.append(time.perf_counter() - t0)
print("RESULT", a.nbytes / float(np.median(ts)) / 1e9)
"""

# Fresh-process start: load, one prompt, its first token; prints seconds and Numba compilations.
_START = r"""
import sys, time
t0 = time.perf_counter()
from numba.core.registry import CPUDispatcher
from hotcold import Model
m = Model(sys.argv[1], n_ctx=64)
"".join(m.generate([1, 2, 3], max_tokens=1, temperature=0))
secs = time.perf_counter() - t0                  # before counting: a scan of every object takes seconds
import gc
misses = sum(sum(o.stats.cache_misses.values()) for o in gc.get_objects() if isinstance(o, CPUDispatcher))
print("RESULT", secs, misses)
"""


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"worker failed ({r.returncode}): {r.stderr[-2000:]}")
    return line[len("RESULT "):]


def random_blocks(rows: int, cols: int, qtype: QType, rng: np.random.Generator) -> np.ndarray:
    """Valid rows of `qtype`: random bytes with small finite fp16 scales (Q4_K: d, dmin; Q8_0: d)."""
    raw = rng.integers(0, 256, size=byte_shape((rows, cols), qtype), dtype=np.uint8)
    if qtype == QType.Q4_K:
        raw.reshape(-1, 144)[:, 0:4] = np.frombuffer(np.array([1e-3, 1e-3], np.float16).tobytes(), np.uint8)
    elif qtype == QType.Q8_0:
        raw.reshape(-1, 34)[:, 0:2] = np.frombuffer(np.array([2e-4], np.float16).tobytes(), np.uint8)
    else:
        raise ValueError(qtype)
    return raw


def generate_gguf(out: Path, gb: float, qtype: QType = QType.Q4_K) -> Path:
    """A Mixtral-shaped GGUF (hidden 2048, 8 experts of 5632, top-2) with as many layers as make about `gb` GB
    at Q4_K, its matrices at `qtype`; vocab and metadata from the shipped trained model."""
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
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if qtype == QType.Q4_K else gguf.LlamaFileType.MOSTLY_Q8_0)
    rng = np.random.default_rng(0)
    tensors: list[tuple[str, np.ndarray, QType]] = [
        ("token_embd.weight", quantize(rng.standard_normal((V, H), dtype=np.float32), QType.Q8_0), QType.Q8_0)]
    for b in range(n_layer):
        p = f"blk.{b}."
        tensors += [(p + "attn_norm.weight", np.ones(H, np.float32), QType.F32),
                    (p + "ffn_norm.weight", np.ones(H, np.float32), QType.F32),
                    (p + "attn_q.weight", random_blocks(H, H, qtype, rng), qtype),
                    (p + "attn_k.weight", random_blocks(H // heads * kv, H, qtype, rng), qtype),
                    (p + "attn_v.weight", random_blocks(H // heads * kv, H, qtype, rng), qtype),
                    (p + "attn_output.weight", random_blocks(H, H, qtype, rng), qtype),
                    (p + "ffn_gate_inp.weight", rng.standard_normal((E, H), dtype=np.float32), QType.F32),
                    (p + "ffn_gate_exps.weight", random_blocks(E * F, H, qtype, rng).reshape(E, F, -1), qtype),
                    (p + "ffn_up_exps.weight", random_blocks(E * F, H, qtype, rng).reshape(E, F, -1), qtype),
                    (p + "ffn_down_exps.weight", random_blocks(E * H, F, qtype, rng).reshape(E, H, -1), qtype)]
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


def bench_models(work: Path | None, gb: float, prefix: str) -> dict[str, Path]:
    """The benchmarks' two models in `work` (made when missing; a new temporary folder without one): the
    shipped trained Mixtral at Q8_0 and the generated Mixtral-shaped model of about `gb` GB at Q4_K."""
    work = work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    files = {"trained Q8_0": work / "trained-q8_0.gguf", f"generated {gb:g} GB Q4_K": work / "gen-q4_k.gguf"}
    if not files["trained Q8_0"].is_file():
        convert(TRAINED, files["trained Q8_0"], type="q8_0", cold_type=None, progress=False)
    if not files[f"generated {gb:g} GB Q4_K"].is_file():
        generate_gguf(files[f"generated {gb:g} GB Q4_K"], gb, QType.Q4_K)
    return files


def decode_bytes(path: Path) -> int:
    """Weight bytes one decoded token reads: everything but the embedding table and the unselected experts."""
    f = GGUFFile(path)
    k = int(next(v for key, v in f.metadata.items() if key.endswith(".expert_used_count")))
    total = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight":
            continue
        total += t.nbytes * k // t.shape[0] if "_exps." in name else t.nbytes
    return total


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the generated model at Q4_K")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="runs of each engine, alternating")
    ap.add_argument("--models", nargs="+", default=["trained-q8_0", "trained-q4_k", "gen-q4_k", "gen-q8_0"])
    ap.add_argument("--work", type=Path, default=None, help="folder for the model files (default: a new temp dir)")
    ap.add_argument("--no-start", action="store_true", help="skip the cold-start measurement")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hotcold-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    makers = {
        "trained-q8_0": lambda p: convert(TRAINED, p, type="q8_0", cold_type=None, progress=False).path,
        "trained-q4_k": lambda p: convert(TRAINED, p, type="q4_k", cold_type=None, progress=False).path,
        "gen-q4_k": lambda p: generate_gguf(p, args.gb, QType.Q4_K),
        "gen-q8_0": lambda p: generate_gguf(p, args.gb, QType.Q8_0),
    }
    files = {}
    for name in args.models:
        path = work / f"{name}.gguf"
        files[name] = path if path.is_file() else makers[name](path)
    bandwidth = {t: median([float(_run(_BANDWIDTH, str(t))) for _ in range(2)]) for t in args.threads}
    cols = "".join(f" hotcold pp{p} | llama.cpp pp{p} | ratio |" for p in args.prompts)
    print(f"\n{args.decode} decoded tokens; medians of {args.reps} alternating runs per engine; tokens/s\n")
    print(f"| model | MiB | threads |{cols} hotcold tg | llama.cpp tg | ratio | hotcold GB/s | llama.cpp GB/s | "
          "read GB/s |")
    print("|---|---:|---:|" + "---:|" * (3 * len(args.prompts) + 6))
    for name, path in files.items():
        per_token = decode_bytes(path)
        for t in args.threads:
            runs: dict[str, list[dict]] = {"hotcold": [], "llama.cpp": []}
            for rep in range(args.reps):
                for engine in (("hotcold", "llama.cpp") if rep % 2 == 0 else ("llama.cpp", "hotcold")):
                    code = "hotcold" if engine == "hotcold" else "llama"
                    res = json.loads(_run(_WORKER, code, str(path), str(t), json.dumps(args.prompts), str(args.decode)))
                    runs[engine].append({int(k): v for k, v in res.items()})
            row = f"| {name} | {path.stat().st_size / 2**20:.0f} | {t} |"
            for p in args.prompts:
                h, ll = median([r[p][0] for r in runs["hotcold"]]), median([r[p][0] for r in runs["llama.cpp"]])
                row += f" {h:.1f} | {ll:.1f} | {h / ll:.2f}x |"
            p0 = args.prompts[0]
            h, ll = median([r[p0][1] for r in runs["hotcold"]]), median([r[p0][1] for r in runs["llama.cpp"]])
            row += (f" {h:.1f} | {ll:.1f} | {h / ll:.2f}x | {h * per_token / 1e9:.1f} | {ll * per_token / 1e9:.1f} | "
                    f"{bandwidth[t]:.1f} |")
            print(row, flush=True)
    if not args.no_start:
        print("\nstart to first token in a fresh process (trained Q8_0), with an empty Numba cache, then warm:")
        cache = work / "numba-cache"
        shutil.rmtree(cache, ignore_errors=True)                            # empty, whatever a run before left
        env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
        first = files.get("trained-q8_0") or makers["trained-q8_0"](work / "trained-q8_0.gguf")
        for label in ("cold start", "warm start"):
            secs, misses = _run(_START, str(first), env=env).split()
            print(f"- {label}: {float(secs):.2f} s, Numba compilations: {misses}")


if __name__ == "__main__":
    main()
