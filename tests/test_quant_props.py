"""Property tests of hotcold.quant: round-trip error bounds, degenerate blocks, agreement with gguf-py."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hotcold.quant import QType, block_size, dequantize, quantize, type_size

# Worst |dequantize(quantize(x)) - x| allowed, as a fraction of the largest |x| in the same
# 256-weight span. Symmetric types with levels -n..n-1 clip the opposite extreme by one step (1/n);
# min/max types are off by half a step of the range; MXFP4's power-of-two scale clips up to 1/4;
# plus fp16 and 4/6/8-bit sub-scale rounding. Q2_K fits each 16 weights with weights |x|, so a
# near-zero weight beside large ones costs nothing and may land a whole span away.
REL_BOUND = {
    QType.F32: 0.0, QType.F16: 2.0**-11, QType.BF16: 2.0**-8,
    QType.Q8_0: 0.0045, QType.Q8_K: 0.0045, QType.Q6_K: 0.04, QType.Q5_0: 0.066, QType.Q5_1: 0.035,
    QType.Q5_K: 0.05, QType.Q4_0: 0.13, QType.Q4_1: 0.07, QType.IQ4_NL: 0.13, QType.Q4_K: 0.1,
    QType.MXFP4: 0.26, QType.Q3_K: 0.3, QType.Q2_K: 1.0,
}
TYPES = list(REL_BOUND)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)
common = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def span_amax(x: np.ndarray) -> np.ndarray:
    """Largest |x| of each 256-weight span, broadcast back over the span."""
    a = np.abs(x).reshape(x.shape[0], -1, 256).max(axis=-1, keepdims=True)
    return np.broadcast_to(a, x.shape[:1] + (x.shape[1] // 256, 256)).reshape(x.shape)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@common
@given(x=arrays(np.float32, (2, 512), elements=finite), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_roundtrip_error_within_bound(t: QType, x: np.ndarray, scale: float) -> None:
    x = (x * np.float32(scale)).astype(np.float32)
    err = np.abs(dequantize(quantize(x, t), t) - x)
    amax = span_amax(x)
    # fp16 scales cannot resolve a span whose largest value is far below its subnormal range
    tiny = np.float32(6e-5 * 127)
    allowed = REL_BOUND[t] * amax + np.where(amax < tiny, tiny * 0.02, 0)
    assert (err <= allowed * 1.0001 + 1e-30).all(), f"{t.name}: worst {float((err - allowed).max())}"


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_zero_blocks_are_exact(t: QType) -> None:
    x = np.zeros((3, 512), dtype=np.float32)
    assert np.array_equal(dequantize(quantize(x, t), t), x)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@common
@given(c=st.floats(min_value=-100, max_value=100, allow_nan=False, width=32).filter(lambda v: abs(v) > 1e-3))
def test_constant_blocks(t: QType, c: float) -> None:
    x = np.full((1, 512), c, dtype=np.float32)
    y = dequantize(quantize(x, t), t)
    assert np.allclose(y, c, rtol=REL_BOUND[t] + 2.0**-10, atol=0), f"{t.name}: {y[0, :4]} for {c}"
    assert np.ptp(y) == 0, "a constant block must dequantize to a constant"


# Bytes of any pattern are a valid block (NaN/Inf scales included): both readers must agree bit for bit.
@pytest.mark.parametrize("t", [t for t in TYPES if t != QType.Q8_K], ids=lambda t: t.name)
@common
@given(data=st.data())
def test_dequantize_matches_gguf_py_on_arbitrary_bytes(t: QType, data: st.DataObject) -> None:
    nblocks = data.draw(st.integers(1, 24))
    blob = data.draw(st.binary(min_size=nblocks * type_size(t), max_size=nblocks * type_size(t)))
    raw = np.frombuffer(blob, dtype=np.uint8).reshape(1, -1)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(raw, t)
    ours = dequantize(raw, t)
    assert ours.shape == (1, nblocks * block_size(t))
    # bit for bit, except the payload of NaNs that NaN scales produce
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(ours[~np.isnan(ours)].view(np.uint32), theirs[~np.isnan(theirs)].view(np.uint32))


@pytest.mark.parametrize("t", [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.MXFP4, QType.BF16, QType.F16],
                         ids=lambda t: t.name)
@common
@given(x=arrays(np.float32, (3, 64), elements=finite))
def test_quantize_matches_gguf_py_where_it_quantizes(t: QType, x: np.ndarray) -> None:
    # gguf-py's legacy quantizers are byte-exact ports except on signed zeros, where hotcold follows
    # ggml's C (checked in test_quant_ggml.py): compare on data without -0.
    x = x + np.float32(0.0)
    np.testing.assert_array_equal(quantize(x, t), gguf.quants.quantize(x, t).view(np.uint8))
