"""Sampling rules (llama.cpp's order and semantics) and chat-template rendering."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotcold.engine.chat import CHATML, ChatTemplate, ChatTemplateError
from hotcold.engine.sampling import Sampler, SamplingParams

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0], dtype=np.float32)


def draws(params: SamplingParams, logits: np.ndarray = LOGITS, n: int = 400) -> set[int]:
    s = Sampler(params)
    return {s.sample(logits) for _ in range(n)}


def test_greedy_is_argmax() -> None:
    assert draws(SamplingParams(temperature=0.0)) == {1}


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    assert draws(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0)) == {1}


def test_top_k_keeps_the_k_best() -> None:
    assert draws(SamplingParams(temperature=100.0, top_k=2, top_p=1.0, min_p=0.0)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # softmax of LOGITS: token 1 ~ 0.52, token 2 ~ 0.31: p=0.6 needs both, p=0.5 only the first
    assert draws(SamplingParams(temperature=100.0, top_k=0, top_p=0.6, min_p=0.0)) == {1, 2}
    assert draws(SamplingParams(temperature=100.0, top_k=0, top_p=0.5, min_p=0.0)) == {1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    # p(2)/p(1) = e^-0.5 ~ 0.61, p(0)/p(1) = e^-2 ~ 0.14
    assert draws(SamplingParams(temperature=100.0, top_k=0, top_p=1.0, min_p=0.5)) == {1, 2}
    assert draws(SamplingParams(temperature=100.0, top_k=0, top_p=1.0, min_p=0.1)) == {0, 1, 2}


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    s.accept(1)
    assert s.sample(LOGITS) == 2  # 3.0 / 2 = 1.5 < 2.5
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    logits = np.array([-1.0, -0.6], dtype=np.float32)
    s.accept(0)
    assert s.sample(logits) == 1  # -1 * 2 = -2 < -0.6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), logits=st.lists(st.floats(-5, 5), min_size=2, max_size=30))
def test_same_seed_same_draws(seed: int, logits: list[float]) -> None:
    z = np.array(logits, dtype=np.float32)
    a, b = Sampler(SamplingParams(seed=seed)), Sampler(SamplingParams(seed=seed))
    assert [a.sample(z) for _ in range(10)] == [b.sample(z) for _ in range(10)]


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_chat_template_renders_and_defaults_to_chatml() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}", "<s>")
    assert t.render(msgs) == "<s>[user] hi"
    assert ChatTemplate(None).source == CHATML
    assert ChatTemplate(None).render(msgs).endswith("<|im_start|>assistant\n")


def test_chat_template_is_sandboxed_and_errors_are_clear() -> None:
    hostile = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="failed"):
        hostile.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="only user"):
        ChatTemplate("{{ raise_exception('only user') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="'role' and 'content'"):
        ChatTemplate(None).render([{"text": "x"}])
