"""Expert traces (eMoE): for every prompt, each MoE layer's selected experts and gate weights, for its prompt
tokens (prefill) and for the tokens it then generated (decode), and each of those tokens' ids, plus the prompt's
mean token embedding (the predictor's input, eMoE-A). Saved as one .npz of flat arrays with offsets, validated on
load."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .moe import Delegate, Plan, Routing

if TYPE_CHECKING:
    from .api import Model
    from .moe import ExpertStore

VERSION = 1


class TraceError(ValueError):
    """A traces file that is not one, or does not fit what it is used with."""


@dataclass(frozen=True)
class Traces:
    experts: np.ndarray     # (N, L, k) int16: every traced token of every prompt, its L MoE layers' experts
    weights: np.ndarray     # (N, L, k) float32: their gate weights
    offsets: np.ndarray     # (P + 1,) int64: prompt i's tokens are rows offsets[i]:offsets[i + 1]
    n_prompt: np.ndarray    # (P,) int64: how many of those are its prompt (the rest were generated)
    features: np.ndarray    # (P, n_embd) float32: the prompt's mean token embedding
    tasks: np.ndarray       # (P,) str: its task label ("" for none)
    layers: np.ndarray      # (L,) int64: the model layers the L axis stands for
    n_expert: int
    model: str = ""         # the traced file's name
    tokens: np.ndarray | None = None  # (N,) int64: each traced row's token id (None: a file written without them)

    @property
    def n_prompts(self) -> int:
        return len(self.n_prompt)

    @property
    def n_layer(self) -> int:
        return self.experts.shape[1]

    def rows(self, i: int, part: str = "all") -> slice:
        """Prompt i's token rows: "all", "prefill" (its prompt tokens) or "decode" (what it generated)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        mid = a + int(self.n_prompt[i])
        return {"all": slice(a, b), "prefill": slice(a, mid), "decode": slice(mid, b)}[part]

    def usage(self, part: str = "all") -> np.ndarray:
        """(P, L, E) float64: each prompt's share of selections per expert and layer (each (p, l) sums to 1, or
        0 where it has no tokens in `part`)."""
        P, L, E = self.n_prompts, self.n_layer, self.n_expert
        out = np.zeros((P, L, E))
        for i in range(P):
            ids = self.experts[self.rows(i, part)]                           # (n, L, k)
            for l in range(L):
                out[i, l] = np.bincount(ids[:, l].ravel(), minlength=E)[:E]
        tot = out.sum(-1, keepdims=True)
        return np.divide(out, tot, out=np.zeros_like(out), where=tot > 0)

    def output_tokens(self) -> np.ndarray:
        """(P,) generated tokens per prompt (the traced decode rows plus the last token, which no step fed)."""
        n = np.diff(self.offsets) - self.n_prompt
        return np.where(n > 0, n + 1, 0)

    def subset(self, keep: Sequence[int]) -> "Traces":
        keep = [int(i) for i in keep]
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in keep]
        idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        return Traces(self.experts[idx], self.weights[idx], np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                      self.n_prompt[keep], self.features[keep], self.tasks[keep], self.layers, self.n_expert, self.model,
                      None if self.tokens is None else self.tokens[idx])

    def save(self, path: str | Path) -> Path:
        """Write the traces (an .npz); nothing is left behind if writing fails."""
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        meta = dict(version=VERSION, n_expert=self.n_expert, model=self.model)
        extra = {} if self.tokens is None else {"tokens": self.tokens}
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, experts=self.experts, weights=self.weights, offsets=self.offsets,
                                    n_prompt=self.n_prompt, features=self.features, tasks=self.tasks.astype(str),
                                    layers=self.layers, meta=np.array(json.dumps(meta)), **extra)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Traces":
        """Read traces written by `save` (moe-trace), with a one-line error for anything else."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            meta = json.loads(str(a.pop("meta")))
        except FileNotFoundError:
            raise TraceError(f"{path}: no such traces file (make one with moe-trace MODEL --prompts FILE -o {path})")
        except Exception as e:
            raise TraceError(f"{path}: not a traces file of moe-trace ({type(e).__name__}: {e})") from None
        need = ("experts", "weights", "offsets", "n_prompt", "features", "tasks", "layers")
        missing = [k for k in need if k not in a]
        if missing or not isinstance(meta, dict) or meta.get("version") != VERSION:
            raise TraceError(f"{path}: not a version-{VERSION} traces file of moe-trace "
                             f"({'missing ' + ', '.join(missing) if missing else 'version ' + str(meta.get('version'))})")
        t = cls(a["experts"].astype(np.int16), a["weights"].astype(np.float32), a["offsets"].astype(np.int64),
                a["n_prompt"].astype(np.int64), a["features"].astype(np.float32), a["tasks"].astype(str),
                a["layers"].astype(np.int64), int(meta["n_expert"]), str(meta.get("model", "")),
                a["tokens"].astype(np.int64) if "tokens" in a else None)
        t.check(path)
        return t

    def check(self, where: Any = "traces") -> None:
        """Shapes and ranges agree (a hostile or truncated file gets a clear error, not an IndexError later)."""
        P = len(self.n_prompt)
        bad = None
        if self.experts.ndim != 3 or self.weights.shape != self.experts.shape:
            bad = f"experts {self.experts.shape} and weights {self.weights.shape} must be equal (N, L, k) arrays"
        elif self.offsets.shape != (P + 1,) or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0) \
                or self.offsets[-1] != len(self.experts):
            bad = "offsets must rise from 0 to the number of traced tokens, one more than the prompts"
        elif np.any(self.n_prompt < 0) or np.any(self.n_prompt > np.diff(self.offsets)):
            bad = "a prompt's token count is outside its rows"
        elif self.features.ndim != 2 or len(self.features) != P or len(self.tasks) != P:
            bad = "features and tasks need one row per prompt"
        elif len(self.layers) != self.experts.shape[1]:
            bad = "layers needs one entry per traced layer"
        elif self.n_expert < 1 or (self.experts.size and (self.experts.min() < 0 or self.experts.max() >= self.n_expert)):
            bad = f"expert ids must lie in 0..{self.n_expert - 1}"
        elif not np.isfinite(self.features).all() or not np.isfinite(self.weights).all():
            bad = "features and weights must be finite"
        elif self.tokens is not None and (self.tokens.shape != (len(self.experts),) or np.any(self.tokens < 0)):
            bad = "tokens needs one id (>= 0) per traced row"
        if bad:
            raise TraceError(f"{where}: {bad}")


class Recorder(Delegate):
    """An ExpertStore that passes everything to the store it wraps and keeps each MoE layer's routing."""

    def __init__(self, inner: "ExpertStore", layers: Sequence[int]) -> None:
        super().__init__(inner)
        self.layers = list(layers)
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.clear()

    def clear(self) -> None:
        self.experts: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.weights: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.tokens: list[np.ndarray] = []

    def begin_step(self, ids: np.ndarray, seqs: np.ndarray | None = None) -> None:
        self.tokens.append(np.array(ids, dtype=np.int64))                   # (T,) the pass's tokens
        self.inner.begin_step(ids, seqs)

    def prepare(self, layer: int, routing: Routing) -> Plan:
        i = self._index[layer]
        self.experts[i].append(routing.experts.astype(np.int16))             # (T, k) copies: the buffers are reused
        self.weights[i].append(routing.weights.copy())
        return self.inner.prepare(layer, routing)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, L, k) experts and weights and (n,) token ids recorded since the last take, token order."""
        ex = np.stack([np.concatenate(e) for e in self.experts], axis=1)
        w = np.stack([np.concatenate(e) for e in self.weights], axis=1)
        tok = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int64)
        self.clear()
        return ex, w, tok


def read_prompts(path: str | Path) -> list[dict[str, str]]:
    """A JSON-lines file of {"prompt": ..., "task": ...} objects (task optional), one per line; blank lines are
    skipped. Errors name the line."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read prompts ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise TraceError(f"{path}:{n}: each line needs a non-empty string \"prompt\" field")
        task = obj.get("task", "")
        if not isinstance(task, str):
            raise TraceError(f"{path}:{n}: \"task\" must be a string")
        out.append(dict(prompt=obj["prompt"], task=task))
    if not out:
        raise TraceError(f"{path}: no prompts")
    return out


def trace(model: "Model", prompts: Iterable[str | Mapping[str, str]], max_tokens: int = 32,
          progress: Any = None) -> Traces:
    """Run each prompt from an empty context and greedily generate up to `max_tokens`, recording every MoE
    layer's routing. Prompts are strings or {"prompt", "task"} mappings."""
    cfg = model.model.cfg
    layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
    if not layers:
        raise TraceError(f"{model.path.name} is a dense model: there are no experts to trace")
    ctx = model.ctx
    rec = Recorder(ctx.experts, layers)
    experts, weights, tokens, lens, n_prompt, feats, tasks = [], [], [], [], [], [], []
    ctx.experts = rec
    try:
        for p in _items(prompts):
            ids = model.tokenize(p["prompt"], special=True)
            model.reset()
            if max_tokens > 0:
                for _ in model.generate(ids, max_tokens=max_tokens, temperature=0.0, task=p["task"] or None):
                    pass
            else:                                                            # the prompt alone (generate's 0 is
                model.eval(ids)                                              # "to the end of the context")
            ex, w, tok = rec.take()
            experts.append(ex)
            weights.append(w)
            tokens.append(tok)
            lens.append(len(ex))
            n_prompt.append(len(ids))
            feats.append(model.prompt_features(ids))
            tasks.append(p["task"])
            if progress is not None:
                progress()
    finally:
        ctx.experts = rec.inner
    k, L = cfg.n_expert_used, len(layers)
    return Traces(np.concatenate(experts) if experts else np.zeros((0, L, k), np.int16),
                  np.concatenate(weights) if weights else np.zeros((0, L, k), np.float32),
                  np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), np.array(n_prompt, dtype=np.int64),
                  np.array(feats, dtype=np.float32).reshape(len(feats), cfg.n_embd), np.array(tasks, dtype=str),
                  np.array(layers, dtype=np.int64), cfg.n_expert, model.path.name,
                  np.concatenate(tokens) if tokens else np.zeros(0, np.int64))


def _items(prompts: Iterable[str | Mapping[str, str]]) -> Iterator[dict[str, str]]:
    for p in prompts:
        yield dict(prompt=p, task="") if isinstance(p, str) else dict(prompt=p["prompt"], task=p.get("task", "") or "")
