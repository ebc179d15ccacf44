"""Token lookup (engine/experts/lookup.py): the routing of earlier occurrences of a token predicts which residents to
keep, and the store evicts by it (engine/experts/cache.py `_furthest`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotcold.engine.experts.cache import ExpertCache
from hotcold.engine.experts.lookup import TokenLookup
from hotcold.engine.moe import Routing
from hotcold.engine.options import Options
from hotcold.quant import QType

from test_residency import _experts

L, E = 2, 4


def _run(lk: TokenLookup | ExpertCache, token: int, rows: list[list[int]]) -> None:
    """One decode pass of `token` selecting rows[layer] at each layer."""
    lk.begin_step(np.array([token])) if isinstance(lk, ExpertCache) else lk.begin(np.array([token]))
    for layer, ids in enumerate(rows):
        if isinstance(lk, ExpertCache):
            lk.prepare(layer, Routing(np.array([ids]), np.full((1, len(ids)), 0.5, np.float32)))
        else:
            lk.record(layer, np.array([ids]))


def test_a_token_seen_before_predicts_its_layers_and_what_followed() -> None:
    lk = TokenLookup(L, E, horizon=4)
    _run(lk, 7, [[0, 1], [2, 3]])
    _run(lk, 8, [[2, 3], [0, 1]])
    _run(lk, 9, [[1, 2], [1, 2]])
    lk.begin(np.array([5]))                                  # never seen: no prediction, counts order
    assert lk.predictions == 0 and np.isinf(lk._ahead).all()
    lk.record(0, np.array([[0, 3]]))
    lk.record(1, np.array([[0, 3]]))
    lk.begin(np.array([7]))                                  # 7 again: its rows, then 8's, 9's, 5's predict
    assert lk.predictions == 1
    s = lk.score(0)                                          # at layer 0 of the current token
    assert s[1, 2] < s[1, 0]                                 # layer 1 expert 2: this token (7 chose 2, 3 there)
    assert s[0, 2] < s[0, 1] < s[0, 0]                       # layer 0: 8 picks 2 next token, 9 picks 1 after it,
    assert s.max() < 1e11                                    # 5 picks 0 after that: all predicted in 4 tokens
    lk.begin(np.array([4]))                                  # a token never seen: the prediction is gone
    assert np.isinf(lk._ahead).all()


def test_experts_not_predicted_within_the_horizon_go_first_the_least_selected_first() -> None:
    lk = TokenLookup(L, E, horizon=2)
    _run(lk, 7, [[0, 1], [2, 3]])
    _run(lk, 8, [[2, 3], [0, 1]])
    _run(lk, 9, [[0, 2], [0, 1]])
    lk.begin(np.array([7]))                                  # rows of 7 and 8 predict; 9's is past the horizon
    s = lk.score(0)
    assert s[0, 0] > 1e11 and s[0, 1] > 1e11                 # layer 0's 0 and 1: not again within 2 tokens
    assert s[0, 1] > s[0, 0]                                 # 1 was selected less lately than 0: it goes first
    assert s[0, 2] < 1e11 and s[0, 3] < 1e11                 # 2 and 3: next token (8 follows 7)


def test_an_interrupted_pass_does_not_join_the_history() -> None:
    lk = TokenLookup(L, E, horizon=4)
    lk.begin(np.array([3]))
    lk.record(0, np.array([[0, 1]]))                         # layer 1 never ran (an error in the pass)
    lk.begin(np.array([3]))
    assert lk.predictions == 0 and lk._n == 0


def test_the_history_is_a_ring_across_sequences() -> None:
    lk = TokenLookup(L, E, horizon=2, capacity=3)
    for t in (1, 2, 3, 4):
        _run(lk, t, [[t % E, (t + 1) % E], [0, 1]])
    lk.begin(np.array([1]))                                  # token 1's row was overwritten: no prediction
    assert lk.predictions == 0
    lk.record(0, np.array([[0, 1]]))
    lk.record(1, np.array([[0, 1]]))
    lk.begin(np.array([3]))                                  # still in the ring: predicted
    assert lk.predictions == 1


def _cache(slots: int, **kw) -> ExpertCache:
    hot = _experts(L, E, QType.F32)
    opt = Options.parse(expert_budget=slots * hot[0][0].nbytes, **kw)
    return ExpertCache(hot, opt)


def test_the_store_keeps_what_the_lookup_predicts_where_lru_evicts_it() -> None:
    """3 slots, one layer in use. Tokens 1 2 3 1 2 3 ...: token 1 selects experts 0 and 1, token 2 selects 2 and 0,
    token 3 selects 3 and 0. LRU evicts expert 1 to make room for 3 and 2 in turn and misses each time round;
    with the lookup, once the cycle has been seen, the expert needed furthest ahead goes, or the miss is read
    where it lies."""
    seq = [1, 2, 3] * 6
    rows = {1: [[0, 1], [0, 1]], 2: [[2, 0], [0, 1]], 3: [[3, 0], [0, 1]]}
    hot = _experts(L, E, QType.F32)
    moved = {}
    for name, kw in (("lru", {}), ("lookup", {"token_lookup": 4})):
        c = ExpertCache(hot, Options.parse(expert_budget=5 * hot[0][0].nbytes, **kw))   # layer 1's two + three
        for t in seq:
            _run(c, t, rows[t])
        moved[name] = c.report()["bytes_moved"]
        assert c.report()["token_lookups"] == (15 if kw else 0)  # every token after the first three
    assert moved["lookup"] < moved["lru"]


def test_token_lookup_option() -> None:
    assert Options.parse(token_lookup=4).token_lookup == 4
    with pytest.raises(ValueError, match="token_lookup"):
        Options.parse(token_lookup=-1)


def test_outputs_do_not_change(trained_q8: Path) -> None:
    """Only residency changes: greedy tokens and logits equal the plain engine's at a 40% budget."""
    from hotcold import Model
    prompt = "The :mod:`pkgutil` module provides utilities for the import system, in particular package support."
    plain = Model(trained_q8, n_ctx=128)
    look = Model(trained_q8, n_ctx=128, expert_budget="40%", token_lookup=4)
    ids = plain.tokenize(prompt)
    out = {}
    for name, m in (("plain", plain), ("look", look)):
        got: list = []
        for _ in m.generate(ids, max_tokens=24, temperature=0.0, _logprobs=(got, 0)):
            pass
        out[name] = [int(t) for t, _, _ in got]
    assert out["look"] == out["plain"]
    s = look.expert_stats()
    assert s["token_lookups"] > 0 and s["misses"] > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=2, unique=True),
                                                    min_size=3, max_size=3)), min_size=1, max_size=30),
       st.integers(0, 8), st.integers(1, 4))
def test_invariants_under_random_tokens(tokens: list, slots: int, horizon: int) -> None:
    """Any tokens and routings: the budget holds, every selection is computed (hot misses), hits + misses count
    every selection, each miss moves one expert's bytes, and only selected experts are resident."""
    hot = _experts(3, 6, QType.F32)
    c = ExpertCache(hot, Options.parse(expert_budget=slots * hot[0][0].nbytes, token_lookup=horizon))
    for token, rows in tokens:
        c.begin_step(np.array([token]))
        for layer, ids in enumerate(rows):
            plan = c.prepare(layer, Routing(np.array([ids]), np.full((1, 2), 0.5, np.float32)))
            assert set(plan.experts) == set(ids)
            assert c.arena.used_bytes <= c.budget_bytes
            assert len(c.arena.slot_of) + len(c.arena.free) == c.arena.n_slots
    s = c.report()
    assert s["hits"] + s["misses"] == 6 * len(tokens)
    assert s["bytes_moved"] == s["misses"] * hot[0][0].nbytes             # a hot miss moves one expert, loaded or not
    selected = {(layer, e) for _, rows in tokens for layer, ids in enumerate(rows) for e in ids}
    assert set(c.arena.slot_of) <= selected                              # only what was selected is resident


def test_in_a_batch_each_sequence_follows_its_own_history() -> None:
    """Two sequences decode side by side, one row each a pass: sequence 0 runs tokens 1 2, sequence 1 tokens 3 4.
    When sequence 0 meets token 1 again, what follows it is its own token 2's row, not sequence 1's token 3."""
    lk = TokenLookup(L, E, horizon=2)
    steps = [([1, 3], [[[0, 1], [0, 1]], [[2, 3], [2, 3]]]), ([2, 4], [[[1, 2], [1, 2]], [[3, 0], [3, 0]]])]
    for ids, rows in steps:
        lk.begin(np.array(ids), np.array([0, 1]))
        for layer in range(L):
            lk.record(layer, np.array([rows[0][layer], rows[1][layer]]))
    lk.begin(np.array([1, 9]), np.array([0, 1]))             # sequence 0 meets 1 again; 9 is new
    assert lk.predictions == 1
    assert lk._ahead[0][0, 0] == 0 and lk._ahead[0][0, 1] == 0   # token 1's own row
    assert lk._ahead[1][0, 2] == 1                               # then its sequence's token 2 (experts 1, 2)
    assert np.isinf(lk._ahead[1][0, 3])                          # sequence 1's token 3 never followed token 1


def test_a_loop_predicts_itself_past_the_present() -> None:
    """Greedy decoding that repeats itself (7 8 7 8 ...): from 7's last occurrence the walk reaches the present (8,
    the last token so far) and starts again at 7, so the tokens after the current one are predicted too."""
    lk = TokenLookup(L, E, horizon=4)
    for t in (7, 8, 7, 8):
        _run(lk, t, [[0, 1], [0, 1]] if t == 7 else [[2, 3], [2, 3]])
    lk.begin(np.array([7]))
    assert lk._walk(2, 3) == [2, 3, 2, 3]                     # 7's last row, 8's, then round again
    assert lk._ahead[1][0, 2] == 1 and lk._ahead[1][0, 0] == 2   # next token 8, then 7 again
    lk2 = TokenLookup(L, E, horizon=3)
    for _ in range(3):
        _run(lk2, 5, [[1, 2], [1, 2]])
    lk2.begin(np.array([5]))
    assert lk2._ahead[1][0, 1] == 1                          # one token repeated: it is needed next token too
