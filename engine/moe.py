"""The MoE step behind one narrow interface: route -> the expert store prepares experts -> compute -> combine.

`route` is llama.cpp's build_moe_ffn gating (softmax, top-k, optional renormalisation); an
ExpertStore decides where each selected expert's weights come from (the plain store: the mmap;
issue #5's stores: a hot arena or cold copies). Tokens are grouped per expert so each expert's
weights are streamed once per batch (dynamic gating, Huang et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .weights import QMatrix


@dataclass(frozen=True)
class Routing:
    experts: np.ndarray  # (T, k) int64: selected expert ids, best first
    weights: np.ndarray  # (T, k) float32: their gate weights


@dataclass(frozen=True)
class Expert:
    """One expert's SwiGLU matrices, wherever they live."""
    gate: QMatrix
    up: QMatrix
    down: QMatrix


class ExpertStore(Protocol):
    """Where experts come from. `prepare` sees a layer's whole selection first (to load, prefetch or
    skip); `get` then returns an expert's weights, or None to skip it (HOBBIT's near-zero misses)."""

    def prepare(self, layer: int, routing: Routing) -> None: ...

    def get(self, layer: int, expert: int, weight: float) -> Expert | None: ...


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def route(logits: np.ndarray, k: int, norm_topk: bool) -> Routing:
    """softmax over experts, top-k by probability, weights optionally renormalised (build_moe_ffn)."""
    probs = softmax(logits.astype(np.float32))                              # (T, E)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]                  # (T, k)
    w = np.take_along_axis(probs, ids, axis=-1)                             # (T, k)
    if norm_topk:
        w = w / w.sum(axis=-1, keepdims=True)
    return Routing(ids, w.astype(np.float32))


def swiglu(e: Expert, x: np.ndarray) -> np.ndarray:
    """down(silu(gate x) * up x) for x (n, n_embd)."""
    g = e.gate.apply(x)                                                      # (n, n_ff)
    u = e.up.apply(x)                                                        # (n, n_ff)
    return e.down.apply((g / (1.0 + np.exp(-g))) * u)                        # (n, n_embd)


def moe_forward(x: np.ndarray, router: np.ndarray, k: int, norm_topk: bool, store: ExpertStore,
                layer: int) -> tuple[np.ndarray, Routing]:
    """The routed-expert output for x (T, n_embd), and the routing that produced it."""
    routing = route(x @ router.T, k, norm_topk)                             # (T, k)
    store.prepare(layer, routing)
    out = np.zeros_like(x)                                                   # (T, n_embd)
    flat = routing.experts.ravel()
    order = np.argsort(flat, kind="stable")                                  # group (token, slot) by expert
    bounds = np.flatnonzero(np.diff(flat[order])) + 1
    for group in np.split(order, bounds):
        tokens, e = group // k, int(flat[group[0]])
        w = routing.weights.ravel()[group]                                   # (n,)
        expert = store.get(layer, e, float(w.max()))
        if expert is None:
            continue
        out[tokens] += w[:, None] * swiglu(expert, x[tokens])                # (n, n_embd)
    return out, routing
