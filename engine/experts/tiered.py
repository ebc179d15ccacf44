"""The expert store under a RAM budget, put together: readers for both files, the planner's split, the cold
copies resident or staged, the hot arena filled from disk (the API only asks for it)."""
from __future__ import annotations

import dataclasses
import functools
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..gguf_file import GGUFFile
from .arena import DiskArena
from .cache import ExpertCache
from .disk import DiskExperts, DiskReader, StagedCold, resident_copies
from .expert import Expert
from .planner import MemoryPlan, expert_shape, plan_memory
from .rules import Budget

if TYPE_CHECKING:
    from ..options import Options


def dense_extents(f: GGUFFile) -> list[tuple[int, int]]:
    """(offset, bytes) of every tensor that is not an expert stack."""
    return [(t.offset, t.nbytes) for t in f.tensors.values() if not is_expert_stack(t.name)]


def is_expert_stack(name: str) -> bool:
    return "_exps." in name


@dataclass
class TieredStore:
    cache: ExpertCache
    plan: MemoryPlan
    readers: list[DiskReader]
    cold_buf: np.ndarray | None       # the resident cold copies' buffer, if they are resident


def tiered_store(main: GGUFFile, hot: Sequence[Sequence[Expert]], cold_file: GGUFFile | None,
                 cold_layouts: Sequence[Sequence[Expert]] | None, opt: "Options", budget: int,
                 fixed: dict[str, int], k: int, prefetch_given: bool) -> TieredStore:
    """The store for `budget` bytes, of which `fixed` are held whatever the split; k experts per token."""
    files = [main] + ([cold_file] if cold_layouts else [])
    # the page an expert tensor shares with a dense neighbour stays cached (the dense side reads it)
    shared = 2 * mmap.PAGESIZE * sum(is_expert_stack(t) for f in files for t in f.tensors)
    readers = [DiskReader(main.path)]
    disk = DiskExperts(main, hot, readers[0])
    cold_disk = None
    if cold_layouts:
        readers.append(DiskReader(cold_file.path))
        cold_disk = DiskExperts(cold_file, cold_layouts, readers[1])
    plan = plan_memory(budget, {**fixed, "shared pages": shared}, disk.shape(k),
                       cold_disk.shape(k) if cold_disk else None, opt.expert_budget)
    cold: Any = None
    cold_buf = None
    if cold_disk is not None:
        if plan.cold_resident:
            cold, cold_buf = resident_copies(cold_disk)
        else:
            cold = StagedCold(cold_disk)
    # loads ahead (prefetch, a hot copy loading while the cold one serves) pay only when the arena holds a
    # token's whole selection: smaller, LRU evicts them before they are used, and their reads take a core
    ahead = plan.hot_slots >= sum(1 for layer in hot if layer) * k
    # the cache counts slots of the experts' own size; the arena sizes them for the reads (whole pages)
    hot_opt = dataclasses.replace(opt, expert_budget=Budget(nbytes=plan.hot_slots * expert_shape(hot).slot_bytes),
                                  prefetch=opt.prefetch if prefetch_given or not ahead else 1)
    cache = ExpertCache(hot, hot_opt, cold, functools.partial(DiskArena, disk=disk), background=2 if ahead else 0)
    return TieredStore(cache, plan, readers, cold_buf)
