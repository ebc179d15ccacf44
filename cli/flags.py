"""argparse arguments built from the fields of an options dataclass (engine.options.Options,
engine.sampling.SamplingParams), so that each option is defined once: name, flags, help, choices."""
from __future__ import annotations

import argparse
import enum
import sys
from dataclasses import MISSING, fields
from typing import Any, Callable, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (-s is never a prefix of -sys), whose errors are one line (exit 2)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message: str) -> "NoReturn":
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def add_options(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (),
                server: bool = False) -> None:
    """One argument per field of `cls` that has flags (but the fields in `exclude`, which a tool defines its own
    way, and the "server" group's unless `server`: slots and scheduling are moe-server's); a flag not given is left
    out of the namespace, so the dataclass's own default applies."""
    groups: dict[str, Any] = {}
    for f in fields(cls):
        md = f.metadata
        group = md.get("group", "model")
        if not md.get("flags") or f.name in exclude or (group == "server" and not server):
            continue
        target = parser if group == "model" else groups.setdefault(group, parser.add_argument_group(group))
        default = f.default.value if isinstance(f.default, enum.Enum) else f.default
        hint = f" (default {default})" if default not in (None, False, MISSING) else ""
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=md["help"] + hint)
        if md["cli"] is None:
            kw["action"] = "store_true"
        else:
            kw["type"] = md["cli"]
            if md["choices"] is not None:
                kw["choices"] = [m.value for m in md["choices"]]
        target.add_argument(*md["flags"], **kw)


def add_model(parser: argparse.ArgumentParser, like: str) -> None:
    """The GGUF file as the first argument or -m/--model, as llama.cpp's tool `like` takes it."""
    parser.add_argument("model_pos", nargs="?", metavar="MODEL", help="GGUF file (from moe-convert or llama.cpp); or -m")
    parser.add_argument("-m", "--model", dest="model", default=None, help=f"GGUF file, as {like}'s -m")


def model_arg(parser: argparse.ArgumentParser, args: argparse.Namespace, usage: str) -> str:
    """The model given once (else a one-line error naming `usage`), also left in args.model."""
    if (args.model is None) == (args.model_pos is None):
        parser.error(f"give the model once: {usage}")
    args.model = args.model or args.model_pos
    return args.model


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the command line set."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def one_line(e: BaseException) -> str:
    """An error as the one line a CLI prints: an OSError as 'strerror: filename', anything else its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join((str(e) or type(e).__name__).split())


def guarded(prog: str, body: Callable[[], None], memory_hint: str = "") -> int:
    """A CLI's exit status for `body`: what a file or an option gets wrong (ValueError and its subclasses),
    OSErrors (missing file, permission, full disk), a busy model and MemoryError are one line and exit 2;
    Ctrl-C is 130."""
    try:
        body()
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory{memory_hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
