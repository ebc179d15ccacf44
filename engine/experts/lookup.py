"""Token lookup: the routing of the tokens run before predicts the experts the current and next tokens select.

Prompt-lookup decoding (Saxena 2023; llama.cpp's `llama-lookup`) drafts the next tokens by finding the current
token earlier in the text. Here the earlier occurrence's routing is the prediction: the layers the current token
has still to run select what the same token selected last time, and the next `horizon - 1` tokens what followed
it (in the same sequence: each position links to its sequence's next). The store then evicts the resident expert
predicted to be selected furthest ahead (Belady's MIN on the prediction; without one, the expert selected least,
counts decayed per generated token), and computes a miss
where it lies when it is predicted later than every candidate. The history is the last CAPACITY tokens the store
saw, of every sequence (a token's routing, in the early layers above all, follows the token more than its text),
and a batch's sequences each predict for themselves: an expert counts as needed at the nearest of their predictions.
Outputs never change, only which copies stay resident.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

NONE = np.inf    # no predicted selection within the horizon
CAPACITY = 4096  # tokens of routing history kept (a ring)


class TokenLookup:
    """Recent tokens' selections, by token id, and what they predict for the current tokens."""

    def __init__(self, n_layer: int, n_expert: int, horizon: int, decay: float = 0.95,
                 capacity: int = CAPACITY) -> None:
        self.n_layer, self.n_expert, self.horizon = n_layer, n_expert, horizon
        self.decay, self.capacity = decay, capacity
        self.count = np.zeros((n_layer, n_expert))              # selections, decayed per generated token
        self._hist: np.ndarray | None = None                    # (capacity, L, k) each token's experts (at first use)
        self._next = np.full(capacity, -1, np.int64)            # the position after each in its sequence (-1: none)
        self._n = 0                                             # tokens recorded (whose every layer ran)
        self._last: dict[int, int] = {}                         # token id -> its latest position
        self._tail: dict[int, int] = {}                         # sequence -> its latest position
        self._step = 0                                          # tokens of the pass being recorded (0: none)
        self._layers = 0                                        # its layers recorded so far
        self._pending: list[tuple[int, int]] = []               # its (token, sequence) rows
        self._ahead = np.full((2, n_layer, n_expert), NONE)     # first predicted token (>= 0, >= 1) per expert
        self.predictions = 0                                    # generated tokens that found an earlier occurrence
        self.single = False                                     # the pass is one sequence's (its history ranks it all)

    def new_sequence(self) -> None:
        """Sequences start again: what comes next follows none of the tokens before."""
        self._tail.clear()

    def begin(self, ids: np.ndarray, seqs: np.ndarray | None = None) -> None:
        """A forward pass of tokens `ids` (T,) starts: one sequence's, or row i of sequence seqs[i]. A sequence with
        one token in the pass is generating: its token's last occurrence predicts."""
        self._flush()
        self._ahead[:] = NONE
        self.single = seqs is None
        T = len(ids)
        if T > self.capacity:
            return
        tokens = ids.tolist()
        if seqs is None:                                        # one sequence: generating if it feeds one token
            rows = [0] * T
            decoding = [(tokens[0], 0)] if T == 1 else []
        else:
            rows = seqs.tolist()
            per_seq = Counter(rows)
            decoding = [(t, s) for t, s in zip(tokens, rows) if per_seq[s] == 1]
        if decoding:
            self.count *= self.decay
        if self._hist is not None:
            walks = [self._walk(p, self._tail.get(s, -1)) for p, s in ((self._last.get(t), s) for t, s in decoding)
                     if p is not None]
            self._predict([w for w in walks if w])
        self._pending = list(zip(tokens, rows))
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
        """(L, E) eviction order at `layer` of the current tokens, highest first: the layer-steps until the next
        predicted selection, then (unpredicted experts, above every predicted one) the fewest decayed selections."""
        ll = np.arange(self.n_layer)[:, None]
        first = np.where(ll > layer, self._ahead[0], self._ahead[1])            # (L, E) in tokens from now
        steps = first * self.n_layer + ll - layer
        return np.where(np.isfinite(steps), steps * 1e6, 1e12) - self.count

    def _walk(self, p: int, tail: int) -> list[int]:
        """Position p (a current token's last occurrence) and its sequence's next ones, those recorded, up to the
        horizon; past `tail` (the current token's sequence's last position) they start again at p: the text from p
        to here repeats, as a loop of greedy decoding does."""
        out: list[int] = []
        first = p
        while len(out) < self.horizon and p >= 0 and self._n - self.capacity <= p < self._n:
            out.append(p)
            p = first if p == tail else int(self._next[p % self.capacity])
        return out

    def _predict(self, walks: list[list[int]]) -> None:
        """Each walk's rows predict its token (j = 0) and the tokens after it (j = 1, ...); the nearest of all
        stands."""
        if not walks:
            return
        pos = np.array([p for w in walks for p in w]) % self.capacity
        j = np.array([i for w in walks for i in range(len(w))], dtype=float)[:, None, None]
        sel = self._hist[pos]                                                    # (M, L, k)
        layer = np.broadcast_to(np.arange(self.n_layer)[None, :, None], sel.shape)
        np.minimum.at(self._ahead[0], (layer, sel), np.broadcast_to(j, sel.shape))
        later = np.broadcast_to(np.where(j >= 1, j, NONE), sel.shape)
        np.minimum.at(self._ahead[1], (layer, sel), later)
        self.predictions += len(walks)

    def _flush(self) -> None:
        """The last pass's rows join the history once all its layers ran (an interrupted pass's do not): each token's
        position, linked from its sequence's previous one."""
        if self._step and self._layers >= self.n_layer:
            for i, (t, seq) in enumerate(self._pending):
                pos = self._n + i
                prev = self._tail.get(seq)
                if prev is not None and prev > pos - self.capacity:
                    self._next[prev % self.capacity] = pos
                self._next[pos % self.capacity] = -1
                self._tail[seq] = pos
                self._last[t] = pos
            self._n += self._step
        self._step = 0
