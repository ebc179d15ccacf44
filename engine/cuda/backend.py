"""The forward pass's kernels on an NVIDIA GPU: engine/backend.py's operations with the compute stream bound in.

Attention, norms, router, shared experts, dense FFNs and the output head run on the device from their
quantized bytes (uploaded once by `place`, counted against the VRAM budget); the KV cache and the
activations live there (the context's buffers are allocated through this backend at load, sized for
n_batch tokens: the decode loop allocates nothing on the device). The routed experts come from the
expert store, which hands back GPU experts (resident, or cold copies staged for this layer) and host
experts (cold copies computed on the CPU, Fiddler's placement): `split` sends the GPU groups' rows and
weights up at once, and the forward pass (engine/moe.py) queues them before computing the host groups,
so both sides work at the same time.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from hotcold.quant import QType, cuda as qcuda, dequantize_rows, int8

from ..backend import Backend, CpuBackend
from ..config import CacheType
from ..experts.cache import ExpertCache
from ..experts.expert import Expert, Ready
from ..experts.rules import Budget, Placement
from ..weights import QMatrix, QStack
from . import kernels as ck
from .arena import CudaArena, CudaMatrix, Uploaded
from .calibrate import calibrate
from .memory import Gpu

if TYPE_CHECKING:
    from ..context import Context, RunState
    from ..moe import Group
    from ..options import Options

DENSE = "dense weights"


class CudaActs:
    """A matrix input on the device and, made on first use, its Q8_0 / Q8_K round trips: what the CPU's integer
    kernels compute with, so that matrices of those types read the same values on both devices."""

    def __init__(self, gpu: Gpu, n_rows: int, n: int) -> None:
        self.rt = {QType.Q8_0: gpu.empty((n_rows, n), np.float32, "activations")}
        if n % 256 == 0:
            self.rt[QType.Q8_K] = gpu.empty((n_rows, n), np.float32, "activations")
        self.x: Any = None
        self.made: set[QType] = set()

    def bind(self, x: Any) -> "CudaActs":
        self.x = x
        self.made.clear()
        return self

    def input_for(self, qtype: QType, stream: Any) -> Any:
        """The values a matrix of `qtype` reads."""
        kernel = int8.KERNELS.get(qtype)
        if kernel is None:
            return self.x
        fmt = kernel[0]
        out = self.rt[fmt][:self.x.shape[0]]
        if fmt not in self.made:
            ck.q8_roundtrip(self.x, out, 256 if fmt == QType.Q8_K else 32, stream)
            self.made.add(fmt)
        return out


@dataclass(frozen=True)
class MoEState:
    """The GPU groups' token rows and gate weights, sent up in one copy per layer."""
    rows: Any       # device (n,) int64
    w: Any          # device (n,) float32
    rows_host: np.ndarray
    w_host: np.ndarray


class CudaBackend(Backend):
    host_memory = False

    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu
        self.stream = gpu.compute
        self.host = CpuBackend()

    # --- memory ---------------------------------------------------------------------------------------

    def empty(self, shape: tuple[int, ...] | int, dtype: Any = np.float32, what: str = "activations") -> Any:
        return self.gpu.empty(shape, dtype, what)

    def host_view(self, buf: Any) -> np.ndarray:
        return self.gpu.pinned(buf.shape, buf.dtype)

    def download(self, dev: Any, host: np.ndarray, sync: bool = True) -> np.ndarray:
        dev.copy_to_host(host, stream=self.stream)
        if sync:
            self.stream.synchronize()
        return host

    def upload(self, host: np.ndarray, dev: Any) -> Any:
        dev.copy_to_device(host, stream=self.stream)
        return dev

    def place_array(self, a: np.ndarray, what: str) -> Any:
        return self.gpu.upload_array(a, what)

    def attention_scratch(self, n_ctx: int, head_dim: int) -> Any:
        return None

    def kv_array(self, shape: tuple[int, ...], kind: CacheType) -> Any:
        return self.gpu.empty(shape, np.float32, "KV cache")   # an F16 cache holds fp16 values in float32

    def new_acts(self, n_rows: int, n: int) -> CudaActs:
        return CudaActs(self.gpu, n_rows, n)

    def acts(self, x: Any, a: CudaActs) -> CudaActs:
        return a.bind(x)

    def moe_state(self, n_rows: int) -> MoEState:
        return MoEState(self.gpu.empty(n_rows, np.int64, "activations"), self.gpu.empty(n_rows, np.float32, "activations"),
                        self.gpu.pinned(n_rows, np.int64), self.gpu.pinned(n_rows, np.float32))

    def place(self, value: Any) -> Any:
        """Dense weights go up once (routed experts, QStack, stay where the expert store reads them)."""
        if value is None or isinstance(value, QStack):
            return value
        if isinstance(value, np.ndarray):
            return self.gpu.upload_array(value.astype(np.float32), DENSE)
        if isinstance(value, QMatrix):
            return CudaMatrix.view(self.gpu.upload_array(value.raw.reshape(-1), DENSE), value)
        if isinstance(value, Expert):
            return Expert(self.place(value.gate), self.place(value.up), self.place(value.down))
        raise TypeError(f"cannot place {type(value).__name__} on the GPU")

    # --- kernels --------------------------------------------------------------------------------------

    def embed(self, table: QMatrix, ids: np.ndarray, host: np.ndarray, out: Any) -> None:
        dequantize_rows(table.raw, table.qtype, ids, host)
        out.copy_to_device(host, stream=self.stream)

    def matmul(self, w: CudaMatrix, x: Any, out: Any) -> None:
        if isinstance(x, CudaActs):
            x = x.input_for(w.qtype, self.stream)
        if x.shape[0] == 1:
            qcuda.matvec(w.dev, w.qtype, x[0], out[0], self.stream)
        else:
            qcuda.matmul(w.dev, w.qtype, x, out, self.stream)

    def rms_norm(self, x: Any, w: Any, eps: float, out: Any) -> None:
        n = x.shape[len(x.shape) - 1]   # the simulator's shapes take no negative index
        ck.rms_norm(x.reshape(x.size // n, n), w, eps, out.reshape(out.size // n, n), self.stream)

    def rope(self, x: Any, pos: Any, cos: Any, sin: Any, neox: bool) -> None:
        ck.rope(x, pos, cos, sin, neox, self.stream)

    def store_kv(self, kv: Any, layer: int, p0: int, k: Any, v: Any) -> None:
        T = k.shape[0]
        ck.store_kv(k, kv.k[layer, p0:p0 + T], kv.type_k is CacheType.F16, self.stream)
        ck.store_kv(v, kv.v[layer, p0:p0 + T], kv.type_v is CacheType.F16, self.stream)

    def attention(self, q: Any, kv: Any, layer: int, p0: int, out: Any, scratch: Any) -> None:
        ck.attention(q, kv.k[layer], kv.v[layer], p0, out, kv.type_k is CacheType.F16, self.stream)

    def add(self, x: Any, y: Any) -> None:
        ck.add(x, y, self.stream)

    def add_bias(self, x: Any, b: Any) -> None:
        ck.add_bias(x, b, self.stream)

    def silu_mul(self, g: Any, u: Any) -> None:
        ck.silu_mul(g, u, self.stream)

    def zero(self, x: Any) -> None:
        ck.zero(x, self.stream)

    def gather(self, x: CudaActs, rows: Any, scratch: Any) -> CudaActs:
        if x.x.shape[0] == 1:                                                # decode: the one row as is
            return x
        xs = scratch.xs[:rows.shape[0]]
        ck.gather(x.x, rows, xs, self.stream)
        return scratch.xs_acts.bind(xs)

    def scatter_add(self, out: Any, rows: Any, w: Any, y: Any) -> None:
        ck.scatter_add(out, rows, w, y, self.stream)

    def sigmoid_gate_add(self, out: Any, g: Any, y: Any) -> None:
        ck.sigmoid_gate_add(out, g, y, self.stream)

    def wait(self, ready: Ready) -> None:
        if isinstance(ready, Uploaded):
            ready.event.wait(self.stream)                                    # the stream waits, not the host
        else:
            ready.wait()

    def split(self, groups: Iterable["Group"], s: "RunState") -> tuple[Sequence["Group"], Sequence["Group"]]:
        """GPU groups with their rows and weights on the device (one copy up for all), and host groups."""
        here, host = [], []
        for g in groups:
            (here if isinstance(g[0].gate, CudaMatrix) else host).append(g)
        m: MoEState = s.device
        off, out = 0, []
        for e, rows, w in here:
            n = w.shape[0]
            m.rows_host[off:off + n] = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            m.w_host[off:off + n] = w
            out.append((e, m.rows[off:off + n], m.w[off:off + n]))
            off += n
        if off:
            m.rows[:off].copy_to_device(m.rows_host[:off], stream=self.stream)
            m.w[:off].copy_to_device(m.w_host[:off], stream=self.stream)
        return out, host

    def add_from_host(self, out: Any, acc: np.ndarray, s: "RunState") -> None:
        T = acc.shape[0]
        s.ffn.y[:T].copy_to_device(acc, stream=self.stream)
        ck.add(out, s.ffn.y[:T], self.stream)

    # --- the expert store -----------------------------------------------------------------------------

    def expert_cache(self, hot: Sequence[Sequence[Expert]], opt: "Options", cold: Sequence[Sequence[Expert]] | None,
                     ctx: "Context") -> ExpertCache:
        """The expert cache with its hot slots in VRAM: under a VRAM budget they take what the dense part, the
        context and the cold staging slots leave; with cold copies and placement AUTO, the miss cost is
        measured here."""
        gpu = self.gpu
        stage_slots = ctx.cfg.n_expert_used if cold and opt.miss_placement != Placement.CPU else 0
        stage_bytes = max((e.nbytes for layer in cold or [] for e in layer), default=0)
        if gpu.left is not None:
            opt = replace(opt, expert_budget=Budget(nbytes=max(gpu.left - stage_slots * stage_bytes, 0)))
        arena = partial(CudaArena, gpu=gpu, stage_slots=stage_slots, stage_bytes=stage_bytes)
        cache = ExpertCache(hot, opt, cold, arena)
        if gpu.budget is not None and cache.arena.n_slots == 0 and any(hot):
            warnings.warn(f"the VRAM budget leaves no room for hot experts (it holds {gpu.used / 2**20:.2f} MiB of "
                          "dense weights, KV cache and buffers): every expert runs on the CPU; raise vram_budget "
                          "(--vram-budget) or lower n_ctx / n_batch", stacklevel=3)
        if cold and opt.miss_placement == Placement.AUTO:
            cache.miss_cost = calibrate(self, cache.arena, next(layer for layer in cold if layer)[0], ctx.state)
        return cache
