"""hotcold.convert.vocab: the tokenizer.* keys of a GGUF, as llama.cpp's convert_hf_to_gguf.py writes them.

Fast tests build tiny tokenizer files by hand and check the fields. Oracle tests run the reference
converter (`convert_hf_to_gguf.py --vocab-only`, which writes the same tokenizer keys as a full
conversion) in a subprocess and compare every tokenizer.* key, its value types and their order:
* SentencePiece: the shipped models/mixtral-trained, and a variant with added tokens and padding;
* BPE: real vocabularies rebuilt as tokenizer.json from the vocab GGUFs that ship in llama.cpp's
  source (models/ggml-vocab-*.gguf). The reference names their pre-tokenizer by hashing their
  encoding of a test string, so these cases also check the names we derive from the declaration.

The reference converter is found (or fetched) by reference_convert.source_tree(); it needs torch and
transformers. Without them the oracle tests are skipped.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import reference_convert

from hotcold.convert.vocab import (
    PRE_TOKENIZERS, Vocab, VocabError, load_vocab, pre_tokenizer_name, write_vocab,
)

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT / "models" / "mixtral-trained"
K = gguf.Keys.Tokenizer
T = gguf.TokenType
G = "\u0120"  # byte-level space

# ---- tokenizer.json pre-tokenizers as the real models declare them ---------------------------
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
NFC = {"type": "NFC"}


def split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def sequence(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


def bare_byte_level(trim_offsets: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": False}


# name -> (normalizer, pre_tokenizer): openai-community/gpt2, allenai/OLMoE (GPT-NeoX-20B's),
# Qwen/Qwen1.5..Qwen3, meta-llama/Meta-Llama-3-8B
REAL_PRE = {
    "gpt-2": (None, BYTE_LEVEL),
    "olmo": (NFC, BYTE_LEVEL),
    "qwen2": (NFC, sequence(split(QWEN2_REGEX), bare_byte_level(False))),
    "llama-bpe": (None, sequence(split(LLAMA3_REGEX), bare_byte_level(True))),
}


# ---- helpers -----------------------------------------------------------------------------------

_NUMERIC = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
            gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
            gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "<u8",
            gguf.GGUFValueType.INT64: "<i8", gguf.GGUFValueType.FLOAT64: "<f8"}


def read_kv(path: Path) -> dict[str, tuple[list[int], Any]]:
    """A GGUF's metadata, in file order: key -> (value types, value), as GGUFReader's fields give them.

    GGUFReader takes tens of seconds on the 100k-token vocabularies of the oracle tests; this reads
    only the key/value section (checked against GGUFReader in test_read_kv_agrees_with_gguf_reader).
    """
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def scalar(t: int) -> Any:
        nonlocal pos
        if t == gguf.GGUFValueType.STRING:
            return string()
        dt = np.dtype(_NUMERIC[gguf.GGUFValueType(t)])
        pos += dt.itemsize
        return np.frombuffer(data, dt, 1, pos - dt.itemsize)[0].item()

    assert take("<I") == gguf.GGUF_MAGIC and take("<I") == 3
    take("<Q")  # tensor count
    out: dict[str, tuple[list[int], Any]] = {}
    for _ in range(take("<Q")):
        key, t = string(), take("<I")
        if t != gguf.GGUFValueType.ARRAY:
            out[key] = ([t], scalar(t))
            continue
        et, n = take("<I"), take("<Q")
        if et == gguf.GGUFValueType.STRING:
            out[key] = ([t, et], [string() for _ in range(n)])
        else:
            dt = np.dtype(_NUMERIC[gguf.GGUFValueType(et)])
            out[key] = ([t, et], np.frombuffer(data, dt, n, pos).tolist())
            pos += dt.itemsize * n
    return out


def tokenizer_kv(path: Path) -> dict[str, tuple[list[int], Any]]:
    """Every tokenizer.* key of a GGUF, in file order, with its value types and value."""
    return {k: v for k, v in read_kv(path).items() if k.startswith("tokenizer.")}


def write_only_vocab(model_dir: Path, out: Path, vocab_size: int | None, arch: str = "llama",
                     **kwargs: Any) -> Path:
    vocab = load_vocab(model_dir, vocab_size)
    writer = gguf.GGUFWriter(str(out), arch)
    write_vocab(writer, vocab, model_dir, len(vocab.tokens), **kwargs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return out


def write_bpe(d: Path, *, vocab: dict[str, int], merges: list[Any], added: list[dict[str, Any]] = (),
              normalizer: dict[str, Any] | None = None, pre: dict[str, Any] | None = BYTE_LEVEL,
              post: dict[str, Any] | None = BYTE_LEVEL, config: dict[str, Any] | None = None,
              model_type: str = "BPE") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    added_tokens = [{"id": a["id"], "content": a["content"], "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": a.get("normalized", False), "special": a["special"]}
                    for a in added]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
           "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post,
           "decoder": {"type": "ByteLevel"},
           "model": {"type": model_type, "vocab": vocab, "merges": merges}}
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


TINY_VOCAB = {"a": 0, "b": 1, "c": 2, G: 3, "ab": 4, G + "a": 5, "<|endoftext|>": 6}
TINY_ADDED = [
    {"id": 6, "content": "<|endoftext|>", "special": True},
    {"id": 7, "content": "<tool>", "special": False},
    {"id": 8, "content": "<|im_start|>", "special": False},   # looks special -> CONTROL
    {"id": 9, "content": "\u2581x\u2581", "special": False},  # user-defined: spaces pre-normalized
]
TINY_CONFIG = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": True,
               "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def tiny_bpe(d: Path, name: str = "gpt-2", **kwargs: Any) -> Path:
    normalizer, pre = REAL_PRE[name]
    args: dict[str, Any] = dict(vocab=TINY_VOCAB, merges=[["a", "b"], [G, "a"]], added=TINY_ADDED,
                                normalizer=normalizer, pre=pre, config=TINY_CONFIG)
    args.update(kwargs)
    return write_bpe(d, **args)


# ---- SentencePiece -----------------------------------------------------------------------------

def test_sentencepiece_fields() -> None:
    v = load_vocab(MIXTRAL, 4096)
    assert (v.model, v.pre, v.merges, v.add_space_prefix) == ("llama", "default", None, None)
    assert len(v.tokens) == len(v.scores) == len(v.token_types) == 4096
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert v.token_types[:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE]
    assert v.tokens[3] == "<0x00>" and T.NORMAL in v.token_types
    with pytest.raises(FrozenInstanceError):
        v.model = "gpt2"  # type: ignore[misc]


def spm_variant(d: Path) -> Path:
    """mixtral-trained's tokenizer.model with added tokens of every kind, padded to 4104 ids."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "config.json"):
        shutil.copy(MIXTRAL / name, d / name)
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 4104
    (d / "config.json").write_text(json.dumps(config))
    (d / "added_tokens.json").write_text(json.dumps({"<extra>": 4096, "<|im_start|>": 4097, "<far>": 5000}))
    decoder = {
        "4098": {"content": "<tool>", "special": False},
        "4099": {"content": "\u2581hi\u2581there", "special": False},
        "4100": {"content": "<|im_end|>", "special": False},
        "4101": {"content": "<mask>", "special": False},
        "4102": {"content": "<ctl>", "special": True},
        "100": {"content": "<override>", "special": True},
        "9000": {"content": "<beyond>", "special": True},
    }
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True,
        "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": decoder, "chat_template": "{{ messages }}"}))
    return d


def test_sentencepiece_added_tokens_and_padding(tmp_path: Path) -> None:
    v = load_vocab(spm_variant(tmp_path / "spm"), 4104)
    assert v.tokens[4096:] == ["<extra>", "<|im_start|>", "<tool>", " hi there", "<|im_end|>", "<mask>",
                               "<ctl>", "[PAD4103]"]
    assert v.token_types[4096:] == [T.USER_DEFINED] * 4 + [T.CONTROL] * 3 + [T.UNUSED]
    assert v.scores[4096:] == [-1000.0] * 7 + [-10000.0]
    assert (v.tokens[100], v.token_types[100], v.scores[100]) == ("<override>", T.CONTROL, -1000.0)
    assert v.add_space_prefix is False
    # a vocab_size below the model's keeps the first ids
    assert load_vocab(MIXTRAL, 100).tokens == load_vocab(MIXTRAL, 4096).tokens[:100]


def test_sentencepiece_written(tmp_path: Path) -> None:
    kv = tokenizer_kv(write_only_vocab(MIXTRAL, tmp_path / "v.gguf", 4096))
    assert list(kv) == [K.MODEL, K.PRE, K.LIST, K.SCORES, K.TOKEN_TYPE, K.BOS_ID, K.EOS_ID,
                        K.ADD_BOS, K.ADD_EOS, K.CHAT_TEMPLATE]
    assert kv[K.MODEL][1] == "llama" and kv[K.PRE][1] == "default"
    assert (kv[K.BOS_ID][1], kv[K.EOS_ID][1], kv[K.ADD_BOS][1], kv[K.ADD_EOS][1]) == (1, 2, True, False)


def test_read_kv_agrees_with_gguf_reader(tmp_path: Path) -> None:
    for path in (write_only_vocab(MIXTRAL, tmp_path / "spm.gguf", 4096),
                 write_only_vocab(tiny_bpe(tmp_path / "bpe"), tmp_path / "bpe.gguf", 12)):
        reader = gguf.GGUFReader(path)
        assert read_kv(path) == {k: (list(f.types), f.contents()) for k, f in reader.fields.items()
                                 if not k.startswith("GGUF.")}


# ---- BPE -----------------------------------------------------------------------------------------

def test_bpe_fields(tmp_path: Path) -> None:
    v = load_vocab(tiny_bpe(tmp_path / "gpt2"), 12)
    assert (v.model, v.pre, v.scores) == ("gpt2", "gpt-2", None)
    assert v.tokens == ["a", "b", "c", G, "ab", G + "a", "<|endoftext|>", "<tool>", "<|im_start|>",
                        " x ", "[PAD10]", "[PAD11]"]
    assert v.token_types == [T.NORMAL] * 6 + [T.CONTROL, T.USER_DEFINED, T.CONTROL, T.USER_DEFINED,
                                              T.UNUSED, T.UNUSED]
    assert v.merges == ["a b", f"{G} a"]
    # without a vocab_size: the tokenizer's own size
    assert len(load_vocab(tmp_path / "gpt2", None).tokens) == 10


def test_bpe_merges_with_spaces_and_merges_txt(tmp_path: Path) -> None:
    # pair-form merges holding a space are encoded as gguf-py does (space -> U+0120)
    v = load_vocab(tiny_bpe(tmp_path / "sp", merges=[["a b", "c"]]), None)
    assert v.merges == [f"a{G}b c"]
    # no merges in tokenizer.json: merges.txt, as SpecialVocab falls back to
    d = tiny_bpe(tmp_path / "txt", merges=[])
    (d / "merges.txt").write_text("#version: 0.2\na b\nĠ a\n", encoding="utf-8")
    assert load_vocab(d, None).merges == ["a b", f"{G} a"]


@pytest.mark.parametrize("name", list(REAL_PRE))
def test_pre_tokenizer_names(tmp_path: Path, name: str) -> None:
    assert load_vocab(tiny_bpe(tmp_path / name, name), None).pre == name
    assert {r.name for r in PRE_TOKENIZERS} == set(REAL_PRE)


@pytest.mark.parametrize("normalizer, pre", [
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}),
    (None, {**BYTE_LEVEL, "add_prefix_space": True}),
    (None, None),
    (NFC, sequence(split(LLAMA3_REGEX), bare_byte_level(True))),       # Llama-3 regex, NFC added
    (None, sequence(split(r"\p{N}{1,3}"), split(QWEN2_REGEX), bare_byte_level(False))),  # extra split
    ({"type": "Sequence", "normalizers": [NFC, {"type": "Lowercase"}]}, BYTE_LEVEL),
], ids=["metaspace", "prefix-space", "none", "llama3+nfc", "digits-split", "lowercase"])
def test_unmappable_pre_tokenizer(tmp_path: Path, normalizer: Any, pre: Any) -> None:
    d = tiny_bpe(tmp_path / "x", normalizer=normalizer, pre=pre)
    with pytest.raises(VocabError, match="unsupported BPE pre-tokenizer") as err:
        load_vocab(d, None)
    for rule in PRE_TOKENIZERS:
        assert repr(rule.name) in str(err.value)


def test_pre_tokenizer_name_directly() -> None:
    assert pre_tokenizer_name({"normalizer": None, "pre_tokenizer": BYTE_LEVEL}) == "gpt-2"
    with pytest.raises(VocabError):
        pre_tokenizer_name({})


def test_bpe_written(tmp_path: Path) -> None:
    d = tiny_bpe(tmp_path / "gpt2")
    kv = tokenizer_kv(write_only_vocab(d, tmp_path / "v.gguf", 12, arch="qwen2moe"))
    assert list(kv) == [K.MODEL, K.PRE, K.LIST, K.TOKEN_TYPE, K.MERGES, K.BOS_ID, K.EOS_ID,
                        K.ADD_BOS, K.ADD_EOS, K.CHAT_TEMPLATE]
    assert kv[K.MODEL][1] == "gpt2" and kv[K.PRE][1] == "gpt-2"
    assert kv[K.MERGES][1] == ["a b", f"{G} a"]
    assert kv[K.LIST][1][:7] == list(TINY_VOCAB)
    # a ByteLevel post-processor sets add_bos/add_eos False and wins over tokenizer_config's
    # add_bos_token, as llama.cpp's gguf-py does
    assert (kv[K.BOS_ID][1], kv[K.EOS_ID][1], kv[K.ADD_BOS][1], kv[K.ADD_EOS][1]) == (6, 6, False, False)
    assert kv[K.CHAT_TEMPLATE][1] == TINY_CONFIG["chat_template"]


def test_bpe_add_flags_without_post_processor(tmp_path: Path) -> None:
    d = tiny_bpe(tmp_path / "gpt2", post=None)
    kv = tokenizer_kv(write_only_vocab(d, tmp_path / "v.gguf", None))
    assert kv[K.ADD_BOS][1] is True and K.ADD_EOS not in kv


def test_bpe_template_post_processor(tmp_path: Path) -> None:
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {}}
    post = {"type": "Sequence", "processors": [{"type": "ByteLevel", "add_prefix_space": True,
                                                "trim_offsets": False, "use_regex": True}, template]}
    config = {**TINY_CONFIG, "add_bos_token": False}
    d = tiny_bpe(tmp_path / "l3", "llama-bpe", post=post, config=config)
    kv = tokenizer_kv(write_only_vocab(d, tmp_path / "v.gguf", None))
    assert kv[K.PRE][1] == "llama-bpe"
    assert (kv[K.ADD_BOS][1], kv[K.ADD_EOS][1]) == (True, False)


# ---- errors ----------------------------------------------------------------------------------------

def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(VocabError) as err:
        load_vocab(tmp_path, 10)
    assert str(tmp_path) in str(err.value)
    assert "tokenizer.model" in str(err.value) and "tokenizer.json" in str(err.value)


def test_not_bpe_or_malformed(tmp_path: Path) -> None:
    d = tiny_bpe(tmp_path / "wp", model_type="WordPiece")
    with pytest.raises(VocabError, match="not BPE"):
        load_vocab(d, None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(VocabError, match="cannot read"):
        load_vocab(tmp_path / "bad", None)
    with pytest.raises(VocabError, match="beyond vocab_size"):
        load_vocab(tiny_bpe(tmp_path / "small"), 5)


def test_write_checks_size(tmp_path: Path) -> None:
    v = load_vocab(tiny_bpe(tmp_path / "gpt2"), None)
    with pytest.raises(VocabError):
        write_vocab(gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama"), v, tmp_path / "gpt2", 99)
    with pytest.raises(VocabError):
        Vocab("gpt2", "gpt-2", ["a"], None, [], None)


# ---- oracle: llama.cpp's convert_hf_to_gguf.py -------------------------------------------------------

@pytest.fixture(scope="module")
def converter() -> Path:
    """The llama.cpp source tree (reference_convert finds or fetches it)."""
    for module in ("torch", "transformers", "sentencepiece"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the reference converter needs {module}")
    tree = reference_convert.source_tree()
    if tree is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set HOTCOLD_LLAMA_CPP_SRC)")
    return tree


def run_reference(tree: Path, model_dir: Path, out: Path) -> Path:
    try:
        return reference_convert.convert(model_dir, out, "f32", vocab_only=True)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"reference converter failed on {model_dir}:\n{e.stderr.decode()[-4000:]}")


def assert_same_tokenizer_keys(mine: Path, ref: Path) -> None:
    a, b = tokenizer_kv(mine), tokenizer_kv(ref)
    assert list(a) == list(b)
    for key in b:
        assert a[key] == b[key], key


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["mixtral-trained", "added-tokens"])
def test_sentencepiece_matches_reference(converter: Path, tmp_path: Path, variant: str) -> None:
    d = MIXTRAL if variant == "mixtral-trained" else spm_variant(tmp_path / "spm")
    n = json.loads((d / "config.json").read_text())["vocab_size"]
    # MixtralForCausalLM converts as LlamaModel, which also writes add_space_prefix
    mine = write_only_vocab(d, tmp_path / "mine.gguf", n, llama_space_prefix=True)
    assert_same_tokenizer_keys(mine, run_reference(converter, d, tmp_path / "ref.gguf"))


PAD = re.compile(r"\[PAD\d+\]")


def rebuild_tokenizer(vocab_gguf: Path, name: str, d: Path) -> int:
    """A tokenizer.json (and config) of a real BPE vocabulary from llama.cpp's vocab GGUF.

    The pre-tokenizer, normalizer and post-processor are the real model's, written with the
    `tokenizers` API; tokens, ids, token types and merges come from the GGUF.
    """
    tk = pytest.importorskip("tokenizers")
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    kv = {k: v for k, (_, v) in read_kv(vocab_gguf).items()}
    tokens, types, merges = kv[K.LIST], kv[K.TOKEN_TYPE], kv[K.MERGES]
    vocab = {t: i for i, t in enumerate(tokens) if not PAD.fullmatch(t)}
    assert len(vocab) == sum(1 for t in tokens if not PAD.fullmatch(t))
    model = BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], ignore_merges=name == "llama-bpe")
    tokenizer = tk.Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if name in ("gpt-2", "olmo"):
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = QWEN2_REGEX if name == "qwen2" else LLAMA3_REGEX
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tk.Regex(regex), behavior="isolated"), byte_level])
    if name in ("olmo", "qwen2"):
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # every token is in the BPE vocab already, so these keep their ids
    tokenizer.add_special_tokens([tk.AddedToken(t, normalized=False, special=True)
                                  for t, typ in zip(tokens, types) if typ == T.CONTROL])
    tokenizer.add_tokens([tk.AddedToken(t, normalized=True, special=False)
                          for t, typ in zip(tokens, types) if typ == T.USER_DEFINED and not PAD.fullmatch(t)])
    bos, eos = tokens[kv[K.BOS_ID]], tokens[kv[K.EOS_ID]]
    if name == "llama-bpe":  # Meta-Llama-3's post-processor adds <|begin_of_text|>
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, vocab[bos])])])
    d.mkdir(parents=True)
    tokenizer.save(str(d / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if K.CHAT_TEMPLATE in kv:
        config["chat_template"] = kv[K.CHAT_TEMPLATE]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    # Qwen2MoeForCausalLM converts its vocab with _set_vocab_gpt2 (TextModel.set_vocab)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": len(tokens),
        "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
        "num_key_value_heads": 1, "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
        "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8}))
    return len(tokens)


@pytest.mark.oracle
@pytest.mark.parametrize("name, source", [("gpt-2", "gpt-2"), ("olmo", "gpt-neox"), ("qwen2", "qwen2"),
                                          ("llama-bpe", "llama-bpe")])
def test_bpe_matches_reference(converter: Path, tmp_path: Path, name: str, source: str) -> None:
    vocab_gguf = converter / "models" / f"ggml-vocab-{source}.gguf"
    if not vocab_gguf.is_file():
        pytest.skip(f"{vocab_gguf} not found")
    d = tmp_path / source
    n = rebuild_tokenizer(vocab_gguf, name, d)
    mine = write_only_vocab(d, tmp_path / "mine.gguf", n, arch="qwen2moe")
    ref = run_reference(converter, d, tmp_path / "ref.gguf")
    assert tokenizer_kv(ref)[K.PRE][1] == name  # the reference's hash names what we derived
    assert_same_tokenizer_keys(mine, ref)
