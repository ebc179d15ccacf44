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


class _TraitsCPU(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, _F32P, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, _F32P, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class CpuTraits:
    """libggml-cpu's per-type kernels as llama.cpp runs them on this machine: the activation quantizer of a
    weight type's vec_dot_type, and its dot product (ggml_get_type_traits_cpu)."""

    def __init__(self) -> None:
        import llama_cpp

        found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu.*"))
        if not found:
            raise ImportError("no libggml-cpu in llama_cpp/lib")
        self.lib = ctypes.CDLL(str(found[0]))
        self.lib.ggml_cpu_init.restype = None
        self.lib.ggml_cpu_init()
        self.lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
        self.lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]

    def _traits(self, t: QType) -> _TraitsCPU:
        return self.lib.ggml_get_type_traits_cpu(int(t)).contents

    def vec_dot_type(self, t: QType) -> QType:
        return QType(self._traits(t).vec_dot_type)

    def from_float(self, x: np.ndarray, t: QType) -> np.ndarray:
        """One row x (n,) quantized to t by llama.cpp's CPU quantizer (its SIMD path on this machine)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros(byte_shape(x.shape, t), dtype=np.uint8)
        _FROM_FLOAT(self._traits(t).from_float)(x.ctypes.data_as(_F32P), out.ctypes.data_as(ctypes.c_void_p), x.size)
        return out

    def vec_dot(self, t: QType, w_row: np.ndarray, y_row: np.ndarray, n: int) -> float:
        """llama.cpp's dot product of one weight row of type t with one activation row of its vec_dot_type."""
        s = ctypes.c_float(0)
        w_row, y_row = np.ascontiguousarray(w_row), np.ascontiguousarray(y_row)
        _VEC_DOT(self._traits(t).vec_dot)(n, ctypes.byref(s), 0, w_row.ctypes.data_as(ctypes.c_void_p), 0,
                                           y_row.ctypes.data_as(ctypes.c_void_p), 0, 1)
        return s.value
