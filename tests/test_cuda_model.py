"""The forward pass on the GPU backend (engine/cuda/backend.py) against the CPU engine, on micro models of every
architecture.

Without a GPU these run on Numba's CUDA simulator (conftest sets NUMBA_ENABLE_CUDASIM=1), which runs each
GPU thread as a Python thread: hence micro models (tests/micro_models.py) and a few tokens.
"""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

import micro_models
from hotcold.engine.context import Context
from hotcold.engine.experts.cache import ExpertCache
from hotcold.engine.experts.cold import cold_experts
from hotcold.engine.experts.rules import MissCost
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.model import Transformer
from hotcold.engine.options import Options
from hotcold.quant import QType, cuda as qcuda

pytestmark = pytest.mark.skipif(not qcuda.available(), reason="no CUDA GPU and no simulator")

PROMPT, NEXT = np.array([3, 17]), np.array([29])


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _gpu_model(path: Path, budget: int | None = None, n_batch: int = 4):
    """The model on the GPU backend and a context of 16 tokens, and the GPU's account."""
    from hotcold.engine.cuda.backend import CudaBackend
    from hotcold.engine.cuda.memory import Gpu
    gpu = Gpu(budget)
    model = Transformer.load(GGUFFile(path), CudaBackend(gpu))
    return model, model.context(16, n_batch), gpu


def _cpu_model(path: Path) -> tuple[Transformer, Context]:
    model = Transformer.load(GGUFFile(path))
    return model, model.context(16, 4)


@pytest.mark.parametrize("variant", list(micro_models.VARIANTS))
def test_gpu_logits_match_the_cpu_engine(tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Transformer, "logit_rows", lambda self, n_batch: 1)   # all-logits prefill comes down row by row
    path = micro_models.write(variant, tmp_path / f"{variant}.gguf")
    cpu, cctx = _cpu_model(path)
    dev, dctx, gpu = _gpu_model(path)
    _close(dev.forward(PROMPT, dctx, all_logits=True), cpu.forward(PROMPT, cctx, all_logits=True))   # prefill
    _close(dev.forward(NEXT, dctx), cpu.forward(NEXT, cctx))                                          # decode
    assert dctx.n_past == cctx.n_past == 3


def _hot_cold(tmp_path: Path) -> tuple[Path, list]:
    """The mixtral micro model at Q8_0 and the same experts at Q4_0 (same seed: same float weights)."""
    hot = micro_models.write("mixtral", tmp_path / "hot.gguf", QType.Q8_0)
    cold_file = GGUFFile(micro_models.write("mixtral", tmp_path / "cold.gguf", QType.Q4_0))
    return hot, cold_experts(cold_file, micro_models.L)


def _run(model: Transformer, ctx: Context) -> np.ndarray:
    return np.concatenate([model.forward(PROMPT, ctx, all_logits=True), model.forward(NEXT, ctx)])


def _device_cache(model: Transformer, ctx: Context, opt: Options, cold: list | None) -> ExpertCache:
    ctx.experts = cache = model.backend.expert_cache(model.file_experts, opt, cold, ctx)
    return cache


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_cold_misses_on_either_side_match_the_ram_cache(tmp_path: Path, placement: str) -> None:
    path, cold = _hot_cold(tmp_path)
    opt = Options.parse(expert_budget="50%", miss="cold", prefetch=1, device="cuda", miss_placement=placement)
    cpu, cctx = _cpu_model(path)
    cctx.experts = ram = ExpertCache(cpu.file_experts, opt, cold)
    dev, dctx, _ = _gpu_model(path)
    vram = _device_cache(dev, dctx, opt, cold)
    _close(_run(dev, dctx), _run(cpu, cctx))
    got, want = vram.report(), ram.report()
    for k in ("hits", "misses", "cold", "loads", "prefetched", "bytes_moved"):
        assert got[k] == want[k], k
    assert want["cold"] > 0 and want["prefetched"] > 0
    assert (got["cold_uploaded"] == got["cold"]) if placement == "gpu" else got["cold_uploaded"] == 0


def test_auto_placement_follows_the_measured_cost(tmp_path: Path) -> None:
    path, cold = _hot_cold(tmp_path)
    dev, dctx, _ = _gpu_model(path)
    cache = _device_cache(dev, dctx, Options.parse(expert_budget="25%", miss="cold", device="cuda"), cold)
    cost = cache.miss_cost
    assert cost is not None and cost.n > 1 and min(cost.gpu_s + cost.cpu_s) > 0   # measured at load
    cache.miss_cost = MissCost(4, gpu_s=(1e-6, 2e-6), cpu_s=(1e-3, 4e-3))          # the GPU way is cheaper
    dev.forward(PROMPT, dctx)
    uploaded = cache.report()["cold_uploaded"]
    assert uploaded == cache.report()["cold"] > 0
    cache.miss_cost = MissCost(4, gpu_s=(1e-3, 2e-3), cpu_s=(1e-6, 4e-6))          # the CPU way is cheaper
    dev.forward(NEXT, dctx)
    assert cache.report()["cold_uploaded"] == uploaded < cache.report()["cold"]


def test_the_vram_budget_bounds_every_allocation(tmp_path: Path) -> None:
    from hotcold.engine.cuda.memory import VRAMBudgetError
    path, cold = _hot_cold(tmp_path)
    _, _, probe = _gpu_model(path)
    dense = probe.used                                       # dense weights, rope tables, KV cache, buffers
    slot = _cpu_model(path)[0].file_experts[0][0].nbytes
    budget = dense + micro_models.K * max(e.nbytes for layer in cold for e in layer) + 3 * slot + slot // 2
    before = probe.memory_info()
    dev, dctx, gpu = _gpu_model(path, budget)
    cache = _device_cache(dev, dctx, Options.parse(expert_budget="100%", miss="adaptive", prefetch=1, device="cuda",
                                                   miss_placement="gpu"), cold)
    assert cache.arena.n_slots == 3                          # what the dense part and the staging slots leave
    _run(dev, dctx)
    assert gpu.used <= budget and sum(gpu.parts.values()) == gpu.used
    if before is not None:                                   # a real GPU: ask the CUDA allocator too
        assert before[0] - gpu.memory_info()[0] <= budget + probe.used + (2 << 20)
    with pytest.raises(VRAMBudgetError, match="raise vram_budget"):
        _gpu_model(path, dense // 2)
    tight, tctx, _ = _gpu_model(path, dense + slot // 2)
    with pytest.warns(UserWarning, match="no room for hot experts"):
        _device_cache(tight, tctx, Options.parse(expert_budget="100%", device="cuda"), None)


def test_the_api_on_the_gpu_under_a_vram_budget(tmp_path: Path) -> None:
    """Model(device="cuda", vram_budget=...): the hot slots take what the dense part leaves; same logits as
    the CPU Model with an arena of the same size."""
    from hotcold.engine.api import Model
    path = micro_models.write("mixtral", tmp_path / "m.gguf")
    probe = Model(path, n_ctx=16, n_batch=4, device="cuda", expert_budget="0%")
    slot = max(e.nbytes for layer in probe.cache.hot for e in layer)
    budget = probe.gpu.used + 5 * slot + slot // 3
    gpu = Model(path, n_ctx=16, n_batch=4, device="cuda", vram_budget=budget, prefetch=1)
    assert gpu.cache.arena.n_slots == 5 and gpu.gpu.used <= budget
    cpu = Model(path, n_ctx=16, n_batch=4, expert_budget=gpu.cache.budget_bytes, prefetch=1)
    ids = [1, 7, 30, 4, 12]                                  # two forward batches of n_batch=4
    _close(gpu.logits(ids), cpu.logits(ids))
    assert gpu.expert_stats()["loads"] == cpu.expert_stats()["loads"] > 0
    # generation reuses the KV cache's common prefix (ids[:3]) and decodes token by token on the device
    greedy = dict(max_tokens=2, temperature=0, ignore_eos=True)
    assert "".join(gpu.generate(ids[:4], **greedy)) == "".join(cpu.generate(ids[:4], **greedy))


def test_vram_budget_options_are_checked_before_loading(tmp_path: Path) -> None:
    from hotcold.engine.api import Model
    unused = tmp_path / "unused.gguf"
    with pytest.raises(ValueError, match="vram_budget needs device='cuda'"):
        Model(unused, vram_budget="1GiB")
    with pytest.raises(ValueError, match="give a size"):
        Model(unused, device="cuda", vram_budget="25%")
    with pytest.raises(ValueError, match="not both"):
        Model(unused, device="cuda", vram_budget="1GiB", expert_budget="25%")


@pytest.mark.skipif(qcuda.simulated(), reason="needs a real CUDA GPU, not the simulator")
def test_trained_model_on_the_gpu_under_a_vram_budget(trained_q8: Path) -> None:
    """The shipped trained model with a quarter of its experts' bytes in VRAM, misses by gate weight:
    logits against the CPU engine with the same cache, and the CUDA allocator's account of the model."""
    from numba import cuda

    from hotcold.engine.api import Model
    text = "The :mod:`array` module defines an object type which can compactly represent an array of values"
    free0 = cuda.current_context().get_memory_info()[0]
    probe = Model(trained_q8, n_ctx=256, device="cuda", expert_budget="0%")
    dense = probe.gpu.used
    experts = sum(e.nbytes for layer in probe.cache.hot for e in layer)
    del probe
    gc.collect()
    cuda.current_context().deallocations.clear()             # numba frees lazily: flush the probe's memory
    budget = dense + experts // 4
    opts = dict(miss="adaptive", prefetch=1)
    gpu = Model(trained_q8, n_ctx=256, device="cuda", vram_budget=budget, miss_placement="gpu", **opts)
    cpu = Model(trained_q8, n_ctx=256, expert_budget=gpu.cache.budget_bytes, **opts)
    ids = cpu.tokenize(text)
    got, want = gpu.logits(ids), cpu.logits(ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert gpu.expert_stats()["hits"] == cpu.expert_stats()["hits"]
    assert gpu.expert_stats()["cold_uploaded"] > 0
    assert gpu.gpu.used <= budget
    assert free0 - cuda.current_context().get_memory_info()[0] <= budget + (64 << 20)   # + CUDA's own pools
