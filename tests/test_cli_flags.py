"""moe-run as a llama-cli user expects it: llama-cli's flag names and meanings, no abbreviations, llama-cli flags
hotcold lacks named as such, and chat mode's keys (Ctrl-C stops a reply, Ctrl-D or /exit quits)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hotcold.cli.run import parse
from hotcold.engine.options import Options

PROMPT = "The :mod:`array` module"


def _moe_run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotcold.cli.run", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_llama_cli_names_parse_to_their_meanings(tmp_path: Path) -> None:
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT)
    a = parse(["-m", "x.gguf", "-s", "42", "-f", str(f), "-r", "\n\n", "-r", "END", "--repeat-last-n", "32", "-v",
               "-ngl", "99", "-sys", "be brief", "-no-cnv", "--no-display-prompt", "-t", "64", "-n", "-1"])
    assert (a.model, a.seed, a.prompt, a.stop, a.repeat_last_n, a.verbose) == ("x.gguf", 42, PROMPT, ["\n\n", "END"],
                                                                                32, True)
    assert (a.device, a.system, a.conversation, a.n_threads, a.n_predict) == ("cuda", "be brief", False, 64, -1)
    assert parse(["x.gguf", "-ngl", "0"]).device == "cpu" and parse(["x.gguf", "-cnv"]).conversation is True
    assert parse(["x.gguf", "--seed", "7"]).system is None                  # -s is the seed, never -sys
    Options.parse(n_threads=64)                                              # more threads than cores: allowed


@pytest.mark.parametrize("argv,words", [
    (["x.gguf", "--mlock"], "llama-cli flag that hotcold does not support"),
    (["x.gguf", "-fa", "on"], "llama-cli flag that hotcold does not support"),
    (["x.gguf", "--ctx", "64"], "unrecognized arguments"),                  # no abbreviations
    (["x.gguf", "-m", "y.gguf"], "give the model once"),
    ([], "give the model once"),
    (["x.gguf", "-p", "a", "-f", "b"], "-p or -f"),
    (["x.gguf", "-f", "/nonexistent/prompt"], "cannot read -f"),
    (["x.gguf", "-ngl", "-3"], "-ngl"),
    (["x.gguf", "-n", "-7"], "-n -7"),
])
def test_bad_flags_are_one_line_and_exit_2(argv: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_n_predict_0_is_none_and_m_is_the_positional(trained_q8: Path) -> None:
    r = _moe_run("-m", str(trained_q8), "-p", PROMPT, "-n", "0")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    a = _moe_run("-m", str(trained_q8), "-p", PROMPT, "-n", "8", "--temp", "0")
    b = _moe_run(str(trained_q8), "-p", PROMPT, "-n", "8", "--temp", "0")
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 1


def _read_until(fd: int, needle: bytes, timeout: float, buf: bytearray) -> bool:
    t0 = time.monotonic()
    while needle not in buf:
        left = timeout - (time.monotonic() - t0)
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        try:
            buf.extend(os.read(fd, 4096))
        except OSError:
            return needle in buf
    return True


def test_chat_ctrl_c_stops_the_reply_and_ctrl_d_quits(trained_q8: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:   # the child: moe-run on the pseudo-terminal, replies that would run until the context is full
        os.execvp(sys.executable, [sys.executable, "-m", "hotcold.cli.run", str(trained_q8), "--ignore-eos",
                                   "-c", "4096", "--temp", "0"])
    buf = bytearray()
    try:
        assert _read_until(fd, b"> ", 120, buf), buf.decode(errors="replace")
        os.write(fd, b"hello\n")
        n = len(buf)
        t0 = time.monotonic()
        while len(buf) < n + 40 and time.monotonic() - t0 < 60:           # the reply is streaming
            _read_until(fd, b"\x00never", 0.2, buf)
        os.write(fd, b"\x03")                                             # Ctrl-C: SIGINT through the terminal
        assert _read_until(fd, b"[reply stopped]", 30, buf), buf.decode(errors="replace")
        assert _read_until(fd, b"> ", 30, buf), buf.decode(errors="replace")   # back at the prompt
        os.write(fd, b"\x04")                                             # Ctrl-D quits
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, buf.decode(errors="replace")
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_chat_empty_lines_ask_again_and_exit_quits(trained_q8: Path) -> None:
    r = _moe_run(str(trained_q8), "-n", "4", "--temp", "0", stdin="\n\nhello\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("> ") == 4 and r.stdout.strip()              # 2 empty lines, one reply, then /exit


def test_stats_without_a_cache_is_refused_before_anything_runs(trained_q8: Path) -> None:
    r = _moe_run(str(trained_q8), "-p", PROMPT, "-n", "4", "--stats")
    assert r.returncode == 2 and "--expert-budget" in r.stderr and r.stdout == "", r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_stats_columns_add_up(trained_q8: Path) -> None:
    r = _moe_run(str(trained_q8), "-p", PROMPT, "-n", "24", "--temp", "0", "--expert-budget", "25%", "--miss",
                 "adaptive", "--stats")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    head = next(ln for ln in lines if ln.startswith("layer ")).split()[1:-1]
    rows = [x for x in lines if x.split() and (x.split()[0].isdigit() or x.startswith("total "))]
    for ln in rows:                                     # the total's tokens go through every one of the layers
        v = dict(zip(head, ln.split()[1:]))
        hits, misses, hot, cold, skipped = (int(v[k]) for k in ("hits", "misses", "hot", "cold", "skipped"))
        layers = len(rows) - 1 if ln.startswith("total") else 1
        assert hits + misses == int(v["tokens"]) * 2 * layers and misses == hot + cold + skipped and hot >= 0, ln
    assert "misses = hot (computed at full precision" in r.stderr
