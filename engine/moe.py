"""The MoE step behind one narrow interface: route -> the expert store prepares experts -> compute -> combine.

`route` is llama.cpp's build_moe_ffn gating (softmax, top-k, optional renormalisation), with an optional
residency-aware selection bias (MoE-ERAS) that changes which experts are chosen but never their gate
weights. An ExpertStore decides where each selected expert's weights come from (the plain store: the
mmap; store.ExpertCache: a hot arena or cold copies) and may drop near-zero misses (HOBBIT). Tokens are
grouped per expert so each expert's weights are streamed once per batch (dynamic gating, Huang et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from .kernels import route_topk, silu_mul
from .weights import QMatrix


@dataclass(frozen=True)
class Routing:
    experts: np.ndarray  # (T, k) int64: selected expert ids, best first
    weights: np.ndarray  # (T, k) float32: their gate weights


@dataclass(frozen=True)
class SelectionBias:
    """MoE-ERAS: `logit` is added to the router logits and `prob` to the softmax probabilities, for
    choosing the top-k only; the gate weights stay those of the unbiased softmax."""
    logit: np.ndarray | None = None  # (E,) float32
    prob: np.ndarray | None = None   # (E,) float32


@dataclass(frozen=True)
class Expert:
    """One expert's SwiGLU matrices, wherever they live."""
    gate: QMatrix
    up: QMatrix
    down: QMatrix

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def swiglu(self, x: np.ndarray) -> np.ndarray:
        """down(silu(gate x) * up x) for x (n, n_embd); tiers on other devices override this."""
        g = self.gate.apply(x)                                               # (n, n_ff)
        u = self.up.apply(x)                                                 # (n, n_ff)
        silu_mul(g, u)                                                       # g = silu(g) * u
        return self.down.apply(g)                                            # (n, n_embd)


@dataclass(frozen=True)
class Plan:
    """What a store decided for one layer's batch: the weights of each expert to compute, and the gate
    weights to combine with (0 where a (token, slot) was skipped)."""
    experts: Mapping[int, Expert] | Sequence[Expert]  # indexed by expert id
    weights: np.ndarray  # (T, k) float32

    def groups(self, routing: Routing) -> Iterator[tuple[Expert, np.ndarray | slice, np.ndarray]]:
        """(expert, token rows, their gate weights) for each expert with unskipped tokens, by expert id."""
        T, k = routing.experts.shape
        if T == 1:                                                           # decode: no grouping to do
            ids = routing.experts[0].tolist()
            for j in sorted(range(k), key=ids.__getitem__):
                if self.weights[0, j] != 0:
                    yield self.experts[ids[j]], slice(0, 1), self.weights[0, j:j + 1]
            return
        flat, w = routing.experts.ravel(), self.weights.ravel()
        live = np.flatnonzero(w != 0)
        order = live[np.argsort(flat[live], kind="stable")]                  # (token, slot) grouped by expert
        for group in np.split(order, np.flatnonzero(np.diff(flat[order])) + 1):
            if len(group):
                yield self.experts[int(flat[group[0]])], group // k, w[group]


class ExpertStore(Protocol):
    """Where experts come from. `bias` may steer selection towards resident experts; `prepare` sees a
    layer's whole selection (to load, compute cold or skip) and returns the plan to compute; `prefetch`
    hears which experts a later layer is predicted to select."""

    def bias(self, layer: int) -> SelectionBias | None: ...

    def prepare(self, layer: int, routing: Routing) -> Plan: ...

    def prefetch(self, layer: int, experts: np.ndarray) -> None: ...


_NONE = np.zeros(0, dtype=np.float32)


def route(logits: np.ndarray, k: int, norm_topk: bool, bias: SelectionBias | None = None) -> Routing:
    """softmax over experts, top-k by probability, weights optionally renormalised (build_moe_ffn)."""
    T = logits.shape[0]
    ids, w = np.empty((T, k), dtype=np.int64), np.empty((T, k), dtype=np.float32)
    lb = bias.logit if bias is not None and bias.logit is not None else _NONE
    pb = bias.prob if bias is not None and bias.prob is not None else _NONE
    route_topk(np.ascontiguousarray(logits, dtype=np.float32), k, norm_topk, lb, pb, ids, w)   # (T, k)
    return Routing(ids, w)


def moe_forward(x: np.ndarray, router: np.ndarray, k: int, norm_topk: bool, store: ExpertStore,
                layer: int) -> tuple[np.ndarray, Routing]:
    """The routed-expert output for x (T, n_embd), and the routing that produced it."""
    routing = route(x @ router.T, k, norm_topk, store.bias(layer))          # (T, k)
    plan = store.prepare(layer, routing)                                     # expert -> weights; skips weigh 0
    out = np.zeros_like(x)                                                   # (T, n_embd)
    for expert, tokens, w in plan.groups(routing):
        out[tokens] += w[:, None] * expert.swiglu(x[tokens])                 # (n, n_embd)
    return out, routing
