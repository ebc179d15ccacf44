"""The hot copies' source, and the plain expert store: every expert read straight from the memory-mapped file."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..moe import Plan, Routing, SelectionBias
from ..weights import QStack
from .expert import Expert
from .stats import plain_report


def mmap_experts(stacks: Sequence[tuple[QStack, QStack, QStack] | None]) -> list[list[Expert]]:
    """Each layer's experts as zero-copy views of its (gate, up, down) stacks; [] for a dense layer."""
    out: list[list[Expert]] = []
    for s in stacks:
        if s is None:
            out.append([])
            continue
        g, u, d = s
        out.append([Expert(g[e], u[e], d[e]) for e in range(g.count)])
    return out


class MmapExperts:
    """The ExpertStore with no residency: nothing to decide, nothing counted."""

    lookahead = 0

    def __init__(self, experts: Sequence[Sequence[Expert]]) -> None:
        self.experts = experts

    def bias(self, layer: int) -> SelectionBias | None:
        return None

    def prepare(self, layer: int, routing: Routing) -> Plan:
        return Plan(self.experts[layer], routing.weights)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        pass

    def new_sequence(self) -> None:
        pass

    def begin_step(self, ids: np.ndarray, seqs: np.ndarray | None = None) -> None:
        pass

    def begin_prompt(self, ids: Sequence[int], task: str | None = None, join: bool = False) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return plain_report()

    def reset_stats(self) -> None:
        pass
