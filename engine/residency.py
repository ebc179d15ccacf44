"""Residency options and the pure rules of the expert cache: budgets, HOBBIT's miss tiers, ERAS biases.

Kept free of state so each rule is tested on hand-made numbers; store.ExpertCache applies them.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

from .policies import CachePolicy


class MissMode(enum.Enum):
    HOT = "hot"            # every miss loads the full-precision copy into the arena
    COLD = "cold"          # every miss computes with the low-precision copy
    ADAPTIVE = "adaptive"  # HOBBIT: by the gate weight ranked above the expert (thresholds t1, t2)


class Device(enum.Enum):
    CPU = "cpu"    # the hot arena in RAM
    CUDA = "cuda"  # the hot arena in GPU memory, hot experts computed there


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
    def parse(cls, value: "str | int | float | Budget") -> "Budget":
        """"25%", 0.25 (a fraction), "2GiB", "512MB", or an int number of bytes."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise ValueError(f"expert_budget={value!r}: give a share like '25%' or a size like '2GiB'")
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"expert_budget={value}: a float is a fraction in [0, 1]; use '25%' or '2GiB'")
            return cls(fraction=value)
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"expert_budget={value}: bytes must not be negative")
            return cls(nbytes=value)
        s = str(value).strip().lower().replace(" ", "")
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                pct = -1.0
            if not 0.0 <= pct <= 100.0:
                raise ValueError(f"expert_budget={value!r}: a percentage must be between 0% and 100%")
            return cls(fraction=pct / 100.0)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"expert_budget={value!r}: give a share like '25%' or a size like '2GiB', '512MB'")
        return cls(nbytes=int(float(m.group(1)) * _UNITS[m.group(2)]))

    def slots(self, n_experts: int, slot_bytes: int) -> int:
        """How many expert slots of `slot_bytes` the budget holds (a share counts experts)."""
        if self.fraction is not None:
            return min(n_experts, int(round(self.fraction * n_experts)))
        return min(n_experts, int(self.nbytes // max(slot_bytes, 1)))


@dataclass(frozen=True)
class ResidencyOptions:
    expert_budget: Budget
    cache_policy: CachePolicy = CachePolicy.LRU
    miss: MissMode = MissMode.HOT
    eras_alpha: float = 0.0
    eras_beta: float = 0.0
    prefetch: int = 0          # layers ahead whose routers predict the experts to load
    device: Device = Device.CPU
    miss_placement: Placement = Placement.AUTO  # where cold misses compute when device is CUDA
    t1: float = 0.6            # HOBBIT: load hot while the weight ranked above is <= t1
    t2: float = 0.9            # ... compute cold while it is <= t2, skip beyond

    @classmethod
    def build(cls, expert_budget: "str | int | float | Budget", cache_policy: "CachePolicy | str" = "lru",
              miss: "MissMode | str" = "hot", eras_alpha: float = 0.0, eras_beta: float = 0.0, prefetch: int = 0,
              t1: float = 0.6, t2: float = 0.9, device: "Device | str" = "cpu",
              miss_placement: "Placement | str" = "auto") -> "ResidencyOptions":
        """From user-facing values (strings as on the command line), with clear errors."""
        def enum_of(kind: type[enum.Enum], v: object, what: str) -> enum.Enum:
            try:
                return v if isinstance(v, kind) else kind(str(v).lower())
            except ValueError:
                raise ValueError(f"unknown {what} {v!r}; choose one of {', '.join(m.value for m in kind)}") from None
        if eras_alpha < 0 or eras_beta < 0:
            raise ValueError(f"eras_alpha={eras_alpha}, eras_beta={eras_beta}: both must be >= 0")
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch}: layers ahead must be >= 0")
        if not 0.0 <= t1 <= t2 <= 1.0:
            raise ValueError(f"miss thresholds t1={t1}, t2={t2}: need 0 <= t1 <= t2 <= 1")
        dev, place = enum_of(Device, device, "device"), enum_of(Placement, miss_placement, "miss_placement")
        if dev == Device.CPU and place != Placement.AUTO:
            raise ValueError(f"miss_placement={place.value!r} (--miss-placement) needs device='cuda' (--device cuda): "
                             "on the CPU every miss already runs on the CPU")
        return cls(Budget.parse(expert_budget), enum_of(CachePolicy, cache_policy, "cache_policy"),
                   enum_of(MissMode, miss, "miss mode"), float(eras_alpha), float(eras_beta), int(prefetch),
                   dev, place, float(t1), float(t2))


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
