"""The engine's forward pass against transformers (fp32) and llama.cpp, for every supported architecture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hotcold.convert import convert
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.config import CacheType
from hotcold.engine.context import Context
from hotcold.engine.model import Transformer

import tiny_models

TRAINED = tiny_models.REPO / "models" / "mixtral-trained"
TOKS = [1] + [int(t) for t in np.random.default_rng(3).integers(3, 4096, size=80)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny-engine")
    return {a: tiny_models.build(a, root / a) for a in tiny_models.ARCHS}


def _load(f: GGUFFile | Path, n_ctx: int, cache: CacheType = CacheType.F16) -> tuple[Transformer, Context]:
    m = Transformer.load(f if isinstance(f, GGUFFile) else GGUFFile(f))
    return m, m.context(n_ctx, type_k=cache, type_v=cache)


def _logits(f: GGUFFile | Path, toks: list[int], n_ctx: int = 128, cache: CacheType = CacheType.F16) -> np.ndarray:
    m, ctx = _load(f, n_ctx, cache)
    return m.forward(np.array(toks), ctx, all_logits=True)


def _gguf(src: Path, out: Path, qtype: str) -> Path:
    return convert(src, out, type=qtype, cold_type=None, progress=False).path


def _hf_logits(model_dir: Path, toks: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([toks])).logits[0].numpy()


def _llama_cpp(path: Path, toks: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(toks)
    out = np.array(llm.scores[:len(toks)])
    llm.close()
    return out


def _mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    def logp(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logp(ref), logp(got)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_f32_logits_match_transformers(tiny: dict[str, Path], tmp_path: Path, arch: str) -> None:
    ref = _hf_logits(tiny[arch], TOKS)
    got = _logits(_gguf(tiny[arch], tmp_path / "m.gguf", "f32"), TOKS, cache=CacheType.F32)   # exact: no fp16 KV
    assert np.abs(got - ref).max() <= 1e-3


def test_a_leading_dense_layer_matches_transformers(tmp_path: Path) -> None:
    """A layer without a router is dense (qwen2moe's mlp_only_layers; DeepSeek's leading dense layers)."""
    pytest.importorskip("transformers")
    src = tiny_models.build("qwen2moe", tmp_path / "hf", mlp_only_layers=[0])
    path = _gguf(src, tmp_path / "m.gguf", "f32")
    m, ctx = _load(path, 128, CacheType.F32)
    assert m.cfg.moe_layers == (False, True) and m.blocks[0].ffn is not None and m.blocks[1].ffn_gate_inp is not None
    got = m.forward(np.array(TOKS), ctx, all_logits=True)
    assert np.abs(got - _hf_logits(src, TOKS)).max() <= 1e-3


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe"])
def test_incremental_decode_equals_prefill(tiny: dict[str, Path], tmp_path: Path, arch: str) -> None:
    f = GGUFFile(_gguf(tiny[arch], tmp_path / "m.gguf", "q8_0"))
    full = _logits(f, TOKS)
    m, ctx = _load(f, 128)
    m.forward(np.array(TOKS[:40]), ctx)
    step = np.concatenate([m.forward(np.array([t]), ctx).copy() for t in TOKS[40:]])
    assert np.abs(step - full[40:]).max() <= 1e-4


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_quantized_logits_match_llama_cpp(tiny: dict[str, Path], tmp_path: Path, arch: str, qtype: str,
                                          record_property) -> None:
    path = _gguf(tiny[arch], tmp_path / "m.gguf", qtype)
    ref = _llama_cpp(path, TOKS)
    got = _logits(path, TOKS)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    record_property("mean_kl", _mean_kl(ref, got))
    assert agree >= 0.99, f"argmax agrees on {agree:.1%}; mean KL {_mean_kl(ref, got):.2e}"


@pytest.mark.oracle
def test_llama_quantize_mixes_run(tmp_path: Path) -> None:
    # The files users download are llama-quantize mixes (Q4_K_M: Q4_K with Q6_K for some tensors).
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = _gguf(TRAINED, tmp_path / "f32.gguf", "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    mix = tmp_path / "q4_k_m.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(mix).encode(), params) == 0
    types = {t.qtype.name for t in GGUFFile(mix).tensors.values()}
    assert {"Q4_K", "Q6_K"} <= types
    ref = _llama_cpp(mix, TOKS)
    got = _logits(mix, TOKS)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


@pytest.mark.oracle
def test_trained_model_greedy_continuation_equals_llama_cpp(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _gguf(TRAINED, tmp_path / "q8.gguf", "q8_0")
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    prompt = llm.tokenize(b"The list data type has some more methods.", add_bos=True)
    llm.eval(prompt)
    ref = []
    for _ in range(64):
        ref.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ref[-1]])
    llm.close()
    m, ctx = _load(path, 256)
    logits, ours = m.forward(np.array(prompt), ctx), []
    for _ in range(64):
        ours.append(int(np.argmax(logits[-1])))
        logits = m.forward(np.array([ours[-1]]), ctx)
    assert ours == ref


def test_weights_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    m, _ = _load(_gguf(TRAINED, tmp_path / "q8.gguf", "q8_0"), 64)
    for b in m.blocks:
        for q in (b.attn_q, b.attn_output, b.ffn_gate_exps, b.ffn_down_exps):
            assert not q.raw.flags.owndata and not q.raw.flags.writeable


def test_context_overflow_is_a_clear_error(tmp_path: Path) -> None:
    m, ctx = _load(_gguf(TRAINED, tmp_path / "q8.gguf", "q8_0"), 8)
    assert ctx.n_batch == 8                                       # a batch never exceeds the context (llama.cpp)
    m.forward(np.arange(5), ctx)
    with pytest.raises(ValueError, match="exceed n_ctx=8"):
        m.forward(np.arange(4), ctx)
