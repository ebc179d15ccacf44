"""The GPU hot tier (engine/cuda_arena.py) behind the expert cache; on Numba's CUDA simulator without a GPU."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from hotcold.engine.moe import Expert, moe_forward
from hotcold.engine.residency import ResidencyOptions
from hotcold.engine.store import Arena, ExpertCache
from hotcold.engine.weights import QMatrix
from hotcold.quant import QType, cuda as qcuda, quantize

pytestmark = pytest.mark.skipif(not qcuda.available(), reason="no CUDA GPU and no simulator")

H, F, E = 32, 64, 4


def _experts(qtype: QType, n_layer: int = 2, seed: int = 0) -> list[list[Expert]]:
    rng = np.random.default_rng(seed)

    def m(rows: int, cols: int) -> QMatrix:
        return QMatrix(quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype), qtype, rows, cols)
    return [[Expert(m(F, H), m(F, H), m(H, F)) for _ in range(E)] for _ in range(n_layer)]


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.Q8_0])
def test_uploaded_expert_computes_as_on_the_cpu(qtype: QType) -> None:
    from hotcold.engine.cuda_arena import CudaArena
    hot = _experts(qtype)
    from hotcold.engine.cuda_memory import Gpu
    arena = CudaArena(2, hot[0][0].nbytes, Gpu())
    gpu = arena.load((0, 1), hot[0][1])
    x = np.random.default_rng(1).standard_normal((2, H)).astype(np.float32)
    for rows in (x[:1], x):                                             # GEMV and GEMM paths
        want = hot[0][1].swiglu(rows)
        assert np.allclose(gpu.swiglu(rows), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert arena.gpu.parts["hot expert slots"] == 2 * hot[0][0].nbytes      # the device allocator's count


def test_cache_on_the_gpu_matches_the_ram_cache_and_keeps_its_budget() -> None:
    from hotcold.engine.cuda_arena import CudaArena
    from hotcold.engine.cuda_memory import Gpu
    hot = _experts(QType.Q8_0)
    opt = ResidencyOptions.build("50%", device="cuda")
    gpu, ram = ExpertCache(hot, opt, None, partial(CudaArena, gpu=Gpu())), ExpertCache(hot, opt, None, Arena)
    rng = np.random.default_rng(2)
    router = rng.standard_normal((E, H)).astype(np.float32)
    for step in range(4):
        x = rng.standard_normal((1 + step % 2, H)).astype(np.float32)
        layer = step % 2
        got, r1 = moe_forward(x, router, 2, True, gpu, layer)
        want, r2 = moe_forward(x, router, 2, True, ram, layer)
        assert np.array_equal(r1.experts, r2.experts)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert gpu.arena.used_bytes <= gpu.budget_bytes == gpu.arena.gpu.parts["hot expert slots"]
    assert gpu.report()["hits"] == ram.report()["hits"] and gpu.report()["bytes_moved"] == ram.report()["bytes_moved"]
