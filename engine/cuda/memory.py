"""A model's share of one GPU: every device allocation counted against the VRAM budget, and two streams.

All compute is queued on `compute`, all expert uploads on `upload`, so uploads overlap compute
(HOBBIT's prefetch pipeline); `after_compute` orders an upload behind the compute queued so far, for a
slot whose previous occupant may still be read. Nothing here allocates outside `empty`/`upload`, so
`used` is what the model holds on the device, the figure the budget bounds.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hotcold.quant import cuda as qcuda


class VRAMBudgetError(ValueError):
    """The VRAM budget cannot hold what the model must keep on the GPU."""


def require_cuda() -> None:
    if not qcuda.available():
        raise RuntimeError("device='cuda' needs an NVIDIA GPU with its driver (numba.cuda finds none); "
                           "use device='cpu', or NUMBA_ENABLE_CUDASIM=1 to run the kernels on the simulator")


class Gpu:
    def __init__(self, budget_bytes: int | None = None) -> None:
        require_cuda()
        from numba import cuda
        self.cuda = cuda
        self.budget = budget_bytes
        self.used = 0
        self.parts: dict[str, int] = {}   # bytes by what they hold, for errors and reports
        self.compute = cuda.stream()
        self.upload = cuda.stream()

    def _take(self, nbytes: int, what: str) -> None:
        if self.budget is not None and self.used + nbytes > self.budget:
            held = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.parts.items()) or "nothing yet"
            raise VRAMBudgetError(
                f"the VRAM budget of {self.budget / 2**20:.1f} MiB cannot also hold {what} ({nbytes / 2**20:.1f} MiB; "
                f"held: {held}); raise vram_budget (--vram-budget), or lower n_ctx / n_batch")
        self.used += nbytes
        self.parts[what] = self.parts.get(what, 0) + nbytes

    @property
    def left(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    def empty(self, shape: tuple[int, ...] | int, dtype: Any, what: str) -> Any:
        """An uninitialised device array, counted."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._take(n, what)
        return self.cuda.device_array(shape, dtype=dtype)

    def upload_array(self, host: np.ndarray, what: str) -> Any:
        """A device copy of `host`, counted; synchronous (used at load, not per token)."""
        host = np.ascontiguousarray(host)
        self._take(host.nbytes, what)
        dev = self.cuda.to_device(host, stream=self.upload)
        self.upload.synchronize()
        return dev

    def pinned(self, shape: tuple[int, ...] | int, dtype: Any) -> np.ndarray:
        """Page-locked host memory: copies from it run asynchronously (pageable ones do not)."""
        return self.cuda.pinned_array(shape, dtype=dtype)

    def event(self, stream: Any) -> Any:
        """An event that fires when the work queued on `stream` so far is done."""
        ev = self.cuda.event()
        ev.record(stream)
        return ev

    def after_compute(self) -> None:
        """Make later uploads wait for the compute queued so far."""
        self.event(self.compute).wait(self.upload)

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) bytes of the device, as the CUDA allocator reports them; None on the simulator."""
        if qcuda.simulated():
            return None
        return tuple(self.cuda.current_context().get_memory_info())  # type: ignore[return-value]
