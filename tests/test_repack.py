"""Q4_K interleaved by eights (quant/repack.py): every product is the same bits as the plain Q4_K kernels', so
repacked and plain copies of a matrix are interchangeable, and the engine repacks what stays resident."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hotcold import Model
from hotcold.engine.backend import CpuBackend
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.memory import owned_bytes
from hotcold.engine.model import Transformer
from hotcold.engine.weights import Layout, QMatrix, interleaved
from hotcold.quant import QType, int8, quantize, repack, simd

pytestmark = pytest.mark.skipif(not simd.AVAILABLE, reason="the integer kernels need AVX2")


def _both(w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T, n = x.shape
    plain, packed = np.full((T, w.shape[0]), np.nan, np.float32), np.full((T, w.shape[0]), np.nan, np.float32)
    int8.product(w, QType.Q4_K, int8.Acts(T, n).bind(x.copy()), plain)
    repack.product(repack.repack(w), int8.Acts(T, n).bind(x.copy()), packed)
    return plain, packed


@pytest.mark.parametrize("rows,n", [(8, 256), (16, 768), (40, 2048)])
def test_interleaved_products_equal_plain(rows: int, n: int) -> None:
    """Every activation-row count (one, a decode batch's 2-8, a prompt's passes of eight and the rest) gives the
    plain kernels' bits, rows of any scale, a zero activation row among them."""
    rng = np.random.default_rng(rows)
    w = quantize((rng.standard_normal((rows, n)) * rng.uniform(0.01, 10, (rows, 1))).astype(np.float32), QType.Q4_K)
    x = (rng.standard_normal((19, n)) * rng.uniform(0.01, 100, (19, 1))).astype(np.float32)
    x[3] = 0
    for T in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 19):
        plain, packed = _both(w, x[:T])
        assert np.array_equal(plain, packed), T
        assert np.isfinite(packed).all()


def test_largest_quants_scales_and_mins() -> None:
    """Every quant, 6-bit scale and min at its largest (the high bits of the scales in the packed bytes' top
    bits, which the repack unpacks) against activations at +-127: exact, and equal to the plain kernels."""
    n, rows = 512, 16
    raw = np.full((rows, n // 256 * 144), 0xFF, np.uint8)
    blocks = raw.reshape(rows, -1, 144)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blocks[:, :, 2:4] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
    x = np.full((9, n), -1, np.float32)
    x[:, ::256] = 1
    for T in (1, 4, 9):
        plain, packed = _both(raw, x[:T])
        assert np.array_equal(plain, packed), T
        expect = (0.5 * 63 * 15 - 0.25 * 63) * (n - 2 * n // 256)      # every weight alike, x = -1 but one a block
        assert np.allclose(packed, -expect, rtol=1e-6)


def test_scales_differ_per_row_and_sub_block() -> None:
    """Scales and mins set one by one (each of the 8 sub-blocks of each of the 8 rows its own value, low and high
    bits alike): a misplaced one in the interleaving changes a row's product."""
    n, rows = 256, 8
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (rows, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    x = rng.standard_normal((3, n)).astype(np.float32)
    for T in (1, 3):
        plain, packed = _both(raw, x[:T])
        assert np.array_equal(plain, packed)
    g = np.zeros((1, rows), np.float32)
    u = np.zeros((1, rows), np.float32)
    g2, u2 = g.copy(), u.copy()
    w2 = np.roll(raw, 1, axis=0)
    int8.swiglu_product(raw, w2, QType.Q4_K, int8.Acts(1, n).bind(x[:1].copy()), g, u)
    repack.swiglu_product(repack.repack(raw), repack.repack(w2), int8.Acts(1, n).bind(x[:1].copy()), g2, u2)
    assert np.array_equal(g, g2)


def test_what_is_interleaved() -> None:
    rng = np.random.default_rng(0)
    w = quantize(rng.standard_normal((16, 256)).astype(np.float32), QType.Q4_K)
    m = QMatrix(w, QType.Q4_K, 16, 256)
    p = interleaved(m)
    assert p.layout is Layout.X8 and p.raw.shape == repack.packed_shape(16, 144) and not p.raw.flags.writeable
    assert interleaved(p) is p
    odd = QMatrix(w[:12], QType.Q4_K, 12, 256)                  # not whole groups of eight rows: kept
    assert interleaved(odd) is odd
    q8 = quantize(rng.standard_normal((16, 256)).astype(np.float32), QType.Q8_0)
    assert interleaved(QMatrix(q8, QType.Q8_0, 16, 256)).layout is Layout.ROWS


def test_engine_logits_equal_with_and_without_repack(trained_q4k: Path) -> None:
    """A Q4_K model's logits, prompt and decode, are the same bits with its matrices interleaved (the backend's
    place) and as the file has them; the plain store serves interleaved experts, the file's stay the source."""
    path = trained_q4k
    out = []
    for on in (False, True):
        model = Transformer.load(GGUFFile(path), CpuBackend(repack=on), place_experts=on)
        ctx = model.context(32, 16)
        z = [model.forward(np.array([1, 5, 9, 3]), ctx).copy(), model.forward(np.array([7]), ctx).copy()]
        out.append(z)
        layouts = {m.layout for layer in model.experts.experts for e in layer for m in (e.gate, e.up, e.down)}
        assert layouts == {Layout.X8 if on else Layout.ROWS}
        assert model.blocks[0].attn_q.layout is (Layout.X8 if on else Layout.ROWS)
        assert {m.layout for layer in model.file_experts for e in layer for m in (e.gate, e.up, e.down)} == \
            {Layout.ROWS}
    for a, b in zip(*out):
        assert np.array_equal(a, b)


def test_model_repacks_unless_told_not_to(trained_q4k: Path) -> None:
    """Model interleaves by default (llama.cpp's default repack), no_repack (-nr, --no-repack) keeps the file's
    layout; an expert store keeps the file's too (its arena copies them); greedy text is the same."""
    path = trained_q4k
    texts = []
    for opts in ({}, {"no_repack": True}, {"expert_budget": "50%"}):
        m = Model(path, n_ctx=64, seed=1, **opts)
        texts.append(m.create_completion("def main(", max_tokens=12, temperature=0)["choices"][0]["text"])
        packed = m.memory()["experts"]
        assert (packed > 0) == (opts == {}), opts
        assert (m.model.blocks[0].attn_q.layout is Layout.X8) == ("no_repack" not in opts)
    assert texts[0] == texts[1] == texts[2]


def test_interleaved_copies_are_counted_as_owned() -> None:
    """A copy on huge pages (2 MiB or more) is its own memory in Model.memory()'s accounting, the bytes it holds;
    the file's map it was made from is not."""
    rng = np.random.default_rng(3)
    w = quantize(rng.standard_normal((512, 8192)).astype(np.float32), QType.Q4_K)
    p = interleaved(QMatrix(w, QType.Q4_K, 512, 8192))
    assert p.raw.nbytes >= repack.HUGE and isinstance(p.raw.base.base.obj, repack.HugeBuffer)
    assert owned_bytes(p) == p.raw.nbytes
    assert owned_bytes([p, p.raw[1:]]) == p.raw.nbytes                # views of it: counted once
    assert p.raw.ctypes.data % repack.HUGE == 0


def test_experts_keep_the_file_layout_without_huge_pages(trained_q4k: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Where transparent huge pages are off, the experts are not interleaved (on 4 KiB pages they decode slower
    than the file's layout); the dense matrices still are. huge_pages reads the kernel's setting."""
    monkeypatch.setattr(repack, "huge_pages", lambda: False)
    m = Model(trained_q4k, n_ctx=32, seed=1)
    assert m.memory()["experts"] == 0 and m.model.blocks[0].attn_q.layout is Layout.X8
    monkeypatch.undo()
    for text, on in (("always [madvise] never", True), ("always madvise [never]", False)):
        (tmp_path / "thp").write_text(text)
        monkeypatch.setattr(repack, "THP", str(tmp_path / "thp"))
        assert repack.huge_pages() is on
    monkeypatch.setattr(repack, "THP", str(tmp_path / "absent"))
    assert repack.huge_pages() is False
