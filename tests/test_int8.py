"""The integer kernels (quant/int8.py): llama.cpp's activation quantizers and dot products, on this machine."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotcold.quant import QType, dequantize, int8, quantize, simd

pytestmark = pytest.mark.skipif(not simd.AVAILABLE, reason="no AVX2: the float kernels serve every type")

TYPES = sorted(int8.KERNELS, key=lambda t: t.name)


def _acts(x: np.ndarray, fmt: QType) -> int8.Acts:
    a = int8.Acts(x.shape[0], x.shape[1]).bind(x)
    a.need(fmt)
    return a


def _dequant_acts(a: int8.Acts, fmt: QType) -> np.ndarray:
    """The float64 values the integer kernels compute with."""
    T = a.rows
    if fmt == QType.Q8_K:
        return (a.q8k[:T].reshape(T, -1, 256).astype(np.float64) * a.q8k_d[:T, :, None]).reshape(T, -1)
    return (a.q80[:T].reshape(T, -1, 32).astype(np.float64) * a.q80_d[:T, :, None]).reshape(T, -1)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(TYPES), st.integers(1, 9), st.integers(1, 11), st.integers(1, 3), st.integers(0, 2**31))
def test_products_equal_the_quantized_operands_product(t: QType, rows: int, T: int, blocks: int, seed: int) -> None:
    """Every shape, tiles with remainders included: the integer product is that of the two quantized operands."""
    rng = np.random.default_rng(seed)
    n = 256 * blocks
    raw = quantize(rng.standard_normal((rows, n)).astype(np.float32), t)
    x = (rng.standard_normal((T, n)) * rng.uniform(0.1, 10)).astype(np.float32)
    out = np.full((T, rows), np.nan, np.float32)
    a = int8.Acts(T, n).bind(x)
    int8.product(raw, t, a, out)
    xd, wd = _dequant_acts(a, int8.KERNELS[t][0]), dequantize(raw, t).astype(np.float64)
    ref = xd @ wd.T
    scale = np.abs(xd) @ np.abs(wd).T               # float rounding is relative to the terms, not their sum
    assert (np.abs(out - ref) <= 1e-6 * scale).all()



@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(int8.GLU, key=lambda t: t.name)), st.integers(1, 40), st.integers(1, 3),
       st.integers(0, 2**31))
def test_fused_swiglu_equals_two_products_then_silu(t: QType, rows: int, blocks: int, seed: int) -> None:
    """The decode GLU kernel (gate and up in one pass, SiLU applied in it) gives the bits of product, product,
    silu_mul: rows on both sides of the 16-row SIMD boundary, large and small gate values."""
    from hotcold.engine.kernels import silu_mul
    rng = np.random.default_rng(seed)
    n = 256 * blocks
    wg, wu = (quantize(rng.standard_normal((rows, n)).astype(np.float32), t) for _ in range(2))
    a = int8.Acts(1, n).bind((rng.standard_normal((1, n)) * rng.uniform(0.01, 3)).astype(np.float32))
    g, u, fused = (np.full((1, rows), np.nan, np.float32) for _ in range(3))
    int8.product(wg, t, a, g)
    int8.product(wu, t, a, u)
    silu_mul(g, u)
    int8.swiglu_product(wg, wu, t, a, fused, np.full((1, rows), np.nan, np.float32))
    assert np.array_equal(fused.view(np.uint32), g.view(np.uint32))

@pytest.mark.parametrize("t", [QType.Q4_K, QType.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("sign", [1, -1])
def test_largest_quants_and_activations_do_not_saturate(t: QType, sign: int) -> None:
    """Every quant, scale and min at its largest (15 or 31, 63) against activations at +-127: the sub-block sums the
    Q4_K / Q5_K blocks pack to int16 (quant/simd.py) are at their bound, and every row count still gives the
    exact product."""
    n, rows = 512, 8
    ts = 144 if t == QType.Q4_K else 176
    raw = np.full((rows, n // 256 * ts), 0xFF, np.uint8)
    blocks = raw.reshape(rows, -1, ts)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)        # d
    blocks[:, :, 2:4] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)       # dmin
    wd = dequantize(raw, t).astype(np.float64)
    assert np.all(wd == 0.5 * 63 * (15 if t == QType.Q4_K else 31) - 0.25 * 63)
    x = np.full((12, n), sign, np.float32)
    x[:, ::256] = -sign                                 # the block's first, its largest: the others quantize to +-127
    for T in (1, 2, 3, 4, 5, 8, 9, 12):
        a = int8.Acts(T, n).bind(x[:T].copy())
        out = np.full((T, rows), np.nan, np.float32)
        int8.product(raw, t, a, out)
        xd = _dequant_acts(a, QType.Q8_K)
        assert np.abs(a.q8k[:T]).min() == 127
        ref = xd @ wd.T
        assert np.allclose(out, ref, rtol=1e-6, atol=0), T


def test_zero_blocks_quantize_to_zero() -> None:
    x = np.zeros((2, 512), np.float32)
    x[1, 300] = 3.0
    for fmt in (QType.Q8_K, QType.Q8_0):
        assert np.array_equal(_dequant_acts(_acts(x, fmt), fmt)[0], np.zeros(512))
    assert _dequant_acts(_acts(x, QType.Q8_K), QType.Q8_K)[1, 300] == pytest.approx(3.0, rel=1e-6)


def test_acts_are_quantized_once_per_binding() -> None:
    x = np.ones((1, 256), np.float32)
    a = _acts(x, QType.Q8_K)
    x[:] = 2                                       # the binding keeps what it quantized until bound again
    a.need(QType.Q8_K)
    assert _dequant_acts(a, QType.Q8_K)[0, 0] == pytest.approx(1.0)
    a.bind(x).need(QType.Q8_K)
    assert _dequant_acts(a, QType.Q8_K)[0, 0] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def traits():
    ggml_ref = pytest.importorskip("ggml_ref")
    try:
        return ggml_ref.CpuTraits()
    except (ImportError, OSError) as e:
        pytest.skip(f"libggml-cpu not loadable: {e}")


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", [QType.Q8_0, QType.Q8_K], ids=lambda t: t.name)
def test_activation_quantizers_equal_llama_cpp(traits, fmt: QType) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 1024)) * np.array([[1e-3], [1.0], [30.0], [1e4]])).astype(np.float32)
    x[0, :32] = 0                                   # an all-zero block
    x[1, 3], x[1, 10], x[1, 256 + 3], x[1, 256 + 10] = -5, 5, 5, -5   # ties of magnitude: the first one counts
    x[2, 512:768] = 0
    x[2, 600] = -0.0
    for row in x:
        ref = traits.from_float(row, fmt)
        a = _acts(row[None], fmt)
        if fmt == QType.Q8_0:
            blocks = ref.reshape(-1, 34)
            assert np.array_equal(blocks[:, 2:].view(np.int8).reshape(-1), a.q80[0])
            assert np.array_equal(dequantize(np.ascontiguousarray(blocks[:, :2]), QType.F16).reshape(-1), a.q80_d[0])
        else:
            blocks = ref.reshape(-1, 292)
            assert np.array_equal(blocks[:, 4:260].view(np.int8).reshape(-1), a.q8k[0])
            assert np.array_equal(np.ascontiguousarray(blocks[:, :4]).view(np.float32).reshape(-1), a.q8k_d[0])
            assert np.array_equal(np.ascontiguousarray(blocks[:, 260:]).view(np.int16).reshape(-1), a.q8k_b16[0])


@pytest.mark.oracle
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dot_products_equal_llama_cpp(traits, t: QType) -> None:
    rng = np.random.default_rng(2)
    n, rows = 2048, 16
    assert traits.vec_dot_type(t) == int8.KERNELS[t][0]
    raw = quantize(rng.standard_normal((rows, n)).astype(np.float32), t)
    x = rng.standard_normal((3, n)).astype(np.float32)
    out = np.zeros((3, rows), np.float32)
    int8.product(raw, t, int8.Acts(3, n).bind(x), out)
    one = np.zeros((1, rows), np.float32)
    int8.product(raw, t, int8.Acts(1, n).bind(x[:1]), one)
    for i in range(3):
        y = traits.from_float(x[i], traits.vec_dot_type(t))
        ref = np.array([traits.vec_dot(t, raw[r], y, n) for r in range(rows)], np.float32)
        assert np.abs(out[i] - ref).max() <= 1e-6 * np.abs(ref).max()
    assert np.abs(one[0] - out[0]).max() <= 1e-6 * np.abs(out[0]).max()


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(t: QType) -> None:
    """Products and SwiGLU of 2..9 rows (blocks of 4, 2 and 1 rows share each weight block's decoding) equal the
    one-row kernel's for every row, bit for bit: a batched sequence gets what it would alone; and the one-row
    kernels filling a slot (dst) give the same values while copying the weights exactly."""
    rng = np.random.default_rng(5)
    rows, n = 24, 512
    wg, wu = (quantize(rng.standard_normal((rows, n)).astype(np.float32), t) for _ in range(2))
    x = rng.standard_normal((9, n)).astype(np.float32)
    one, g1 = np.zeros((9, rows), np.float32), np.zeros((9, rows), np.float32)
    for i in range(9):
        int8.product(wg, t, int8.Acts(1, n).bind(x[i:i + 1].copy()), one[i:i + 1])
        int8.swiglu_product(wg, wu, t, int8.Acts(1, n).bind(x[i:i + 1].copy()), g1[i:i + 1], np.zeros((1, rows), np.float32))
    for T in range(2, 10):
        out = np.zeros((T, rows), np.float32)
        int8.product(wg, t, int8.Acts(T, n).bind(x[:T].copy()), out)
        assert np.array_equal(out, one[:T]), T
        if T <= int8.FEW:
            g, u = np.zeros((T, rows), np.float32), np.zeros((T, rows), np.float32)
            int8.swiglu_product(wg, wu, t, int8.Acts(T, n).bind(x[:T].copy()), g, u)
            assert np.array_equal(g, g1[:T]), T
    dst, dg, du = (np.zeros_like(wg) for _ in range(3))
    filled, gf = np.zeros((1, rows), np.float32), np.zeros((1, rows), np.float32)
    int8.product(wg, t, int8.Acts(1, n).bind(x[:1].copy()), filled, dst)
    int8.swiglu_product(wg, wu, t, int8.Acts(1, n).bind(x[:1].copy()), gf, np.zeros((1, rows), np.float32), dg, du)
    assert np.array_equal(filled, one[:1]) and np.array_equal(gf, g1[:1])
    assert np.array_equal(dst, wg) and np.array_equal(dg, wg) and np.array_equal(du, wu)
