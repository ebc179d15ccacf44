"""Memory-mapped reading of `.safetensors` files, bf16 included.

The `safetensors` package's numpy backend refuses bfloat16 (numpy has no such dtype), and its torch
backend needs torch; the format itself is an 8-byte header length, a JSON header and raw
little-endian tensors, so reading it with np.memmap is exact and copies nothing until asked.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 * 1024 * 1024


def _ints(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


class CheckpointError(ValueError):
    """A checkpoint file is malformed or holds something hotcold cannot read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One .safetensors file: tensor metadata up front, data memory-mapped on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: header length {n} is larger than the file; the file is truncated or not safetensors")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is a JSON {type(header).__name__}, not an object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {dtype!r}")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (_ints(shape) and len(shape) <= 8 and _ints(offsets) and len(offsets) == 2):
                raise CheckpointError(f"{self.path}: tensor {name} needs a shape and two data_offsets, all integers "
                                      f">= 0; got shape={shape!r} data_offsets={offsets!r}")
            shape = tuple(shape)
            start, end = offsets
            if not (0 <= start <= end <= size - self._base) or end - start != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
                raise CheckpointError(f"{self.path}: tensor {name} {shape} {dtype} has inconsistent offsets {start}..{end}")
            self.tensors[name] = TensorInfo(name, dtype, shape, start, end)
        self._mm: np.memmap | None = None

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored values without conversion (bf16 as uint16), memory-mapped."""
        t = self.tensors[name]
        buf = self._map()[self._base + t.start:self._base + t.end]
        return buf.view(_DTYPES[t.dtype]).reshape(t.shape)

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """A copy of the tensor (or its slice `index` along axis 0) read with pread, not mapped: a converter
        streaming a large checkpoint then keeps no file pages resident (RSS stays near one tensor)."""
        t = self.tensors[name]
        dtype = _DTYPES[t.dtype]
        shape, start, n = t.shape, t.start, t.nbytes
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{name}: index {index} out of range for {shape[0]}")
            n //= shape[0]
            start += index * n
            shape = shape[1:]
        buf = np.empty(n, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], self._base + start)
        if got != n:
            raise CheckpointError(f"{self.path}: short read of tensor {name}; the file is truncated")
        return buf.view(dtype).reshape(shape)

    def float32(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor, or its slice `index` along axis 0, as a new float32 array (bf16 widened exactly)."""
        t = self.tensors[name]
        a = self.read(name, index)
        if t.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())
