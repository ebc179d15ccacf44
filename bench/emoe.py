"""eMoE (Tairin et al., arXiv 2503.06823) on the shipped trained model: how well a prompt's experts are predicted,
and what loading them before each prompt saves against LRU.

Text: the Python 3.11 documentation sources (Debian python3.11-doc), the model's training files for the predictor
and the files its training.json holds out for everything measured. Each file is cut into prompts of up to
--prompt tokens at paragraph boundaries, each labelled with a task by its paragraphs: `code` (literal blocks
after '::', code-block directives, doctest lines), `table` (grid, simple and list tables) or `prose`.

1. Traces (Model.trace: every MoE layer's experts for the prompt and --trace greedy tokens) of --train training
   prompts and of the held-out ones, in file order.
2. Predictor accuracy: each layer's top-L accuracy (the share of a held-out prompt's selections that fall in its
   predicted top L experts) of the predictors (engine/predictor.py: EMBED from the mean token embedding, logistic
   and MLP, what the store uses before the prefill; FIRST and PREV from the prompt's own routing, known only
   after its prefill) against the baselines "most frequent experts" (the training prompts' mean usage) and
   "previous prompt's experts".
3. Task sensitivity (engine/sensitivity.py: outputs with each token's experts restricted to the prediction, on
   up to 8 training prompts per task), saved into the predictor.
4. The store at --budgets (shares of the experts) on the held-out prompts in file order, each from an empty
   context and greedy for --decode tokens: LRU with hot misses; LRU with the predictor loading each prompt's
   experts before its prefill, predicting every p = 1, 10, 40 prompts; MoE-ERAS (alpha --eras) with the
   predictor at p = 40; the predictor at p = 40 with HOBBIT's mixed-precision misses (the cold Q4_K copy computes
   a miss ranked below a gate weight share of 0.8, none skipped); token lookup (--token-lookup tokens predicted from
   the routing of the current token's last occurrence and what followed it, engine/experts/lookup.py), alone and
   with the predictor at p = 40. For each: arena MiB, misses and expert MiB moved per token (prefill and decode
   tokens; the predictor's loads count; a cold miss moves its cold copy's bytes), perplexity of the held-out text
   (--ppl-chunks chunks of 256 tokens), and output similarity: the share of the plain engine's greedy tokens the
   configuration reproduces position by position. With hot misses every expert is computed at full precision, so
   outputs and perplexity equal the plain engine's; what prediction changes is how many bytes move.

5. The held-out prompts' expert selections replayed (bench/replay.py) under LRU and two offline bounds: Belady's
   MIN with bypass (the fewest moves any policy can make, knowing the future) and each prompt's own most-selected
   experts held for the whole prompt (a perfect prompt-level prediction without eviction inside the prompt); and
   an online policy (selections decayed per token, bypass), alone and knowing each token's later layers; and the
   store's token lookup replayed.

The scheduler's SLO attainment against first-come-first-served in moe-server is bench/emoe_schedule.py.

    python bench/emoe.py [--work DIR] [--train 400] [--valid 90] [--budgets 25 40 60] [--decode 64]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import TRAINED  # noqa: E402
from replay import bounds  # noqa: E402

from hotcold import Model  # noqa: E402
from hotcold.convert import convert  # noqa: E402
from hotcold.engine.predictor import Kind, Net, most_frequent, previous_prompt, top_l_accuracy, train  # noqa: E402
from hotcold.engine.sensitivity import similarity, task_sensitivity  # noqa: E402

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+|\.\. (list|csv)-table::)")
_CODE = re.compile(r"^\s*(>>>|\.\.\. |\.\. (code-block|testcode|doctest|productionlist)::)")


def task_of(block: str, after_literal: bool) -> str:
    """`code`, `table` or `prose` for one paragraph (`after_literal`: the paragraph before ended in '::')."""
    lines = block.splitlines()
    if any(_TABLE.match(ln) for ln in lines):
        return "table"
    if after_literal and lines and lines[0].startswith((" ", "\t")) or any(_CODE.match(ln) for ln in lines):
        return "code"
    return "prose"


def prompts_of(text: str, model: Model, max_tokens: int) -> list[dict[str, str]]:
    """A file's prompts: consecutive paragraphs of one task joined up to `max_tokens` tokens, in file order."""
    out: list[dict[str, str]] = []
    cur, cur_task, cur_len, literal = [], "", 0, False
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        task, literal = task_of(block, literal), block.rstrip().endswith("::")
        n = len(model.tokenize(block, add_bos=False))
        if cur and (task != cur_task or cur_len + n > max_tokens):
            out.append(dict(prompt="\n\n".join(cur), task=cur_task))
            cur, cur_len = [], 0
        if n > max_tokens:                                        # a long paragraph: its first max_tokens tokens
            block, n = model.detokenize(model.tokenize(block, add_bos=False)[:max_tokens]).decode("utf-8", "replace"), max_tokens
        cur.append(block)
        cur_task, cur_len = task, cur_len + n
    if cur:
        out.append(dict(prompt="\n\n".join(cur), task=cur_task))
    return [p for p in out if len(model.tokenize(p["prompt"])) >= 8]


def corpus(model: Model, n_train: int, n_valid: int, max_tokens: int) -> tuple[list, list, str]:
    """(training prompts, held-out prompts, held-out text): an even sample of the training files' prompts, and
    up to n_valid held-out prompts spread over the held-out files, consecutive within each file."""
    if not SOURCES.is_dir():
        raise SystemExit(f"{SOURCES} is missing: apt-get install python3.11-doc")
    valid_files = json.loads((TRAINED / "training.json").read_text())["valid_files"]
    train_files = sorted(str(p.relative_to(SOURCES)) for p in SOURCES.rglob("*.rst.txt")
                         if str(p.relative_to(SOURCES)) not in set(valid_files))
    rng = np.random.default_rng(0)
    pool = []
    for f in rng.choice(train_files, size=min(len(train_files), max(n_train // 4, 1)), replace=False):
        pool += prompts_of((SOURCES / f).read_text(encoding="utf-8", errors="replace"), model, max_tokens)
    train_prompts = [pool[i] for i in sorted(rng.choice(len(pool), size=min(n_train, len(pool)), replace=False))]
    valid, text = [], []
    for f in valid_files:
        body = (SOURCES / f).read_text(encoding="utf-8", errors="replace")
        text.append(body)
        valid += prompts_of(body, model, max_tokens)[:max(n_valid // len(valid_files), 1)]
    return train_prompts, valid, "\n\n".join(text)


def accuracy_table(tr, va, preds: dict, top_ls: list[int]) -> None:
    actual = va.usage("all")                                                 # (P, L, E)
    rows = dict(preds)
    rows["most frequent experts"] = most_frequent(tr.usage("all"), va.n_prompts)
    rows["previous prompt's experts"] = previous_prompt(actual, tr.usage("all").mean(0))
    L = actual.shape[1]
    for top_l in top_ls:
        print(f"\ntop-{top_l} accuracy on {va.n_prompts} held-out prompts (share of their selections in the "
              f"predicted top {top_l} of {tr.n_expert})\n")
        print("| predictor | " + " | ".join(f"layer {i}" for i in range(L)) + " | mean |")
        print("|---|" + "---:|" * (L + 1))
        for name, p in rows.items():
            acc = top_l_accuracy(p, actual, top_l)
            print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {acc.mean():.3f} |")


def run_config(path: Path, opts: dict, prompts: list, n_decode: int, text: str, chunks: int,
               plain: list | None) -> tuple[dict, list]:
    m = Model(path, n_ctx=256, **opts)
    outs, t0 = [], time.perf_counter()
    for p in prompts:
        ids = m.tokenize(p["prompt"], special=True)
        got: list = []
        m.reset()
        for _ in m.generate(ids, max_tokens=n_decode, temperature=0.0, task=p["task"] or None, _logprobs=(got, 0)):
            pass
        outs.append([int(t) for t, _, _ in got])
    wall = time.perf_counter() - t0
    s = m.expert_stats() if m.cache is not None else None
    toks = s["tokens"] if s else 0
    ppl = m.perplexity(m.tokenize(text)[:chunks * 256], n_ctx=256)
    sim = 1.0 if plain is None else float(np.mean([similarity(a, b) for a, b in zip(plain, outs)]))
    row = dict(arena_mib=(m.cache.budget_bytes / 2**20) if m.cache is not None else None,
               misses=s["misses"] / toks if s else 0.0, mib=s["bytes_moved"] / toks / 2**20 if s else 0.0,
               hits=s["hits"] / max(s["hits"] + s["misses"], 1) if s else 1.0, ppl=ppl, sim=sim, wall=wall,
               predictions=s.get("predictions", 0) if s else 0, reuses=s.get("prediction_reuses", 0) if s else 0)
    return row, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/hotcold-emoe"))
    ap.add_argument("--train", type=int, default=400, help="training prompts traced")
    ap.add_argument("--valid", type=int, default=90, help="held-out prompts")
    ap.add_argument("--prompt", type=int, default=96, help="tokens per prompt at most")
    ap.add_argument("--trace", type=int, default=32, help="greedy tokens traced after each prompt")
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens per held-out prompt in the store runs")
    ap.add_argument("--budgets", type=int, nargs="+", default=[25, 40, 60])
    ap.add_argument("--eras", type=float, default=0.1, help="MoE-ERAS alpha of the ERAS + prediction runs")
    ap.add_argument("--ppl-chunks", type=int, default=8)
    ap.add_argument("--token-lookup", type=int, default=4, help="tokens ahead of the token lookup rows")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "trained-q8_0.gguf"
    if not path.is_file():
        convert(TRAINED, path, type="q8_0", progress=False)
    plain = Model(path, n_ctx=256)
    tr_prompts, va_prompts, text = corpus(plain, args.train, args.valid, args.prompt)
    tasks = {t: sum(p["task"] == t for p in va_prompts) for t in ("prose", "code", "table")}
    print(f"{len(tr_prompts)} training prompts, {len(va_prompts)} held-out prompts {tasks}, up to {args.prompt} tokens")
    t0 = time.perf_counter()
    tr, va = plain.trace(tr_prompts, max_tokens=args.trace), plain.trace(va_prompts, max_tokens=args.trace)
    print(f"traced in {time.perf_counter() - t0:.1f} s")
    preds = {"EMBED logistic (before prefill)": train(tr, Kind.EMBED, Net.LOGISTIC),
             "EMBED MLP (before prefill)": train(tr, Kind.EMBED, Net.MLP)}
    after = {"FIRST logistic (after prefill)": train(tr, Kind.FIRST), "PREV logistic (after prefill)": train(tr, Kind.PREV)}
    shares = {n: p.predict_many(features=va.features) for n, p in preds.items()}
    shares.update({n: p.predict_many(routing=va.usage("prefill")) for n, p in after.items()})
    accuracy_table(tr, va, shares, [2, 3, 4])
    best_name = max(preds, key=lambda n: top_l_accuracy(shares[n], va.usage("all"), 3).mean())
    top_l = max(1, round(0.4 * tr.n_expert))
    pred = task_sensitivity(plain, preds[best_name], tr_prompts, top_l)
    pred_path = pred.save(args.work / "pred.npz")
    print(f"\nstore predictor: {best_name}; task sensitivity (outputs with experts restricted to its top {top_l}):")
    for name, info in sorted(pred.tasks.items()):
        print(f"- {name}: {info.prompts} training prompts, {info.output_tokens:.1f} tokens out, similarity "
              f"{info.similarity if info.similarity is not None else float('nan'):.3f} -> "
              f"{'predicted for' if info.sensitive else 'insensitive: no prediction, misses served cold'}")

    base, plain_outs = run_config(path, {}, va_prompts, args.decode, text, args.ppl_chunks, None)
    print(f"\nheld-out store runs: {len(va_prompts)} prompts in file order, {args.decode} greedy tokens each; "
          f"plain engine: perplexity {base['ppl']:.3f}\n")
    print("| budget | configuration | arena MiB | hit rate | misses / token | MiB moved / token | vs LRU | "
          "perplexity | vs plain | similarity | predictions / reuses |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.budgets:
        common = dict(expert_budget=f"{b}%", cache_policy="lru", miss="hot")
        configs = {"LRU": common}
        for p in (1, 10, 40):
            configs[f"LRU + prediction, p={p}"] = dict(common, predictor=pred_path, predict_every=p)
        configs["ERAS + prediction, p=40"] = dict(common, predictor=pred_path, predict_every=40, eras_alpha=args.eras)
        configs["prediction + mixed-precision misses, p=40"] = dict(common, predictor=pred_path, predict_every=40,
                                                                    miss="adaptive", miss_t1=0.8, miss_t2=1.0)
        configs["token lookup"] = dict(common, token_lookup=args.token_lookup)
        configs["prediction + token lookup, p=40"] = dict(common, predictor=pred_path, predict_every=40,
                                                           token_lookup=args.token_lookup)
        lru = None
        for name, opts in configs.items():
            row, _ = run_config(path, opts, va_prompts, args.decode, text, args.ppl_chunks, plain_outs)
            lru = lru or row
            print(f"| {b}% | {name} | {row['arena_mib']:.2f} | {row['hits']:.1%} | {row['misses']:.3f} | "
                  f"{row['mib']:.3f} | {row['mib'] / lru['mib'] - 1:+.1%} | {row['ppl']:.3f} | "
                  f"{row['ppl'] / base['ppl'] - 1:+.2%} | {row['sim']:.1%} | {row['predictions']} / {row['reuses']} |",
                  flush=True)
    held = plain.trace(va_prompts, max_tokens=args.decode)
    n_experts = held.n_layer * held.n_expert
    print(f"\nthe same held-out prompts replayed (bench/replay.py): expert moves per token of LRU against offline "
          f"bounds (hot copies only, so outputs stay the plain engine's)\n")
    print("| budget | slots | LRU | Belady's MIN, bypass (knows the future) | static per prompt (knows its usage) | "
          "decayed frequency, bypass | the same, knowing the token's later layers | token lookup (the store's) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.budgets:
        slots = min(n_experts, int(round(b / 100 * n_experts)))
        r = bounds(held, slots)
        lru = r.pop("LRU")
        print(f"| {b}% | {slots} | {lru:.3f} | " + " | ".join(f"{v:.3f} ({v / lru - 1:+.1%})" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
