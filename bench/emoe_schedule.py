"""SLO attainment and latency of moe-server's --schedule task (eMoE's task-aware order: earliest deadline,
shorter predicted output, shared predicted experts; Tairin et al., arXiv 2503.06823) against --schedule fcfs.

For each schedule a fresh moe-server (a subprocess on 127.0.0.1 with --parallel slots and -t threads) serves
--clients concurrent clients (threads with httpx, loopback only), each sending --rounds completions one after
the other, so about clients - parallel requests wait in the queue at any moment. The mix, the same for both
schedules: each client alternates short and long requests (client i's round r is short when i + r is even),
so half the requests are

  short: --short tokens, task "lookup", a tight objective (slo_ms = --tight x L)
  long:  --long tokens,  task "explain", a loose objective (slo_ms = --loose x L)

where L is the latency of one long request alone on a warm server, measured before the runs (or give
--short-slo-ms / --long-slo-ms). Requests are greedy with ignore_eos, so each generates exactly its max_tokens;
each server answers one request of each kind (a warm-up) before its measured run.
A request meets its objective when its client has the whole reply within slo_ms of sending it. The schedules
alternate --reps times (fcfs first on even reps); the table pools each schedule's requests: SLO attainment
(all, short, long), mean and p90 latency, and from the server's /metrics its own SLO count and the picks it
made out of arrival order. --predictor pred.npz (moe-predictor train) is passed to both servers: the task
schedule then also uses predicted output lengths and expert overlap.

    python bench/emoe_schedule.py [--model M.gguf | --work DIR] [--clients 8] [--parallel 2] [--rounds 4]
                                  [--short 8] [--long 64] [--tight 1.5] [--loose 8] [--reps 1] [--predictor P]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import TRAINED  # noqa: E402

from hotcold.convert import convert  # noqa: E402

PROMPTS = ["The :mod:`array` module", "import os\nos.path.", "Return the", "class Foo:\n    def __init__(self",
           "The :mod:`array` module defines", "See also", "Changed in version 3.", "x = [1, 2", "Raises",
           ":func:`len`", "The following", "for i in range(", "Note that", "Example::", "When", "A list is"]
KINDS = {"short": "lookup", "long": "explain"}   # kind -> task label


@dataclass
class Result:
    kind: str
    latency: float
    met: bool
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """moe-server in a subprocess, up until `close`."""

    def __init__(self, model: Path, schedule: str, args: argparse.Namespace) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "hotcold.cli.server", str(model), "--host", "127.0.0.1",
               "--port", self.url.rsplit(":", 1)[1], "--parallel", str(args.parallel), "-c", str(args.ctx),
               "-t", str(args.threads), "--schedule", schedule]
        if args.predictor is not None:
            cmd += ["--predictor", str(args.predictor)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + args.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moe-server exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"moe-server did not answer within {args.start_timeout} s (--start-timeout): "
                                   f"{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.samples}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def complete(client: httpx.Client, url: str, prompt: str, kind: str, tokens: int, slo_ms: float | None,
             timeout: float) -> Result:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "task": KINDS[kind]}
    if slo_ms is not None:
        body["slo_ms"] = slo_ms
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/completions", json=body, timeout=timeout)
        r.raise_for_status()
    except httpx.HTTPError as e:
        return Result(kind, time.perf_counter() - t0, False, f"{type(e).__name__}: {e}")
    lat = time.perf_counter() - t0
    return Result(kind, lat, slo_ms is not None and lat * 1e3 <= slo_ms)


def warm_up(server: Server, args: argparse.Namespace) -> None:
    """One request of each kind, so that no measured request pays for a first call (each server alike)."""
    with httpx.Client() as c:
        for kind in ("short", "long"):
            r = complete(c, server.url, PROMPTS[0], kind, getattr(args, kind), None, args.request_timeout)
            if r.error:
                raise RuntimeError(f"the warm-up request failed: {r.error}")


def long_alone(server: Server, args: argparse.Namespace) -> float:
    """Seconds one long request takes alone on the warm server (the best of 3)."""
    with httpx.Client() as c:
        return min(complete(c, server.url, PROMPTS[1], "long", args.long, None, args.request_timeout).latency
                   for _ in range(3))


def run(server: Server, args: argparse.Namespace, slo: dict[str, float]) -> list[Result]:
    """Every client's rounds, all clients at once; the results of all requests."""
    results: list[Result] = []
    start = threading.Barrier(args.clients)

    def client(i: int) -> None:
        with httpx.Client() as c:
            start.wait()
            for r in range(args.rounds):
                kind = "short" if (i + r) % 2 == 0 else "long"
                prompt = PROMPTS[(i * args.rounds + r) % len(PROMPTS)]
                results.append(complete(c, server.url, prompt, kind, getattr(args, kind), slo[kind],
                                        args.request_timeout))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def share(rs: list[Result]) -> str:
    return f"{100 * sum(r.met for r in rs) / len(rs):.0f}% ({sum(r.met for r in rs)}/{len(rs)})" if rs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: the shipped trained model at Q8_0, "
                    "converted into --work)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the converted model (default: a new temp dir)")
    ap.add_argument("--predictor", type=Path, default=None, help="an expert predictor passed to both servers")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--parallel", type=int, default=2, help="the server's slots (fewer than --clients: a queue)")
    ap.add_argument("--rounds", type=int, default=4, help="requests per client")
    ap.add_argument("--short", type=int, default=8, help="tokens of a short request")
    ap.add_argument("--long", type=int, default=64, help="tokens of a long request")
    ap.add_argument("--tight", type=float, default=1.5, help="short objective: this many times a long request alone")
    ap.add_argument("--loose", type=float, default=8.0, help="long objective: this many times a long request alone")
    ap.add_argument("--short-slo-ms", type=float, default=None, help="the short objective in ms (instead of --tight)")
    ap.add_argument("--long-slo-ms", type=float, default=None, help="the long objective in ms (instead of --loose)")
    ap.add_argument("--reps", type=int, default=1, help="runs of each schedule, alternating")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--ctx", type=int, default=256, help="each slot's context (-c)")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for a server to load (compiles once)")
    args = ap.parse_args()
    if min(args.clients, args.parallel, args.rounds, args.short, args.long, args.reps) < 1:
        ap.error("--clients, --parallel, --rounds, --short, --long and --reps must be at least 1")
    model = args.model
    if model is None:
        work = args.work or Path(tempfile.mkdtemp(prefix="hotcold-emoe-schedule-"))
        work.mkdir(parents=True, exist_ok=True)
        model = work / "trained-q8_0.gguf"
        if not model.is_file():
            convert(TRAINED, model, type="q8_0", cold_type=None, progress=False)
    if not model.is_file():
        ap.error(f"--model {model}: no such file")

    slo: dict[str, float] = {}
    pooled: dict[str, list[Result]] = {"fcfs": [], "task": []}
    reordered = {"fcfs": 0.0, "task": 0.0}
    server_slo = {"fcfs": [0.0, 0.0], "task": [0.0, 0.0]}
    for rep in range(args.reps):
        for schedule in (("fcfs", "task") if rep % 2 == 0 else ("task", "fcfs")):
            server = Server(model, schedule, args)
            try:
                warm_up(server, args)
                if not slo:
                    alone = long_alone(server, args)
                    slo = {"short": args.short_slo_ms or args.tight * alone * 1e3,
                           "long": args.long_slo_ms or args.loose * alone * 1e3}
                    print(f"a long request alone: {alone * 1e3:.0f} ms; objectives: short {slo['short']:.0f} ms, "
                          f"long {slo['long']:.0f} ms", flush=True)
                before = server.metrics()
                pooled[schedule] += run(server, args, slo)
                after = server.metrics()
            finally:
                server.close()
            reordered[schedule] += after["hotcold_schedule_reordered"] - before["hotcold_schedule_reordered"]
            server_slo[schedule][0] += after["hotcold_slo_met"] - before["hotcold_slo_met"]
            server_slo[schedule][1] += after["hotcold_slo_requests"] - before["hotcold_slo_requests"]

    n = args.clients * args.rounds
    print(f"\n{args.clients} concurrent clients x {args.rounds} requests on {args.parallel} slots, {args.threads} "
          f"threads, {model.name}{', predictor ' + args.predictor.name if args.predictor else ''}; {args.reps} "
          f"run(s) each. Mix: half short ({args.short} tokens, task lookup, slo_ms {slo['short']:.0f}), half long "
          f"({args.long} tokens, task explain, slo_ms {slo['long']:.0f}), greedy, ignore_eos\n")
    print("| schedule | requests | SLO attainment | short (tight) | long (loose) | mean latency (s) | p90 latency (s) "
          "| server: met / with slo_ms | picks out of arrival order |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for schedule, rs in pooled.items():
        lat = [r.latency for r in rs]
        errors = [r.error for r in rs if r.error]
        met, total = server_slo[schedule]
        print(f"| {schedule} | {len(rs)} | {share(rs)} | {share([r for r in rs if r.kind == 'short'])} | "
              f"{share([r for r in rs if r.kind == 'long'])} | {statistics.fmean(lat):.2f} | "
              f"{float(np.percentile(lat, 90)):.2f} | {met:.0f} / {total:.0f} | {reordered[schedule]:.0f} |")
        if errors:
            print(f"\n{schedule}: {len(errors)} of {n * args.reps} requests failed, the first: {errors[0]}")


if __name__ == "__main__":
    main()
