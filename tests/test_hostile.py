"""Hostile files cannot crash, hang, exhaust or corrupt hotcold: every bad GGUF, cold sidecar, checkpoint and
chat template ends in a ValueError subclass (one line, exit 2 in the CLIs), or loads and runs.

GGUFs are rewritten from the shipped model (tests/hostile.py) and each is loaded, and two tokens generated,
in a child forked from a warmed-up loader, under an address-space limit and a deadline: a crash (a signal),
a hang, a blow-up (MemoryError) or any other exception fails the case.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile
from hostile import DELETE
from hotcold.engine import chat
from hotcold.engine.api import Model, ModelBusyError
from hotcold.engine.chat import ChatTemplate, ChatTemplateError
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.options import Options
from hotcold.engine.sampling import SamplingParams
from tiny_models import REPO

TRAINED = REPO / "models" / "mixtral-trained"


@pytest.fixture(scope="module")
def base(trained_q8: Path) -> GGUFFile:
    return GGUFFile(trained_q8)


@pytest.fixture(scope="module")
def loader(trained_q8: Path):
    ld = hostile.Loader(trained_q8)
    yield ld
    ld.close()


def _run(loader: hostile.Loader, base: GGUFFile, tmp: Path, name: str, meta: dict | None = None,
         tensors: dict | None = None, patch: dict | None = None, **case: Any) -> dict[str, Any]:
    path = hostile.rewrite(base, tmp / f"{name}.gguf", meta, tensors, patch)
    case.setdefault("options", {"n_ctx": 64})
    r = loader.run({"kind": "gguf", "path": str(path), **case})
    path.unlink()
    return r


def _no_crash(r: dict[str, Any], what: str) -> None:
    assert r["outcome"] in ("ok", "ValueError"), f"{what}: {r['outcome']} {r['type']}\n{r['message']}"


# --- every metadata key x every kind of bad value -------------------------------------------------------

KEYS = ["general.architecture", "general.alignment", "llama.block_count", "llama.context_length",
        "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.attention.key_length", "llama.attention.value_length",
        "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.expert_count",
        "llama.expert_used_count", "llama.rope.dimension_count", "llama.rope.scaling.type",
        "llama.rope.scaling.factor", "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template", "hotcold.experts.sha256"]
KINDS: dict[str, Any] = {
    "string": (T.STRING, "x"), "array": (T.ARRAY, (T.UINT32, [1, 2])), "float": (T.FLOAT32, 1.5),
    "zero": (T.UINT32, 0), "negative": (T.INT32, -1), "huge": (T.UINT64, 2**63 - 1), "nan": (T.FLOAT32, math.nan),
    "inf": (T.FLOAT32, math.inf), "missing": DELETE,
}
# keys hotcold reads as numbers, and as strings: a value of another type is an error naming the key
NUMERIC = {k for k in KEYS if k.startswith("llama.") and k not in ("llama.rope.scaling.type", "llama.feed_forward_length",
                                                                     "llama.vocab_size")} - {"llama.rope.scaling.factor"}
TEXT = {"general.architecture", "llama.rope.scaling.type", "tokenizer.ggml.model", "tokenizer.chat_template",
        "hotcold.experts.sha256"}


def test_every_key_with_every_kind_of_bad_value(loader, base: GGUFFile, tmp_path: Path) -> None:
    failures = []
    for key in KEYS:
        for kind, value in KINDS.items():
            cold = {"miss": "cold", "cold_path": str(base.path.with_name(base.path.stem + ".cold.gguf"))}
            r = _run(loader, base, tmp_path, "k", {key: value}, chat=key == "tokenizer.chat_template",
                     options={"n_ctx": 64, **(cold if key == "hotcold.experts.sha256" else {})})
            wrong_type = (key in NUMERIC and kind in ("string", "array")
                          or key in TEXT and kind not in ("string", "missing"))
            if r["outcome"] not in ("ok", "ValueError") or r["outcome"] == "ok" and key == "hotcold.experts.sha256":
                failures.append(f"{key}={kind}: {r['outcome']} {r['type']} {r['message'][-600:]}")
            elif wrong_type and (r["outcome"] != "ValueError" or key not in r["message"]):
                failures.append(f"{key}={kind}: wanted an error naming the key, got {r['outcome']}: {r.get('message')}")
    assert not failures, "\n".join(failures)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(sorted(NUMERIC)), vtype=st.sampled_from([T.UINT32, T.INT32, T.UINT64, T.INT64]),
       value=st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(0, 4096)))
def test_random_integers_for_hyperparameters(loader, base: GGUFFile, tmp_path_factory, key: str, vtype: T,
                                             value: int) -> None:
    if vtype in (T.UINT32, T.UINT64):
        value = abs(value)
    _no_crash(_run(loader, base, tmp_path_factory.mktemp("h"), "r", {key: (vtype, value)}), f"{key}={value}")


# --- the cases of the report, each with the error it must give ----------------------------------------

def _arch(base: GGUFFile, arch: str) -> dict[str, Any]:
    """Metadata overrides that make the file claim another architecture, its llama.* keys renamed."""
    meta: dict[str, Any] = {"general.architecture": (T.STRING, arch)}
    for k, v in base.metadata.items():
        if k.startswith("llama."):
            meta[k] = DELETE
            meta[arch + k[len("llama"):]] = hostile._guess(v)
    return meta


def _f32(x: float) -> bytes:
    return struct.pack("<f", x)


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("rope dims past the head", {"meta": {"llama.rope.dimension_count": (T.UINT32, 4096)}}, "dimension_count"),
    ("odd rope dims", {"meta": {"llama.rope.dimension_count": (T.UINT32, 7)}}, "dimension_count"),
    ("experts used 10**6", {"meta": {"llama.expert_used_count": (T.UINT32, 10**6)}}, "expert_used_count"),
    ("experts used > experts", {"meta": {"llama.expert_used_count": (T.UINT32, 9)}}, "expert_used_count"),
    ("head count 0", {"meta": {"llama.attention.head_count": (T.UINT32, 0)}}, "head_count"),
    ("heads that do not divide", {"meta": {"llama.attention.head_count_kv": (T.UINT32, 3)}}, "head_count_kv"),
    ("key length that does not fit", {"meta": {"llama.attention.key_length": (T.UINT32, 48)}}, "attn_q.weight"),
    ("rope factor 0", {"meta": {"llama.rope.scaling.type": (T.STRING, "linear"),
                                "llama.rope.scaling.factor": (T.FLOAT32, 0.0)}}, "scaling.factor"),
    ("inf rope base", {"meta": {"llama.rope.freq_base": (T.FLOAT32, math.inf)}}, "freq_base"),
    ("NaN rms eps", {"meta": {"llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, math.nan)}}, "epsilon"),
    ("array for a scalar", {"meta": {"llama.block_count": (T.ARRAY, (T.UINT32, [4]))}}, "block_count"),
    ("block count below the tensors", {"meta": {"llama.block_count": (T.UINT32, 2)}}, "block_count"),
    ("block count above the tensors", {"meta": {"llama.block_count": (T.UINT32, 5)}}, "blk.4"),
    ("a non-string template", {"meta": {"tokenizer.chat_template": (T.UINT32, 7)}, "chat": True},
     "chat_template"),
    ("fewer tokens than embedding rows", {"meta": {"tokenizer.ggml.tokens": (T.ARRAY, (T.STRING, ["a", "b", "c"]))}},
     "tokens"),
    ("scores of strings", {"meta": {"tokenizer.ggml.scores": (T.ARRAY, (T.STRING, ["a"] * 4096))}}, "scores"),
    ("q/k-norm architecture without the norms", {"arch": "qwen3moe"}, "attn_q_norm"),
    ("short norm weight", {"tensors": {"blk.0.attn_norm.weight": {"shape": (128,)}}}, "attn_norm"),
    ("short output norm", {"tensors": {"output_norm.weight": {"shape": (100,)}}}, "output_norm"),
    ("gate and up rows disagree", {"tensors": {"blk.1.ffn_up_exps.weight": {"shape": (8, 256, 256)}}},
     "ffn_up_exps"),
    ("router rows", {"tensors": {"blk.0.ffn_gate_inp.weight": {"shape": (4, 256)}}}, "ffn_gate_inp"),
    ("embedding rows vs vocabulary", {"tensors": {"token_embd.weight": {"shape": (4000, 256)}}}, "tokens"),
    ("expert stack as a matrix", {"tensors": {"blk.0.ffn_down_exps.weight": {"shape": (2048, 512)}}},
     "ffn_down_exps"),
    ("an activation type for weights", {"tensors": {"blk.0.attn_q.weight": {"type": 15}}}, "attn_q"),
    ("a missing tensor", {"tensors": {"blk.1.attn_v.weight": {"name": "junk"}}}, "attn_v"),
    ("overlapping tensor data", {"overlap": ("blk.0.attn_k.weight", "blk.0.attn_q.weight")}, "overlap"),
    ("NaN in a norm", {"patch": {"blk.2.ffn_norm.weight": _f32(math.nan)}}, "NaN"),
    ("Inf in a router", {"patch": {"blk.3.ffn_gate_inp.weight": _f32(math.inf) * 3}}, "NaN or infinite"),
    ("Inf in a weight's scale", {"patch": {"blk.0.attn_q.weight": b"\x00\x7c"}}, "NaN or infinite activations"),
    ("a negative token id", {"prompt": [1, -5]}, "out of range"),
    ("a token id past the vocabulary", {"prompt": [1, 4096]}, "out of range"),
    ("a context of 10**8", {"options": {"n_ctx": 10**8}}, "--ctx-size"),
    ("a NaN option", {"options": {"n_ctx": 64, "eras_alpha": "nan"}}, "eras_alpha"),
    ("a context past the RAM budget", {"options": {"n_ctx": 2**20, "ram_budget": "90%"}}, "RAM budget"),
]


@pytest.mark.parametrize("name,spec,error", CASES, ids=[c[0] for c in CASES])
def test_reported_case_gives_its_error(loader, base: GGUFFile, tmp_path: Path, name: str, spec: dict,
                                       error: str) -> None:
    spec = dict(spec)
    meta = spec.pop("meta", None) or (_arch(base, spec.pop("arch")) if "arch" in spec else None)
    tensors = spec.pop("tensors", None)
    if "overlap" in spec:
        a, b = spec.pop("overlap")
        tensors = {a: {"offset": base.tensors[b].offset - base.data_offset}}
    r = _run(loader, base, tmp_path, "c", meta, tensors, spec.pop("patch", None), **spec)
    assert r["outcome"] == "ValueError" and error in r["message"], r


def test_a_directory_or_a_missing_file_is_one_line(tmp_path: Path) -> None:
    for target, words in ((tmp_path, "directory"), (tmp_path / "none.gguf", "No such file")):
        r = subprocess.run([sys.executable, "-m", "hotcold.cli.run", str(target), "-p", "x"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cold_copies_with_the_right_hash_but_other_shapes(loader, trained_q8: Path, tmp_path: Path) -> None:
    main = hostile.rewrite(GGUFFile(trained_q8), tmp_path / "m.gguf")
    cold = GGUFFile(trained_q8.with_name(trained_q8.stem + ".cold.gguf"))
    hostile.rewrite(cold, tmp_path / "m.cold.gguf", tensors={"blk.2.ffn_gate_exps.weight": {"shape": (8, 256, 256)}})
    r = loader.run({"kind": "gguf", "path": str(main), "options": {"n_ctx": 64, "miss": "cold"}})
    assert r["outcome"] == "ValueError" and "cold copy of blk.2.ffn_gate_exps.weight" in r["message"], r


# --- checkpoints (moe-convert) -------------------------------------------------------------------------

def _checkpoint(tmp: Path, config: Any = None, **files: bytes | str) -> Path:
    """The shipped checkpoint (linked) with config.json edited by `config` and files replaced by `files`."""
    d = tmp / "ckpt"
    d.mkdir()
    for f in TRAINED.iterdir():
        if f.name not in files and f.name != "config.json":
            (d / f.name).symlink_to(f)
    if "config.json" not in files:
        cfg = json.loads((TRAINED / "config.json").read_text())
        files["config.json"] = json.dumps(config(cfg) if config is not None else cfg)
    for name, content in files.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def _set(**kv: Any):
    def edit(cfg: dict) -> dict:
        return {**cfg, **kv}
    return edit


def _safetensors(header: Any) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h


CHECKPOINTS: list[tuple[str, dict[str, Any], str]] = [
    ("10**9 experts", {"config": _set(num_local_experts=10**9)}, "experts"),
    ("10**9 layers", {"config": _set(num_hidden_layers=10**9)}, "num_hidden_layers"),
    ("10**9 vocabulary", {"config": _set(vocab_size=10**9)}, "vocab_size"),
    ("a string for a number", {"config": _set(num_attention_heads="8")}, "num_attention_heads"),
    ("a NaN epsilon", {"config": _set(rms_norm_eps=math.nan)}, "rms_norm_eps"),
    ("a boolean head count", {"config": _set(num_key_value_heads=True)}, "num_key_value_heads"),
    ("rope parameters of the wrong type", {"config": _set(rope_parameters=5)}, "rope"),
    ("architectures as a string", {"config": _set(architectures="MixtralForCausalLM")}, "architectures"),
    ("config as a list", {"config": lambda cfg: [cfg]}, "config.json"),
    ("config not JSON", {"config.json": "{"}, "config.json"),
    ("safetensors header a list", {"model.safetensors": _safetensors([1, 2])}, "header"),
    ("safetensors shape a string", {"model.safetensors": _safetensors(
        {"w": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]}}) + b"\0" * 4}, "shape"),
    ("safetensors info a number", {"model.safetensors": _safetensors({"w": 3})}, "dtype"),
    ("index a list", {"model.safetensors.index.json": "[]"}, "weight_map"),
    ("index pointing outside", {"model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "../../etc/passwd"}})}, "outside"),
    ("a garbage tokenizer", {"tokenizer.model": b"\x08\x01garbage" * 10}, "tokenizer"),
]


@pytest.mark.parametrize("name,spec,error", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_hostile_checkpoint(loader, tmp_path: Path, name: str, spec: dict, error: str) -> None:
    spec = dict(spec)
    d = _checkpoint(tmp_path, spec.pop("config", None), **spec)
    r = loader.run({"kind": "convert", "path": str(d), "out": str(tmp_path / "o.gguf")})
    err = r["message"]                                             # moe-convert's stderr
    assert r["outcome"] == "ValueError" and error.lower() in err.lower(), r
    assert err.startswith("moe-convert: error:") and len(err.strip().splitlines()) == 1, err
    assert not any(p.name.startswith((".o.", "o.")) for p in tmp_path.iterdir())


# --- chat templates ------------------------------------------------------------------------------------

TEMPLATES = [
    "{{ 'x' * 10**10 }}", "{{ 10 ** 100000 }}", "{{ 9 ** (9 ** 9) }}", "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x'|center(9999999999) }}", "{{ '%*s'|format(2000000000, 'x') }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__ }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ (messages|first)['content'] * 2**40 }}",
]


def test_hostile_templates_end_in_a_template_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "DEADLINE_S", 2.0)
    t0 = time.monotonic()
    for src in TEMPLATES:
        with pytest.raises(ChatTemplateError):
            ChatTemplate(src).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 60
    assert ChatTemplate(None).render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")


def test_template_errors_and_limits() -> None:
    with pytest.raises(ChatTemplateError, match="must be a string"):
        ChatTemplate(7)  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="JSON"):
        ChatTemplate(None).render([{"role": "user", "content": object()}])


# --- options, threads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(eras_alpha=math.nan), dict(eras_alpha=math.inf), dict(miss_t1=math.nan),
                                dict(prefetch=-1), dict(n_ctx=-1)])
def test_bad_options_are_value_errors(kw: dict) -> None:
    with pytest.raises(ValueError):
        Options.parse(**kw)


@pytest.mark.parametrize("kw", [dict(repeat_penalty=math.nan), dict(temperature=math.nan), dict(top_p=math.inf)])
def test_bad_sampling_is_a_value_error(kw: dict) -> None:
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(**kw)


def test_two_threads_on_one_model_get_a_clear_error(trained_q8: Path) -> None:
    m = Model.load(trained_q8, n_ctx=128)
    want = "".join(m.generate("The :mod:`array` module", max_tokens=24, temperature=0))
    first = m.generate("The :mod:`array` module", max_tokens=24, temperature=0)
    got = [next(first)]
    errors: list[BaseException] = []

    def other() -> None:
        try:
            "".join(m.generate("Something else", max_tokens=8, temperature=0))
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], ModelBusyError) and "one Model per thread" in str(errors[0])
    with pytest.raises(ModelBusyError):
        m.logits([1, 2, 3])
    got.extend(first)
    assert "".join(got) == want                                    # the first generation was not disturbed
    assert "".join(m.generate("The :mod:`array` module", max_tokens=24, temperature=0)) == want   # nor the model


# --- interrupted and failed conversions ----------------------------------------------------------------

def _convert(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hotcold.cli.convert", str(TRAINED), str(out), "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None and time.monotonic() - t0 < timeout, "the conversion ended before the kill"
        time.sleep(0.005)


def test_killed_conversions_leave_no_main_file_without_cold_and_no_stale_partials(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    a = _convert(out)
    _wait_for(tmp_path / f".m.gguf.partial-{a.pid}", a)            # killed while writing the main file
    a.kill()
    a.wait()
    assert not out.exists() and (tmp_path / f".m.gguf.partial-{a.pid}").exists()
    b = _convert(out)
    _wait_for(tmp_path / f".m.cold.gguf.partial-{b.pid}", b)       # killed while writing the cold copies
    b.kill()
    b.wait()
    left = sorted(x.name for x in tmp_path.iterdir())
    assert left == [f".m.cold.gguf.partial-{b.pid}", f".m.gguf.partial-{b.pid}"]   # no main file; a's are gone
    c = _convert(out)
    _wait_for(tmp_path / f".m.gguf.partial-{c.pid}", c)            # SIGTERM unwinds: its own partial goes too
    c.terminate()
    assert c.wait() == 130 and "no output written" in c.stderr.read()
    assert list(tmp_path.iterdir()) == []
    d = _convert(out)
    assert d.wait() == 0, d.stderr.read()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.cold.gguf", "m.gguf"]


def _tmpfs(d: Path, size: str) -> bool:
    d.mkdir()
    return os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True).returncode == 0


@pytest.mark.parametrize("size", ["4m", "20m"])   # full during the main file; during the cold copies
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path: Path, size: str) -> None:
    d = tmp_path / "small"
    if not _tmpfs(d, size):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        p = _convert(d / "m.gguf")
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "No space left on device" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert list(d.iterdir()) == []
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_a_context_past_the_trained_one_warns(trained_q8: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="hotcold"):
        m = Model.load(trained_q8, n_ctx=4096)
    assert m.n_ctx == 4096 and "trained on" in caplog.text and "256" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hotcold"):
        assert Model.load(trained_q8).n_ctx == 256 and not caplog.text   # by default the trained context


def test_f32_arrays_are_not_lists(base: GGUFFile) -> None:
    scores = base.metadata["tokenizer.ggml.scores"]
    assert isinstance(scores, np.ndarray) and not scores.flags.writeable   # 4 bytes each, not a Python float
