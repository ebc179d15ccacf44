"""The model configuration: a frozen dataclass built once from GGUF metadata and tensor shapes.

Per-architecture behaviour is data, not code paths: each supported GGUF architecture maps to an
ArchSpec (rope style, q/k norm, gating, shared expert, activation, attention kind), as llama.cpp's
src/models/<arch>.cpp set them. A new family is a new ArchSpec; a new kind of gating or attention is a
new enum member and one branch where it is computed (engine/moe.py, engine/model.py), and only what
data cannot say goes into an engine/models/<arch>.py (none is needed yet).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from gguf import Keys

from .gguf_file import GGUFError, GGUFFile
from .validate import MAX_CTX, MAX_LAYERS, Meta, check_config, check_tensors


class RopeStyle(enum.Enum):
    NORM = "norm"  # rotate adjacent pairs (x0, x1): llama, whose q/k rows the converter permuted
    NEOX = "neox"  # rotate halves (x_i, x_{i+d/2}): qwen2/3, qwen2/3-moe, olmoe


class QKNorm(enum.Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # RMSNorm over each head's dims (qwen3, qwen3moe)
    FULL = "full"          # RMSNorm over the whole q / k projection (olmoe)


class Gating(enum.Enum):
    """How router logits become expert scores (llama.cpp's llama_expert_gating_func_type)."""
    SOFTMAX = "softmax"    # softmax over all experts; top-k by probability; weights are the probabilities


class SharedExpert(enum.Enum):
    NONE = "none"
    SIGMOID_GATED = "sigmoid_gated"  # qwen2moe: one always-on expert scaled by sigmoid(w . x)


class Activation(enum.Enum):
    """The gated FFN's activation: down(act(gate x) * up x)."""
    SILU = "silu"          # SwiGLU (llama, mixtral, qwen, olmoe)


class Attention(enum.Enum):
    """The attention kind, which also chooses the KV cache's layout (engine/context.py)."""
    GQA = "gqa"            # multi-head attention over grouped K/V heads: cache (n_ctx, n_head_kv, head_dim)


class CacheType(enum.Enum):
    """What the KV cache stores keys or values as (llama.cpp's --cache-type-k / --cache-type-v)."""
    F16 = "f16"            # llama.cpp's default: half the memory; attention rounds as ggml does
    F32 = "f32"


@dataclass(frozen=True)
class ArchSpec:
    rope: RopeStyle
    qk_norm: QKNorm
    norm_topk: bool = False                      # renormalise the selected experts' weights to sum to 1
    gating: Gating = Gating.SOFTMAX
    shared_expert: SharedExpert = SharedExpert.NONE
    activation: Activation = Activation.SILU
    attention: Attention = Attention.GQA


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(RopeStyle.NORM, QKNorm.NONE, norm_topk=True),
    "qwen2": ArchSpec(RopeStyle.NEOX, QKNorm.NONE),
    "qwen3": ArchSpec(RopeStyle.NEOX, QKNorm.PER_HEAD),
    "qwen2moe": ArchSpec(RopeStyle.NEOX, QKNorm.NONE, shared_expert=SharedExpert.SIGMOID_GATED),
    "qwen3moe": ArchSpec(RopeStyle.NEOX, QKNorm.PER_HEAD, norm_topk=True),
    "olmoe": ArchSpec(RopeStyle.NEOX, QKNorm.FULL),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    spec: ArchSpec
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rope_base: float
    rope_dim: int
    rope_freq_scale: float
    rms_eps: float
    n_expert: int          # 0 for a dense model
    n_expert_used: int
    moe_layers: tuple[bool, ...] = ()  # per layer: it has a router (a leading dense layer has none)

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelConfig":
        """Read and check: every value typed and in range, the values consistent with each other and with
        every tensor's shape (engine/validate.py), so the kernels can trust the result."""
        arch = f.get_typed(Keys.General.ARCHITECTURE, str)
        if arch not in ARCHS:
            raise GGUFError(f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
        m = Meta(f, arch)
        n_embd = m.integer(Keys.LLM.EMBEDDING_LENGTH)
        n_head = m.integer(Keys.Attention.HEAD_COUNT)
        head_dim = m.integer(Keys.Attention.KEY_LENGTH, max(n_embd // n_head, 1))
        if m.integer(Keys.Attention.VALUE_LENGTH, head_dim) != head_dim:
            raise GGUFError(f"{f.path}: value_length differs from key_length {head_dim}; not supported yet")
        emb = f.tensors.get("token_embd.weight")
        if emb is None:
            raise GGUFError(f"{f.path}: tensor token_embd.weight is missing")
        if len(emb.shape) != 2:
            raise GGUFError(f"{f.path}: tensor token_embd.weight has shape {emb.shape}, expected (n_vocab, n_embd)")
        scale_type = m.text(Keys.Rope.SCALING_TYPE, "none")
        if scale_type not in ("none", "linear"):
            raise GGUFError(f"{f.path}: rope scaling {scale_type!r} is not supported yet (none, linear are)")
        factor = m.number(Keys.Rope.SCALING_FACTOR, 1.0) if scale_type == "linear" else 1.0
        n_layer = m.integer(Keys.LLM.BLOCK_COUNT, hi=MAX_LAYERS)
        n_expert = m.integer(Keys.LLM.EXPERT_COUNT, 0, lo=0)
        moe_layers = tuple(n_expert > 0 and f"blk.{i}.ffn_gate_inp.weight" in f.tensors for i in range(n_layer))
        cfg = cls(
            arch=arch, spec=ARCHS[arch], n_vocab=emb.shape[0], n_embd=n_embd,
            n_layer=n_layer, n_head=n_head,
            n_head_kv=m.integer(Keys.Attention.HEAD_COUNT_KV, n_head), head_dim=head_dim,
            n_ctx_train=m.integer(Keys.LLM.CONTEXT_LENGTH, 4096, hi=MAX_CTX),
            rope_base=m.number(Keys.Rope.FREQ_BASE, 10000.0),
            rope_dim=m.integer(Keys.Rope.DIMENSION_COUNT, head_dim), rope_freq_scale=1.0 / factor,
            rms_eps=m.number(Keys.Attention.LAYERNORM_RMS_EPS),
            n_expert=n_expert, n_expert_used=m.integer(Keys.LLM.EXPERT_USED_COUNT, 0, lo=0),
            moe_layers=moe_layers,
        )
        check_config(cfg, f)
        check_tensors(cfg, f)
        return cfg
