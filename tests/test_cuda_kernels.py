"""hotcold.quant.cuda: the CUDA GEMV/GEMM kernels against the CPU kernels and dequantize-then-multiply.

Without a GPU, conftest.py turns on Numba's CUDA simulator, which runs every CUDA thread as a Python thread:
shapes here stay tiny. One test, on a real GPU only, checks a 4096 x 4096 product.
"""
from __future__ import annotations

import numpy as np
import pytest

from hotcold.quant import QType, QuantError, dequantize, kernels, quantize, row_bytes
from hotcold.quant import cuda as qcuda

pytestmark = pytest.mark.skipif(not qcuda.available(), reason="no CUDA GPU and no Numba CUDA simulator")

RTOL = 1e-4
ROWS = 5  # not a multiple of qcuda.WARPS: the last thread block is part-empty
TYPES = tuple(qcuda.CUDA_MATVEC)
K_QUANTS = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
K_F16_FIELDS = {QType.Q2_K: (80, 82), QType.Q3_K: (108,), QType.Q4_K: (0, 2), QType.Q5_K: (0, 2),
                QType.Q6_K: (208,)}


def cols(t: QType) -> int:
    # float types: a row length that leaves some lanes a shorter stride than others
    return 200 if t in (QType.F32, QType.F16, QType.BF16) else 256


def case(t: QType, rows: int = ROWS, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = cols(t) if n is None else n
    return quantize(rng.standard_normal((rows, n)).astype(np.float32), t), rng


def check(got: np.ndarray, raw: np.ndarray, t: QType, X: np.ndarray) -> None:
    """|got - W X| <= RTOL * |W| |X| elementwise, W dequantized, the product in float64."""
    W = dequantize(raw, t).astype(np.float64)
    Xd = X.astype(np.float64)
    want = Xd @ W.T if X.ndim == 2 else W @ Xd
    scale = np.abs(Xd) @ np.abs(W).T if X.ndim == 2 else np.abs(W) @ np.abs(Xd)
    np.testing.assert_array_less(np.abs(got - want), RTOL * scale + 1e-30)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matvec(t: QType) -> None:
    raw, rng = case(t)
    x = rng.standard_normal(cols(t)).astype(np.float32)
    got = qcuda.matvec(qcuda.to_device_weights(raw, t, x.size), t, x).copy_to_host()
    assert got.shape == (ROWS,) and got.dtype == np.float32
    check(got, raw, t, x)
    cpu = kernels.matvec(raw, t, x)
    np.testing.assert_allclose(got, cpu, rtol=0, atol=RTOL * float(np.abs(cpu).max()))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul(t: QType) -> None:
    raw, rng = case(t, seed=1)
    X = rng.standard_normal((3, cols(t))).astype(np.float32)
    got = qcuda.matmul(raw, t, X).copy_to_host()  # host arrays are copied over
    assert got.shape == (3, ROWS)
    check(got, raw, t, X)
    cpu = kernels.matmul(raw, t, X)
    np.testing.assert_allclose(got, cpu, rtol=0, atol=RTOL * float(np.abs(cpu).max()))


def test_two_super_blocks_per_row() -> None:
    """512 columns, 32 16-weight Q5_K parts from two super-blocks: on a GPU one per lane of the warp, on the
    simulator (qcuda.LANES = 4) eight per lane."""
    raw, rng = case(QType.Q5_K, rows=3, n=512, seed=2)
    x = rng.standard_normal(512).astype(np.float32)
    check(qcuda.matvec(raw, QType.Q5_K, x).copy_to_host(), raw, QType.Q5_K, x)


@pytest.mark.parametrize("t", K_QUANTS, ids=lambda t: t.name)
def test_matvec_random_k_blocks(t: QType) -> None:
    """Random bytes (finite fp16 scales): every bit of the packed scales, mins and high bits is exercised."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(2, row_bytes(t, 256)), dtype=np.uint8)
    for o in K_F16_FIELDS[t]:
        h = (rng.uniform(1e-3, 1e-1, 2) * rng.choice([-1.0, 1.0], 2)).astype(np.float16).view(np.uint16)
        raw[:, o], raw[:, o + 1] = h & 0xFF, h >> 8
    x = rng.standard_normal(256).astype(np.float32)
    got = qcuda.matvec(raw, t, x).copy_to_host()
    check(got, raw, t, x)
    np.testing.assert_allclose(got, kernels.matvec(raw, t, x), rtol=0, atol=RTOL * float(np.abs(got).max()))


@pytest.mark.parametrize("t", (QType.F16, QType.BF16), ids=lambda t: t.name)
def test_float_bit_patterns(t: QType) -> None:
    """The in-kernel fp16/bf16 decoders are exact on edge patterns: subnormals, the smallest and largest
    normals, signed zeros (X = I reads each weight back alone), and Inf/NaN."""
    rng = np.random.default_rng(5)
    if t == QType.F16:  # +-0, subnormals, smallest normal, +-65504, 1, -2
        edge, top = [0x0000, 0x8000, 0x0001, 0x8001, 0x0200, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xC000], 0x7C00
    else:
        edge, top = [0x0000, 0x8000, 0x0001, 0x8001, 0x0040, 0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0xC000], 0x7F80
    bits = np.concatenate([edge, rng.integers(0, top, 32 - len(edge))]).astype(np.uint16)
    bits[len(edge)::2] |= 0x8000
    if t == QType.F16:
        want = bits.view(np.float16).astype(np.float32)
    else:
        want = (bits.astype(np.uint32) << 16).view(np.float32)
    got = qcuda.matmul(bits.view(np.uint8).reshape(1, 64), t, np.eye(32, dtype=np.float32)).copy_to_host()
    np.testing.assert_array_equal(got[:, 0], want)
    inf, nan = (0x7C00, 0x7E00) if t == QType.F16 else (0x7F80, 0x7FC0)
    special = np.array([[inf], [inf | 0x8000], [nan]], np.uint16).view(np.uint8)
    got = qcuda.matvec(special, t, np.ones(1, np.float32)).copy_to_host()
    assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])


def test_device_arrays_and_out() -> None:
    from numba import cuda
    t = QType.Q4_0
    raw, rng = case(t, rows=3)
    x = rng.standard_normal(256).astype(np.float32)
    w_dev = qcuda.to_device_weights(raw, t, 256)
    assert w_dev.shape == raw.shape and w_dev.dtype == np.uint8
    out = cuda.device_array(3, dtype=np.float32)
    assert qcuda.matvec(w_dev, "q4_0", cuda.to_device(x), out) is out
    check(out.copy_to_host(), raw, t, x)
    # F16 rows live on the device as uint16
    assert qcuda.to_device_weights(quantize(np.ones((2, 64), np.float32), "f16"), "f16", 64).dtype == np.uint16


def test_empty() -> None:
    raw = np.empty((0, row_bytes(QType.Q8_0, 64)), np.uint8)
    assert qcuda.matvec(raw, "q8_0", np.ones(64, np.float32)).shape == (0,)
    assert qcuda.matmul(quantize(np.ones((2, 64), np.float32), "q8_0"), "q8_0",
                        np.ones((0, 64), np.float32)).shape == (0, 2)


def test_errors() -> None:
    raw = quantize(np.ones((2, 64), np.float32), "q8_0")
    with pytest.raises(QuantError, match="bytes per row"):
        qcuda.to_device_weights(raw[:, :-1], "q8_0", 64)
    with pytest.raises(QuantError, match="bytes per row"):
        qcuda.matvec(raw, "q8_0", np.ones(96, np.float32))
    with pytest.raises(QuantError, match="not a weight type"):
        qcuda.to_device_weights(raw, "q8_k", 64)
    with pytest.raises(QuantError, match="not a weight type"):
        qcuda.matvec(raw, "q8_k", np.ones(64, np.float32))
    with pytest.raises(QuantError, match="must be uint8"):
        qcuda.to_device_weights(raw.view(np.uint16), "q8_0", 64)
    with pytest.raises(QuantError, match="unknown quantization type"):
        qcuda.matvec(raw, "q9_9", np.ones(64, np.float32))
    w_dev = qcuda.to_device_weights(raw, "q8_0", 64)
    with pytest.raises(QuantError, match=r"device weights must be uint8 of shape \(rows, 102\)"):
        qcuda.matvec(w_dev, "q8_0", np.ones(96, np.float32))
    with pytest.raises(QuantError, match="float32"):
        qcuda.matvec(w_dev, "q8_0", np.ones(64, np.float64))
    with pytest.raises(QuantError, match="out must be"):
        qcuda.matvec(w_dev, "q8_0", np.ones(64, np.float32), qcuda.cuda.device_array(3, np.float32))


@pytest.mark.skipif(qcuda.simulated(), reason="needs a real CUDA GPU, not the simulator")
@pytest.mark.parametrize("t", (QType.Q8_0, QType.Q4_K, QType.Q6_K, QType.F16), ids=lambda t: t.name)
def test_large_on_gpu(t: QType) -> None:
    rows = n = 4096
    raw, rng = case(t, rows=rows, n=n, seed=4)
    x = rng.standard_normal(n).astype(np.float32)
    X = rng.standard_normal((5, n)).astype(np.float32)
    w_dev = qcuda.to_device_weights(raw, t, n)
    got = qcuda.matvec(w_dev, t, x).copy_to_host()
    cpu = kernels.matvec(raw, t, x)
    np.testing.assert_allclose(got, cpu, rtol=0, atol=RTOL * float(np.abs(cpu).max()))
    got = qcuda.matmul(w_dev, t, X).copy_to_host()
    cpu = kernels.matmul(raw, t, X)
    np.testing.assert_allclose(got, cpu, rtol=0, atol=RTOL * float(np.abs(cpu).max()))
