"""README's fenced blocks run as written (all but the install lines), on the shipped model: OUT.gguf and
MODEL_DIR stand for it, held_out.txt for a text long enough for the default context."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import REPO

BLOCKS = [(lang, body) for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", (REPO / "README.md").read_text(),
                                                    re.S | re.M) if "pip install" not in body]


@pytest.fixture(scope="module")
def folder(trained_q8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    shutil.copy(trained_q8, d / "OUT.gguf")
    shutil.copy(trained_q8.with_name(trained_q8.stem + ".cold.gguf"), d / "OUT.cold.gguf")
    (d / "MODEL_DIR").symlink_to(REPO / "models" / "mixtral-trained")
    (d / "held_out.txt").write_text((REPO / "README.md").read_text() * 4)
    return d


def test_there_are_blocks_to_run() -> None:
    assert sum(lang == "sh" for lang, _ in BLOCKS) >= 2 and sum(lang == "python" for lang, _ in BLOCKS) >= 2


@pytest.mark.parametrize("lang,body", BLOCKS, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(BLOCKS)])
def test_readme_block_runs(folder: Path, lang: str, body: str) -> None:
    if "--vs-llama-cpp" in body:
        pytest.importorskip("llama_cpp")
    if lang == "sh":
        for line in body.strip().splitlines():
            cmd = re.sub(r"\s{2,}#.*$", "", line)
            r = subprocess.run(["bash", "-c", cmd], cwd=folder, capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
            assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    else:
        r = subprocess.run([sys.executable, "-c", body], cwd=folder, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
