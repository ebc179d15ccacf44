"""eMoE: expert traces, the expert predictor, loading a prompt's predicted experts before its prefill (reused for
predict_every prompts, skipped for tasks insensitive to routing), and moe-trace / moe-predictor end to end."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest

from hotcold.cli import predictor as predictor_cli
from hotcold.cli import run as run_cli
from hotcold.cli import trace as trace_cli
from hotcold.keys import predictor_path_for
from hotcold.engine import sensitivity
from hotcold.engine.api import Model
from hotcold.engine.experts.ahead import Ahead
from hotcold.engine.experts.cache import ExpertCache
from hotcold.engine.experts.rules import MissMode
from hotcold.engine.options import Options
from hotcold.engine.predictor import (Kind, Net, Predictor, TaskInfo, most_frequent, previous_prompt, select,
                                      top_l_accuracy, train)
from hotcold.engine.trace import TraceError, Traces
from hotcold.quant import QType

from test_residency import _experts, _routing


def _traces(features: np.ndarray, rule: Callable[[np.ndarray], np.ndarray], n_expert: int, tokens: int = 4,
            tasks: Sequence[str] | None = None) -> Traces:
    """Synthetic traces: every token of prompt i (half of them its prompt, half generated) routes to
    rule(features[i]), an (L, k) array of expert ids, with equal gate weights."""
    per = [np.asarray(rule(f), dtype=np.int16) for f in features]
    experts = np.concatenate([np.repeat(e[None], tokens, axis=0) for e in per])
    P, (L, k) = len(per), per[0].shape
    return Traces(experts, np.full(experts.shape, 1 / k, np.float32), np.arange(P + 1, dtype=np.int64) * tokens,
                  np.full(P, tokens // 2, np.int64), np.asarray(features, np.float32),
                  np.array(list(tasks) if tasks is not None else [""] * P, dtype=str), np.arange(L, dtype=np.int64),
                  n_expert, "synthetic.gguf")


def _classes(n: int, seed: int) -> np.ndarray:
    """n prompts' features (6,): each of one of three classes, marked by a large entry among the first three."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 3, n)
    f = rng.normal(0.0, 0.3, (n, 6)).astype(np.float32)
    f[np.arange(n), c] += 3.0
    return f


def _rule(f: np.ndarray) -> np.ndarray:
    """The hand-made routing: class c uses experts 2c + l and 2c + l + 3 (mod 8) in layer l of 3."""
    c = int(np.argmax(f[:3]))
    return np.array([[(2 * c + l) % 8, (2 * c + l + 3) % 8] for l in range(3)])


# --- traces -------------------------------------------------------------------------------------------------

def test_traces_round_trip_and_bad_files_are_named(tmp_path: Path) -> None:
    t = _traces(_classes(5, 0), _rule, 8, tasks=["docs", "code", "", "docs", "code"])
    path = t.save(tmp_path / "t.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]                      # no temporary left behind
    u = Traces.load(path)
    for name in ("experts", "weights", "offsets", "n_prompt", "features", "tasks", "layers"):
        a, b = getattr(t, name), getattr(u, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (u.n_expert, u.model, u.tokens) == (8, "synthetic.gguf", None)             # written without token ids
    from dataclasses import replace
    with_ids = replace(t, tokens=np.arange(len(t.experts), dtype=np.int64))
    v = Traces.load(with_ids.save(tmp_path / "ids.npz"))
    assert v.tokens.dtype == np.int64 and np.array_equal(v.tokens, with_ids.tokens)
    assert np.array_equal(v.subset([1]).tokens, with_ids.tokens[v.rows(1)])
    (tmp_path / "ids.npz").unlink()

    def fails(p: Path, words: str) -> None:
        with pytest.raises(TraceError, match=words):
            Traces.load(p)

    fails(tmp_path / "none.npz", "none.npz: no such traces file.*moe-trace")
    (tmp_path / "half.npz").write_bytes(path.read_bytes()[:200])
    fails(tmp_path / "half.npz", "half.npz: not a traces file of moe-trace")
    (tmp_path / "text.npz").write_text("experts\n")
    fails(tmp_path / "text.npz", "not a traces file of moe-trace")
    pred = train(t, steps=5).save(tmp_path / "pred.npz")                             # another kind of .npz
    fails(pred, "not a version-1 traces file.*missing experts")
    bad = Traces(t.experts.copy(), t.weights, t.offsets, t.n_prompt, t.features, t.tasks, t.layers, 8)
    bad.experts[3, 1, 0] = 9                                                        # a hostile file
    fails(bad.save(tmp_path / "bad.npz"), "bad.npz: expert ids must lie in 0..7")
    short = Traces(t.experts[:-1], t.weights[:-1], t.offsets, t.n_prompt, t.features, t.tasks, t.layers, 8)
    fails(short.save(tmp_path / "short.npz"), "offsets must rise from 0 to the number of traced tokens")
    few_ids = replace(t, tokens=np.zeros(len(t.experts) - 1, np.int64))
    fails(few_ids.save(tmp_path / "ids.npz"), "tokens needs one id")


def test_a_predictor_file_with_the_wrong_heads_or_prior_is_named(tmp_path: Path) -> None:
    from dataclasses import replace
    from hotcold.engine.predictor import PredictorError
    t = _traces(_classes(6, 0), _rule, 8)
    p = train(t, Kind.PREV, steps=5)
    for bad, words in [(replace(p, heads=()), "has 2 head"), (replace(p, heads=p.heads[:1]), "has 2 head"),
                       (replace(p, prior=np.ones((2, 8))), "prior is not 3 x 8")]:
        with pytest.raises(PredictorError, match=words):
            Predictor.load(bad.save(tmp_path / "bad.npz"))


def test_traces_of_the_prompts_alone(plain: Model) -> None:
    """max_tokens=0 traces the prompt tokens and nothing after (generate's 0 would run to the end of the context)."""
    t = plain.trace([{"prompt": "The array module", "task": "docs"}], max_tokens=0)
    assert int(t.output_tokens().sum()) == 0 and t.experts.shape[0] == int(t.n_prompt[0]) > 0
    assert t.tokens.tolist() == plain.tokenize("The array module", special=True)       # each row's token


def test_traces_record_each_rows_token(plain: Model) -> None:
    """The prompt's tokens, then the generated ones that were fed back (all but the last): what the greedy
    generation itself gives."""
    prompt = "The array module"
    t = plain.trace([prompt], max_tokens=6)
    ids = plain.tokenize(prompt, special=True)
    got: list = []
    plain.reset()
    for _ in plain.generate(ids, max_tokens=6, temperature=0.0, _logprobs=(got, 0)):
        pass
    fed = ids + [int(tok) for tok, _, _ in got][:-1]
    assert t.tokens.tolist() == fed and len(t.tokens) == len(t.experts)


# --- the predictor ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,net", [(Kind.EMBED, Net.LOGISTIC), (Kind.EMBED, Net.MLP), (Kind.FIRST, Net.LOGISTIC),
                                      (Kind.PREV, Net.LOGISTIC)])
def test_the_predictor_learns_a_routing_rule_exactly(kind: Kind, net: Net, tmp_path: Path) -> None:
    learn, held = _traces(_classes(48, 0), _rule, 8), _traces(_classes(24, 1), _rule, 8)
    pred = train(learn, kind, net, hidden=16)

    def predict(p: Predictor) -> np.ndarray:
        if kind is Kind.EMBED:
            return p.predict_many(features=held.features)
        return p.predict_many(routing=held.usage("prefill"))

    actual = held.usage()
    acc = top_l_accuracy(predict(pred), actual, 2)
    learnt = acc if kind is Kind.EMBED else acc[1:]                 # first and prev give the first layer the prior
    assert learnt.tolist() == [1.0] * len(learnt)
    assert (top_l_accuracy(most_frequent(learn.usage(), held.n_prompts), actual, 2) < 0.9).all()
    assert (top_l_accuracy(previous_prompt(actual, pred.prior), actual, 2) < 0.9).all()
    np.testing.assert_allclose(predict(Predictor.load(pred.save(tmp_path / "pred.npz"))), predict(pred))


# --- ahead of a prompt, on the cache ------------------------------------------------------------------------

USED = ([1, 3], [0, 2])                                              # the scripted prompt's experts, layers 0 and 1
SCRIPT = [(0, [[1, 3], [3, 1], [1, 3]]), (1, [[0, 2], [2, 0], [0, 2]]), (0, [[3, 1]]), (1, [[2, 0]])]  # prefill, 1 step


def _scripted_predictor() -> Predictor:
    """Trained on prompts that all route as SCRIPT does (their features alike): it predicts exactly USED."""
    return train(_traces(np.zeros((2, 4), np.float32), lambda f: np.array(USED), n_expert=4), steps=50)


def _full_cache(cold: bool = False) -> ExpertCache:
    """2 layers x 4 experts, 4 slots (2 a layer), filled with the experts SCRIPT does not use."""
    c = ExpertCache(_experts(2, 4, QType.F32), Options.parse(expert_budget="50%"),
                    _experts(2, 4, QType.Q8_0, seed=1) if cold else None)
    c.prepare(0, _routing([[0, 2], [2, 0]]))
    c.prepare(1, _routing([[1, 3], [3, 1]]))
    c.reset_stats()
    return c


def _ahead(c: ExpertCache, pred: Predictor, every: int = 1) -> None:
    c.ahead = Ahead(pred, lambda ids: np.zeros(pred.n_embd, np.float32), c.n_layer, 2, every)


def test_a_perfect_predictor_leaves_no_misses() -> None:
    c = _full_cache()
    _ahead(c, _scripted_predictor())
    c.begin_prompt([5, 6, 7])
    assert set(c.arena.slot_of) == {(l, e) for l, ids in enumerate(USED) for e in ids}
    for layer, ids in SCRIPT:
        c.prepare(layer, _routing(ids))
    s = c.report()
    assert (s["misses"], s["hits"], s["preloaded"], s["predictions"], s["prediction_reuses"]) == (0, 16, 4, 1, 0)
    plain = _full_cache()                                            # the same prompt without the predictor
    for layer, ids in SCRIPT:
        plain.prepare(layer, _routing(ids))
    assert plain.report()["misses"] == 12


def test_an_insensitive_task_is_not_predicted_for_and_its_misses_are_cold() -> None:
    c = _full_cache(cold=True)
    pred = _scripted_predictor().with_tasks({"chat": TaskInfo(2, 3.0, similarity=0.97),
                                             "math": TaskInfo(2, 3.0, similarity=0.5)})
    assert not pred.sensitive("chat") and pred.sensitive("math") and pred.sensitive("unmeasured")
    _ahead(c, pred, every=2)
    c.begin_prompt([5, 6, 7], "chat")
    assert c.miss is MissMode.COLD and not any(s.loads for s in c.stats)
    plan = c.prepare(0, _routing([[1, 3], [3, 1]]))
    assert plan.experts[1] is c.cold[0][1] and plan.experts[3] is c.cold[0][3]
    s = c.report()
    assert (s["misses"], s["cold"], s["loads"], s["predictions"], s["insensitive_prompts"]) == (4, 4, 0, 0, 1)
    c.begin_prompt([5, 6, 7], "math")                                # a sensitive task: predicted, misses hot again
    c.begin_prompt([8, 9], None)                                     # predict_every=2: the prediction reused
    s = c.report()
    assert c.miss is MissMode.HOT and (s["predictions"], s["prediction_reuses"], s["preloaded"]) == (1, 1, 4)


# --- the model and the command lines ------------------------------------------------------------------------

PROMPTS = [{"prompt": "The :mod:`array` module", "task": "docs"},
           {"prompt": "The :mod:`pkgutil` module provides utilities for the import system", "task": "docs"},
           {"prompt": "def fib(n):", "task": "code"}]


def _cli(main: Callable[[list[str]], int], *argv: Any) -> tuple[int, str, str]:
    """A CLI's exit status, stdout and stderr, run in this process (the model's kernels are compiled already)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:                                      # argparse's one-line errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _table(out: str) -> list[list[str]]:
    """The rows of a markdown table, header and separator left out."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:]]


@pytest.fixture(scope="module")
def emoe(trained_q8: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """moe-trace on three labelled prompts and moe-predictor train on the traces, once for this module."""
    d = tmp_path_factory.mktemp("emoe")
    prompts, traces, pred = d / "prompts.jsonl", d / "traces.npz", d / "pred.npz"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    traced = _cli(trace_cli.main, trained_q8, "--prompts", prompts, "-o", traces, "-n", 4, "-c", 64, "--no-progress")
    trained = _cli(predictor_cli.main, "train", traces, "-o", pred, "--steps", 200)
    return dict(prompts=prompts, traces=traces, pred=pred, traced=traced, trained=trained)


@pytest.fixture(scope="module")
def plain(trained_q8: Path) -> Model:
    return Model.load(trained_q8, n_ctx=64)


def test_cli_trace_train_eval_and_run_with_the_predictor(emoe: dict[str, Any], plain: Model, trained_q8: Path) -> None:
    rc, out, err = emoe["traced"]
    assert rc == 0 and out == "", err
    assert "moe-trace: 3 prompts" in err and "tasks code, docs" in err and str(emoe["traces"]) in err
    t = Traces.load(emoe["traces"])
    assert (t.n_prompts, t.n_layer, t.n_expert, t.model) == (3, 4, 8, trained_q8.name)
    assert t.tasks.tolist() == ["docs", "docs", "code"] and 0 < t.output_tokens().max() <= 4
    for i, p in enumerate(PROMPTS):
        ids = plain.tokenize(p["prompt"], special=True)
        assert t.n_prompt[i] == len(ids)
        np.testing.assert_array_equal(t.features[i], plain.prompt_features(ids))

    rc, out, err = emoe["trained"]
    assert rc == 0 and "on 3 prompts" in err and "tasks code, docs" in err, err
    pred = Predictor.load(emoe["pred"])
    assert (pred.kind, pred.layers, pred.n_embd, pred.tasks["docs"].prompts) == (Kind.EMBED, (0, 1, 2, 3), 256, 2)

    rc, out, err = _cli(predictor_cli.main, "eval", emoe["pred"], emoe["traces"], "--top-l", 2)
    assert rc == 0 and "top-2 accuracy" in err, err
    assert out.splitlines()[0] == "| layer | predictor | most frequent | previous prompt |"
    rows = _table(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "mean"]
    want = top_l_accuracy(pred.predict_many(features=t.features), t.usage(), 2)
    assert [r[1] for r in rows] == [f"{a:.3f}" for a in want] + [f"{want.mean():.3f}"]

    # the predicted experts are loaded before the prompt; with hot misses the text is the plain engine's
    args = ("-p", PROMPTS[0]["prompt"], "-n", 4, "--temp", 0, "-c", 64, "--expert-budget", "25%")
    rc, out, err = _cli(run_cli.main, trained_q8, *args, "--predictor", emoe["pred"], "--stats")
    assert rc == 0, err
    assert out == "".join(plain.generate(PROMPTS[0]["prompt"], max_tokens=4, temperature=0)) + "\n"
    m = Model.load(trained_q8, n_ctx=64, expert_budget="25%", predictor=emoe["pred"])
    ids = m.tokenize(PROMPTS[0]["prompt"], special=True)
    mask = m.predict_experts(ids, "docs")
    assert mask.shape == (4, 8) and 0 < mask.sum() and (mask.sum(1) <= 2).all()     # 8 slots: 2 a layer
    for _ in m.generate(ids, max_tokens=2, temperature=0, task="docs"):
        pass
    s = m.expert_stats()
    assert (s["predictions"], s["preloaded"]) == (1, int(mask.sum()))


def test_a_predictor_next_to_the_model_is_used_with_a_budget(emoe: dict[str, Any], trained_q8: Path,
                                                             tmp_path: Path) -> None:
    """moe-predictor train -m MODEL writes MODEL.predictor.npz; a budget then loads it unless told 'none'."""
    model = tmp_path / trained_q8.name
    model.symlink_to(trained_q8)                                     # a folder of its own: nothing left by the shared one
    rc, _, err = _cli(predictor_cli.main, "train", emoe["traces"], "-m", model, "--steps", 50)
    assert rc == 0 and str(predictor_path_for(model)) in err, err
    assert predictor_path_for(model).name == trained_q8.name[:-5] + ".predictor.npz"
    assert Model.load(model, n_ctx=64, expert_budget="25%").predictor is not None
    assert Model.load(model, n_ctx=64, expert_budget="25%", predictor="none").predictor is None
    assert Model.load(model, n_ctx=64).predictor is None                             # no budget: no store to drive
    args = ("-p", PROMPTS[0]["prompt"], "-n", 2, "--temp", 0, "-c", 64, "--expert-budget", "25%", "--stats")
    rc, _, err = _cli(run_cli.main, model, *args)
    assert rc == 0 and f"expert predictor {predictor_path_for(model)}: 1 predictions" in err, err
    other = tmp_path / "other.gguf"
    for argv, words in [(("train", emoe["traces"]), "-o PRED.npz, or -m MODEL.gguf"),
                        (("train", emoe["traces"], "-m", other), "holds traces of " + trained_q8.name)]:
        rc, _, err = _cli(predictor_cli.main, *argv)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_predict_every_reuses_the_prediction(emoe: dict[str, Any], trained_q8: Path) -> None:
    m = Model.load(trained_q8, n_ctx=64, expert_budget="25%", predictor=emoe["pred"], predict_every=3)
    for p in PROMPTS + PROMPTS[:2]:                                  # 5 prompts
        for _ in m.generate(p["prompt"], max_tokens=1, temperature=0, task=p["task"]):
            pass
    s = m.expert_stats()
    assert (s["predictions"], s["prediction_reuses"], s["insensitive_prompts"]) == (2, 3, 0)


def test_cli_sensitivity_saves_each_tasks_similarity(emoe: dict[str, Any], trained_q8: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred.npz"
    shutil.copy(emoe["pred"], pred)
    rc, out, err = _cli(predictor_cli.main, "sensitivity", trained_q8, pred, "--prompts", emoe["prompts"], "-n", 4,
                        "-c", 64, "--top-l", 2)
    assert rc == 0 and "wrote the sensitivity of 2 tasks" in err, err
    p = Predictor.load(pred)
    assert out.splitlines()[0] == "| task | prompts | similarity | sensitive |"
    assert _table(out) == [[t, n, f"{p.tasks[t].similarity:.3f}", "yes" if p.sensitive(t) else "no"]
                           for t, n in (("code", "1"), ("docs", "2"))]
    assert all(0.0 <= p.tasks[t].similarity <= 1.0 for t in ("code", "docs"))


def test_sensitivity_restricts_each_layer_to_what_the_store_would_load(emoe: dict[str, Any], plain: Model,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    masks: list[np.ndarray] = []

    class Spy(sensitivity.Restricted):
        def __init__(self, inner: Any, mask: np.ndarray) -> None:
            masks.append(mask.copy())
            super().__init__(inner, mask)

    monkeypatch.setattr(sensitivity, "Restricted", Spy)
    pred, ids = Predictor.load(emoe["pred"]), plain.tokenize("def f")
    assert 0.0 <= sensitivity.restricted_similarity(plain, pred, ids, 2, 2) <= 1.0
    want = select(pred.predict(plain.prompt_features(ids)), 2, 2, len(ids) + 2)
    assert np.array_equal(masks[0][list(pred.layers)], want)
    n = masks[0].sum(1)
    assert ((n >= 1) & (n <= 2)).all()                               # every MoE layer restricted, to top-2 at most


def test_cli_errors_are_one_line_and_exit_2(emoe: dict[str, Any], trained_q8: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "task": "docs"}\n{"prompt": \n')
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 100}) + "\n")
    foreign = train(_traces(_classes(4, 0), _rule, 8), steps=5).save(tmp_path / "foreign.npz")
    out = tmp_path / "t.npz"
    cases = [
        (trace_cli.main, (trained_q8, "--prompts", tmp_path / "none.jsonl", "-o", out), "cannot read prompts"),
        (trace_cli.main, (trained_q8, "--prompts", bad, "-o", out), "bad.jsonl:2: not JSON"),
        (trace_cli.main, (tmp_path / "none.gguf", "--prompts", emoe["prompts"], "-o", out), "No such file"),
        (trace_cli.main, (trained_q8, "--prompts", emoe["prompts"], "-o", tmp_path / "no" / "t.npz"), "does not exist"),
        (trace_cli.main, (trained_q8, "--prompts", emoe["prompts"]), "required: -o"),
        (trace_cli.main, (trained_q8, "--prompts", emoe["prompts"], "-o", out, "-n", -1), "-n -1: give the tokens"),
        (trace_cli.main, (trained_q8, "--prompts", long, "-o", out, "-c", 64), "long.jsonl: prompt 1 has"),
        (predictor_cli.main, ("train", tmp_path / "none.npz", "-o", out), "no such traces file"),
        (predictor_cli.main, ("train", emoe["prompts"], "-o", out), "not a traces file of moe-trace"),
        (predictor_cli.main, ("train", emoe["traces"], "-o", out, "--hidden", 8), "--net mlp"),
        (predictor_cli.main, ("eval", emoe["traces"], emoe["traces"]), "not a predictor of moe-predictor train"),
        (predictor_cli.main, ("eval", foreign, emoe["traces"]), "was trained on synthetic.gguf"),
        (predictor_cli.main, ("eval", emoe["pred"], emoe["traces"], "--top-l", 9), "only 8 experts"),
        (predictor_cli.main, ("eval", emoe["pred"], emoe["traces"], "--top-l", 0), "--top-l: '0': give a positive"),
        (predictor_cli.main, (), "required: {train,eval,sensitivity}"),
        (predictor_cli.main, ("sensitivity", trained_q8, foreign, "--prompts", emoe["prompts"]),
         "trained on synthetic.gguf"),
        (run_cli.main, (trained_q8, "-p", "x", "-n", 1, "--predictor", foreign), "trained on synthetic.gguf"),
        (run_cli.main, (trained_q8, "-p", "x", "-n", 1, "--predictor", tmp_path / "none.npz"), "no such predictor"),
    ]
    for main, argv, words in cases:
        rc, _, err = _cli(main, *argv)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "foreign.npz", "long.jsonl"]   # no output
