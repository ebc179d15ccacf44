"""The transformer forward pass on the CPU for every supported architecture (llama.cpp src/models/*.cpp).

Straight lines over the weights, one comment per step (after llama2.c). Attributes are named like
the GGUF tensors; what differs between architectures is data in config.ArchSpec.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .config import ModelConfig, QKNorm, RopeStyle
from .gguf_file import GGUFFile
from .moe import Expert, ExpertStore, Plan, Routing, SelectionBias, moe_forward, route
from .weights import QMatrix, QStack, WeightReader


@dataclass(frozen=True)
class Block:
    attn_norm: np.ndarray
    attn_q: QMatrix
    attn_k: QMatrix
    attn_v: QMatrix
    attn_output: QMatrix
    attn_q_bias: np.ndarray | None
    attn_k_bias: np.ndarray | None
    attn_v_bias: np.ndarray | None
    attn_q_norm: np.ndarray | None
    attn_k_norm: np.ndarray | None
    ffn_norm: np.ndarray
    ffn: Expert | None                 # dense models
    ffn_gate_inp: np.ndarray | None    # router (n_expert, n_embd)
    ffn_gate_exps: QStack | None
    ffn_up_exps: QStack | None
    ffn_down_exps: QStack | None
    shexp: Expert | None               # qwen2moe shared expert
    ffn_gate_inp_shexp: np.ndarray | None


class MmapExperts:
    """The plain expert store: every expert read straight from the memory-mapped file."""

    def __init__(self, blocks: list[Block]) -> None:
        self.experts = [[Expert(b.ffn_gate_exps[e], b.ffn_up_exps[e], b.ffn_down_exps[e])
                         for e in range(b.ffn_gate_exps.count)] if b.ffn_gate_exps is not None else []
                        for b in blocks]

    def bias(self, layer: int) -> SelectionBias | None:
        return None

    def prepare(self, layer: int, routing: Routing) -> Plan:
        return Plan(self.experts[layer], routing.weights)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        pass


def _opt_vector(w: WeightReader, name: str) -> np.ndarray | None:
    return w.vector(name) if w.has(name) else None


def load_blocks(cfg: ModelConfig, w: WeightReader) -> list[Block]:
    blocks = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        moe = cfg.is_moe
        blocks.append(Block(
            attn_norm=w.vector(p + "attn_norm.weight"),
            attn_q=w.matrix(p + "attn_q.weight"), attn_k=w.matrix(p + "attn_k.weight"),
            attn_v=w.matrix(p + "attn_v.weight"), attn_output=w.matrix(p + "attn_output.weight"),
            attn_q_bias=_opt_vector(w, p + "attn_q.bias"), attn_k_bias=_opt_vector(w, p + "attn_k.bias"),
            attn_v_bias=_opt_vector(w, p + "attn_v.bias"),
            attn_q_norm=_opt_vector(w, p + "attn_q_norm.weight"), attn_k_norm=_opt_vector(w, p + "attn_k_norm.weight"),
            ffn_norm=w.vector(p + "ffn_norm.weight"),
            ffn=None if moe else Expert(w.matrix(p + "ffn_gate.weight"), w.matrix(p + "ffn_up.weight"),
                                        w.matrix(p + "ffn_down.weight")),
            ffn_gate_inp=w.dense(p + "ffn_gate_inp.weight") if moe else None,
            ffn_gate_exps=w.stack(p + "ffn_gate_exps.weight") if moe else None,
            ffn_up_exps=w.stack(p + "ffn_up_exps.weight") if moe else None,
            ffn_down_exps=w.stack(p + "ffn_down_exps.weight") if moe else None,
            shexp=Expert(w.matrix(p + "ffn_gate_shexp.weight"), w.matrix(p + "ffn_up_shexp.weight"),
                         w.matrix(p + "ffn_down_shexp.weight")) if cfg.spec.shared_expert else None,
            ffn_gate_inp_shexp=w.vector(p + "ffn_gate_inp_shexp.weight") if cfg.spec.shared_expert else None,
        ))
    return blocks


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w over the last axis (ggml_rms_norm then ggml_mul)."""
    out = np.empty(x.shape, dtype=np.float32)
    kernels.rms_norm(x.reshape(-1, x.shape[-1]), w, eps, out.reshape(-1, x.shape[-1]))
    return out


class Transformer:
    """Weights, rope tables and the KV cache of one context; forward() appends tokens to it."""

    def __init__(self, f: GGUFFile, n_ctx: int, store: ExpertStore | None = None, prefetch: int = 0) -> None:
        self.cfg = cfg = ModelConfig.from_gguf(f)
        w = WeightReader(f)
        self.token_embd = "token_embd.weight"
        self.w = w
        self.output_norm = w.vector("output_norm.weight")
        self.output = w.matrix("output.weight") if w.has("output.weight") else w.matrix("token_embd.weight")
        self.blocks = load_blocks(cfg, w)
        self.experts: ExpertStore = store or MmapExperts(self.blocks)
        self.prefetch = prefetch  # later layers whose routers predict experts from this layer's input
        self.n_ctx = n_ctx
        self.k_cache, self.v_cache = self._new_kv_cache((cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim))
        self.n_past = 0
        # rope angles: theta_i = base^(-2i/d) scaled by freq_scale (ggml_rope_ext with ext_factor 0)
        half = cfg.rope_dim // 2
        inv = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)
        ang = np.arange(n_ctx, dtype=np.float64)[:, None] * (inv[None, :] * cfg.rope_freq_scale)
        self.rope_cos, self.rope_sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def _new_kv_cache(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values, (n_layer, n_ctx, n_head_kv, head_dim) each; a device subclass puts them there."""
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def reset(self) -> None:
        self.n_past = 0

    def _attention(self, b: Block, il: int, h: np.ndarray, pos: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        T, hd, nh, nkv = h.shape[0], cfg.head_dim, cfg.n_head, cfg.n_head_kv
        q = b.attn_q.apply(h)                                                   # (T, nh*hd)
        k = b.attn_k.apply(h)                                                   # (T, nkv*hd)
        v = b.attn_v.apply(h)                                                   # (T, nkv*hd)
        if b.attn_q_bias is not None:
            q, k, v = q + b.attn_q_bias, k + b.attn_k_bias, v + b.attn_v_bias
        if cfg.spec.qk_norm == QKNorm.FULL:                                     # olmoe: over the projection
            q, k = rms_norm(q, b.attn_q_norm, cfg.rms_eps), rms_norm(k, b.attn_k_norm, cfg.rms_eps)
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if cfg.spec.qk_norm == QKNorm.PER_HEAD:                                 # qwen3: per head
            q, k = rms_norm(q, b.attn_q_norm, cfg.rms_eps), rms_norm(k, b.attn_k_norm, cfg.rms_eps)
        neox = cfg.spec.rope == RopeStyle.NEOX
        kernels.rope(q, pos, self.rope_cos, self.rope_sin, neox)               # (T, nh, hd) in place
        kernels.rope(k, pos, self.rope_cos, self.rope_sin, neox)               # (T, nkv, hd) in place
        p0 = int(pos[0])
        self.k_cache[il, p0:p0 + T] = k                                         # append to the cache
        self.v_cache[il, p0:p0 + T] = v
        o = np.empty((T, nh * hd), dtype=np.float32)
        kernels.attention(q, self.k_cache[il], self.v_cache[il], p0, o)        # (T, nh*hd) causal softmax(qK^T)V
        return b.attn_output.apply(o)                                           # (T, n_embd)

    def _ffn(self, b: Block, il: int, h: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        if b.ffn is not None:
            return b.ffn.swiglu(h)                                              # dense SwiGLU
        out, _ = moe_forward(h, b.ffn_gate_inp, cfg.n_expert_used, cfg.spec.norm_topk, self.experts, il)
        self._prefetch(il, h)
        if b.shexp is not None:                                                 # shared expert, sigmoid-gated
            gate = 1.0 / (1.0 + np.exp(-(h @ b.ffn_gate_inp_shexp)))            # (T,)
            out += gate[:, None].astype(np.float32) * b.shexp.swiglu(h)
        return out

    def _prefetch(self, il: int, h: np.ndarray) -> None:
        """HOBBIT: the next `prefetch` layers' routers on this layer's FFN input predict their experts."""
        cfg = self.cfg
        for ahead in range(il + 1, min(il + 1 + self.prefetch, cfg.n_layer)):
            router = self.blocks[ahead].ffn_gate_inp
            if router is not None:
                guess = route(h @ router.T, cfg.n_expert_used, cfg.spec.norm_topk, self.experts.bias(ahead))
                self.experts.prefetch(ahead, guess.experts)                     # (T, k) predicted

    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append `tokens` to the context; logits (T, n_vocab) for every token, or (1, n_vocab) for the last."""
        cfg = self.cfg
        T = len(tokens)
        if self.n_past + T > self.n_ctx:
            raise ValueError(f"context full: {self.n_past} + {T} tokens exceed n_ctx={self.n_ctx}")
        pos = np.arange(self.n_past, self.n_past + T)
        x = self.w.rows(self.token_embd, np.asarray(tokens, dtype=np.int64))    # (T, n_embd)
        for il, b in enumerate(self.blocks):
            h = rms_norm(x, b.attn_norm, cfg.rms_eps)                            # pre-attention norm
            x = x + self._attention(b, il, h, pos)                               # residual
            h = rms_norm(x, b.ffn_norm, cfg.rms_eps)                            # pre-FFN norm
            x = x + self._ffn(b, il, h)                                          # residual
        self.n_past += T
        if not all_logits:
            x = x[-1:]
        h = rms_norm(x, self.output_norm, cfg.rms_eps)                          # final norm
        return self.output.apply(np.ascontiguousarray(h, dtype=np.float32))     # (T or 1, n_vocab)
