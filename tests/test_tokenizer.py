"""hotcold.engine.tokenizer against llama.cpp.

* llama.cpp's own tokenizer test vectors (models/ggml-vocab-*.gguf with .inp/.out, as
  tests/test-tokenizer-0.cpp runs them: add_special=false, parse_special=false);
* llama-cpp-python on the same vocabularies: tokenize with and without BOS and special-token parsing,
  every token's piece, the end-of-generation set, and detokenize; hypothesis on random text;
* the shipped models/mixtral-trained tokenizer (SentencePiece, 4096 tokens: lots of byte fallback).

The vocabularies come from llama.cpp's source tree (reference_convert.source_tree()); tests that need it,
or llama-cpp-python, are skipped without them.
"""
from __future__ import annotations

import ctypes
import functools
import random
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_convert

from hotcold.engine.gguf_file import GGUFFile
from hotcold.engine.tokenizer import Detokenizer, Tokenizer, _classes

KT = gguf.Keys.Tokenizer
ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT / "models" / "mixtral-trained"

VOCABS = ("llama-spm", "llama-bpe", "qwen2", "gpt-2")
# more pre-tokenizers that ship vectors: mpt (gpt2 regex, user-defined whitespace tokens), starcoder/refact/
# command-r (\p{N} then gpt2), falcon, phi-3 (SentencePiece with rstrip special tokens)
MORE_VOCABS = ("mpt", "starcoder", "falcon", "refact", "command-r", "phi-3")
NO_PRE = "gpt-neox"  # no tokenizer.ggml.pre: llama.cpp's "default" pre-tokenizer; no vectors

SPECIALS = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|eot_id|>", "<|start_header_id|>", "[PAD151650]", "<|end|>", "<|assistant|>", "<fim_prefix>",
            ">>TITLE<<", "<|padding|>", "<|END_OF_TURN_TOKEN|>", "<0x41>", "\u2581"]
TEXTS = [
    "", " ", "  ", "\n", " \n\n  \t\r\n", "Hello world", " Hello World!", "Hello, y'all! How're you 😁 ?",
    "IT'S 'RE 'Ve 'LL 'd 'x", "3 33 333 3333 33333 1234567890 ١٢٣ ²³ Ⅻ",
    "Ärger, 中文字符 and нещо на Български",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙", "Cửa Việt ﷽ \u0301combining e\u0301",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tx = {'a': [1, 2]}  # ok\r\n",
    "   leading and trailing   ", "\u00a0nbsp\u2028line\u3000ideographic\x85nel\x0bvt",
    "<s>text</s> <unk>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|endoftext|>",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nHi<|eot_id|>", "[PAD151650]x [PAD151651]",
    "<|assistant|>  ok<|end|>\n x", "<fim_prefix>a<fim_suffix>b<fim_middle>", ">>TITLE<< x >>ABSTRACT<<",
    "a" * 300 + " " * 40 + "b", "<0x41> \u2581 \u2581\u2581x", "\x00\x01\x7f\ufffd\U0010fffd\U000e0100",
]


@functools.cache
def _models_dir() -> Path | None:
    src = reference_convert.source_tree()
    return src / "models" if src is not None else None


def vocab_path(name: str) -> Path:
    d = _models_dir()
    path = d / f"ggml-vocab-{name}.gguf" if d is not None else None
    if path is None or not path.is_file():
        pytest.skip(f"llama.cpp's ggml-vocab-{name}.gguf is not available (reference_convert.source_tree())")
    return path


@functools.cache
def _tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(path).metadata)


_LLAMAS: dict[Path, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _release() -> Any:
    yield
    for llm in _LLAMAS.values():  # closed here: at interpreter exit llama-cpp-python's __del__ fails noisily
        llm.close()
    _LLAMAS.clear()
    _tokenizer.cache_clear()


def _llama(path: Path) -> Any:
    if path not in _LLAMAS:
        import llama_cpp
        _LLAMAS[path] = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return _LLAMAS[path]


def tokenizer(name: str) -> Tokenizer:
    return _tokenizer(vocab_path(name))


def llama(name: str) -> Any:
    pytest.importorskip("llama_cpp")
    return _llama(vocab_path(name))


def read_vectors(path: Path) -> list[tuple[str, list[int]]]:
    """test-tokenizer-0.cpp read_tests: inputs split on "\\n__ggml_vocab_test__\\n", one output line each."""
    raw = path.with_name(path.name + ".inp").read_bytes().decode()  # bytes: keep any "\r" as it is
    outs = path.with_name(path.name + ".out").read_bytes().decode().splitlines()
    inputs, pos, sep = [], 0, "\n__ggml_vocab_test__\n"
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        inputs.append(raw[pos:] if nxt < 0 else raw[pos:nxt])
        pos = len(raw) if nxt < 0 else nxt + len(sep)
    assert len(inputs) == len(outs), path
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outs)]


def lcpp_piece(llm: Any, token: int, special: bool) -> bytes:
    import llama_cpp
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buf, len(buf), 0, special)
    assert 0 <= n <= len(buf)
    return buf.raw[:n]


# --- llama.cpp's test vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS + MORE_VOCABS)
def test_llama_cpp_vocab_vectors(name: str) -> None:
    path = vocab_path(name)
    tok = tokenizer(name)
    cases = read_vectors(path)
    assert cases
    wrong = [(text, want, got) for text, want in cases
             if (got := tok.encode(text, add_special=False, parse_special=False)) != want]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]!r}"


# --- llama-cpp-python as the oracle ------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", VOCABS + MORE_VOCABS + (NO_PRE,))
def test_tokenize_matches_llama_cpp(name: str) -> None:
    llm, tok = llama(name), tokenizer(name)
    for text in TEXTS + SPECIALS:
        for add_bos in (False, True):
            for special in (False, True):
                want = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
                got = tok.encode(text, add_special=add_bos, parse_special=special)
                assert got == want, (text, add_bos, special)
                if all(len(tok.token_to_piece(t)) <= 32 for t in got):  # Llama.detokenize's buffer: 32 bytes
                    assert llm.detokenize(want) == tok.detokenize(got)
                    assert llm.detokenize(want, special=True) == tok.detokenize(got, special=True)


@pytest.mark.oracle
@pytest.mark.parametrize("name", VOCABS + MORE_VOCABS + (NO_PRE,))
def test_every_piece_and_special_id_matches_llama_cpp(name: str) -> None:
    import llama_cpp
    llm, tok = llama(name), tokenizer(name)
    vocab = llm._model.vocab
    assert tok.n_vocab == llama_cpp.llama_vocab_n_tokens(vocab)
    for token in range(tok.n_vocab):
        for special in (False, True):
            assert tok.token_to_piece(token, special) == lcpp_piece(llm, token, special), (token, special)
    assert {t for t in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)} == tok.eog_ids
    assert all(tok.is_eog(t) for t in tok.eog_ids)
    none = llama_cpp.LLAMA_TOKEN_NULL
    assert (tok.bos_id, tok.eos_id) == tuple(None if t == none else t for t in
                                             (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)))
    assert (tok.add_bos, tok.add_eos) == (llama_cpp.llama_vocab_get_add_bos(vocab),
                                          llama_cpp.llama_vocab_get_add_eos(vocab))


def test_unicode_classes_are_llama_cpps() -> None:
    """The embedded code point classes against src/unicode-data.cpp, where the source tree has it (the
    tree reference_convert fetches holds only models/ and the converter; point $HOTCOLD_LLAMA_CPP_SRC at a
    full llama.cpp checkout of the matching version to run this)."""
    src = reference_convert.source_tree()
    data = src / "src" / "unicode-data.cpp" if src is not None else None
    if data is None or not data.is_file():
        pytest.skip("llama.cpp's src/unicode-data.cpp is not in the source tree")
    text = data.read_text(encoding="utf-8")
    table = re.search(r"unicode_ranges_flags = \{(.*?)\n\};", text, re.S).group(1)
    runs = [(int(a, 16), int(f, 16)) for a, f in re.findall(r"\{0x([0-9A-F]+), 0x([0-9A-F]+)\}", table)]
    want: dict[str, list[tuple[int, int]]] = {"L": [], "N": [], "P": []}
    for (start, flags), (end, _) in zip(runs, runs[1:]):
        cls = "L" if flags & 0x4 else "N" if flags & 0x2 else "P" if flags & 0x20 else None
        if cls and want[cls] and want[cls][-1][1] == start - 1:
            want[cls][-1] = (want[cls][-1][0], end - 1)
        elif cls:
            want[cls].append((start, end - 1))
    ws = re.search(r"unicode_set_whitespace = \{(.*?)\n\};", text, re.S).group(1)
    classes = _classes()
    for cls, ranges in want.items():
        got = [(int(a, 16), int(b or a, 16))
               for a, b in re.findall(r"\\U([0-9a-f]{8})(?:-\\U([0-9a-f]{8}))?", classes[cls])]
        assert got == ranges, cls
    assert {chr(int(c, 16)) for c in re.findall(r"0x([0-9A-F]+)", ws)} == \
        {c for c in map(chr, range(0x3100)) if re.fullmatch(f"[{classes['W']}]", c)}


@pytest.mark.oracle
@pytest.mark.parametrize("name", ("llama-bpe", "qwen2", "gpt-2", "starcoder", "falcon", NO_PRE))
def test_code_point_classes_match_llama_cpp(name: str) -> None:
    """Random code points of every plane next to letters, digits, punctuation and spaces, where the
    pre-tokenizers' classes (letter, number, punctuation, whitespace, other) decide the split. A coarse check:
    a misclassified rare code point shows only where the split changes the tokens."""
    llm, tok = llama(name), tokenizer(name)
    rng = random.Random(1234)
    contexts = ("a{}b", "{}1", " {}{}", "'{}", "!{}.", "{} 7", "\n{}\t", "{}{}{}")
    for _ in range(40):
        cps = [rng.choice((rng.randrange(0x80, 0x3000), rng.randrange(0x3000, 0x30000), rng.randrange(0xE0000,
                0x110000))) for _ in range(100)]
        text = "".join(rng.choice(contexts).format(*[chr(c)] * 3) for c in cps if not 0xD800 <= c < 0xE000)
        assert tok.encode(text, add_special=False) == llm.tokenize(text.encode(), add_bos=False, special=False)


texts_with_specials = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS)), max_size=8).map("".join)


@pytest.mark.oracle
@pytest.mark.parametrize("name", VOCABS)
@settings(max_examples=100, deadline=None)
@given(text=st.text(), mixed=texts_with_specials)
def test_random_text_matches_llama_cpp(name: str, text: str, mixed: str) -> None:
    llm, tok = llama(name), tokenizer(name)
    assert tok.encode(text, add_special=False) == llm.tokenize(text.encode(), add_bos=False, special=False)
    for special in (False, True):
        assert tok.encode(mixed, parse_special=special) == llm.tokenize(mixed.encode(), add_bos=True, special=special)


@pytest.mark.parametrize("name", VOCABS)
@settings(max_examples=100, deadline=None)
@given(text=st.text(), extra=st.lists(st.integers(0, 31999), max_size=16))
def test_detokenizer_streams_what_decode_gives(name: str, text: str, extra: list[int]) -> None:
    tok = tokenizer(name)
    ids = tok.encode(text, add_special=True) + extra  # arbitrary ids: pieces that are not valid UTF-8 alone
    detok = Detokenizer(tok)
    streamed = "".join(detok.feed(t) for t in ids) + detok.flush()
    assert streamed == tok.decode(ids)
    assert detok.flush() == ""


@pytest.mark.oracle
def test_shipped_model_tokenizer_matches_llama_cpp(tmp_path: Path) -> None:
    """models/mixtral-trained's SentencePiece model written as a vocab-only GGUF by hotcold.convert.vocab."""
    pytest.importorskip("llama_cpp")
    from hotcold.convert.vocab import load_vocab, write_vocab
    vocab = load_vocab(MIXTRAL, None)
    path = tmp_path / "mixtral-vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    write_vocab(w, vocab, MIXTRAL, len(vocab.tokens), llama_space_prefix=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    llm, tok = _llama(path), Tokenizer.from_metadata(GGUFFile(path).metadata)
    assert tok.model == "llama" and tok.n_vocab == len(vocab.tokens)
    for text in TEXTS + SPECIALS:
        for special in (False, True):
            ids = tok.encode(text, add_special=True, parse_special=special)
            assert ids == llm.tokenize(text.encode(), add_bos=True, special=special), (text, special)
            assert llm.detokenize(ids) == tok.detokenize(ids)
            assert llm.detokenize(ids, special=True) == b"".join(tok.token_to_piece(t) for t in ids)
    for token in range(tok.n_vocab):
        assert tok.token_to_piece(token, special=False) == lcpp_piece(llm, token, False)
        assert tok.token_to_piece(token) == lcpp_piece(llm, token, True)


# --- behaviour without llama.cpp ---------------------------------------------------------------------


def spm_metadata(**extra: Any) -> dict[str, Any]:
    """A tiny SentencePiece vocabulary: specials, the 256 byte tokens, then some pieces with scores."""
    T = gguf.TokenType
    pieces = {"\u2581": -1.0, "a": -2.0, "b": -2.0, "\u2581a": -1.5, "ab": -0.5, "\u2581ab": -0.2, "<tool>": 0.0}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * (len(pieces) - 1) + [T.USER_DEFINED]
    return {KT.MODEL: "llama", KT.LIST: tokens, KT.SCORES: [0.0] * 259 + list(pieces.values()),
            KT.TOKEN_TYPE: [int(t) for t in types], **extra}


def test_spm_merges_by_score_and_falls_back_to_bytes() -> None:
    tok = Tokenizer.from_metadata(spm_metadata())
    ids = {t: i for i, t in enumerate(tok.texts)}
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    # " ab": "ab" (-0.5) merges before "▁a" (-1.5), then "▁ab" (-0.2)
    assert tok.encode("ab") == [1, ids["\u2581ab"]]
    assert tok.encode("ab c", add_special=False) == [ids["\u2581ab"], ids["\u2581"], ids["<0x63>"]]
    assert tok.encode("é", add_special=False) == [ids["\u2581"], ids["<0xC3>"], ids["<0xA9>"]]
    # a user-defined token is cut out even when parse_special is off; control tokens only when it is on
    assert tok.encode("a<tool>b", add_special=False) == [ids["\u2581a"], ids["<tool>"], ids["\u2581"], ids["b"]]
    assert ids["<s>"] not in tok.encode("<s>", add_special=False)
    assert tok.encode("<s>", add_special=False, parse_special=True) == [1]
    assert tok.token_to_piece(ids["\u2581ab"]) == b" ab"
    assert tok.token_to_piece(ids["<0xC3>"]) == b"\xc3"
    assert tok.token_to_piece(1) == b"<s>" and tok.token_to_piece(1, special=False) == b""
    assert tok.is_eog(2) and not tok.is_eog(1)
    assert tok.decode(tok.encode("ab é")) == "<s> ab é"
    with pytest.raises(IndexError):
        tok.token_to_piece(tok.n_vocab)


def test_metadata_flags_override_defaults() -> None:
    tok = Tokenizer.from_metadata(spm_metadata(**{KT.ADD_BOS: False, KT.ADD_EOS: True, KT.ADD_PREFIX: False,
                                                  KT.EOS_ID: 0}))
    ids = {t: i for i, t in enumerate(tok.texts)}
    assert tok.encode("ab") == [ids["ab"], 0]
    assert tok.is_eog(0)


def test_detokenizer_holds_back_incomplete_utf8() -> None:
    tok = Tokenizer.from_metadata(spm_metadata())
    ids = {t: i for i, t in enumerate(tok.texts)}
    detok = Detokenizer(tok)
    assert detok.feed(ids["<0xE2>"]) == ""
    assert detok.feed(ids["<0x82>"]) == ""
    assert detok.feed(ids["<0xAC>"]) == "€"
    assert detok.feed(ids["<0xC3>"]) == ""
    assert detok.flush() == "\ufffd"


def test_unsupported_vocabularies_are_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Tokenizer.from_metadata(spm_metadata(**{KT.MODEL: "bogus"}))
    bpe = {KT.MODEL: "gpt2", KT.LIST: ["a", "b"], KT.MERGES: ["a b"], KT.PRE: "no-such-pre"}
    with pytest.raises(ValueError, match="no-such-pre"):
        Tokenizer.from_metadata(bpe)
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_metadata({**bpe, KT.PRE: "gpt-2", KT.MERGES: None})
    with pytest.raises(ValueError, match=KT.LIST):
        Tokenizer.from_metadata({KT.MODEL: "llama"})
