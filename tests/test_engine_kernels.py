"""The engine's float kernels (engine/kernels.py) against numpy references: ggml's v_expf, the fp16 rounding
of the F16 KV cache, the attention over either cache type, SiLU, the routing softmax."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from hotcold.engine import kernels


@njit
def _map(f, x, out):
    for i in range(x.shape[0]):
        out[i] = f(x[i])


@njit
def _exp(x):
    return kernels.v_expf(x)


@njit
def _r16(x):
    return kernels._round_f16(x)


def test_v_expf_is_within_its_error_bound() -> None:
    """ggml's SIMD exp: 1.45 ulp (+ 0.5 for the reference's own rounding); 0 below exp's float32 range."""
    x = np.linspace(-104, 88.7, 1_000_001).astype(np.float32)
    out = np.zeros_like(x)
    _map(_exp, x, out)
    ref = np.exp(x.astype(np.float64))
    normal = ref > 1.18e-38
    ulp = np.abs(out[normal] - ref[normal]) / np.spacing(ref[normal].astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 2.5
    assert out[x < -104 + 1e-3].max() == 0.0 and np.isinf(_exp_scalar(np.float32(200)))


def _exp_scalar(v: np.float32) -> np.float32:
    out = np.zeros(1, np.float32)
    _map(_exp, np.array([v], np.float32), out)
    return out[0]


def test_fp16_rounding_is_numpys_for_every_kind_of_value() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 500_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], rng.random(100_000).astype(np.float32),
                        np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 6.1035e-5, 6.1e-5, 5.96e-8, 2.98e-8,
                                  2.99e-8, 1e-45], np.float32)])
    out = np.zeros_like(x)
    _map(_r16, x, out)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


def _attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, f16: bool) -> np.ndarray:
    """Causal GQA in float64 from the operands the kernel rounds (llama.cpp's F16-cache attention)."""
    T, nh, d = q.shape
    g = nh // k.shape[1]
    r = (lambda a: a.astype(np.float16).astype(np.float64)) if f16 else (lambda a: a.astype(np.float64))
    out = np.zeros((T, nh * d))
    for t in range(T):
        n = p0 + t + 1
        for h in range(nh):
            s = (r(k[:n, h // g]) @ r(q[t, h])) / np.sqrt(d)
            p = np.exp(s - s.max())
            p = r((p / p.sum()).astype(np.float32))
            out[t, h * d:(h + 1) * d] = p @ r(v[:n, h // g])
    return out


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("T,p0", [(1, 0), (1, 37), (5, 0), (3, 20)])
def test_attention_matches_the_reference(f16: bool, T: int, p0: int) -> None:
    rng = np.random.default_rng(T * 100 + p0)
    n_ctx, nh, nkv, d = 64, 4, 2, 32
    q = rng.standard_normal((T, nh, d)).astype(np.float32)
    k32, v32 = (rng.standard_normal((n_ctx, nkv, d)).astype(np.float32) for _ in range(2))
    scratch = np.zeros((8, n_ctx + d), np.float32)
    out = np.zeros((T, nh * d), np.float32)
    if f16:
        k, v = np.zeros(k32.shape, np.uint16), np.zeros(v32.shape, np.uint16)
        kernels.store_f16(k32, k)
        kernels.store_f16(v32, v)
        assert np.array_equal(k.view(np.float16), k32.astype(np.float16))
        kernels.attention_f16(q, k, v, p0, out, scratch)
    else:
        kernels.attention(q, k32, v32, p0, out, scratch)
    ref = _attention_ref(q, k32, v32, p0, f16)
    assert np.abs(out - ref).max() <= 2e-3 * np.abs(ref).max()


def test_silu_mul_and_routing_softmax() -> None:
    rng = np.random.default_rng(1)
    for n in (16, 40, 64):                   # whole chunks of 16, and a libm tail
        g = (rng.standard_normal((3, n)) * 4).astype(np.float32)
        u = rng.standard_normal((3, n)).astype(np.float32)
        want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
        got = g.copy()
        kernels.silu_mul(got, u)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    for E in (8, 64, 70):
        logits = rng.standard_normal((2, E)).astype(np.float32)
        ids, w = np.zeros((2, 2), np.int64), np.zeros((2, 2), np.float32)
        kernels.route_softmax_topk(logits, 2, False, np.zeros(0, np.float32), np.zeros(0, np.float32), ids, w,
                                   np.zeros((3, E), np.float32))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        assert np.array_equal(ids, np.argsort(-p, -1, kind="stable")[:, :2])
        assert np.abs(w - np.take_along_axis(p, ids, -1)).max() <= 1e-6


def test_expert_copy_lays_the_three_matrices_out_in_order() -> None:
    """An arena load (kernels.copy_expert): chunk remainders and matrices of unequal sizes land byte for byte."""
    rng = np.random.default_rng(3)
    mats = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((7, 5000), (3, 16384), (1, 1))]
    dst = np.zeros(sum(m.size for m in mats) + 5, dtype=np.uint8)
    kernels.copy_expert(dst, *mats)
    assert np.array_equal(dst[:-5], np.concatenate([m.ravel() for m in mats]))
    assert not dst[-5:].any()
