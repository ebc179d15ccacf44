"""The MoE step, route -> the expert store prepares -> compute -> combine, and the interfaces between them.

`route` is llama.cpp's build_moe_ffn gating (softmax, top-k, optional renormalisation), with an optional
residency-aware selection bias (MoE-ERAS) that changes which experts are chosen but never their gate
weights. An ExpertStore decides where each selected expert's weights come from (experts.mmap: the file;
experts.cache: a hot arena or cold copies) and may drop near-zero misses (HOBBIT). Tokens are grouped per
expert so each expert's weights are streamed once per batch (dynamic gating, Huang et al. 2023); the
backend computes the groups where their weights live (after mlx-lm's switch_layers.py, which isolates
expert dispatch the same way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from .config import Gating
from .experts.expert import Expert
from .kernels import route_softmax_topk

if TYPE_CHECKING:
    from .backend import Backend
    from .context import Context


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


Group = tuple[Expert, Any, np.ndarray]  # (expert, its token rows: a slice or an index array, their gate weights)


_ROW0 = slice(0, 1)


class Plan(NamedTuple):
    """What a store decided for one layer's batch: the weights of each expert to compute, and the gate
    weights to combine with (0 where a (token, slot) was skipped). A tuple: one is made per layer and token,
    and a tuple is the cheapest immutable record to make."""
    experts: Mapping[int, Expert] | Sequence[Expert]  # indexed by expert id
    weights: np.ndarray  # (T, k) float32

    def groups(self, routing: Routing) -> Iterator[Group]:
        """(expert, token rows, their gate weights) for each expert with unskipped tokens, by expert id."""
        T, k = routing.experts.shape
        if T == 1:                                                           # decode: no grouping to do
            ids, w = routing.experts[0].tolist(), self.weights[0]
            for e, j in sorted(zip(ids, range(k))):
                if w[j] != 0:
                    yield self.experts[e], _ROW0, w[j:j + 1]
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
    queues the experts a later layer is predicted to select (`lookahead` layers ahead, 0 for none)."""

    lookahead: int

    def bias(self, layer: int) -> SelectionBias | None: ...

    def prepare(self, layer: int, routing: Routing) -> Plan: ...

    def prefetch(self, layer: int, experts: np.ndarray) -> None: ...

    def new_sequence(self) -> None: ...

    def begin_step(self, ids: np.ndarray, seqs: np.ndarray | None = None) -> None:
        """A forward pass of tokens `ids` (T,) starts: one sequence's, or row i of sequence seqs[i]."""

    def begin_prompt(self, ids: Sequence[int], task: str | None = None, join: bool = False) -> None:
        """A prompt (of a task label, if given) is about to be prefilled: eMoE's moment to load its experts;
        `join`: other sequences are running (a batch), whose prompts' predictions stand beside this one's."""

    def report(self) -> dict[str, Any]: ...

    def reset_stats(self) -> None: ...


class Delegate:
    """An ExpertStore over another that passes every call through: a wrapper (a trace recorder, a restricted
    selection) overrides only what it changes."""

    def __init__(self, inner: ExpertStore) -> None:
        self.inner = inner

    @property
    def lookahead(self) -> int:
        return self.inner.lookahead

    def bias(self, layer: int) -> SelectionBias | None:
        return self.inner.bias(layer)

    def prepare(self, layer: int, routing: Routing) -> Plan:
        return self.inner.prepare(layer, routing)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        self.inner.prefetch(layer, experts)

    def begin_prompt(self, ids: Sequence[int], task: str | None = None, join: bool = False) -> None:
        self.inner.begin_prompt(ids, task, join)

    def new_sequence(self) -> None:
        self.inner.new_sequence()

    def begin_step(self, ids: np.ndarray, seqs: np.ndarray | None = None) -> None:
        self.inner.begin_step(ids, seqs)

    def report(self) -> dict[str, Any]:
        return self.inner.report()

    def reset_stats(self) -> None:
        self.inner.reset_stats()


_NONE = np.zeros(0, dtype=np.float32)


def route(logits: np.ndarray, k: int, norm_topk: bool, bias: SelectionBias | None = None,
          gating: Gating = Gating.SOFTMAX, out: Routing | None = None,
          scratch: np.ndarray | None = None) -> Routing:
    """Experts and gate weights for router logits (T, E): scores by `gating`, top-k, weights optionally
    renormalised (build_moe_ffn). `out` and `scratch` ((3, E) float32) are reused if given."""
    T, E = logits.shape
    if out is None:
        out = Routing(np.empty((T, k), dtype=np.int64), np.empty((T, k), dtype=np.float32))
    if scratch is None:
        scratch = np.empty((3, E), dtype=np.float32)
    lb = bias.logit if bias is not None and bias.logit is not None else _NONE
    pb = bias.prob if bias is not None and bias.prob is not None else _NONE
    if gating is Gating.SOFTMAX:
        route_softmax_topk(logits, k, norm_topk, lb, pb, out.experts, out.weights, scratch)   # (T, k)
    return out


def moe(be: "Backend", router: Any, layer: int, h: Any, ctx: "Context", out: Any) -> None:
    """out (T, n_embd) = the routed experts' weighted sum for h (T, n_embd), the normed FFN input."""
    cfg, s, store = ctx.cfg, ctx.state, ctx.experts
    T = h.shape[0]
    be.matmul(router, h, s.router[:T])                                       # (T, E) router logits
    hh = be.download(h, s.h_host[:T], sync=False)                            # (T, n_embd) for the host's work
    logits = be.download(s.router[:T], s.router_host[:T])                    # (T, E) where the store decides
    routing = route(logits, cfg.n_expert_used, cfg.spec.norm_topk, store.bias(layer), cfg.spec.gating,
                    s.routing(T), s.route_scratch)                            # (T, k) experts, gate weights
    plan = store.prepare(layer, routing)                                     # expert -> weights; skips weigh 0
    prefetch(be, layer, hh, ctx)                                             # queued loads overlap this compute
    here, host = be.split(plan.groups(routing), s)                           # computed by be / on the host
    combine(be, here, be.acts(h, s.h_acts), s.ffn, cfg.spec.activation, out)  # (T, n_embd) weighted sum
    if host:                                                                 # Fiddler: host experts meanwhile
        acc = s.moe_host[:T]
        hx = be.host.acts(hh, s.host_h_acts)
        combine(be.host, host, hx, s.host_ffn, cfg.spec.activation, acc)     # (T, n_embd)
        be.add_from_host(out, acc, s)


def combine(be: "Backend", groups: Sequence[Group], x: Any, scratch: Any, act: Any, out: Any) -> None:
    """out (T, n_embd) = sum over groups of w * expert(x[rows]), each expert run once on its rows; x is the
    matrix input from be.acts."""
    be.zero(out)
    for expert, rows, w in groups:
        be.wait(expert.ready)                                                # its load has landed
        xs = be.gather(x, rows, scratch)                                     # (n, n_embd) its tokens
        y = scratch.y[:w.shape[0]]
        be.glu(expert, xs, scratch, y, act)                                  # (n, n_embd)
        be.scatter_add(out, rows, w, y)                                      # out[rows] += w * y


def prefetch(be: "Backend", layer: int, hh: np.ndarray, ctx: "Context") -> None:
    """HOBBIT: the next `lookahead` layers' routers on this layer's FFN input hh (T, n_embd, on the host)
    predict their experts, whose loads the store queues. Host-side work: nothing waits on the device."""
    cfg, s, store, routers = ctx.cfg, ctx.state, ctx.experts, ctx.model.host_routers
    T = hh.shape[0]
    for ahead in range(layer + 1, min(layer + 1 + store.lookahead, cfg.n_layer)):
        if routers[ahead] is None:
            continue
        be.host.matmul(routers[ahead], hh, s.router_host[:T])                # (T, E) the later router's logits
        guess = route(s.router_host[:T], cfg.n_expert_used, cfg.spec.norm_topk, store.bias(ahead),
                      cfg.spec.gating, s.guess(T), s.route_scratch)           # (T, k) predicted
        store.prefetch(ahead, guess.experts)
