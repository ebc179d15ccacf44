"""The GPU hot tier (engine/cuda/arena.py) behind the expert cache; on Numba's CUDA simulator without a GPU."""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

from hotcold.engine.backend import Backend, CpuBackend
from hotcold.engine.config import Activation
from hotcold.engine.context import FFNScratch
from hotcold.engine.experts.arena import Arena
from hotcold.engine.experts.cache import ExpertCache
from hotcold.engine.experts.expert import Expert
from hotcold.engine.moe import combine, route
from hotcold.engine.options import Options
from hotcold.engine.weights import QMatrix
from hotcold.quant import QType, cuda as qcuda, quantize

pytestmark = pytest.mark.skipif(not qcuda.available(), reason="no CUDA GPU and no simulator")

H, F, E = 32, 64, 4


def _experts(qtype: QType, n_layer: int = 2, seed: int = 0) -> list[list[Expert]]:
    rng = np.random.default_rng(seed)

    def m(rows: int, cols: int) -> QMatrix:
        return QMatrix(quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype), qtype, rows, cols)
    return [[Expert(m(F, H), m(F, H), m(H, F)) for _ in range(E)] for _ in range(n_layer)]


def _glu(be: Backend, e: Expert, x: np.ndarray) -> np.ndarray:
    """The expert's output for host rows x, computed by `be` in its own memory."""
    n = x.shape[0]
    s = FFNScratch(be, n, H, F)
    be.wait(e.ready)
    be.glu(e, be.acts(be.upload(x, s.xs[:n]), be.new_acts(n, H)), s, s.y[:n], Activation.SILU)
    return np.array(be.download(s.y[:n], be.host_view(s.y[:n])))


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.Q8_0])
def test_uploaded_expert_computes_as_on_the_cpu(qtype: QType) -> None:
    from hotcold.engine.cuda.arena import CudaArena
    from hotcold.engine.cuda.backend import CudaBackend
    from hotcold.engine.cuda.memory import Gpu
    hot = _experts(qtype)
    gpu = Gpu()
    arena = CudaArena(2, hot[0][0].nbytes, 2, E, gpu)
    on_gpu = arena.load((0, 1), hot[0][1])
    assert arena.resident(0).tolist() == [False, True, False, False]
    x = np.random.default_rng(1).standard_normal((2, H)).astype(np.float32)
    for rows in (x[:1], x):                                             # GEMV and GEMM paths
        want = _glu(CpuBackend(), hot[0][1], rows)
        got = _glu(CudaBackend(gpu), on_gpu, rows)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert arena.gpu.parts["hot expert slots"] == 2 * hot[0][0].nbytes      # the device allocator's count


def _moe(be: Backend, cache: ExpertCache, x: np.ndarray, router: np.ndarray, layer: int):
    """One MoE step on `be` for host rows x: route, prepare, split, combine; the output on the host."""
    T = x.shape[0]
    routing = route(x @ router.T, 2, True, cache.bias(layer))
    plan = cache.prepare(layer, routing)
    s = SimpleNamespace(device=be.moe_state(T * 2))
    here, host = be.split(plan.groups(routing), s)
    for expert, _, _ in host:                         # only experts streamed from host memory, never a VRAM resident
        assert any(expert is e for e in cache.hot[layer])
    scratch = FFNScratch(be, T, H, F)
    out = be.empty((T, H))
    combine(be, here, be.acts(be.upload(x, be.empty((T, H))), be.new_acts(T, H)), scratch, Activation.SILU, out)
    got = np.array(be.download(out, be.host_view(out)))
    if host:                                          # experts streamed from where they lie: the host computes them
        acc = np.zeros((T, H), np.float32)
        combine(be.host, host, be.host.acts(x, be.host.new_acts(T, H)), FFNScratch(be.host, T, H, F), Activation.SILU,
                acc)
        got += acc
    return got, routing


def test_cache_on_the_gpu_matches_the_ram_cache_and_keeps_its_budget() -> None:
    from hotcold.engine.cuda.arena import CudaArena
    from hotcold.engine.cuda.backend import CudaBackend
    from hotcold.engine.cuda.memory import Gpu
    hot = _experts(QType.Q8_0)
    opt = Options.parse(expert_budget="50%", device="cuda")
    gpu_mem = Gpu()
    gpu, ram = ExpertCache(hot, opt, None, partial(CudaArena, gpu=gpu_mem)), ExpertCache(hot, opt, None, Arena)
    rng = np.random.default_rng(2)
    router = rng.standard_normal((E, H)).astype(np.float32)
    for step in range(4):
        x = rng.standard_normal((1 + step % 2, H)).astype(np.float32)
        layer = step % 2
        got, r1 = _moe(CudaBackend(gpu_mem), gpu, x, router, layer)
        want, r2 = _moe(CpuBackend(), ram, x, router, layer)
        assert np.array_equal(r1.experts, r2.experts)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert gpu.arena.used_bytes <= gpu.budget_bytes == gpu.arena.gpu.parts["hot expert slots"]
        assert np.array_equal(gpu.arena.mask, ram.arena.mask)             # the same experts resident
    assert gpu.report()["hits"] == ram.report()["hits"] and gpu.report()["bytes_moved"] == ram.report()["bytes_moved"]
