"""Completions' echo and logprobs as llama-cpp-python gives them, their values the log-softmax of Model.logits;
the call shapes Llama users write (Model(model_path=...), calling the model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hotcold.engine.api import Model

PROMPT = "The :mod:`array` module"


@pytest.fixture(scope="module")
def model(trained_q8: Path) -> Model:
    return Model(model_path=trained_q8, n_ctx=256)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_logprobs_are_the_log_softmax_of_the_logits(model: Model) -> None:
    r = model(PROMPT, max_tokens=6, temperature=0, logprobs=3)            # __call__ is create_completion
    lp = r["choices"][0]["logprobs"]
    ids = model.tokenize(PROMPT, add_bos=True, special=True)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    trace = model.ctx.tokens[len(ids):len(ids) + 6]                        # the generated ids the cache holds
    ref = _log_softmax(model.logits(ids + trace))
    for i, t in enumerate(trace):
        assert lp["token_logprobs"][i] == pytest.approx(ref[len(ids) - 1 + i, t], abs=1e-5)
        best = list(lp["top_logprobs"][i].items())
        assert len(best) == 3 and best[0][0] == lp["tokens"][i]             # greedy: the best is the one taken
        assert best[0][1] == pytest.approx(ref[len(ids) - 1 + i].max(), abs=1e-5)
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"][0] == len(PROMPT)                          # offsets into prompt + text, as Llama's


def test_echo_puts_the_prompt_first_with_its_logprobs(model: Model) -> None:
    r = model.create_completion(PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    c = r["choices"][0]
    plain = model.create_completion(PROMPT, max_tokens=3, temperature=0)["choices"][0]["text"]
    assert c["text"] == PROMPT + plain
    ids = model.tokenize(PROMPT, add_bos=True, special=True)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _log_softmax(model.logits(ids))
    assert lp["token_logprobs"][1] == pytest.approx(ref[0, ids[1]], abs=1e-5)
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_shapes_match_llama_cpp_python(trained_q8: Path, model: Model) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(trained_q8), n_ctx=256, logits_all=True, verbose=False)
    theirs = llm.create_completion(PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    ours = model.create_completion(PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    assert set(ours["choices"][0]) == set(theirs["choices"][0])
    assert set(ours["choices"][0]["logprobs"]) == set(theirs["choices"][0]["logprobs"])
    assert model.create_completion(PROMPT, max_tokens=2)["choices"][0]["logprobs"] is None
    chat = model.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
                                        logprobs=True, top_logprobs=2)
    content = chat["choices"][0]["logprobs"]["content"]
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"} and len(content[0]["top_logprobs"]) == 2
    for c in model.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, stream=True):
        assert c["choices"][0]["logprobs"] is None
    llm.close()


def test_model_path_once(trained_q8: Path) -> None:
    with pytest.raises(TypeError, match="once"):
        Model(trained_q8, model_path=trained_q8)
    with pytest.raises(ValueError, match="stream"):
        Model(model_path=trained_q8, n_ctx=64).create_completion("x", logprobs=2, stream=True)


def test_eval_and_reset_as_llama_cpp_python(model: Model) -> None:
    ids = model.tokenize(PROMPT, add_bos=True, special=True)
    model.reset()
    model.eval(ids)
    model.eval([5])
    assert model.ctx.tokens == ids + [5] and model.n_ctx_train == 256
    model.reset()
    assert model.ctx.n_past == 0
    with pytest.raises(ValueError, match="do not fit"):
        model.eval([5] * (model.n_ctx + 1))
    with pytest.raises(ValueError, match="out of range"):
        model.eval([-1])
