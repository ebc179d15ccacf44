"""Chat templates: the GGUF's `tokenizer.chat_template`, rendered by jinja2 in a sandbox, in a process of its own.

Templates come from model files, i.e. from strangers. engine/chat_worker.py renders them in jinja2's sandbox
(no attribute tricks into Python internals) with bounded operators, output and memory; this side gives each
render a deadline and replaces a worker that misses it. Every failure is a ChatTemplateError. The helpers
are the ones Hugging Face's apply_chat_template provides.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

# Used when a model ships no template: ChatML, as llama.cpp falls back to.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
DEADLINE_S = 5.0     # per render: real templates take milliseconds
_WORKER = Path(__file__).with_name("chat_worker.py")


class ChatTemplateError(ValueError):
    """The template failed to render; the message carries the template's own error."""


class _Worker:
    """The one renderer process, started on first use and restarted after a deadline is missed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            # neither the working directory nor engine/ on its path (their modules could shadow jinja2's imports)
            code = f"import sys, runpy; sys.path.pop(0); runpy.run_path({str(_WORKER)!r}, run_name='__main__')"
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, bufsize=0)
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc = None

    def ask(self, request: dict[str, Any], deadline_s: float) -> dict[str, Any]:
        try:
            line = (json.dumps(request) + "\n").encode()
        except (TypeError, ValueError) as e:
            raise ChatTemplateError(f"chat messages must be JSON values (strings, numbers, lists, dicts): {e}") from None
        with self._lock:
            proc = self._start()
            try:
                proc.stdin.write(line)
                reply = self._read(proc, time.monotonic() + deadline_s)
            except (OSError, ValueError):
                self._stop()
                raise ChatTemplateError("the chat template's renderer stopped (it ran out of memory or time)") from None
            if reply is None:
                self._stop()
                raise ChatTemplateError(f"the model's chat template did not finish within {deadline_s:g} s")
        return reply

    @staticmethod
    def _read(proc: subprocess.Popen, until: float) -> dict[str, Any] | None:
        fd, buf = proc.stdout.fileno(), b""
        while not buf.endswith(b"\n"):
            left = until - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise OSError("renderer exited")
            buf += chunk
        return json.loads(buf)


_worker = _Worker()
atexit.register(_worker._stop)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"the chat template must be a string, not {type(source).__name__}")
        self.source = source or CHATML
        self.bos_token, self.eos_token = bos_token, eos_token
        self._ask(None)                                    # a template that does not parse fails here

    def _ask(self, context: dict[str, Any] | None) -> str:
        reply = _worker.ask({"source": self.source, "context": context}, DEADLINE_S)
        if "error" in reply:
            raise ChatTemplateError(reply["error"])
        return reply["text"]

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ChatTemplateError(f"message {i} needs 'role' and 'content' keys, got "
                                        f"{sorted(m) if isinstance(m, Mapping) else type(m).__name__}")
        return self._ask(dict(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                              bos_token=self.bos_token, eos_token=self.eos_token))
