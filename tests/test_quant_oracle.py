"""hotcold.quant.quantize against llama.cpp's own quantizer, byte for byte.

An F32 GGUF of a one-layer llama holds every test family as a tensor; llama.cpp's
`llama_model_quantize` (pure=True: every 2-D weight at one type, as `llama-quantize --pure`)
rewrites it at each type, and each tensor's bytes must equal `quantize` of the same floats.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

from hotcold.quant import QType, dequantize, quantize

from quant_data import families

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.oracle

# llama_ftype values (llama.h) whose pure mix is the single type on the right.
FTYPES = {
    "F16": (1, QType.F16), "Q4_0": (2, QType.Q4_0), "Q4_1": (3, QType.Q4_1), "Q8_0": (7, QType.Q8_0),
    "Q5_0": (8, QType.Q5_0), "Q5_1": (9, QType.Q5_1), "Q2_K": (10, QType.Q2_K), "Q3_K": (11, QType.Q3_K),
    "Q4_K": (14, QType.Q4_K), "Q5_K": (16, QType.Q5_K), "Q6_K": (18, QType.Q6_K), "IQ4_NL": (25, QType.IQ4_NL),
    "BF16": (32, QType.BF16), "MXFP4": (38, QType.MXFP4),
}
H = 256
TENSORS = [  # (gguf name, family): every family lands in a quantized 2-D tensor
    ("token_embd.weight", "normal"), ("output.weight", "outliers"),
    ("blk.0.attn_q.weight", "degenerate"), ("blk.0.attn_k.weight", "tiny"),
    ("blk.0.attn_v.weight", "vanishing"), ("blk.0.attn_output.weight", "huge"),
    ("blk.0.ffn_gate.weight", "laplace"), ("blk.0.ffn_up.weight", "mixed_scales"),
    ("blk.0.ffn_down.weight", "positive"),
]


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("oracle") / "f32.gguf"
    data = families(96, H, seed=7)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(H)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(96)])
    w.add_token_scores([0.0] * 96)
    w.add_token_types([1] * 96)
    tensors = {name: data[fam] for name, fam in TENSORS}
    for norm in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(norm, np.ones(H, dtype=np.float32))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


@pytest.mark.parametrize("name", list(FTYPES))
def test_quantize_matches_llama_quantize(name: str, f32_model, tmp_path: Path) -> None:
    src, tensors = f32_model
    ftype, qtype = FTYPES[name]
    dst = tmp_path / f"{name}.gguf"
    llama_quantize(src, dst, ftype)
    reader = gguf.GGUFReader(str(dst))
    seen = 0
    for t in reader.tensors:
        if t.name not in tensors:
            continue
        assert t.tensor_type == qtype, f"{t.name}: llama.cpp chose {t.tensor_type.name}"
        theirs = np.asarray(t.data).view(np.uint8).reshape(tensors[t.name].shape[0], -1)
        ours = quantize(tensors[t.name], qtype)
        assert ours.shape == theirs.shape
        bad = np.flatnonzero((ours != theirs).any(axis=1))
        assert bad.size == 0, f"{name} {t.name}: {bad.size} rows differ, first row {bad[0]}"
        # and our dequantize reads llama.cpp's bytes exactly as gguf-py does
        np.testing.assert_array_equal(
            dequantize(theirs, qtype).view(np.uint32), gguf.quants.dequantize(theirs, qtype).view(np.uint32)
        )
        seen += 1
    assert seen == len(TENSORS)
