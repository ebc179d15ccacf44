"""The tiered expert store: a byte-budgeted hot arena over the main file, cold copies from OUT.cold.gguf.

Hot tier: full-precision experts copied into a preallocated arena of equal slots (the budget; arena.py),
evicted by a policy (policies.py); while slots are free every miss fills one, whatever the mode. Cold
tier: the low-precision copies (cold.py). Misses that would evict are served hot, cold or skipped by the
miss mode (HOBBIT, rules.py); selection can prefer residents (MoE-ERAS); prefetch queues the experts the
next layers' routers predict. With an expert predictor (eMoE, ahead.py) each prompt's predicted experts are
loaded before its prefill, and while it runs the resident expected to be selected least (the prediction plus
the recent selections, decayed per token) is evicted, or a miss expected less than every resident is served
from where it lies. An expert a forward pass has used is not evicted by its later layers: past a pass's working
set the rest is served from where it lies. Every decision is counted per layer (stats.py).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..moe import Plan, Routing, SelectionBias
from .ahead import Ahead, AheadStats
from .arena import Arena, DiskArena
from .disk import StagedCold
from .expert import Expert
from .lookup import TokenLookup
from .policies import Key, make_policy
from .rules import MissCost, MissMode, Placement, Tier, eras_bias, miss_tiers
from .stats import LayerStats

if TYPE_CHECKING:
    from ..options import Options


# With a prediction, a decode token's selections decay the layer's earlier ones by this factor, and they carry
# over to the next prompt: measured on bench/emoe.py's held-out prompts (40% budget, p=40), bytes moved against
# LRU went from -19.2% (the prompt's plain counts, reset per prompt) to -21.5% (0.9: -19.8%).
SEEN_DECAY = 0.95


class ExpertCache:
    """The ExpertStore with residency: hot arena + cold tier + miss mode + ERAS + prefetch accounting."""

    def __init__(self, hot: Sequence[Sequence[Expert]], options: "Options",
                 cold: Sequence[Sequence[Expert]] | None = None,
                 arena: Callable[[int, int, int, int], Arena] = Arena, background: int = 2) -> None:
        self.hot = hot
        self.cold = cold
        self.opt = options
        self.n_layer = len(hot)
        self.n_expert = max((len(h) for h in hot), default=0)
        if options.miss != MissMode.HOT and not cold:
            raise ValueError(f"miss={options.miss.value!r} needs the cold expert copies (OUT.cold.gguf)")
        all_experts = [e for layer in hot for e in layer]
        slot_bytes = max((e.nbytes for e in all_experts), default=0)
        n_slots = options.budget.slots(len(all_experts), slot_bytes)
        self.arena = arena(n_slots, slot_bytes, self.n_layer, self.n_expert)  # RAM (Arena) or VRAM (CudaArena)
        self.policy = make_policy(options.cache_policy, self.n_layer)
        self.stats = [LayerStats() for _ in range(self.n_layer)]
        self.activations = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
        self._act_rows = list(self.activations)                             # row views, made once
        self._fits_all = n_slots >= len(all_experts)                         # no victim is ever chosen
        # the experts this forward pass has used so far, which its later layers may not evict: a budget below a
        # pass's working set (a batch of many sequences) then streams the rest instead of cycling every expert
        # through the arena each pass (Belady: they are all needed again next pass); with a GPU arena the host
        # computes a streamed expert where it lies (Fiddler). Not on the disk tier, where a stream is served cold.
        self._protect_step = not self._fits_all and not isinstance(self.arena, DiskArena)
        self._step: set[Key] = set()
        self._step_layer = -1
        self.miss_cost: MissCost | None = None  # measured on a GPU at load (cuda.calibrate)
        self._predicted: list[set[int] | None] = [None] * self.n_layer
        self._in_use: set[Key] = set()                                      # the current layer's plan: never evicted
        # a disk arena loads in the background: where the mode allows, a miss is served by the cold copy while
        # its hot copy loads (HOBBIT's mixed precision as latency hiding), at most `background` reads queued
        # (beyond filling free slots)
        self._disk = isinstance(self.arena, DiskArena)
        self._cold_while_loading = (self._disk and cold is not None and options.miss != MissMode.HOT
                                    and n_slots < len(all_experts))
        self.background = background
        # a decode miss is copied by its own computation (RAM arena, contiguous sources: the fused kernels)
        self._fill = self.arena.fills_while_computing and all(
            m.raw.flags.c_contiguous for e in all_experts for m in (e.gate, e.up, e.down))
        self._nbytes = [[e.nbytes for e in layer] for layer in hot]
        self._plain_begin = type(self.arena).begin is Arena.begin and type(self.arena).failed is Arena.failed \
            and not isinstance(cold, StagedCold)                              # nothing to recycle per layer
        self.ahead: Ahead | None = None                                     # eMoE: experts loaded before a prompt
        self._protected: set[Key] = set()                                   # the prompt's predicted experts
        self._expect: np.ndarray | None = None                              # (L, E) their prior selections ...
        self._seen = np.zeros((self.n_layer, self.n_expert))                # ... and the recent selections
        self.miss = options.miss                                            # the mode for this prompt's misses
        # the routing of the tokens run before predicting the next experts (prompt-lookup's match): evictions by it
        self.lookup = TokenLookup(self.n_layer, self.n_expert, options.token_lookup) \
            if options.token_lookup and not self._fits_all else None

    @property
    def budget_bytes(self) -> int:
        return self.arena.n_slots * self.arena.slot_bytes

    @property
    def lookahead(self) -> int:
        """Later layers whose routers, applied to this layer's input, predict the experts to load."""
        return self.opt.prefetch

    def resident(self, layer: int) -> np.ndarray:
        """(E,) bool: which of the layer's experts are in the arena (kept by the arena as it loads and drops)."""
        return self.arena.resident(layer)

    # --- the ExpertStore interface -----------------------------------------------------------------------

    def bias(self, layer: int) -> SelectionBias | None:
        if not (self.opt.eras_alpha or self.opt.eras_beta):
            return None
        tokens = max(self.stats[layer].tokens, 1)
        freq = self.activations[layer] / tokens                              # share of tokens choosing each
        logit, prob = eras_bias(self.resident(layer), freq, self.opt.eras_alpha, self.opt.eras_beta)
        return SelectionBias(logit, prob)

    def prepare(self, layer: int, routing: Routing) -> Plan:
        if self.lookup is not None:
            self.lookup.record(layer, routing.experts)
        if routing.experts.shape[0] == 1:
            return self._prepare_token(layer, routing)
        return self._prepare_batch(layer, routing)

    def _new_step(self, layer: int) -> None:
        """A layer no later than the last one starts a new forward pass."""
        if layer <= self._step_layer:
            self._step.clear()
        self._step_layer = layer

    def _prepare_batch(self, layer: int, routing: Routing) -> Plan:
        st, ids = self.stats[layer], routing.experts                         # ids (T, k)
        self._begin()
        if self._protect_step:
            self._new_step(layer)
        st.tokens += ids.shape[0]
        np.add.at(self.activations[layer], ids.ravel(), 1)
        if self._expect is not None:
            np.add.at(self._seen[layer], ids.ravel(), 1)
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
            elif ((tiers[sel] == Tier.HOT).any() or self.arena.free) and not self._cold_while_loading:
                self.policy.use(key, hit=False)                              # a free slot costs no eviction
                experts[e] = self._load(key, pinned) or self._stream(layer, e)
                pinned.add(key)
            else:
                self.policy.use(key, hit=False, hot=False)
                if (tiers[sel] == Tier.HOT).any() or self.arena.free:
                    self._background(key, pinned)
                served = (tiers != Tier.SKIP) if self._cold_while_loading else (tiers == Tier.COLD)
                n_cold = int((sel & served).sum())
                experts[e] = self._cold(layer, e, n_cold)
                st.bytes_moved += experts[e].nbytes
                st.cold += n_cold
        self._in_use = pinned
        if self._protect_step:
            self._step |= pinned
        return Plan(experts, weights)

    def _prepare_token(self, layer: int, routing: Routing) -> Plan:
        """`prepare` for one token (decode), the same decisions in plain Python: its k experts are distinct,
        so each is one (token, slot) selection, and a handful of them costs less than numpy calls."""
        st, ids, w = self.stats[layer], routing.experts[0].tolist(), routing.weights
        if not self._plain_begin:
            self._begin()
        st.tokens += 1
        if self._protect_step:
            self._new_step(layer)
        act = self._act_rows[layer]
        for e in ids:
            act[e] += 1
        if self._expect is not None:
            seen = self._seen[layer]
            seen *= SEEN_DECAY                                               # recent selections count most
            for e in ids:
                seen[e] += 1
        if self._predicted[layer] is not None:
            self._score_prediction(layer, routing.experts)
        get = self.arena.experts.get
        found = [get((layer, e)) for e in ids]
        for x in found:                                                      # (`None in found` calls Expert.__eq__)
            if x is None:
                break
        else:                                                                # all hits: hot, nothing moves
            st.hits += len(ids)
            if self._fits_all:                                               # the order of uses decides nothing
                self.policy.hits += len(ids)
            else:
                keys = [(layer, e) for e in sorted(ids)]
                self.policy.use_resident(keys)
                if self._protect_step:
                    self._step.update(keys)
            if self._disk:
                self._in_use = {(layer, e) for e in ids}
            return Plan(dict(zip(ids, found)), w)
        resident = self.arena.slot_of
        hit = [(layer, e) in resident for e in ids]
        tiers = [Tier.HOT] * len(ids) if self.miss == MissMode.HOT else self._tiers(w)[0].tolist()
        n_hit = sum(hit)
        st.hits += n_hit
        st.misses += len(ids) - n_hit
        skipped = 0
        for j, h in enumerate(hit):
            if h:
                tiers[j] = Tier.HOT
            elif tiers[j] == Tier.SKIP:
                skipped += 1
        st.skipped += skipped
        weights = np.where(np.array([tiers]) == Tier.SKIP, np.float32(0), w).astype(np.float32) if skipped else w
        pinned = {(layer, e) for e, h in zip(ids, hit) if h}
        experts: dict[int, Expert] = {}
        for e, tier in sorted(zip(ids, tiers)):
            if tier == Tier.SKIP:
                continue
            key = (layer, e)
            if key in resident:
                self.policy.use(key, hit=True)
                experts[e] = self.arena.experts[key]
            elif (tier == Tier.HOT or self.arena.free) and not self._cold_while_loading:
                self.policy.use(key, hit=False)                              # a free slot costs no eviction
                experts[e] = self._load(key, pinned, computing=True) or self._stream(layer, e)
                pinned.add(key)
            else:
                self.policy.use(key, hit=False, hot=False)
                if tier == Tier.HOT or self.arena.free:
                    self._background(key, pinned)
                experts[e] = self._cold(layer, e, 1)
                st.bytes_moved += experts[e].nbytes
                st.cold += 1
        self._in_use = pinned
        if self._protect_step:
            self._step |= pinned
        return Plan(experts, weights)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        """Queue the hot copies of the experts predicted for `layer` ahead of it (never evicting each other)."""
        predicted = {int(e) for e in np.unique(experts)}
        self._predicted[layer] = predicted
        pinned = {(layer, e) for e in predicted} | self._in_use
        for e in sorted(predicted):
            if (layer, e) not in self.arena and self._load((layer, e), pinned) is not None:
                self.stats[layer].prefetched += 1

    def new_sequence(self) -> None:
        self.policy.new_sequence()
        if self.lookup is not None:
            self.lookup.new_sequence()

    def begin_step(self, ids: np.ndarray, seqs: np.ndarray | None = None) -> None:
        if self.lookup is not None:
            self.lookup.begin(ids, seqs)

    def begin_prompt(self, ids: Sequence[int], task: str | None = None, join: bool = False) -> None:
        """eMoE, before the prefill: load the prompt's predicted experts, evicting unpredicted ones first, and weigh
        residents by the prediction while it runs; an insensitive task's misses are served cold (with cold copies).
        `join` (a batch with other sequences running): the prediction adds to theirs, and misses go cold only
        while every joined prompt's task is insensitive."""
        if self.ahead is None:
            return
        pre = self.ahead.plan(ids, task, self.arena.n_slots)
        cold = pre.cold and bool(self.cold)
        if join:
            self.miss = MissMode.COLD if cold and self.miss == MissMode.COLD else self.opt.miss
        else:
            self.miss = MissMode.COLD if cold else self.opt.miss
            self._protected = set()
            self._expect = None                                              # the recent selections stay
        if pre.expect is not None:
            self._expect = pre.expect if self._expect is None else self._expect + pre.expect
        if pre.mask is None:
            return
        keys = [(int(l), int(e)) for l, e in zip(*np.nonzero(pre.mask))]
        self._protected |= set(keys)
        for key in keys:
            if key in self.arena:
                continue
            if self._load(key, self._protected, preload=True) is None:
                break
            self.stats[key[0]].preloaded += 1

    # --- internals -----------------------------------------------------------------------------------------

    def _begin(self) -> None:
        """A layer's batch starts: staging slots are free again, failed disk reads are forgotten."""
        if self._plain_begin:
            return
        self.arena.begin()
        if isinstance(self.cold, StagedCold):
            self.cold.begin()
        for key in self.arena.failed():
            self.arena.drop(key)
            self.policy.evicted(key)

    def _background(self, key: Key, pinned: set[Key]) -> None:
        """Queue `key`'s hot copy while its cold copy serves (disk tier): into a free slot, or evicting unless
        `background` reads are queued already."""
        if self._cold_while_loading and (self.arena.free or self.arena.disk.reader.in_flight < self.background):
            if self._load(key, pinned) is not None:
                pinned.add(key)

    def _tiers(self, weights: np.ndarray) -> np.ndarray:
        if self.miss == MissMode.HOT:
            return np.full(weights.shape, Tier.HOT, dtype=np.int8)
        if self.miss == MissMode.COLD:
            return np.full(weights.shape, Tier.COLD, dtype=np.int8)
        return miss_tiers(weights, self.opt.miss_t1, self.opt.miss_t2)

    def _load(self, key: Key, pinned: set[Key], computing: bool = False, preload: bool = False) -> Expert | None:
        """Bring `key`'s hot copy into the arena, evicting an unpinned resident if full; None if nothing can go.
        `computing`: the result is computed with at once, so a RAM arena leaves the copy to that computation;
        `preload`: a predicted expert loaded before its prompt (the policy evicts the unpredicted, `pinned`)."""
        if not self.arena.free:
            if self._step and not preload and not (self.lookup is not None and self.lookup.single):
                pinned = pinned | self._step                                 # (one sequence: its lookup ranks them)
            if self.lookup is not None:
                victim = self._furthest(key, pinned, bypass=not preload and not self._disk)
            elif self._expect is not None and not preload:
                victim = self._least_expected(key, pinned)
            else:
                victim = self.policy.victim(self.arena.slot_of, pinned, key[0])
            if victim is None:
                return None
            self.arena.drop(victim)
            self.policy.evicted(victim)
        src = self.hot[key[0]][key[1]]
        expert = self.arena.load_filling(key, src) if computing and self._fill else self.arena.load(key, src)
        self.policy.insert(key)
        st = self.stats[key[0]]
        st.loads += 1
        st.bytes_moved += self._nbytes[key[0]][key[1]]
        return expert

    def _least_expected(self, key: Key, pinned: set[Key]) -> Key | None:
        """With a prompt's prediction: the unpinned resident expected to be selected least (its predicted
        selections plus those the prompt made; ties: the lowest layer and expert), or None, so that `key` is served
        from where it lies, when `key` is expected less than every candidate (it would be evicted first anyway)."""
        expected = self._expect + self._seen                                 # (L, E) expected selections
        score = np.where(self.arena.mask, expected, np.inf)                  # residents only
        for k in pinned:
            score[k] = np.inf
        best = np.unravel_index(int(np.argmin(score)), score.shape)
        if not np.isfinite(score[best]) or expected[key] < score[best]:
            return None
        return int(best[0]), int(best[1])

    def _furthest(self, key: Key, pinned: set[Key], bypass: bool = True) -> Key | None:
        """With token lookup: the unpinned resident predicted to be selected furthest ahead (then: selected least), or
        None, so that `key` is computed where it lies, when `key` itself comes no sooner (Belady's MIN with bypass;
        not on the disk tier, where what is not loaded is served cold)."""
        score = self.lookup.score(key[0])                                    # (L, E) highest: evict first
        if self._expect is not None:                                         # the prompt's predicted selections
            score = score - self._expect                                     # count beside the recent ones
        cand = np.where(self.arena.mask, score, -np.inf)
        for k in pinned:
            cand[k] = -np.inf
        best = np.unravel_index(int(np.argmax(cand)), cand.shape)
        if not np.isfinite(cand[best]) or bypass and cand[best] <= score[key]:
            return None
        return int(best[0]), int(best[1])

    def _cold(self, layer: int, e: int, tokens: int) -> Expert:
        """The cold copy, uploaded to a staging slot when placement (or the cost model) puts it on the GPU."""
        if isinstance(self.cold, StagedCold):                                # read from disk for this layer
            return self.cold.get(layer, e)
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
        """No slot can be freed (the budget is below one layer's selection): compute from the mmap directly, or
        on the disk tier (where the map is never read) with the cold copy."""
        if self._disk and self.cold is not None:
            self.stats[layer].cold += 1
            return self._cold(layer, e, 1)
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
        selections = total["hits"] + total["misses"]
        total["hit_rate"] = {"hot": total["hits"] / selections if selections else None,
                             "cold": total["cold"] / selections if selections else None,
                             "disk": (total["misses"] - total["cold"] - total["skipped"]) / selections
                             if selections and self._disk else None}
        readers = self._readers()
        total.update(disk_bytes=sum(r.bytes_read for r in readers), disk_reads=sum(r.reads for r in readers),
                     stall_s=sum(r.stall_s for r in readers), cold_resident=bool(self.cold) and
                     not isinstance(self.cold, StagedCold))
        a = self.ahead.stats if self.ahead is not None else AheadStats()
        total.update(predictions=a.predictions, prediction_reuses=a.reuses, insensitive_prompts=a.insensitive,
                     token_lookups=self.lookup.predictions if self.lookup is not None else 0)
        total.update(budget_bytes=self.budget_bytes, slots=self.arena.n_slots, resident=len(self.arena.slot_of),
                     policy_hits=self.policy.hits, policy_misses=self.policy.misses,
                     layers=layers, activations=self.activations.tolist())
        return total

    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in range(self.n_layer)]
        self.activations[:] = 0
        self._predicted = [None] * self.n_layer
        if self.ahead is not None:
            self.ahead.reset_stats()
        if self.lookup is not None:
            self.lookup.predictions = 0
        for r in self._readers():
            r.reset_stats()

    def clear(self) -> None:
        """Empty the arena and forget every count, as if just loaded (after the warm-up at load)."""
        for key in list(self.arena.slot_of):
            self.arena.experts[key].ready.wait()
            self.arena.drop(key)
        self.policy = make_policy(self.opt.cache_policy, self.n_layer)
        self._in_use = set()
        self._step.clear()
        self._protected = set()
        self._expect = None
        self._seen[:] = 0
        self.miss = self.opt.miss
        if self.ahead is not None:
            self.ahead.forget()
        self.reset_stats()

    def cold_samples(self) -> list[Expert]:
        """One cold expert of each (gate, up, down) type combination, its bytes in place (to warm kernels)."""
        if isinstance(self.cold, StagedCold):
            kinds = {(e.gate.qtype, e.up.qtype, e.down.qtype): (i, j)
                     for i, layer in enumerate(self.cold.disk.layouts) for j, e in enumerate(layer)}
            self.cold.begin()
            out = [self.cold.get(i, j) for i, j in kinds.values()]
            for e in out:
                e.ready.wait()
            return out
        kinds = {(e.gate.qtype, e.up.qtype, e.down.qtype): e for layer in self.cold or [] for e in layer}
        return list(kinds.values())

    def _readers(self) -> list[Any]:
        out = [self.arena.disk.reader] if self._disk else []
        if isinstance(self.cold, StagedCold):
            out.append(self.cold.disk.reader)
        return out
