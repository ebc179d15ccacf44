"""moe-server through OpenAI's own Python client, on 127.0.0.1 with the shipped model: completions, chat,
streaming, stop strings, OpenAI-shaped errors, metrics, 16 concurrent clients whose outputs equal each
request run alone, and slots freed when clients go away mid-stream."""
from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hotcold import Model  # noqa: E402
from hotcold.cli.server import build_parser  # noqa: E402
from hotcold.engine.batch import BatchEngine  # noqa: E402
from hotcold.engine.server.app import create_app  # noqa: E402

KEY = "sk-test"
PROMPTS = ["The :mod:`array` module", "import os\nos.path.", "Return the", "class Foo:\n    def __init__(self",
           "The :mod:`array` module defines", "See also", "Changed in version 3.", "x = [1, 2", "Raises",
           ":func:`len`", "The following", "for i in range(", "Note that", "#include", "Example::", "When"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, path: Path, **options) -> None:
        self.model = Model(path, **options)
        self.engine = BatchEngine(self.model).start()
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.model, self.engine, api_key=KEY),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()


@pytest.fixture(scope="module")
def served(trained_q8: Path) -> Iterator[Served]:
    s = Served(trained_q8, n_seq_max=4, n_batch=32, n_ctx=1024)   # long streams to disconnect from
    yield s
    s.close()


@pytest.fixture(scope="module")
def alone(trained_q8: Path) -> Model:
    return Model(trained_q8, n_ctx=1024)


def test_completion_and_stream(served: Served, alone: Model) -> None:
    c = served.client()
    assert [m.id for m in c.models.list().data] == ["trained-q8_0.gguf"]
    r = c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    want = alone.create_completion(PROMPTS[0], max_tokens=24, temperature=0)
    assert r.choices[0].text == want["choices"][0]["text"] and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"] and r.usage.completion_tokens == 24
    chunks = list(c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                       stream=True))
    assert len(chunks) > 2 and "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_and_logprobs(served: Served, alone: Model) -> None:
    c = served.client()
    r = c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, seed=7,
                             logprobs=2)
    want = alone.create_completion(PROMPTS[2], max_tokens=16, temperature=0.9, seed=7, logprobs=2)
    assert r.choices[0].text == want["choices"][0]["text"]
    lp, wlp = r.choices[0].logprobs, want["choices"][0]["logprobs"]
    assert lp.tokens == wlp["tokens"] and lp.text_offset == wlp["text_offset"]
    assert lp.token_logprobs == pytest.approx(wlp["token_logprobs"], abs=1e-6)


def test_chat_and_stream(served: Served, alone: Model) -> None:
    c = served.client()
    msgs = [{"role": "system", "content": "You document Python."}, {"role": "user", "content": "What is a list?"}]
    r = c.chat.completions.create(model="trained-q8_0.gguf", messages=msgs, max_tokens=20, temperature=0,
                                  logprobs=True, top_logprobs=3)
    want = alone.create_chat_completion(msgs, max_tokens=20, temperature=0, logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert r.choices[0].message.role == "assistant"
    assert [t.token for t in r.choices[0].logprobs.content] == [t["token"] for t in want["choices"][0]["logprobs"]["content"]]
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    stream = c.chat.completions.create(model="trained-q8_0.gguf", messages=msgs, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_strings(served: Served, alone: Model) -> None:
    c = served.client()
    full = c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[0], max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    assert stop and stop in full
    r = c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop,
                             stream=True)
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def test_errors_are_openai_shaped(served: Served) -> None:
    c = served.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="trained-q8_0.gguf", prompt="word " * 1200, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and "context" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        served.client("sk-wrong").completions.create(model="trained-q8_0.gguf", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="trained-q8_0.gguf", prompt="x", max_tokens=2, temperature=-1)
    assert "temperature" in e.value.body["message"]
    r = httpx.post(served.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": []}, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(served: Served) -> None:
    assert httpx.get(served.url + "/health", timeout=30).json()["status"] == "ok"
    served.client().completions.create(model="trained-q8_0.gguf", prompt="The", max_tokens=3, temperature=0)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics", timeout=30).text)}
    for name in ("hotcold_completion_tokens", "hotcold_requests_waiting", "hotcold_slots_active", "hotcold_expert_hits",
                 "hotcold_expert_misses", "hotcold_expert_bytes_moved", "hotcold_completion_tokens_per_second"):
        assert name in fams, name
    assert fams["hotcold_completion_tokens"].samples[0].value >= 3


def test_sixteen_concurrent_clients_equal_alone(served: Served, alone: Model) -> None:
    """16 clients at once on 4 slots (12 wait in the queue), half streaming: each greedy output equals the
    request run alone."""
    want = ["".join(alone.generate(p, max_tokens=20, temperature=0)) for p in PROMPTS]

    def one(i: int) -> str:
        c = served.client()
        if i % 2:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model="trained-q8_0.gguf", prompt=PROMPTS[i], max_tokens=20, temperature=0, stream=True))
        return c.completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[i], max_tokens=20,
                                    temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16), timeout=120))
    assert got == want


def test_disconnect_frees_slots(served: Served) -> None:
    """Clients that close their streams after a chunk (4, in every slot), while queued (2), or that give up on a
    non-streamed reply leave no slot busy."""
    cancelled0 = served.engine.counters["cancelled"]
    streams = []
    for i in range(6):
        s = served.client().completions.create(model="trained-q8_0.gguf", prompt=PROMPTS[i], max_tokens=0,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
        if i < 4:
            next(iter(s))
        streams.append(s)
    assert served.engine.waiting == 2
    for s in streams:
        s.close()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(served.url + "/v1/completions", json={"prompt": "The", "max_tokens": 0}, timeout=0.3,
                   headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 30
    while served.engine.active or served.engine.waiting:
        assert time.monotonic() < deadline, "slots still busy after their clients left"
        time.sleep(0.1)
    assert served.engine.counters["cancelled"] >= cancelled0 + 6
    h = httpx.get(served.url + "/health", timeout=30).json()
    assert h["slots_processing"] == 0 and h["requests_waiting"] == 0


def test_cli_flags() -> None:
    """moe-server's flags: llama-server's names, every residency flag of moe-run."""
    a = build_parser().parse_args(["m.gguf", "--port", "9000", "-np", "8", "--expert-budget", "25%", "--miss",
                                   "adaptive", "--api-key", "k", "-c", "512"])
    assert (a.port, a.n_seq_max, a.expert_budget, a.miss, a.api_key, a.n_ctx) == (9000, 8, "25%", "adaptive", "k", 512)
