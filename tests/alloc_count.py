"""Counting allocations, transient ones included, for the decode-loop test.

numpy: every array-data allocation goes through numpy's memory handler (NEP 49); a counting handler,
installed with PyDataMem_SetHandler for the current context, sees each one, freed or not (tracemalloc
only keeps the live ones). Numba: rtsys.get_allocation_stats() counts every NRT allocation, among them
the meminfo that wraps each array argument as it enters a compiled function; the count of those is known
(one per array argument), so allocations beyond it are arrays the kernels made.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from numba.core.registry import CPUDispatcher
from numba.core.runtime import _nrt_python, rtsys


class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", ctypes.c_void_p),
                ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


class _Handler(ctypes.Structure):  # PyDataMem_Handler, numpy/ndarraytypes.h
    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", _Allocator)]


_libc = ctypes.CDLL(None)
_libc.malloc.restype = _libc.calloc.restype = _libc.realloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]

numpy_allocations = [0]  # allocations since the handler was installed


@ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
def _malloc(ctx: int, size: int) -> int:
    numpy_allocations[0] += 1
    return _libc.malloc(size)


@ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
def _calloc(ctx: int, n: int, size: int) -> int:
    numpy_allocations[0] += 1
    return _libc.calloc(n, size)


@ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
def _realloc(ctx: int, p: int, size: int) -> int:
    numpy_allocations[0] += 1
    return _libc.realloc(p, size)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
def _free(ctx: int, p: int, size: int) -> None:
    _libc.free(p)


_HANDLER = _Handler(b"hotcold_counting", 1, _Allocator(None, *(ctypes.cast(f, ctypes.c_void_p).value
                                                             for f in (_malloc, _calloc, _realloc, _free))))
ctypes.pythonapi.PyCapsule_New.restype = ctypes.py_object
ctypes.pythonapi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
ctypes.pythonapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
ctypes.pythonapi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_NAME = ctypes.create_string_buffer(b"mem_handler")  # the capsule keeps a pointer to its name: keep it alive
_CAPSULE = ctypes.pythonapi.PyCapsule_New(ctypes.addressof(_HANDLER), ctypes.addressof(_NAME), None)
_API = ctypes.cast(ctypes.pythonapi.PyCapsule_GetPointer(np._core._multiarray_umath._ARRAY_API, None),
                   ctypes.POINTER(ctypes.c_void_p))
_SET_HANDLER = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(_API[304])  # PyDataMem_SetHandler


@contextmanager
def counting_numpy() -> Iterator[list[int]]:
    """Count numpy data allocations made inside the block (in numpy_allocations[0])."""
    numpy_allocations[0] = 0
    old = _SET_HANDLER(_CAPSULE)
    assert np._core.multiarray.get_handler_name() == "hotcold_counting"
    try:
        yield numpy_allocations
    finally:
        _SET_HANDLER(old)


@contextmanager
def counting_numba() -> Iterator[dict[str, int]]:
    """NRT allocations inside the block, and the array arguments passed into compiled functions."""
    _nrt_python.memsys_enable_stats()
    counts = {"nrt": 0, "array_args": 0}
    call = CPUDispatcher.__call__

    def counted(self: CPUDispatcher, *args: object, **kw: object) -> object:
        counts["array_args"] += sum(isinstance(a, np.ndarray) for a in (*args, *kw.values()))
        return call(self, *args, **kw)

    own = CPUDispatcher.__dict__.get("__call__")
    before = rtsys.get_allocation_stats()
    CPUDispatcher.__call__ = counted
    try:
        yield counts
    finally:
        if own is None:
            del CPUDispatcher.__call__
        else:
            CPUDispatcher.__call__ = own
        after = rtsys.get_allocation_stats()
        counts["nrt"] = after.alloc - before.alloc
        counts["nrt_live"] = (after.alloc - after.free) - (before.alloc - before.free)
