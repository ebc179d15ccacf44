"""Everything that needs an NVIDIA GPU (numba.cuda; Numba's simulator where there is none): device memory
under a budget (memory.py), the element-wise and attention kernels (kernels.py; the quantized products are
hotcold.quant.cuda), the VRAM expert arena and its uploads (arena.py), the miss-cost calibration
(calibrate.py), and the backend the forward pass runs on (backend.py)."""
