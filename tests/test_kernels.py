"""hotcold.quant.matvec / matmul against dequantize-then-multiply in float64, for every weight type.

The kernels keep activations in float32, so they must agree with the float64 product of the dequantized
weights to float32 rounding: |error| <= RTOL * sum_j |w_ij * x_j| for every output.
"""
from __future__ import annotations

import numpy as np
import pytest

from hotcold.quant import (
    WEIGHT_TYPES, QType, QuantError, block_size, dequantize, matmul, matvec, quantize, row_bytes, type_size,
)
from hotcold.quant.fp import F16_TO_F32
from hotcold.quant.legacy import KVALUES_IQ4NL, KVALUES_MXFP4

RTOL = 1e-5
ROWS = 37  # odd, so the rows do not split evenly over threads
M = 6      # activation rows of matmul: one group of four, then a remainder of two

# Offsets of the fp16 scale fields in each block type (block_q*_* in ggml-common.h).
F16_FIELDS = {
    QType.Q8_0: (0,), QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2),
    QType.IQ4_NL: (0,), QType.MXFP4: (), QType.Q2_K: (80, 82), QType.Q3_K: (108,),
    QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,),
}
FLOATS = (QType.F32, QType.F16, QType.BF16)
BLOCKS = tuple(t for t in WEIGHT_TYPES if t not in FLOATS)
# Types whose quantizer these tests may use; K-quant blocks come from random bytes.
QUANTIZED = FLOATS + (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.IQ4_NL, QType.MXFP4)


def cols(t: QType) -> int:
    """A row length that leaves partial work everywhere: a part-filled 256-weight group for the matmul
    kernels, and for the float types a tail past the last 32 lanes."""
    if block_size(t) == 256:
        return 768
    return 800 if block_size(t) == 32 else 813


def random_blocks(t: QType, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of type t with finite scales: every bit pattern of the quants is a valid block."""
    if t in FLOATS:
        return quantize(rng.standard_normal((rows, n)).astype(np.float32), t)
    nb = n // block_size(t)
    w = rng.integers(0, 256, size=(rows, nb, type_size(t)), dtype=np.uint8)
    if t == QType.MXFP4:
        w[..., 0] = rng.integers(118, 136, size=(rows, nb), dtype=np.uint8)
    for o in F16_FIELDS[t]:
        h = rng.uniform(1e-3, 1e-1, size=(rows, nb)) * rng.choice([-1.0, 1.0], size=(rows, nb))
        h = h.astype(np.float16).view(np.uint16)
        w[..., o] = h & 0xFF
        w[..., o + 1] = h >> 8
    return w.reshape(rows, -1)


def weights(t: QType, source: str, rows: int = ROWS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = cols(t)
    if source == "quantized":
        return quantize(rng.standard_normal((rows, n)).astype(np.float32) * np.float32(0.1), t)
    return random_blocks(t, rows, n, rng)


def check_close(got: np.ndarray, w: np.ndarray, t: QType, X: np.ndarray) -> None:
    W = dequantize(w, t).astype(np.float64)
    X = X.astype(np.float64)
    want = X @ W.T
    bound = RTOL * (np.abs(X) @ np.abs(W).T)
    bad = np.abs(got - want) > bound
    assert not bad.any(), (
        f"{t.name}: {bad.sum()} outputs off, worst error {np.abs(got - want).max():.3g} against bound "
        f"{bound[bad].min():.3g}"
    )


CASES = [(t, "quantized") for t in QUANTIZED] + [(t, "random") for t in BLOCKS]


@pytest.mark.parametrize("t,source", CASES, ids=[f"{t.name}-{s}" for t, s in CASES])
def test_matvec_matches_dequantize(t: QType, source: str) -> None:
    w = weights(t, source)
    x = np.random.default_rng(1).standard_normal(cols(t)).astype(np.float32)
    y = matvec(w, t, x)
    assert y.dtype == np.float32 and y.shape == (ROWS,)
    check_close(y[None, :], w, t, x[None, :])


@pytest.mark.parametrize("t,source", CASES, ids=[f"{t.name}-{s}" for t, s in CASES])
def test_matmul_matches_dequantize(t: QType, source: str) -> None:
    w = weights(t, source)
    X = np.random.default_rng(2).standard_normal((M, cols(t))).astype(np.float32)
    Y = matmul(w, t, X)
    assert Y.dtype == np.float32 and Y.shape == (M, ROWS)
    check_close(Y, w, t, X)


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=lambda t: t.name)
def test_matmul_of_one_row_is_matvec(t: QType) -> None:
    w = weights(t, "random")
    x = np.random.default_rng(3).standard_normal(cols(t)).astype(np.float32)
    np.testing.assert_array_equal(matmul(w, t, x[None, :])[0], matvec(w, t, x))


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=lambda t: t.name)
def test_out_is_filled_and_returned(t: QType) -> None:
    w = weights(t, "random")
    rng = np.random.default_rng(4)
    x = rng.standard_normal(cols(t)).astype(np.float32)
    X = rng.standard_normal((M, cols(t))).astype(np.float32)
    out = np.full(ROWS, np.nan, dtype=np.float32)
    assert matvec(w, t, x, out=out) is out
    np.testing.assert_array_equal(out, matvec(w, t, x))
    out2 = np.full((M, ROWS), np.nan, dtype=np.float32)
    assert matmul(w, t, X, out=out2) is out2
    np.testing.assert_array_equal(out2, matmul(w, t, X))


@pytest.mark.parametrize("t", [QType.Q4_K, QType.Q8_0, QType.F16], ids=lambda t: t.name)
def test_strided_and_read_only_inputs(t: QType) -> None:
    w = weights(t, "random", rows=2 * ROWS)
    rng = np.random.default_rng(5)
    x2 = rng.standard_normal(2 * cols(t)).astype(np.float32)
    w_ro = w.copy()
    w_ro.flags.writeable = False
    want = matvec(np.ascontiguousarray(w[::2]), t, np.ascontiguousarray(x2[::2]))
    np.testing.assert_array_equal(matvec(w[::2], t, x2[::2]), want)
    np.testing.assert_array_equal(matvec(w_ro, t, x2[::2].copy())[::2], want)


def test_empty_shapes() -> None:
    w = weights(QType.Q4_0, "random")
    assert matvec(w[:0], "Q4_0", np.zeros(cols(QType.Q4_0), np.float32)).shape == (0,)
    assert matmul(w, "Q4_0", np.zeros((0, cols(QType.Q4_0)), np.float32)).shape == (0, ROWS)


@pytest.mark.parametrize("t,view", [(QType.F16, np.float16), (QType.BF16, None)], ids=["F16", "BF16"])
def test_every_16_bit_float_pattern(t: QType, view: type | None) -> None:
    """The kernels convert fp16 (F16C's conversion where the CPU has it) and bf16 without a table: check all 65536
    patterns exactly."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    w = np.zeros((65536, 32), dtype=np.uint16)
    w[:, 0] = bits
    x = np.zeros(32, dtype=np.float32)
    x[0] = 1.0
    want = F16_TO_F32[bits] if view is not None else (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(matvec(w.view(np.uint8), t, x), want)


def test_the_fp16_formula_without_f16c() -> None:
    """The bit formula the kernels use where the CPU lacks F16C, on all 65536 patterns (NaN stays NaN)."""
    from numba import njit

    from hotcold.quant.kernels import _f16_bits_to_f32

    @njit
    def convert(b: np.ndarray, out: np.ndarray) -> None:
        for i in range(b.shape[0]):
            out[i] = _f16_bits_to_f32(b[i])

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.zeros(65536, np.float32)
    convert(bits, out)
    np.testing.assert_array_equal(out, F16_TO_F32[bits])


@pytest.mark.parametrize("t", [QType.IQ4_NL, QType.MXFP4], ids=lambda t: t.name)
def test_codebook_values_are_exact(t: QType) -> None:
    """IQ4_NL and MXFP4 matvec compute their 16 code values arithmetically: each must come out exact."""
    scale = [0x00, 0x3C] if t == QType.IQ4_NL else [128]  # fp16 1.0, or e8m0 for a (halved) scale of 1
    codes = np.arange(16, dtype=np.uint8)
    w = np.array([scale + list(codes | ((15 - codes) << 4))], dtype=np.uint8)
    want = dequantize(w, t)[0]
    got = [matvec(w, t, np.eye(32, dtype=np.float32)[i])[0] for i in range(32)]
    np.testing.assert_array_equal(want[:16], KVALUES_IQ4NL if t == QType.IQ4_NL else KVALUES_MXFP4)
    np.testing.assert_array_equal(got, want)


def test_errors_name_the_problem() -> None:
    t = QType.Q4_K
    w = weights(t, "random")
    n = cols(t)
    x = np.zeros(n, dtype=np.float32)
    with pytest.raises(QuantError, match="uint8 bytes of Q4_K blocks, not float32"):
        matvec(w.view(np.float32), t, x[: n // 4])
    with pytest.raises(QuantError, match="weights must be 2-d"):
        matvec(w.reshape(-1), t, x)
    with pytest.raises(QuantError, match=rf"{row_bytes(t, n)} bytes per row, but 512 Q4_K weights take 288"):
        matvec(w, t, x[:512])
    with pytest.raises(QuantError, match="row length 500 is not a multiple of the Q4_K block size 256"):
        matvec(w, t, x[:500])
    with pytest.raises(QuantError, match="x must be float32, not float64"):
        matvec(w, t, x.astype(np.float64))
    with pytest.raises(QuantError, match="x must be 1-d"):
        matvec(w, t, x[None, :])
    with pytest.raises(QuantError, match="X must be 2-d"):
        matmul(w, t, x)
    with pytest.raises(QuantError, match=rf"out must be a float32 array of shape \({ROWS},\), not a float32 array"):
        matvec(w, t, x, out=np.zeros(ROWS + 1, np.float32))
    with pytest.raises(QuantError, match="not a float64 array"):
        matvec(w, t, x, out=np.zeros(ROWS, np.float64))
    with pytest.raises(QuantError, match=rf"shape \(2, {ROWS}\)"):
        matmul(w, t, np.zeros((2, n), np.float32), out=np.zeros((ROWS, 2), np.float32))
    with pytest.raises(QuantError, match="C-contiguous and writable"):
        matmul(w, t, np.zeros((2, n), np.float32), out=np.zeros((ROWS, 2), np.float32).T)
    with pytest.raises(QuantError, match="Q8_K is an activation format"):
        matvec(w, "Q8_K", x)
    with pytest.raises(QuantError, match="unknown quantization type"):
        matvec(w, "Q4_Z", x)
