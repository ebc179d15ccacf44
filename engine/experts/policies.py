"""Eviction policies for the hot expert arena, one small class each, chosen by CachePolicy.

A policy sees every use of an expert (hit or miss) and every insertion and eviction, and names the
victim among the evictable resident experts. Keys are (layer, expert). References: LRU/LFU/LIFO as
compared for expert buffering by Huang et al. 2023 (LIFO near Belady for layer-ordered execution);
HOBBIT's multidimensional cache score (Tang et al. 2024, sec. 4.3).
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from typing import ClassVar, Container, Iterable

Key = tuple[int, int]  # (layer, expert)


class CachePolicy(enum.Enum):
    LRU = "lru"
    LFU = "lfu"
    LIFO = "lifo"
    HOBBIT = "hobbit"


class EvictionPolicy(ABC):
    """Counts hits and misses and keeps what its rule needs; `victim` picks from the candidates."""
    kind: ClassVar[CachePolicy]

    def __init__(self, n_layer: int) -> None:
        self.n_layer = n_layer
        self.hits = 0
        self.misses = 0
        self.clock = 0  # one tick per use or insertion: a total order of events

    def use(self, key: Key, hit: bool, hot: bool = True) -> None:
        """`key` was selected; `hit`: it was resident; `hot`: it was computed at full precision."""
        self.clock += 1
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self._on_use(key, hot)

    def use_resident(self, keys: Iterable[Key]) -> None:
        """`use(key, hit=True)` for each of `keys` in turn (a decode token's layer where every expert was resident)."""
        for key in keys:
            self.use(key, True)

    def insert(self, key: Key) -> None:
        self.clock += 1
        self._on_insert(key)

    def evicted(self, key: Key) -> None:
        """`key` left the arena (after `victim` named it)."""

    def new_sequence(self) -> None:
        """A new prompt starts (the context was cleared)."""

    def victim(self, resident: Iterable[Key], pinned: Container[Key], layer: int) -> Key | None:
        """The resident expert to evict while `layer` runs, never a pinned one; None if all are pinned."""
        candidates = [k for k in resident if k not in pinned]
        return self.choose(candidates, layer) if candidates else None

    @abstractmethod
    def choose(self, candidates: Iterable[Key], layer: int) -> Key:
        """The rule: which of `candidates` (never empty) to evict."""

    def _on_use(self, key: Key, hot: bool) -> None:
        pass

    def _on_insert(self, key: Key) -> None:
        pass


class LRU(EvictionPolicy):
    """Evict the expert whose last use (or insertion) is oldest. Residents are kept in that order (an ordered
    dict moved on every use), so the victim is the first unpinned one: no scan over all slots."""
    kind = CachePolicy.LRU

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.last: dict[Key, int] = {}
        self.order: OrderedDict[Key, None] = OrderedDict()  # residents, least recently used first

    def _on_use(self, key: Key, hot: bool) -> None:
        self.last[key] = self.clock
        if key in self.order:
            self.order.move_to_end(key)

    def use_resident(self, keys: Iterable[Key]) -> None:
        last, order = self.last, self.order                  # the per-token path: no call per key
        for key in keys:
            self.clock += 1
            self.hits += 1
            last[key] = self.clock
            if key in order:
                order.move_to_end(key)

    def _on_insert(self, key: Key) -> None:
        self.last[key] = self.clock
        self.order[key] = None
        self.order.move_to_end(key)

    def evicted(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, resident: Iterable[Key], pinned: Container[Key], layer: int) -> Key | None:
        return next((k for k in self.order if k not in pinned), None)

    def choose(self, candidates: Iterable[Key], layer: int) -> Key:
        return min(candidates, key=lambda k: self.last.get(k, 0))


class LFU(EvictionPolicy):
    """Evict the expert used least often since loading began (uses while not resident count too);
    ties go to the least recently used."""
    kind = CachePolicy.LFU

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.count: dict[Key, int] = defaultdict(int)
        self.last: dict[Key, int] = {}

    def _on_use(self, key: Key, hot: bool) -> None:
        self.count[key] += 1
        self.last[key] = self.clock

    def _on_insert(self, key: Key) -> None:
        self.last.setdefault(key, self.clock)

    def choose(self, candidates: Iterable[Key], layer: int) -> Key:
        return min(candidates, key=lambda k: (self.count[k], self.last.get(k, 0)))


class LIFO(EvictionPolicy):
    """Evict the expert inserted most recently (Huang et al. 2023: experts run in layer order, so the one
    just loaded is the one needed again furthest in the future)."""
    kind = CachePolicy.LIFO

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.inserted: dict[Key, int] = {}

    def _on_insert(self, key: Key) -> None:
        self.inserted[key] = self.clock

    def evicted(self, key: Key) -> None:
        self.inserted.pop(key, None)

    def choose(self, candidates: Iterable[Key], layer: int) -> Key:
        return max(candidates, key=lambda k: self.inserted.get(k, 0))


class Hobbit(EvictionPolicy):
    """HOBBIT's score, a weighted sum of four terms each scaled to [0, 1] over the candidates: recency of
    last use, uses in this sequence, uses at full precision, and closeness of the expert's layer to the
    running one in execution order; the lowest score is evicted."""
    kind = CachePolicy.HOBBIT

    def __init__(self, n_layer: int, weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)) -> None:
        super().__init__(n_layer)
        self.weights = weights
        self.last: dict[Key, int] = {}
        self.seq_count: dict[Key, int] = defaultdict(int)
        self.hot_count: dict[Key, int] = defaultdict(int)

    def _on_use(self, key: Key, hot: bool) -> None:
        self.last[key] = self.clock
        self.seq_count[key] += 1
        self.hot_count[key] += int(hot)

    def _on_insert(self, key: Key) -> None:
        self.last.setdefault(key, self.clock)

    def new_sequence(self) -> None:
        self.seq_count.clear()

    def score(self, key: Key, layer: int, max_seq: int, max_hot: int) -> float:
        wr, wf, wh, wd = self.weights
        recency = self.last.get(key, 0) / max(self.clock, 1)
        freq = self.seq_count[key] / max(max_seq, 1)
        hot = self.hot_count[key] / max(max_hot, 1)
        # layers run in order: the expert whose layer comes next is needed soonest
        distance = (key[0] - layer - 1) % self.n_layer
        close = 1.0 - distance / max(self.n_layer, 1)
        return wr * recency + wf * freq + wh * hot + wd * close

    def choose(self, candidates: Iterable[Key], layer: int) -> Key:
        cands = list(candidates)
        max_seq = max(self.seq_count[k] for k in cands)
        max_hot = max(self.hot_count[k] for k in cands)
        return min(cands, key=lambda k: (self.score(k, layer, max_seq, max_hot), self.last.get(k, 0)))


POLICIES: dict[CachePolicy, type[EvictionPolicy]] = {p.kind: p for p in (LRU, LFU, LIFO, Hobbit)}


def make_policy(policy: CachePolicy | str, n_layer: int) -> EvictionPolicy:
    try:
        kind = policy if isinstance(policy, CachePolicy) else CachePolicy(str(policy).lower())
    except ValueError:
        names = ", ".join(p.value for p in CachePolicy)
        raise ValueError(f"unknown cache_policy {policy!r}; choose one of {names}") from None
    return POLICIES[kind](n_layer)
