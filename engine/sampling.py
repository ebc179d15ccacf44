"""Token sampling with llama.cpp's semantics and order (common/sampling.cpp, src/llama-sampler.cpp):
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw; temperature <= 0 is greedy.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .options import option


@dataclass(frozen=True)
class SamplingParams:
    """generate()'s sampling keywords; moe-run's sampling flags are built from these fields."""
    temperature: float = option(0.8, "--temp", help="temperature; 0 is greedy", parse=float, cli=float,
                                group="sampling")
    top_k: int = option(40, "--top-k", help="top-k, 0 = off", parse=int, cli=int, group="sampling")
    top_p: float = option(0.95, "--top-p", help="top-p, 1 = off", parse=float, cli=float, group="sampling")
    min_p: float = option(0.05, "--min-p", help="min-p, 0 = off", parse=float, cli=float, group="sampling")
    repeat_penalty: float = option(1.0, "--repeat-penalty", help="repetition penalty, 1 = off", parse=float,
                                   cli=float, group="sampling")
    repeat_last_n: int = option(64, "--repeat-last-n", help="last n tokens the repetition penalty sees",
                                parse=int, cli=int, group="sampling")
    seed: int | None = field(default=None)  # moe-run's --seed is the model's (Options.seed)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number")
        if self.top_p <= 0:
            raise ValueError(f"top_p={self.top_p} must be > 0 (1 turns it off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 turns it off)")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty={self.repeat_penalty} must be > 0")


class Sampler:
    """Draws the next token from logits; keeps the recent tokens its repetition penalty looks at."""

    def __init__(self, params: SamplingParams) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=max(params.repeat_last_n, 0) or None)

    def accept(self, token: int) -> None:
        """Record a token of the context (prompt or generated) for the repetition penalty."""
        if self.p.repeat_last_n > 0:
            self.recent.append(int(token))

    def sample(self, logits: np.ndarray) -> int:
        p = self.p
        z = np.asarray(logits, dtype=np.float32).copy()                       # (n_vocab,)
        if p.repeat_penalty != 1.0 and self.recent:
            ids = np.fromiter(set(self.recent), dtype=np.int64)
            v = z[ids]                                                         # llama_sampler_penalties
            z[ids] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(z))                                           # greedy
        cand = np.argsort(-z, kind="stable")                                   # candidates, best first
        if p.top_k > 0:
            cand = cand[:p.top_k]
        if p.top_p < 1.0:
            probs = _softmax(z[cand])
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)        # smallest set reaching top_p
            cand = cand[:max(1, min(keep, len(cand)))]
        if p.min_p > 0.0:
            probs = _softmax(z[cand])
            cand = cand[probs >= p.min_p * probs[0]]
        probs = _softmax(z[cand] / np.float32(p.temperature))                  # temperature, then draw
        return int(cand[self.rng.choice(len(cand), p=probs)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp((x - x.max()).astype(np.float64))
    return e / e.sum()
