"""Bad input to hotcold.quant raises QuantError with a message that names the problem."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from hotcold.quant import QType, QuantError, dequantize, quantize, resolve


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("t", ["Q8_0", "Q4_K", "F16", "BF16"])
def test_non_finite_input(bad: float, t: str) -> None:
    x = np.ones((2, 256), dtype=np.float32)
    x[1, 17] = bad
    with pytest.raises(QuantError, match=r"non-finite.*\(1, 17\)"):
        quantize(x, t)


@pytest.mark.parametrize("t,n", [("Q4_K", 300), ("Q8_0", 33), ("Q2_K", 128)])
def test_row_length_not_multiple_of_block(t: str, n: int) -> None:
    with pytest.raises(QuantError, match=rf"row length {n} is not a multiple of the {t} block size"):
        quantize(np.zeros((1, n), dtype=np.float32), t)


@pytest.mark.parametrize("name", ["Q4_Z", "q9_0", ""])
def test_unknown_type_name(name: str) -> None:
    with pytest.raises(QuantError, match="unknown quantization type"):
        quantize(np.zeros((1, 256), dtype=np.float32), name)


def test_unsupported_type() -> None:
    with pytest.raises(QuantError, match="IQ2_XXS is not supported"):
        resolve(gguf.GGMLQuantizationType.IQ2_XXS)


def test_type_names_are_case_insensitive() -> None:
    assert resolve("q4_k") is QType.Q4_K
    assert resolve(QType.Q8_0) is QType.Q8_0
    assert resolve(int(QType.Q6_K)) is QType.Q6_K


@pytest.mark.parametrize("t,nbytes", [("Q4_K", 143), ("Q8_0", 35), ("F32", 6)])
def test_wrong_byte_length(t: str, nbytes: int) -> None:
    with pytest.raises(QuantError, match=r"not a whole number of .* blocks"):
        dequantize(np.zeros((2, nbytes), dtype=np.uint8), t)


def test_dequantize_needs_bytes() -> None:
    with pytest.raises(QuantError, match="uint8"):
        dequantize(np.zeros((1, 144), dtype=np.float32), "Q4_K")


def test_quantize_needs_numbers() -> None:
    with pytest.raises(QuantError, match="dtype"):
        quantize(np.array([["a"] * 32]), "Q8_0")


def test_shapes_follow_gguf_py() -> None:
    x = np.zeros((2, 3, 512), dtype=np.float32)
    for t in (QType.Q4_K, QType.Q8_0, QType.F16, QType.F32):
        q = quantize(x, t)
        assert q.dtype == np.uint8
        assert q.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, t)
        assert dequantize(q, t).shape == x.shape


def test_f16_overflow_names_the_value_and_the_fix() -> None:
    x = np.full((1, 32), 1e6, dtype=np.float32)
    with pytest.raises(QuantError, match=r"1e\+06 as F16.*use BF16 or F32"):
        quantize(x, "F16")
