"""eMoE ahead of a prompt (Tairin et al., arXiv 2503.06823): which experts the store loads before the prefill.

A prompt's predicted usage shares (engine/predictor.py) become each MoE layer's top-L experts, L what the arena
holds per layer, kept only where eMoE's expected-token-count rule says they serve at least one selection. The
prediction is made every `every` prompts and reused in between (consecutive prompts reuse experts; eMoE p=40).
A prompt of a task the predictor measured as insensitive to routing is not predicted for: its misses are served
cold (eMoE's task awareness).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..predictor import Predictor, select


@dataclass(frozen=True)
class Preload:
    """What to do before one prompt: `mask` (n_layer, E) the experts to load (None: nothing), `cold`: serve
    its misses with the cold copies; `expect` (n_layer, E): the selections of each expert the prediction
    expects over PRIOR_TOKENS tokens (the store's prior for which residents to keep)."""
    mask: np.ndarray | None
    cold: bool = False
    expect: np.ndarray | None = None


PRIOR_TOKENS = 16.0   # how many tokens' worth of evidence the prediction counts for against what the prompt then uses


@dataclass
class AheadStats:
    predictions: int = 0   # prompts the predictor ran for
    reuses: int = 0        # prompts that reused the last prediction (predict_every)
    insensitive: int = 0   # prompts of a task insensitive to routing: no prediction, misses cold


class Ahead:
    """Turns each prompt into a Preload: predicts, reuses or declines, and counts which."""

    def __init__(self, predictor: Predictor, features: Callable[[Sequence[int]], np.ndarray], n_layer: int,
                 k: int, every: int = 1) -> None:
        self.predictor = predictor
        self.features = features                  # prompt ids -> (n_embd,) the predictor's input
        self.n_layer = n_layer
        self.k = k
        self.every = every
        self.stats = AheadStats()
        self._last: tuple | None = None           # the Preload being reused
        self._age = 0                             # prompts it has served

    def shares(self, ids: Sequence[int]) -> np.ndarray:
        """(L, E) predicted usage shares of the predictor's MoE layers for a prompt."""
        return self.predictor.predict(self.features(ids))

    def mask(self, ids: Sequence[int], task: str | None, top_l: int) -> np.ndarray:
        """(n_layer, E) bool: each MoE layer's predicted top-`top_l` experts worth loading for the prompt."""
        return self._predict(ids, task, top_l)[0]

    def _predict(self, ids: Sequence[int], task: str | None, top_l: int) -> tuple[np.ndarray, np.ndarray]:
        """The mask, and each expert's expected selections over PRIOR_TOKENS tokens, (n_layer, E) each."""
        tokens = len(ids) + self.predictor.output_tokens_for(task)
        shares = self.shares(ids)
        out = np.zeros((self.n_layer, self.predictor.n_expert), dtype=bool)
        out[list(self.predictor.layers)] = select(shares, top_l, self.k, tokens)
        expect = np.zeros(out.shape)
        expect[list(self.predictor.layers)] = shares * self.k * PRIOR_TOKENS
        return out, expect

    def plan(self, ids: Sequence[int], task: str | None, slots: int) -> Preload:
        """The Preload for the next prompt, given an arena of `slots` slots."""
        if not self.predictor.sensitive(task):
            self.stats.insensitive += 1
            return Preload(None, cold=True)
        if self._last is not None and self._age < self.every:
            self.stats.reuses += 1
            self._age += 1
            return Preload(*self._last)
        self.stats.predictions += 1
        mask, expect = self._predict(ids, task, slots // max(len(self.predictor.layers), 1))
        self._last, self._age = (mask, False, expect), 1
        return Preload(*self._last)

    def forget(self) -> None:
        """Drop the prediction being reused (the arena was emptied)."""
        self._last, self._age = None, 0

    def reset_stats(self) -> None:
        self.stats = AheadStats()
