"""Many sequences in one context (engine/batch.py, Transformer.forward_batch): each row's arithmetic is the
same as its sequence's alone, so batched greedy and seeded outputs equal each request run alone."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import micro_models
from hotcold import Model
from hotcold.engine.backend import CpuBackend
from hotcold.engine.batch import BatchEngine, ContextOverflow, Event, Finish, Request
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.model import Transformer
from hotcold.engine.sampling import SamplingParams
from hotcold.quant import QType

PROMPTS = ["The :mod:`array` module", "import os\nos.path.", "Return the", "class Foo:\n    def __init__(self",
           "The :mod:`array` module defines", "See also", "Changed in version 3.", "x = [1, 2"]


@pytest.mark.parametrize("variant,qtype,invariant", [
    ("mixtral", QType.Q8_0, False), ("qwen2moe", QType.Q4_0, False), ("olmoe", QType.Q8_0, False),
    ("llama", QType.Q8_0, False), ("qwen3moe", QType.F16, True), ("mixtral", QType.Q4_1, True)])
def test_batch_rows_equal_alone(tmp_path: Path, variant: str, qtype: QType, invariant: bool) -> None:
    """Prompt chunks and decode steps of several sequences in one pass give bit-identical logits to each
    sequence's own passes: always with the integer products, with batch_invariant for the float ones."""
    model = Transformer.load(GGUFFile(micro_models.write(variant, tmp_path / "m.gguf", qtype)),
                             CpuBackend(batch_invariant=invariant))
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 48, n).tolist() for n in (5, 1, 9, 3)]
    alone = []
    for s in seqs:
        ctx = model.context(32, 16)
        if len(s) > 1:
            model.forward(np.array(s[:-1]), ctx)
        alone.append(model.forward(np.array(s[-1:]), ctx).copy()[0])
    ctx = model.context(32, 16, n_seq=4)
    # pass 1: sequence 0's first 4 tokens, 1's only token, 2's first 8, 3's first 2; pass 2: the rest, one
    # each (a decode step beside prompt tails)
    first = [(0, seqs[0][:4]), (1, seqs[1]), (2, seqs[2][:8]), (3, seqs[3][:2])]
    z1 = model.forward_batch(first, ctx).copy()
    assert np.array_equal(z1[1], alone[1])
    z2 = model.forward_batch([(0, seqs[0][4:]), (2, seqs[2][8:]), (3, seqs[3][2:])], ctx).copy()
    for row, i in zip(z2, (0, 2, 3)):
        assert np.array_equal(row, alone[i]), i
    assert [len(t) for t in ctx.slots] == [5, 1, 9, 3]


def test_forward_batch_checks(tmp_path: Path) -> None:
    model = Transformer.load(GGUFFile(micro_models.write("mixtral", tmp_path / "m.gguf")))
    ctx = model.context(8, 8, n_seq=2)
    with pytest.raises(ValueError, match="twice"):
        model.forward_batch([(0, [1]), (0, [2])], ctx)
    with pytest.raises(ValueError, match="out of 0..1"):
        model.forward_batch([(2, [1])], ctx)
    with pytest.raises(ValueError, match="n_ctx=8 per sequence"):
        model.forward_batch([(0, list(range(1, 10)))], ctx)
    with pytest.raises(ValueError, match="n_batch=8"):
        model.forward_batch([(0, [1] * 5), (1, [1] * 5)], ctx)
    with pytest.raises(ValueError, match="n_seq_max"):
        model.context(8, 8, n_seq=0)


class Collector:
    """A request's events, and a way to wait for its end."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.finish is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish(self) -> Finish | None:
        return self.events[-1].finish if self.events else None


def _alone(path: Path, prompts: list[str], **kw) -> list[tuple[str, str]]:
    m = Model(path, **{k: v for k, v in kw.items() if k in ("expert_budget", "seed", "token_lookup")})
    out = []
    for i, p in enumerate(prompts):
        text = "".join(m.generate(p, max_tokens=24, temperature=0.0 if i % 2 == 0 else 0.9, seed=i))
        out.append((text, m.last_finish_reason))
    return out


@pytest.mark.parametrize("options", [{}, {"expert_budget": "100%"}, {"expert_budget": "30%", "token_lookup": 4}],
                         ids=["plain", "budget100", "budget30-lookup"])
def test_engine_outputs_equal_alone(trained_q8: Path, options: dict) -> None:
    """8 requests (greedy and seeded sampling) through 4 slots with a small n_batch (chunked prefill beside
    decode steps, a queue): each output equals the request run alone."""
    alone = _alone(trained_q8, PROMPTS, **options)
    m = Model(trained_q8, n_seq_max=4, n_batch=6, **options)
    eng = BatchEngine(m).start()
    try:
        cs = []
        for i, p in enumerate(PROMPTS):
            c = Collector()
            eng.submit(Request(m.tokenize(p, add_bos=True, special=True), c,
                               SamplingParams(temperature=0.0 if i % 2 == 0 else 0.9, seed=i), max_tokens=24))
            cs.append(c)
        for c in cs:
            assert c.done.wait(60)
    finally:
        eng.close()
    for c, (text, finish) in zip(cs, alone):
        assert c.text == text
        assert c.finish.value == finish
    assert eng.counters["requests"] == 8 and eng.active == 0 and eng.waiting == 0
    assert eng.counters["prompt_tokens_cached"] > 0     # PROMPTS[4] starts with PROMPTS[0]


def test_engine_prefix_reuse_and_cancel(trained_q8: Path) -> None:
    m = Model(trained_q8, n_seq_max=2)
    eng = BatchEngine(m).start()
    try:
        ids = m.tokenize(PROMPTS[0], add_bos=True, special=True)
        a = Collector()
        eng.submit(Request(ids, a, SamplingParams(temperature=0), max_tokens=8))
        assert a.done.wait(30) and a.finish is Finish.LENGTH
        b = Collector()
        eng.submit(Request(ids + m.tokenize(" x", add_bos=False), b, SamplingParams(temperature=0), max_tokens=4))
        assert b.done.wait(30)
        assert eng.counters["prompt_tokens_cached"] == len(ids)    # the whole first prompt came from the slot
        long = Collector()
        r = Request(ids, long, SamplingParams(temperature=0), max_tokens=0, ignore_eos=True)   # to the context's end
        eng.submit(r)
        r.cancel()
        assert long.done.wait(30) and long.finish is Finish.CANCELLED
        assert eng.active == 0
        with pytest.raises(ContextOverflow, match="context is"):
            eng.submit(Request([1] * m.n_ctx, Collector()))
        with pytest.raises(ValueError, match="empty"):
            eng.submit(Request([], Collector()))
    finally:
        eng.close()
    assert m.generate  # the Model is usable again once the engine is closed
    assert "".join(m.generate(PROMPTS[0], max_tokens=8, temperature=0)) == a.text
