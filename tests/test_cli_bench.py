"""moe-bench: llama-bench's tests and table (markdown, JSON), llama.cpp alongside when asked, bad input exit 2.
Only that it measures and reports is checked here: speed itself belongs in bench/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotcold.cli.bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_json_rows_for_each_test_and_thread_count(trained_q8: Path) -> None:
    r = _run("-m", str(trained_q8), "-p", "16,32", "-n", "8", "-t", "1,2", "-r", "2", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["n_threads"], x["test"]) for x in rows] == [(t, k) for t in (1, 2) for k in ("pp16", "pp32", "tg8")]
    for x in rows:
        h = x["hotcold"]
        assert len(h["samples_ts"]) == 2 and h["avg_ts"] > 0 and x["backend"] == "CPU" and x["params"] > 1e7


def test_markdown_table_with_llama_cpp(trained_q8: Path) -> None:
    pytest.importorskip("llama_cpp")
    r = _run(str(trained_q8), "-p", "16", "-n", "8", "-r", "2", "--vs-llama-cpp")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| model | size | params | backend | threads | test | t/s | llama.cpp t/s | ratio")
    assert len(lines) == 4 and "pp16" in lines[2] and "tg8" in lines[3] and lines[3].endswith("x |")


@pytest.mark.parametrize("args,words", [(("-o", "xml"), "invalid choice"), (("-p", "a"), "comma-separated"),
                                        (("-r", "0"), "-r 0")])
def test_bad_flags_exit_2(trained_q8: Path, args: tuple, words: str) -> None:
    r = _run(str(trained_q8), *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_missing_model_is_one_line(tmp_path: Path) -> None:
    r = _run(str(tmp_path / "none.gguf"))
    assert r.returncode == 2 and "none.gguf" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
