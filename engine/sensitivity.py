"""How much a task's outputs depend on routing (eMoE's task sensitivity, Tairin et al. sec. 4): greedy outputs with
each token's experts restricted to the predictor's set, compared with the unrestricted ones. A task whose outputs
stay >= 85% equal is insensitive: the store skips its prediction and serves its misses cold."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .moe import Delegate, SelectionBias
from .predictor import Predictor, TaskInfo, select

if TYPE_CHECKING:
    from .api import Model
    from .moe import ExpertStore

_OUT = np.float32(-1e30)   # a logit bias no router logit overcomes: the expert is never chosen


class Restricted(Delegate):
    """An ExpertStore that passes everything to the store it wraps but lets each layer choose only among
    `mask` (n_layer, E) experts (a selection bias: gate weights stay the unbiased softmax's)."""

    def __init__(self, inner: "ExpertStore", mask: np.ndarray) -> None:
        super().__init__(inner)
        self._bias = [SelectionBias(logit=np.where(m, np.float32(0), _OUT).astype(np.float32)) if m.any() else None
                      for m in mask]

    def bias(self, layer: int) -> SelectionBias | None:
        return self._bias[layer]


def greedy_tokens(model: "Model", ids: Sequence[int], n: int) -> list[int]:
    """The token ids of up to `n` greedy tokens after `ids`, from an empty context."""
    model.reset()
    out: list = []
    for _ in model.generate(list(ids), max_tokens=n, temperature=0.0, _logprobs=(out, 0)):
        pass
    return [int(t) for t, _, _ in out]


def similarity(a: Sequence[int], b: Sequence[int], n: int | None = None) -> float:
    """Share of the first n positions (default: the longer output's length) where two outputs hold the same
    token; a missing token is a difference. 1.0 for two empty outputs."""
    n = max(len(a), len(b)) if n is None else n
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n


def restricted_similarity(model: "Model", predictor: Predictor, ids: Sequence[int], top_l: int, n: int) -> float:
    """Output similarity of `ids` with its experts restricted to the predictor's top-`top_l` per layer."""
    cfg = model.model.cfg
    plain = greedy_tokens(model, ids, n)
    shares = predictor.predict(model.prompt_features(ids))                  # (L, E)
    mask = np.zeros((cfg.n_layer, cfg.n_expert), dtype=bool)
    mask[list(predictor.layers)] = select(shares, top_l, cfg.n_expert_used, len(ids) + n)   # as the store would
    inner = model.ctx.experts
    model.ctx.experts = Restricted(inner, mask)
    try:
        restricted = greedy_tokens(model, ids, n)
    finally:
        model.ctx.experts = inner
    return similarity(plain, restricted)


def task_sensitivity(model: "Model", predictor: Predictor, prompts: Sequence[Mapping[str, str]], top_l: int,
                     n: int = 32, per_task: int = 8) -> Predictor:
    """The predictor with each task's measured similarity (mean over up to `per_task` of its prompts)."""
    tasks: dict[str, TaskInfo] = dict(predictor.tasks)
    by_task: dict[str, list[str]] = {}
    for p in prompts:
        if p.get("task"):
            by_task.setdefault(p["task"], []).append(p["prompt"])
    for name, texts in sorted(by_task.items()):
        sims = [restricted_similarity(model, predictor, model.tokenize(t, special=True), top_l, n)
                for t in texts[:per_task]]
        info = tasks.get(name, TaskInfo(len(texts), predictor.mean_output_tokens))   # a task the traces lacked
        tasks[name] = TaskInfo(info.prompts, info.output_tokens, float(np.mean(sims)))
    return predictor.with_tasks(tasks)
