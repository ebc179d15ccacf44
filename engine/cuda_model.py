"""The forward pass with the dense layers, the KV cache and the activations on the GPU.

Attention, norms, router, shared experts, dense FFNs and the output head run on the device from their
quantized bytes (uploaded once, counted against the VRAM budget); the routed experts come from the
expert store, which hands back GPU experts (resident, or cold copies staged for this layer) and host
experts (cold copies computed on the CPU, Fiddler's placement). Per MoE layer the router logits and the
normed hidden state come down once (the store decides on the host); GPU experts are queued first, the
CPU experts run while the GPU works and their sum goes up once, then prefetch queues the uploads for
later layers, which overlap the next layers' compute. Every buffer is allocated here at load, sized for
n_batch tokens: the decode loop allocates nothing on the device.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import numpy as np

from . import cuda_kernels as ck
from .config import QKNorm, RopeStyle
from .cuda_arena import CudaArena, CudaExpert, CudaMatrix
from .cuda_memory import Gpu
from .gguf_file import GGUFFile
from .model import Block, Transformer
from .moe import Expert, route
from .residency import Budget, MissCost, Placement, ResidencyOptions
from .store import ExpertCache
from .weights import QMatrix
from hotcold.quant import QType

DENSE = "dense weights"


@dataclass(frozen=True)
class DeviceBlock:
    """A Block's dense tensors on the GPU, named as in the GGUF (model.Block)."""
    attn_norm: Any
    attn_q: CudaMatrix
    attn_k: CudaMatrix
    attn_v: CudaMatrix
    attn_output: CudaMatrix
    attn_q_bias: Any
    attn_k_bias: Any
    attn_v_bias: Any
    attn_q_norm: Any
    attn_k_norm: Any
    ffn_norm: Any
    ffn: CudaExpert | None
    ffn_gate_inp: CudaMatrix | None        # router, F32 (n_expert, n_embd)
    shexp: CudaExpert | None
    ffn_gate_inp_shexp: CudaMatrix | None  # F32 (1, n_embd)


class Scratch:
    """Device and page-locked host buffers for up to n_batch tokens."""

    def __init__(self, gpu: Gpu, n_batch: int, n_embd: int, n_q: int, n_ff: int, n_expert: int, k: int,
                 n_vocab: int, logit_rows: int) -> None:
        f32 = np.float32
        N = n_batch
        self.x = gpu.empty((N, n_embd), f32, "activations")      # the residual stream
        self.h = gpu.empty((N, n_embd), f32, "activations")      # normed input of a sub-layer
        self.a = gpu.empty((N, n_embd), f32, "activations")      # a sub-layer's output
        self.q = gpu.empty((N, n_q), f32, "activations")
        self.o = gpu.empty((N, n_q), f32, "activations")          # attention output, per head
        self.xs = gpu.empty((N, n_embd), f32, "activations")     # one expert's gathered rows
        self.y = gpu.empty((N, n_embd), f32, "activations")      # one expert's output
        self.g = gpu.empty(N * n_ff, f32, "activations")         # flat: (n, n_ff) views stay contiguous
        self.u = gpu.empty(N * n_ff, f32, "activations")
        self.router = gpu.empty((N, max(n_expert, 1)), f32, "activations")
        self.shg = gpu.empty((N, 1), f32, "activations")
        self.rows = gpu.empty(N * max(k, 1), np.int64, "activations")
        self.w = gpu.empty(N * max(k, 1), f32, "activations")
        self.pos = gpu.empty(N, np.int64, "activations")
        self.logits = gpu.empty((logit_rows, n_vocab), f32, "activations")
        self.x_host = gpu.pinned((N, n_embd), f32)                # embeddings going up
        self.h_host = gpu.pinned((N, n_embd), f32)                # normed state coming down
        self.cpu_out = gpu.pinned((N, n_embd), f32)               # the CPU experts' sum going up
        self.router_host = gpu.pinned((N, max(n_expert, 1)), f32)
        self.rows_host = gpu.pinned(N * max(k, 1), np.int64)
        self.w_host = gpu.pinned(N * max(k, 1), f32)
        self.pos_host = gpu.pinned(N, np.int64)
        self.logits_host = gpu.pinned((logit_rows, n_vocab), f32)

    def ff(self, buf: Any, n: int, n_ff: int) -> Any:
        return buf[:n * n_ff].reshape(n, n_ff)


def _matrix(gpu: Gpu, m: QMatrix) -> CudaMatrix:
    return CudaMatrix.view(gpu.upload_array(m.raw.reshape(-1), DENSE), m)


def _f32_matrix(gpu: Gpu, a: np.ndarray) -> CudaMatrix:
    a = np.ascontiguousarray(a, dtype=np.float32)                             # (rows, cols)
    return _matrix(gpu, QMatrix(a.view(np.uint8), QType.F32, a.shape[0], a.shape[1]))


def _expert(gpu: Gpu, e: Expert | None) -> CudaExpert | None:
    return None if e is None else CudaExpert(_matrix(gpu, e.gate), _matrix(gpu, e.up), _matrix(gpu, e.down))


def _vector(gpu: Gpu, v: np.ndarray | None) -> Any:
    return None if v is None else gpu.upload_array(v.astype(np.float32), DENSE)


def upload_block(gpu: Gpu, b: Block) -> DeviceBlock:
    return DeviceBlock(
        attn_norm=_vector(gpu, b.attn_norm), attn_q=_matrix(gpu, b.attn_q), attn_k=_matrix(gpu, b.attn_k),
        attn_v=_matrix(gpu, b.attn_v), attn_output=_matrix(gpu, b.attn_output),
        attn_q_bias=_vector(gpu, b.attn_q_bias), attn_k_bias=_vector(gpu, b.attn_k_bias),
        attn_v_bias=_vector(gpu, b.attn_v_bias), attn_q_norm=_vector(gpu, b.attn_q_norm),
        attn_k_norm=_vector(gpu, b.attn_k_norm), ffn_norm=_vector(gpu, b.ffn_norm), ffn=_expert(gpu, b.ffn),
        ffn_gate_inp=None if b.ffn_gate_inp is None else _f32_matrix(gpu, b.ffn_gate_inp),
        shexp=_expert(gpu, b.shexp),
        ffn_gate_inp_shexp=None if b.ffn_gate_inp_shexp is None else _f32_matrix(gpu, b.ffn_gate_inp_shexp[None, :]))


class CudaTransformer(Transformer):
    """Transformer whose forward() runs on the GPU; the expert store decides where routed experts run."""

    logit_rows = 64  # head outputs per pass: all-logits prefill comes down in chunks (vocabularies are large)

    def __init__(self, f: GGUFFile, n_ctx: int, gpu: Gpu, n_batch: int) -> None:
        self.gpu, self.n_batch = gpu, n_batch
        super().__init__(f, n_ctx)
        cfg = self.cfg
        self.dev = [upload_block(gpu, b) for b in self.blocks]
        self.d_output_norm = _vector(gpu, self.output_norm)
        self.d_output = _matrix(gpu, self.output)
        self.d_cos = gpu.upload_array(self.rope_cos, "rope tables")
        self.d_sin = gpu.upload_array(self.rope_sin, "rope tables")
        n_ff = max([b.ffn_gate_exps.rows for b in self.blocks if b.ffn_gate_exps is not None]
                   + [e.gate.rows for b in self.blocks for e in (b.ffn, b.shexp) if e is not None] + [1])
        self.s = Scratch(gpu, n_batch, cfg.n_embd, cfg.n_head * cfg.head_dim, n_ff, cfg.n_expert,
                         cfg.n_expert_used, cfg.n_vocab, min(self.logit_rows, n_batch))

    def _new_kv_cache(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        return self.gpu.empty(shape, np.float32, "KV cache"), self.gpu.empty(shape, np.float32, "KV cache")

    def _attention_dev(self, d: DeviceBlock, il: int, h: Any, T: int, p0: int) -> None:
        """s.a[:T] = attention of h (T, n_embd); appends the new keys and values to the device cache."""
        cfg, s, st = self.cfg, self.s, self.gpu.compute
        nh, nkv, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        q = s.q[:T]                                                             # (T, nh*hd)
        k = self.k_cache[il, p0:p0 + T].reshape(T, nkv * hd)                         # straight into the cache
        v = self.v_cache[il, p0:p0 + T].reshape(T, nkv * hd)
        d.attn_q.product(h, q, st)
        d.attn_k.product(h, k, st)
        d.attn_v.product(h, v, st)
        if d.attn_q_bias is not None:
            ck.add_bias(q, d.attn_q_bias, st)
            ck.add_bias(k, d.attn_k_bias, st)
            ck.add_bias(v, d.attn_v_bias, st)
        if cfg.spec.qk_norm == QKNorm.FULL:                                     # olmoe: over the projection
            ck.rms_norm(q, d.attn_q_norm, cfg.rms_eps, q, st)
            ck.rms_norm(k, d.attn_k_norm, cfg.rms_eps, k, st)
        if cfg.spec.qk_norm == QKNorm.PER_HEAD:                                 # qwen3: per head
            ck.rms_norm(q.reshape(T * nh, hd), d.attn_q_norm, cfg.rms_eps, q.reshape(T * nh, hd), st)
            ck.rms_norm(k.reshape(T * nkv, hd), d.attn_k_norm, cfg.rms_eps, k.reshape(T * nkv, hd), st)
        neox = cfg.spec.rope == RopeStyle.NEOX
        ck.rope(q.reshape(T, nh, hd), s.pos[:T], self.d_cos, self.d_sin, neox, st)
        ck.rope(k.reshape(T, nkv, hd), s.pos[:T], self.d_cos, self.d_sin, neox, st)
        ck.attention(q.reshape(T, nh, hd), self.k_cache[il], self.v_cache[il], p0, s.o[:T], st)   # (T, nh*hd)
        d.attn_output.product(s.o[:T], s.a[:T], st)                              # (T, n_embd)

    def _moe_dev(self, il: int, d: DeviceBlock, h: Any, T: int) -> None:
        """s.a[:T] = the routed experts' weighted sum for h (T, n_embd): route -> prepare -> compute -> combine."""
        cfg, s, st, store = self.cfg, self.s, self.gpu.compute, self.experts
        d.ffn_gate_inp.product(h, s.router[:T], st)                              # (T, E) router logits
        s.router[:T].copy_to_host(s.router_host[:T], stream=st)
        h.copy_to_host(s.h_host[:T], stream=st)
        st.synchronize()
        hh = s.h_host[:T]                                                        # (T, n_embd) on the host
        routing = route(s.router_host[:T], cfg.n_expert_used, cfg.spec.norm_topk, store.bias(il))  # (T, k)
        plan = store.prepare(il, routing)                                        # GPU and host experts
        out = s.a[:T]
        ck.zero(out, st)
        groups = list(plan.groups(routing))
        on_gpu = [(e, np.arange(T)[t], w) for e, t, w in groups if isinstance(e, CudaExpert)]
        if on_gpu:                                                               # all rows and weights up at once
            rows = np.concatenate([r for _, r, _ in on_gpu])
            n = len(rows)
            s.rows_host[:n], s.w_host[:n] = rows, np.concatenate([w for _, _, w in on_gpu])
            s.rows[:n].copy_to_device(s.rows_host[:n], stream=st)
            s.w[:n].copy_to_device(s.w_host[:n], stream=st)
        off = 0
        for e, rows, w in on_gpu:                                                # queued, not waited for
            n = len(rows)
            xs = h if T == 1 else s.xs[:n]                                        # decode: the one row as is
            if T > 1:
                ck.gather(h, s.rows[off:off + n], xs, st)                        # (n, n_embd)
            e.run(xs, s.ff(s.g, n, e.gate.rows), s.ff(s.u, n, e.gate.rows), s.y[:n], st)
            ck.scatter_add(out, s.rows[off:off + n], s.w[off:off + n], s.y[:n], st)
            off += n
        on_cpu = [g for g in groups if not isinstance(g[0], CudaExpert)]
        if on_cpu:                                                               # Fiddler: CPU while the GPU works
            acc = s.cpu_out[:T]
            acc[:] = 0
            for e, tokens, w in on_cpu:
                acc[tokens] += w[:, None] * e.swiglu(hh[tokens])                 # (n, n_embd)
            s.y[:T].copy_to_device(acc, stream=st)
            ck.add(out, s.y[:T], st)
        self._prefetch(il, hh)                                                   # uploads overlap the next layer

    def _ffn_dev(self, il: int, d: DeviceBlock, h: Any, T: int) -> None:
        """s.a[:T] = the FFN of h: dense SwiGLU, or routed experts plus the gated shared expert."""
        s, st = self.s, self.gpu.compute
        if d.ffn is not None:
            n_ff = d.ffn.gate.rows
            d.ffn.run(h, s.ff(s.g, T, n_ff), s.ff(s.u, T, n_ff), s.a[:T], st)    # dense SwiGLU
            return
        self._moe_dev(il, d, h, T)
        if d.shexp is not None:                                                  # shared expert, sigmoid-gated
            n_ff = d.shexp.gate.rows
            d.shexp.run(h, s.ff(s.g, T, n_ff), s.ff(s.u, T, n_ff), s.y[:T], st)
            d.ffn_gate_inp_shexp.product(h, s.shg[:T], st)                       # (T, 1) gate logit
            ck.sigmoid_gate_add(s.a[:T], s.shg[:T], s.y[:T], st)

    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """As Transformer.forward, on the GPU; at most n_batch tokens per call."""
        cfg, s, st = self.cfg, self.s, self.gpu.compute
        T, p0 = len(tokens), self.n_past
        if p0 + T > self.n_ctx:
            raise ValueError(f"context full: {p0} + {T} tokens exceed n_ctx={self.n_ctx}")
        if not 0 < T <= self.n_batch:
            raise ValueError(f"{T} tokens in one forward(); the GPU buffers hold 1..n_batch={self.n_batch}")
        s.pos_host[:T] = np.arange(p0, p0 + T)
        s.pos[:T].copy_to_device(s.pos_host[:T], stream=st)
        s.x_host[:T] = self.w.rows(self.token_embd, np.asarray(tokens, dtype=np.int64))
        x, h = s.x[:T], s.h[:T]
        x.copy_to_device(s.x_host[:T], stream=st)                                # (T, n_embd) embeddings
        for il, d in enumerate(self.dev):
            ck.rms_norm(x, d.attn_norm, cfg.rms_eps, h, st)                      # pre-attention norm
            self._attention_dev(d, il, h, T, p0)
            ck.add(x, s.a[:T], st)                                               # residual
            ck.rms_norm(x, d.ffn_norm, cfg.rms_eps, h, st)                       # pre-FFN norm
            self._ffn_dev(il, d, h, T)
            ck.add(x, s.a[:T], st)                                               # residual
        self.n_past += T
        n = T if all_logits else 1
        ck.rms_norm(x[T - n:T], self.d_output_norm, cfg.rms_eps, s.h[:n], st)   # final norm
        out = np.empty((n, cfg.n_vocab), dtype=np.float32)
        for i in range(0, n, s.logits.shape[0]):
            m = min(s.logits.shape[0], n - i)
            self.d_output.product(s.h[i:i + m], s.logits[:m], st)                # (m, n_vocab)
            s.logits[:m].copy_to_host(s.logits_host[:m], stream=st)
            st.synchronize()
            out[i:i + m] = s.logits_host[:m]
        return out

    def calibrate(self, arena: CudaArena, cold: Expert, n: int = 8, reps: int = 2) -> MissCost:
        """Time one cold miss both ways, for 1 and n tokens: upload + GPU compute, and CPU compute."""
        s, st = self.s, self.gpu.compute
        n = max(1, min(n, self.n_batch))
        x = np.random.default_rng(0).standard_normal((n, self.cfg.n_embd)).astype(np.float32)
        s.xs[:n].copy_to_device(x, stream=st)
        n_ff = cold.gate.rows

        def best(f: Any) -> float:
            times = []
            for _ in range(reps + 1):  # the first run compiles
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return min(times[1:])

        def gpu(m: int) -> None:
            arena.begin()
            e = arena.stage(cold)
            e.run(s.xs[:m], s.ff(s.g, m, n_ff), s.ff(s.u, m, n_ff), s.y[:m], st)
            st.synchronize()

        cost = MissCost(n, (best(lambda: gpu(1)), best(lambda: gpu(n))),
                        (best(lambda: cold.swiglu(x[:1])), best(lambda: cold.swiglu(x))))
        arena.begin()
        return cost


def device_cache(model: CudaTransformer, hot: Sequence[Sequence[Expert]], opt: ResidencyOptions,
                 cold: Sequence[Sequence[Expert]] | None) -> ExpertCache:
    """The expert cache with its hot slots in VRAM: under a VRAM budget they take what the dense part and
    the cold staging slots leave; with cold copies and placement AUTO, the miss cost is measured here."""
    gpu = model.gpu
    stage_slots = model.cfg.n_expert_used if cold and opt.miss_placement != Placement.CPU else 0
    stage_bytes = max((e.nbytes for layer in cold or [] for e in layer), default=0)
    if gpu.left is not None:
        opt = replace(opt, expert_budget=Budget(nbytes=max(gpu.left - stage_slots * stage_bytes, 0)))
    arena = partial(CudaArena, gpu=gpu, stage_slots=stage_slots, stage_bytes=stage_bytes)
    cache = ExpertCache(hot, opt, cold, arena)
    if gpu.budget is not None and cache.arena.n_slots == 0 and any(hot):
        warnings.warn(f"the VRAM budget leaves no room for hot experts (it holds {gpu.used / 2**20:.2f} MiB of dense "
                      "weights, KV cache and buffers): every expert runs on the CPU; raise vram_budget "
                      "(--vram-budget) or lower n_ctx / n_batch", stacklevel=3)
    if cold and opt.miss_placement == Placement.AUTO:
        cache.miss_cost = model.calibrate(cache.arena, next(layer for layer in cold if layer)[0])
    return cache
