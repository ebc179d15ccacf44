"""The cold tier's source: the low-precision copies in OUT.cold.gguf, checked to belong to the main file."""
from __future__ import annotations

from pathlib import Path

from hotcold import keys
from hotcold.quant.kernels import MATVEC

from ..gguf_file import GGUFError, GGUFFile
from ..weights import WeightReader
from .expert import Expert


def open_cold(main: GGUFFile, path: Path, random_access: bool = False) -> GGUFFile:
    """The cold copies at `path`, checked to belong to `main`; errors say what to do (`random_access`: see
    GGUFFile)."""
    if not path.is_file():
        raise FileNotFoundError(f"cold expert copies {path} not found: convert with `moe-convert MODEL {main.path}` "
                                "(it writes them next to the main file), or serve misses hot (miss='hot', --miss hot)")
    cold = GGUFFile(path, random_access)
    want, have = main.get_typed(keys.EXPERTS_SHA256, str), cold.get_typed(keys.COLD_OF, str)
    if have is None:
        raise GGUFError(f"{path} is not a hotcold cold-copy file (no {keys.COLD_OF}); give the OUT.cold.gguf "
                        "moe-convert wrote")
    if want is None:
        raise GGUFError(f"{main.path} was not written by moe-convert (no {keys.EXPERTS_SHA256}), so {path} "
                        "cannot be matched to it; convert the model with moe-convert, or serve misses hot "
                        "(miss='hot', --miss hot)")
    if want != have:
        raise GGUFError(f"{path} holds cold copies of different experts than {main.path} (experts sha256 "
                        f"{have[:12]}... vs {want[:12]}...); re-convert them together")
    for name, t in main.tensors.items():   # the hash says which experts; the shapes are checked all the same
        if not name.endswith("_exps.weight"):
            continue
        c = cold.tensors.get(name)
        if c is None or c.shape != t.shape or c.qtype not in MATVEC:
            got = "missing" if c is None else f"{c.qtype.name} {c.shape}"
            raise GGUFError(f"{path}: cold copy of {name} is {got}, expected the shape {t.shape} of {main.path}'s "
                            "(in a type the kernels multiply with); re-convert them together")
    return cold


def cold_experts(cold: GGUFFile, n_layer: int) -> list[list[Expert]]:
    """Every layer's cold experts as zero-copy views of the cold file (an empty list for a dense layer)."""
    w = WeightReader(cold)
    out = []
    for i in range(n_layer):
        p = f"blk.{i}."
        if not w.has(p + "ffn_gate_exps.weight"):
            out.append([])
            continue
        g, u, d = (w.stack(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
        out.append([Expert(g[e], u[e], d[e]) for e in range(g.count)])
    return out
