"""Micro GGUF models of every supported architecture, written directly (a 48-token letter vocabulary).

Small enough for Numba's CUDA simulator, which runs each GPU thread as a Python thread: the GPU forward
pass is checked against the CPU engine on these (the CPU engine itself is checked against transformers
and llama.cpp on tests/tiny_models.py).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from hotcold.quant import QType, quantize

V, H, N_HEAD, N_KV, HD, F, F_DENSE, F_SHEXP, E, K, L = 48, 32, 2, 1, 16, 32, 32, 64, 4, 2, 2

# variant: (GGUF architecture, experts, q/k/v biases, q/k norm: None | "head" | "full", shared expert)
VARIANTS = {
    "mixtral": ("llama", True, False, None, False),
    "qwen2moe": ("qwen2moe", True, True, None, True),
    "qwen3moe": ("qwen3moe", True, False, "head", False),
    "olmoe": ("olmoe", True, False, "full", False),
    "llama": ("llama", False, False, None, False),
    "qwen2": ("qwen2", False, True, None, False),
    "qwen3": ("qwen3", False, False, "head", False),
}


def write(variant: str, out: Path, qtype: QType = QType.Q8_0, seed: int = 0) -> Path:
    """A random `variant` model with its matrices in `qtype` (norms and routers F32) at `out`."""
    arch, moe, bias, qk_norm, shexp = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F if moe else F_DENSE)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if moe:
        w.add_expert_count(E)
        w.add_expert_used_count(K)
    # a SentencePiece vocabulary of single letters, enough for the API to load (tests pass token ids)
    pieces = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(V - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(V - 3)])
    w.add_token_types([2, 3, 3] + [1] * (V - 3))

    def mat(*shape: int, std: float = 0.2) -> tuple[np.ndarray, QType]:
        a = (rng.standard_normal(shape) * std).astype(np.float32)
        return quantize(a.reshape(-1, shape[-1]), qtype).reshape(*shape[:-1], -1), qtype

    def vec(n: int, mean: float = 1.0, std: float = 0.1) -> tuple[np.ndarray, QType]:
        return (mean + rng.standard_normal(n) * std).astype(np.float32), QType.F32

    emb = rng.standard_normal((V, H)).astype(np.float32)
    t: dict[str, tuple[np.ndarray, QType]] = {"token_embd.weight": (emb, QType.F32)}
    for i in range(L):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = vec(H)
        t[p + "attn_q.weight"] = mat(N_HEAD * HD, H)
        t[p + "attn_k.weight"] = mat(N_KV * HD, H)
        t[p + "attn_v.weight"] = mat(N_KV * HD, H)
        t[p + "attn_output.weight"] = mat(H, N_HEAD * HD)
        if bias:
            for n, rows in (("q", N_HEAD * HD), ("k", N_KV * HD), ("v", N_KV * HD)):
                t[p + f"attn_{n}.bias"] = vec(rows, 0.0, 0.1)
        if qk_norm:
            t[p + "attn_q_norm.weight"] = vec(HD if qk_norm == "head" else N_HEAD * HD)
            t[p + "attn_k_norm.weight"] = vec(HD if qk_norm == "head" else N_KV * HD)
        t[p + "ffn_norm.weight"] = vec(H)
        if moe:
            t[p + "ffn_gate_inp.weight"] = ((rng.standard_normal((E, H)) * 0.5).astype(np.float32), QType.F32)
            t[p + "ffn_gate_exps.weight"] = mat(E, F, H)
            t[p + "ffn_up_exps.weight"] = mat(E, F, H)
            t[p + "ffn_down_exps.weight"] = mat(E, H, F)
        else:
            t[p + "ffn_gate.weight"] = mat(F_DENSE, H)
            t[p + "ffn_up.weight"] = mat(F_DENSE, H)
            t[p + "ffn_down.weight"] = mat(H, F_DENSE)
        if shexp:
            t[p + "ffn_gate_inp_shexp.weight"] = vec(H, 0.0, 0.5)
            t[p + "ffn_gate_shexp.weight"] = mat(F_SHEXP, H)
            t[p + "ffn_up_shexp.weight"] = mat(F_SHEXP, H)
            t[p + "ffn_down_shexp.weight"] = mat(H, F_SHEXP)
    t["output_norm.weight"] = vec(H)
    t["output.weight"] = ((rng.standard_normal((V, H)) * 0.2 + 0.08 * emb).astype(np.float32), QType.F32)
    for name, (data, qt) in t.items():
        w.add_tensor(name, data, raw_dtype=None if qt == QType.F32 else gguf.GGMLQuantizationType(int(qt)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
