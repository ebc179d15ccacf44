"""The Python API and moe-run on the shipped trained model, against llama.cpp where it has an answer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hotcold import Model

PROMPT = "The :mod:`array` module defines an object type which can compactly represent"
HELD_OUT = Path("/usr/share/doc/python3.11/html/_sources/library/array.rst.txt")


@pytest.fixture(scope="module")
def model(trained_q8: Path) -> Model:
    return Model.load(trained_q8, n_ctx=512)


@pytest.fixture(scope="module")
def llama(trained_q8: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(trained_q8), n_ctx=512, logits_all=True, verbose=False)
    yield llm
    llm.close()


def test_tokenize_and_detokenize_match_llama_cpp(model: Model, llama) -> None:
    for text in (PROMPT, " leading space", "tabs\tand\nnewlines  ", "ünïcödé ✓ 漢字", "<s> not special"):
        ids = model.tokenize(text)
        assert ids == llama.tokenize(text.encode(), add_bos=True)
        assert model.tokenize(text, add_bos=False) == llama.tokenize(text.encode(), add_bos=False)
        assert model.detokenize(ids) == llama.detokenize(ids)


def test_greedy_completion_equals_llama_cpp(model: Model, llama) -> None:
    ours = model.create_completion(PROMPT, max_tokens=32, temperature=0)
    llama.reset()
    ref = llama.create_completion(PROMPT, max_tokens=32, temperature=0)
    assert ours["choices"][0]["text"] == ref["choices"][0]["text"]
    assert ours["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
    assert ours["object"] == "text_completion" and ours["choices"][0]["finish_reason"] in ("length", "stop")


def test_streaming_equals_the_whole_and_stop_strings_cut(model: Model) -> None:
    whole = model.create_completion(PROMPT, max_tokens=24, temperature=0)["choices"][0]["text"]
    chunks = list(model.create_completion(PROMPT, max_tokens=24, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut = model.create_completion(PROMPT, max_tokens=24, temperature=0, stop=[stop])["choices"][0]
    assert cut["text"] == whole[:whole.index(stop)] and cut["finish_reason"] == "stop"


def test_seeded_sampling_repeats(model: Model) -> None:
    a = "".join(model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7))
    b = "".join(model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7))
    assert a == b


def test_chat_completion_shape(model: Model) -> None:
    out = model.create_chat_completion([{"role": "user", "content": "array"}], max_tokens=8, temperature=0)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    chunks = list(model.create_chat_completion([{"role": "user", "content": "array"}], max_tokens=8,
                                               temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == out["choices"][0]["message"]["content"]


def test_logits_shape_and_prefix_reuse(model: Model) -> None:
    ids = model.tokenize(PROMPT)
    full = model.logits(ids)
    assert full.shape == (len(ids), model.n_vocab)
    # generate() reuses the cached prefix; the logits of a fresh context are unchanged by it
    "".join(model.generate(ids, max_tokens=4, temperature=0))
    assert np.array_equal(model.logits(ids), full)


def test_perplexity_matches_llama_cpp(model: Model, llama) -> None:
    if not HELD_OUT.is_file():
        pytest.skip("held-out docs missing: apt-get install python3.11-doc")
    ids = model.tokenize(HELD_OUT.read_text(), add_bos=False)[:512]
    ours = model.perplexity(ids, n_ctx=256)
    nll, count = 0.0, 0
    for start in (0, 256):
        chunk = [llama.token_bos()] + ids[start + 1:start + 256]
        llama.reset()
        llama.eval(chunk)
        z = np.array(llama.scores[:256], dtype=np.float64)[127:255]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll += float(np.sum(lse - z[np.arange(128), chunk[128:]]))
        count += 128
    assert ours == pytest.approx(float(np.exp(nll / count)), rel=2e-3)
    assert ours < 200  # a trained model on its own domain, far below the vocabulary size


def test_prompt_longer_than_context_is_a_clear_error(trained_q8: Path) -> None:
    m = Model.load(trained_q8, n_ctx=8)
    with pytest.raises(ValueError, match="do not fit the context of 8.*n_ctx"):
        list(m.generate(PROMPT * 4, max_tokens=4))


def _moe_run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotcold.cli.run", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_cli_one_shot_streams_only_text_to_stdout(trained_q8: Path, model: Model) -> None:
    r = _moe_run(str(trained_q8), "-p", PROMPT, "-n", "16", "--temp", "0", "--verbose")
    assert r.returncode == 0, r.stderr
    want = model.create_completion(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"]
    assert r.stdout == want + "\n"
    assert "decode:" in r.stderr and "tokens/s" in r.stderr


def test_cli_stats_and_residency_flags(trained_q8: Path) -> None:
    r = _moe_run(str(trained_q8), "-p", PROMPT, "-n", "8", "--temp", "0", "--expert-budget", "25%",
                 "--miss", "adaptive", "--eras-alpha", "0.1", "--prefetch", "1", "--stats")
    assert r.returncode == 0, r.stderr
    assert "total" in r.stderr and "MiB moved" in r.stderr and "hits" in r.stderr


def test_cli_chat_keeps_history(trained_q8: Path) -> None:
    r = _moe_run(str(trained_q8), "-n", "6", "--temp", "0", stdin="hello\nagain\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2 and "chat:" in r.stderr


def test_cli_errors_say_how_to_fix(tmp_path: Path, trained_q8: Path) -> None:
    r = _moe_run(str(tmp_path / "missing.gguf"), "-p", "x")
    assert r.returncode == 2 and "moe-run: error:" in r.stderr and "missing.gguf" in r.stderr
    r = _moe_run(str(trained_q8), "-p", PROMPT * 8, "-c", "16")
    assert r.returncode == 2 and "--ctx-size" in r.stderr
    r = _moe_run(str(trained_q8), "-p", "x", "--expert-budget", "lots")
    assert r.returncode == 2 and "expert_budget" in r.stderr
