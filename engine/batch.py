"""Many sequences on one model: continuous batching over the sequence slots of a Model's context (llama.cpp's
llama-server slots, --parallel).

Each step is one forward pass of every active slot's next token and, in the n_batch tokens left, chunks of
waiting prompts (chunked prefill). The MoE step groups all of them per expert, so an expert one step needs is
read once for every sequence (dynamic gating, Huang et al. 2023). A new request takes the free slot whose
cached tokens share the longest prefix with its prompt and keeps that prefix (llama-server's prompt cache).
Requests beyond the slots wait in a queue; which of them takes a free slot is the model's `schedule`'s policy
(engine/schedule.py: arrival order, or eMoE's task-aware order by deadline, predicted length and shared
predicted experts). A cancelled request frees its slot at the next step. The engine runs in one thread of its
own: requests come in from any thread, events go out through each request's `emit` callback (called on the
engine thread).
"""
from __future__ import annotations

import enum
import itertools
import logging
import math
import numbers
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .backend import finite_extremes
from .completion import Completion, TokenLogprob
from .sampling import Sampler, SamplingParams
from .schedule import Job, Policy, policy_for

if TYPE_CHECKING:
    import numpy as np

    from .api import Model

log = logging.getLogger("hotcold")


class ContextOverflow(ValueError):
    """A prompt that does not fit a slot's context."""


class Finish(enum.Enum):
    STOP = "stop"          # end-of-generation token or a stop string
    LENGTH = "length"      # max_tokens, or the slot's context is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Event:
    """What a request gets: text as it is generated, then one event with `finish` set."""
    text: str = ""
    finish: Finish | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)   # the tokens of `text`, when asked for
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One completion: prompt token ids, sampling, limits, and where its events go."""
    ids: Sequence[int]
    emit: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = 16
    stops: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None          # the n most likely alternatives to list per token, or None for none
    label: Any = None                    # the caller's own (a request id)
    slo_ms: float | None = None          # latency objective, submit to last token (the task schedule's deadline)
    task: str | None = None              # task label: the expert predictor's (eMoE) and the task schedule's
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    job: Job | None = field(default=None, init=False, repr=False)   # what the scheduler knows, set by submit

    def cancel(self) -> None:
        """Stop generating (a client that disconnected); the slot is freed at the engine's next step."""
        self.cancelled = True


@dataclass(eq=False)
class _Slot:
    seq: int
    req: Request | None = None
    comp: Completion | None = None
    todo: list[int] = field(default_factory=list)   # prompt tokens still to evaluate
    first_s: float = 0.0


class BatchEngine:
    """Continuous batching over `model`'s context (Model(..., n_seq_max=N) holds N slots). While it runs the
    Model is its own: Model.generate from elsewhere gets a ModelBusyError. `policy` orders the queue (default:
    the one for the model's `schedule` option)."""

    def __init__(self, model: "Model", policy: Policy | None = None) -> None:
        self.m, self.ctx = model, model.ctx
        self.slots = [_Slot(i) for i in range(self.ctx.n_seq)]
        self.queue: deque[Request] = deque()
        self.policy = policy if policy is not None else policy_for(model.options.schedule)
        self._arrivals = itertools.count()
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()   # held during a step: stats are read between steps
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counters = dict(requests=0, prompt_tokens=0, prompt_tokens_cached=0, completion_tokens=0, steps=0,
                             step_s=0.0, cancelled=0, slo_requests=0, slo_met=0)

    # --- the caller's side ------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queue a request (its prompt must fit a slot's context with room for one token, its slo_ms be positive:
        else ValueError). Under a policy that needs them, its experts and output length are predicted here,
        once."""
        ids = [int(t) for t in req.ids]
        if not ids:
            raise ValueError("the prompt is empty: a completion needs at least one token")
        self.m._check_ids(ids)
        if len(ids) + 1 > self.ctx.n_ctx:
            raise ContextOverflow(f"the prompt is {len(ids)} tokens; a slot's context is {self.ctx.n_ctx} tokens "
                             f"(n_ctx), which must hold the prompt and at least one generated token")
        if req.slo_ms is not None and (isinstance(req.slo_ms, bool) or not isinstance(req.slo_ms, numbers.Real)
                                       or not (math.isfinite(req.slo_ms) and req.slo_ms > 0)):
            raise ValueError(f"slo_ms={req.slo_ms!r}: give the latency objective as a positive number of "
                             "milliseconds, or leave it out")
        if req.task is not None and not isinstance(req.task, str):
            raise ValueError(f"task={req.task!r}: give the task label as a string, or leave it out")
        req.ids = ids
        length, mask = self._predict(req)
        with self._cv:   # arrival order and time under the queue's lock: FCFS's order is the queue's
            req.job = Job(next(self._arrivals), time.perf_counter(), length, req.slo_ms, mask)
            self.queue.append(req)
            self._cv.notify()

    def _predict(self, req: Request) -> tuple[float, np.ndarray | None]:
        """The request's output length (tokens) and predicted experts (None: unknown) for the policy: eMoE's
        per-task mean output length, capped by what the request may generate, and the experts the predictor
        would load for its prompt. Only a policy that uses them pays for the prediction."""
        cap = req.max_tokens if req.max_tokens and req.max_tokens > 0 else self.ctx.n_ctx - len(req.ids)
        cap = min(cap, self.ctx.n_ctx - len(req.ids))
        if not self.policy.needs_predictions:
            return float(cap), None
        mask = self.m.predict_experts(req.ids, req.task)
        predicted = None if req.ignore_eos else self.m.predicted_output_tokens(req.task)
        return (float(cap) if predicted is None else min(float(predicted), float(cap))), mask

    def start(self) -> "BatchEngine":
        """Run steps on a thread of the engine's own until `close`. Where the model's kernels were compiled and
        warmed on another thread, `run` on that thread is faster: GNU OpenMP keeps a thread team per calling
        thread, and with more teams than cores its workers stop spinning between kernels (libgomp's throttled
        spin), which costs several times a small model's step."""
        self._own()
        self._thread = threading.Thread(target=self._loop, name="hotcold-batch", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run steps on the calling thread until `close` (from another thread) or KeyboardInterrupt."""
        self._own()
        try:
            self._loop()
        finally:
            self._cancel_all()
            self.m._busy.release()

    def close(self) -> None:
        """Stop stepping; requests still running or queued end cancelled."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.m._busy.release()

    def _own(self) -> None:
        if not self.m._busy.acquire(blocking=False):
            raise RuntimeError(f"{self.m.path.name}: the Model is busy; a batch engine needs it to itself")

    @property
    def active(self) -> int:
        return sum(s.req is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def stats(self) -> dict[str, Any]:
        """The counters and the expert store's report, read between steps."""
        with self._step_lock:
            return {**self.counters, "active": self.active, "waiting": self.waiting, "slots": len(self.slots),
                    "schedule": self.policy.schedule.value, "decisions": self.policy.stats.as_dict(),
                    "experts": self.m.expert_stats()}

    # --- the engine's side ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.queue and not self.active:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:           # a bug must not leave clients waiting forever: each gets the error
                log.exception("batch step failed")
                for s in self.slots:
                    if s.req is not None:
                        self._finish(s, Finish.ERROR, f"{type(e).__name__}: {e}")
        self._cancel_all()

    def _cancel_all(self) -> None:
        """Closing: whatever is still running or queued ends cancelled."""
        for s in self.slots:
            if s.req is not None:
                self._finish(s, Finish.CANCELLED)
        with self._cv:
            while self.queue:
                self.queue.popleft().emit(Event(finish=Finish.CANCELLED))

    def step(self) -> bool:
        """One forward pass over the active slots and prompt chunks; whether there was anything to do."""
        with self._step_lock:
            self._admit()
            batch, owners = self._plan()
            if not batch:
                return False
            t0 = time.perf_counter()
            try:
                logits = self.m.model.forward_batch(batch, self.ctx)
            except ValueError as e:          # a broken model: every sequence in the pass fails, none hangs
                for s in owners:
                    self._finish(s, Finish.ERROR, str(e))
                return True
            self.counters["steps"] += 1
            self.counters["step_s"] += time.perf_counter() - t0
            for s, row in zip(owners, logits):
                if s.todo:                   # a prompt chunk that is not its last: no token yet
                    continue
                if not finite_extremes(row, self.ctx.state.finite):
                    self._finish(s, Finish.ERROR, f"{self.m.path.name}: NaN or infinite logits")
                    continue
                self._advance(s, row)
            return True

    def _admit(self) -> None:
        """Cancelled requests leave; waiting ones take free slots in the policy's order, each the slot sharing
        most of its prompt."""
        for s in self.slots:
            if s.req is not None and s.req.cancelled:
                self._finish(s, Finish.CANCELLED)
        with self._cv:
            pending = [r for r in self.queue if not r.cancelled]
            for r in self.queue:
                if r.cancelled:
                    self.counters["cancelled"] += 1
                    r.emit(Event(finish=Finish.CANCELLED))
            self.queue.clear()
            free = [s for s in self.slots if s.req is None]
            while pending and free:
                r = pending.pop(self.policy.pick([p.job for p in pending],
                                                 [s.req.job for s in self.slots if s.req is not None],
                                                 time.perf_counter()))
                best = max(free, key=lambda s: _common(self.ctx.slots[s.seq], r.ids))
                free.remove(best)
                self._assign(best, r)
            self.queue.extend(pending)

    def _assign(self, s: _Slot, r: Request) -> None:
        keep = min(_common(self.ctx.slots[s.seq], r.ids), len(r.ids) - 1)   # the last prompt token gives logits
        self.ctx.seek(keep, s.seq)
        # the store sees each prompt and its task, as Model.generate's, beside the sequences running
        self.ctx.experts.begin_prompt(r.ids, r.task, join=any(o.req is not None for o in self.slots if o is not s))
        sampler = Sampler(r.params)
        for t in r.ids:
            sampler.accept(t)
        s.req, s.todo, s.first_s = r, list(r.ids[keep:]), 0.0
        s.comp = Completion(self.m.tokenizer, sampler, len(r.ids), self.ctx.n_ctx, r.max_tokens, r.stops,
                            r.ignore_eos, r.logprobs)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(r.ids)
        self.counters["prompt_tokens_cached"] += keep

    def _plan(self) -> tuple[list[tuple[int, list[int]]], list[_Slot]]:
        """This step's (sequence, tokens): every decoding slot's next token, then prompt chunks in the room left
        of n_batch, oldest request first."""
        batch, owners = [], []
        for s in self.slots:
            if s.req is not None and not s.todo:
                batch.append((s.seq, [s.comp.token]))
                owners.append(s)
        room = self.ctx.n_batch - len(batch)
        for s in sorted((s for s in self.slots if s.req is not None and s.todo), key=lambda s: s.req.submitted):
            if room <= 0:
                break
            chunk, s.todo = s.todo[:room], s.todo[room:]
            batch.append((s.seq, chunk))
            owners.append(s)
            room -= len(chunk)
        return batch, owners

    def _advance(self, s: _Slot, logits: Any) -> None:
        comp, r = s.comp, s.req
        n_lp = len(comp.logprobs)
        piece = comp.step(logits)
        self.counters["completion_tokens"] += 1
        if piece or len(comp.logprobs) > n_lp:
            r.emit(Event(text=piece, logprobs=comp.logprobs[n_lp:]))
        if comp.finish is not None:
            self._finish(s, Finish(comp.finish))

    def _finish(self, s: _Slot, how: Finish, error: str | None = None) -> None:
        """The request ends; the slot keeps its cached tokens for the next prompt that shares them."""
        r, comp = s.req, s.comp
        if how is Finish.CANCELLED:
            self.counters["cancelled"] += 1
        elif r.slo_ms is not None:           # SLO attainment: of the requests with an objective that ended
            self.counters["slo_requests"] += 1
            if how is not Finish.ERROR and (time.perf_counter() - r.job.arrival) * 1e3 <= r.slo_ms:
                self.counters["slo_met"] += 1
        if how is Finish.ERROR:
            self.ctx.seek(0, s.seq)          # nothing of a failed pass is reused
        s.req, s.comp, s.todo = None, None, []
        r.emit(Event(finish=how, prompt_tokens=len(r.ids), completion_tokens=comp.n_gen if comp else 0,
                     error=error))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
