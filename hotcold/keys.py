"""GGUF metadata keys hotcold adds to the files it writes (llama.cpp's own keys are gguf.Keys), and
the names of the files that go next to a main file (its cold copies, its expert predictor).

llama.cpp ignores keys it does not know, so these keep converted files loadable by it.
"""
from pathlib import Path

# sha256 over the main file's expert tensors (names, types, shapes and bytes, in file order).
EXPERTS_SHA256 = "hotcold.experts.sha256"
# In OUT.cold.gguf: the EXPERTS_SHA256 of the main file these cold copies belong to, and their type.
COLD_OF = "hotcold.cold.experts_of"
COLD_TYPE = "hotcold.cold.type"


def _beside(main: Path, suffix: str) -> Path:
    """MAIN.gguf (or MAIN) -> MAIN<suffix>, in the same folder."""
    main = Path(main)
    return main.with_name((main.name[:-5] if main.name.endswith(".gguf") else main.name) + suffix)


def cold_path_for(out: Path) -> Path:
    """OUT.gguf -> OUT.cold.gguf, next to the main file."""
    return _beside(out, ".cold.gguf")


def predictor_path_for(model: Path) -> Path:
    """MODEL.gguf -> MODEL.predictor.npz, next to the model: where moe-predictor train -m MODEL writes, and where
    a model loaded with an expert budget finds its predictor."""
    return _beside(model, ".predictor.npz")
