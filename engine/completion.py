"""One sequence's generation after its prompt, token by token: sampling, end of generation, stop strings and
the text streamed so far. Model.generate and the batch engine's slots (engine/batch.py) both run it, so a
request served in a batch ends and streams exactly as it would alone (llama-cpp-python's generate loop).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .sampling import Sampler
from .tokenizer import Detokenizer, Tokenizer

TokenLogprob = tuple[int, float, list[tuple[int, float]]]   # (token, its logprob, the n best (token, logprob))


class Completion:
    """Feed it each position's logits (`step`); it samples, says what text to emit, and when to stop.

    `finish` is None while generating ("stop": end-of-generation token or a stop string, "length": max_tokens
    or a full context); `token` is then the token to evaluate before the next step."""

    def __init__(self, tokenizer: Tokenizer, sampler: Sampler, n_prompt: int, n_ctx: int, max_tokens: int | None,
                 stops: Sequence[str] = (), ignore_eos: bool = False, logprobs: int | None = None) -> None:
        self.tok, self.sampler = tokenizer, sampler
        self.room = n_ctx - n_prompt                        # tokens the cache can still take
        self.limit = max_tokens if max_tokens and max_tokens > 0 else self.room
        self.stops, self.ignore_eos = list(stops), ignore_eos
        self.n_logprobs = logprobs
        self.logprobs: list[TokenLogprob] = []              # one per generated token, with n_logprobs
        self.detok = Detokenizer(tokenizer, special=False)  # control tokens are not text (llama-cpp-python)
        self.text, self.emitted, self.n_gen = "", 0, 0
        self.token = -1
        self.finish: str | None = None

    def step(self, logits: np.ndarray) -> str:
        """Sample the next token from logits (n_vocab,); the text that can be emitted now ("" if none)."""
        tok = self.sampler.sample(logits)
        self.n_gen += 1
        if self.tok.is_eog(tok) and not self.ignore_eos:
            return self._end("stop")
        self.sampler.accept(tok)
        if self.n_logprobs is not None:
            self.logprobs.append(token_logprobs(logits, tok, self.n_logprobs))
        self.text += self.detok.feed(tok)
        text, emitted = self.text, self.emitted
        hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:                                        # a stop string: emit up to it, never the string itself
            self.finish, self.emitted = "stop", max(hit, emitted)
            return text[emitted:hit] if hit > emitted else ""
        safe = len(text) - max((partial_suffix(text, s) for s in self.stops), default=0)
        piece = ""
        if safe > emitted:                                  # hold back what may be the start of a stop string
            piece, self.emitted = text[emitted:safe], safe
        if self.n_gen >= self.limit or self.n_gen >= self.room:
            return piece + self._end("length")
        self.token = tok
        return piece

    def _end(self, finish: str) -> str:
        """Finish: whatever text was held back (an incomplete character, a stop string's possible start)."""
        self.finish = finish
        self.text += self.detok.flush()
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        return rest


def token_logprobs(logits: np.ndarray, tok: int, n: int) -> TokenLogprob:
    """(tok, its log-probability under softmax(logits), the n most likely (token, log-probability))."""
    z = logits.astype(np.float64)
    lsm = z - z.max()
    lsm -= np.log(np.exp(lsm).sum())
    best = np.argsort(-lsm, kind="stable")[:n]
    return tok, float(lsm[tok]), [(int(t), float(lsm[t])) for t in best]


def partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop (held back while streaming)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
