"""Expert residency: budgets, HOBBIT miss tiers, ERAS selection, the cache's invariants, and the whole
engine with a hot budget against the plain engine (bit for bit where the rules promise it)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotcold.engine.gguf_file import GGUFError
from hotcold.engine.experts.cache import ExpertCache
from hotcold.engine.experts.expert import Expert, Filling
from hotcold.engine.experts.rules import Budget, MissCost, MissMode, Tier, eras_bias, miss_tiers
from hotcold.engine.moe import Routing, SelectionBias, route
from hotcold.engine.options import Options
from hotcold.engine.weights import QMatrix
from hotcold.quant import QType, quantize

import tiny_models

TRAINED = tiny_models.REPO / "models" / "mixtral-trained"

H, F = 32, 64


def _matrix(rng: np.random.Generator, rows: int, cols: int, qtype: QType) -> QMatrix:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return QMatrix(quantize(w, qtype), qtype, rows, cols)


def _experts(n_layer: int, n_expert: int, qtype: QType, seed: int = 0) -> list[list[Expert]]:
    rng = np.random.default_rng(seed)
    return [[Expert(_matrix(rng, F, H, qtype), _matrix(rng, F, H, qtype), _matrix(rng, H, F, qtype))
             for _ in range(n_expert)] for _ in range(n_layer)]


def _routing(ids: list[list[int]], weights: list[list[float]] | None = None) -> Routing:
    e = np.array(ids, dtype=np.int64)
    w = np.full(e.shape, 1.0 / e.shape[1], dtype=np.float32) if weights is None else np.array(weights, np.float32)
    return Routing(e, w)


# --- the rules -----------------------------------------------------------------------------------------

def test_budget_parse() -> None:
    assert Budget.parse("25%") == Budget(fraction=0.25)
    assert Budget.parse(0.5) == Budget(fraction=0.5)
    assert Budget.parse("2GiB") == Budget(nbytes=2 << 30)
    assert Budget.parse("1.5 MB") == Budget(nbytes=1_500_000)
    assert Budget.parse(4096) == Budget(nbytes=4096)
    assert Budget(fraction=0.25).slots(32, 100) == 8
    assert Budget(nbytes=950).slots(32, 100) == 9
    assert Budget(nbytes=10**9).slots(32, 100) == 32
    for bad in ("lots", "120%", "-5%", "2XB", -1, 1.5, True):
        with pytest.raises(ValueError, match="expert_budget"):
            Budget.parse(bad)


def test_options_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown miss mode 'warm'.*hot, cold, adaptive"):
        Options.parse(expert_budget="25%", miss="warm")
    with pytest.raises(ValueError, match="unknown cache_policy"):
        Options.parse(expert_budget="25%", cache_policy="random")
    with pytest.raises(ValueError, match="miss_t1=0.9, miss_t2=0.6"):
        Options.parse(expert_budget="25%", miss_t1=0.9, miss_t2=0.6)
    with pytest.raises(ValueError, match="unknown miss_placement 'disk'.*auto, gpu, cpu"):
        Options.parse(expert_budget="25%", miss_placement="disk")
    with pytest.raises(ValueError, match="miss_placement='gpu'.*needs device='cuda'"):
        Options.parse(expert_budget="25%", miss_placement="gpu")


def test_miss_cost_picks_the_cheaper_side_per_token_count() -> None:
    """Upload + GPU compute costs mostly the upload (flat in tokens); CPU compute grows with tokens."""
    cost = MissCost(8, gpu_s=(1.0e-3, 1.1e-3), cpu_s=(0.5e-3, 2.5e-3))
    assert not cost.gpu_faster(1)                               # one token: the CPU wins (no upload)
    assert cost.gpu_faster(8) and cost.gpu_faster(64)           # a prompt's worth: the upload pays off
    crossover = next(n for n in range(1, 9) if cost.gpu_faster(n))
    assert crossover == 3                                       # 1.0+0.1*2/7 < 0.5+2.0*2/7


def test_miss_tiers_follow_the_weight_ranked_above() -> None:
    # shares above each expert: 0, .5, .8, .95 -> hot (<= .6), hot, cold (<= .9), skip
    t = miss_tiers(np.array([[0.5, 0.3, 0.15, 0.05]]), 0.6, 0.9)
    assert t.tolist() == [[Tier.HOT, Tier.HOT, Tier.COLD, Tier.SKIP]]
    # the same weights in another slot order and unnormalised (x0.5) give the same tiers per expert
    t = miss_tiers(np.array([[0.025, 0.25, 0.075, 0.15]]), 0.6, 0.9)
    assert t.tolist() == [[Tier.SKIP, Tier.HOT, Tier.COLD, Tier.HOT]]
    # a dominant expert: the second has 0.7 above it -> cold; boundaries are inclusive
    assert miss_tiers(np.array([[0.7, 0.3]]), 0.6, 0.9).tolist() == [[Tier.HOT, Tier.COLD]]
    assert miss_tiers(np.array([[0.6, 0.4]]), 0.6, 0.9).tolist() == [[Tier.HOT, Tier.HOT]]
    assert miss_tiers(np.array([[0.95, 0.05]]), 0.6, 0.9).tolist() == [[Tier.HOT, Tier.SKIP]]


@settings(deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 4))
def test_top_expert_is_always_hot(seed: int, k: int, T: int) -> None:
    w = np.random.default_rng(seed).random((T, k))
    t = miss_tiers(w, 0.0, 0.0)
    assert (t[np.arange(T), w.argmax(axis=1)] == Tier.HOT).all()


@settings(deadline=None)  # the routing kernel compiles on its first call
@given(st.integers(0, 2**32 - 1), st.integers(2, 16), st.booleans())
def test_eras_zero_is_plain_top_k(seed: int, n_expert: int, norm: bool) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((5, n_expert)).astype(np.float32)
    resident = rng.random(n_expert) < 0.5
    logit, prob = eras_bias(resident, rng.random(n_expert), 0.0, 0.0)
    assert logit is None and prob is None
    k = min(2, n_expert)
    plain, zero = route(logits, k, norm), route(logits, k, norm, SelectionBias(np.zeros(n_expert, np.float32),
                                                                                  np.zeros(n_expert, np.float32)))
    assert np.array_equal(plain.experts, zero.experts) and np.array_equal(plain.weights, zero.weights)


def test_eras_alpha_prefers_residents_and_keeps_gate_weights() -> None:
    logits = np.log(np.array([[0.40, 0.35, 0.25]], dtype=np.float32))
    resident = np.array([False, False, True])
    assert route(logits, 1, False).experts.tolist() == [[0]]
    _, prob = eras_bias(resident, np.zeros(3), alpha=0.2, beta=0.0)
    r = route(logits, 1, False, SelectionBias(None, prob))
    assert r.experts.tolist() == [[2]]                                # 0.25 + 0.2 > 0.40
    assert r.weights[0, 0] == pytest.approx(0.25, rel=1e-6)           # the unbiased probability
    _, prob = eras_bias(resident, np.zeros(3), alpha=0.1, beta=0.0)
    assert route(logits, 1, False, SelectionBias(None, prob)).experts.tolist() == [[0]]


def test_eras_beta_penalises_rarely_used_non_residents() -> None:
    logits = np.array([[1.0, 0.9, 0.0]], dtype=np.float32)
    resident = np.array([False, True, False])
    logit, _ = eras_bias(resident, np.array([0.0, 0.0, 0.0]), alpha=0.0, beta=0.5)
    assert logit.tolist() == [-0.5, 0.0, -0.5]
    assert route(logits, 1, False, SelectionBias(logit, None)).experts.tolist() == [[1]]
    logit, _ = eras_bias(resident, np.array([1.0, 0.0, 0.0]), alpha=0.0, beta=0.5)   # expert 0 always used
    assert route(logits, 1, False, SelectionBias(logit, None)).experts.tolist() == [[0]]


# --- the cache -----------------------------------------------------------------------------------------

def _cache(budget: str | int, miss: str = "hot", policy: str = "lru", n_layer: int = 2, n_expert: int = 4,
           **kw: float) -> ExpertCache:
    opt = Options.parse(expert_budget=budget, cache_policy=policy, miss=miss, **kw)
    cold = _experts(n_layer, n_expert, QType.Q8_0, seed=1) if miss != "hot" else None
    return ExpertCache(_experts(n_layer, n_expert, QType.F32), opt, cold)


def test_hot_misses_load_then_hit() -> None:
    c = _cache("50%")                                            # 4 of 8 experts
    c.prepare(0, _routing([[0, 1]]))
    assert (c.stats[0].hits, c.stats[0].misses, c.stats[0].loads) == (0, 2, 2)
    plan = c.prepare(0, _routing([[1, 0]]))
    assert (c.stats[0].hits, c.stats[0].misses) == (2, 2)
    assert plan.experts[0] is c.arena.experts[(0, 0)]
    assert c.stats[0].bytes_moved == 2 * c.hot[0][0].nbytes


def test_a_pass_keeps_what_it_used_and_streams_past_its_budget() -> None:
    """4 slots, a pass of two layers that selects 3 experts in each: layer 1 may not evict layer 0's, so one of
    its misses fills the free slot and the others are read from where they lie; the next pass hits what stayed."""
    c = _cache("50%")                                            # 4 of 8 experts
    for _ in range(2):
        c.prepare(0, _routing([[0, 1], [1, 2]]))                 # a batch: experts 0, 1, 2 of layer 0
        plan = c.prepare(1, _routing([[0, 1], [2, 1]]))          # experts 0, 1, 2 of layer 1
        assert set(c.arena.slot_of) == {(0, 0), (0, 1), (0, 2), (1, 0)}
        assert all(plan.experts[e] is c.hot[1][e] for e in (1, 2))   # streamed: computed from the file
    assert (c.stats[0].hits, c.stats[0].loads) == (4, 3)        # layer 0 loaded once, then hit
    assert (c.stats[1].hits, c.stats[1].loads) == (1, 1)        # of layer 1 only expert 0 stays (one selection)
    assert c.stats[1].bytes_moved == 5 * c.hot[1][0].nbytes     # 1 load, 2 x 2 streams
    c.prepare(0, _routing([[0, 1]]))                             # a decode pass: what it did not use can go
    c.prepare(1, _routing([[3, 1]]))
    assert set(c.arena.slot_of) == {(0, 0), (0, 1), (1, 1), (1, 3)}


def test_arena_copy_is_the_hot_expert() -> None:
    c = _cache("100%")
    plan = c.prepare(1, _routing([[3, 2]]))
    for e in (2, 3):
        # a decode miss computes from the file's bytes and fills its slot as it goes (or on the slot's first wait)
        assert isinstance(plan.experts[e], Filling) and plan.experts[e].slot is c.arena.experts[(1, e)]
        resident = c.arena.experts[(1, e)]
        assert not resident.ready.done()
        resident.ready.wait()
        assert resident.ready.done()
        for a, b in zip((resident.gate, resident.up, resident.down), (c.hot[1][e].gate, c.hot[1][e].up, c.hot[1][e].down)):
            assert np.array_equal(a.raw, b.raw) and not np.shares_memory(a.raw, b.raw)
    batch = c.prepare(0, _routing([[0, 1], [1, 2]]))                   # a batch's misses are copied at once
    assert all(type(batch.experts[e]) is Expert and batch.experts[e].ready.done() for e in (0, 1, 2))


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K, QType.F32])
def test_filling_expert_computes_and_fills_its_slot(qtype: QType) -> None:
    """The fused kernels write every weight row on to the slot while computing, with the plain product's values;
    a type without them (F32) copies first. Either way the slot then holds the expert and needs no copy."""
    from hotcold.engine.backend import CpuBackend
    from hotcold.engine.config import Activation
    from hotcold.engine.context import FFNScratch
    rng = np.random.default_rng(3)
    n_embd, n_ff = 256, 512
    hot = [[Expert(_matrix(rng, n_ff, n_embd, qtype), _matrix(rng, n_ff, n_embd, qtype),
                   _matrix(rng, n_embd, n_ff, qtype)) for _ in range(2)]]
    c = ExpertCache(hot, Options.parse(expert_budget="50%", cache_policy="lru", miss="hot"))
    be = CpuBackend()
    x = rng.standard_normal((1, n_embd), dtype=np.float32)
    scratch = FFNScratch(be, 1, n_embd, n_ff)
    want, got = np.zeros((1, n_embd), np.float32), np.zeros((1, n_embd), np.float32)
    be.glu(hot[0][1], be.acts(x, be.new_acts(1, n_embd)), scratch, want, Activation.SILU)
    plan = c.prepare(0, _routing([[1]]))
    e = plan.experts[1]
    assert isinstance(e, Filling) and not e.slot.ready.done()
    assert not any(m.raw.any() for m in (e.slot.gate, e.slot.up, e.slot.down))    # nothing copied yet
    be.glu(e, be.acts(x, be.new_acts(1, n_embd)), scratch, got, Activation.SILU)
    assert e.slot.ready.done()
    np.testing.assert_array_equal(got, want)
    for m, src in zip((e.slot.gate, e.slot.up, e.slot.down), (hot[0][1].gate, hot[0][1].up, hot[0][1].down)):
        assert np.array_equal(m.raw, src.raw)


def test_selected_experts_are_not_evicted_by_their_own_layer() -> None:
    c = _cache(2 * _experts(1, 1, QType.F32)[0][0].nbytes)      # 2 slots, k = 2
    c.prepare(0, _routing([[0, 1]]))
    c.prepare(0, _routing([[0, 2]]))                             # 0 is a hit and pinned: 1 goes
    assert set(c.arena.slot_of) == {(0, 0), (0, 2)}


def test_budget_below_one_selection_streams_from_the_mmap() -> None:
    c = _cache(0)
    plan = c.prepare(0, _routing([[0, 1]]))
    assert c.arena.n_slots == 0 and plan.experts[0] is c.hot[0][0]
    assert c.stats[0].bytes_moved == 2 * c.hot[0][0].nbytes


def test_cold_misses_fill_free_slots_then_use_the_cold_copy() -> None:
    c = _cache("25%", miss="cold")                               # 2 slots
    c.prepare(0, _routing([[0, 1]]))                             # free slots: filled, no eviction needed
    assert set(c.arena.slot_of) == {(0, 0), (0, 1)} and c.stats[0].cold == 0
    plan = c.prepare(1, _routing([[0, 1]]))
    assert plan.experts[0] is c.cold[1][0] and set(c.arena.slot_of) == {(0, 0), (0, 1)}
    assert (c.stats[1].cold, c.stats[1].loads) == (2, 0)
    assert c.stats[1].bytes_moved == 2 * c.cold[1][0].nbytes
    assert c.stats[1].cold_uploaded == 0                         # a RAM arena stages nothing


def test_adaptive_misses_load_compute_cold_or_skip() -> None:
    c = _cache("25%", miss="adaptive")                           # 2 slots, filled by layer 1 first
    c.prepare(1, _routing([[0, 1]]))
    plan = c.prepare(0, _routing([[0, 1, 2, 3]], [[0.5, 0.3, 0.15, 0.05]]))
    assert set(c.arena.slot_of) == {(0, 0), (0, 1)}              # the two hot misses evicted layer 1's
    assert plan.experts[2] is c.cold[0][2] and 3 not in plan.experts
    assert plan.weights.tolist()[0][3] == 0.0
    assert (c.stats[0].hits, c.stats[0].misses, c.stats[0].cold, c.stats[0].skipped) == (0, 4, 1, 1)
    c.prepare(0, _routing([[2, 0, 1, 3]], [[0.5, 0.3, 0.15, 0.05]]))   # 0, 1 hits even when ranked low
    assert (c.stats[0].hits, c.stats[0].misses) == (2, 6)


def test_miss_modes_other_than_hot_need_cold_copies() -> None:
    with pytest.raises(ValueError, match="cold expert copies"):
        ExpertCache(_experts(1, 2, QType.F32), Options.parse(expert_budget="50%", miss="cold"), None)


def test_prefetch_loads_predictions_and_scores_them() -> None:
    c = _cache("100%")
    c.prefetch(1, np.array([[0, 1]]))
    assert c.stats[1].prefetched == 2 and (1, 0) in c.arena
    c.prepare(1, _routing([[1, 2]]))
    assert (c.stats[1].predicted, c.stats[1].predicted_right, c.stats[1].hits) == (2, 1, 1)
    assert c.report()["prefetch_accuracy"] == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
                min_size=1, max_size=40),
       st.integers(0, 8), st.sampled_from(["lru", "lfu", "lifo", "hobbit"]), st.sampled_from(["hot", "adaptive"]))
def test_cache_invariants_under_random_accesses(accesses: list, slots: int, policy: str, miss: str) -> None:
    c = _cache(slots * _experts(1, 1, QType.F32)[0][0].nbytes, miss=miss, policy=policy, n_layer=3, n_expert=6)
    assert c.budget_bytes <= slots * c.arena.slot_bytes
    seen = [0, 0, 0]
    for layer, ids in accesses:
        w = np.random.default_rng(len(ids)).random((1, len(ids))).astype(np.float32)
        plan = c.prepare(layer, _routing([ids], w.tolist()))
        seen[layer] += len(ids)
        assert c.arena.used_bytes <= c.budget_bytes                       # the budget is never exceeded
        assert len(c.arena.slot_of) + len(c.arena.free) == c.arena.n_slots
        assert set(c.arena.slot_of) == set(c.arena.experts)
        assert set(plan.experts) <= set(ids)                              # only selected experts computed
        assert c.stats[layer].hits + c.stats[layer].misses == seen[layer]
        if miss == "hot":                                                 # hot mode computes every selection
            assert set(plan.experts) == set(ids)
    total = c.report()
    assert total["hits"] + total["misses"] == sum(len(ids) for _, ids in accesses)
    assert total["hits"] == c.policy.hits or miss == "adaptive"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
                min_size=1, max_size=40),
       st.integers(0, 8), st.sampled_from(["lru", "lfu", "lifo", "hobbit"]), st.sampled_from(["hot", "cold", "adaptive"]))
def test_the_decode_path_decides_as_the_batch_path(accesses: list, slots: int, policy: str, miss: str) -> None:
    """prepare() takes a pure-Python path for one token; it must decide exactly as the numpy path does."""
    size = slots * _experts(1, 1, QType.F32)[0][0].nbytes
    fast, ref = (_cache(size, miss=miss, policy=policy, n_layer=3, n_expert=6) for _ in range(2))
    for layer, ids in accesses:
        w = np.random.default_rng(len(ids)).random((1, len(ids))).astype(np.float32)
        a, b = fast.prepare(layer, _routing([ids], w.tolist())), ref._prepare_batch(layer, _routing([ids], w.tolist()))
        assert sorted(a.experts) == sorted(b.experts) and np.array_equal(a.weights, b.weights)
        assert all(a.experts[e].gate.raw.shape == b.experts[e].gate.raw.shape for e in a.experts)
        assert set(fast.arena.slot_of) == set(ref.arena.slot_of)
    assert fast.report() == ref.report()


# --- the whole engine ----------------------------------------------------------------------------------

PROMPT = "The :mod:`pkgutil` module provides utilities for the import system, in particular package support."


def _load(path: Path, **kw):
    from hotcold.engine.api import Model
    return Model.load(path, n_ctx=128, **kw)


def test_full_budget_equals_the_plain_engine_bit_for_bit(trained_q8: Path) -> None:
    plain = _load(trained_q8)
    ids = plain.tokenize(PROMPT)
    full_batched = _load(trained_q8, expert_budget="100%")
    assert np.array_equal(full_batched.logits(ids), plain.logits(ids))
    full = _load(trained_q8, expert_budget="100%", n_batch=1)
    assert np.array_equal(full.logits(ids), _load(trained_q8, n_batch=1).logits(ids))
    s = full.expert_stats()
    assert s["tokens"] == len(ids) and s["hits"] + s["misses"] == len(ids) * 4 * 2


@pytest.mark.parametrize("policy", ["lru", "lfu", "lifo", "hobbit"])
def test_hot_misses_change_speed_never_results(trained_q8: Path, policy: str) -> None:
    ids = _load(trained_q8).tokenize(PROMPT)
    want = _load(trained_q8, n_batch=1).logits(ids)
    m = _load(trained_q8, expert_budget="25%", cache_policy=policy, n_batch=1)
    assert np.array_equal(m.logits(ids), want)
    s = m.expert_stats()
    assert s["misses"] > 0 and s["bytes_moved"] > 0 and s["resident"] == s["slots"] == 8


def test_cold_and_adaptive_misses_stay_close(trained_q8: Path) -> None:
    ids = _load(trained_q8).tokenize(PROMPT)
    want = _load(trained_q8, n_batch=1).logits(ids)
    for miss in ("cold", "adaptive"):
        m = _load(trained_q8, expert_budget="25%", miss=miss, n_batch=1)
        got = m.logits(ids)
        assert not np.array_equal(got, want)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
        assert m.expert_stats()["cold"] > 0


def test_stats_reset_and_heatmap(trained_q8: Path, tmp_path: Path) -> None:
    m = _load(trained_q8, expert_budget="25%", prefetch=1, n_batch=1)
    m.logits(m.tokenize(PROMPT))
    s = m.expert_stats()
    assert 0.0 <= s["prefetch_accuracy"] <= 1.0 and np.array(s["activations"]).sum() == s["tokens"] * 4 * 2
    pytest.importorskip("matplotlib")
    assert m.save_expert_heatmap(tmp_path / "h.png").stat().st_size > 1000
    m.reset_expert_stats()
    assert m.expert_stats()["tokens"] == 0


def test_cold_file_missing_or_foreign_is_a_clear_error(trained_q8: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.gguf"
    shutil.copy(trained_q8, lone)
    with pytest.raises(FileNotFoundError, match="lone.cold.gguf not found.*moe-convert"):
        _load(lone, expert_budget="25%", miss="cold")
    with pytest.raises(GGUFError, match="not a hotcold cold-copy file"):
        _load(trained_q8, expert_budget="25%", miss="cold", cold_path=trained_q8)
    from hotcold.convert import convert
    other = convert(TRAINED, tmp_path / "other-q4_0.gguf", type="q4_0", cold_type="q2_k", progress=False)
    with pytest.raises(GGUFError, match="cold copies of different experts.*re-convert them together"):
        _load(trained_q8, expert_budget="25%", miss="cold", cold_path=other.cold_path)
    assert MissMode("adaptive") is MissMode.ADAPTIVE


def test_a_budget_of_every_expert_in_ram_serves_the_files_pages() -> None:
    """CPU: at 100% the arena is the mapped file itself (nothing copied, nothing held twice); below it, slots."""
    from hotcold.engine.backend import CpuBackend
    from hotcold.engine.experts.arena import MappedArena
    hot = _experts(2, 4, QType.Q8_0)
    full = CpuBackend().expert_cache(hot, Options.parse(expert_budget="100%"), None, None)
    assert isinstance(full.arena, MappedArena) and full.arena.buf.nbytes == 0
    plan = full.prepare(1, _routing([[3, 2]]))
    assert plan.experts[3] is hot[1][3] and full.stats[1].loads == 2
    assert full.prepare(1, _routing([[2, 3]])).experts[2] is hot[1][2] and full.stats[1].hits == 2
    half = CpuBackend().expert_cache(hot, Options.parse(expert_budget="50%"), None, None)
    assert type(half.arena) is not MappedArena and half.arena.buf.nbytes == 4 * half.arena.slot_bytes
