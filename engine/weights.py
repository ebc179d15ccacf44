"""Weights as the engine sees them: quantized matrices (zero-copy views of the mmap), small float32 matrices
(routers) and vectors (norms, biases). Immutable: a backend (engine/backend.py) computes with them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hotcold.quant import QType, dequantize
from hotcold.quant.kernels import prepare_weights

from .gguf_file import GGUFError, GGUFFile


@dataclass(frozen=True)
class QMatrix:
    """A (rows, cols) weight matrix stored as `qtype` rows, used as X @ W.T by the quant kernels."""
    raw: np.ndarray  # uint8 (rows, row_bytes)
    qtype: QType
    rows: int
    cols: int

    def __post_init__(self) -> None:
        # validated once here, so the backend calls the kernels directly (no per-call checks or copies)
        object.__setattr__(self, "kernel_view", prepare_weights(self.raw, self.qtype, self.cols))

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


@dataclass(frozen=True)
class DenseMatrix:
    """A small float32 matrix used as a plain product: a router (n_expert, n_embd), or a single row
    (n_embd,) such as qwen2moe's shared-expert gate."""
    w: np.ndarray

    @property
    def rows(self) -> int:
        return 1 if self.w.ndim == 1 else self.w.shape[0]

    @property
    def cols(self) -> int:
        return self.w.shape[-1]


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

    def dense(self, name: str) -> DenseMatrix:
        """A 2-D tensor dequantized to float32 (routers: small, used as a plain matmul)."""
        t = self._ref(name, 2)
        return DenseMatrix(dequantize(self.f.raw(name), t.qtype).astype(np.float32))

    def dense_row(self, name: str) -> DenseMatrix:
        """A 1-D tensor as a one-row float32 product (a gate logit per token)."""
        return DenseMatrix(self.vector(name))

    def matrix(self, name: str) -> QMatrix:
        t = self._ref(name, 2)
        return QMatrix(self.f.raw(name), t.qtype, t.shape[0], t.shape[1])

    def stack(self, name: str) -> QStack:
        t = self._ref(name, 3)
        return QStack(self.f.raw(name), t.qtype, t.shape[1], t.shape[2])
