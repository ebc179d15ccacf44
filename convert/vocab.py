"""Tokenizer part of the HF -> GGUF converter: the `tokenizer.*` keys, as llama.cpp writes them.

Reference: llama.cpp `convert_hf_to_gguf.py` (`conversion/base.py`, TextModel) and gguf-py's
`SpecialVocab`. Two vocab kinds are handled, chosen like LlamaModel/Qwen2Model.set_vocab do:

* `tokenizer.model` present -> SentencePiece, model "llama", pre "default"
  (`_set_vocab_sentencepiece` / `_create_vocab_sentencepiece`);
* else `tokenizer.json` with a BPE model -> model "gpt2" with merges (`_set_vocab_gpt2` /
  `get_vocab_base`).

llama.cpp names the BPE pre-tokenizer by hashing a known model's encoding of a test string
(`get_vocab_base_pre`); here the name is derived from the pre-tokenizer that tokenizer.json
declares, through the small table `PRE_TOKENIZERS`. What it cannot map is refused.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"


class VocabError(ValueError):
    """The tokenizer files are missing, malformed, or of a kind this converter cannot map."""


@dataclass(frozen=True)
class Vocab:
    model: str                      # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (BPE)
    pre: str | None                 # tokenizer.ggml.pre ("default" for SentencePiece, as the reference)
    tokens: list[str]
    scores: list[float] | None      # SentencePiece only
    token_types: list[int]          # gguf.TokenType values
    merges: list[str] | None        # BPE only, "a b" strings as gguf-py's SpecialVocab loads them
    add_space_prefix: bool | None = None  # tokenizer_config's add_prefix_space, if it sets one

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.token_types) != n or (self.scores is not None and len(self.scores) != n):
            raise VocabError("tokens, scores and token types differ in length")


# --- BPE pre-tokenizer names -------------------------------------------------------------------
# A tokenizer.json pre-tokenizer is reduced to a signature: its normalizer's type and the steps of
# its pre_tokenizer, ("ByteLevel", add_prefix_space, use_regex) or ("Split", regex, behavior,
# invert). The names are those get_vocab_base_pre gives the reference models' hashes; llama.cpp
# (src/llama-vocab.cpp) picks its split regexes by that name.

_BYTE_LEVEL_GPT2 = ("ByteLevel", False, True)     # ByteLevel applying GPT-2's own split regex
_BYTE_LEVEL_BARE = ("ByteLevel", False, False)    # ByteLevel after an explicit Split
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

Signature = tuple[str | None, tuple[tuple[Any, ...], ...]]


@dataclass(frozen=True)
class PreTokenizerRule:
    name: str
    normalizer: str | None
    steps: tuple[tuple[Any, ...], ...]
    example: str  # the model whose hash get_vocab_base_pre maps to `name`


PRE_TOKENIZERS: tuple[PreTokenizerRule, ...] = (
    PreTokenizerRule("gpt-2", None, (_BYTE_LEVEL_GPT2,), "openai-community/gpt2"),
    # GPT-NeoX-20B's tokenizer (OLMo, OLMoE) differs from GPT-2's only by its NFC normalizer; the
    # reference hashes it to "olmo" (its builtin gpt-neox vocab says "mpt"); llama.cpp splits "gpt-2",
    # "mpt" and "olmo" with one regex.
    PreTokenizerRule("olmo", "NFC", (_BYTE_LEVEL_GPT2,), "allenai/OLMo-1.7-7B-hf (OLMoE)"),
    PreTokenizerRule("qwen2", "NFC", (("Split", _QWEN2_REGEX, "Isolated", False), _BYTE_LEVEL_BARE),
                     "Qwen/Qwen1.5-7B (Qwen2, Qwen3 and their MoE)"),
    PreTokenizerRule("llama-bpe", None, (("Split", _LLAMA3_REGEX, "Isolated", False), _BYTE_LEVEL_BARE),
                     "meta-llama/Meta-Llama-3-8B"),
)


def _normalizer_kind(normalizer: dict[str, Any] | None) -> str | None:
    if not normalizer:
        return None
    if normalizer.get("type") == "Sequence":
        return "Sequence(" + ",".join(str(_normalizer_kind(n)) for n in normalizer.get("normalizers", [])) + ")"
    return str(normalizer.get("type"))


def _step(pre: dict[str, Any]) -> tuple[Any, ...]:
    kind = pre.get("type")
    if kind == "ByteLevel":
        return ("ByteLevel", bool(pre.get("add_prefix_space", True)), bool(pre.get("use_regex", True)))
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else pattern
        return ("Split", regex, pre.get("behavior"), bool(pre.get("invert", False)))
    return (str(kind), json.dumps(pre, sort_keys=True))


def pre_tokenizer_signature(tokenizer_json: dict[str, Any]) -> Signature:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else ([pre] if pre else [])
    return _normalizer_kind(tokenizer_json.get("normalizer")), tuple(_step(s) for s in steps)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The tokenizer.ggml.pre name for a tokenizer.json, or VocabError listing what is supported."""
    normalizer, steps = pre_tokenizer_signature(tokenizer_json)
    for rule in PRE_TOKENIZERS:
        if rule.normalizer == normalizer and rule.steps == steps:
            return rule.name
    supported = "; ".join(f"{r.name!r} ({r.example})" for r in PRE_TOKENIZERS)
    raise VocabError(
        f"unsupported BPE pre-tokenizer (normalizer {normalizer}, steps {list(steps)}): "
        f"supported are {supported}")


# --- loading -----------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise VocabError(f"cannot read {path}: {e}") from e


def does_token_look_special(token: str) -> bool:
    """Added tokens that ought to be CONTROL even when not marked special (base.py does_token_look_special)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _load_sentencepiece(model_dir: Path, vocab_size: int | None) -> Vocab:
    # base.py _create_vocab_sentencepiece
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_dir / SPM_FILE))
    except (OSError, RuntimeError) as e:
        raise VocabError(f"cannot load {model_dir / SPM_FILE}: {e}") from e
    n = vocab_size or sp.vocab_size()
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [int(T.UNUSED)] * n
    for i in range(min(n, sp.vocab_size())):
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(kind)
    if sp.vocab_size() > n:
        logger.warning("ignoring tokens from id %d: vocab_size is %d", n, n)

    if (added_file := model_dir / ADDED_TOKENS_FILE).is_file():
        for text, i in _read_json(added_file).items():
            if i < n:
                tokens[i], scores[i], types[i] = text, -1000.0, int(T.USER_DEFINED)

    config = _read_json(cfg) if (cfg := model_dir / CONFIG_FILE).is_file() else {}
    for key, data in config.get("added_tokens_decoder", {}).items():
        i, text = int(key), data["content"]
        if i >= n:
            continue
        if data.get("special") or does_token_look_special(text):
            types[i] = int(T.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
            types[i] = int(T.USER_DEFINED)
        tokens[i], scores[i] = text, -1000.0
    # (the reference's final "pad to vocab_size" branch cannot trigger: the lists start at vocab_size)
    return Vocab("llama", "default", tokens, scores, types, None, _space_prefix(config))


def _space_prefix(config: dict[str, Any]) -> bool | None:
    value = config.get("add_prefix_space")
    return value if isinstance(value, bool) else None


def _load_bpe(model_dir: Path, vocab_size: int | None) -> Vocab:
    # base.py get_vocab_base, reading tokenizer.json as transformers' fast tokenizer exposes it
    tok = _read_json(model_dir / HF_FILE)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"{model_dir / HF_FILE}: model type {model.get('type')!r} is not BPE")
    pre = pre_tokenizer_name(tok)
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    added_texts = {a["content"] for a in added.values()}
    n = vocab_size or len(set(by_id.values()))  # len(tokenizer.vocab) in the reference
    if by_id and max(by_id) >= n:
        raise VocabError(f"{model_dir / HF_FILE}: token id {max(by_id)} is beyond vocab_size {n}")

    T = gguf.TokenType
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        if text in added_texts:
            # the reference round-trips non-normalized added tokens through the tokenizer,
            # which leaves a whole added token unchanged
            info = added.get(i, {})
            if info.get("special") or does_token_look_special(text):
                types.append(int(T.CONTROL))
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(int(T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
        tokens.append(text)

    # merges exactly as SpecialVocab(load_merges=True) loads them (tokenizer.json, else merges.txt)
    merges = gguf.SpecialVocab(model_dir, load_merges=True, special_token_types=()).merges
    config = _read_json(cfg) if (cfg := model_dir / CONFIG_FILE).is_file() else {}
    return Vocab("gpt2", pre, tokens, None, types, list(merges), _space_prefix(config))


def load_vocab(model_dir: Path, vocab_size: int | None) -> Vocab:
    """The vocab of an HF checkpoint directory, padded to `vocab_size` (config.json's) when given."""
    model_dir = Path(model_dir)
    if (model_dir / SPM_FILE).is_file():
        return _load_sentencepiece(model_dir, vocab_size)
    if (model_dir / HF_FILE).is_file():
        return _load_bpe(model_dir, vocab_size)
    raise VocabError(f"no tokenizer in {model_dir}: looked for {SPM_FILE} (SentencePiece) and {HF_FILE} (BPE)")


# --- writing -----------------------------------------------------------------------------------

def _post_processor_add_flags(tokenizer_json: dict[str, Any], config: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos/add_sep as llama.cpp's (newer) gguf-py derives them from the post_processor.

    The installed gguf 0.19.0 SpecialVocab lacks two rules of the reference's gguf-py/gguf/vocab.py:
    a ByteLevel post-processor defaults add_bos/add_eos to False, and post-processor flags win over
    tokenizer_config's add_*_token. This re-derives the post-processor flags so they can be applied.
    """
    flags: dict[str, bool] = {}
    post = tokenizer_json.get("post_processor")
    if not post:
        return flags
    # compared as the reference does: raw tokenizer_config values, cls standing in for a missing bos
    bos, cls = config.get("bos_token"), config.get("cls_token")
    if not bos and cls and config:
        bos = cls
    for proc in post.get("processors", [post]):
        kind = proc.get("type")
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing" and len(single := proc.get("single", [])) > 1:
            if first := single[0].get("SpecialToken", {}).get("id"):
                # the reference adopts `first` as bos (or cls) when the config names none
                flags["bos"] = not config or first in (bos, cls) or not bos or not cls
            if single[-1].get("SpecialToken", {}).get("id"):
                flags["eos"] = True  # the reference makes the trailing token the EOS
    # Not re-derived (rare; the installed SpecialVocab's value stays): add_sep from a pair template,
    # and the bos/cls *ids* the reference adopts from a template's leading token.
    return flags


def _special_vocab(model_dir: Path, vocab: Vocab, n_vocab: int) -> gguf.SpecialVocab:
    if vocab.model == "llama":
        return gguf.SpecialVocab(model_dir, n_vocab=n_vocab)  # _set_vocab_sentencepiece
    # _set_vocab_gpt2: no n_vocab; merges already loaded into the Vocab
    special = gguf.SpecialVocab(model_dir, load_merges=False)
    special.merges = list(vocab.merges or [])
    tok = _read_json(model_dir / HF_FILE)
    config = _read_json(cfg) if (cfg := model_dir / CONFIG_FILE).is_file() else {}
    flags = _post_processor_add_flags(tok, config)
    if flags:
        merged = dict(flags)
        for typ, value in special.add_special_token.items():
            if typ not in merged:
                merged[typ] = value
        special.add_special_token = merged
    return special


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab, model_dir: Path, n_vocab: int, *,
                llama_space_prefix: bool = False) -> None:
    """Write the tokenizer.* keys in the reference's order.

    llama_space_prefix: also write tokenizer.ggml.add_space_prefix from tokenizer_config's
    add_prefix_space, first, as LlamaModel.set_vocab does (llama.py); other archs don't.
    """
    model_dir = Path(model_dir)
    if len(vocab.tokens) != n_vocab:
        raise VocabError(f"vocab has {len(vocab.tokens)} tokens, expected {n_vocab}")
    if llama_space_prefix and vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    _special_vocab(model_dir, vocab, n_vocab).add_to_gguf(writer, quiet=True)
