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

from typing import Callable

from hotcold.quant.fp import bits_f32, f32_bits, f32_to_f16, nearest_int
from hotcold.quant.kernels import _stack, f16_value
from hotcold.quant.vec import silu_mul, v_expf  # silu_mul: ggml's SwiGLU, shared with quant.int8

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


# The dot products and the weighted sum of V are written so that LLVM vectorises them: reassociation lets it
# split each q.k into lanes (as ggml's vec_dot does), and the output row accumulates in a local array.
_ATT_MATH = {"contract", "reassoc"}
MAX_HEAD_DIM = 512


@njit(cache=True, inline="always")
def _f32(x: np.float32) -> np.float32:
    return x


@njit(cache=True, inline="always")
def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray, scratch: np.ndarray,
            cvt: Callable, rnd: Callable) -> None:
    """Causal GQA for every (token, head) task; cvt reads a cache element as float32, rnd rounds an operand
    as ggml converts it for the cache's type (identity for F32)."""
    T, nh = q.shape[0], q.shape[1]
    for task in prange(T * nh):
        t, h = task // nh, task % nh
        _attend_task(q, k, v, t, h, 0, p0 + t + 1, out, scratch, cvt, rnd)


@njit(cache=True, inline="always")
def _attend_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, c0: np.ndarray, span: np.ndarray, out: np.ndarray,
                 scratch: np.ndarray, cvt: Callable, rnd: Callable) -> None:
    """_attend for rows of several sequences: row t over the cells c0[t] .. c0[t] + span[t] - 1 (its sequence's)."""
    T, nh = q.shape[0], q.shape[1]
    for task in prange(T * nh):
        t, h = task // nh, task % nh
        _attend_task(q, k, v, t, h, c0[t], span[t], out, scratch, cvt, rnd)


@njit(cache=True, inline="always")
def _attend_task(q: np.ndarray, k: np.ndarray, v: np.ndarray, t: int, h: int, c: int, n: int, out: np.ndarray,
                 scratch: np.ndarray, cvt: Callable, rnd: Callable) -> None:
    """One (token, head): query row t, head h, over cache cells c .. c + n - 1. Each pass over the output row adds
    four weighted V rows, so the row is loaded and stored once per four cells, not per cell (bench/attention.py)."""
    nh, d = q.shape[1], q.shape[2]
    g = nh // k.shape[1]
    scale = F32(1.0 / math.sqrt(d))
    n_ctx = scratch.shape[1] - d
    kv = h // g
    row = scratch[get_thread_id()]
    s, qr = row[:n], row[n_ctx:n_ctx + d]
    for i in range(d):
        qr[i] = rnd(q[t, h, i])
    m = F32(-np.inf)
    for j in range(n):
        acc = F32(0)
        for i in range(d):
            acc += qr[i] * cvt(k[c + j, kv, i])
        s[j] = acc * scale
        m = max(m, s[j])
    inv = _exp_normalizer(s, m)
    o = _stack(MAX_HEAD_DIM, F32)
    for i in range(d):
        o[i] = 0
    for j in range(n):
        s[j] = rnd(s[j] * inv)                                              # the probabilities, as V's type weighs them
    n4 = n - n % 4
    for j in range(0, n4, 4):
        p0, p1, p2, p3 = s[j], s[j + 1], s[j + 2], s[j + 3]
        for i in range(d):
            o[i] += (p0 * cvt(v[c + j, kv, i]) + p1 * cvt(v[c + j + 1, kv, i])) + \
                (p2 * cvt(v[c + j + 2, kv, i]) + p3 * cvt(v[c + j + 3, kv, i]))
    for j in range(n4, n):
        for i in range(d):
            o[i] += s[j] * cvt(v[c + j, kv, i])
    for i in range(d):
        out[t, h * d + i] = o[i]


@njit(cache=True, inline="always")
def _round_f16(x: np.float32) -> np.float32:
    """The float32 value of fp16(x), round to nearest even, without branches (so it vectorises): mantissa
    rounded to 10 bits for normal fp16 values, to multiples of 2^-24 below 2^-14 (fp16 subnormals); values
    beyond fp16's range (|x| >= 65520) become infinite as the conversion makes them."""
    u = f32_bits(x)
    a = u & np.uint32(0x7FFFFFFF)
    normal = bits_f32((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000))
    tiny = np.float32(nearest_int(bits_f32(a) * F32(16777216.0))) * F32(5.9604645e-08)
    tiny = bits_f32(f32_bits(tiny) | (u & np.uint32(0x80000000)))
    r = tiny if a < np.uint32(0x38800000) else normal
    return r if a < np.uint32(0x477FF000) else (F32(np.inf) if x > 0 else F32(-np.inf))


@njit(cache=True, parallel=True, fastmath=_ATT_MATH)
def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Causal grouped-query attention over an F32 cache: q (T, n_head, d) at positions p0.., k/v (n_ctx, n_head_kv,
    d) filled up to p0 + T; out (T, n_head * d). Each (token, head) is one task; `scratch` (threads, n_ctx + d)
    holds a thread's scores and query. The softmax is ggml's soft_max_ext: max-subtracted, summed in float64,
    scaled by the reciprocal of the sum."""
    _attend(q, k, v, p0, out, scratch, _f32, _f32)


@njit(cache=True, parallel=True, fastmath=_ATT_MATH)
def attention_f16(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """As `attention` over an F16 cache (k, v hold fp16 bits), with llama.cpp's roundings: the query rounded
    to fp16 before q.k (ggml converts it to the cache's vec_dot type), the probabilities rounded to fp16
    before they weight V."""
    _attend(q, k, v, p0, out, scratch, f16_value, _round_f16)


@njit(cache=True, parallel=True, fastmath=_ATT_MATH)
def attention_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, c0: np.ndarray, span: np.ndarray, out: np.ndarray,
                   scratch: np.ndarray) -> None:
    """`attention` for rows of several sequences in one cache (n_seq * n_ctx cells): row t over its span[t]
    cells from c0[t], each (token, head) computed exactly as the one-sequence kernel computes it."""
    _attend_rows(q, k, v, c0, span, out, scratch, _f32, _f32)


@njit(cache=True, parallel=True, fastmath=_ATT_MATH)
def attention_rows_f16(q: np.ndarray, k: np.ndarray, v: np.ndarray, c0: np.ndarray, span: np.ndarray,
                       out: np.ndarray, scratch: np.ndarray) -> None:
    """attention_rows over an F16 cache, with attention_f16's roundings."""
    _attend_rows(q, k, v, c0, span, out, scratch, f16_value, _round_f16)


@njit(cache=True, inline="always")
def _exp_normalizer(s: np.ndarray, m: np.float32) -> np.float32:
    """s = exp(s - m) in place; the reciprocal of their float64 sum, as float32 (ggml_vec_soft_max_f32, then
    ggml_vec_scale_f32 by 1/sum)."""
    total = 0.0
    for j in range(s.shape[0]):
        s[j] = v_expf(s[j] - m)   # the attention's rows are padded to many 16-chunks: all take v_expf
        total += s[j]
    return F32(1.0 / total)


@njit(cache=True)
def store_f16(src: np.ndarray, dst: np.ndarray) -> None:
    """dst = the fp16 bits of src (round to nearest even), element by element over equal shapes."""
    sf, df = src.reshape(-1), dst.reshape(-1)
    for i in range(sf.shape[0]):
        df[i] = f32_to_f16(sf[i])


@njit(cache=True)
def store_kv_f16(k: np.ndarray, v: np.ndarray, kc: np.ndarray, vc: np.ndarray, p0: int) -> None:
    """A layer's fp16 caches kc, vc (n_ctx, n_head_kv, head_dim) at positions p0.. = new keys, values k, v
    (T, n_head_kv * head_dim): both in one call (decode is one row each)."""
    T = k.shape[0]
    store_f16(k, kc[p0:p0 + T])
    store_f16(v, vc[p0:p0 + T])


@njit(cache=True)
def _softmax(x: np.ndarray, out: np.ndarray) -> None:
    """ggml_soft_max on one row, as ggml-cpu's AVX512 code runs it: exp by v_expf in chunks of 16 (each
    chunk summed as _mm512_reduce_add_ps pairs its lanes), libm expf for the rest, the sum in float64, then
    every value times the float32 reciprocal of the sum."""
    n = x.shape[0]
    m = x[0]
    for i in range(1, n):
        m = max(m, x[i])
    simd = n - n % 16
    total = 0.0
    for c in range(0, simd, 16):
        for i in range(16):
            out[c + i] = v_expf(x[c + i] - m)
        total += _reduce16(out, c)
    for i in range(simd, n):
        out[i] = math.exp(x[i] - m)
        total += out[i]
    inv = F32(1.0 / total)
    for i in range(n):
        out[i] *= inv


@njit(cache=True, inline="always")
def _reduce16(a: np.ndarray, c: int) -> np.float32:
    """a[c:c+16] summed in _mm512_reduce_add_ps's order: halves, then quarters, then pairs."""
    h = _stack(8, F32)
    for i in range(8):
        h[i] = a[c + i + 8] + a[c + i]
    q0, q1, q2, q3 = h[4] + h[0], h[5] + h[1], h[6] + h[2], h[7] + h[3]
    return (q0 + q2) + (q1 + q3)


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
        total = 0.0
        for j in range(k):
            best = 0
            for e in range(1, E):
                if score[e] > score[best]:
                    best = e
            ids[t, j] = best
            weights[t, j] = probs[best]
            total += probs[best]
            score[best] = -np.inf
        if norm:                                     # ggml_sum_rows (in float64), then ggml_div
            s = F32(total)
            for j in range(k):
                weights[t, j] /= s


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


@njit(cache=True, fastmath={"contract", "reassoc"})
def small_matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out (T, E) = x (T, n) @ w.T for a small float32 w (E, n): routers, whose products are tiny next to a
    layer's (one serial call, quick to compile)."""
    for t in range(x.shape[0]):
        for e in range(w.shape[0]):
            acc = F32(0)
            for i in range(x.shape[1]):
                acc += x[t, i] * w[e, i]
            out[t, e] = acc


@njit(cache=True, parallel=True)
def copy_expert(dst: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> None:
    """dst (1-d bytes) = gate, up, down one after the other, in 16 KiB chunks over the threads: an expert load into
    an arena slot is a copy large enough for two cores to move faster than one, and one call launches once."""
    g, u, dn = gate.reshape(-1), up.reshape(-1), down.reshape(-1)
    c, ng, nu = 16384, g.shape[0], u.shape[0]
    cg, cu = (ng + c - 1) // c, (nu + c - 1) // c
    for i in prange(cg + cu + (dn.shape[0] + c - 1) // c):
        if i < cg:
            dst[i * c:min(ng, (i + 1) * c)] = g[i * c:min(ng, (i + 1) * c)]
        elif i < cg + cu:
            j = i - cg
            dst[ng + j * c:ng + min(nu, (j + 1) * c)] = u[j * c:min(nu, (j + 1) * c)]
        else:
            j = i - cg - cu
            n = dn.shape[0]
            dst[ng + nu + j * c:ng + nu + min(n, (j + 1) * c)] = dn[j * c:min(n, (j + 1) * c)]
