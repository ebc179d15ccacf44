"""Weights as the engine sees them: quantized matrices (zero-copy views of the mmap) and small float vectors."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hotcold.quant import QType, dequantize
from hotcold.quant.kernels import MATMUL, MATVEC, prepare_weights

from .gguf_file import GGUFError, GGUFFile


@dataclass(frozen=True)
class QMatrix:
    """A (rows, cols) weight matrix stored as `qtype` rows; apply() is X @ W.T through the Numba kernels."""
    raw: np.ndarray  # uint8 (rows, row_bytes)
    qtype: QType
    rows: int
    cols: int

    def __post_init__(self) -> None:
        # validated once here, so apply() calls the kernels directly (no per-call checks or copies)
        object.__setattr__(self, "_w", prepare_weights(self.raw, self.qtype, self.cols))

    def apply(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x (n, cols) float32 C-contiguous -> (n, rows); a single row takes the GEMV kernel."""
        n = x.shape[0]
        if out is None:
            out = np.empty((n, self.rows), dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if n == 1:
            MATVEC[self.qtype](self._w, x[0], out[0])
        elif n:
            MATMUL[self.qtype](self._w, x, out)
        return out

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


@dataclass(frozen=True)
class QStack:
    """A 3-D tensor of stacked matrices (experts): item e is a QMatrix view, no copy."""
    raw: np.ndarray  # uint8 (n, rows, row_bytes)
    qtype: QType
    rows: int
    cols: int

    def __getitem__(self, e: int) -> QMatrix:
        return QMatrix(self.raw[e], self.qtype, self.rows, self.cols)

    @property
    def count(self) -> int:
        return self.raw.shape[0]


class WeightReader:
    """Typed access to a GGUFFile's tensors by GGUF name, with clear errors for missing or misshapen ones."""

    def __init__(self, f: GGUFFile) -> None:
        self.f = f

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def _ref(self, name: str, ndim: int):
        t = self.f.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.f.path}: tensor {name} is missing")
        if len(t.shape) != ndim and not (ndim == 1 and len(t.shape) == 2 and t.shape[0] == 1):
            raise GGUFError(f"{self.f.path}: tensor {name} has shape {t.shape}, expected {ndim}-D")
        return t

    def vector(self, name: str) -> np.ndarray:
        """A small tensor (norm weight, bias) as a float32 copy, flattened."""
        t = self._ref(name, 1)
        return dequantize(self.f.raw(name), t.qtype).reshape(-1).astype(np.float32)

    def dense(self, name: str) -> np.ndarray:
        """A 2-D tensor dequantized to float32 (routers: small, used as a plain matmul)."""
        t = self._ref(name, 2)
        return dequantize(self.f.raw(name), t.qtype).astype(np.float32)

    def matrix(self, name: str) -> QMatrix:
        t = self._ref(name, 2)
        return QMatrix(self.f.raw(name), t.qtype, t.shape[0], t.shape[1])

    def stack(self, name: str) -> QStack:
        t = self._ref(name, 3)
        return QStack(self.f.raw(name), t.qtype, t.shape[1], t.shape[2])

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Selected rows of a 2-D tensor as float32 (the embedding lookup)."""
        t = self._ref(name, 2)
        return dequantize(np.ascontiguousarray(self.f.raw(name)[ids]), t.qtype)
