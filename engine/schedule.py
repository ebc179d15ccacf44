"""Which waiting request takes a free slot of the batch engine (moe-server's --schedule): first come first
served, or eMoE's task-aware order (Tairin et al., arXiv 2503.06823, which schedules by "SLOs, task-specific
output lengths and expert loading latencies").

Policies are pure: they see `Job`s (what the engine learned of each request when it was submitted: its
arrival, latency objective, predicted output length and predicted experts) and the clock, and say which
waiting job goes next. `TaskAware` decides in four steps, each explicit:

1. Starvation bound: a job that has waited `max_wait_s` or longer goes first (the longest waiting of them),
   whatever its deadline or length, so a stream of short or urgent requests never holds one back forever.
2. Earliest deadline first: deadline = arrival + slo_ms. Only jobs whose deadline has not passed compete
   here; those within `deadline_tie_s` of the earliest deadline are the candidates. A job past its deadline
   (or without slo_ms) waits behind every job that can still meet one: its objective is lost already, and
   serving it first would make the next ones miss theirs too (EDF's domino effect). It still runs: when no
   live deadline waits, and at the latest by step 1.
3. Shortest predicted work first among the candidates: cost = length x (1 - overlap_weight x J), `length` the
   predicted output tokens (the predictor's mean for the request's task, else max_tokens), J the Jaccard
   overlap of the job's predicted expert mask with the union of the active slots' masks. An expert the batch
   already reads costs the new sequence little (the MoE step reads it once for all of them), so a request
   sharing the active sequences' experts counts as shorter: with the default weight 0.5 a full overlap halves
   its cost. Without a predictor the masks are None and J is 0: shortest max_tokens first.
4. Ties (equal cost): arrival order.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .options import Schedule

MAX_WAIT_S = 30.0        # step 1: a job waiting this long goes first
DEADLINE_TIE_S = 0.1     # step 2: deadlines this close count as equal, so length and overlap decide
OVERLAP_WEIGHT = 0.5     # step 3: the share of a job's cost that a full expert overlap takes off


@dataclass(frozen=True, eq=False)
class Job:
    """What a policy knows of one request, fixed when it was submitted."""
    order: int                        # arrival order (the engine's counter): FCFS's key, every tie's last word
    arrival: float                    # seconds on the engine's clock (time.perf_counter) at submit
    length: float                     # predicted output tokens
    slo_ms: float | None = None       # the latency objective, from arrival to the last token
    mask: np.ndarray | None = None    # (n_layer, n_expert) bool: the predicted experts (None: no prediction)

    @property
    def deadline(self) -> float:
        """When the objective runs out (infinitely late without one)."""
        return math.inf if self.slo_ms is None else self.arrival + self.slo_ms / 1e3


@dataclass
class ScheduleStats:
    picks: int = 0       # requests given a slot
    reordered: int = 0   # of them, not the longest waiting (what FCFS would have picked)
    starved: int = 0     # picked by the starvation bound
    grouped: int = 0     # picked because of the expert overlap (without it another would have gone)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Policy(ABC):
    """Orders the waiting requests; counts its decisions in `stats`."""
    schedule: Schedule
    needs_predictions = False   # whether the engine should predict each request's experts and output length

    def __init__(self) -> None:
        self.stats = ScheduleStats()

    def pick(self, waiting: Sequence[Job], active: Sequence[Job], now: float) -> int:
        """The index in `waiting` (in arrival order, not empty) of the job to admit next, given the jobs in
        the slots (`active`) and the time `now` (on the jobs' clock)."""
        if not waiting:
            raise ValueError("pick needs at least one waiting job")
        i = self._pick(waiting, active, now)
        self.stats.picks += 1
        if waiting[i].order != min(j.order for j in waiting):
            self.stats.reordered += 1
        return i

    @abstractmethod
    def _pick(self, waiting: Sequence[Job], active: Sequence[Job], now: float) -> int: ...


class FCFS(Policy):
    """Arrival order (llama-server's): the engine's queue is in arrival order, so always the first."""
    schedule = Schedule.FCFS

    def _pick(self, waiting: Sequence[Job], active: Sequence[Job], now: float) -> int:
        return 0


class TaskAware(Policy):
    """eMoE's task-aware order: starvation bound, earliest deadline, then least predicted work with shared
    experts counted cheaper (the module's docstring gives the rules and why)."""
    schedule = Schedule.TASK
    needs_predictions = True

    def __init__(self, max_wait_s: float = MAX_WAIT_S, deadline_tie_s: float = DEADLINE_TIE_S,
                 overlap_weight: float = OVERLAP_WEIGHT) -> None:
        super().__init__()
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s={max_wait_s}: the starvation bound must be a positive number of seconds")
        if not deadline_tie_s >= 0:
            raise ValueError(f"deadline_tie_s={deadline_tie_s}: give 0 or more seconds")
        if not 0.0 <= overlap_weight <= 1.0:
            raise ValueError(f"overlap_weight={overlap_weight}: give a share in 0..1 (0: overlap ignored)")
        self.max_wait_s, self.deadline_tie_s, self.overlap_weight = max_wait_s, deadline_tie_s, overlap_weight

    def _pick(self, waiting: Sequence[Job], active: Sequence[Job], now: float) -> int:
        starved = [i for i, j in enumerate(waiting) if now - j.arrival >= self.max_wait_s]
        if starved:
            self.stats.starved += 1
            return min(starved, key=lambda i: waiting[i].order)
        cands = self.candidates(waiting, now)
        union = active_union(active)
        best = self._least(waiting, cands, union, self.overlap_weight)
        if union is not None and self.overlap_weight and best != self._least(waiting, cands, union, 0.0):
            self.stats.grouped += 1
        return best

    def candidates(self, waiting: Sequence[Job], now: float) -> list[int]:
        """Step 2: the jobs within the tie window of the earliest deadline still ahead; all when none is."""
        live = [i for i, j in enumerate(waiting) if j.deadline >= now and j.slo_ms is not None]
        if not live:
            return list(range(len(waiting)))
        first = min(waiting[i].deadline for i in live)
        return [i for i in live if waiting[i].deadline <= first + self.deadline_tie_s]

    def cost(self, job: Job, union: np.ndarray | None, overlap_weight: float | None = None) -> float:
        """Step 3: predicted tokens, less `overlap_weight` of them for the share of experts the batch shares."""
        w = self.overlap_weight if overlap_weight is None else overlap_weight
        return job.length * (1.0 - w * jaccard(job.mask, union))

    def _least(self, waiting: Sequence[Job], cands: Sequence[int], union: np.ndarray | None, w: float) -> int:
        return min(cands, key=lambda i: (self.cost(waiting[i], union, w), waiting[i].order))


def jaccard(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """|a & b| / |a | b| of two expert masks; 0 where either is unknown or both are empty."""
    if a is None or b is None:
        return 0.0
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def active_union(active: Sequence[Job]) -> np.ndarray | None:
    """The experts the active slots are predicted to use (None: no active slot has a prediction)."""
    masks = [j.mask for j in active if j.mask is not None]
    return np.logical_or.reduce(masks) if masks else None


POLICIES: dict[Schedule, type[Policy]] = {Schedule.FCFS: FCFS, Schedule.TASK: TaskAware}


def policy_for(schedule: Schedule, **kwargs: Any) -> Policy:
    """A new policy for `schedule` (TaskAware's keywords tune its rules)."""
    return POLICIES[schedule](**kwargs)
