"""Architecture registry: how each Hugging Face family maps onto llama.cpp's GGUF names and keys.

One small class per family, found by `config.json`'s `architectures[0]`. Names come from gguf-py's
TensorNameMap and keys from its GGUFWriter helpers, so they match llama.cpp's convert_hf_to_gguf.py
(conversion/llama.py, qwen.py, olmo.py) without restating either.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import gguf
import numpy as np

from .checkpoint import Checkpoint
from .safetensors_reader import CheckpointError


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message says why and what to do."""


class Role(enum.Enum):
    FLOAT = "float"    # norms, biases, routers: always F32, as llama.cpp keeps them
    WEIGHT = "weight"  # 2-D matrices at --type
    EXPERT = "expert"  # 3-D stacked experts at --expert-type, and again at --cold-type


Loader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, float shape (last axis = row), role and how to read it in parts."""
    name: str
    shape: tuple[int, ...]
    role: Role
    parts: tuple[Loader, ...]  # concatenated along axis 0: one per expert for stacked experts, else one


# Routers stay F32 like norms (convert_hf_to_gguf.py prepare_tensors; llama-quant.cpp skips them).
_F32_TENSORS = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<xid>\d+)\.(?P<w>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<w>gate_up_proj|down_proj)(?:\.weight)?$")
_SKIPPED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attn\.bias)$")


_LAYER = re.compile(r"\.layers\.(\d+)\.")
# config.json values the converter reads: integer ones are positive and at most _MAX_INT, real ones finite and > 0
_INT_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers", "max_position_embeddings", "n_ctx",
             "n_positions", "max_length", "hidden_size", "n_embd", "dim", "intermediate_size", "n_inner",
             "hidden_dim", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "n_kv_heads",
             "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "num_experts_per_token",
             "top_k_experts", "head_dim", "vocab_size", "moe_intermediate_size", "shared_expert_intermediate_size")
_REAL_KEYS = ("rope_theta", "rotary_emb_base", "rms_norm_eps", "norm_eps")
_MAX_INT = 1 << 31


def _check_config(ckpt: Checkpoint) -> None:
    """Every config.json value the converter reads, of the right JSON type and range, before any is used."""
    cfg = ckpt.config
    if not isinstance(cfg, dict):
        raise ConvertError(f"{ckpt.dir}/config.json is a JSON {type(cfg).__name__}, not an object")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConvertError(f"{ckpt.dir}/config.json: rope_scaling must be an object, not {rope!r}")
    for where, d, keys in ((cfg, cfg, _INT_KEYS + _REAL_KEYS), ("rope", rope, ("rope_theta", "factor"))):
        for k in keys:
            v = d.get(k)
            if v is None:
                continue
            if k in _INT_KEYS:
                ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_INT
                need = f"an integer 1..{_MAX_INT}"
            else:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                need = "a finite number > 0"
            if not ok:
                raise ConvertError(f"{ckpt.dir}/config.json: {k}={v!r} must be {need}")
    mlp_only = cfg.get("mlp_only_layers")
    if mlp_only is not None and not (isinstance(mlp_only, list) and all(isinstance(i, int) for i in mlp_only)):
        raise ConvertError(f"{ckpt.dir}/config.json: mlp_only_layers must be a list of layer numbers, not {mlp_only!r}")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConvertError(f"{ckpt.dir}/config.json: architectures must be a list of names, not {archs!r}")


def _find(cfg: dict[str, Any], *keys: str) -> Any:
    """First key present with a value (TextModel.find_hparam, ignoring explicit nulls)."""
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


class Arch:
    """Common text-model conversion (TextModel in convert_hf_to_gguf.py); subclasses add their quirks."""
    hf_names: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    permute_qk: ClassVar[bool] = False  # llama's HF q/k rows are rotated-half; GGUF wants interleaved pairs
    writes_space_prefix: ClassVar[bool] = False  # LlamaModel.set_vocab also writes add_space_prefix

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.cfg = ckpt.config
        n_layer = _find(self.cfg, "n_layers", "num_hidden_layers", "n_layer", "num_layers")
        if n_layer is None:
            raise ConvertError(f"{ckpt.dir}/config.json has no num_hidden_layers")
        present = 1 + max((int(m[1]) for n in ckpt.names if (m := _LAYER.search(n))), default=-1)
        if n_layer != present:   # checked before anything is sized by it (gguf's name map is per layer)
            raise ConvertError(f"{ckpt.dir}/config.json says num_hidden_layers={n_layer} but the checkpoint holds "
                               f"{present} layers; the config does not match the weights")
        self.n_layer: int = n_layer
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, n_layer)
        self.rope = self._rope_parameters()

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def _rope_parameters(self) -> dict[str, Any]:
        # Old configs put rope_theta at the top level, newer ones in rope_parameters; read both.
        rope = dict(self.cfg.get("rope_parameters") or self.cfg.get("rope_scaling") or {})
        theta = _find(self.cfg, "rope_theta", "rotary_emb_base")
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        return rope

    # --- metadata -------------------------------------------------------------------------------------

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        """The keys TextModel.set_gguf_parameters writes, in its order."""
        c = self.cfg
        w.add_block_count(self.n_layer)
        if (n_ctx := _find(c, "max_position_embeddings", "n_ctx", "n_positions", "max_length")) is not None:
            w.add_context_length(n_ctx)
        if (n_embd := _find(c, "hidden_size", "n_embd", "dim")) is not None:
            w.add_embedding_length(n_embd)
        if (n_ff := _find(c, "intermediate_size", "n_inner", "hidden_dim")) is not None:
            w.add_feed_forward_length(n_ff)
        if (n_head := _find(c, "num_attention_heads", "n_head", "n_heads")) is not None:
            w.add_head_count(n_head)
        if (n_head_kv := _find(c, "num_key_value_heads", "n_kv_heads")) is not None:
            w.add_head_count_kv(n_head_kv)
        rope_type = self.rope.get("rope_type")
        if rope_type == "linear" and self.rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(self.rope["factor"])
        elif rope_type not in (None, "default"):
            raise ConvertError(f"rope scaling {rope_type!r} is not supported yet; supported: default, linear")
        if (theta := self.rope.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (eps := _find(c, "rms_norm_eps", "norm_eps")) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (n_expert := _find(c, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
            w.add_expert_count(n_expert)
        if (n_used := _find(c, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
            w.add_expert_used_count(n_used)
        if (head_dim := c.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)

    def write_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        """Keys a family adds after the common ones (and after general.file_type)."""

    # --- tensors --------------------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str:
        name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"tensor {hf_name} has no GGUF name for architecture {self.arch_name}; "
                               "the checkpoint does not match its config.json architectures")
        return name

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        """Per-tensor fix-ups before writing (the q/k permutation of llama-style rope)."""
        if self.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = self.cfg["num_attention_heads"]
            if hf_name.endswith("k_proj.weight"):
                n_head = self.cfg.get("num_key_value_heads") or n_head
            # LlamaModel.permute: rows (head, 2, d/2) -> (head, d/2, 2)
            return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        return x

    def _role(self, gguf_name: str, shape: tuple[int, ...]) -> Role:
        if "_exps." in gguf_name and len(shape) == 3:
            return Role.EXPERT
        if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
            return Role.FLOAT
        base = gguf_name.rsplit(".", 1)[0]
        if any(base == gguf.TENSOR_NAMES[t].format(bid=b) for t in _F32_TENSORS for b in range(self.n_layer)):
            return Role.FLOAT
        return Role.WEIGHT

    def _loader(self, hf_name: str, index: int | None = None, rows: slice | None = None) -> Loader:
        def load() -> np.ndarray:
            x = self.ckpt.load(hf_name, index)
            if rows is not None:
                x = x[rows]
            return np.ascontiguousarray(self.transform(hf_name, x))
        return load

    def plan(self) -> list[PlannedTensor]:
        """Every GGUF tensor in checkpoint order, stacked experts at the position of their first member."""
        out: list[PlannedTensor] = []
        stacks: dict[tuple[str, str], dict[int, str]] = {}
        order: list[tuple[str, str]] = []
        n_expert = _find(self.cfg, "num_local_experts", "num_experts", "n_routed_experts")
        for hf in self.ckpt.names:
            if _SKIPPED.search(hf):
                continue
            info = self.ckpt.info(hf)
            if m := _PER_EXPERT.match(hf):
                key = (m["prefix"], m["w"])
                if key not in stacks:
                    stacks[key] = {}
                    order.append(key)
                    out.append(None)  # type: ignore[arg-type]  # placeholder, filled below
                stacks[key][int(m["xid"])] = hf
                continue
            if (m := _FUSED.match(hf)) and len(info.shape) == 3:
                out.extend(self._fused_experts(hf, m["prefix"], m["w"], info.shape))
                continue
            name = self.gguf_name(hf)
            out.append(PlannedTensor(name, info.shape, self._role(name, info.shape), (self._loader(hf),)))
        it = iter(order)
        for i, p in enumerate(out):
            if p is None:
                prefix, w = next(it)
                out[i] = self._stack(prefix, w, stacks[(prefix, w)], n_expert)
        return out

    def _stack(self, prefix: str, w: str, members: dict[int, str], n_expert: int | None) -> PlannedTensor:
        n = n_expert or len(members)
        if len(members) != n or min(members) != 0 or max(members) != n - 1:   # ids are distinct: exactly 0..n-1
            missing = [i for i in range(min(n, max(members) + 2)) if i not in members][:10]
            raise ConvertError(f"{prefix}.*.{w}: expected experts 0..{n - 1}, missing {missing or 'none'}, "
                               f"found {len(members)}; the checkpoint is incomplete or num_local_experts is wrong")
        shapes = {self.ckpt.info(members[i]).shape for i in range(n)}
        if len(shapes) != 1:
            raise ConvertError(f"{prefix}.*.{w}: experts have different shapes {sorted(shapes)}")
        name = self.gguf_name(f"{prefix}.{w}.weight")
        shape = (n, *shapes.pop())
        return PlannedTensor(name, shape, Role.EXPERT, tuple(self._loader(members[i]) for i in range(n)))

    def _expert_name(self, prefix: str, part: str) -> str:
        """GGUF name of a stacked expert matrix, under the HF part name or its Mixtral alias (w1/w3/w2)."""
        alias = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[part]
        name = self.name_map.get_name(f"{prefix}.{alias}.weight", try_suffixes=(".weight",))
        return name or self.gguf_name(f"{prefix}.{part}.weight")

    def _fused_experts(self, hf: str, prefix: str, w: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        # transformers v5 may keep experts fused: gate_up_proj (n_expert, 2*n_ff, n_embd), down_proj 3-D.
        n = shape[0]
        if w == "down_proj":
            name = self._expert_name(prefix, "down_proj")
            return [PlannedTensor(name, shape, Role.EXPERT, tuple(self._loader(hf, i) for i in range(n)))]
        if shape[1] % 2:
            raise ConvertError(f"{hf}: gate_up_proj has an odd row count {shape[1]}")
        n_ff = shape[1] // 2
        out = []
        for part, rows in (("gate_proj", slice(0, n_ff)), ("up_proj", slice(n_ff, 2 * n_ff))):
            name = self._expert_name(prefix, part)
            out.append(PlannedTensor(name, (n, n_ff, shape[2]), Role.EXPERT,
                                     tuple(self._loader(hf, i, rows) for i in range(n))))
        return out


class Llama(Arch):
    """Llama, Mistral and Mixtral: GGUF arch "llama", experts as ffn_*_exps (conversion/llama.py)."""
    hf_names = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    permute_qk = True
    writes_space_prefix = True

    def write_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        if "vocab_size" not in self.cfg or "hidden_size" not in self.cfg or "num_attention_heads" not in self.cfg:
            raise ConvertError(f"{self.ckpt.dir}/config.json needs vocab_size, hidden_size and num_attention_heads")
        w.add_vocab_size(self.cfg["vocab_size"])
        rope_dim = self.cfg.get("head_dim") or self.cfg["hidden_size"] // self.cfg["num_attention_heads"]
        w.add_rope_dimension_count(rope_dim)


class Qwen2(Arch):
    hf_names = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2


class Qwen3(Arch):
    hf_names = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3


class Qwen2Moe(Arch):
    """Qwen2-MoE: routed experts plus a shared expert with its own sigmoid gate (conversion/qwen.py).
    Layers in `mlp_only_layers` are dense: their MLP is written as ffn_gate/up/down, which hotcold reads
    (a layer without a router); llama.cpp's qwen2moe expects every layer routed."""
    hf_names = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE

    def gguf_name(self, hf_name: str) -> str:
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$", hf_name)
        if m and int(m[1]) in (self.cfg.get("mlp_only_layers") or ()):
            return f"blk.{m[1]}.ffn_{m[2]}.weight"
        return super().gguf_name(hf_name)

    def write_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        if (n_ff_exp := self.cfg.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff_exp)
        if (n_ff_shexp := self.cfg.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff_shexp)


class Qwen3Moe(Qwen2Moe):
    """Qwen3-MoE: q/k norms, normalised top-k, no shared expert."""
    hf_names = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE


class Olmoe(Arch):
    """OLMoE: q/k norms over the whole projection; llama.cpp fixes its rms eps at 1e-5 (conversion/olmo.py)."""
    hf_names = ("OlmoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.OLMOE

    def write_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_layer_norm_rms_eps(1e-5)


ARCHITECTURES: dict[str, type[Arch]] = {name: cls for cls in (Llama, Qwen2, Qwen3, Qwen2Moe, Qwen3Moe, Olmoe)
                                        for name in cls.hf_names}


def arch_for(ckpt: Checkpoint) -> Arch:
    """The registered family for `architectures[0]`, or a ConvertError listing what is supported."""
    _check_config(ckpt)
    archs = ckpt.config.get("architectures") or []
    if not archs:
        raise ConvertError(f"{ckpt.dir}/config.json names no architectures")
    cls = ARCHITECTURES.get(archs[0])
    if cls is None:
        raise ConvertError(f"architecture {archs[0]} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    return cls(ckpt)


__all__ = ["ARCHITECTURES", "Arch", "CheckpointError", "ConvertError", "PlannedTensor", "Role", "arch_for"]
