"""The tiered expert store: a byte-budgeted hot arena over the main file, cold copies from OUT.cold.gguf.

Hot tier: full-precision experts copied from the mmap into a preallocated arena of equal slots (the
budget), evicted by a policy (policies.py); while slots are free every miss fills one, whatever the
mode. Cold tier: the low-precision copies, memory-mapped. Misses that would evict are served hot, cold
or skipped by the miss mode (HOBBIT); selection can prefer residents (MoE-ERAS); prefetch loads the
experts the next layers' routers predict. Every decision is counted per layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hotcold import keys

from .gguf_file import GGUFError, GGUFFile
from .moe import Expert, Plan, Routing, SelectionBias
from .policies import Key, make_policy
from .residency import MissCost, MissMode, Placement, ResidencyOptions, Tier, eras_bias, miss_tiers
from .weights import QMatrix, WeightReader


@dataclass
class LayerStats:
    tokens: int = 0        # tokens routed through the layer
    hits: int = 0          # (token, slot) selections whose expert was resident
    misses: int = 0        # ... whose expert was not
    cold: int = 0          # misses computed with the cold copy
    cold_uploaded: int = 0 # ... of which on the GPU, after uploading the cold copy (the rest on the CPU)
    skipped: int = 0       # misses dropped (adaptive mode, near-zero weight)
    loads: int = 0         # hot copies brought into the arena (misses and prefetches)
    bytes_moved: int = 0   # bytes of hot copies loaded plus cold copies computed with
    prefetched: int = 0    # hot copies loaded ahead by prefetch
    predicted: int = 0     # selections the prefetch predictor had a prediction for
    predicted_right: int = 0


class Arena:
    """`n_slots` equal slots of `slot_bytes` in one preallocated buffer; never grows. This one is RAM;
    subclasses put the buffer elsewhere (cuda_arena.CudaArena) by overriding _allocate and _place."""

    def __init__(self, n_slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.buf = self._allocate(max(n_slots, 0), slot_bytes)
        self.free = list(range(n_slots - 1, -1, -1))
        self.slot_of: dict[Key, int] = {}
        self.experts: dict[Key, Expert] = {}

    def _allocate(self, n_slots: int, slot_bytes: int) -> Any:
        return np.empty((n_slots, slot_bytes), dtype=np.uint8)

    def _place(self, slot: int, src: Expert) -> Expert:
        """Copy `src`'s three matrices into `slot`; the returned Expert views the slot."""
        mats, off = [], 0
        for m in (src.gate, src.up, src.down):
            view = self.buf[slot, off:off + m.raw.nbytes].reshape(m.raw.shape)
            np.copyto(view, m.raw)
            mats.append(QMatrix(view, m.qtype, m.rows, m.cols))
            off += m.raw.nbytes
        return Expert(*mats)

    @property
    def n_slots(self) -> int:
        return self.buf.shape[0]

    def begin(self) -> None:
        """A new layer's batch starts (a device arena recycles its staging slots)."""

    def stage(self, src: Expert) -> Expert | None:
        """A transient copy of a cold expert where this arena computes, or None (RAM: the cold copy is
        already in host memory, so there is nothing to stage)."""
        return None

    @property
    def used_bytes(self) -> int:
        return len(self.slot_of) * self.slot_bytes

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def load(self, key: Key, src: Expert) -> Expert:
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.experts[key] = self._place(slot, src)
        return self.experts[key]

    def drop(self, key: Key) -> None:
        self.free.append(self.slot_of.pop(key))
        del self.experts[key]


def open_cold(main: GGUFFile, path: Path) -> GGUFFile:
    """The cold copies at `path`, checked to belong to `main`; errors say what to do."""
    if not path.is_file():
        raise FileNotFoundError(f"cold expert copies {path} not found: convert with `moe-convert MODEL {main.path}` "
                                "(it writes them next to the main file), or serve misses hot (miss='hot', --miss hot)")
    cold = GGUFFile(path)
    want, have = main.get(keys.EXPERTS_SHA256), cold.get(keys.COLD_OF)
    if have is None:
        raise GGUFError(f"{path} is not a hotcold cold-copy file (no {keys.COLD_OF}); give the OUT.cold.gguf "
                        "moe-convert wrote")
    if want is None:
        raise GGUFError(f"{main.path} was not written by moe-convert (no {keys.EXPERTS_SHA256}), so {path} "
                        "cannot be matched to it; convert the model with moe-convert, or serve misses hot "
                        "(miss='hot', --miss hot)")
    if want != have:
        raise GGUFError(f"{path} holds cold copies of different experts than {main.path} (experts sha256 "
                        f"{have[:12]}... vs {want[:12]}...); re-convert them together")
    return cold


def cold_experts(cold: GGUFFile, n_layer: int) -> list[list[Expert]]:
    """Every layer's cold experts as zero-copy views of the cold file."""
    w = WeightReader(cold)
    out = []
    for i in range(n_layer):
        p = f"blk.{i}."
        if not w.has(p + "ffn_gate_exps.weight"):
            out.append([])
            continue
        g, u, d = (w.stack(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
        out.append([Expert(g[e], u[e], d[e]) for e in range(g.count)])
    return out


class ExpertCache:
    """The ExpertStore of issue #5: hot arena + cold tier + miss mode + ERAS + prefetch accounting."""

    def __init__(self, hot: Sequence[Sequence[Expert]], options: ResidencyOptions,
                 cold: Sequence[Sequence[Expert]] | None = None,
                 arena: Callable[[int, int], Arena] = Arena) -> None:
        self.hot = hot
        self.cold = cold
        self.opt = options
        self.n_layer = len(hot)
        self.n_expert = max((len(h) for h in hot), default=0)
        if options.miss != MissMode.HOT and not cold:
            raise ValueError(f"miss={options.miss.value!r} needs the cold expert copies (OUT.cold.gguf)")
        all_experts = [e for layer in hot for e in layer]
        slot_bytes = max((e.nbytes for e in all_experts), default=0)
        n_slots = options.expert_budget.slots(len(all_experts), slot_bytes)
        self.arena = arena(n_slots, slot_bytes)  # RAM (Arena) or VRAM (cuda_arena.CudaArena)
        self.policy = make_policy(options.cache_policy, self.n_layer)
        self.stats = [LayerStats() for _ in range(self.n_layer)]
        self.activations = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
        self.miss_cost: MissCost | None = None  # measured by the device model (cuda_model.calibrate)
        self._predicted: list[set[int] | None] = [None] * self.n_layer

    @property
    def budget_bytes(self) -> int:
        return self.arena.n_slots * self.arena.slot_bytes

    def resident(self, layer: int) -> np.ndarray:
        """(E,) bool: which of the layer's experts are in the arena."""
        mask = np.zeros(self.n_expert, dtype=bool)
        for (l, e) in self.arena.slot_of:
            if l == layer:
                mask[e] = True
        return mask

    # --- the ExpertStore interface -----------------------------------------------------------------------

    def bias(self, layer: int) -> SelectionBias | None:
        if not (self.opt.eras_alpha or self.opt.eras_beta):
            return None
        tokens = max(self.stats[layer].tokens, 1)
        freq = self.activations[layer] / tokens                              # share of tokens choosing each
        logit, prob = eras_bias(self.resident(layer), freq, self.opt.eras_alpha, self.opt.eras_beta)
        return SelectionBias(logit, prob)

    def prepare(self, layer: int, routing: Routing) -> Plan:
        st, ids = self.stats[layer], routing.experts                         # ids (T, k)
        self.arena.begin()
        st.tokens += ids.shape[0]
        np.add.at(self.activations[layer], ids.ravel(), 1)
        self._score_prediction(layer, ids)
        hit = self.resident(layer)[ids]                                      # (T, k)
        tiers = self._tiers(routing.weights)                                 # (T, k) for a miss
        tiers[hit] = Tier.HOT
        st.hits += int(hit.sum())
        st.misses += int((~hit).sum())
        st.skipped += int((tiers == Tier.SKIP).sum())
        weights = np.where(tiers == Tier.SKIP, np.float32(0), routing.weights).astype(np.float32)
        pinned = {(layer, int(e)) for e in np.unique(ids[hit])}
        experts: dict[int, Expert] = {}
        for e in np.unique(ids[tiers != Tier.SKIP]):
            e = int(e)
            key, sel = (layer, e), ids == e
            if key in self.arena:
                self.policy.use(key, hit=True)
                experts[e] = self.arena.experts[key]
            elif (tiers[sel] == Tier.HOT).any() or self.arena.free:          # a free slot costs no eviction
                self.policy.use(key, hit=False)
                experts[e] = self._load(key, pinned) or self._stream(layer, e)
                pinned.add(key)
            else:
                self.policy.use(key, hit=False, hot=False)
                n_cold = int((sel & (tiers == Tier.COLD)).sum())
                experts[e] = self._cold(layer, e, n_cold)
                st.bytes_moved += experts[e].nbytes
                st.cold += n_cold
        return Plan(experts, weights)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Load the hot copies of the experts predicted for `layer` ahead of it (never evicting each other)."""
        predicted = {int(e) for e in np.unique(experts)}
        self._predicted[layer] = predicted
        pinned = {(layer, e) for e in predicted}
        for e in sorted(predicted):
            if (layer, e) not in self.arena and self._load((layer, e), pinned) is not None:
                self.stats[layer].prefetched += 1

    def new_sequence(self) -> None:
        self.policy.new_sequence()

    # --- internals -----------------------------------------------------------------------------------------

    def _tiers(self, weights: np.ndarray) -> np.ndarray:
        if self.opt.miss == MissMode.HOT:
            return np.full(weights.shape, Tier.HOT, dtype=np.int8)
        if self.opt.miss == MissMode.COLD:
            return np.full(weights.shape, Tier.COLD, dtype=np.int8)
        return miss_tiers(weights, self.opt.t1, self.opt.t2)

    def _load(self, key: Key, pinned: set[Key]) -> Expert | None:
        """Bring `key`'s hot copy into the arena, evicting an unpinned resident if full; None if nothing can go."""
        if not self.arena.free:
            candidates = [k for k in self.arena.slot_of if k not in pinned]
            if not candidates:
                return None
            victim = self.policy.victim(candidates, key[0])
            self.arena.drop(victim)
            self.policy.evicted(victim)
        src = self.hot[key[0]][key[1]]
        expert = self.arena.load(key, src)
        self.policy.insert(key)
        st = self.stats[key[0]]
        st.loads += 1
        st.bytes_moved += src.nbytes
        return expert

    def _cold(self, layer: int, e: int, tokens: int) -> Expert:
        """The cold copy, uploaded to a staging slot when placement (or the cost model) puts it on the GPU."""
        src = self.cold[layer][e]
        place = self.opt.miss_placement
        gpu = place == Placement.GPU or (place == Placement.AUTO and self.miss_cost is not None
                                         and self.miss_cost.gpu_faster(tokens))
        staged = self.arena.stage(src) if gpu else None
        if staged is None:
            return src
        self.stats[layer].cold_uploaded += tokens
        return staged

    def _stream(self, layer: int, e: int) -> Expert:
        """No slot can be freed (the budget is below one layer's selection): compute from the mmap directly."""
        src = self.hot[layer][e]
        self.stats[layer].bytes_moved += src.nbytes
        return src

    def _score_prediction(self, layer: int, ids: np.ndarray) -> None:
        predicted = self._predicted[layer]
        if predicted is None:
            return
        actual = {int(e) for e in np.unique(ids)}
        self.stats[layer].predicted += len(actual)
        self.stats[layer].predicted_right += len(actual & predicted)
        self._predicted[layer] = None

    # --- reporting -----------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Totals under tokens/hits/misses/cold/skipped/bytes_moved (+ more), per-layer dicts, activations."""
        layers = [asdict(s) for s in self.stats]
        moe_layers = [s for s, h in zip(layers, self.hot) if h]
        total = {k: sum(s[k] for s in moe_layers) for k in asdict(LayerStats())}
        total["tokens"] = max((s["tokens"] for s in moe_layers), default=0)
        total["prefetch_accuracy"] = total["predicted_right"] / total["predicted"] if total["predicted"] else None
        total.update(budget_bytes=self.budget_bytes, slots=self.arena.n_slots, resident=len(self.arena.slot_of),
                     policy_hits=self.policy.hits, policy_misses=self.policy.misses,
                     layers=layers, activations=self.activations.tolist())
        return total

    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in range(self.n_layer)]
        self.activations[:] = 0
        self._predicted = [None] * self.n_layer


def plain_report(n_layer: int) -> dict[str, Any]:
    """What expert_stats() returns when no cache is configured: nothing counted."""
    total: dict[str, Any] = dict.fromkeys(asdict(LayerStats()), 0)
    total.update(prefetch_accuracy=None, layers=[], activations=[], budget_bytes=None)
    return total


__all__ = ["Arena", "ExpertCache", "LayerStats", "cold_experts", "open_cold", "plain_report"]
