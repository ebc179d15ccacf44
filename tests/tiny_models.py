"""Tiny random Hugging Face checkpoints of every supported architecture, built with transformers.

Each is saved with `save_pretrained` beside the shipped model's SentencePiece tokenizer, so that
llama.cpp's converter, hotcold's converter and transformers all read the same files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_SRC = REPO / "models" / "mixtral-trained"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# Rows of 256 let every type (K-quants included) apply without fallback.
COMMON = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _configs() -> dict[str, object]:
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**COMMON, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2),
        "qwen2moe": tf.Qwen2MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=256,
                                      shared_expert_intermediate_size=512, num_experts=4, num_experts_per_tok=2,
                                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False),
        "qwen3moe": tf.Qwen3MoeConfig(**COMMON, head_dim=64, intermediate_size=256, moe_intermediate_size=256,
                                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                      mlp_only_layers=[], norm_topk_prob=True),
        "olmoe": tf.OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=256, num_experts=4,
                                num_experts_per_tok=2),
        "llama": tf.LlamaConfig(**COMMON, intermediate_size=512),
        "qwen2": tf.Qwen2Config(**COMMON, intermediate_size=512),
        "qwen3": tf.Qwen3Config(**COMMON, head_dim=64, intermediate_size=512),
    }


HEAD_SELF = 0.08
ARCHS = ("mixtral", "qwen2moe", "qwen3moe", "olmoe", "llama", "qwen2", "qwen3")
MOE_ARCHS = ARCHS[:4]


def build(arch: str, out: Path, seed: int = 0, **config: object) -> Path:
    """Save a tiny random `arch` model with the shipped tokenizer into `out` (created); `config` overrides
    fields of its transformers config."""
    import torch
    import transformers as tf

    cfg = _configs()[arch]
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        # Small inner weights keep the random network stable (quantization noise is not amplified);
        # large router and head weights make routing and argmax decisive rather than near-ties.
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            router = name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight"))
            p.normal_(0.0, 0.5 if router else 1.0 if "embed_tokens" in name else 0.2 if "lm_head" in name else 0.02)
        # Peaked predictions, like a trained model's: the head favours a token's own embedding.
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if head is not emb:
            head.add_(HEAD_SELF * emb)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SRC / f, out / f)
    return out
