"""Run llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python source tree) as the oracle.

The source tree is found through $HOTCOLD_LLAMA_CPP_SRC (the folder holding convert_hf_to_gguf.py)
or under ../ref or /work/ref; tests that need it skip when it is absent.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_RUNNER = """
import sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import convert_hf_to_gguf as c
from conversion.olmo import OlmoeModel
from conversion.qwen import Qwen2MoeModel
# These reference classes read tokenizer.json only; the tiny test models ship SentencePiece.
for cls in (OlmoeModel, Qwen2MoeModel):
    cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
c.main()
"""


def source_tree() -> Path | None:
    env = os.environ.get("HOTCOLD_LLAMA_CPP_SRC")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "ref", Path("/work/ref")):
        candidates += sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return next((c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()), None)


def convert(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    src = source_tree()
    if src is None:
        raise FileNotFoundError("llama.cpp source tree with convert_hf_to_gguf.py not found; set HOTCOLD_LLAMA_CPP_SRC")
    subprocess.run([sys.executable, "-c", _RUNNER, str(src), str(model_dir), "--outfile", str(out), "--outtype", outtype],
                   check=True, capture_output=True)
    return out
