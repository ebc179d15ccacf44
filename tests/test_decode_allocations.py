"""The decode loop allocates nothing: 32 steady-state decode steps of the plain engine make no numpy array
and no Numba array (tests/alloc_count.py says how both are counted), and leave no memory behind."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import micro_models
from alloc_count import counting_numba, counting_numpy
from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.model import Transformer

STEPS = 32


def _decode(path: Path) -> tuple[list[int], dict[str, int], int]:
    model = Transformer.load(GGUFFile(path))
    ctx = model.context(n_ctx=64, n_batch=16)
    logits = model.forward(np.array([1, 5, 9, 2]), ctx)
    tok = np.zeros(1, dtype=np.int64)
    for _ in range(3):                                     # compile and warm the decode path
        tok[0] = int(np.argmax(logits[0]))
        logits = model.forward(tok, ctx)
    out: list[int] = []
    best = np.zeros((), dtype=np.int64)                    # greedy choice without a temporary
    tracemalloc.start()
    live0 = tracemalloc.get_traced_memory()[0]
    with counting_numpy() as numpy_allocs, counting_numba() as numba:
        for _ in range(STEPS):
            np.argmax(logits[0], out=best)
            tok[0] = best
            logits = model.forward(tok, ctx)
            out.append(int(tok[0]))
    grown = tracemalloc.get_traced_memory()[0] - live0
    tracemalloc.stop()
    numba["numpy"] = numpy_allocs[0]
    return out, numba, grown


def _check(counts: dict[str, int], grown: int) -> None:
    assert counts["numpy"] == 0, f"{counts['numpy']} numpy arrays allocated in {STEPS} decode steps"
    assert counts["array_args"] > 0                        # the counter saw the kernels called
    extra = counts["nrt"] - counts["array_args"]
    assert extra == 0, f"{extra} Numba allocations beyond the argument wrappers in {STEPS} decode steps"
    assert counts["nrt_live"] == 0
    assert grown < 64 * 1024, f"{grown} bytes still held after {STEPS} decode steps"


def test_trained_model_decode_allocates_nothing(trained_q8: Path) -> None:
    out, counts, grown = _decode(trained_q8)
    _check(counts, grown)
    assert len(set(out)) > 1


@pytest.mark.parametrize("variant", ["qwen2moe", "qwen3moe", "olmoe", "qwen2"])
def test_every_architecture_decodes_without_allocating(tmp_path: Path, variant: str) -> None:
    _, counts, grown = _decode(micro_models.write(variant, tmp_path / f"{variant}.gguf"))
    _check(counts, grown)


def test_the_counters_see_allocations() -> None:
    """The test above cannot pass by counting nothing: a numpy temporary and a Numba np.empty are seen."""
    from numba import njit

    @njit
    def makes_one(a: np.ndarray) -> float:
        return np.empty(3).shape[0] + a[0]

    a = np.ones(4)
    makes_one(a)
    with counting_numpy() as numpy_allocs, counting_numba() as numba:
        a + 1
        makes_one(a)
    assert numpy_allocs[0] >= 1
    assert numba["nrt"] - numba["array_args"] == 1
