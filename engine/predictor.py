"""eMoE's expert predictor (Tairin et al., arXiv 2503.06823): from a prompt, each MoE layer's share of expert
selections over the whole request, so the store can load the experts a prompt will use before its prefill.

Trained from traces (engine/trace.py) with numpy only: softmax regression or a two-layer MLP against each
prompt's usage shares (cross-entropy with soft targets, Adam). Three inputs, measured against each other:
EMBED (eMoE-A: the prompt's mean token embedding; known before prefill, what the store uses), FIRST (the
first MoE layer's routing of the prompt predicts the later layers) and PREV (eMoE-L: layer i from layer i-1).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .trace import Traces

VERSION = 1
SENSITIVE_BELOW = 0.85   # eMoE: a task whose outputs stay >= 85% equal under the predicted experts is insensitive


class PredictorError(ValueError):
    """A predictor file that is not one, or was trained for another model."""


class Kind(enum.Enum):
    EMBED = "embed"   # every layer from the prompt's mean token embedding (eMoE-A; before prefill)
    FIRST = "first"   # the later layers from the first MoE layer's routing of the prompt
    PREV = "prev"     # layer i from layer i-1's routing of the prompt (eMoE-L)


class Net(enum.Enum):
    LOGISTIC = "logistic"   # softmax regression
    MLP = "mlp"             # one hidden ReLU layer


@dataclass(frozen=True)
class TaskInfo:
    """What the traces say of one task label."""
    prompts: int
    output_tokens: float              # mean tokens generated
    similarity: float | None = None   # output similarity with each token's experts restricted to the prediction

    @property
    def sensitive(self) -> bool:
        """Unmeasured tasks count as sensitive (they are predicted for)."""
        return self.similarity is None or self.similarity < SENSITIVE_BELOW


@dataclass(frozen=True)
class _Head:
    """x (D,) -> logits (n_out, E): standardise, optional hidden ReLU layer, one softmax per output layer."""
    mean: np.ndarray                  # (D,)
    scale: np.ndarray                 # (D,)
    w: np.ndarray                     # (H, n_out, E), H = D without a hidden layer
    b: np.ndarray                     # (n_out, E)
    w1: np.ndarray | None = None      # (D, H)
    b1: np.ndarray | None = None      # (H,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(P, D) -> (P, n_out, E) shares."""
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        if self.w1 is not None:
            z = np.maximum(z @ self.w1 + self.b1, 0.0)
        return _softmax(np.einsum("ph,hoe->poe", z, self.w) + self.b)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale, f"{prefix}w": self.w, f"{prefix}b": self.b}
        if self.w1 is not None:
            out.update({f"{prefix}w1": self.w1, f"{prefix}b1": self.b1})
        return out

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray], prefix: str) -> "_Head":
        get = lambda k: a[prefix + k].astype(np.float64) if prefix + k in a else None  # noqa: E731
        return cls(get("mean"), get("scale"), get("w"), get("b"), get("w1"), get("b1"))


@dataclass(frozen=True)
class Predictor:
    """Predicted usage shares per MoE layer (`layers`) and expert for a prompt; immutable."""
    kind: Kind
    net: Net
    heads: tuple[_Head, ...]          # EMBED, FIRST: one; PREV: one per layer after the first
    layers: tuple[int, ...]           # the model's MoE layers, the L axis
    n_expert: int
    n_embd: int
    model: str = ""
    prior: np.ndarray | None = None   # (L, E) the training prompts' mean usage (layer 0 of FIRST and PREV)
    tasks: Mapping[str, TaskInfo] = field(default_factory=dict)
    mean_output_tokens: float = 0.0   # tokens the training prompts generated, on average

    # --- prediction --------------------------------------------------------------------------------------

    def predict(self, features: np.ndarray | None = None, routing: np.ndarray | None = None) -> np.ndarray:
        """(L, E) shares for one prompt. EMBED takes `features` (n_embd,), the mean token embedding; FIRST and
        PREV take `routing` (L, E), the prompt's actual usage of the layers they predict from."""
        return self.predict_many(None if features is None else features[None],
                                 None if routing is None else routing[None])[0]

    def predict_many(self, features: np.ndarray | None = None, routing: np.ndarray | None = None) -> np.ndarray:
        """(P, L, E) for P prompts: features (P, n_embd) or routing (P, L, E), as `predict`."""
        if self.kind is Kind.EMBED:
            if features is None:
                raise ValueError("an embed predictor needs the prompt's features (its mean token embedding)")
            return self.heads[0](features)
        if routing is None:
            raise ValueError(f"a {self.kind.value} predictor needs the prompt's routing of the layers before")
        P = routing.shape[0]
        out = np.empty((P, len(self.layers), self.n_expert))
        out[:, 0] = self.prior[0]
        if self.kind is Kind.FIRST:
            out[:, 1:] = self.heads[0](routing[:, 0])
        else:
            for l, head in enumerate(self.heads, 1):
                out[:, l] = head(routing[:, l - 1])[:, 0]
        return out

    def task(self, name: str | None) -> TaskInfo | None:
        return self.tasks.get(name) if name else None

    def sensitive(self, task: str | None) -> bool:
        """Whether a prompt of `task` is predicted for: unknown and unmeasured tasks are."""
        info = self.task(task)
        return info is None or info.sensitive

    def output_tokens(self, task: str | None) -> float | None:
        info = self.task(task)
        return None if info is None else info.output_tokens

    def output_tokens_for(self, task: str | None) -> float:
        """The tokens a prompt of `task` is expected to generate: its task's mean, else all prompts'."""
        n = self.output_tokens(task)
        return self.mean_output_tokens if n is None else n

    def with_tasks(self, tasks: Mapping[str, TaskInfo]) -> "Predictor":
        return replace(self, tasks=dict(tasks))

    # --- files -------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the predictor (an .npz); nothing is left behind if writing fails."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for i, h in enumerate(self.heads):
            arrays.update(h.arrays(f"h{i}_"))
        if self.prior is not None:
            arrays["prior"] = self.prior
        meta = dict(version=VERSION, kind=self.kind.value, net=self.net.value, heads=len(self.heads),
                    layers=list(self.layers), n_expert=self.n_expert, n_embd=self.n_embd, model=self.model,
                    tasks={k: vars(v) for k, v in self.tasks.items()}, mean_output_tokens=self.mean_output_tokens)
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Predictor":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            meta = json.loads(str(a.pop("meta")))
            if meta.get("version") != VERSION:
                raise PredictorError(f"{path}: predictor version {meta.get('version')}, this hotcold reads {VERSION}")
            heads = tuple(_Head.from_arrays(a, f"h{i}_") for i in range(int(meta["heads"])))
            p = cls(Kind(meta["kind"]), Net(meta["net"]), heads, tuple(int(l) for l in meta["layers"]),
                    int(meta["n_expert"]), int(meta["n_embd"]), str(meta.get("model", "")),
                    a["prior"].astype(np.float64) if "prior" in a else None,
                    {str(k): TaskInfo(**v) for k, v in meta.get("tasks", {}).items()},
                    float(meta.get("mean_output_tokens", 0.0)))
        except FileNotFoundError:
            raise PredictorError(f"{path}: no such predictor (make one with moe-predictor train TRACES -o {path})")
        except PredictorError:
            raise
        except Exception as e:
            raise PredictorError(f"{path}: not a predictor of moe-predictor train ({type(e).__name__}: {e})") from None
        p._check(path)
        return p

    def _check(self, where: Any) -> None:
        L, E = len(self.layers), self.n_expert
        outs = {Kind.EMBED: L, Kind.FIRST: L - 1, Kind.PREV: 1}[self.kind]
        ins = self.n_embd if self.kind is Kind.EMBED else E
        heads = L - 1 if self.kind is Kind.PREV else 1
        if len(self.heads) != heads:
            raise PredictorError(f"{where}: a {self.kind.value} predictor of {L} MoE layers has {heads} head(s), "
                                 f"this file {len(self.heads)}; train it again (moe-predictor train)")
        if self.prior is not None and (self.prior.shape != (L, E) or not np.isfinite(self.prior).all()):
            raise PredictorError(f"{where}: the predictor's prior is not {L} x {E} finite shares; train it again")
        if self.kind is not Kind.EMBED and self.prior is None:
            raise PredictorError(f"{where}: a {self.kind.value} predictor needs its prior; train it again")
        for h in self.heads:
            H = h.w1.shape[1] if h.w1 is not None else ins
            ok = (h.mean.shape == (ins,) and h.scale.shape == (ins,) and h.w.shape == (H, outs, E)
                  and h.b.shape == (outs, E) and (h.w1 is None or h.w1.shape == (ins, H)) and np.all(h.scale > 0)
                  and all(np.isfinite(x).all() for x in (h.mean, h.scale, h.w, h.b)))
            if not ok:
                raise PredictorError(f"{where}: a predictor's weights do not have the shapes its header gives")

    def check_model(self, n_embd: int, layers: tuple[int, ...], n_expert: int, where: str) -> None:
        """A one-line error when this predictor was trained for another model."""
        if (self.n_embd, self.layers, self.n_expert) != (n_embd, tuple(layers), n_expert):
            raise PredictorError(
                f"the predictor was trained on {self.model or 'another model'} (n_embd {self.n_embd}, MoE layers "
                f"{len(self.layers)}, {self.n_expert} experts), not {where} (n_embd {n_embd}, MoE layers {len(layers)}, "
                f"{n_expert} experts): trace this model (moe-trace) and train a predictor for it")
        if self.kind is not Kind.EMBED:
            raise PredictorError(f"the predictor is of kind {self.kind.value!r}, which needs routing that a prompt "
                                 "has not got before its prefill: train one with --kind embed")


# --- training ------------------------------------------------------------------------------------------------

def train(traces: Traces, kind: Kind = Kind.EMBED, net: Net = Net.LOGISTIC, hidden: int = 64, steps: int = 800,
          lr: float | None = None, decay: float = 1e-3, seed: int = 0) -> Predictor:
    """Fit a predictor of each prompt's usage shares (prefill and decode together) from traces."""
    if traces.n_prompts < 2:
        raise ValueError(f"training a predictor needs traces of at least 2 prompts, got {traces.n_prompts}")
    y = traces.usage("all")                                                  # (P, L, E)
    prior = y.mean(0)
    L = y.shape[1]
    if kind is not Kind.EMBED and L < 2:
        raise ValueError(f"a {kind.value} predictor needs at least two MoE layers")
    fit = lambda x, t: _fit(x, t, net, hidden, steps, lr, decay, seed)  # noqa: E731
    if kind is Kind.EMBED:
        heads = (fit(traces.features, y),)
    elif kind is Kind.FIRST:
        heads = (fit(traces.usage("prefill")[:, 0], y[:, 1:]),)
    else:
        pre = traces.usage("prefill")
        heads = tuple(fit(pre[:, l - 1], y[:, l:l + 1]) for l in range(1, L))
    tasks = {}
    out_tokens = traces.output_tokens()
    for name in sorted(set(traces.tasks.tolist()) - {""}):
        sel = traces.tasks == name
        tasks[name] = TaskInfo(int(sel.sum()), float(out_tokens[sel].mean()))
    return Predictor(kind, net, heads, tuple(int(l) for l in traces.layers), traces.n_expert,
                     traces.features.shape[1], traces.model, prior, tasks, float(out_tokens.mean()))


def _fit(x: np.ndarray, y: np.ndarray, net: Net, hidden: int, steps: int, lr: float | None, decay: float,
         seed: int) -> _Head:
    """Full-batch Adam on the mean cross-entropy of softmax(f(x)) against y (P, n_out, E) soft targets."""
    x = np.asarray(x, np.float64)
    P, D = x.shape
    _, n_out, E = y.shape
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z0 = (x - mean) / scale
    rng = np.random.default_rng(seed)
    mlp = net is Net.MLP
    H = hidden if mlp else D
    params = {"w": rng.normal(0, 0.01, (H, n_out, E)), "b": np.log(np.maximum(y.mean(0), 1e-4))}
    if mlp:
        params.update(w1=rng.normal(0, np.sqrt(2.0 / D), (D, H)), b1=np.zeros(H))
    lr = lr if lr is not None else (0.01 if mlp else 0.05)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    for t in range(1, steps + 1):
        a = np.maximum(z0 @ params["w1"] + params["b1"], 0.0) if mlp else z0          # (P, H)
        p = _softmax(np.einsum("ph,hoe->poe", a, params["w"]) + params["b"])         # (P, n_out, E)
        g = (p - y) / P                                                              # d loss / d logits
        grads = {"w": np.einsum("ph,poe->hoe", a, g) + decay * params["w"], "b": g.sum(0)}
        if mlp:
            ga = np.einsum("poe,hoe->ph", g, params["w"]) * (a > 0)
            grads.update(w1=z0.T @ ga + decay * params["w1"], b1=ga.sum(0))
        for k in params:   # Adam (Kingma and Ba), the usual constants
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            params[k] -= lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    return _Head(mean, scale, params["w"], params["b"], params.get("w1"), params.get("b1"))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- what the store loads, and how good a prediction is ------------------------------------------------------

def select(shares: np.ndarray, top_l: int, k: int, tokens: float) -> np.ndarray:
    """(L, E) bool: per layer the `top_l` experts of highest predicted share that are expected to serve at least
    one of the `tokens` tokens' k selections (eMoE's expected-token-count rule: share * k * tokens >= 1)."""
    order = np.argsort(-shares, axis=-1, kind="stable")[:, :max(top_l, 0)]   # (L, top_l)
    out = np.zeros(shares.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=-1)
    return out & (shares * k * tokens >= 1.0)


def top_l_accuracy(predicted: np.ndarray, actual: np.ndarray, top_l: int) -> np.ndarray:
    """(L,) mean over prompts of the share of each layer's actual selections that fall in the predicted top-L
    experts: the hit rate an arena holding just those would see. predicted, actual: (P, L, E)."""
    order = np.argsort(-predicted, axis=-1, kind="stable")[..., :top_l]
    return np.take_along_axis(actual, order, axis=-1).sum(-1).mean(0)


def most_frequent(train_usage: np.ndarray, n: int) -> np.ndarray:
    """Baseline: every prompt gets the training prompts' mean usage (P=n copies of (L, E))."""
    return np.broadcast_to(train_usage.mean(0), (n,) + train_usage.shape[1:])


def previous_prompt(usage: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Baseline: each prompt gets the previous prompt's actual usage (the first gets `first` (L, E))."""
    return np.concatenate([first[None], usage[:-1]])
