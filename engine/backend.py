"""Backends: the kernels one forward pass (engine/model.py) runs on, whatever the device.

Every operation writes into a buffer the caller passes (the context's RunState): none allocates. A
backend also places weights where it computes (`place`, built from the dataclass fields of a Block) and
allocates the context's buffers there. CpuBackend computes in host memory with the Numba kernels of
engine/kernels.py and hotcold.quant; cuda.backend.CudaBackend on a GPU, its stream bound in, with the
same signatures. After vLLM's modular_kernel.py: small stage interfaces, one implementation per device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numba
import numpy as np

from hotcold.quant import QType, dequantize_rows, int8, repack
from hotcold.quant.kernels import MATMUL, MATVEC

from . import kernels
from .config import Activation, CacheType
from .experts.arena import ram_arena
from .experts.cache import ExpertCache
from .experts.expert import Expert, Filling, Ready
from .weights import Layout, QMatrix, interleaved

if TYPE_CHECKING:
    from .context import Context, FFNScratch, RunState
    from .moe import Group
    from .options import Options


class Backend(ABC):
    """The operations of a forward pass. Arrays are the backend's own (host arrays here, device arrays on a
    GPU); `host` is the CPU backend for work done on the host (experts computed where they lie)."""

    host: "CpuBackend"
    host_memory: bool  # the backend's arrays are host arrays: downloads and uploads are no-ops

    # --- memory ---------------------------------------------------------------------------------------

    @abstractmethod
    def empty(self, shape: tuple[int, ...] | int, dtype: Any = np.float32, what: str = "activations") -> Any:
        """A buffer where this backend computes (zero-filled on the host)."""

    @abstractmethod
    def host_view(self, buf: Any) -> np.ndarray:
        """A host buffer shaped like `buf` that downloads and uploads go through (the buffer itself on the host)."""

    @abstractmethod
    def download(self, dev: Any, host: np.ndarray, sync: bool = True) -> np.ndarray:
        """`dev`'s values in `host` (on the host: `dev` itself); without `sync` the copy may still be queued."""

    @abstractmethod
    def upload(self, host: np.ndarray, dev: Any) -> Any:
        """`host`'s values in `dev`, returned (on the host: `host` itself)."""

    @abstractmethod
    def place_array(self, a: np.ndarray, what: str) -> Any:
        """A constant array (rope tables) where this backend computes."""

    def moe_state(self, n_rows: int) -> Any:
        """Buffers of the backend's own for the MoE step of n_rows (token, expert) pairs; None if it needs none."""
        return None

    @abstractmethod
    def new_acts(self, n_rows: int, n: int) -> Any:
        """Room for a matrix input of up to n_rows x n and the quantized forms the integer kernels read."""

    @abstractmethod
    def acts(self, x: Any, a: Any) -> Any:
        """x as a matrix input, through `a` (from new_acts): quantized once, on first use, for every matrix
        that reads it."""

    @abstractmethod
    def attention_scratch(self, n_ctx: int, head_dim: int) -> Any:
        """What `attention` needs beside its operands for a context of n_ctx."""

    @abstractmethod
    def kv_array(self, shape: tuple[int, ...], kind: CacheType) -> Any:
        """A KV cache array holding values of `kind`."""

    @abstractmethod
    def place(self, value: Any) -> Any:
        """A weight (vector, QMatrix, Expert, or a dataclass of them) where this backend computes."""

    def place_fields(self, obj: Any) -> Any:
        """A dataclass (a Block) with every field placed: device blocks are built from the fields themselves."""
        return dataclasses.replace(obj, **{f.name: self.place(getattr(obj, f.name)) for f in dataclasses.fields(obj)})

    # --- kernels --------------------------------------------------------------------------------------

    @abstractmethod
    def embed(self, table: QMatrix, ids: np.ndarray, host: np.ndarray, out: Any) -> None:
        """out (T, n_embd) = rows ids (T,) of the (host) embedding table, dequantized through `host`."""

    @abstractmethod
    def matmul(self, w: Any, x: Any, out: Any) -> None:
        """out (n, rows) = x (n, cols) @ w.T; x is an array, or what `acts` returned (the integer kernels
        take its quantized form)."""

    @abstractmethod
    def rms_norm(self, x: Any, w: Any, eps: float, out: Any) -> None:
        """out = x / sqrt(mean(x^2) + eps) * w over the last axis (ggml_rms_norm then ggml_mul); in place allowed."""

    @abstractmethod
    def rope(self, x: Any, pos: Any, cos: Any, sin: Any, neox: bool) -> None:
        """Rotate x (T, heads, head_dim) in place by the angles of positions pos (T,)."""

    @abstractmethod
    def store_kv(self, kv: Any, layer: int, p0: int, k: Any, v: Any) -> None:
        """Write new keys and values k, v (T, n_head_kv * head_dim) at positions p0.. of a layer's cache."""

    @abstractmethod
    def attention(self, q: Any, kv: Any, layer: int, p0: int, out: Any, scratch: Any) -> None:
        """Causal GQA: q (T, n_head, d) at positions p0.. over a layer's cache filled to p0 + T; out (T, n_head * d)."""

    def attention_seqs(self, q: Any, kv: Any, slot_kv: Sequence[Any], layer: int, segs: Sequence[tuple[int, int, int, int]],
                       c0: np.ndarray, span: np.ndarray, out: Any, scratch: Any) -> None:
        """`attention` for a batch of several sequences: segment (row0, row1, seq, p0) attends over its own slot
        (slot_kv[seq]); c0, span (T,) give each row's first cell in kv and its cell count, for backends that
        take all rows in one call."""
        for r0, r1, seq, p0 in segs:
            self.attention(q[r0:r1], slot_kv[seq], layer, p0, out[r0:r1], scratch)

    @abstractmethod
    def add(self, x: Any, y: Any) -> None:
        """x += y (the residual)."""

    @abstractmethod
    def add_bias(self, x: Any, b: Any) -> None:
        """x[t] += b for each row t."""

    @abstractmethod
    def silu_mul(self, g: Any, u: Any) -> None:
        """g = silu(g) * u."""

    @abstractmethod
    def zero(self, x: Any) -> None: ...

    @abstractmethod
    def gather(self, x: Any, rows: Any, scratch: "FFNScratch") -> Any:
        """The matrix input x[rows] (n, cols) for x from `acts`: x itself for a slice of all its rows (decode,
        quantized once for every expert), else gathered into the scratch's rows."""

    @abstractmethod
    def scatter_add(self, out: Any, rows: Any, w: Any, y: Any) -> None:
        """out[rows] += w[:, None] * y; rows distinct."""

    @abstractmethod
    def sigmoid_gate_add(self, out: Any, g: Any, y: Any) -> None:
        """out += sigmoid(g) * y for gate logits g (T, 1) (qwen2moe's shared expert)."""

    @abstractmethod
    def wait(self, ready: Ready) -> None:
        """Order what is computed next after `ready` (a load in flight)."""

    @abstractmethod
    def split(self, groups: Iterable["Group"], s: "RunState") -> tuple[Sequence["Group"], Sequence["Group"]]:
        """The MoE groups this backend computes, and those the host computes (experts whose weights lie there)."""

    @abstractmethod
    def add_from_host(self, out: Any, acc: np.ndarray, s: "RunState") -> None:
        """out += acc, a host array."""

    def all_finite(self, x: Any, scratch: np.ndarray) -> bool:
        """Whether x holds no NaN or infinity, through `scratch` (a 0-d float32 host array); where that is not
        cheap to know (a device), True: the logits are checked on the host."""
        return True

    def expert_cache(self, hot: Sequence[Sequence[Expert]], opt: "Options", cold: Sequence[Sequence[Expert]] | None,
                     ctx: "Context") -> ExpertCache:
        """The expert cache with its hot arena where this backend computes (RAM here)."""
        return ExpertCache(hot, opt, cold, functools.partial(ram_arena, n_experts=sum(len(layer) for layer in hot)))

    # --- composed -------------------------------------------------------------------------------------

    def glu(self, e: Expert, x: Any, scratch: "FFNScratch", out: Any, act: Activation) -> None:
        """out (n, n_embd) = down(act(gate x) * up x) for the matrix input x (n, n_embd) from `acts`; an expert
        being loaded (Filling) has its slot filled too."""
        if isinstance(e, Filling):
            e.slot.ready.wait()                                              # the plain copy into the slot
        g, u = scratch.ff(out.shape[0], e.gate.rows)
        self.matmul(e.gate, x, g)                                            # (n, n_ff)
        self.matmul(e.up, x, u)                                              # (n, n_ff)
        if act is Activation.SILU:
            self.silu_mul(g, u)                                              # g = silu(g) * u
        self.matmul(e.down, self.acts(g, scratch.g_acts), out)               # (n, n_embd)


_ONE = np.ones((), dtype=np.float32)


def finite_extremes(x: np.ndarray, scratch: np.ndarray) -> bool:
    """Whether the largest and smallest values of x are finite (so all are): two SIMD reductions into the 0-d
    `scratch`, NaN propagating through both, and no allocation (the decode loop makes none)."""
    for reduce in (np.maximum.reduce, np.minimum.reduce):
        reduce(x, axis=None, out=scratch)
        if not math.isfinite(scratch.item()):
            return False
    return True
SMALL_ROWS = 256  # F32 matrices with at most this many rows take the serial kernel (routers)


class CpuBackend(Backend):
    """Host memory and the CPU kernels; results are identical whatever the thread count (hotcold.quant's GEMV
    sums in a fixed order) and, for the integer products (int8.KERNELS), whatever the batch. The float products
    (F16, F32, BF16 and the types without an integer kernel) sum one row differently from several; with
    `batch_invariant` one row takes the several-row kernel too, so a row's result never depends on the batch
    (the batch engine's promise, at some decode speed for those types). With `repack`, placed Q4_K matrices are
    interleaved by eights (quant/repack.py, as llama.cpp's CPU repack): the same bits, faster products."""

    host_memory = True

    def __init__(self, batch_invariant: bool = False, repack: bool = False) -> None:
        self.host = self
        self.batch_invariant = batch_invariant
        self.repack = repack

    def empty(self, shape: tuple[int, ...] | int, dtype: Any = np.float32, what: str = "activations") -> np.ndarray:
        return np.zeros(shape, dtype=dtype)   # calloc: pages are touched only when used

    def host_view(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def download(self, dev: np.ndarray, host: np.ndarray, sync: bool = True) -> np.ndarray:
        return dev   # host views are the arrays themselves

    def upload(self, host: np.ndarray, dev: np.ndarray) -> np.ndarray:
        return host

    def place_array(self, a: np.ndarray, what: str) -> np.ndarray:
        return a

    def new_acts(self, n_rows: int, n: int) -> int8.Acts:
        return int8.Acts(n_rows, n)

    def acts(self, x: np.ndarray, a: int8.Acts) -> int8.Acts:
        return a.bind(x)

    def attention_scratch(self, n_ctx: int, head_dim: int) -> np.ndarray:
        return np.zeros((numba.config.NUMBA_NUM_THREADS, n_ctx + head_dim), dtype=np.float32)

    def kv_array(self, shape: tuple[int, ...], kind: CacheType) -> np.ndarray:
        return np.zeros(shape, dtype=np.uint16 if kind is CacheType.F16 else np.float32)   # fp16 as its bits

    def place(self, value: Any) -> Any:
        if not self.repack:
            return value
        if isinstance(value, QMatrix):
            return interleaved(value)
        if type(value) is Expert:
            return Expert(interleaved(value.gate), interleaved(value.up), interleaved(value.down), value.ready)
        return value

    def embed(self, table: QMatrix, ids: np.ndarray, host: np.ndarray, out: np.ndarray) -> None:
        dequantize_rows(table.raw, table.qtype, ids, out)

    def matmul(self, w: QMatrix, x: Any, out: np.ndarray) -> None:
        if isinstance(x, int8.Acts):
            if w.layout is Layout.X8:
                repack.product(w.kernel_view, x, out)                        # interleaved rows (quant/repack.py)
                return
            if w.qtype in int8.KERNELS:
                int8.product(w.kernel_view, w.qtype, x, out)                 # integer dot products
                return
            x = x.x
        if w.qtype == QType.F32 and w.rows <= SMALL_ROWS:
            kernels.small_matmul(x, w.kernel_view, out)                     # routers, shared-expert gates
        elif x.shape[0] == 1 and not self.batch_invariant:
            MATVEC[w.qtype](w.kernel_view, x[0], out[0])
        elif x.shape[0]:
            MATMUL[w.qtype](w.kernel_view, x, out)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
        n = x.shape[-1]
        kernels.rms_norm(x.reshape(-1, n), w, eps, out.reshape(-1, n))

    def rope(self, x: np.ndarray, pos: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
        kernels.rope(x, pos, cos, sin, neox)

    def store_kv(self, kv: Any, layer: int, p0: int, k: np.ndarray, v: np.ndarray) -> None:
        kc, vc = kv.k[layer], kv.v[layer]
        if kc.dtype == np.uint16 and vc.dtype == np.uint16:
            kernels.store_kv_f16(k, v, kc, vc, p0)
            return
        T = k.shape[0]
        for src, dst in ((k, kc[p0:p0 + T]), (v, vc[p0:p0 + T])):
            if dst.dtype == np.uint16:
                kernels.store_f16(src, dst)
            else:
                dst.reshape(T, -1)[...] = src

    def attention(self, q: np.ndarray, kv: Any, layer: int, p0: int, out: np.ndarray, scratch: np.ndarray) -> None:
        k, v = kv.k[layer], kv.v[layer]
        if k.dtype != v.dtype:
            raise ValueError("the CPU attention needs K and V of one cache type (type_k == type_v)")
        (kernels.attention_f16 if k.dtype == np.uint16 else kernels.attention)(q, k, v, p0, out, scratch)

    def attention_seqs(self, q: np.ndarray, kv: Any, slot_kv: Sequence[Any], layer: int,
                       segs: Sequence[tuple[int, int, int, int]], c0: np.ndarray, span: np.ndarray, out: np.ndarray,
                       scratch: np.ndarray) -> None:
        k, v = kv.k[layer], kv.v[layer]
        if k.dtype != v.dtype:
            raise ValueError("the CPU attention needs K and V of one cache type (type_k == type_v)")
        T = q.shape[0]
        (kernels.attention_rows_f16 if k.dtype == np.uint16 else kernels.attention_rows)(q, k, v, c0[:T], span[:T],
                                                                                         out, scratch)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        np.add(x, y, out=x)

    def add_bias(self, x: np.ndarray, b: np.ndarray) -> None:
        np.add(x, b, out=x)

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> None:
        kernels.silu_mul(g, u)

    def glu(self, e: Expert, x: Any, scratch: "FFNScratch", out: np.ndarray, act: Activation) -> None:
        t = e.gate.qtype
        if act is Activation.SILU and isinstance(x, int8.Acts) and e.gate.layout is Layout.X8 \
                and e.up.layout is Layout.X8:
            g, u = scratch.ff(x.rows, e.gate.rows)
            repack.swiglu_product(e.gate.kernel_view, e.up.kernel_view, x, g, u)   # (n, n_ff)
            self.matmul(e.down, self.acts(g, scratch.g_acts), out)                 # (n, n_embd)
            return
        if act is Activation.SILU and isinstance(x, int8.Acts) and x.rows <= int8.FEW and e.up.qtype == t \
                and t in int8.GLU:
            g, u = scratch.ff(x.rows, e.gate.rows)
            if isinstance(e, Filling) and x.rows == 1 and e.down.qtype in int8.KERNELS:
                # a miss loaded as it is computed: each row goes on to the arena slot once read (one pass)
                dst = e.slot
                int8.swiglu_product(e.gate.kernel_view, e.up.kernel_view, t, x, g, u, dst.gate.raw, dst.up.raw)
                int8.product(e.down.kernel_view, e.down.qtype, self.acts(g, scratch.g_acts), out, dst.down.raw)
                dst.ready.filled()
                return
            if isinstance(e, Filling):
                e.slot.ready.wait()
            int8.swiglu_product(e.gate.kernel_view, e.up.kernel_view, t, x, g, u)   # (n, n_ff) in one pass
            self.matmul(e.down, self.acts(g, scratch.g_acts), out)             # (n, n_embd)
            return
        super().glu(e, x, scratch, out, act)

    def zero(self, x: np.ndarray) -> None:
        x.fill(0)

    def all_finite(self, x: np.ndarray, scratch: np.ndarray) -> bool:
        return finite_extremes(x, scratch)

    def gather(self, x: int8.Acts, rows: Any, scratch: "FFNScratch") -> int8.Acts:
        if isinstance(rows, slice):
            return x
        xs = scratch.xs[:len(rows)]
        np.take(x.x, rows, axis=0, out=xs)
        return scratch.xs_acts.bind(xs)

    def scatter_add(self, out: np.ndarray, rows: Any, w: np.ndarray, y: np.ndarray) -> None:
        if isinstance(rows, slice):
            kernels.scatter_add_block(out[rows], w, y)
        else:
            kernels.scatter_add(out, rows, w, y)

    def sigmoid_gate_add(self, out: np.ndarray, g: np.ndarray, y: np.ndarray) -> None:
        # numpy's float32 ufuncs in the order of out += 1 / (1 + exp(-g)) * y, in place (no temporaries;
        # a 0-d array, unlike a Python float, is not converted per call)
        np.negative(g, out=g)
        np.exp(g, out=g)
        np.add(g, _ONE, out=g)
        np.divide(_ONE, g, out=g)
        np.multiply(g, y, out=y)
        np.add(out, y, out=out)

    def wait(self, ready: Ready) -> None:
        ready.wait()

    def split(self, groups: Iterable["Group"], s: "RunState") -> tuple[Sequence["Group"], Sequence["Group"]]:
        return tuple(groups), ()

    def add_from_host(self, out: np.ndarray, acc: np.ndarray, s: "RunState") -> None:
        np.add(out, acc, out=out)
