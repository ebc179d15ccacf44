"""llama.cpp's own sources as oracles: convert_hf_to_gguf.py, its gguf-py, and the vocab test vectors.

They ship in llama-cpp-python's source distribution. The tree is found through $HOTCOLD_LLAMA_CPP_SRC
(the folder holding convert_hf_to_gguf.py), under ../ref or /work/ref, or in ~/.cache/hotcold, where
it is fetched with `pip download` (the installed llama-cpp-python's version) on first use.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hotcold"
# Members of the sdist the tests read; the rest (the C/C++ sources) stays in the archive.
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-")

_RUNNER = """
import sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import convert_hf_to_gguf as c
from conversion.olmo import OlmoeModel
from conversion.qwen import Qwen2MoeModel
# These reference classes read tokenizer.json only; the tiny test models ship SentencePiece.
def _patch(cls):
    bpe = cls.set_vocab
    def set_vocab(self):
        return self._set_vocab_sentencepiece() if (self.dir_model / "tokenizer.model").is_file() else bpe(self)
    cls.set_vocab = set_vocab
for cls in (OlmoeModel, Qwen2MoeModel):
    _patch(cls)
c.main()
"""


def _fetch(dest: Path) -> Path | None:
    """Download and unpack the needed parts of the llama-cpp-python sdist matching the installed version."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None
    tree = dest / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", tmp, f"llama-cpp-python=={version}"], capture_output=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not archives:
            return None
        with tarfile.open(archives[0]) as tf:
            members = [m for m in tf.getmembers() if any(w in m.name for w in _WANTED) and "/vendor/llama.cpp/" in m.name]
            dest.mkdir(parents=True, exist_ok=True)
            tf.extractall(dest, members=members, filter="data")
    return tree if (tree / "convert_hf_to_gguf.py").is_file() else None


@functools.cache
def source_tree() -> Path | None:
    env = os.environ.get("HOTCOLD_LLAMA_CPP_SRC")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "ref", Path("/work/ref"), CACHE):
        candidates += sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"), reverse=True)
    found = next((c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()), None)
    return found or _fetch(CACHE)


def convert(model_dir: Path, out: Path, outtype: str = "f16", vocab_only: bool = False) -> Path:
    """Run the reference converter on `model_dir`; raises CalledProcessError with its stderr on failure."""
    src = source_tree()
    if src is None:
        raise FileNotFoundError("llama.cpp source tree with convert_hf_to_gguf.py not found; set HOTCOLD_LLAMA_CPP_SRC")
    cmd = [sys.executable, "-c", _RUNNER, str(src), str(model_dir), "--outfile", str(out), "--outtype", outtype]
    subprocess.run(cmd + (["--vocab-only"] if vocab_only else []), check=True, capture_output=True, timeout=900)
    return out
