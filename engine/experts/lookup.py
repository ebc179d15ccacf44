"""Token lookup: the routing of the tokens run before predicts the experts the current and next tokens select.

Prompt-lookup decoding (Saxena 2023; llama.cpp's `llama-lookup`) drafts the next tokens by finding the current
token earlier in the text. Here the earlier occurrence's routing is the prediction: the layers the current token
has still to run select what the same token selected last time, and the next `horizon - 1` tokens what followed
it. The store then evicts the resident expert predicted to be selected furthest ahead (Belady's MIN on the
prediction; without one, the expert selected least, counts decayed per generated token), and computes a miss
where it lies when it is predicted later than every candidate. The history is the last CAPACITY tokens the store
saw, across sequences: a token's routing, in the early layers above all, follows the token more than its text.
Outputs never change, only which copies stay resident.
"""
from __future__ import annotations

import numpy as np

NONE = np.inf    # no predicted selection within the horizon
CAPACITY = 4096  # tokens of routing history kept (a ring)


class TokenLookup:
    """Recent tokens' selections, by token id, and what they predict for the current token."""

    def __init__(self, n_layer: int, n_expert: int, horizon: int, decay: float = 0.95,
                 capacity: int = CAPACITY) -> None:
        self.n_layer, self.n_expert, self.horizon, self.decay, self.capacity = n_layer, n_expert, horizon, decay, capacity
        self.count = np.zeros((n_layer, n_expert))              # selections, decayed per generated token
        self._hist: np.ndarray | None = None                    # (capacity, L, k) each token's experts (made at first use)
        self._n = 0                                             # tokens recorded (whose every layer ran)
        self._last: dict[int, int] = {}                         # token id -> its latest position
        self._step = 0                                          # tokens of the pass being recorded (0: none)
        self._layers = 0                                        # its layers recorded so far
        self._ahead = np.full((2, n_layer, n_expert), NONE)     # first predicted token (>= 0, >= 1) per expert
        self.predictions = 0                                    # generated tokens that found an earlier occurrence
        self.single = False                                     # the pass is one sequence's (its history applies)

    def begin(self, ids: np.ndarray | None) -> None:
        """A forward pass of one sequence's tokens `ids` (T,) starts; None: of several sequences (no one history)."""
        self._flush()
        self._ahead[:] = NONE
        self.single = ids is not None
        if ids is None or len(ids) == 1:                        # a generated token each (a batch: one per sequence)
            self.count *= self.decay
        if ids is None or len(ids) > self.capacity:
            return
        T, n = len(ids), self._n
        if T == 1:
            p = self._last.get(int(ids[0]))
            if p is not None and p >= n - self.capacity and self._hist is not None:
                self._predict(p)
        for i, t in enumerate(ids.tolist()):
            self._last[t] = n + i
        self._step, self._layers = T, 0

    def record(self, layer: int, experts: np.ndarray) -> None:
        """The pass's selections (T, k) at `layer` (a token's k experts are distinct)."""
        one = experts.shape[0] == 1
        count = self.count[layer]
        for e in (experts[0] if one else np.unique(experts)).tolist():
            count[e] += 1
        if not self._step or experts.shape[0] != self._step:
            return
        if self._hist is None:
            self._hist = np.zeros((self.capacity, self.n_layer, experts.shape[1]), np.int16)
        if one:
            self._hist[self._n % self.capacity, layer] = experts[0]
        else:
            self._hist[(self._n + np.arange(self._step)) % self.capacity, layer] = experts
        self._layers += 1

    def score(self, layer: int) -> np.ndarray:
        """(L, E) eviction order at `layer` of the current token, highest first: the layer-steps until the next
        predicted selection, then (unpredicted experts, above every predicted one) the fewest decayed selections."""
        ll = np.arange(self.n_layer)[:, None]
        first = np.where(ll > layer, self._ahead[0], self._ahead[1])            # (L, E) in tokens from now
        steps = first * self.n_layer + ll - layer
        return np.where(np.isfinite(steps), steps * 1e6, 1e12) - self.count

    def _predict(self, p: int) -> None:
        """The current token is token p again: rows p, p + 1, ... (those recorded, up to the horizon) predict it and
        the tokens after it."""
        h = min(self.horizon, self._n - p)
        cols = np.arange(self.n_layer)[:, None]
        for j in range(h - 1, -1, -1):                                           # the nearest wins
            sel = self._hist[(p + j) % self.capacity]                            # (L, k)
            self._ahead[0][cols, sel] = j
            if j >= 1:
                self._ahead[1][cols, sel] = j
        if h > 0:
            self.predictions += 1

    def _flush(self) -> None:
        """The last pass's rows join the history once all its layers ran (an interrupted pass's do not)."""
        if self._step and self._layers >= self.n_layer:
            self._n += self._step
        elif self._step:
            for t in [t for t, q in self._last.items() if q >= self._n]:
                del self._last[t]
        self._step = 0
