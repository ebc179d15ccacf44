"""Weights as the engine sees them: quantized matrices (zero-copy views of the mmap; routers as F32 rows) and
small float vectors (norms, biases). Immutable: a backend (engine/backend.py) computes with them."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from hotcold.quant import QType, dequantize, repack
from hotcold.quant.kernels import prepare_weights

from .gguf_file import GGUFError, GGUFFile


class Layout(enum.Enum):
    """How a matrix's blocks lie in memory: as the GGUF file has them, a row after another, or eight rows
    interleaved (quant/repack.py: Q4_K as llama.cpp repacks it for the CPU at load)."""
    ROWS = "rows"
    X8 = "x8"


@dataclass(frozen=True)
class QMatrix:
    """A (rows, cols) weight matrix stored as `qtype` rows, used as X @ W.T by the quant kernels."""
    raw: np.ndarray  # uint8 (rows, row_bytes); Layout.X8: (rows / 8, 8 * row_bytes + unpacked scales)
    qtype: QType
    rows: int
    cols: int
    layout: Layout = Layout.ROWS

    def __post_init__(self) -> None:
        # validated once here, so the backend calls the kernels directly (no per-call checks or copies)
        view = self.raw if self.layout is Layout.X8 else prepare_weights(self.raw, self.qtype, self.cols)
        object.__setattr__(self, "kernel_view", view)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


def interleaved(m: QMatrix) -> QMatrix:
    """m with its rows interleaved by eights (a copy, in memory) where quant/repack.py has kernels for it, else m."""
    if m.layout is Layout.X8 or not repack.can_repack(m.qtype, m.rows):
        return m
    return QMatrix(repack.repack(m.raw), m.qtype, m.rows, m.cols, Layout.X8)


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


def _f32_matrix(a: np.ndarray) -> QMatrix:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return QMatrix(a.view(np.uint8), QType.F32, a.shape[0], a.shape[1])


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

    def _finite(self, name: str, a: np.ndarray) -> np.ndarray:
        # norms and routers are small enough to check at load; a NaN there would poison every token
        if not np.isfinite(a).all():
            raise GGUFError(f"{self.f.path}: tensor {name} holds NaN or infinite values; the file is corrupt")
        return a

    def vector(self, name: str) -> np.ndarray:
        """A small tensor (norm weight, bias) as a float32 copy, flattened."""
        t = self._ref(name, 1)
        return self._finite(name, dequantize(self.f.raw(name), t.qtype).reshape(-1).astype(np.float32))

    def dense(self, name: str) -> QMatrix:
        """A 2-D tensor as F32 rows (routers: small, and exact products of the router's logits)."""
        t = self._ref(name, 2)
        return _f32_matrix(self._finite(name, dequantize(self.f.raw(name), t.qtype)))

    def dense_row(self, name: str) -> QMatrix:
        """A 1-D tensor as a one-row F32 matrix (a gate logit per token)."""
        return _f32_matrix(self.vector(name)[None, :])

    def matrix(self, name: str) -> QMatrix:
        t = self._ref(name, 2)
        return QMatrix(self.f.raw(name), t.qtype, t.shape[0], t.shape[1])

    def stack(self, name: str) -> QStack:
        t = self._ref(name, 3)
        return QStack(self.f.raw(name), t.qtype, t.shape[1], t.shape[2])
