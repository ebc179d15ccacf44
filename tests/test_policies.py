"""Each eviction policy's rule on scripted access sequences (keys are (layer, expert))."""
from __future__ import annotations

import pytest

from hotcold.engine.experts.policies import LFU, LIFO, LRU, CachePolicy, Hobbit, make_policy

A, B, C = (0, 0), (0, 1), (1, 0)


def test_lru_evicts_the_least_recently_used() -> None:
    p = LRU(n_layer=2)
    for k in (A, B, C):
        p.insert(k)
    p.use(A, hit=True)                       # B is now the oldest
    assert p.choose([A, B, C], layer=0) == B
    p.use(B, hit=True)
    assert p.choose([A, B, C], layer=0) == C
    assert (p.hits, p.misses) == (2, 0)
    # the residents' order gives the same victim without a scan, skipping pinned keys
    assert p.victim([A, B, C], pinned=set(), layer=0) == C
    assert p.victim([A, B, C], pinned={C}, layer=0) == A
    p.evicted(A)
    assert p.victim([B, C], pinned={C}, layer=0) == B
    assert p.victim([B, C], pinned={B, C}, layer=0) is None


def test_every_policy_names_no_pinned_victim() -> None:
    for kind in CachePolicy:
        p = make_policy(kind, n_layer=2)
        for k in (A, B, C):
            p.insert(k)
            p.use(k, hit=False)
        assert p.victim([A, B, C], pinned={A, B, C}, layer=0) is None
        assert p.victim([A, B, C], pinned={A, B}, layer=0) == C


@pytest.mark.parametrize("kind", list(CachePolicy))
def test_use_resident_is_use_of_each_hit_in_turn(kind: CachePolicy) -> None:
    """The decode path's shortcut for a layer of hits leaves each policy as one `use` per key would."""
    fast, ref = make_policy(kind, n_layer=2), make_policy(kind, n_layer=2)
    for p in (fast, ref):
        for k in (A, B, C):
            p.insert(k)
    for keys in ([B, A], [C], [A, C]):
        fast.use_resident(keys)
        for k in keys:
            ref.use(k, hit=True)
        assert (fast.hits, fast.misses, fast.clock) == (ref.hits, ref.misses, ref.clock)
        for pinned in (set(), {A}, {C}, {A, B}):
            assert fast.victim([A, B, C], pinned, layer=0) == ref.victim([A, B, C], pinned, layer=0)


def test_lfu_evicts_the_least_frequently_used_ties_by_recency() -> None:
    p = LFU(n_layer=2)
    for k in (A, B, C):
        p.insert(k)
        p.use(k, hit=False)
    p.use(A, hit=True)
    p.use(C, hit=True)                       # counts A=2, B=1, C=2
    assert p.choose([A, B, C], layer=0) == B
    p.use(B, hit=True)                       # all 2: the least recent of them is A
    assert p.choose([A, B, C], layer=0) == A
    assert (p.hits, p.misses) == (3, 3)


def test_lifo_evicts_the_most_recently_inserted() -> None:
    p = LIFO(n_layer=2)
    for k in (A, B, C):
        p.insert(k)
    p.use(A, hit=True)                       # use does not matter, insertion order does
    assert p.choose([A, B, C], layer=0) == C
    p.evicted(C)
    assert p.choose([A, B], layer=0) == B


def test_hobbit_prefers_keeping_the_next_layers_experts() -> None:
    p = Hobbit(n_layer=4, weights=(0.0, 0.0, 0.0, 1.0))       # layer distance alone
    keys = [(0, 0), (1, 0), (2, 0), (3, 0)]
    for k in keys:
        p.insert(k)
    # running layer 1: layer 2 runs next, layer 1's own experts are needed last
    assert p.choose(keys, layer=1) == (1, 0)
    assert p.choose(keys, layer=3) == (3, 0)


def test_hobbit_counts_full_precision_use_and_sequence_frequency() -> None:
    p = Hobbit(n_layer=1, weights=(0.0, 0.0, 1.0, 0.0))       # high-precision use alone
    p.insert(A), p.insert(B)
    p.use(A, hit=True, hot=True)
    p.use(B, hit=False, hot=False)
    assert p.choose([A, B], layer=0) == B
    q = Hobbit(n_layer=1, weights=(0.0, 1.0, 0.0, 0.0))       # sequence frequency alone
    q.insert(A), q.insert(B)
    q.use(A, hit=True), q.use(A, hit=True), q.use(B, hit=True)
    assert q.choose([A, B], layer=0) == B
    q.new_sequence()                                          # frequency is per sequence
    q.use(B, hit=True)
    assert q.choose([A, B], layer=0) == A


def test_make_policy_by_name_and_errors() -> None:
    assert isinstance(make_policy("LRU", 2), LRU)
    assert isinstance(make_policy(CachePolicy.HOBBIT, 2), Hobbit)
    with pytest.raises(ValueError, match="unknown cache_policy 'fifo'.*lru, lfu, lifo, hobbit"):
        make_policy("fifo", 2)
