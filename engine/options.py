"""Everything a model is loaded with, defined once: Model.load's keywords, moe-run's flags and their help
all come from the fields of `Options` (cli/flags.py builds the parser). Values arrive as strings or
numbers from the edges and are parsed here into the enums and budgets the engine uses.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numba

from .config import CacheType
from .experts.policies import CachePolicy
from .experts.rules import Budget, MissMode, Placement


class Schedule(enum.Enum):
    FCFS = "fcfs"   # queued requests in order of arrival (llama-server's)
    TASK = "task"   # eMoE's task-aware order: deadline, predicted output length, shared predicted experts


class Device(enum.Enum):
    CPU = "cpu"    # everything in RAM
    CUDA = "cuda"  # dense layers, KV cache and hot experts on the GPU


def _enum(kind: type[enum.Enum], label: str) -> Callable[[Any], enum.Enum]:
    def parse(v: Any) -> enum.Enum:
        try:
            return v if isinstance(v, kind) else kind(str(v).lower())
        except ValueError:
            raise ValueError(f"unknown {label} {v!r}; choose one of {', '.join(m.value for m in kind)}") from None
    return parse


def _budget(what: str) -> Callable[[Any], Budget | None]:
    return lambda v: None if v is None else Budget.parse(v, what)


def _number(kind: type, what: str, lo: float | None = None, allow_none: bool = False) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if v is None and allow_none:
            return None
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}={v!r}: expected a number") from None
        if lo is not None and not x >= lo:   # also refuses NaN
            raise ValueError(f"{what}={v!r} must be >= {lo}")
        if not math.isfinite(x):
            raise ValueError(f"{what}={v!r} must be a finite number")
        return x
    return parse


def option(default: Any, *flags: str, help: str, parse: Callable[[Any], Any], choices: type[enum.Enum] | None = None,
           cli: type | None = str, group: str = "model") -> Any:
    """A field of Options: its default, moe-run's flags and help, how a user's value is parsed, and for the
    parser its enum choices and argument type (None: an on/off flag)."""
    return field(default=default, metadata=dict(flags=flags, help=help, parse=parse, choices=choices, cli=cli,
                                                group=group))


RESIDENCY = "expert residency (see README)"


@dataclass(frozen=True)
class Options:
    n_ctx: int | None = option(None, "-c", "--ctx-size", help="context size in tokens (default, or 0: the model's "
                               "training context, at most 4096)", parse=_number(int, "n_ctx", 0, allow_none=True),
                               cli=int)
    n_batch: int = option(512, "-b", "--batch-size", help="prompt tokens per forward batch",
                          parse=_number(int, "n_batch", 1), cli=int)
    n_seq_max: int = option(1, "-np", "--parallel", help="sequences decoded together (moe-server's slots), each "
                            "with a context of its own of n_ctx tokens", parse=_number(int, "n_seq_max", 1), cli=int,
                            group="server")
    schedule: Schedule = option(Schedule.FCFS, "--schedule", help="order of queued requests: first come first served, "
                                "or by task (deadline slo_ms, predicted output length, shared predicted experts)",
                                parse=_enum(Schedule, "schedule"), choices=Schedule, group="server")
    n_threads: int | None = option(None, "-t", "--threads", help="threads (default: all cores; more than the cores "
                                   "runs on all of them, as Numba's pool is that size)",
                                   parse=_number(int, "n_threads", 1, allow_none=True), cli=int)
    type_k: CacheType = option(CacheType.F16, "-ctk", "--cache-type-k", help="KV cache type for K",
                               parse=_enum(CacheType, "cache type"), choices=CacheType)
    type_v: CacheType = option(CacheType.F16, "-ctv", "--cache-type-v", help="KV cache type for V",
                               parse=_enum(CacheType, "cache type"), choices=CacheType)
    seed: int | None = option(None, "-s", "--seed", help="random seed (default: random)",
                              parse=lambda v: None if v is None else int(v), cli=int)
    no_repack: bool = option(False, "-nr", "--no-repack", help="compute with Q4_K weights as the file lays them out "
                             "(default: resident Q4_K matrices are interleaved by eights at load, as llama.cpp "
                             "repacks them: faster products, bit-identical results, a copy in memory)", parse=bool,
                             cli=None)
    verbose: bool = option(False, "-v", "--verbose", help="print load time and prompt/decode speed to stderr",
                           parse=bool, cli=None)
    expert_budget: Budget | None = option(
        None, "--expert-budget", help="hot expert arena size: a share like 25%% or a size like 2GiB (default: no cache)",
        parse=_budget("expert_budget"), group=RESIDENCY)
    ram_budget: Budget | None = option(
        None, "--ram-budget", help="host memory for all the model holds (dense weights, KV cache, buffers, experts, "
        "the page cache of its reads), a size like 12GiB or a share like 50%% of the file; experts beyond it are "
        "read from disk (default: no limit)", parse=_budget("ram_budget"), group=RESIDENCY)
    cache_policy: CachePolicy = option(CachePolicy.LRU, "--cache-policy", help="eviction policy",
                                       parse=_enum(CachePolicy, "cache_policy"), choices=CachePolicy, group=RESIDENCY)
    miss: MissMode = option(MissMode.HOT, "--miss", help="a miss loads the hot copy, computes with the cold copy, "
                            "or decides by gate weight", parse=_enum(MissMode, "miss mode"), choices=MissMode,
                            group=RESIDENCY)
    miss_t1: float = option(0.6, "--miss-t1", help="adaptive misses: load hot while the gate weight ranked above "
                            "is <= this share", parse=_number(float, "miss_t1"), cli=float, group=RESIDENCY)
    miss_t2: float = option(0.9, "--miss-t2", help="adaptive misses: compute cold while it is <= this, skip beyond",
                            parse=_number(float, "miss_t2"), cli=float, group=RESIDENCY)
    eras_alpha: float = option(0.0, "--eras-alpha", help="add to resident experts' routing probability",
                               parse=_number(float, "eras_alpha", 0.0), cli=float, group=RESIDENCY)
    eras_beta: float = option(0.0, "--eras-beta", help="lower non-resident logits by beta*(1-freq)",
                              parse=_number(float, "eras_beta", 0.0), cli=float, group=RESIDENCY)
    prefetch: int = option(0, "--prefetch", help="layers ahead to predict and load experts for (0 = off)",
                           parse=_number(int, "prefetch", 0), cli=int, group=RESIDENCY)
    token_lookup: int = option(0, "--token-lookup", help="tokens whose experts the routing history predicts (the "
                               "current token's last occurrence and the tokens after it, as prompt-lookup "
                               "decoding): evict the resident predicted furthest ahead (0 = off; bench/emoe.py uses 4)",
                               parse=_number(int, "token_lookup", 0), cli=int, group=RESIDENCY)
    predictor: Path | None = option(None, "--predictor", help="an expert predictor (moe-predictor train): before "
                                    "each prompt, load the experts it predicts into the arena (eMoE); with a budget, "
                                    "MODEL.predictor.npz if there; 'none' for none",
                                    parse=lambda v: None if v is None or str(v).lower() == "none" else Path(v),
                                    group=RESIDENCY)
    predict_every: int = option(1, "--predict-every", help="with --predictor: predict every N prompts and reuse the "
                                "prediction in between (eMoE: 40)", parse=_number(int, "predict_every", 1), cli=int,
                                group=RESIDENCY)
    cold_path: Path | None = option(None, "--cold", help="cold copies (default: MODEL.cold.gguf)",
                                    parse=lambda v: None if v is None else Path(v), group=RESIDENCY)
    device: Device = option(Device.CPU, "--device", help="cuda: dense layers, KV cache and hot experts on the GPU",
                            parse=_enum(Device, "device"), choices=Device, group=RESIDENCY)
    vram_budget: Budget | None = option(
        None, "--vram-budget", help="with --device cuda: GPU memory for all of it (e.g. 6GiB); hot experts get "
        "what is left", parse=_budget("vram_budget"), group=RESIDENCY)
    miss_placement: Placement = option(
        Placement.AUTO, "--miss-placement", help="with --device cuda: cold misses uploaded to the GPU or computed "
        "on the CPU (auto: by measured cost)", parse=_enum(Placement, "miss_placement"), choices=Placement,
        group=RESIDENCY)

    @classmethod
    def parse(cls, **values: Any) -> "Options":
        """From user-facing values (strings as on the command line, or the engine's own types), with clear
        errors; options not given keep their defaults."""
        known = {f.name: f for f in fields(cls)}
        for k in values:
            if k not in known:
                raise TypeError(f"unknown option {k!r}; options are: {', '.join(known)}")
        opt = cls(**{k: known[k].metadata["parse"](v) for k, v in values.items()})
        opt._check()
        return opt

    def _check(self) -> None:
        if self.type_k != self.type_v:
            raise ValueError(f"type_k={self.type_k.value!r}, type_v={self.type_v.value!r}: K and V of different cache "
                             "types are not supported yet; give both the same (--cache-type-k, --cache-type-v)")
        if not 0.0 <= self.miss_t1 <= self.miss_t2 <= 1.0:
            raise ValueError(f"miss thresholds miss_t1={self.miss_t1}, miss_t2={self.miss_t2}: "
                             "need 0 <= t1 <= t2 <= 1")
        if self.device == Device.CPU and self.miss_placement != Placement.AUTO:
            raise ValueError(f"miss_placement={self.miss_placement.value!r} (--miss-placement) needs device='cuda' "
                             "(--device cuda): on the CPU every miss already runs on the CPU")
        if self.predict_every != 1 and self.predictor is None:
            raise ValueError(f"predict_every={self.predict_every} (--predict-every) needs a predictor (--predictor "
                             "pred.npz, made by moe-predictor train)")
        if self.ram_budget is not None and self.device != Device.CPU:
            raise ValueError("ram_budget (--ram-budget) is for device='cpu'; on a GPU give vram_budget")
        if self.vram_budget is not None:
            if self.device != Device.CUDA:
                raise ValueError(f"vram_budget needs device='cuda' (--device cuda), not device={self.device.value!r}")
            if self.expert_budget is not None:
                raise ValueError("give vram_budget (the GPU's share: the hot experts get what the dense layers "
                                 "leave) or expert_budget, not both")
            if self.vram_budget.nbytes is None:
                raise ValueError("vram_budget: give a size such as '6GiB' (a share of the experts is expert_budget, "
                                 "--expert-budget)")

    @property
    def residency(self) -> bool:
        """Whether any option asks for the expert cache (else experts are read straight from the file)."""
        return (self.expert_budget is not None or self.ram_budget is not None or self.miss != MissMode.HOT or bool(self.eras_alpha)
                or bool(self.eras_beta) or self.prefetch > 0 or self.cold_path is not None or self.device != Device.CPU
                or self.predictor is not None)

    @property
    def budget(self) -> Budget:
        """The hot arena's budget: all experts unless one was given."""
        return self.expert_budget if self.expert_budget is not None else Budget(fraction=1.0)
