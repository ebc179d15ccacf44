"""Hostile files for tests/test_hostile.py: a GGUF rewritten from a valid one with chosen metadata values (any
GGUF type, or none), tensor infos (shape, type, offset) and tensor bytes, and a forked loader that reports what
loading and a short generation of each did, under an address-space limit and a deadline."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from gguf import GGUF_MAGIC, GGUFValueType

from hotcold.engine.gguf_file import GGUFFile

DELETE = object()   # a metadata override that removes the key

_FMT = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
        GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


def _value(t: GGUFValueType, v: Any) -> bytes:
    if t in _FMT:
        return struct.pack(_FMT[t], v)
    if t == GGUFValueType.STRING:
        b = v.encode() if isinstance(v, str) else bytes(v)
        return struct.pack("<Q", len(b)) + b
    et, items = v                                     # an array: (element type, values)
    return struct.pack("<IQ", et, len(items)) + b"".join(_value(et, x) for x in items)


def _guess(v: Any) -> tuple[GGUFValueType, Any]:
    """The GGUF type a parsed value came from, near enough to write it back."""
    if isinstance(v, bool):
        return GGUFValueType.BOOL, v
    if isinstance(v, int):
        return (GGUFValueType.UINT32 if 0 <= v < 1 << 32 else GGUFValueType.INT64), v
    if isinstance(v, float):
        return GGUFValueType.FLOAT32, v
    if isinstance(v, str):
        return GGUFValueType.STRING, v
    items = list(v.tolist() if hasattr(v, "tolist") else v)
    if items and isinstance(items[0], str):
        return GGUFValueType.ARRAY, (GGUFValueType.STRING, items)
    if hasattr(v, "dtype"):
        et = {"f": GGUFValueType.FLOAT32, "i": GGUFValueType.INT32, "u": GGUFValueType.UINT32,
              "b": GGUFValueType.BOOL}[v.dtype.kind]
        return GGUFValueType.ARRAY, (et, items)
    return GGUFValueType.ARRAY, (GGUFValueType.INT32, items)


def rewrite(base: GGUFFile, out: Path, meta: dict[str, Any] | None = None, tensors: dict[str, dict] | None = None,
            patch: dict[str, bytes] | None = None) -> Path:
    """`base` with metadata overrides (key -> (GGUFValueType, value) or DELETE), tensor info overrides
    (name -> {"shape": numpy-order shape, "type": raw ggml type, "offset": relative offset, "name": new name})
    and byte patches at the start of tensors' data (name -> bytes)."""
    meta, tensors, patch = meta or {}, tensors or {}, patch or {}
    kv = {k: _guess(v) for k, v in base.metadata.items()}
    for k, v in meta.items():
        if v is DELETE:
            kv.pop(k, None)
        else:
            kv[k] = v
    head = [struct.pack("<IIQQ", GGUF_MAGIC, 3, len(base.tensors), len(kv))]
    for k, (t, v) in kv.items():
        head.append(_value(GGUFValueType.STRING, k) + struct.pack("<I", t) + _value(t, v))
    for name, t in base.tensors.items():
        o = tensors.get(name, {})
        shape = o.get("shape", t.shape)
        ne = list(reversed(shape))
        head.append(_value(GGUFValueType.STRING, o.get("name", name)) + struct.pack("<I", len(ne))
                    + b"".join(struct.pack("<Q", d) for d in ne)
                    + struct.pack("<IQ", o.get("type", int(t.qtype)), o.get("offset", t.offset - base.data_offset)))
    header = b"".join(head)
    align = base.metadata.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 else 32
    with open(base.path, "rb") as f:
        f.seek(base.data_offset)
        data = bytearray(f.read())
    for name, b in patch.items():
        at = base.tensors[name].offset - base.data_offset
        data[at:at + len(b)] = b
    with open(out, "wb") as f:
        f.write(header + b"\0" * (-len(header) % align))
        f.write(data)
    return out


# --- the forked loader -----------------------------------------------------------------------------------

_WORKER = r'''
import json, os, resource, signal, sys, traceback
os.environ["NUMBA_THREADING_LAYER"] = "workqueue"   # fork-safe, unlike GNU OpenMP
from hotcold.engine.api import Model
limit, deadline, warm = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
Model.load(warm, n_ctx=64)                         # kernels compiled or loaded once, before any fork
print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.alarm(int(deadline) + 1)
        try:
            if case["kind"] == "gguf":
                m = Model.load(case["path"], **case.get("options", {}))
                if case.get("chat"):
                    m.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
                else:
                    "".join(m.generate(case.get("prompt", "The"), max_tokens=2, temperature=0))
            else:
                import contextlib, io
                from hotcold.cli.convert import main
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = main([case["path"], case["out"], "--no-progress"])
                if rc:
                    raise ValueError(err.getvalue())
            out = {"outcome": "ok"}
        except ValueError as e:
            out = {"outcome": "ValueError", "type": type(e).__name__, "message": str(e)}
        except OSError as e:   # a file that is not there: the CLIs' exit 2 as well
            out = {"outcome": "OSError", "type": type(e).__name__, "message": str(e)}
        except BaseException as e:
            out = {"outcome": "other", "type": type(e).__name__, "message": traceback.format_exc()[-2000:]}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    os.close(r)
    if got:
        out = json.loads(got)
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        out = {"outcome": "hang" if sig == signal.SIGALRM else "crash", "type": signal.Signals(sig).name, "message": ""}
    else:
        out = {"outcome": "crash", "type": f"exit {os.WEXITSTATUS(status)}", "message": ""}
    print(json.dumps(out), flush=True)
'''


class Loader:
    """A process that has imported hotcold and warmed its kernels on `warm`, forking one child per case."""

    def __init__(self, warm: Path, limit: int = 3 << 30, deadline: float = 20.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(limit), str(deadline), str(warm)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the hostile-file loader did not start")

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
