"""The hot expert tier in GPU memory: the RAM Arena's interface over one preallocated device buffer.

Experts are uploaded as their quantized bytes (never float copies) into equal slots of a single device
allocation sized by the VRAM budget, and computed there by hotcold.quant.cuda's fused dequant kernels;
misses that find no slot stay on the CPU (Fiddler's placement). Uploads go on their own CUDA stream.
Runs on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) where there is no GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hotcold.quant import QType, cuda as qcuda

from .moe import Expert
from .store import Arena
from .weights import QMatrix



def _silu_mul_kernel(g: Any, u: Any) -> None:
    """g = silu(g) * u elementwise (SwiGLU's gate), one thread per element."""
    i = _cuda.grid(1)
    if i < g.shape[0]:
        v = g[i]
        g[i] = v / (np.float32(1) + math.exp(-v)) * u[i]


try:  # numba.cuda may be missing or broken on CPU-only machines; the arena then refuses to start
    from numba import cuda as _cuda
    _silu_mul = _cuda.jit(_silu_mul_kernel)
except Exception:  # pragma: no cover - depends on the machine
    _silu_mul = None


def require_cuda() -> None:
    if not qcuda.available():
        raise RuntimeError("device='cuda' needs an NVIDIA GPU with its driver (numba.cuda finds none); "
                           "use device='cpu', or NUMBA_ENABLE_CUDASIM=1 to run the kernels on the simulator")


@dataclass(frozen=True)
class CudaMatrix:
    """A quantized matrix resident on the GPU; apply() mirrors QMatrix.apply (host in, host out)."""
    dev: Any       # device array (rows, row elements), a view of the arena
    qtype: QType
    rows: int
    cols: int
    nbytes: int

    def apply(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] == 1:
            y = qcuda.matvec(self.dev, self.qtype, x[0]).copy_to_host().reshape(1, -1)
        else:
            y = qcuda.matmul(self.dev, self.qtype, x).copy_to_host()
        if out is not None:
            out[...] = y
            return out
        return y


@dataclass(frozen=True)
class CudaExpert(Expert):
    """An expert resident on the GPU: one upload of x and one download of the result per call."""

    def swiglu(self, x: np.ndarray) -> np.ndarray:
        from numba import cuda
        x = np.ascontiguousarray(x, dtype=np.float32)
        one = x.shape[0] == 1
        xd = cuda.to_device(x[0] if one else x)
        product = qcuda.matvec if one else qcuda.matmul
        g = product(self.gate.dev, self.gate.qtype, xd)                  # (n, n_ff) on the device
        u = product(self.up.dev, self.up.qtype, xd)
        n = g.size
        _silu_mul[(n + 127) // 128, 128](g.reshape(n), u.reshape(n))     # g = silu(g) * u
        y = product(self.down.dev, self.down.qtype, g).copy_to_host()     # (n, n_embd)
        return y.reshape(1, -1) if one else y


class CudaArena(Arena):
    """The Arena's slots in one device allocation; uploads go on their own stream."""

    def _allocate(self, n_slots: int, slot_bytes: int) -> Any:
        require_cuda()
        from numba import cuda
        self.stream = cuda.stream()  # uploads overlap the default stream's compute
        return cuda.device_array((n_slots, slot_bytes), dtype=np.uint8)

    @property
    def device_bytes(self) -> int:
        """What the allocation holds on the device (the budget's bound)."""
        return int(self.buf.shape[0]) * int(self.buf.shape[1])

    def _place(self, slot: int, src: Expert) -> Expert:
        """Upload `src`'s three matrices' bytes into `slot`; the Expert computes on the GPU."""
        mats, off = [], 0
        for m in (src.gate, src.up, src.down):
            assert isinstance(m, QMatrix)
            n = m.raw.nbytes
            view = self.buf[slot, off:off + n]
            view.copy_to_device(np.ascontiguousarray(m.raw).reshape(-1), stream=self.stream)
            elem = qcuda.element_type(m.qtype)
            typed = view.view(elem) if elem != np.uint8 else view
            mats.append(CudaMatrix(typed.reshape(m.rows, n // m.rows // elem.itemsize), m.qtype, m.rows, m.cols, n))
            off += n
        self.stream.synchronize()
        return CudaExpert(*mats)
