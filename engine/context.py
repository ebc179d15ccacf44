"""A context: the state of sequences over a model's weights (after llama.cpp's llama_context and llama2.c's
RunState). It holds the KV cache, whose layout the attention kind chooses, the position and sequence id
of every cached token, the rope tables, the expert store its forward passes consult, and every buffer a
forward pass of up to n_batch tokens writes, allocated once by the model's backend: the decode loop
allocates nothing. Weights stay in the Transformer, shared by all its contexts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from .config import Attention, CacheType, ModelConfig
from .memory import available_memory
from .moe import ExpertStore, Routing

if TYPE_CHECKING:
    from .backend import Backend
    from .model import Transformer


@dataclass(frozen=True)
class KVCache:
    """GQA's cache: keys and values (n_layer, n_ctx, n_head_kv, head_dim) each, stored as type_k / type_v
    (the backend chooses the array type: fp16 bits on the CPU)."""
    k: Any
    v: Any
    type_k: CacheType
    type_v: CacheType


def new_kv_cache(cfg: ModelConfig, n_ctx: int, be: "Backend", type_k: CacheType, type_v: CacheType) -> KVCache:
    """The cache layout the attention kind needs."""
    if cfg.spec.attention is Attention.GQA:
        shape = (cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim)
        return KVCache(be.kv_array(shape, type_k), be.kv_array(shape, type_v), type_k, type_v)
    raise NotImplementedError(cfg.spec.attention)


def slot_views(kv: KVCache, n_seq: int, n_ctx: int) -> list[KVCache]:
    """Each sequence slot's n_ctx cells of a cache of n_seq * n_ctx (llama.cpp's n_seq_max with a cache split
    per sequence): views, so a slot's attention is the one-sequence kernel over its own cells."""
    if n_seq == 1:
        return [kv]
    return [KVCache(kv.k[:, i * n_ctx:(i + 1) * n_ctx], kv.v[:, i * n_ctx:(i + 1) * n_ctx], kv.type_k, kv.type_v)
            for i in range(n_seq)]


def rope_tables(cfg: ModelConfig, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n_ctx, rope_dim / 2) of theta_i = base^(-2i/d) * freq_scale per position
    (ggml_rope_ext with ext_factor 0), computed in float64 a chunk of positions at a time and stored as float32."""
    half = cfg.rope_dim // 2
    inv = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)
    step = inv[None, :] * cfg.rope_freq_scale
    cos, sin = np.empty((n_ctx, half), np.float32), np.empty((n_ctx, half), np.float32)
    for a in range(0, n_ctx, _ROPE_CHUNK):
        b = min(a + _ROPE_CHUNK, n_ctx)
        ang = np.arange(a, b, dtype=np.float64)[:, None] * step
        np.cos(ang, out=cos[a:b])
        np.sin(ang, out=sin[a:b])
    return cos, sin


_ROPE_CHUNK = 4096


def context_bytes(cfg: ModelConfig, n_ctx: int, type_k: CacheType, type_v: CacheType, n_threads: int) -> int:
    """Host bytes a context of n_ctx holds in proportion to n_ctx: the KV cache, rope tables, positions and the
    attention's score rows (checked before any of it is allocated)."""
    item = {CacheType.F16: 2, CacheType.F32: 4}
    cells = cfg.n_layer * n_ctx * cfg.n_head_kv * cfg.head_dim
    return (cells * (item[type_k] + item[type_v]) + n_ctx * (cfg.rope_dim // 2) * 8 + n_ctx * 12
            + n_threads * (n_ctx + cfg.head_dim) * 4)


class FFNScratch:
    """One expert's operands for up to n rows: gathered input, gate/up products, output."""

    def __init__(self, be: "Backend", n: int, n_embd: int, n_ff: int, what: str = "activations") -> None:
        self.xs = be.empty((n, n_embd), np.float32, what)   # one expert's gathered rows
        self.y = be.empty((n, n_embd), np.float32, what)    # one expert's output
        self.g = be.empty(n * n_ff, np.float32, what)       # flat: (n, n_ff) views stay contiguous
        self.u = be.empty(n * n_ff, np.float32, what)
        self.xs_acts = be.new_acts(n, n_embd)                # the gathered rows as a matrix input
        self.g_acts = be.new_acts(n, n_ff)                   # silu(gate) * up as down's input
        self._views: dict[tuple[int, int], tuple[Any, Any]] = {}

    def ff(self, n: int, n_ff: int) -> tuple[Any, Any]:
        """(n, n_ff) views of the gate and up buffers, made once per shape (decode asks for the same one)."""
        v = self._views.get((n, n_ff))
        if v is None:
            v = self._views[(n, n_ff)] = self.g[:n * n_ff].reshape(n, n_ff), self.u[:n * n_ff].reshape(n, n_ff)
        return v


class RunState:
    """Every activation of one forward pass of up to n_batch tokens, on the backend; `*_host` are the host
    sides of what goes up or comes down (the same arrays on the CPU)."""

    def __init__(self, be: "Backend", cfg: ModelConfig, n_batch: int, n_ctx: int, n_ff: int, logit_rows: int) -> None:
        N, E, k = n_batch, max(cfg.n_expert, 1), max(cfg.n_expert_used, 1)
        n_q = cfg.n_head * cfg.head_dim
        self.x = be.empty((N, cfg.n_embd))                 # the residual stream
        self.h = be.empty((N, cfg.n_embd))                 # a sub-layer's normed input
        self.a = be.empty((N, cfg.n_embd))                 # a sub-layer's output
        self.q = be.empty((N, n_q))                        # queries
        self.k = be.empty((N, cfg.n_head_kv * cfg.head_dim))  # new keys and values, before they are stored
        self.v = be.empty((N, cfg.n_head_kv * cfg.head_dim))
        self.o = be.empty((N, n_q))                        # attention output, per head
        self.att = be.attention_scratch(n_ctx, cfg.head_dim)
        self.router = be.empty((N, E))                     # router logits
        self.shg = be.empty((N, 1))                        # shared-expert gate logits
        self.pos = be.empty(N, np.int64)                   # positions of the batch's tokens
        self.pos_host = np.zeros(N, np.int64)              # ... as a batch of several sequences builds them
        self.cell0 = np.zeros(N, np.int64)                 # ... and each row's first cache cell (its slot's)
        self.span = np.zeros(N, np.int64)                  # ... and the cells it attends over
        self.seq = np.zeros(N, np.int64)                   # ... and its sequence
        self.logits = be.empty((logit_rows, cfg.n_vocab))  # the head's output, logit_rows at a time
        self.ffn = FFNScratch(be, N, cfg.n_embd, n_ff)
        self.h_acts = be.new_acts(N, cfg.n_embd)            # h as the input of q/k/v, experts, the head
        self.o_acts = be.new_acts(N, n_q)                   # o as attn_output's input
        self.x_host = be.host_view(self.x)                 # embeddings going up
        self.h_host = be.host_view(self.h)                 # the MoE input coming down (host experts, prefetch)
        self.router_host = be.host_view(self.router)
        self.logits_host = be.host_view(self.logits)
        self.host_ffn = FFNScratch(be.host, N, cfg.n_embd, n_ff) if not be.host_memory else self.ffn
        self.moe_host = be.host_view(self.a)               # the host experts' sum going up
        self.host_h_acts = be.host.new_acts(N, cfg.n_embd) if not be.host_memory else self.h_acts
        self._routing = Routing(np.zeros((N, k), np.int64), np.zeros((N, k), np.float32))
        self._guess = Routing(np.zeros((N, k), np.int64), np.zeros((N, k), np.float32))
        self.route_scratch = np.zeros((3, E), np.float32)
        self.finite = np.zeros((), np.float32)             # where the NaN checks reduce to (host)
        self.device = be.moe_state(N * k)                 # what the backend's MoE step needs of its own

    def routing(self, T: int) -> Routing:
        """The buffers the layer's routing is written to."""
        return Routing(self._routing.experts[:T], self._routing.weights[:T])

    def guess(self, T: int) -> Routing:
        """The buffers a prefetch prediction is written to."""
        return Routing(self._guess.experts[:T], self._guess.weights[:T])


class Context:
    """Sequences' state over `model`: KV cache, positions, buffers, and the expert store in use
    (`experts`, the file's own unless set; contexts may share one). It holds `n_seq` sequences of up to n_ctx
    tokens each, in slots of the KV cache; `tokens`, `n_past` and `seek` are sequence 0's (Model's one)."""

    def __init__(self, model: "Transformer", n_ctx: int, n_batch: int = 512, experts: ExpertStore | None = None,
                 type_k: CacheType = CacheType.F16, type_v: CacheType = CacheType.F16,
                 memory_limit: int | None = None, n_seq: int = 1) -> None:
        """`memory_limit`: host bytes the context may take (a RAM budget); by default the machine's available
        memory. Either is checked before anything is allocated."""
        if n_ctx <= 0:
            raise ValueError(f"n_ctx={n_ctx} must be positive")
        if n_batch <= 0:
            raise ValueError(f"n_batch={n_batch} must be positive")
        if not 1 <= n_seq <= 256:
            raise ValueError(f"n_seq_max={n_seq}: the sequences a context holds must be 1..256 (-np, --parallel)")
        be, cfg = model.backend, model.cfg
        n_batch = min(n_batch, n_ctx * n_seq)               # llama.cpp: a batch never exceeds the context
        if be.host_memory:
            need = context_bytes(cfg, n_ctx * n_seq, type_k, type_v, numba.config.NUMBA_NUM_THREADS)
            have = memory_limit if memory_limit is not None else available_memory()
            if have and need > have:
                where = "the RAM budget" if memory_limit is not None else "the memory available"
                raise ValueError(f"n_ctx={n_ctx}: the KV cache and rope tables would take {need / 2**30:.2f} GiB, "
                                 f"more than the {have / 2**30:.2f} GiB of {where}; lower -c (--ctx-size)")
        self.model, self.cfg = model, cfg
        self.n_ctx, self.n_batch, self.n_seq = n_ctx, n_batch, n_seq
        self.kv = new_kv_cache(cfg, n_ctx * n_seq, be, type_k, type_v)
        self.slot_kv = slot_views(self.kv, n_seq, n_ctx)     # sequence s's cells
        cos, sin = rope_tables(cfg, n_ctx)
        self.rope_cos, self.rope_sin = be.place_array(cos, "rope tables"), be.place_array(sin, "rope tables")
        self.pos = np.arange(n_ctx, dtype=np.int64)         # position of each cell of a slot
        self.seq = np.repeat(np.arange(n_seq, dtype=np.int32), n_ctx)   # sequence id of each cache cell
        self.state = RunState(be, cfg, n_batch, n_ctx, model.n_ff, model.logit_rows(n_batch))
        self.seq_logits = np.zeros((n_seq, cfg.n_vocab), np.float32)   # forward_batch's logits, a row a sequence
        self.experts: ExpertStore = experts if experts is not None else model.experts
        self.slots: list[list[int]] = [[] for _ in range(n_seq)]   # the tokens each sequence's cells hold
        self.tokens: list[int] = self.slots[0]              # sequence 0's, in order
        self.timings: dict[str, float] = {}                 # of the last generation (the API's)
        self.finish_reason: str | None = None
        self.forward_s = 0.0                                # wall seconds in forward passes, all of them

    @property
    def n_past(self) -> int:
        """Cache cells filled."""
        return len(self.tokens)

    def seek(self, n: int, seq: int = 0) -> None:
        """Keep the first n cached tokens of sequence `seq` and forget the rest; 0 starts a new sequence."""
        toks = self.slots[seq]
        if not 0 <= n <= len(toks):
            raise ValueError(f"cannot keep {n} tokens of a context holding {len(toks)}")
        del toks[n:]
        if n == 0:
            self.experts.new_sequence()

    def reset(self) -> None:
        self.seek(0)
