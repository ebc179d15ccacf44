"""/metrics in Prometheus's text format (prometheus-client): the batch engine's counters (SLO attainment and the
schedule's decisions among them) and the expert store's per-tier hits and misses, read when scraped."""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from hotcold.engine.batch import BatchEngine

WINDOW_S = 10.0   # tokens/s is over the scrapes of about this long


class EngineCollector:
    def __init__(self, engine: "BatchEngine") -> None:
        self.engine = engine
        self._seen: deque[tuple[float, int, int]] = deque()   # (time, prompt tokens, completion tokens)

    def _rates(self, now: float, prompt: int, completion: int) -> tuple[float, float]:
        self._seen.append((now, prompt, completion))
        while len(self._seen) > 2 and now - self._seen[1][0] >= WINDOW_S:
            self._seen.popleft()
        t0, p0, c0 = self._seen[0]
        dt = now - t0
        return ((prompt - p0) / dt, (completion - c0) / dt) if dt > 0 else (0.0, 0.0)

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        ex = s["experts"]
        pp, tg = self._rates(time.monotonic(), s["prompt_tokens"], s["completion_tokens"])
        yield _counter("hotcold_requests", "requests admitted to a slot", s["requests"])
        yield _counter("hotcold_requests_cancelled", "requests cancelled (clients gone)", s["cancelled"])
        yield _counter("hotcold_prompt_tokens", "prompt tokens of admitted requests", s["prompt_tokens"])
        yield _counter("hotcold_prompt_tokens_cached", "prompt tokens reused from a slot's cache",
                       s["prompt_tokens_cached"])
        yield _counter("hotcold_completion_tokens", "tokens generated", s["completion_tokens"])
        yield _counter("hotcold_forward_seconds", "seconds in batched forward passes", s["step_s"])
        # SLO attainment is slo_met / slo_requests (requests that ended, cancelled ones left out)
        yield _counter("hotcold_slo_requests", "requests with slo_ms that ended", s["slo_requests"])
        yield _counter("hotcold_slo_met", "requests with slo_ms that ended within it", s["slo_met"])
        d = s["decisions"]
        yield _counter("hotcold_schedule_picks", f"requests given a slot by the {s['schedule']} schedule", d["picks"])
        yield _counter("hotcold_schedule_reordered", "requests given a slot before one that arrived earlier",
                       d["reordered"])
        yield _counter("hotcold_schedule_starved", "requests given a slot first for having waited too long",
                       d["starved"])
        yield _counter("hotcold_schedule_grouped", "requests given a slot first for sharing the active slots' "
                       "predicted experts", d["grouped"])
        yield _gauge("hotcold_requests_waiting", "requests queued for a free slot", s["waiting"])
        yield _gauge("hotcold_slots_active", "slots generating", s["active"])
        yield _gauge("hotcold_slots", "slots (--parallel)", s["slots"])
        yield _gauge("hotcold_prompt_tokens_per_second", f"prompt tokens/s over about {WINDOW_S:g} s of scrapes", pp)
        yield _gauge("hotcold_completion_tokens_per_second", f"generated tokens/s over about {WINDOW_S:g} s of "
                     "scrapes", tg)
        tiers = CounterMetricFamily("hotcold_expert_hits", "expert selections served by a tier", labels=["tier"])
        tiers.add_metric(["hot"], ex.get("hits", 0))
        tiers.add_metric(["cold"], ex.get("cold", 0))
        tiers.add_metric(["disk"], ex.get("disk_reads", 0))
        yield tiers
        yield _counter("hotcold_expert_misses", "expert selections not resident hot", ex.get("misses", 0))
        yield _counter("hotcold_expert_skipped", "expert selections skipped (near-zero gate weight)",
                       ex.get("skipped", 0))
        yield _counter("hotcold_expert_bytes_moved", "expert bytes copied into the hot arena", ex.get("bytes_moved", 0))
        yield _counter("hotcold_expert_disk_bytes", "expert bytes read from disk", ex.get("disk_bytes", 0))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def registry(engine: "BatchEngine") -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(EngineCollector(engine))   # type: ignore[arg-type]
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
