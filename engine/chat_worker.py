"""The chat-template renderer's own process (engine/chat.py starts it): one JSON request per line on stdin,
one JSON reply per line on stdout. Templates come from model files, i.e. from strangers: here they run in
jinja2's sandbox with bounded operators, under an address-space and CPU-time limit, and a template that
hangs or grows without bound costs this process, never the model's. Imports nothing of hotcold.
"""
from __future__ import annotations

import json
import math
import resource
import sys
from datetime import datetime
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT = 1 << 22      # characters of a rendered prompt (4M: far beyond any context window)
MAX_INT_BITS = 1 << 16    # of a template's integers: 9**9**9 is refused, not computed for hours
MEMORY = 1 << 30          # bytes of address space for this process
CPU_SECONDS = 60          # a backstop: the parent's deadline comes first


class TemplateLimit(Exception):
    """A template went past a limit of the sandbox."""


class TemplateRaised(Exception):
    """The template's own raise_exception(message)."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox (no attribute tricks into Python internals, ranges of at most 100000) whose
    `*`, `**` and `+` refuse results past the limits above (jinja2 then also never folds them at compile time)."""
    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1:
            if right > 0 and right * math.log2(abs(left)) > MAX_INT_BITS:
                raise TemplateLimit(f"{left} ** {right} is too large for a chat template")
        elif operator == "*":
            if _is_int(left) and _is_int(right):
                if abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                    raise TemplateLimit("an integer product too large for a chat template")
            else:
                seq, n = (left, right) if _is_int(right) else (right, left)
                if _is_int(n) and hasattr(seq, "__len__") and len(seq) * max(n, 0) > MAX_OUTPUT:
                    raise TemplateLimit(f"a repetition of {len(seq)} x {n} items is too large for a chat template")
        elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            if len(left) + len(right) > MAX_OUTPUT:
                raise TemplateLimit("a concatenation too long for a chat template")
        return super().call_binop(context, operator, left, right)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _raise(message: str) -> None:
    raise TemplateRaised(str(message))


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def render(env: BoundedSandbox, cache: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    """{"source": template, "context": its variables or null to parse only} -> {"text": ...} or {"error": ...}."""
    source = req["source"]
    try:
        template = cache.get(source)
        if template is None:
            template = cache[source] = env.from_string(source)
    except MemoryError:
        return {"error": f"the model's chat template needs more than {MEMORY >> 20} MiB to parse"}
    except Exception as e:   # noqa: BLE001 - every failure of a stranger's template is reported, none escapes
        return {"error": f"the model's chat template does not parse: {e}"}
    if req.get("context") is None:
        return {"text": ""}
    out, n = [], 0
    try:
        for piece in template.generate(**req["context"]):
            n += len(piece)
            if n > MAX_OUTPUT:
                raise TemplateLimit(f"it renders more than {MAX_OUTPUT} characters")
            out.append(piece)
    except TemplateRaised as e:
        return {"error": str(e)}
    except TemplateLimit as e:
        return {"error": f"the model's chat template failed: {e}"}
    except MemoryError:
        return {"error": f"the model's chat template needs more than {MEMORY >> 20} MiB to render"}
    except Exception as e:   # noqa: BLE001
        return {"error": f"the model's chat template failed: {type(e).__name__}: {e}"}
    return {"text": "".join(out)}


def main() -> None:
    for limit, value in ((resource.RLIMIT_AS, MEMORY), (resource.RLIMIT_CPU, CPU_SECONDS)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
    env, cache = _environment(), {}
    for line in sys.stdin:
        try:
            reply = render(env, cache, json.loads(line))
        except MemoryError:
            reply = {"error": "the model's chat template ran out of memory"}
        if len(cache) > 64:
            cache.clear()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
