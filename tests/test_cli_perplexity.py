"""moe-perplexity: llama-perplexity's lines, the numbers of Model.perplexity, its +/- as llama.cpp computes it."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from hotcold.engine.api import Model
from tiny_models import REPO

TEXT = (REPO / "README.md").read_text() * 2


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotcold.cli.perplexity", *args], capture_output=True, text=True,
                          timeout=300)


def test_perplexity_lines_and_numbers(trained_q8: Path, tmp_path: Path) -> None:
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    r = _run(str(trained_q8), "-f", str(f), "-c", "128")
    assert r.returncode == 0, r.stderr
    chunks = re.findall(r"\[(\d+)\]([0-9.]+),", r.stdout)
    ppl, err = map(float, re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", r.stdout).groups())
    m = Model(trained_q8, n_ctx=128)
    nll = np.concatenate(list(m.perplexity_chunks(TEXT, 128)))
    assert len(chunks) == len(m.tokenize(TEXT, add_bos=False)) // 128 and float(chunks[-1][1]) == round(ppl, 4)
    assert ppl == round(m.perplexity(TEXT, 128), 4)
    want = math.exp(nll.mean()) * math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1))
    assert err == round(want, 5)


def test_bad_input_is_one_line(trained_q8: Path, tmp_path: Path) -> None:
    for args, words in (((str(trained_q8), "-f", str(tmp_path / "none.txt")), "No such file"),
                        ((str(trained_q8), "-f", str(REPO / "models" / "mixtral-trained" / "training.json"),
                          "-c", "256"), "at least n_ctx=256")):
        r = _run(*args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
