"""How close hotcold's logits are to llama.cpp's on the same quantized files: argmax agreement and mean KL.

For each architecture's tiny random model (built with transformers, as in the tests) and the shipped
trained model, at Q8_0, Q4_K and llama-quantize's Q4_K_M mix: all logits of an 81-token sequence
from both engines, then the share of positions with the same argmax and the mean KL(llama.cpp || hotcold).

    python bench/accuracy.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import tiny_models  # noqa: E402

from hotcold.convert import convert  # noqa: E402
from hotcold.engine.gguf_file import GGUFFile  # noqa: E402
from hotcold.engine.model import Transformer  # noqa: E402

TOKS = [1] + [int(t) for t in np.random.default_rng(3).integers(3, 4096, size=80)]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(path: Path, toks: list[int]) -> tuple[float, float, float]:
    from hotcold.llama_amx import guard
    guard()
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(toks)
    ref = np.array(llm.scores[:len(toks)])
    llm.close()
    m = Transformer.load(GGUFFile(path))
    got = m.forward(np.array(toks), m.context(256), all_logits=True)
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), kl, float(np.abs(ref - got).max())


def q4_k_m(src: Path, work: Path) -> Path:
    from hotcold.llama_amx import guard
    guard()
    import llama_cpp
    f32 = convert(src, work / "f32.gguf", type="f32", cold_type=None, progress=False).path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    out = work / "q4_k_m.gguf"
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError("llama_model_quantize failed")
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="hotcold-accuracy-"))
    models = {a: tiny_models.build(a, work / a) for a in tiny_models.ARCHS}
    models["mixtral-trained"] = REPO / "models" / "mixtral-trained"
    print("| model | type | argmax agreement | mean KL(llama.cpp \\|\\| hotcold) | max abs logit diff |")
    print("|---|---|---:|---:|---:|")
    for name, src in models.items():
        for qtype in ("q8_0", "q4_k", "q4_k_m"):
            d = work / f"{name}-{qtype}"
            d.mkdir()
            path = q4_k_m(src, d) if qtype == "q4_k_m" else \
                convert(src, d / "m.gguf", type=qtype, cold_type=None, progress=False).path
            agree, kl, diff = compare(path, TOKS)
            print(f"| {name} | {qtype.upper()} | {agree:.1%} | {kl:.2e} | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
