"""The one check between a GGUF file and the kernels: metadata values and the tensor table, against each other.

ModelConfig.from_gguf reads every hyperparameter through `Meta` (type, finiteness and range per key) and then
`check_tensors` holds each tensor the forward pass will read to the shape the configuration promises, as
llama.cpp's llama_model::load_tensors does (create_tensor with its expected ne). After it, no kernel sees a
shape it was not promised: a hostile file fails here with a GGUFError naming the key or the tensor.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import Keys

from hotcold.quant.kernels import MATVEC

from .gguf_file import GGUFError, GGUFFile, TensorRef

if TYPE_CHECKING:
    from .config import ModelConfig

MAX_DIM = 1 << 20       # widths, heads, experts: far above any model's, far below what overflows an index
MAX_LAYERS = 1 << 12
MAX_CTX = 1 << 31       # context lengths are int32 positions in llama.cpp


class Meta:
    """Typed reads of one architecture's metadata keys: `{arch}` in a key is the file's architecture."""

    def __init__(self, f: GGUFFile, arch: str) -> None:
        self.f, self.arch = f, arch

    def _name(self, key: str) -> str:
        return key.format(arch=self.arch)

    def _fail(self, key: str, v: Any, need: str) -> GGUFError:
        return GGUFError(f"{self.f.path}: metadata key {self._name(key)}={v!r} {need}")

    def integer(self, key: str, default: int | None = None, lo: int = 1, hi: int = MAX_DIM) -> int:
        v = self.f.get_typed(self._name(key), int, default)
        if v is None:
            raise GGUFError(f"{self.f.path}: metadata key {self._name(key)} is missing")
        if not lo <= v <= hi:
            raise self._fail(key, v, f"is out of range; expected {lo}..{hi}")
        return v

    def number(self, key: str, default: float | None = None, positive: bool = True) -> float:
        v = self.f.get_typed(self._name(key), float, default)
        if v is None:
            raise GGUFError(f"{self.f.path}: metadata key {self._name(key)} is missing")
        if not math.isfinite(v) or (positive and not v > 0):
            raise self._fail(key, v, "must be a finite number" + (" > 0" if positive else ""))
        return v

    def text(self, key: str, default: str | None = None) -> str | None:
        return self.f.get_typed(self._name(key), str, default)


def check_config(cfg: "ModelConfig", f: GGUFFile) -> None:
    """The hyperparameters against each other (what the kernels index with)."""
    def bad(what: str) -> GGUFError:
        return GGUFError(f"{f.path}: {what}; the file's metadata is inconsistent")
    k = Meta(f, cfg.arch)._name
    if cfg.n_head % cfg.n_head_kv:
        raise bad(f"{k(Keys.Attention.HEAD_COUNT)}={cfg.n_head} is not a multiple of "
                  f"{k(Keys.Attention.HEAD_COUNT_KV)}={cfg.n_head_kv}")
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise bad(f"{k(Keys.Rope.DIMENSION_COUNT)}={cfg.rope_dim} must be even and at most the head size {cfg.head_dim}")
    if cfg.n_expert and cfg.n_expert_used > cfg.n_expert:
        raise bad(f"{k(Keys.LLM.EXPERT_USED_COUNT)}={cfg.n_expert_used} exceeds {k(Keys.LLM.EXPERT_COUNT)}={cfg.n_expert}")
    if cfg.is_moe and cfg.n_expert_used < 1:
        raise bad(f"{k(Keys.LLM.EXPERT_USED_COUNT)} is missing or 0 in a model with routed experts")
    if not cfg.n_expert and "blk.0.ffn_gate_inp.weight" in f.tensors:
        raise bad(f"{k(Keys.LLM.EXPERT_COUNT)} is missing or 0 but the layers have routers")
    tokens = f.get_typed(Keys.Tokenizer.LIST, (list, np.ndarray))
    if tokens is not None and len(tokens) != cfg.n_vocab:
        raise bad(f"{Keys.Tokenizer.LIST} has {len(tokens)} tokens but token_embd.weight has {cfg.n_vocab} rows")


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def check_tensors(cfg: "ModelConfig", f: GGUFFile) -> None:
    """Every tensor the forward pass reads, with the shape (numpy order: rows last) the configuration gives it."""
    from .config import QKNorm, SharedExpert
    E, d, hd, nh, nkv = cfg.n_expert, cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_head_kv

    def need(name: str, *shape: int | None, matrix: bool = False, optional: bool = False) -> TensorRef | None:
        t = f.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise GGUFError(f"{f.path}: tensor {name} is missing")
        got = t.shape[1:] if len(shape) == 1 and len(t.shape) == 2 and t.shape[0] == 1 else t.shape
        if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise GGUFError(f"{f.path}: tensor {name} has shape {t.shape}, expected {want} from the metadata")
        if matrix and t.qtype not in MATVEC:
            raise GGUFError(f"{f.path}: tensor {name} has type {t.qtype.name}, which no kernel multiplies with")
        return t

    need("token_embd.weight", cfg.n_vocab, d, matrix=True)
    need("output_norm.weight", d)
    need("output.weight", cfg.n_vocab, d, matrix=True, optional=True)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        need(p + "attn_norm.weight", d)
        need(p + "attn_q.weight", nh * hd, d, matrix=True)
        need(p + "attn_k.weight", nkv * hd, d, matrix=True)
        need(p + "attn_v.weight", nkv * hd, d, matrix=True)
        need(p + "attn_output.weight", d, nh * hd, matrix=True)
        biases = [need(p + f"attn_{w}.bias", n, optional=True) for w, n in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd))]
        if any(biases) and not all(biases):
            raise GGUFError(f"{f.path}: layer {i} has some of attn_q/k/v.bias but not all three")
        if cfg.spec.qk_norm is QKNorm.PER_HEAD:
            need(p + "attn_q_norm.weight", hd)
            need(p + "attn_k_norm.weight", hd)
        elif cfg.spec.qk_norm is QKNorm.FULL:
            need(p + "attn_q_norm.weight", nh * hd)
            need(p + "attn_k_norm.weight", nkv * hd)
        need(p + "ffn_norm.weight", d)
        if not cfg.moe_layers[i]:
            ff = need(p + "ffn_gate.weight", None, d, matrix=True).shape[0]
            need(p + "ffn_up.weight", ff, d, matrix=True)
            need(p + "ffn_down.weight", d, ff, matrix=True)
            continue
        need(p + "ffn_gate_inp.weight", E, d)
        ff = need(p + "ffn_gate_exps.weight", E, None, d, matrix=True).shape[1]
        need(p + "ffn_up_exps.weight", E, ff, d, matrix=True)
        need(p + "ffn_down_exps.weight", E, d, ff, matrix=True)
        if cfg.spec.shared_expert is SharedExpert.SIGMOID_GATED:
            ff = need(p + "ffn_gate_shexp.weight", None, d, matrix=True).shape[0]
            need(p + "ffn_up_shexp.weight", ff, d, matrix=True)
            need(p + "ffn_down_shexp.weight", d, ff, matrix=True)
            need(p + "ffn_gate_inp_shexp.weight", d)
    beyond = sorted({int(m[1]) for name in f.tensors if (m := _BLOCK.match(name)) and int(m[1]) >= cfg.n_layer})
    if beyond:
        raise GGUFError(f"{f.path}: block_count is {cfg.n_layer} but the file has tensors of layer {beyond[0]}; "
                        "the metadata does not match the tensors")
