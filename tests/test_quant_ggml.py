"""hotcold.quant against libggml-base's reference functions called directly through ctypes.

Complements test_quant_oracle.py (whole-file llama_model_quantize): here every family meets
ggml_quantize_chunk, quantize_row_*_ref and dequantize_row_* block for block.
"""
from __future__ import annotations

import numpy as np
import pytest

from hotcold.quant import QType, dequantize, quantize

from quant_data import families

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.oracle
ggml_ref = pytest.importorskip("ggml_ref")

QUANTIZED = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K,
             QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.MXFP4]
# Types whose llama-quantize path is quantize_row_*_ref itself (IQ4_NL searches more scales).
ROW_REF = [t for t in QUANTIZED if t != QType.IQ4_NL] + [QType.Q8_K]
DATA = families(16, 512, seed=7)


@pytest.fixture(scope="module")
def lib():
    try:
        return ggml_ref.load()
    except (ImportError, OSError) as e:
        pytest.skip(f"libggml-base not available: {e}")


def _first_diff(a: np.ndarray, b: np.ndarray) -> str:
    idx = np.argwhere(a != b)
    return f"{len(idx)} bytes differ, first at {tuple(idx[0])}" if len(idx) else "equal"


@pytest.mark.parametrize("family", sorted(DATA))
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_quantize_matches_ggml_quantize_chunk(lib, qtype: QType, family: str) -> None:
    x = DATA[family]
    ours, ref = quantize(x, qtype), ggml_ref.quantize_chunk(lib, x, qtype)
    assert np.array_equal(ours, ref), _first_diff(ours, ref)


@pytest.mark.parametrize("family", sorted(DATA))
@pytest.mark.parametrize("qtype", ROW_REF, ids=lambda t: t.name)
def test_quantize_matches_row_ref(lib, qtype: QType, family: str) -> None:
    x = DATA[family]
    ours, ref = quantize(x, qtype), ggml_ref.quantize_row_ref(lib, x, qtype)
    assert np.array_equal(ours, ref), _first_diff(ours, ref)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_matches_dequantize_row(lib, qtype: QType) -> None:
    raw = quantize(DATA["outliers"], qtype)
    np.testing.assert_array_equal(dequantize(raw, qtype), ggml_ref.dequantize_row(lib, raw, qtype))


def test_q8_k_roundtrip_is_the_activation_format(lib) -> None:
    # Q8_K has no gguf-py dequantizer; check ours against ggml's on the bytes both agree on.
    raw = quantize(DATA["normal"], QType.Q8_K)
    np.testing.assert_array_equal(dequantize(raw, QType.Q8_K), ggml_ref.dequantize_row(lib, raw, QType.Q8_K))
