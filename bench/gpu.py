"""Decode speed with a VRAM budget: hotcold's GPU tier against llama.cpp built with CUDA, same model, same run.

The setting of issue #6: an MoE that does not fit the GPU. A Mixtral-shaped Q4_K model is generated
(bench/decode.py's generator); llama.cpp runs it with every layer on the GPU but the experts of the first
--n-cpu-moe layers on the CPU (llama-bench -ngl 99 --n-cpu-moe N); hotcold runs it with the dense layers
on the GPU and the same share of experts, (L - N) / L of them, in its VRAM arena, the rest served by its
residency machinery (LRU, misses loaded hot, prefetch one layer ahead). The first row, every expert on
the GPU, compares the GEMV kernels alone (Numba CUDA against ggml-cuda), the measurement behind the kernel
choice. llama.cpp is built from the vendored source in the llama-cpp-python sdist (--llama-src, or
HOTCOLD_LLAMA_CPP_SRC) with -DGGML_CUDA=ON, once, into --build.

    python bench/gpu.py [--gb 8] [--expert-share 0.25] [--prompt 64] [--decode 128] [--dry-run]

--dry-run prints the plan (model shape, N, budgets, commands) without a GPU or a build; --build-only builds
llama-bench and stops (bench/device_check.sh builds it while the CUDA tests run); --no-llama prints hotcold's
columns alone. The build leaves out llama.cpp's server, tests and examples (a trimmed source tree is enough)
and, with --llama-fa off, its FlashAttention kernels (a third of the compile; at a few hundred cells of context
attention is a small part of a decode step either way).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import generate_gguf  # noqa: E402

from hotcold.engine.gguf_file import GGUFFile  # noqa: E402


def build_llama_bench(src: Path | None, build: Path, fa: bool = True) -> Path:
    """llama-bench with CUDA from llama.cpp's C/C++ sources (the sdist's vendor/llama.cpp); cached in `build`."""
    exe = build / "bin" / "llama-bench"
    if exe.is_file():
        return exe
    if src is None or not (src / "CMakeLists.txt").is_file() or not (src / "ggml").is_dir():
        raise SystemExit(
            f"llama.cpp's C/C++ sources not found at {src}: `pip download --no-deps --no-binary :all: "
            "llama-cpp-python -d DIR`, unpack it, and pass --llama-src DIR/llama_cpp_python-*/vendor/llama.cpp "
            "(or set HOTCOLD_LLAMA_CPP_SRC)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DGGML_CUDA=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA_NCCL=OFF", f"-DGGML_CUDA_FA={'ON' if fa else 'OFF'}",
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"],
                   check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
                   check=True)
    return exe


def llama_bench(exe: Path, model: Path, n_cpu_moe: int, prompt: int, decode: int, threads: int) -> tuple[float, float]:
    """(prompt t/s, decode t/s) from llama-bench's JSON, every layer on the GPU but N layers' experts."""
    cmd = [str(exe), "-m", str(model), "-ngl", "99", "--n-cpu-moe", str(n_cpu_moe), "-p", str(prompt),
           "-n", str(decode), "-t", str(threads), "-r", "3", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"])
    return pp, tg


def hotcold(model: Path, share: float, prompt: list[int], decode: int, prefetch: int) -> tuple[float, float, dict]:
    """(prompt t/s, decode t/s, cache report) with `share` of the experts in VRAM."""
    from hotcold import Model
    m = Model.load(model, n_ctx=len(prompt) + decode + 8, device="cuda", expert_budget=f"{share:.6%}",
                   prefetch=prefetch)
    m.logits(prompt[:8])                                  # compile and warm the kernels, fill the arena
    m.model.forward(np.array([prompt[8]]), m.ctx)
    m.reset_expert_stats()
    t0 = time.perf_counter()
    logits = m.logits(prompt)[-1]
    t1 = time.perf_counter()
    for _ in range(decode):
        logits = m.model.forward(np.array([int(np.argmax(logits))]), m.ctx)[-1]
    t2 = time.perf_counter()
    report = m.expert_stats()
    report["vram_used"] = m.gpu.used
    return len(prompt) / (t1 - t0), decode / (t2 - t1), report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=8.0, help="size of the generated Q4_K model")
    ap.add_argument("--expert-share", type=float, default=0.25, help="share of the experts in VRAM")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prefetch", type=int, default=1)
    src = os.environ.get("HOTCOLD_LLAMA_CPP_SRC")
    ap.add_argument("--llama-src", type=Path, default=Path(src) if src else None,
                    help="llama.cpp's source tree, C/C++ included (default: $HOTCOLD_LLAMA_CPP_SRC)")
    ap.add_argument("--build", type=Path, default=Path.home() / ".cache" / "hotcold" / "llama-cuda-build")
    ap.add_argument("--work", type=Path, default=None, help="where the generated model goes (default: a temp dir)")
    ap.add_argument("--llama-fa", choices=["on", "off"], default="on", help="build llama.cpp's FlashAttention kernels")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build llama-bench and stop")
    ap.add_argument("--no-llama", action="store_true", help="hotcold alone (no llama.cpp build or columns)")
    args = ap.parse_args()
    if args.build_only:
        print(build_llama_bench(args.llama_src, args.build, args.llama_fa == "on"))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="hotcold-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"gen-{args.gb:g}gb-q4_k.gguf"
    if not model.is_file():
        print(f"generating a {args.gb:g} GB Mixtral-shaped Q4_K model ...", file=sys.stderr)
        generate_gguf(model, args.gb)
    n_layer = int(GGUFFile(model).get("llama.block_count"))
    n_cpu_moe = round((1.0 - args.expert_share) * n_layer)     # llama.cpp: experts of N layers stay on the CPU
    share = (n_layer - n_cpu_moe) / n_layer                     # hotcold: the same share in its arena
    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 4000, size=args.prompt - 1)]
    runs = [("all experts on the GPU (kernels)", 0, 1.0, args.prefetch),
            (f"{share:.0%} of experts on the GPU", n_cpu_moe, share, args.prefetch),
            (f"{share:.0%} of experts on the GPU, no prefetch (overlap off)", n_cpu_moe, share, 0)]
    print(f"model {model.name}: {model.stat().st_size / 2**30:.2f} GiB, {n_layer} layers; "
          f"--n-cpu-moe {n_cpu_moe} <-> expert_budget {share:.1%}; {args.prompt}-token prompt, {args.decode} decoded, "
          f"{args.threads} CPU threads")
    if args.dry_run:
        for name, n, s, pf in runs:
            print(f"- {name}: llama-bench -m {model} -ngl 99 --n-cpu-moe {n} -p {args.prompt} -n {args.decode}; "
                  f"hotcold Model.load(device='cuda', expert_budget='{s:.4%}', prefetch={pf})")
        return
    exe = None if args.no_llama else build_llama_bench(args.llama_src, args.build, args.llama_fa == "on")
    print("\n| configuration | hotcold prompt t/s | llama.cpp prompt t/s | ratio | hotcold decode t/s | "
          "llama.cpp decode t/s | ratio | hotcold hit rate | hotcold VRAM GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    llama: dict[int, tuple[float, float]] = {}
    for name, n, s, pf in runs:
        hp, hd, rep = hotcold(model, s, prompt, args.decode, pf)
        hits = rep["hits"] / max(rep["hits"] + rep["misses"], 1)
        if exe is None:
            print(f"| {name} | {hp:.1f} | - | - | {hd:.1f} | - | - | {hits:.2f} | {rep['vram_used'] / 2**30:.2f} |",
                  flush=True)
            continue
        if n not in llama:
            llama[n] = llama_bench(exe, model, n, args.prompt, args.decode, args.threads)
        lp, ld = llama[n]
        print(f"| {name} | {hp:.1f} | {lp:.1f} | {hp / lp:.2f}x | {hd:.1f} | {ld:.1f} | {hd / ld:.2f}x | "
              f"{hits:.2f} | {rep['vram_used'] / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
