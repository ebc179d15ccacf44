"""The float parts of a transformer block on the GPU, in Numba's CUDA target: engine/kernels.py's twins.

RMSNorm, RoPE, causal attention over a device KV cache, SwiGLU's gate, and the small glue steps of a
forward pass that keep the activations on the device (row gather, weighted scatter-add, bias add). Same
semantics as the CPU kernels (ggml_rms_norm, ggml_rope_ext NORM/NEOX, soft_max_ext with the causal mask);
sums are in float32 in a different order, so results agree to rounding, not bit for bit. Each `launch_*`
takes the stream to queue on: the forward pass keeps all compute on one stream so that expert uploads on
another overlap it. Runs on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) where there is no GPU.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from hotcold.quant import cuda as qcuda

F32 = np.float32
THREADS = 8 if qcuda.simulated() else 128  # threads per block of the elementwise and row kernels
# (the simulator runs each thread as a Python thread: fewer per block, same code)
MAX_HEAD_DIM = 256  # attention keeps one head's partial output per lane in shared memory

try:  # numba.cuda may be missing on CPU-only machines: the module imports, launching raises
    from numba import cuda
except Exception:  # pragma: no cover - depends on the machine
    cuda = None


def _jit(f: Any) -> Any:
    return cuda.jit(f) if cuda is not None else f


def _device(f: Any) -> Any:
    return cuda.jit(device=True)(f) if cuda is not None else f


@_device
def _f16_round(v):  # the value of fp16(v) for 0 <= v < 65504, round to nearest even
    if v < F32(6.103515625e-05):                             # fp16 subnormals: steps of 2^-24
        return F32(round(v * F32(16777216.0))) / F32(16777216.0)
    m, e = math.frexp(v)
    return F32(math.ldexp(F32(round(m * F32(2048.0))) / F32(2048.0), e))


@_device
def _f16_value(v):  # the value of fp16(v), any sign
    return _f16_round(v) if v >= F32(0) else -_f16_round(-v)


@_jit
def _rms_norm(x, w, eps, out):  # one block per row: out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = x.shape[1]
    part = cuda.shared.array(THREADS, np.float32)
    acc = F32(0)
    for i in range(tid, n, THREADS):
        acc += x[t, i] * x[t, i]
    part[tid] = acc
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:  # tree reduction in shared memory
        if tid < step:
            part[tid] += part[tid + step]
        cuda.syncthreads()
        step //= 2
    scale = F32(1) / math.sqrt(part[0] / F32(n) + F32(eps))
    for i in range(tid, n, THREADS):
        out[t, i] = x[t, i] * scale * w[i]


@_jit
def _rope(x, pos, cos, sin, neox):  # one thread per (token, head, pair): rotate x (T, H, d) in place
    T, H = x.shape[0], x.shape[1]
    half = cos.shape[1]
    j = cuda.grid(1)
    if j < T * H * half:
        i = j % half
        h = (j // half) % H
        t = j // (half * H)
        p = pos[t]
        c, s = cos[p, i], sin[p, i]
        i0 = i if neox else 2 * i
        i1 = i + half if neox else 2 * i + 1
        a, b = x[t, h, i0], x[t, h, i1]
        x[t, h, i0] = a * c - b * s
        x[t, h, i1] = a * s + b * c


@_jit
def _attention(q, k, v, p0, out):
    """One warp per (token, head): lane l takes keys l, l + 32, ... with an online softmax of its own;
    the 32 partial (max, sum, output) triples are then merged through shared memory (flash-decoding)."""
    nh, d = q.shape[1], q.shape[2]
    task = cuda.blockIdx.x
    t, h = task // nh, task % nh
    kv = h // (nh // k.shape[1])
    lane = cuda.threadIdx.x
    n = p0 + t + 1
    scale = F32(1) / math.sqrt(F32(d))
    acc = cuda.shared.array((32, MAX_HEAD_DIM), np.float32)
    ms = cuda.shared.array(32, np.float32)
    ss = cuda.shared.array(32, np.float32)
    m = F32(-np.inf)
    s = F32(0)
    for i in range(d):
        acc[lane, i] = F32(0)
    for j in range(lane, n, 32):
        z = F32(0)
        for i in range(d):
            z += q[t, h, i] * k[j, kv, i]
        z *= scale
        m_new = max(m, z)
        c = math.exp(m - m_new)  # rescales what was summed under the old max (0 on the first key)
        e = math.exp(z - m_new)
        s = s * c + e
        for i in range(d):
            acc[lane, i] = acc[lane, i] * c + e * v[j, kv, i]
        m = m_new
    ms[lane] = m
    ss[lane] = s
    cuda.syncthreads()
    mx = ms[0]
    for l in range(1, 32):
        mx = max(mx, ms[l])
    total = F32(0)
    for l in range(32):
        if ss[l] > 0:
            total += ss[l] * math.exp(ms[l] - mx)
    for i in range(lane, d, 32):
        o = F32(0)
        for l in range(32):
            if ss[l] > 0:
                o += acc[l, i] * math.exp(ms[l] - mx)
        out[t, h * d + i] = o / total


@_jit
def _attention_f16(q, k, v, p0, out):
    """_attention with llama.cpp's fp16 roundings (engine/kernels.attention_f16): k and v hold fp16 values, q is
    rounded to fp16 before q.k, each probability before it weights V. Two passes over the keys: the max and
    the sum first (so that each probability is known before it is rounded), then the weighted sum of V."""
    nh, d = q.shape[1], q.shape[2]
    task = cuda.blockIdx.x
    t, h = task // nh, task % nh
    kv = h // (nh // k.shape[1])
    lane = cuda.threadIdx.x
    n = p0 + t + 1
    scale = F32(1) / math.sqrt(F32(d))
    acc = cuda.shared.array((32, MAX_HEAD_DIM), np.float32)
    ms = cuda.shared.array(32, np.float32)
    ss = cuda.shared.array(32, np.float32)
    m = F32(-np.inf)
    s = F32(0)
    for j in range(lane, n, 32):
        z = F32(0)
        for i in range(d):
            z += _f16_value(q[t, h, i]) * k[j, kv, i]
        z *= scale
        m_new = max(m, z)
        s = s * math.exp(m - m_new) + math.exp(z - m_new)
        m = m_new
    ms[lane] = m
    ss[lane] = s
    cuda.syncthreads()
    mx = ms[0]
    for l in range(1, 32):
        mx = max(mx, ms[l])
    total = F32(0)
    for l in range(32):
        if ss[l] > 0:
            total += ss[l] * math.exp(ms[l] - mx)
    inv = F32(1) / total
    for i in range(d):
        acc[lane, i] = F32(0)
    for j in range(lane, n, 32):
        z = F32(0)
        for i in range(d):
            z += _f16_value(q[t, h, i]) * k[j, kv, i]
        p = _f16_value(math.exp(z * scale - mx) * inv)
        for i in range(d):
            acc[lane, i] += p * v[j, kv, i]
    cuda.syncthreads()
    for i in range(lane, d, 32):
        o = F32(0)
        for l in range(32):
            o += acc[l, i]
        out[t, h * d + i] = o


@_jit
def _store_kv(src, dst, f16):  # dst = src over flat views, rounded to fp16 values for an F16 cache
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = _f16_value(src[i]) if f16 else src[i]


@_jit
def _silu_mul(g, u):  # g = silu(g) * u elementwise, over flat views
    i = cuda.grid(1)
    if i < g.shape[0]:
        a = g[i]
        g[i] = a / (F32(1) + math.exp(-a)) * u[i]


@_jit
def _add(x, y):  # x += y over flat views (the residual)
    i = cuda.grid(1)
    if i < x.shape[0]:
        x[i] += y[i]


@_jit
def _add_bias(x, b):  # x[t] += b for each row of x (T, n)
    j = cuda.grid(1)
    n = b.shape[0]
    if j < x.shape[0] * n:
        x[j // n, j % n] += b[j % n]


@_jit
def _gather(x, rows, out):  # out[i] = x[rows[i]]
    j = cuda.grid(1)
    n = x.shape[1]
    if j < rows.shape[0] * n:
        out[j // n, j % n] = x[rows[j // n], j % n]


@_jit
def _scatter_add(out, rows, w, y):  # out[rows[i]] += w[i] * y[i]; rows distinct within one call
    j = cuda.grid(1)
    n = out.shape[1]
    if j < rows.shape[0] * n:
        out[rows[j // n], j % n] += w[j // n] * y[j // n, j % n]


@_jit
def _sigmoid_gate_add(out, g, y):  # out[t] += sigmoid(g[t, 0]) * y[t] (qwen2moe's shared-expert gate)
    j = cuda.grid(1)
    n = out.shape[1]
    if j < out.shape[0] * n:
        t = j // n
        out[t, j % n] += y[t, j % n] / (F32(1) + math.exp(-g[t, 0]))


@_jit
def _fill(x, v):  # x[:] = v over a flat view
    i = cuda.grid(1)
    if i < x.shape[0]:
        x[i] = v


def _blocks(n: int) -> int:
    return max((n + THREADS - 1) // THREADS, 1)


def rms_norm(x: Any, w: Any, eps: float, out: Any, stream: Any) -> None:
    """out (T, n) = RMSNorm of x (T, n) times w (n,)."""
    _rms_norm[x.shape[0], THREADS, stream](x, w, np.float32(eps), out)


def rope(x: Any, pos: Any, cos: Any, sin: Any, neox: bool, stream: Any) -> None:
    """Rotate x (T, heads, head_dim) in place by the rope tables' rows pos (T,)."""
    n = x.shape[0] * x.shape[1] * cos.shape[1]
    _rope[_blocks(n), THREADS, stream](x, pos, cos, sin, neox)


def attention(q: Any, k: Any, v: Any, p0: int, out: Any, f16: bool, stream: Any) -> None:
    """Causal GQA: q (T, n_head, d) at positions p0.., k/v (n_ctx, n_head_kv, d) filled to p0 + T; out (T, n_head*d);
    `f16`: the cache holds fp16 values and the attention rounds as llama.cpp's does."""
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[2]} exceeds the GPU attention kernel's {MAX_HEAD_DIM}")
    (_attention_f16 if f16 else _attention)[q.shape[0] * q.shape[1], 32, stream](q, k, v, p0, out)


def store_kv(src: Any, dst: Any, f16: bool, stream: Any) -> None:
    """dst (T, n) = src (T, n), rounded to fp16 values when `f16`."""
    n = src.size
    _store_kv[_blocks(n), THREADS, stream](src.reshape(n), dst.reshape(n), f16)


def silu_mul(g: Any, u: Any, stream: Any) -> None:
    """g = silu(g) * u, for equal-shaped contiguous device arrays."""
    n = g.size
    _silu_mul[_blocks(n), THREADS, stream](g.reshape(n), u.reshape(n))


def add(x: Any, y: Any, stream: Any) -> None:
    """x += y for equal-shaped contiguous device arrays."""
    n = x.size
    _add[_blocks(n), THREADS, stream](x.reshape(n), y.reshape(n))


def add_bias(x: Any, b: Any, stream: Any) -> None:
    _add_bias[_blocks(x.size), THREADS, stream](x, b)


def gather(x: Any, rows: Any, out: Any, stream: Any) -> None:
    """out (n, cols) = x[rows] for device rows (n,) int64."""
    _gather[_blocks(rows.shape[0] * x.shape[1]), THREADS, stream](x, rows, out)


def scatter_add(out: Any, rows: Any, w: Any, y: Any, stream: Any) -> None:
    """out[rows] += w[:, None] * y, rows (n,) distinct."""
    _scatter_add[_blocks(rows.shape[0] * out.shape[1]), THREADS, stream](out, rows, w, y)


def sigmoid_gate_add(out: Any, g: Any, y: Any, stream: Any) -> None:
    """out += sigmoid(g) * y for g (T, 1)."""
    _sigmoid_gate_add[_blocks(out.size), THREADS, stream](out, g, y)


def zero(x: Any, stream: Any) -> None:
    """x = 0 for a contiguous device array."""
    n = x.size
    _fill[_blocks(n), THREADS, stream](x.reshape(n), np.float32(0))


# ---- activations as the CPU's integer kernels see them (hotcold.quant.int8) ----
# A matrix whose type the CPU computes in integers reads its input quantized to Q8_0 or Q8_K; on the GPU the
# input goes through the same quantization and back to float once per input, so that both devices compute
# the same products (as llama.cpp's CUDA kernels quantize activations to Q8_1).

@_jit
def _q8_0_roundtrip(x, out):  # one thread per 32 values of the flat x: ggml-cpu's x86 quantize_row_q8_0
    b = cuda.grid(1)
    if b < x.shape[0] // 32:
        amax = F32(0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        idv = F32(127.0) / amax if amax != F32(0) else F32(0)
        d = _f16_round(amax / F32(127.0))
        for j in range(32):
            out[32 * b + j] = F32(round(x[32 * b + j] * idv)) * d


@_jit
def _q8_k_roundtrip(x, out):  # one thread per 256 values: quantize_row_q8_K
    b = cuda.grid(1)
    if b < x.shape[0] // 256:
        vmax = F32(0)
        amax = F32(0)
        for j in range(256):
            ax = abs(x[256 * b + j])
            if ax > amax:
                amax = ax
                vmax = x[256 * b + j]
        if amax == F32(0):
            for j in range(256):
                out[256 * b + j] = F32(0)
        else:
            iscale = F32(-127.0) / vmax
            d = F32(1.0) / iscale
            for j in range(256):
                out[256 * b + j] = F32(min(127, round(iscale * x[256 * b + j]))) * d


def q8_roundtrip(x: Any, out: Any, block: int, stream: Any) -> None:
    """out = x quantized to Q8_0 (block 32) or Q8_K (block 256) and back, for contiguous device arrays."""
    n = x.size // block
    kernel = _q8_0_roundtrip if block == 32 else _q8_k_roundtrip
    kernel[_blocks(n), THREADS, stream](x.reshape(x.size), out.reshape(out.size))
