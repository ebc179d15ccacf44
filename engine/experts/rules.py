"""The pure rules of the expert cache: budgets, HOBBIT's miss tiers, ERAS biases, the miss cost model.

Kept free of state so each rule is tested on hand-made numbers; experts.cache.ExpertCache applies them.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np


class MissMode(enum.Enum):
    HOT = "hot"            # every miss loads the full-precision copy into the arena
    COLD = "cold"          # every miss computes with the low-precision copy
    ADAPTIVE = "adaptive"  # HOBBIT: by the gate weight ranked above the expert (thresholds t1, t2)


class Placement(enum.Enum):
    AUTO = "auto"  # per miss, whichever the measured cost model (MissCost) says is faster
    GPU = "gpu"    # upload the cold copy's bytes and compute on the GPU (HOBBIT)
    CPU = "cpu"    # compute with the cold copy on the CPU, where it lies (Fiddler)


@dataclass(frozen=True)
class MissCost:
    """Measured seconds to serve one cold miss for 1 and for `n` tokens, each way: upload + GPU compute,
    or CPU compute. Cost is taken as linear in the token count between (and beyond) the two points."""
    n: int
    gpu_s: tuple[float, float]  # (1 token, n tokens)
    cpu_s: tuple[float, float]

    @staticmethod
    def _at(t: tuple[float, float], n: int, tokens: int) -> float:
        return t[0] + (t[1] - t[0]) * (tokens - 1) / max(n - 1, 1)

    def gpu_faster(self, tokens: int) -> bool:
        return self._at(self.gpu_s, self.n, tokens) < self._at(self.cpu_s, self.n, tokens)


class Tier(enum.IntEnum):
    HOT = 0
    COLD = 1
    SKIP = 2


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "tb": 1000**4}


@dataclass(frozen=True)
class Budget:
    """Either a share of all experts (`fraction`) or a number of bytes."""
    fraction: float | None = None
    nbytes: int | None = None

    @classmethod
    def parse(cls, value: "str | int | float | Budget", what: str = "expert_budget") -> "Budget":
        """"25%", 0.25 (a fraction), "2GiB", "512MB", or an int number of bytes; `what` names the option."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise ValueError(f"{what}={value!r}: give a share like '25%' or a size like '2GiB'")
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{what}={value}: a float is a fraction in [0, 1]; use '25%' or '2GiB'")
            return cls(fraction=value)
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"{what}={value}: bytes must not be negative")
            return cls(nbytes=value)
        s = str(value).strip().lower().replace(" ", "")
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                pct = -1.0
            if not 0.0 <= pct <= 100.0:
                raise ValueError(f"{what}={value!r}: a percentage must be between 0% and 100%")
            return cls(fraction=pct / 100.0)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"{what}={value!r}: give a share like '25%' or a size like '2GiB', '512MB'")
        return cls(nbytes=int(float(m.group(1)) * _UNITS[m.group(2)]))

    def slots(self, n_experts: int, slot_bytes: int) -> int:
        """How many expert slots of `slot_bytes` the budget holds (a share counts experts)."""
        if self.fraction is not None:
            return min(n_experts, int(round(self.fraction * n_experts)))
        return min(n_experts, int(self.nbytes // max(slot_bytes, 1)))


def miss_tiers(weights: np.ndarray, t1: float, t2: float) -> np.ndarray:
    """HOBBIT's rule for a token's selected experts (T, k): rank by gate weight; with s the share of
    the token's weight ranked above an expert, HOT if s <= t1, COLD if s <= t2, else SKIP."""
    w = weights.astype(np.float64)
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)                 # shares of the token's weight
    order = np.argsort(-w, axis=-1, kind="stable")                          # (T, k) best first
    ranked = np.take_along_axis(w, order, axis=-1)
    above = np.cumsum(ranked, axis=-1) - ranked                              # weight ranked above each
    tiers_ranked = np.where(above <= t1 + 1e-9, Tier.HOT, np.where(above <= t2 + 1e-9, Tier.COLD, Tier.SKIP))
    tiers = np.empty_like(tiers_ranked)
    np.put_along_axis(tiers, order, tiers_ranked, axis=-1)
    return tiers.astype(np.int8)


def eras_bias(resident: np.ndarray, freq: np.ndarray, alpha: float, beta: float
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """MoE-ERAS selection biases for one layer: (logit bias, probability bias), None where the knob is 0.
    Resident experts get +alpha on their probability; the others -beta*(1 - freq) on their logit."""
    res = resident.astype(bool)
    logit = (-beta * (1.0 - freq) * ~res).astype(np.float32) if beta else None
    prob = (alpha * res).astype(np.float32) if alpha else None
    return logit, prob
