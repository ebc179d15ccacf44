"""Options are defined once (engine/options.py): Model's keywords, moe-run's flags and README's tables come
from, or are checked against, the same fields."""
from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from hotcold import Model
from hotcold.cli.run import build_parser
from hotcold.engine.experts.policies import CachePolicy
from hotcold.engine.experts.rules import Budget, MissMode
from hotcold.engine.options import RESIDENCY, Options
from hotcold.engine.sampling import SamplingParams

README = Path(__file__).resolve().parents[1] / "README.md"


def test_model_keywords_are_the_options() -> None:
    params = inspect.signature(Model.__init__).parameters
    assert [p for p in params if p not in ("self", "path", "model_path")] == [f.name for f in fields(Options)]


def test_moe_run_has_a_flag_for_every_option() -> None:
    actions = {a.dest: a for a in build_parser()._actions}
    for cls in (Options, SamplingParams):
        for f in fields(cls):
            if f.metadata.get("flags") and f.metadata.get("group") != "server":   # moe-server's (test_server)
                assert actions[f.name].option_strings == list(f.metadata["flags"]), f.name
    assert "n_seq_max" not in actions and "schedule" not in actions   # -np stays a refused llama-cli flag


def test_flags_parse_to_the_engine_types() -> None:
    args = build_parser().parse_args(["m.gguf", "--expert-budget", "25%", "--miss", "adaptive", "--cache-policy",
                                      "lfu", "-c", "128", "--temp", "0"])
    opt = Options.parse(**{f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)})
    assert opt.expert_budget == Budget(fraction=0.25) and opt.miss is MissMode.ADAPTIVE
    assert opt.cache_policy is CachePolicy.LFU and opt.n_ctx == 128
    assert not hasattr(args, "n_batch")                 # flags not given leave the dataclass default
    assert args.temperature == 0.0


def test_readme_documents_every_residency_option() -> None:
    text = README.read_text()
    for f in fields(Options):
        if f.metadata.get("group") == RESIDENCY:
            long_flag = next(fl for fl in f.metadata["flags"] if fl.startswith("--"))
            assert f"`{f.name}`" in text and long_flag in text, f.name


def test_unknown_or_bad_options_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="unknown option 'expert_budjet'"):
        Options.parse(expert_budjet="25%")
    with pytest.raises(ValueError, match="eras_alpha=nan"):
        Options.parse(eras_alpha=float("nan"))
    with pytest.raises(ValueError, match="n_ctx=-1 must be >= 0"):   # 0 is llama.cpp's "the model's context"
        Options.parse(n_ctx=-1)
