"""moe-server's queue order (engine/schedule.py): FCFS unchanged, eMoE's task-aware rules as pure unit tests
(earliest deadline, shorter predicted work, shared predicted experts, the starvation bound), then the batch
engine on the shipped model admitting queued requests in the policy's order with each greedy output equal to
the request run alone, and the server's slo_ms/task fields, errors and SLO metrics."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from hotcold import Model
from hotcold.engine.batch import BatchEngine, Event, Finish, Request
from hotcold.engine.options import Schedule
from hotcold.engine.sampling import SamplingParams
from hotcold.engine.schedule import FCFS, Job, TaskAware, active_union, jaccard, policy_for


def job(order: int, arrival: float = 0.0, length: float = 16.0, slo_ms: float | None = None,
        experts: tuple[int, ...] | None = None) -> Job:
    mask = None
    if experts is not None:
        mask = np.zeros((2, 8), dtype=bool)
        mask[:, list(experts)] = True
    return Job(order, arrival, length, slo_ms, mask)


# --- the policies, pure --------------------------------------------------------------------------------------

def test_fcfs_is_arrival_order() -> None:
    p = FCFS()
    waiting = [job(0, length=100), job(1, length=1, slo_ms=1), job(2, experts=(0, 1))]
    assert [p.pick(waiting, [job(9, experts=(0, 1))], 5.0) for _ in range(3)] == [0, 0, 0]
    assert p.stats.picks == 3 and p.stats.reordered == 0
    assert not p.needs_predictions and p.schedule is Schedule.FCFS


def test_earliest_deadline_first() -> None:
    p = TaskAware()
    a, b, c = job(0, 0.0, length=1), job(1, 0.0, length=50, slo_ms=5000), job(2, 0.5, length=50, slo_ms=1000)
    assert p.pick([a, b, c], [], 0.6) == 2               # c's deadline 1.5 s comes before b's 5 s
    assert p.pick([a, b], [], 0.6) == 1                  # any live deadline before no deadline, however short
    assert p.pick([a], [], 0.6) == 0
    assert (p.stats.picks, p.stats.reordered) == (3, 2)


def test_close_deadlines_go_to_the_shorter() -> None:
    b, c = job(0, 0.0, length=50, slo_ms=1000), job(1, 0.05, length=10, slo_ms=1000)
    assert TaskAware().pick([b, c], [], 0.1) == 1        # within the 0.1 s tie window: length decides
    assert TaskAware(deadline_tie_s=0.0).pick([b, c], [], 0.1) == 0


def test_past_deadline_waits_for_live_ones_but_runs() -> None:
    p = TaskAware()
    late, live, free = job(0, 0.0, length=5, slo_ms=100), job(1, 0.05, length=50, slo_ms=10_000), job(2, 0.1, 50)
    assert p.pick([late, live, free], [], 1.0) == 1      # late's objective is lost; live's can still be met
    assert p.pick([late, free], [], 1.0) == 0            # then by length, like a request without slo_ms
    assert p.pick([free], [], 1.0) == 0


def test_shorter_predicted_length_first_then_arrival() -> None:
    p = TaskAware()
    assert p.pick([job(0, length=30), job(1, length=10), job(2, length=20)], [], 0.0) == 1
    assert p.pick([job(0, length=10), job(1, length=10)], [], 0.0) == 0


def test_shared_experts_decode_together() -> None:
    """Equal lengths: the request whose predicted experts the active slots use goes first; without
    predictions (None masks) or with the overlap weight 0, arrival order."""
    active = [job(7, experts=(0, 1)), job(8, experts=(1, 2))]
    apart, sharing = job(0, length=10, experts=(5, 6)), job(1, length=10, experts=(0, 1, 2))
    p = TaskAware()
    assert p.pick([apart, sharing], active, 0.0) == 1
    assert (p.stats.grouped, p.stats.reordered) == (1, 1)
    assert TaskAware(overlap_weight=0.0).pick([apart, sharing], active, 0.0) == 0
    assert TaskAware().pick([job(0, length=10), job(1, length=10)], active, 0.0) == 0
    assert TaskAware().pick([apart, sharing], [job(7), job(8)], 0.0) == 0    # active slots without predictions


def test_overlap_weight_is_a_discount_on_length() -> None:
    """cost = length x (1 - 0.5 x Jaccard): a full overlap halves a request's cost, no more."""
    active = [job(9, experts=(0, 1))]
    apart = job(0, length=10, experts=(5,))
    assert TaskAware().pick([apart, job(1, length=18, experts=(0, 1))], active, 0.0) == 1   # 9 < 10
    assert TaskAware().pick([apart, job(1, length=22, experts=(0, 1))], active, 0.0) == 0   # 11 > 10
    union = active_union(active)
    assert TaskAware().cost(job(1, length=12, experts=(0, 1, 2, 3)), union) == pytest.approx(12 * (1 - 0.5 * 0.5))
    assert jaccard(union, None) == 0.0 and jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
    assert active_union([job(0)]) is None


def test_no_starvation() -> None:
    """A long request behind a steady stream of short urgent ones is served once it has waited max_wait_s."""
    p = TaskAware(max_wait_s=5.0)
    long = job(0, 0.0, length=1000)
    served_at = None
    for t in range(1, 20):
        short = job(t, float(t), length=1, slo_ms=500)
        if p.pick([long, short], [], float(t)) == 0:
            served_at = t
            break
    assert served_at == 5 and p.stats.starved == 1


def test_policy_for_and_checks() -> None:
    assert type(policy_for(Schedule.FCFS)) is FCFS
    t = policy_for(Schedule.TASK, max_wait_s=3.0)
    assert type(t) is TaskAware and t.max_wait_s == 3.0 and t.needs_predictions
    with pytest.raises(ValueError, match="overlap_weight"):
        TaskAware(overlap_weight=2.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        TaskAware(max_wait_s=0)
    with pytest.raises(ValueError, match="waiting"):
        FCFS().pick([], [], 0.0)


# --- the batch engine on the shipped model ---------------------------------------------------------------------

SPECS = [  # (prompt, max_tokens, slo_ms, task), submitted in this order
    ("The :mod:`array` module", 12, None, "docs"),             # 0
    ("import os\nos.path.", 12, 60_000.0, "code"),             # 1
    ("Return the", 12, 30_000.0, "docs"),                      # 2
    ("class Foo:\n    def __init__(self", 4, None, "code"),    # 3
    ("See also", 6, 30_000.0, "docs"),                         # 4
]
# with one slot: 4 and 2 have the earliest deadlines (within the tie window): 4 is shorter; then 2, then 1's
# deadline; then the two without slo_ms, shorter first
TASK_ORDER = [4, 2, 1, 3, 0]


@pytest.fixture(scope="module")
def task_model(trained_q8: Path) -> Model:
    return Model(trained_q8, n_seq_max=1, schedule="task")


def _run_queued(eng: BatchEngine, m: Model, specs: list[tuple]) -> tuple[list[int], dict[int, str]]:
    """Submit every request before the first step, then step on this thread until done: the order in which
    they finished (one slot: the order they were admitted) and each one's text."""
    done, texts = [], {i: "" for i in range(len(specs))}

    def emit(i: int):
        def f(ev: Event) -> None:
            texts[i] += ev.text
            if ev.finish is not None:
                assert ev.finish in (Finish.STOP, Finish.LENGTH), ev
                done.append(i)
        return f
    reqs = [Request(m.tokenize(p, add_bos=True, special=True), emit(i), SamplingParams(temperature=0), max_tokens=n,
                    slo_ms=slo, task=task) for i, (p, n, slo, task) in enumerate(specs)]
    for r in reqs:
        eng.submit(r)
    while eng.step():
        pass
    return done, texts


def test_engine_admits_in_policy_order_outputs_unchanged(task_model: Model) -> None:
    m = task_model
    eng = BatchEngine(m)
    assert type(eng.policy) is TaskAware
    order, texts = _run_queued(eng, m, SPECS)
    assert order == TASK_ORDER
    s = eng.stats()
    assert s["schedule"] == "task" and s["decisions"]["picks"] == 5 and s["decisions"]["reordered"] == 4
    assert (s["slo_requests"], s["slo_met"]) == (3, 3)
    fcfs = BatchEngine(m, FCFS())
    assert _run_queued(fcfs, m, SPECS) == (list(range(5)), texts)
    assert fcfs.stats()["decisions"]["reordered"] == 0
    for i, (p, n, _, _) in enumerate(SPECS):
        assert texts[i] == "".join(m.generate(p, max_tokens=n, temperature=0)), i
    with pytest.raises(ValueError, match="slo_ms"):
        eng.submit(Request([1, 2], lambda ev: None, slo_ms=0))
    with pytest.raises(ValueError, match="slo_ms"):
        eng.submit(Request([1, 2], lambda ev: None, slo_ms=float("nan")))


def test_engine_predicts_once_and_passes_the_task(task_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Schedule.TASK each request's experts and length are predicted once, at submit, by its task; the
    store's begin_prompt gets each admitted prompt with its task."""
    m = task_model
    predicted, began = [], []

    def experts(ids, task):
        predicted.append(task)
        return None
    monkeypatch.setattr(m, "predict_experts", experts)
    monkeypatch.setattr(m, "predicted_output_tokens", lambda task: {"short": 3.0, "long": 40.0}.get(task))
    monkeypatch.setattr(m.ctx.experts, "begin_prompt", lambda ids, task=None, join=False: began.append(task))
    specs = [("The", 8, None, "long"), ("See", 8, None, None), ("Return", 8, None, "short")]
    order, _ = _run_queued(BatchEngine(m), m, specs)
    assert order == [2, 0, 1]       # predicted 3 tokens; then 8 (max_tokens caps the 40) before 8, by arrival
    assert predicted == ["long", None, "short"] and began == ["short", "long", None]


def test_server_slo_and_task_fields(task_model: Model) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from hotcold.engine.server.app import create_app

    m = task_model
    want = "".join(m.generate("The", max_tokens=3, temperature=0))
    eng = BatchEngine(m).start()
    try:
        with TestClient(create_app(m, eng)) as c:
            for bad, where in [({"slo_ms": 0}, "slo_ms"), ({"slo_ms": -5}, "slo_ms"), ({"slo_ms": "100"}, "slo_ms"),
                               ({"slo_ms": True}, "slo_ms"), ({"task": 3}, "task"), ({"task": ""}, "task")]:
                for path, body in [("/v1/completions", {"prompt": "The"}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
                    r = c.post(path, json={**body, "max_tokens": 2, **bad})
                    err = r.json()["error"]
                    assert r.status_code == 400 and err["type"] == "invalid_request_error", (bad, r.text)
                    assert err["param"] == where and where in err["message"], (bad, err)
            r = c.post("/v1/completions", json={"prompt": "The", "max_tokens": 3, "temperature": 0, "slo_ms": 60_000,
                                                "task": "docs"})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                     "slo_ms": 0.001, "task": "chat"})   # 1 us: missed
            assert r.status_code == 200
            fams = {f.name: f.samples[0].value for f in text_string_to_metric_families(c.get("/metrics").text)}
    finally:
        eng.close()
    assert (fams["hotcold_slo_requests"], fams["hotcold_slo_met"]) == (2, 1)
    assert fams["hotcold_schedule_picks"] == 2 and fams["hotcold_schedule_reordered"] == 0
