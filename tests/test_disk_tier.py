"""The disk tier under a RAM budget: the planner's split, reads by the reader only (never the map), reads that
overlap compute, failing reads, and a budget that holds everything giving the plain engine's logits."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hotcold.engine.experts import disk as disk_mod
from hotcold.engine.experts.disk import ExpertReadError, expert_extents
from hotcold.engine.experts.planner import ExpertShape, RAMBudgetError, plan_memory
from hotcold.engine.experts.rules import Budget
from hotcold.keys import cold_path_for

PROMPT = "The :mod:`array` module defines"
KW = dict(n_ctx=256, n_batch=64)
MiB = 1 << 20


def _load(path: Path, **kw):
    from hotcold.engine.api import Model
    return Model(path, **{**KW, **kw})


def _fresh(model: Path, tmp: Path) -> Path:
    """A copy of the model and its cold copies that no other test has mapped, out of the page cache (the
    kernel keeps pages some live map holds, so the session's file could not be dropped)."""
    out = tmp / model.name
    for src, dst in ((model, out), (cold_path_for(model), cold_path_for(out))):
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return out


def _owner(m) -> dict[int, tuple[int, int]]:
    """Read offset -> (layer, expert): a read starts at its extent's offset, or at that offset's page (O_DIRECT)."""
    out = {}
    for i, layer in enumerate(expert_extents(m.file, m.model.file_experts)):
        for e, x in enumerate(layer):
            for off, _ in x:
                out[off] = out[off - off % 4096] = (i, e)
    return out


def _shared_pages(m) -> int:
    """Bytes of the pages an expert tensor shares with the dense tensors around it (two per tensor)."""
    return 2 * os.sysconf("SC_PAGE_SIZE") * sum("_exps." in t for t in m.file.tensors)


# --- the planner, on hand-made numbers ---------------------------------------------------------------------

HOT = ExpertShape(count=64, slot_bytes=10 * MiB, per_layer=8, total_bytes=640 * MiB, used=2)
COLD = ExpertShape(count=64, slot_bytes=3 * MiB, per_layer=8, total_bytes=192 * MiB, used=2)
FIXED = {"dense": 100 * MiB, "kv_cache": 20 * MiB, "buffers": 10 * MiB}


def test_everything_hot_when_it_fits() -> None:
    p = plan_memory(130 * MiB + 640 * MiB + 24 * MiB, FIXED, HOT, COLD)
    assert p.hot_slots == 64 and p.why == "every expert fits hot"


def test_cold_copies_resident_when_they_fit_beside_one_layer() -> None:
    p = plan_memory(130 * MiB + 192 * MiB + 100 * MiB, FIXED, HOT, COLD)
    assert p.cold_resident and p.cold_bytes == 192 * MiB and p.hot_slots == 10
    assert sum(FIXED.values()) + p.hot_bytes + p.cold_bytes <= p.budget


def test_cold_copies_from_disk_when_they_do_not_fit() -> None:
    p = plan_memory(130 * MiB + 150 * MiB, FIXED, HOT, COLD)
    assert not p.cold_resident and p.cold_bytes == 24 * MiB and p.hot_slots == 12
    assert sum(FIXED.values()) + p.hot_bytes + p.cold_bytes <= p.budget


def test_expert_budget_sets_the_arena_inside_the_budget() -> None:
    p = plan_memory(130 * MiB + 400 * MiB, FIXED, HOT, COLD, Budget(nbytes=100 * MiB))
    assert p.hot_slots == 10 and p.cold_resident
    with pytest.raises(RAMBudgetError, match="does not fit"):
        plan_memory(130 * MiB + 150 * MiB, FIXED, HOT, COLD, Budget(nbytes=200 * MiB))


def test_too_small_names_what_is_held_and_the_least_that_works() -> None:
    with pytest.raises(RAMBudgetError, match=r"dense 100.00 MiB.*give at least --ram-budget 174.00 MiB"):
        plan_memory(170 * MiB, FIXED, HOT, COLD)                    # 2 hot slots and a ring of 8 cold ones
    assert plan_memory(174 * MiB, FIXED, HOT, COLD).hot_slots == 2   # the least it names does work
    with pytest.raises(RAMBudgetError, match=r"give at least --ram-budget 210.00 MiB"):
        plan_memory(200 * MiB, FIXED, HOT, None)                    # no cold copies: a layer's 8 hot slots


# --- the model under a budget -------------------------------------------------------------------------------

@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_a_budget_holding_everything_equals_the_plain_engine_bit_for_bit(trained_q8: Path, direct: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_mod, "DIRECT", direct)
    plain = _load(trained_q8)
    ids = plain.tokenize(PROMPT)
    m = _load(trained_q8, ram_budget="64MiB", miss="hot")
    assert m.plan is not None and m.plan.hot_slots == 32
    assert np.array_equal(m.logits(ids), plain.logits(ids))                     # prefill
    one = _load(trained_q8, ram_budget="64MiB", miss="hot", n_batch=1)          # decode, token by token
    assert np.array_equal(one.logits(ids), _load(trained_q8, n_batch=1).logits(ids))


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_memory_parts_stay_under_the_budget_and_the_reads_leave_no_page_cache(
        trained_q8: Path, tmp_path: Path, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_mod, "DIRECT", direct)
    budget = 10 * MiB
    m = _load(_fresh(trained_q8, tmp_path), ram_budget=budget)
    "".join(m.generate(PROMPT, max_tokens=16, temperature=0))
    mem = m.memory()
    held = mem["dense"] + mem["kv_cache"] + mem["buffers"] + mem["hot_arena"] + mem["cold"]
    assert held <= budget and mem["total"] <= budget, mem
    # what the store allocated is what the parts say: the arena's and the cold buffers' own bytes
    assert mem["hot_arena"] == m.cache.arena.buf.nbytes == m.plan.hot_bytes
    assert mem["page_cache"] <= _shared_pages(m)                      # pages shared with dense tensors at most
    s = m.expert_stats()
    assert s["disk_bytes"] > 0 and s["cold"] > 0 and s["tokens"] > 0
    assert m._readers[0].direct == (direct and m._readers[0].dfd is not None)


def test_o_direct_buffers_hold_whole_pages_with_the_bytes_at_their_offset() -> None:
    assert disk_mod.span(4096 * 3 + 100, 5000, True) == (100, 8192)
    assert disk_mod.span(4096 * 3 + 100, 5000, False) == (0, 5000)
    assert disk_mod.span(8192, 4096, True) == (0, 4096)


def test_expert_bytes_are_read_by_the_reader_only(trained_q8: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = os.preadv

    def counting(fd: int, bufs: list, off: int) -> int:
        reads.append(off)
        return real(fd, bufs, off)

    monkeypatch.setattr(disk_mod.os, "preadv", counting)
    m = _load(_fresh(trained_q8, tmp_path), ram_budget="64MiB", miss="hot")
    reads.clear()
    m.reset_expert_stats()
    "".join(m.generate(PROMPT, max_tokens=8, temperature=0))
    s = m.expert_stats()
    starts = _owner(m)
    per_expert: dict[tuple[int, int], int] = {}
    for off in reads:
        per_expert[starts[off]] = per_expert.get(starts[off], 0) + 1
    assert set(per_expert.values()) == {3}                            # gate, up, down: once per load
    assert len(per_expert) == s["loads"] and s["disk_reads"] == 3 * s["loads"]
    # no expert page entered the page cache: nothing read them through the map
    ranges = [x for layer in expert_extents(m.file, m.model.file_experts) for e in layer for x in e]
    assert m.file.cached_bytes(ranges) <= _shared_pages(m)
    assert s["major_faults"] == 0 or s["major_faults"] < 8


def test_reads_overlap_compute(trained_q8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next layer's read is issued before this layer's compute ends: prefetch queues it first."""
    from hotcold.engine import moe as moe_mod
    events: list[tuple[str, float, object]] = []
    lock = threading.Lock()
    real_read, real_combine = os.preadv, moe_mod.combine

    def reading(fd: int, bufs: list, off: int) -> int:
        with lock:
            events.append(("read", time.perf_counter(), off))
        return real_read(fd, bufs, off)

    def computing(be, groups, *a, **kw):
        with lock:
            events.append(("compute_start", time.perf_counter(), None))
        time.sleep(0.005)                                             # long enough for a reader thread to start
        real_combine(be, groups, *a, **kw)
        with lock:
            events.append(("compute_end", time.perf_counter(), None))

    monkeypatch.setattr(disk_mod.os, "preadv", reading)
    monkeypatch.setattr(moe_mod, "combine", computing)
    m = _load(trained_q8, ram_budget="11MiB", miss="hot", prefetch=1, n_batch=1)
    layer_of = {off: key[0] for off, key in _owner(m).items()}
    events.clear()
    "".join(m.generate(PROMPT, max_tokens=4, temperature=0))
    layer, overlapped = -1, 0
    n_layer = m.model.cfg.n_layer
    for kind, _, off in events:
        if kind == "compute_start":
            layer = (layer + 1) % n_layer
            computing_now = True
        elif kind == "compute_end":
            computing_now = False
        elif kind == "read" and layer >= 0 and computing_now and layer_of.get(off) == (layer + 1) % n_layer:
            overlapped += 1
    assert overlapped > 0, "no read of the next layer's experts ran while this layer computed"


def test_a_failing_read_is_a_clear_error_and_the_model_serves_the_next_call(
        trained_q8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.preadv
    fail = {"left": 1}

    def flaky(fd: int, bufs: list, off: int) -> int:
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(5, "Input/output error")
        return real(fd, bufs, off)

    m = _load(trained_q8, ram_budget="64MiB", miss="hot", prefetch=0)
    want = "".join(_load(trained_q8).generate(PROMPT, max_tokens=8, temperature=0))
    monkeypatch.setattr(disk_mod.os, "preadv", flaky)
    with pytest.raises(ExpertReadError, match="reading expert .* of layer .* failed: .*Input/output error"):
        "".join(m.generate(PROMPT, max_tokens=8, temperature=0))
    assert "".join(m.generate(PROMPT, max_tokens=8, temperature=0)) == want


def test_cold_copies_serve_misses_while_hot_copies_load(trained_q8: Path) -> None:
    plain = _load(trained_q8)
    ids = plain.tokenize(PROMPT)
    m = _load(trained_q8, ram_budget="16MiB", n_batch=1)               # cold copies resident, a few hot slots
    assert m.plan.cold_resident and m.plan.hot_slots < 32 and m.options.miss.value == "adaptive"
    got, want = m.logits(ids), plain.logits(ids)
    s = m.expert_stats()
    assert s["cold"] > 0 and s["loads"] > 0 and s["hit_rate"]["disk"] == 0.0   # no miss waited for a read
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_a_budget_too_small_is_one_clear_error(trained_q8: Path) -> None:
    with pytest.raises(RAMBudgetError, match="give at least --ram-budget"):
        _load(trained_q8, ram_budget="2MiB")


def test_ram_budget_is_for_the_cpu() -> None:
    from hotcold.engine.options import Options
    with pytest.raises(ValueError, match="ram_budget"):
        Options.parse(ram_budget="1GiB", device="cuda")


def test_memory_without_a_budget_counts_the_mapped_experts_as_page_cache(trained_q8: Path) -> None:
    m = _load(trained_q8)
    mem = m.memory()
    assert mem["hot_arena"] == mem["cold"] == 0 and mem["kv_cache"] == m.ctx.kv.k.nbytes + m.ctx.kv.v.nbytes
    experts = sum(e.nbytes for layer in m.model.file_experts for e in layer)
    assert experts - _shared_pages(m) <= mem["page_cache"] <= experts + _shared_pages(m)   # prefaulted at load
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")


def test_moe_run_refuses_a_budget_too_small_in_one_line(trained_q8: Path, capsys: pytest.CaptureFixture) -> None:
    from hotcold.cli.run import main
    assert main([str(trained_q8), "-p", "x", "-c", "256", "--ram-budget", "2MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give at least --ram-budget" in err[0]


def test_moe_run_stats_under_a_budget_show_the_disk_counters(trained_q8: Path, capsys: pytest.CaptureFixture) -> None:
    from hotcold.cli.run import main
    assert main([str(trained_q8), "-p", PROMPT, "-n", "8", "--temp", "0", "-c", "256", "-b", "64",
                 "--ram-budget", "14MiB", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "MiB read from disk" in err and "served by tier: hot" in err and "MiB_moved: MiB of" in err
