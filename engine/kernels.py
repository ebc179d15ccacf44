"""Numba kernels for the float parts of a transformer block: RMSNorm, RoPE, causal attention over the KV cache,
routing, and the MoE step's scatter-add.

One call each instead of a dozen numpy temporaries: at decode (one token) Python overhead, not arithmetic,
is the cost. Semantics follow ggml: ggml_rms_norm (mean of squares in float64 here, as ggml sums in
ggml_float), ggml_rope_ext modes NORM and NEOX, and soft_max_ext with the causal mask. None allocates:
scratch space comes from the caller's preallocated RunState (engine/context.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_thread_id, njit, prange

from hotcold.quant.fp import f32_to_f16
from hotcold.quant.kernels import _f16_bits_to_f32

F32 = np.float32


@njit(cache=True, fastmath={"contract"})
def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for each row t of x (T, n)."""
    T, n = x.shape
    for t in range(T):
        ss = 0.0
        for i in range(n):
            ss += float(x[t, i]) * float(x[t, i])
        scale = F32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = F32(x[t, i] * scale) * w[i]


@njit(cache=True, fastmath={"contract"})
def rope(x: np.ndarray, pos: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotate x (T, heads, head_dim) in place by the angles of positions pos (T,): NORM pairs adjacent
    dims (2i, 2i+1), NEOX pairs dims i and i + d/2; only the first 2 * cos.shape[1] dims rotate."""
    T, H, _ = x.shape
    half = cos.shape[1]
    for t in range(T):
        p = pos[t]
        for h in range(H):
            for i in range(half):
                c, s = cos[p, i], sin[p, i]
                i0, i1 = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a, b = x[t, h, i0], x[t, h, i1]
                x[t, h, i0] = a * c - b * s
                x[t, h, i1] = a * s + b * c


@njit(cache=True, parallel=True, fastmath={"contract"})
def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Causal grouped-query attention over an F32 cache: q (T, n_head, d) at positions p0.., k/v (n_ctx, n_head_kv,
    d) filled up to p0 + T; out (T, n_head * d). Each (token, head) is one task; `scratch` (threads, >= n_ctx)
    holds a thread's scores. The softmax is ggml's soft_max_ext: max-subtracted, summed in float64, scaled by
    the reciprocal of the sum."""
    T, nh, d = q.shape
    g = nh // k.shape[1]
    scale = F32(1.0 / math.sqrt(d))
    for task in prange(T * nh):
        t, h = task // nh, task % nh
        kv = h // g
        n = p0 + t + 1
        s = scratch[get_thread_id(), :n]
        m = F32(-np.inf)
        for j in range(n):
            acc = F32(0)
            for i in range(d):
                acc += q[t, h, i] * k[j, kv, i]
            s[j] = acc * scale
            m = max(m, s[j])
        inv = _exp_normalizer(s, m)
        o = out[t, h * d:(h + 1) * d]
        o[:] = 0
        for j in range(n):
            pj = s[j] * inv
            for i in range(d):
                o[i] += pj * v[j, kv, i]


@njit(cache=True, parallel=True, fastmath={"contract"})
def attention_f16(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """As `attention` over an F16 cache (k, v hold fp16 bits), with llama.cpp's roundings: the query rounded
    to fp16 before q.k (ggml converts it to the cache's vec_dot type), the probabilities rounded to fp16
    before they weight V. `scratch` is (threads, n_ctx + head_dim)."""
    T, nh, d = q.shape
    g = nh // k.shape[1]
    scale = F32(1.0 / math.sqrt(d))
    n_ctx = k.shape[0]
    for task in prange(T * nh):
        t, h = task // nh, task % nh
        kv = h // g
        n = p0 + t + 1
        row = scratch[get_thread_id()]
        s, qr = row[:n], row[n_ctx:n_ctx + d]
        for i in range(d):
            qr[i] = _f16_bits_to_f32(f32_to_f16(q[t, h, i]))
        m = F32(-np.inf)
        for j in range(n):
            acc = F32(0)
            for i in range(d):
                acc += qr[i] * _f16_bits_to_f32(k[j, kv, i])
            s[j] = acc * scale
            m = max(m, s[j])
        inv = _exp_normalizer(s, m)
        o = out[t, h * d:(h + 1) * d]
        o[:] = 0
        for j in range(n):
            pj = _f16_bits_to_f32(f32_to_f16(s[j] * inv))
            for i in range(d):
                o[i] += pj * _f16_bits_to_f32(v[j, kv, i])


@njit(cache=True, inline="always")
def _exp_normalizer(s: np.ndarray, m: np.float32) -> np.float32:
    """s = exp(s - m) in place; the reciprocal of their float64 sum, as float32 (ggml_vec_soft_max_f32, then
    ggml_vec_scale_f32 by 1/sum)."""
    total = 0.0
    for j in range(s.shape[0]):
        s[j] = math.exp(s[j] - m)
        total += s[j]
    return F32(1.0 / total)


@njit(cache=True)
def store_f16(src: np.ndarray, dst: np.ndarray) -> None:
    """dst = the fp16 bits of src (round to nearest even), element by element over equal shapes."""
    sf, df = src.reshape(-1), dst.reshape(-1)
    for i in range(sf.shape[0]):
        df[i] = f32_to_f16(sf[i])


@njit(cache=True, fastmath={"contract"})
def silu_mul(g: np.ndarray, u: np.ndarray) -> None:
    """g = silu(g) * u in place (SwiGLU's gate)."""
    gf, uf = g.reshape(-1), u.reshape(-1)
    for i in range(gf.shape[0]):
        gf[i] = gf[i] / (F32(1) + math.exp(-gf[i])) * uf[i]


@njit(cache=True, inline="always")
def _softmax(x: np.ndarray, out: np.ndarray) -> None:
    m = x.max()
    total = F32(0)
    for i in range(x.shape[0]):
        out[i] = math.exp(x[i] - m)
        total += out[i]
    for i in range(x.shape[0]):
        out[i] /= total


@njit(cache=True)
def route_softmax_topk(logits: np.ndarray, k: int, norm: bool, logit_bias: np.ndarray, prob_bias: np.ndarray,
                       ids: np.ndarray, weights: np.ndarray, scratch: np.ndarray) -> None:
    """build_moe_ffn's gating per token: softmax, top-k (ties to the lower id), optional renormalisation.
    Non-empty biases steer the choice only (MoE-ERAS): the weights are the unbiased probabilities.
    `scratch` is (3, E) float32."""
    T, E = logits.shape
    probs = scratch[0]
    score = scratch[1]
    biased = scratch[2]
    for t in range(T):
        _softmax(logits[t], probs)
        if logit_bias.shape[0]:
            for e in range(E):
                biased[e] = logits[t, e] + logit_bias[e]
            _softmax(biased, score)
        else:
            for e in range(E):
                score[e] = probs[e]
        if prob_bias.shape[0]:
            for e in range(E):
                score[e] += prob_bias[e]
        total = F32(0)
        for j in range(k):
            best = 0
            for e in range(1, E):
                if score[e] > score[best]:
                    best = e
            ids[t, j] = best
            weights[t, j] = probs[best]
            total += probs[best]
            score[best] = -np.inf
        if norm:
            for j in range(k):
                weights[t, j] /= total


@njit(cache=True)
def scatter_add(out: np.ndarray, rows: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """out[rows[i]] += w[i] * y[i] for y (n, cols); product then sum, each rounded (numpy's order)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(y.shape[1]):
            out[r, j] += w[i] * y[i, j]


@njit(cache=True)
def scatter_add_block(out: np.ndarray, w: np.ndarray, y: np.ndarray) -> None:
    """out[i] += w[i] * y[i] for the contiguous rows out (n, cols) (a slice of tokens)."""
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            out[i, j] += w[i] * y[i, j]
