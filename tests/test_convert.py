"""moe-convert against its oracles: llama.cpp's converter, llama.cpp's quantizer and loader, and transformers.

Tiny random checkpoints of every supported architecture are built with transformers, converted,
and checked for (a) logits in llama.cpp matching transformers, (b) metadata and tensors identical
to convert_hf_to_gguf.py at f16, (c) quantized tensors identical to llama-quantize's, (d) the cold file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from hotcold import keys
from hotcold.convert import ConvertError, cold_path_for, convert
from hotcold.quant import QType

import reference_convert
import tiny_models

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TRAINED = tiny_models.REPO / "models" / "mixtral-trained"
DOCS_TEXT = """The :mod:`array` module defines an object type which can compactly represent an array of basic \
values: characters, integers, floating point numbers.  Arrays are sequence types and behave very much like \
lists, except that the type of objects stored in them is constrained.  The type is specified at object \
creation time by using a type code, which is a single character."""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: tiny_models.build(a, root / a) for a in tiny_models.ARCHS}


def _read(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), bytes(t.data.tobytes())) for t in r.tensors}
    return kv, ts


def _hf_logits(model_dir: Path, toks: list[int]) -> np.ndarray:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([toks])).logits[0].numpy()


def _llama_cpp_logits(path: Path, toks: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(toks)
    out = np.array(llm.scores[:len(toks)])
    llm.close()
    return out


# --- (b) identical to convert_hf_to_gguf.py -----------------------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_matches_reference_converter_at_f16(tiny: dict[str, Path], tmp_path: Path, arch: str) -> None:
    if reference_convert.source_tree() is None:
        pytest.skip("llama.cpp source tree (convert_hf_to_gguf.py) not found")
    ref = reference_convert.convert(tiny[arch], tmp_path / "ref.gguf", "f16")
    ours = convert(tiny[arch], tmp_path / "ours.gguf", type="f16", cold_type=None, progress=False).path
    (rkv, rts), (okv, ots) = _read(ref), _read(ours)
    okv = {k: v for k, v in okv.items() if not k.startswith("hotcold.")}
    assert okv == rkv
    assert ots.keys() == rts.keys()
    for name, (qt, shape, data) in rts.items():
        assert ots[name][:2] == (qt, shape), name
        assert ots[name][2] == data, f"{name}: bytes differ"


# --- (a) llama.cpp runs the file and agrees with transformers -------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_llama_cpp_logits_match_transformers(tiny: dict[str, Path], tmp_path: Path, arch: str) -> None:
    toks = [1] + [int(t) for t in np.random.default_rng(1).integers(3, 4096, size=100)]
    ref = _hf_logits(tiny[arch], toks)
    f32 = convert(tiny[arch], tmp_path / "f32.gguf", type="f32", cold_type=None, progress=False).path
    assert np.abs(_llama_cpp_logits(f32, toks) - ref).max() <= 1e-2
    q8 = convert(tiny[arch], tmp_path / "q8.gguf", type="q8_0", cold_type=None, progress=False).path
    agree = (_llama_cpp_logits(q8, toks).argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.99, f"Q8_0 argmax agrees on {agree:.1%} of positions"


@pytest.mark.oracle
def test_trained_model_q8_0_agrees_with_transformers_on_real_text(tmp_path: Path) -> None:
    import sentencepiece

    toks = [1] + sentencepiece.SentencePieceProcessor(model_file=str(TRAINED / "tokenizer.model")).encode(DOCS_TEXT)
    ref = _hf_logits(TRAINED, toks)
    q8 = convert(TRAINED, tmp_path / "q8.gguf", type="q8_0", cold_type=None, progress=False).path
    got = _llama_cpp_logits(q8, toks)

    def nll(logits: np.ndarray) -> float:
        z = logits - logits.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(-np.mean(lp[np.arange(len(toks) - 1), toks[1:]]))

    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert abs(np.exp(nll(got)) / np.exp(nll(ref)) - 1) < 0.02  # perplexity within 2%


# --- (c) quantized tensors identical to llama.cpp's quantization -----------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("qtype, ftype", [("q8_0", 7), ("q4_k", 15), ("q2_k", 10), ("q6_k", 18)])
def test_quantized_tensors_match_llama_quantize(tiny: dict[str, Path], tmp_path: Path, qtype: str, ftype: int) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    src = tiny["qwen2moe"]
    f32 = convert(src, tmp_path / "f32.gguf", type="f32", cold_type=None, progress=False).path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    ours = convert(src, tmp_path / "ours.gguf", type=qtype, cold_type=None, progress=False).path
    (_, tts), (_, ots) = _read(theirs), _read(ours)
    assert ots.keys() == tts.keys()

    def dims(shape: tuple[int, ...]) -> tuple[int, ...]:  # llama.cpp writes ggml_n_dims: no trailing 1s
        return tuple(np.trim_zeros(np.array(shape) - 1, "b") + 1)

    for name, (qt, shape, data) in tts.items():
        assert (ots[name][0], dims(ots[name][1])) == (qt, dims(shape)), name
        assert ots[name][2] == data, f"{name} ({qt.name}): bytes differ"


# --- (d) the cold file --------------------------------------------------------------------------------

def _expert_digest(path: Path) -> str:
    h = hashlib.sha256()
    for t in gguf.GGUFReader(path).tensors:
        if "_exps." in t.name:
            shape = tuple(int(x) for x in reversed(t.shape))  # GGUF dims are innermost first
            h.update(f"{t.name}:{t.tensor_type.name}:{shape}\n".encode())
            h.update(t.data.tobytes())
    return h.hexdigest()


def test_cold_file_holds_every_expert_at_the_cold_type(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = convert(tiny["mixtral"], tmp_path / "m.gguf", type="q8_0", cold_type="q2_k", progress=False)
    assert r.cold_path == tmp_path / "m.cold.gguf"
    (mkv, mts), (ckv, cts) = _read(r.path), _read(r.cold_path)
    assert cts.keys() == mts.keys()
    experts = [n for n in mts if "_exps." in n]
    assert len(experts) == 3 * 2
    for name in mts:
        if name in experts:
            assert cts[name][0] == QType.Q2_K and cts[name][1] == mts[name][1]
        else:
            assert cts[name] == mts[name], f"{name}: non-expert tensors are the main file's"
    assert mkv[keys.EXPERTS_SHA256] == r.experts_sha256 == _expert_digest(r.path)
    assert ckv[keys.COLD_OF] == r.experts_sha256 and ckv[keys.COLD_TYPE] == "Q2_K"


@pytest.mark.oracle
def test_llama_cpp_loads_main_and_cold_files(tmp_path: Path) -> None:
    r = convert(TRAINED, tmp_path / "t.gguf", type="q8_0", cold_type="q4_k", progress=False)
    toks = [1, 415, 1274, 2651]
    for path in (r.path, r.cold_path):
        assert np.isfinite(_llama_cpp_logits(path, toks)).all()


def test_dense_models_get_no_cold_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = convert(tiny["llama"], tmp_path / "d.gguf", type="q8_0", cold_type="q4_k", progress=False)
    assert r.cold_path is None and not cold_path_for(r.path).exists()


# --- mixed precision ----------------------------------------------------------------------------------

def test_type_rules_expert_type_and_tensor_type(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = convert(tiny["qwen2moe"], tmp_path / "x.gguf", type="q8_0", expert_type="q4_k",
                tensor_type=["attn_v=q6_k", "blk\\.1\\.ffn_down_exps=q5_k", "attn_v=f16"], cold_type=None,
                progress=False)
    _, ts = _read(r.path)
    assert ts["blk.0.attn_v.weight"][0] == QType.Q6_K  # first matching rule wins
    assert ts["blk.1.ffn_down_exps.weight"][0] == QType.Q5_K
    assert ts["blk.0.ffn_down_exps.weight"][0] == QType.Q4_K
    assert ts["blk.0.attn_q.weight"][0] == QType.Q8_0
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp_shexp.weight", "blk.0.attn_norm.weight",
                 "output_norm.weight", "blk.0.attn_q.bias"):
        assert ts[name][0] == QType.F32, name


def test_row_length_fallback_follows_llama_quantize() -> None:
    from hotcold.convert.types_plan import fit

    assert fit(QType.Q4_K, 512) == QType.Q4_K
    assert fit(QType.Q4_K, 96) == QType.Q5_0
    assert fit(QType.Q5_K, 96) == QType.Q5_1
    assert fit(QType.Q6_K, 96) == QType.Q8_0
    assert fit(QType.Q2_K, 96) == QType.Q4_0
    assert fit(QType.Q4_K, 100) == QType.F16
    assert fit(QType.Q8_0, 100) == QType.F16


# --- checkpoint layouts -------------------------------------------------------------------------------

def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _all_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    return dst


def test_sharded_and_fused_checkpoints_convert_identically(tiny: dict[str, Path], tmp_path: Path) -> None:
    base = convert(tiny["mixtral"], tmp_path / "base.gguf", type="q8_0", cold_type=None, progress=False).path
    tensors = _all_tensors(tiny["mixtral"])
    # sharded: two files and an index
    sharded = _clone(tiny["mixtral"], tmp_path / "sharded")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        _save_tensors(sharded / fname, {n: tensors[n] for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    # fused experts, as transformers v5 may keep them: gate_up_proj (E, 2F, H) and down_proj (E, H, F)
    fused = _clone(tiny["mixtral"], tmp_path / "fused")
    ft: dict[str, np.ndarray] = {}
    for bid in range(2):
        pre = f"model.layers.{bid}.block_sparse_moe.experts"
        w = {k: np.stack([tensors.pop(f"{pre}.{e}.{k}.weight") for e in range(4)]) for k in ("w1", "w2", "w3")}
        ft[f"{pre}.gate_up_proj"] = np.concatenate([w["w1"], w["w3"]], axis=1)
        ft[f"{pre}.down_proj"] = w["w2"]
    _save_tensors(fused / "model.safetensors", {**tensors, **ft})
    for src in (sharded, fused):
        out = convert(src, tmp_path / f"{src.name}.gguf", type="q8_0", cold_type=None, progress=False).path
        assert _read(out)[1] == _read(base)[1], src.name


# --- bad input ----------------------------------------------------------------------------------------

def test_errors_name_the_problem(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no config.json"):
        convert(empty, out)
    (empty / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"], "num_hidden_layers": 1}))
    with pytest.raises(ConvertError, match="no \\*.safetensors"):
        convert(empty, out)
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ConvertError, match="never unpickles"):
        convert(empty, out)
    other = _clone(tiny["llama"], tmp_path / "other")
    shutil.copy(tiny["llama"] / "model.safetensors", other / "model.safetensors")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConvertError, match="GPT2LMHeadModel is not supported; supported: .*MixtralForCausalLM"):
        convert(other, out)
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    with pytest.raises(ConvertError, match="shape mismatch"):
        convert(other, out)
    with pytest.raises(ConvertError, match="does not exist"):
        convert(tiny["llama"], tmp_path / "no" / "such" / "dir.gguf")
    with pytest.raises(ConvertError, match="unknown quantization type"):
        convert(tiny["llama"], out, type="q4_z")
    assert not out.exists()


@pytest.mark.parametrize("fail_at", ["main", "cold"])
def test_interrupted_conversion_leaves_no_file(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fail_at: str) -> None:
    from hotcold.convert import pipeline

    real = pipeline.quantize
    calls = {"n": 0}
    # the main file takes 41 quantize calls (one per tensor, one per expert): fail inside it or the cold file
    fail = 10 if fail_at == "main" else 55

    def flaky(x: np.ndarray, qtype: QType) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == fail:
            raise KeyboardInterrupt
        return real(x, qtype)

    monkeypatch.setattr(pipeline, "quantize", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny["mixtral"], tmp_path / "m.gguf", type="q8_0", cold_type="q4_k", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_exit_codes_and_streams(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hotcold.cli.convert import main

    assert main([str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "moe-convert: error:" in err.err and "config.json" in err.err
    assert main([str(tiny["olmoe"]), str(tmp_path / "o.gguf"), "--type", "q4_0", "--no-progress"]) == 0
    done = capsys.readouterr()
    assert done.out == "" and "wrote" in done.err
    assert (tmp_path / "o.gguf").is_file() and (tmp_path / "o.cold.gguf").is_file()
