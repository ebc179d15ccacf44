"""Memory-mapped GGUF reader: metadata as Python values, tensors as zero-copy uint8 views.

The layout is gguf-py's (constants.py) and llama.cpp's (ggml/src/gguf.cpp). Every length, count and
offset is checked against the file size before it is used, so a truncated, corrupt or hostile file
raises GGUFError instead of allocating without bound, reading out of range or crashing.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

from hotcold.quant import QType, QuantError, byte_shape, resolve, row_bytes

MAX_DIMS = 4           # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2    # arrays of arrays exist in the format; nothing deeper is plausible
MAX_STRINGS = 1 << 22  # elements of one string array: 4M, over ten times the largest vocabulary or merge list
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
_MADV_POPULATE_READ = 22  # linux/mman.h; Python 3.11's mmap module does not name it

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
          GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
          GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
          GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "?"}


class GGUFError(ValueError):
    """The file is not a GGUF hotcold can read; the message names the file, the offset and the problem."""


@dataclass(frozen=True)
class TensorRef:
    name: str
    qtype: QType
    shape: tuple[int, ...]  # numpy order: the last axis is the row (GGUF's ne[0])
    offset: int             # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped; nothing is copied until a caller asks."""

    def __init__(self, path: str | Path, random_access: bool = False) -> None:
        """`random_access`: no read-ahead around the pages the map faults in (MADV_RANDOM), for a file whose
        large parts are read another way (the disk tier): read-ahead would cache them behind the budget's back."""
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise GGUFError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise GGUFError(f"{self.path} is {what}; give the path of a .gguf file")
            self.size = st.st_size
            if self.size < 24:
                raise GGUFError(f"{self.path} is {self.size} bytes, too short to be a GGUF file")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            if random_access:
                self._mm.madvise(mmap.MADV_RANDOM)
        finally:
            os.close(fd)
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorRef] = {}
        try:
            self._parse()
        except struct.error as e:  # every read is bounds-checked first; this is a last resort
            raise GGUFError(f"{self.path}: malformed data at offset {self._pos} ({e})") from None

    # --- primitive reads, each checked against the file size -------------------------------------------

    def _fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self._pos}); the file is truncated or not a valid GGUF")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"{what} needs {n} bytes but only {self.size - self._pos} remain")

    def _unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += n
        return v

    def _string(self, what: str) -> str:
        n = self._unpack("<Q", f"length of {what}")
        self._need(n, what)
        raw = self._mm[self._pos:self._pos + n]
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise self._fail(f"{what} has unknown value type {vtype}") from None
        if t in _SCALAR:
            return self._unpack(_SCALAR[t], what)
        if t == GGUFValueType.STRING:
            return self._string(what)
        if depth >= MAX_ARRAY_DEPTH:
            raise self._fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype = self._unpack("<I", f"element type of {what}")
        count = self._unpack("<Q", f"length of {what}")
        if etype in _NUMPY:
            itemsize = np.dtype(_NUMPY[GGUFValueType(etype)]).itemsize
            self._need(count * itemsize, f"{count} elements of {what}")
            # a numpy array, not a list: a Python int per element would take 36 times its bytes in the file
            arr = np.frombuffer(self._mm, dtype=_NUMPY[GGUFValueType(etype)], count=count, offset=self._pos).copy()
            arr.flags.writeable = False
            self._pos += count * itemsize
            return arr
        # strings (and nested arrays) take at least 8 bytes each: bound the count before looping; a Python
        # string costs about 50 bytes whatever its length, so the count is also capped
        self._need(count * 8, f"{count} elements of {what}")
        if count > MAX_STRINGS:
            raise self._fail(f"{what} has {count} elements; more than {MAX_STRINGS} is not a plausible model")
        return [self._value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]

    # --- structure ------------------------------------------------------------------------------------

    def _parse(self) -> None:
        magic = self._unpack("<I", "magic")
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (magic {magic:#010x}, expected 'GGUF')")
        self.version = self._unpack("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors = self._unpack("<Q", "tensor count")
        n_kv = self._unpack("<Q", "metadata count")
        # each KV takes >= 8 + 4 + 1 bytes and each tensor info >= 8 + 4 + 8 + 4 + 8: bound both counts
        self._need(n_kv * 13 + n_tensors * 32, f"{n_kv} metadata entries and {n_tensors} tensor infos")
        for i in range(n_kv):
            key = self._string(f"key of metadata entry {i}")
            if key in self.metadata:
                raise self._fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = self._value(self._unpack("<I", f"type of {key}"), key)
        infos = [self._tensor_info(i) for i in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two up to 1 MiB")
        self.data_offset = -(-self._pos // align) * align
        data_size = self.size - self.data_offset
        if infos and self.data_offset > self.size:   # vocabulary-only files end before their padding
            raise GGUFError(f"{self.path}: the header ends at byte {self._pos}, past the end of the file")
        for name, qtype, shape, rel in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            nbytes = int(np.prod(byte_shape(shape, qtype), dtype=np.int64))
            if rel % align:
                raise GGUFError(f"{self.path}: tensor {name} offset {rel} is not aligned to {align}")
            if rel + nbytes > data_size:
                raise GGUFError(f"{self.path}: tensor {name} ({nbytes} bytes at {rel}) extends past the end of the "
                                f"file by {rel + nbytes - data_size} bytes; the file is truncated")
            self.tensors[name] = TensorRef(name, qtype, shape, self.data_offset + rel, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:   # llama.cpp's gguf_init rejects this too: one tensor's writes would be another's weights
                raise GGUFError(f"{self.path}: tensors {a} and {b} overlap in the file ({end - start} bytes); "
                                "the file is corrupt")

    def _tensor_info(self, i: int) -> tuple[str, QType, tuple[int, ...], int]:
        name = self._string(f"name of tensor {i}")
        n_dims = self._unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [self._unpack("<Q", f"dimension {d} of {name}") for d in range(n_dims)]
        if any(d >= 1 << 40 for d in ne) or int(np.prod([float(d) for d in ne])) >= 1 << 48:
            raise self._fail(f"tensor {name} has an implausible shape {ne}")
        raw_type = self._unpack("<I", f"type of {name}")
        try:
            qtype = resolve(raw_type)
        except QuantError as e:
            raise self._fail(f"tensor {name}: {e}") from None
        try:
            row_bytes(qtype, ne[0])
        except QuantError as e:
            raise self._fail(f"tensor {name}: {e}") from None
        offset = self._unpack("<Q", f"data offset of {name}")
        return name, qtype, tuple(reversed(ne)), offset

    # --- access ---------------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array of gguf byte shape, backed by the map (no copy)."""
        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        flat = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return flat.reshape(byte_shape(t.shape, t.qtype))

    def extent(self, view: np.ndarray) -> tuple[int, int]:
        """(file offset, bytes) of a contiguous view returned by `raw` (or a slice of one): where a reader that
        does not go through the map (engine/experts/disk.py) finds the same bytes."""
        base = np.frombuffer(self._mm, dtype=np.uint8, count=1).ctypes.data
        off = view.ctypes.data - base
        if not view.flags.c_contiguous or not 0 <= off <= self.size - view.nbytes:
            raise ValueError(f"not a contiguous view of {self.path}'s map")
        return off, view.nbytes

    def cached_bytes(self, extents: list[tuple[int, int]]) -> int:
        """Bytes of these (offset, size) ranges that are in the page cache now (mincore(2) on the map; 0 where
        the call is unavailable)."""
        import ctypes
        try:
            mincore = ctypes.CDLL(None, use_errno=True).mincore
        except (OSError, AttributeError):
            return 0
        page = mmap.PAGESIZE
        base = np.frombuffer(self._mm, dtype=np.uint8, count=1).ctypes.data
        spans: list[list[int]] = []                         # whole pages, merged: a shared page counts once
        for start, end in sorted((off // page * page, min(-(-(off + n) // page) * page, -(-self.size // page) * page))
                                 for off, n in extents):
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            elif end > start:
                spans.append([start, end])
        total = 0
        for start, end in spans:
            vec = np.zeros((end - start) // page, dtype=np.uint8)
            if mincore(ctypes.c_void_p(base + start), ctypes.c_size_t(end - start),
                       vec.ctypes.data_as(ctypes.c_void_p)) != 0:
                return 0
            total += int((vec & 1).sum()) * page
        return total

    def prefault(self, extents: list[tuple[int, int]] | None = None) -> None:
        """Map every page of the file (or of these (offset, size) ranges) now, reading it from disk if it is
        not cached, so that first uses of weights during inference take no page faults. MADV_POPULATE_READ
        where the kernel has it (5.14+), else one read per page."""
        page = mmap.PAGESIZE
        for off, n in extents if extents is not None else [(0, self.size)]:
            start = off // page * page
            length = min(off + n, self.size) - start
            if length <= 0:
                continue
            try:
                self._mm.madvise(_MADV_POPULATE_READ, start, length)
            except (OSError, ValueError, AttributeError):
                np.frombuffer(self._mm, dtype=np.uint8, count=length, offset=start)[::page].max()

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def get_typed(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """The value of `key` if it has the Python type `kind` (int, float, str, bool; a float key also takes
        an int); `default` if it is absent; a GGUFError naming the key if it has another type."""
        v = self.metadata.get(key)
        if v is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if float in kinds and isinstance(v, int) and not isinstance(v, bool):
            ok, v = True, float(v)
        if not ok:
            got = "an array" if isinstance(v, (list, np.ndarray)) else type(v).__name__
            raise GGUFError(f"{self.path}: metadata key {key} is {got}, expected "
                            f"{' or '.join(k.__name__ for k in kinds)}")
        return v

    def close(self) -> None:
        """Unmap the file once no tensor views remain (with views alive, the map stays until they go)."""
        try:
            self._mm.close()
        except BufferError:
            pass
