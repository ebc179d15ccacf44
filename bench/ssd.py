"""A model larger than memory: hotcold's disk tier under a RAM budget against llama.cpp's mmap, same file, same limit.

A generated Mixtral-shaped checkpoint (random weights, hidden 2048, 8 experts of 5632, top-2), converted with
moe-convert to Q8_0 with Q2_K cold copies, and to uniform Q2_K and Q4_K files. Each engine runs in a fresh
cgroup-v1 memory group (page cache is charged to it) limited to --limit of the Q8_0 file, after dropping the
page cache, alternating the engines --reps times: hotcold with ram_budget = the limit minus what its process
holds before loading (both printed), llama.cpp with use_extra_bufts=False (no CPU repacking: its weights stay
in the mmap, the only way it runs a file larger than memory). llama.cpp on the uniform Q2_K and Q4_K files is
the alternative a user would pick (a smaller file). Quality: argmax agreement and mean KL of each run's logits
against the unconstrained Q8_0 engine on the same tokens. Needs root (cgroups, drop_caches).

Then the shipped trained model at equal memory (--trained-only for just that part): perplexity on held-out
Python docs of llama.cpp's uniform Q4_K and Q3_K files against hotcold's Q8_0 file with each cold type, under
ram_budget = the file's size plus hotcold's KV cache.

    sudo python bench/ssd.py [--gb 2] [--limit 0.55] [--reps 2] [--work DIR] [--trained-only]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "models" / "mixtral-trained"
CGROUP = Path("/sys/fs/cgroup/memory")

_WORKER = r"""
import json, os, resource, sys, time
engine, path, limit, prompt_n, n_decode, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
import numpy as np

def read_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

def usage():
    return int(open(os.environ["CG"] + "/memory.usage_in_bytes").read())

rng = np.random.default_rng(0)
ids = [1] + [int(t) for t in rng.integers(3, 4000, size=prompt_n - 1)]
res = {}
if engine.startswith("hotcold"):
    from hotcold import Model
    import hotcold.engine.api
    held = usage()
    budget = limit - held - (64 << 20)                    # kernels and reader threads come after loading
    res.update(held=held, budget=budget)
    opts = dict(ram_budget=budget) if engine == "hotcold" else {}
    m = Model(path, n_ctx=prompt_n + n_decode + 8, n_batch=64, verbose=True, **opts)
    res["plan"] = m.plan.describe(sum(len(l) for l in m.model.file_experts)) if m.plan else "no budget"
    res["after_load"] = usage()
    m.reset_expert_stats()
    r0 = read_bytes()
    toks = list(m.generate(ids, max_tokens=n_decode, temperature=0, ignore_eos=True))
    t = m.timings
    s = m.expert_stats()
    res.update(prompt_tps=t["prompt_tokens"] / t["prompt_s"], decode_tps=t["gen_tokens"] / t["gen_s"],
               disk_per_token=(read_bytes() - r0) / max(s["tokens"], 1),
               stall=s["stall_s"] / max(s["tokens"], 1), compute=s["compute_s"] / max(s["tokens"], 1),
               faults=s["major_faults"] / max(s["tokens"], 1), hit_rate=s.get("hit_rate"), memory=m.memory())
    seq = ids + [int(x) for x in m.ctx.tokens[len(ids):]]
    logits = m.logits(seq)[-n_decode:]
else:
    from hotcold.llama_amx import guard
    guard()
    import llama_cpp
    base = llama_cpp.llama_cpp.llama_model_default_params
    def params():
        p = base()
        p.use_extra_bufts = engine != "llama-norepack"
        return p
    llama_cpp.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(path, n_ctx=prompt_n + n_decode + 8, n_batch=64, n_threads=2, n_threads_batch=2,
                          verbose=False, logits_all=True)
    r0, f0 = read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    seq = list(ids)
    t0 = time.perf_counter()
    for i, tok in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
        if i == 0:
            t1 = time.perf_counter()                       # the prompt evaluated, its first token sampled
        if i >= n_decode:
            break
        seq.append(int(tok))
    t2 = time.perf_counter()
    res.update(prompt_tps=len(ids) / (t1 - t0), decode_tps=n_decode / (t2 - t1),
               disk_per_token=(read_bytes() - r0) / (n_decode + 1),
               faults=(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0) / (n_decode + 1))
    seq = seq[:len(ids) + n_decode]
    llm.reset()
    llm.eval(seq)
    logits = np.array(llm.scores[len(seq) - n_decode:len(seq)], dtype=np.float32)
np.save(out, logits)
res["seq"] = seq
res["stat"] = {k: int(v) for k, v in (ln.split() for ln in open(os.environ["CG"] + "/memory.stat"))
               if k in ("total_rss", "total_cache", "total_mapped_file")}
print("RESULT", json.dumps(res))
"""

_REFERENCE = r"""
import json, sys
import numpy as np
from hotcold import Model
path, seq, n_decode, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = Model(path, n_ctx=len(seq) + 8, n_batch=64)
np.save(out, m.logits(seq)[-n_decode:])
print("RESULT {}")
"""


def generate_checkpoint(out: Path, gb: float) -> Path:
    """A random Mixtral checkpoint in F16 safetensors, one shard per layer, with as many layers as make about
    `gb` GB at Q8_0; tokenizer and vocabulary from the shipped trained model."""
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    H, F, E, heads, kv = 2048, 5632, 8, 16, 8
    cfg = json.loads((TRAINED / "config.json").read_text())
    V = cfg["vocab_size"]
    per_layer = (3 * E * H * F + 2 * H * H + 2 * H * H * kv // heads) * 34 / 32
    n_layer = max(1, round(gb * 1e9 / per_layer))
    cfg.update(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2, num_hidden_layers=n_layer,
               num_attention_heads=heads, num_key_value_heads=kv, dtype="float16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (TRAINED / name).exists():
            shutil.copy(TRAINED / name, out / name)
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, np.ndarray]) -> None:
        save_file(tensors, str(out / name))
        weight_map.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": w(V, H), "lm_head.weight": w(V, H),
                                "model.norm.weight": np.ones(H, np.float16)})
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": np.ones(H, np.float16),
             p + "post_attention_layernorm.weight": np.ones(H, np.float16),
             p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(H * kv // heads, H),
             p + "self_attn.v_proj.weight": w(H * kv // heads, H), p + "self_attn.o_proj.weight": w(H, H),
             p + "block_sparse_moe.gate.weight": (rng.standard_normal((E, H), dtype=np.float32)).astype(np.float16)}
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": w(F, H), q + "w3.weight": w(F, H), q + "w2.weight": w(H, F)})
        shard(f"layer-{i:03d}.safetensors", t)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def in_cgroup(name: str, limit: int, argv: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run argv in a fresh memory cgroup of `limit` bytes; (the result, the group's peak usage)."""
    g = CGROUP / name
    if g.exists():
        g.rmdir()
    g.mkdir()
    try:
        (g / "memory.limit_in_bytes").write_text(str(limit))
        (g / "memory.memsw.limit_in_bytes").exists() and (g / "memory.memsw.limit_in_bytes").write_text(str(limit))
        wrapper = ["sh", "-c", f'echo $$ > {g}/cgroup.procs && exec "$@"', "sh", *argv]
        r = subprocess.run(wrapper, capture_output=True, text=True, env={**os.environ, "CG": str(g)},
                           cwd=tempfile.gettempdir())
        peak = int((g / "memory.max_usage_in_bytes").read_text())
    finally:
        for _ in range(50):
            try:
                g.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return r, peak


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(P || Q) over rows, P the reference."""
    def logsoftmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the Q8_0 file")
    ap.add_argument("--limit", type=float, default=0.55, help="memory limit as a share of the Q8_0 file")
    ap.add_argument("--reps", type=int, default=2, help="runs of each engine, alternating")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and files (default: temp)")
    ap.add_argument("--trained-only", action="store_true", help="only the trained model at equal memory")
    ap.add_argument("--chars", type=int, default=16000, help="held-out characters for the trained model's perplexity")
    args = ap.parse_args()
    if os.geteuid() != 0 or not CGROUP.is_dir():
        sys.exit("bench/ssd.py needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    work = args.work or Path(tempfile.mkdtemp(prefix="hotcold-ssd-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.trained_only:
        trained_equal_memory(work, args.chars, 256)
        return
    ckpt = work / "checkpoint"
    files = {"q8_0": work / "gen-q8_0.gguf", "q2_k": work / "gen-q2_k.gguf", "q4_k": work / "gen-q4_k.gguf"}
    if not all(f.is_file() for f in files.values()):
        if not (ckpt / "config.json").is_file():
            print("generating the checkpoint ...", file=sys.stderr, flush=True)
            generate_checkpoint(ckpt, args.gb)
        for t, f in files.items():
            if not f.is_file():
                print(f"moe-convert --type {t} ...", file=sys.stderr, flush=True)
                cold = ["--cold-type", "q2_k"] if t == "q8_0" else ["--cold-type", "none"]
                subprocess.run(["moe-convert", str(ckpt), str(f), "--type", t, "--no-progress", *cold], check=True)
    size = files["q8_0"].stat().st_size
    limit = int(args.limit * size)
    print(f"Q8_0 file {size / 1e9:.2f} GB (+ Q2_K cold copies {files['q8_0'].with_suffix('.cold.gguf').stat().st_size / 1e9:.2f} GB), "
          f"limit {limit / 1e9:.2f} GB ({args.limit:.0%})", flush=True)
    runs = [("hotcold", "q8_0"), ("llama-norepack", "q8_0")]
    extra = [("llama", "q2_k"), ("llama", "q4_k"), ("hotcold-nolimit", "q8_0"), ("llama-nolimit", "q8_0")]
    results: dict[tuple[str, str], list[dict]] = {}
    killed: dict[tuple[str, str], int] = {}
    for rep in range(args.reps):
        for engine, t in runs + (extra if rep == 0 else []):
            drop_caches()
            out = work / f"logits-{engine}-{t}-{rep}.npy"
            lim = 64 << 30 if engine.endswith("nolimit") else limit
            r, peak = in_cgroup(f"hotcold-ssd-{os.getpid()}", lim,
                                [sys.executable, "-c", _WORKER, engine, str(files[t]), str(lim),
                                 str(args.prompt), str(args.decode), str(out)])
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
            if r.returncode or line is None:
                killed[(engine, t)] = killed.get((engine, t), 0) + 1
                print(f"{engine} {t}: failed (rc {r.returncode}, peak {peak / 1e9:.2f} GB): {r.stderr[-500:]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            res.update(peak=peak, logits=str(out))
            results.setdefault((engine, t), []).append(res)
            print(f"{engine:>14} {t}: decode {res['decode_tps']:.2f} tok/s, prompt {res['prompt_tps']:.2f} tok/s, "
                  f"disk {res['disk_per_token'] / 1e9:.3f} GB/token, peak {peak / 1e9:.2f} GB", flush=True)
            st = res["stat"]
            print(f"    at the end: rss {st['total_rss'] / 1e9:.3f} GB, page cache {st['total_cache'] / 1e9:.3f} GB "
                  f"(mapped {st['total_mapped_file'] / 1e9:.3f} GB)", flush=True)
            if engine.startswith("hotcold"):
                mem = res["memory"]
                print("    Model.memory(): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()), flush=True)
                print(f"    process held {res['held'] / 1e9:.3f} GB before loading, {res['after_load'] / 1e9:.3f} GB after; "
                      f"ram_budget {res['budget'] / 1e9:.3f} GB; {res['plan']}", flush=True)
    # quality: each run's logits against the unconstrained Q8_0 engine on the same tokens
    print(f"\n{'engine':>14} {'file':>5} {'decode tok/s':>12} {'prompt tok/s':>12} {'GB/token':>9} {'stall s/tok':>11} "
          f"{'compute s/tok':>13} {'faults/tok':>10} {'peak GB':>8} {'argmax':>7} {'mean KL':>8}")
    for (engine, t), rs in results.items():
        ref = work / f"ref-{engine}-{t}.npy"
        _run_ref(files["q8_0"], rs[0]["seq"], args.decode, ref)
        a, b = np.load(ref), np.load(rs[0]["logits"])
        agree = float((a.argmax(-1) == b.argmax(-1)).mean())
        med = {k: float(np.median([r[k] for r in rs])) for k in ("decode_tps", "prompt_tps", "disk_per_token", "peak")}
        stall = f"{np.median([r['stall'] for r in rs]):.4f}" if "stall" in rs[0] and engine == "hotcold" else "-"
        comp = f"{np.median([r['compute'] for r in rs]):.4f}" if "compute" in rs[0] else "-"
        faults = np.median([r["faults"] for r in rs])
        print(f"{engine:>14} {t:>5} {med['decode_tps']:12.2f} {med['prompt_tps']:12.2f} {med['disk_per_token'] / 1e9:9.3f} "
              f"{stall:>11} {comp:>13} {faults:10.1f} {med['peak'] / 1e9:8.2f} {agree:7.3f} {kl(a, b):8.4f}")
    if ("hotcold", "q8_0") in results and ("llama-norepack", "q8_0") in results:
        h = np.median([r["decode_tps"] for r in results[("hotcold", "q8_0")]])
        ll = np.median([r["decode_tps"] for r in results[("llama-norepack", "q8_0")]])
        print(f"\nhotcold / llama.cpp decode on the same file under the same limit: {h / ll:.2f}x")
    for k, n in killed.items():
        print(f"{k[0]} {k[1]}: {n} run(s) failed or killed")
    print("GB/token: /proc/self/io read_bytes during generation per token; stall: seconds per token waiting for expert "
          "reads, compute: the rest of the forward passes (hotcold's counters; llama.cpp's stalls are its major page "
          "faults: faults/tok); peak: the cgroup's max usage (page cache included); argmax, mean KL: against the Q8_0 "
          "file without a limit on the same tokens")
    trained_equal_memory(work, args.chars, 256)


_PPL = r"""
import json, os, sys
from hotcold import Model
path, text_file, n_ctx, opts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
for f in (path, opts.get("cold_path", path)):          # memory() counts the page cache: start from none
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
text = open(text_file, encoding="utf-8").read()
m = Model(path, n_ctx=n_ctx, n_batch=1, **opts)
ids = m.tokenize(text)
ppl = m.perplexity(ids, n_ctx=n_ctx)
mem = m.memory()
print("RESULT", json.dumps(dict(ppl=ppl, plan=m.plan.describe(32) if m.plan else None, memory=mem, tokens=len(ids))))
"""


def trained_equal_memory(work: Path, chars: int, n_ctx: int) -> None:
    """The shipped trained model at equal memory: llama.cpp's uniform Q4_K and Q3_K files against hotcold's
    Q8_0 file with cold copies under ram_budget = each file's size plus hotcold's KV cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tradeoff import held_out_text, llama_cpp_ppl
    from hotcold.convert import convert
    text = held_out_text(None)[:chars]
    text_file = work / "held-out.txt"
    text_file.write_text(text, encoding="utf-8")
    q8 = work / "trained-q8_0.gguf"
    if not q8.is_file():
        convert(TRAINED, q8, type="q8_0", cold_type=None, progress=False)
    colds = {}
    for ct in ("q2_k", "q3_k", "q4_k"):
        colds[ct] = work / f"trained-q8_0.{ct}.cold.gguf"
        if not colds[ct].is_file():
            tmp = work / f"trained-cold-{ct}.gguf"
            convert(TRAINED, tmp, type="q8_0", cold_type=ct, progress=False)
            tmp.with_suffix(".cold.gguf").rename(colds[ct])
            tmp.unlink()
    uniform = {}
    for t in ("q4_k", "q3_k"):
        uniform[t] = work / f"trained-{t}.gguf"
        if not uniform[t].is_file():
            convert(TRAINED, uniform[t], type=t, cold_type=None, progress=False)
    def hotcold_ppl(**opts: object) -> dict:
        r = subprocess.run([sys.executable, "-c", _PPL, str(q8), str(text_file), str(n_ctx), json.dumps(opts)],
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
        return json.loads(line[len("RESULT "):])

    base = hotcold_ppl()
    kv = base["memory"]["kv_cache"]
    from hotcold.engine.gguf_file import GGUFFile
    from hotcold.engine.tokenizer import Tokenizer
    f = GGUFFile(q8)                                       # the tokenizer only: no Model maps the file here
    ids = Tokenizer.from_metadata(f.metadata).encode(text, add_special=True)
    f.close()
    print(f"\ntrained model, equal memory: {len(text)} characters of the held-out docs ({len(ids)} tokens), "
          f"n_ctx {n_ctx}; hotcold's KV cache {kv / 2**20:.2f} MiB")
    print(f"{'file':>28} {'MiB':>6} {'llama.cpp ppl':>13} | hotcold Q8_0 + cold copies, ram_budget = size + KV")
    print(f"{'Q8_0 (no limit)':>28} {q8.stat().st_size / 2**20:6.2f} {llama_cpp_ppl(q8, ids, n_ctx):13.4f} | "
          f"hotcold {base['ppl']:.4f}")
    for t, f in uniform.items():
        budget = f.stat().st_size + kv
        row = []
        for ct, cf in colds.items():
            for miss in ("adaptive", "cold"):
                res = hotcold_ppl(ram_budget=budget, cold_path=str(cf), miss=miss)
                if "error" in res:
                    row.append(f"cold {ct} {miss}: {res['error']}")
                    continue
                row.append(f"cold {ct} {miss}: {res['ppl']:.4f} (memory {res['memory']['total'] / 2**20:.2f} MiB, "
                           f"page cache {res['memory']['page_cache'] / 2**20:.2f}; {res['plan']})")
        print(f"{'uniform ' + t.upper():>28} {f.stat().st_size / 2**20:6.2f} {llama_cpp_ppl(f, ids, n_ctx):13.4f} | "
              f"ram_budget {budget / 2**20:.2f} MiB:")
        for line in row:
            print(f"{'':>50} {line}")


def _run_ref(path: Path, seq: list[int], n_decode: int, out: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _REFERENCE, str(path), json.dumps(seq), str(n_decode), str(out)],
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])


if __name__ == "__main__":
    main()
