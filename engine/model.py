"""The transformer forward pass for every supported architecture (llama.cpp src/models/*.cpp), once, over a backend.

Straight lines over the weights, one comment per step (after llama2.c): the Transformer holds the weights
(immutable, on the backend's device), a Context (engine/context.py) the KV cache and the buffers every step
writes to, and the backend (engine/backend.py, engine/cuda/backend.py) the kernels. Attributes are named like
the GGUF tensors (after tinygrad's llm/); what differs between architectures is data in config.ArchSpec.
The MoE step itself is engine/moe.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .backend import Backend, CpuBackend
from .config import CacheType, ModelConfig, QKNorm, RopeStyle, SharedExpert
from .context import Context
from .experts.expert import Expert
from .experts.mmap import MmapExperts, mmap_experts
from .gguf_file import GGUFFile
from .moe import ExpertStore, moe
from .weights import QMatrix, QStack, WeightReader


@dataclass(frozen=True)
class Block:
    """One layer's weights; vectors are float32 arrays, matrices QMatrix (routers F32). A layer
    is an MoE layer when it has a router; its experts stay in the file, where the expert store reads them."""
    attn_norm: Any
    attn_q: Any
    attn_k: Any
    attn_v: Any
    attn_output: Any
    attn_q_bias: Any
    attn_k_bias: Any
    attn_v_bias: Any
    attn_q_norm: Any
    attn_k_norm: Any
    ffn_norm: Any
    ffn: Expert | None                # a dense layer's FFN
    ffn_gate_inp: Any                 # the router (n_expert, n_embd)
    ffn_gate_exps: QStack | None      # the routed experts, (n_expert, n_ff, n_embd) ...
    ffn_up_exps: QStack | None
    ffn_down_exps: QStack | None
    shexp: Expert | None              # qwen2moe's shared expert
    ffn_gate_inp_shexp: Any           # ... and its gate, one row (n_embd,)


def _opt_vector(w: WeightReader, name: str) -> np.ndarray | None:
    return w.vector(name) if w.has(name) else None


def _ffn(w: WeightReader, p: str, suffix: str) -> Expert:
    return Expert(w.matrix(f"{p}ffn_gate{suffix}.weight"), w.matrix(f"{p}ffn_up{suffix}.weight"),
                  w.matrix(f"{p}ffn_down{suffix}.weight"))


def load_blocks(cfg: ModelConfig, w: WeightReader) -> list[Block]:
    """Every layer's weights as zero-copy views of the file (vectors copied to float32)."""
    blocks = []
    shared = cfg.spec.shared_expert is SharedExpert.SIGMOID_GATED
    for i in range(cfg.n_layer):
        p, moe_layer = f"blk.{i}.", cfg.moe_layers[i]
        blocks.append(Block(
            attn_norm=w.vector(p + "attn_norm.weight"),
            attn_q=w.matrix(p + "attn_q.weight"), attn_k=w.matrix(p + "attn_k.weight"),
            attn_v=w.matrix(p + "attn_v.weight"), attn_output=w.matrix(p + "attn_output.weight"),
            attn_q_bias=_opt_vector(w, p + "attn_q.bias"), attn_k_bias=_opt_vector(w, p + "attn_k.bias"),
            attn_v_bias=_opt_vector(w, p + "attn_v.bias"),
            attn_q_norm=_opt_vector(w, p + "attn_q_norm.weight"), attn_k_norm=_opt_vector(w, p + "attn_k_norm.weight"),
            ffn_norm=w.vector(p + "ffn_norm.weight"),
            ffn=None if moe_layer else _ffn(w, p, ""),
            ffn_gate_inp=w.dense(p + "ffn_gate_inp.weight") if moe_layer else None,
            ffn_gate_exps=w.stack(p + "ffn_gate_exps.weight") if moe_layer else None,
            ffn_up_exps=w.stack(p + "ffn_up_exps.weight") if moe_layer else None,
            ffn_down_exps=w.stack(p + "ffn_down_exps.weight") if moe_layer else None,
            shexp=_ffn(w, p, "_shexp") if moe_layer and shared else None,
            ffn_gate_inp_shexp=w.dense_row(p + "ffn_gate_inp_shexp.weight") if moe_layer and shared else None,
        ))
    return blocks


class Transformer:
    """A model's weights on one backend: immutable and shared by every Context made from it."""

    def __init__(self, cfg: ModelConfig, blocks: Sequence[Block], token_embd: QMatrix, output_norm: np.ndarray,
                 output: QMatrix, backend: Backend | None = None, place_experts: bool = False) -> None:
        self.cfg = cfg
        self.backend = be = backend or CpuBackend()
        self.token_embd = token_embd                                 # looked up on the host
        self.host_routers: list[QMatrix | None] = [b.ffn_gate_inp for b in blocks]  # prefetch runs there
        # the file's experts, read where they lie: the source every expert store copies from; the plain store
        # serves them, or with place_experts the backend's copies of them (a CPU backend's interleaved Q4_K)
        self.file_experts = mmap_experts([(b.ffn_gate_exps, b.ffn_up_exps, b.ffn_down_exps)
                                          if b.ffn_gate_exps is not None else None for b in blocks])
        self.experts = MmapExperts([[be.place(e) for e in layer] for layer in self.file_experts] if place_experts
                                   else self.file_experts)
        self.n_ff = max([b.ffn_gate_exps.rows for b in blocks if b.ffn_gate_exps is not None]
                        + [e.gate.rows for b in blocks for e in (b.ffn, b.shexp) if e is not None] + [1])
        self.blocks = [be.place_fields(b) for b in blocks]
        self.output_norm = be.place(output_norm)
        self.output = be.place(output)

    @classmethod
    def load(cls, f: GGUFFile, backend: Backend | None = None, place_experts: bool = False) -> "Transformer":
        cfg = ModelConfig.from_gguf(f)
        w = WeightReader(f)
        embd = w.matrix("token_embd.weight")
        output = w.matrix("output.weight") if w.has("output.weight") else embd   # tied embeddings
        return cls(cfg, load_blocks(cfg, w), embd, w.vector("output_norm.weight"), output, backend, place_experts)

    def context(self, n_ctx: int, n_batch: int = 512, experts: ExpertStore | None = None,
                type_k: CacheType = CacheType.F16, type_v: CacheType = CacheType.F16,
                memory_limit: int | None = None, n_seq: int = 1) -> Context:
        """A new context (KV cache and buffers, on this model's backend; see Context for memory_limit), holding
        n_seq sequences of up to n_ctx tokens each."""
        return Context(self, n_ctx, n_batch, experts, type_k, type_v, memory_limit, n_seq)

    def logit_rows(self, n_batch: int) -> int:
        """Rows of the head's output buffer: 1 on the host (all-logits passes write to their result
        directly), up to 64 on a device (vocabularies are large; longer passes come down in chunks)."""
        return 1 if self.backend.host_memory else min(64, n_batch)

    # --- the forward pass -----------------------------------------------------------------------------

    def forward(self, tokens: Sequence[int] | np.ndarray, ctx: Context, all_logits: bool = False) -> np.ndarray:
        """Append `tokens` (at most ctx.n_batch) to the context; logits (T, n_vocab) for every token, or
        (1, n_vocab) for the last. The (1, n_vocab) result is the context's buffer, valid until its next
        forward (llama.cpp's llama_get_logits); copy it to keep it."""
        t0 = time.perf_counter()
        cfg, be, s = self.cfg, self.backend, ctx.state
        ids = np.asarray(tokens, dtype=np.int64)
        T, p0 = ids.shape[0], ctx.n_past
        if not 0 < T <= ctx.n_batch:
            raise ValueError(f"{T} tokens in one forward(); a context of n_batch={ctx.n_batch} takes 1..{ctx.n_batch}")
        if p0 + T > ctx.n_ctx:
            raise ValueError(f"context full: {p0} + {T} tokens exceed n_ctx={ctx.n_ctx}")
        x, h, a = s.x[:T], s.h[:T], s.a[:T]
        pos = be.upload(ctx.pos[p0:p0 + T], s.pos[:T])                           # (T,) positions
        be.embed(self.token_embd, ids, s.x_host[:T], x)                          # (T, n_embd)
        ctx.experts.begin_step(ids)                                              # the sequence's next tokens
        for il, b in enumerate(self.blocks):
            be.rms_norm(x, b.attn_norm, cfg.rms_eps, h)                           # pre-attention norm
            self._attention(b, il, h, pos, p0, ctx, a)                           # (T, n_embd)
            be.add(x, a)                                                         # residual
            be.rms_norm(x, b.ffn_norm, cfg.rms_eps, h)                           # pre-FFN norm
            self._ffn(b, il, h, ctx, a)                                          # (T, n_embd)
            be.add(x, a)                                                         # residual
        if not be.all_finite(x, s.finite):   # the head's quantized input would turn NaN into zeros: say so instead
            raise ValueError(f"NaN or infinite activations at positions {p0}..{p0 + T - 1}: the model's weights "
                             "are corrupt (or overflow in this precision)")
        ctx.tokens.extend(ids.tolist())
        logits = self._logits(x, ctx, all_logits)
        ctx.forward_s += time.perf_counter() - t0
        return logits

    def forward_batch(self, batch: Sequence[tuple[int, Sequence[int] | np.ndarray]], ctx: Context) -> np.ndarray:
        """Append each entry's tokens to its sequence, all in one forward pass (continuous batching: one
        sequence's decode step beside another's prompt chunk); logits (len(batch), n_vocab) of each entry's
        last token, the context's buffer, valid until its next forward. Each row's arithmetic is the same as
        the sequence's alone would be (the kernels' results do not depend on the batch), and the MoE step sees
        every sequence's tokens, so an expert is read once for all of them."""
        t0 = time.perf_counter()
        cfg, be, s = self.cfg, self.backend, ctx.state
        if not 0 < len(batch) <= ctx.n_seq:
            raise ValueError(f"a batch of {len(batch)} sequences for a context of n_seq_max={ctx.n_seq} "
                             "(one entry per sequence)")
        parts = [(int(seq), np.asarray(t, dtype=np.int64)) for seq, t in batch]
        segs, r = [], 0                                                           # (row0, row1, seq, p0)
        for seq, t in parts:
            if not 0 <= seq < ctx.n_seq or any(q == seq for _, _, q, _ in segs):
                raise ValueError(f"sequence {seq} twice or out of 0..{ctx.n_seq - 1} in one batch")
            n, p0 = t.shape[0], len(ctx.slots[seq])
            if n == 0 or p0 + n > ctx.n_ctx:
                raise ValueError(f"sequence {seq}: {n} tokens at {p0} in a context of n_ctx={ctx.n_ctx} per sequence")
            segs.append((r, r + n, seq, p0))
            r += n
        T = r
        if T > ctx.n_batch:
            raise ValueError(f"{T} tokens in one forward_batch(); a context of n_batch={ctx.n_batch} takes 1..{ctx.n_batch}")
        ids = np.concatenate([t for _, t in parts])
        for r0, r1, seq, p0 in segs:
            s.pos_host[r0:r1] = ctx.pos[p0:p0 + r1 - r0]
            s.cell0[r0:r1] = seq * ctx.n_ctx
            s.seq[r0:r1] = seq
            s.span[r0:r1] = ctx.pos[p0:p0 + r1 - r0]
            s.span[r0:r1] += 1                                                    # causal: itself and before
        x, h, a = s.x[:T], s.h[:T], s.a[:T]
        pos = be.upload(s.pos_host[:T], s.pos[:T])                               # (T,) each row's position
        be.embed(self.token_embd, ids, s.x_host[:T], x)                          # (T, n_embd)
        ctx.experts.begin_step(ids, s.seq[:T])                                   # (T,) tokens, their sequences
        for il, b in enumerate(self.blocks):
            be.rms_norm(x, b.attn_norm, cfg.rms_eps, h)                           # pre-attention norm
            self._attention(b, il, h, pos, 0, ctx, a, segs)                      # (T, n_embd) each over its own
            be.add(x, a)                                                         # residual
            be.rms_norm(x, b.ffn_norm, cfg.rms_eps, h)                           # pre-FFN norm
            self._ffn(b, il, h, ctx, a)                                          # (T, n_embd) experts grouped
            be.add(x, a)                                                         # residual
        if not be.all_finite(x, s.finite):
            raise ValueError("NaN or infinite activations in a batch: the model's weights are corrupt "
                             "(or overflow in this precision)")
        for (seq, t), (r0, r1, _, _) in zip(parts, segs):
            ctx.slots[seq].extend(t.tolist())
        logits = self._last_logits(x, [r1 - 1 for _, r1, _, _ in segs], ctx)
        ctx.forward_s += time.perf_counter() - t0
        return logits

    def _last_logits(self, x: Any, rows: Sequence[int], ctx: Context) -> np.ndarray:
        """The final norm and the head for the given rows of x: (len(rows), n_vocab) in ctx.seq_logits."""
        cfg, be, s = self.cfg, self.backend, ctx.state
        m = len(rows)
        out = ctx.seq_logits[:m]
        step = m if be.host_memory else s.logits.shape[0]                        # on a device, in chunks
        for i in range(0, m, step):
            c = min(step, m - i)
            for j in range(c):                                                   # gather the rows, normed
                r = rows[i + j]
                be.rms_norm(x[r:r + 1], self.output_norm, cfg.rms_eps, s.h[j:j + 1])
            head = out[i:i + c] if be.host_memory else s.logits[:c]
            be.matmul(self.output, be.acts(s.h[:c], s.h_acts), head)             # (c, n_vocab)
            be.download(head, out[i:i + c])
        return out

    def _attention(self, b: Block, il: int, h: Any, pos: Any, p0: int, ctx: Context, out: Any,
                   segs: Sequence[tuple[int, int, int, int]] | None = None) -> None:
        cfg, be, s = self.cfg, self.backend, ctx.state
        T, hd, nh, nkv = h.shape[0], cfg.head_dim, cfg.n_head, cfg.n_head_kv
        q, k, v = s.q[:T], s.k[:T], s.v[:T]
        hx = be.acts(h, s.h_acts)                                                # quantized once for q, k, v
        be.matmul(b.attn_q, hx, q)                                               # (T, nh*hd)
        be.matmul(b.attn_k, hx, k)                                               # (T, nkv*hd)
        be.matmul(b.attn_v, hx, v)                                               # (T, nkv*hd)
        if b.attn_q_bias is not None:
            be.add_bias(q, b.attn_q_bias)
            be.add_bias(k, b.attn_k_bias)
            be.add_bias(v, b.attn_v_bias)
        if cfg.spec.qk_norm == QKNorm.FULL:                                      # olmoe: over the projection
            be.rms_norm(q, b.attn_q_norm, cfg.rms_eps, q)
            be.rms_norm(k, b.attn_k_norm, cfg.rms_eps, k)
        q3, k3 = q.reshape(T, nh, hd), k.reshape(T, nkv, hd)
        if cfg.spec.qk_norm == QKNorm.PER_HEAD:                                  # qwen3: per head
            be.rms_norm(q3, b.attn_q_norm, cfg.rms_eps, q3)
            be.rms_norm(k3, b.attn_k_norm, cfg.rms_eps, k3)
        neox = cfg.spec.rope == RopeStyle.NEOX
        be.rope(q3, pos, ctx.rope_cos, ctx.rope_sin, neox)                       # (T, nh, hd) in place
        be.rope(k3, pos, ctx.rope_cos, ctx.rope_sin, neox)                       # (T, nkv, hd) in place
        if segs is None:                                                         # one sequence: slot 0
            be.store_kv(ctx.slot_kv[0], il, p0, k, v)                            # append to the cache
            be.attention(q3, ctx.slot_kv[0], il, p0, s.o[:T], s.att)             # (T, nh*hd) causal softmax(qK^T)V
        else:                                                                    # each sequence in its own cells
            for r0, r1, seq, q0 in segs:
                be.store_kv(ctx.slot_kv[seq], il, q0, k[r0:r1], v[r0:r1])
            be.attention_seqs(q3, ctx.kv, ctx.slot_kv, il, segs, s.cell0, s.span, s.o[:T], s.att)   # (T, nh*hd)
        be.matmul(b.attn_output, be.acts(s.o[:T], s.o_acts), out)                # (T, n_embd)

    def _ffn(self, b: Block, il: int, h: Any, ctx: Context, out: Any) -> None:
        cfg, be, s = self.cfg, self.backend, ctx.state
        T = h.shape[0]
        if b.ffn is not None:                                                    # a dense layer
            be.glu(b.ffn, be.acts(h, s.h_acts), s.ffn, out, cfg.spec.activation)  # (T, n_embd)
            return
        moe(be, b.ffn_gate_inp, il, h, ctx, out)                                 # (T, n_embd) routed experts
        if b.shexp is not None:                                                  # shared expert, sigmoid-gated
            y = s.ffn.y[:T]
            be.glu(b.shexp, be.acts(h, s.h_acts), s.ffn, y, cfg.spec.activation)  # (T, n_embd)
            be.matmul(b.ffn_gate_inp_shexp, h, s.shg[:T])                        # (T, 1) gate logit
            be.sigmoid_gate_add(out, s.shg[:T], y)                               # out += sigmoid(gate) * y

    def _logits(self, x: Any, ctx: Context, all_logits: bool) -> np.ndarray:
        """The final norm and the head for the last row of x (T, n_embd), or all of them."""
        cfg, be, s = self.cfg, self.backend, ctx.state
        T = x.shape[0]
        n = T if all_logits else 1
        out = np.empty((n, cfg.n_vocab), dtype=np.float32) if all_logits else s.logits_host[:1]
        step = n if be.host_memory else s.logits.shape[0]                        # on a device, in chunks
        for i in range(0, n, step):
            m = min(step, n - i)
            head = out[i:i + m] if be.host_memory else s.logits[:m]
            be.rms_norm(x[T - n + i:T - n + i + m], self.output_norm, cfg.rms_eps, s.h[:m])   # final norm
            be.matmul(self.output, be.acts(s.h[:m], s.h_acts), head)             # (m, n_vocab)
            be.download(head, out[i:i + m])
        return out
