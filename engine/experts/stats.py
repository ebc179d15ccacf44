"""What the expert store counts, per layer, and the report expert_stats() returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LayerStats:
    tokens: int = 0        # tokens routed through the layer
    hits: int = 0          # (token, slot) selections whose expert was resident
    misses: int = 0        # ... whose expert was not
    cold: int = 0          # misses computed with the cold copy
    cold_uploaded: int = 0 # ... of which on the GPU, after uploading the cold copy (the rest on the CPU)
    skipped: int = 0       # misses dropped (adaptive mode, near-zero weight)
    loads: int = 0         # hot copies brought into the arena (misses and prefetches)
    bytes_moved: int = 0   # bytes of hot copies loaded plus cold copies computed with
    prefetched: int = 0    # hot copies loaded ahead by prefetch
    preloaded: int = 0     # hot copies loaded before a prompt, as its predictor said (eMoE)
    predicted: int = 0     # selections the prefetch predictor had a prediction for
    predicted_right: int = 0


def plain_report() -> dict[str, Any]:
    """What expert_stats() returns when no cache is configured: nothing counted."""
    total: dict[str, Any] = dict.fromkeys(asdict(LayerStats()), 0)
    total.update(prefetch_accuracy=None, layers=[], activations=[], budget_bytes=None, disk_bytes=0, disk_reads=0,
                 stall_s=0.0, cold_resident=False, predictions=0, prediction_reuses=0,
                 insensitive_prompts=0, token_lookups=0, hit_rate={"hot": None, "cold": None, "disk": None})
    return total
