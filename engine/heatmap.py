"""A layer x expert activation heatmap as PNG (matplotlib, an optional dependency: the `plot` extra)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def save_heatmap(activations: np.ndarray, path: str | Path, title: str = "expert activations") -> Path:
    """Each cell: the share of the layer's tokens that selected the expert."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("saving a heatmap needs matplotlib: pip install 'hotcold[plot]' (matplotlib only)") from e
    a = np.asarray(activations, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no expert activations recorded: run with an expert budget (--expert-budget) first")
    share = a / np.maximum(a.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, a.shape[1] * 0.5 + 2), max(3, a.shape[0] * 0.4 + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of selections")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
