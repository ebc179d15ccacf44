"""Float test matrices that exercise the corners of the quantizers (shared by the quant tests)."""
from __future__ import annotations

import numpy as np


def families(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Named float32 (rows, cols) matrices: typical, heavy-tailed, degenerate and extreme-scale data."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((rows, cols)).astype(np.float32)
    outliers = normal.copy()
    idx = rng.integers(0, outliers.size, size=max(1, outliers.size // 200))
    outliers.reshape(-1)[idx] *= rng.choice([-1000.0, 300.0, 50.0], size=idx.size).astype(np.float32)
    degenerate = normal.copy()
    degenerate[0::4] = 0.0                       # all-zero rows
    degenerate[1::4] = 0.5                       # constant rows
    degenerate[2::4] = -3.0
    degenerate[3::4, :37] = 0.0                  # zero prefix, crossing block boundaries
    mixed = normal * (10.0 ** (np.arange(rows) % 10 - 6)).astype(np.float32)[:, None]  # inside the fp16 range
    return {
        "normal": normal,
        "outliers": outliers,
        "degenerate": degenerate,
        "laplace": rng.laplace(size=(rows, cols)).astype(np.float32),
        "tiny": (normal * np.float32(1e-6)).astype(np.float32),       # subnormal fp16 scales
        "vanishing": (normal * np.float32(1e-20)).astype(np.float32),  # below GROUP_MAX_EPS
        "huge": (normal * np.float32(1e4)).astype(np.float32),
        "mixed_scales": mixed.astype(np.float32),
        "positive": np.abs(normal) + np.float32(2.0),                 # min > 0 paths of the K-quants
        "signed_zeros": np.where(normal > 0.5, normal, np.float32(-0.0)).astype(np.float32),
    }
