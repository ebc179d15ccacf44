"""How a RAM budget is split between the hot arena and the cold copies (the disk tier's planner).

What the model must hold whatever the split (dense weights, KV cache, buffers) comes first; the experts get
the rest. Everything hot when it fits. Otherwise the cold copies go resident when they fit beside one
token's selection of hot slots: a resident cold copy serves a miss with no read at all, in a third (Q2_K) to
a half (Q4_K) of a Q8_0 copy's bytes, so it serves more misses per byte than the same bytes of hot slots
(HOBBIT); the hot slots get the remainder. Else the cold copies are read from disk as misses need them, into a ring of one
layer's cold experts, and the hot slots get the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

from .rules import Budget


class RAMBudgetError(ValueError):
    """A RAM budget too small for what the model must hold."""


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ExpertShape:
    """What the planner needs to know of a file's experts."""
    count: int             # experts in all layers
    slot_bytes: int        # the largest expert's bytes (one arena slot)
    per_layer: int         # the most experts in one layer (a layer's batch may select them all)
    total_bytes: int
    used: int = 1          # experts each token selects

    def least_slots(self, with_cold: bool) -> int:
        """Hot slots that always suffice: one token's selection when a miss can fall back to a cold copy,
        else a whole layer's experts (a prompt's batch may select them all, and each needs a slot)."""
        return self.used if with_cold else self.per_layer


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    fixed: dict[str, int]              # dense, kv_cache, buffers: held whatever the split
    hot_slots: int
    slot_bytes: int
    cold_resident: bool                # the cold copies in RAM (else read from disk into a ring)
    cold_bytes: int                    # the resident copies', or the ring's
    why: str

    @property
    def hot_bytes(self) -> int:
        return self.hot_slots * self.slot_bytes

    def describe(self, n_experts: int) -> str:
        fixed = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.fixed.items())
        cold = ("cold copies resident " if self.cold_resident else "cold copies from disk, ring ") + \
            fmt_bytes(self.cold_bytes) if self.cold_bytes else "no cold copies"
        return (f"ram budget {fmt_bytes(self.budget)}: {fixed}; hot arena {self.hot_slots}/{n_experts} experts "
                f"{fmt_bytes(self.hot_bytes)}; {cold} ({self.why})")


def plan_memory(budget: int, fixed: dict[str, int], hot: ExpertShape, cold: ExpertShape | None,
                expert_budget: Budget | None = None) -> MemoryPlan:
    """The split of `budget` bytes; `cold` None when there are no cold copies to use. Raises RAMBudgetError,
    naming what is held and the smallest budget that works, when even the least configuration does not fit."""
    held = sum(fixed.values())
    least_hot = hot.least_slots(cold is not None) * hot.slot_bytes
    ring = cold.per_layer * cold.slot_bytes if cold is not None else 0
    least = held + least_hot + ring
    if budget < least:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in fixed.items())
        raise RAMBudgetError(
            f"ram_budget {fmt_bytes(budget)} is too small: the model holds {parts}, and the experts need at least "
            f"{hot.least_slots(cold is not None)} slots of {fmt_bytes(hot.slot_bytes)}"
            + (f" and a ring of {fmt_bytes(ring)} for cold copies" if ring else "")
            + f"; give at least --ram-budget {fmt_bytes(least)} (a smaller -c shrinks the KV cache, a smaller -b the buffers)")
    avail = budget - held

    def cold_part(left: int) -> tuple[bool, int]:
        if cold is None:
            return False, 0
        return (True, cold.total_bytes) if left >= cold.total_bytes else (False, ring)

    if expert_budget is not None:
        want, lo, hi = (expert_budget.slots(hot.count, hot.slot_bytes), hot.least_slots(cold is not None),
                        (avail - ring) // hot.slot_bytes)
        if not lo <= want <= hi:
            raise RAMBudgetError(
                f"expert_budget of {want} experts ({fmt_bytes(want * hot.slot_bytes)}) does not fit ram_budget "
                f"{fmt_bytes(budget)}: between {lo} and {hi} experts fit beside what the model holds")
        resident, cold_bytes = cold_part(avail - want * hot.slot_bytes)
        return MemoryPlan(budget, fixed, want, hot.slot_bytes, resident, cold_bytes, "expert_budget given")
    if avail >= hot.total_bytes + (ring if cold is not None else 0):
        resident, cold_bytes = cold_part(avail - hot.count * hot.slot_bytes)
        return MemoryPlan(budget, fixed, hot.count, hot.slot_bytes, resident, cold_bytes, "every expert fits hot")
    if cold is not None and avail - cold.total_bytes >= least_hot:
        slots = min(hot.count, (avail - cold.total_bytes) // hot.slot_bytes)
        return MemoryPlan(budget, fixed, slots, hot.slot_bytes, True, cold.total_bytes,
                          "cold copies resident, the rest hot slots")
    slots = min(hot.count, (avail - ring) // hot.slot_bytes)
    why = "cold copies do not fit: read from disk" if cold is not None else "no cold copies"
    return MemoryPlan(budget, fixed, slots, hot.slot_bytes, False, ring, why)


def expert_shape(experts: list[list], used: int = 1) -> ExpertShape:
    flat = [e for layer in experts for e in layer]
    return ExpertShape(len(flat), max((e.nbytes for e in flat), default=0),
                       max((len(layer) for layer in experts), default=0), sum(e.nbytes for e in flat), used)
