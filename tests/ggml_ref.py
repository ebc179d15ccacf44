"""ctypes bindings to libggml-base's reference quantizers, the way gguf-py's tests/test_quants.py does it.

llama-cpp-python ships libggml-base.so; `ggml_quantize_chunk` is the entry point llama-quantize
calls per tensor, `quantize_row_*_ref` / `dequantize_row_*` are the scalar references.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from hotcold.quant import QType, byte_shape, float_shape

_F32P = ctypes.POINTER(ctypes.c_float)


def load() -> ctypes.CDLL:
    """libggml-base from the installed llama_cpp package (raises ImportError when it is absent)."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(libdir.glob("libggml-base.*"))
    if not found:
        raise ImportError(f"no libggml-base in {libdir}")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _F32P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, _F32P]
    return lib


def _name(t: QType) -> str:
    return t.name.lower().replace("_k", "_K")


def quantize_chunk(lib: ctypes.CDLL, x: np.ndarray, t: QType) -> np.ndarray:
    """ggml_quantize_chunk without an importance matrix: what llama-quantize writes for each tensor."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(byte_shape(x.shape, t), dtype=np.uint8)
    rows = x.size // x.shape[-1]
    lib.ggml_quantize_chunk(int(t), x.ctypes.data_as(_F32P), out.ctypes.data_as(ctypes.c_void_p), 0, rows,
                            x.shape[-1], None)
    return out


def quantize_row_ref(lib: ctypes.CDLL, x: np.ndarray, t: QType) -> np.ndarray:
    """quantize_row_<type>_ref over all of x as one long row (blocks never span rows)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(byte_shape(x.shape, t), dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{_name(t)}_ref")
    fn.restype = None
    fn(x.ctypes.data_as(_F32P), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def dequantize_row(lib: ctypes.CDLL, raw: np.ndarray, t: QType) -> np.ndarray:
    """dequantize_row_<type> over all of raw."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.zeros(float_shape(raw.shape, t), dtype=np.float32)
    fn = getattr(lib, f"dequantize_row_{_name(t)}")
    fn.restype = None
    fn(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(_F32P), ctypes.c_int64(out.size))
    return out
