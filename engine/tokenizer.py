"""Tokenizer built from GGUF metadata, token for token what llama.cpp's src/llama-vocab.cpp produces.

Two vocabulary kinds are supported: SentencePiece ("llama": score-driven bigram merges, byte fallback)
and byte-level BPE ("gpt2": a pre-tokenizer chosen by tokenizer.ggml.pre, then rank-driven merges).
Special tokens (control, user-defined, unknown) are cut out of the raw text first, as llama.cpp's
tokenizer_st_partition does. Pieces (token_to_piece) are llama_token_to_piece's bytes.

llama.cpp classifies code points with its own Unicode table (src/unicode-data.cpp), whose Unicode
version differs from Python's unicodedata and from the `regex` module; the classes the pre-tokenizers
need (letter, number, punctuation, whitespace) are therefore embedded below, and the pre-tokenizer
regexes are written with explicit character classes for the standard `re` module.
"""
from __future__ import annotations

import base64
import codecs
import functools
import heapq
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gguf import Keys, TokenType

KT = Keys.Tokenizer


class Attr:
    """llama_token_attr bits (llama.h), as plain ints."""
    UNDEFINED, UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 0, 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
    LSTRIP, RSTRIP = 1 << 7, 1 << 8


_ATTR_OF_TYPE = {TokenType.NORMAL: Attr.NORMAL, TokenType.UNKNOWN: Attr.UNKNOWN, TokenType.CONTROL: Attr.CONTROL,
                 TokenType.USER_DEFINED: Attr.USER_DEFINED, TokenType.UNUSED: Attr.UNUSED, TokenType.BYTE: Attr.BYTE}
_SPECIAL = Attr.CONTROL | Attr.UNKNOWN            # hidden by token_to_piece(special=False)
_PARTITIONED = _SPECIAL | Attr.USER_DEFINED      # cut out of the text before tokenizing (cache_special_tokens)

# --- llama.cpp's code point classes -------------------------------------------------------------------
# Runs of code points from src/unicode-data.cpp (llama-cpp-python 0.3.36's llama.cpp, Unicode 15.1):
# varints of (start - previous start) << 2 | class, class 0 other, 1 \p{L}, 2 \p{N}, 3 \p{P}; zlib, base85.
_UNICODE_RUNS = (
    "c-m!EU2GKB71p_X&fI%vXS_2zv-T|B#k+VH&9FAuWS!#F4kpFKRvp#khdRwh0mTng@IX{ToyxSf0f8kbCdG=4oHkLBN>r;jk"
    ")@E<Rc#5iRH6-0QDsX-;=xFXnuk8Rs;c(vLMox^Xz%R3bMN{2?svX93ziIIvZNCFh$WGZpu~%S4X7n<QY4i@(nwH+M(J9e+t"
    "%r4k?;)qq_jtvmShpqAl();kNFv*8PGEQ3s9c|JBqUvkGh_EK}q#Bl=eIvD7lI*#t6Gr){HDIcWI=NH`hfgJ{6sYqLMbIhFm"
    "P7jZIxN+<?@QI!Hn9HTVKn!Nz{fhH<k*J#J1bJwzEo+p%#Eb||uvkun3$JR7(V->IsdbO<+xn#=1faJ~=M{i>^Ol`LT%TfcH"
    "uTYjtRC?q3jMG9<-99waX%2u{zx4n!9%KbU^QlTCjziVmKDj7BzoJN8ku7_18Cpj)VQN7iOS3z@vDa*)O$pH#defB{r5bDei"
    "Ll4`RfmC~@*(j-Ls7CVXAdh^uh}tLI8fs@8FwrG(`(UG^b2J67^P7vp_xQv->^Dm3z-0_<m9^Y*I~rkn1_)EAuLCWb<Y>;0$"
    "E(1@Y53o~i`J`?^P*wvpxv`)Rp=m23!bFCbVS+LMV+0?_H_&-RI#tKOjh?DI0d%k3$F_|g^exsVR~I;eSNMPYeqz)?|>PNXu"
    "ov<+{2q%rlHcL@4~O3x;ZO@dtwQCb9JT6_mn%*VMYt^iaQ0b)rWRn^b^p9>^$g1ZU?^PP{3$oYRniHt4ar&ITdi(ShG>~S-W"
    "(LGPa`wx18dC-#XYlD9f^KAE6l}v=Js0m8WCqq7HelpMH4Qp%(3=d>4&Bf$9G%?tEYURsREiErx#XJvH(NP(KPkwTAu!&M8o"
    "n&SjbAyKhKJ{Rqzckd@e7DQ4&~I}5)BIR^2zi=31x!+4ufXe8gX<7lsnbb|ga$VtruZHPK28iN(+nSk&IIirgoKZUMwbL`JB"
    "E*2N*g7^*SkCpvQr1md?hb1oeiU{Mu$%3AX=`oS25#&%0lggpWlR@+saH3mq#0(EL+LDwJ9c$K=*Xek63BFz?BlMU;+ajMS_"
    "^L&@WEgiVOq5$(kFB)Ny@!Vqx}`x|?E!-v)Jo$_ccpK~nlTxsr|yaNihC0-of9|W`dVxjGVOk<O3yMA6>AN)5IY0c<7&^C(5"
    "vu1w7n3%avtO^i5^Pj`ZR~$|BH;wt_!;sQ(G6HjSkZQyXw-rCgICigOyx_o$IhqeI}3FH{qG1?gTi+=V=Qw4WbdrJ>WJQ{s*"
    "vuCMOBZB=<eY-+>*}LS3~^e)PN`{-%pVQSMMc*MJJsBH*GIpvo{^kw(5^W=FRaR)C||r@j*;=x_s$i~Eq&W{>#^V7J3qAKzA"
    "JDr8T@>4Y^7IXbqfAyZt1M0Uu`57g)Tnw*`P6>(MEgWJ$?8#Z%7JHsoQB@+^?51)t=5$1=sd;ZIPo-+#vGW#p-cVTxXIl?lE"
    "9gDC-NvCsob6A{$r%TLP%rk(xDh-{U<DnTzl9n;p+DF4raC7_{Y7NW<mN2~p`@+WstRLI`f8t%}_v%ZE;kMpdhW&BEE#WLJ!"
    "8c!ZF2OQ9YvcB?vHaXTbg<HgYjE_y6WmA-7@OUADK;Sn+H)*!Id*xln`siawuZAJr{`dgBzyy-_aKX2u86HS;2XB|JFbeRa7"
    "`BIGW1G++wp`RS&3B>nt_*C!_u5KjX@_1@tPj+SlgID=V14f;hMmwU;HJ|=b0<9rI_?vr;HDuKO0jW%lY2m!O6Mgg9~Ea&5l"
    ";Nyd+rLMw&2Mh9=+jxB?d57gGZ(sR{9#GaZ{3DV!ALalzHTasPLaU)}lv6yAMDI5lj}>u!9LCA-tfFIboQ=3}X{UC4$FIPoD"
    "2?i~CmHvBH$6*MQR*TRT8)W$ex=rs2)BaxwF3_7#k&d?oG57RJz6(9fQ%v<m?-~X(6G#yN<4frE2LX<H>7tfd@{R@x`*XoWX"
    "!`X%mdt$oNWy56hO^GZwo2Pysd<lkSI3I~cFuEoUhmP_t<^%VeQ&q4uD_Tv-tVio#S#?$|(y8qWX)mjyPkY}^mVf;1a5gvgu"
    "{jQ(k3)LH(B~GR^X3=OeZ!l4Zo`?}F@FV8W2fN1qxoK4"
)
# unicode_set_whitespace: what llama.cpp's pre-tokenizers take for \s
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_C_ISSPACE = " \t\n\v\f\r"  # C isspace(), used by the lstrip/rstrip token attributes


@functools.cache
def _classes() -> dict[str, str]:
    """`re` character-class bodies {"L", "N", "P", "W"} with llama.cpp's membership."""
    data = zlib.decompress(base64.b85decode("".join(_UNICODE_RUNS)))
    values, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value, shift = 0, 0
    ranges: dict[int, list[tuple[int, int]]] = {1: [], 2: [], 3: []}
    start, cls = 0, 0
    for v in values + [(0x110000 - sum(v >> 2 for v in values)) << 2]:  # the last run ends at 0x10FFFF
        if cls:
            ranges[cls].append((start, start + (v >> 2) - 1))
        start, cls = start + (v >> 2), v & 3
    body = lambda rs: "".join(f"\\U{a:08x}" + (f"-\\U{b:08x}" if b > a else "") for a, b in rs)  # noqa: E731
    return {"L": body(ranges[1]), "N": body(ranges[2]), "P": body(ranges[3]), "W": _WS}


# --- BPE pre-tokenizers (llm_tokenizer_bpe's regex_exprs, unicode.cpp's unicode_regex_split) ---------------
# Each pre-tokenizer is a list of regexes applied in turn: every piece of the previous split is split
# again into the matches and the text between them. The gpt2/llama3/qwen2 expressions are the ones
# unicode.cpp runs as hand-written splitters (unicode_regex_split_custom_*); written with llama.cpp's
# classes they split identically. \s is llama.cpp's whitespace set, [^...] excludes it likewise.
_CONTRACTIONS_CI = r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
_REGEX = {
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{W}{L}{N}]+|[{W}]+(?![^{W}])|[{W}]+",
    "llama3": _CONTRACTIONS_CI + r"|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}| ?[^{W}{L}{N}]+[\r\n]*|[{W}]*[\r\n]+"
                                 r"|[{W}]+(?![^{W}])|[{W}]+",
    "qwen2": _CONTRACTIONS_CI + r"|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{W}{L}{N}]+[\r\n]*|[{W}]*[\r\n]+"
                                r"|[{W}]+(?![^{W}])|[{W}]+",
    # std::regex ones, on llama.cpp's category-collapsed text (ASCII keeps itself, so [0-9] is ASCII)
    "punct": r"[{P}$+<=>^~|]+",
    "punct_falcon": r"[{P}$+<=>^~|`]+",
    "numbers": r"[{N}]+",
    "number": r"[{N}]",
    "digits3": r"[0-9][0-9][0-9]",
}
_PIPELINES = {  # LLAMA_VOCAB_PRE_TYPE_* -> regex_exprs
    "gpt2": ("gpt2",),
    "llama3": ("llama3",),
    "qwen2": ("qwen2",),
    "starcoder": ("number", "gpt2"),
    "falcon": ("punct_falcon", "gpt2", "digits3"),
    "default": ("punct", "gpt2", "numbers", "digits3"),
}
# tokenizer.ggml.pre -> (pipeline, ignore_merges, add_bos default), as llama_vocab::impl::load maps them
_PRE: dict[str, tuple[str, bool, bool]] = {
    "default": ("default", False, False),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), ("llama3", True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ("llama3", False, False)),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt",
                     "olmo", "jais", "trillion", "granite-docling"), ("gpt2", False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open"), ("qwen2", False, False)),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    ("starcoder", False, False)),
    "falcon": ("falcon", False, False),
}


@functools.cache
def _pipeline(name: str) -> tuple[re.Pattern[str], ...]:
    cls = _classes()
    return tuple(re.compile(_REGEX[step].format(**cls)) for step in _PIPELINES[name])


def _split(text: str, patterns: Sequence[re.Pattern[str]]) -> list[str]:
    """unicode_regex_split without the byte encoding: matches and the text between them, regex by regex."""
    pieces = [text]
    for pattern in patterns:
        out: list[str] = []
        for piece in pieces:
            end = 0
            for m in pattern.finditer(piece):
                if m.start() > end:
                    out.append(piece[end:m.start()])
                out.append(m.group())
                end = m.end()
            if end < len(piece):
                out.append(piece[end:])
        pieces = out
    return pieces


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map (unicode.cpp unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], n = chr(256 + n), n + 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}

# Token texts llama.cpp takes for end-of-generation (llama_vocab::impl::load, special_eog_ids)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))
# Texts that name the EOT/EOM/FIM tokens when the metadata does not (same function, "auto-detect")
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_TEXTS = {
    "FIM_PRE_ID": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                   "<|code_prefix|>", "<|prefix|>"),
    "FIM_SUF_ID": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                   "<|code_suffix|>", "<|suffix|>"),
    "FIM_MID_ID": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                   "<|code_middle|>", "<|middle|>"),
    "FIM_PAD_ID": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "FIM_REP_ID": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "FIM_SEP_ID": ("<|file_sep|>",),
}
_FIM_DEPRECATED = {"FIM_PRE_ID": "PREFIX_ID", "FIM_SUF_ID": "SUFFIX_ID", "FIM_MID_ID": "MIDDLE_ID"}


_SPECIAL_NAMES = ("BOS_ID", "EOS_ID", "EOT_ID", "EOM_ID", "UNK_ID", "SEP_ID", "PAD_ID", "MASK_ID", *_FIM_TEXTS)


class _Typed:
    """metadata[key] if it has the expected type (a GGUF integer also reads as a bool), else a ValueError naming it."""

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        self.metadata = metadata

    def __call__(self, key: str, kind: type, default: Any = None) -> Any:
        v = self.metadata.get(key)
        if v is None:
            return default
        if kind is bool and isinstance(v, int):
            return bool(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            got = "an array" if isinstance(v, (list, np.ndarray)) else type(v).__name__
            want = "an array" if kind in (list, np.ndarray, (list, np.ndarray)) else kind.__name__
            raise ValueError(f"metadata key {key} is {got}, expected {want}")
        return v


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's tokenize (encode) and llama_token_to_piece (token_to_piece)."""

    def __init__(self, model: str, pre: str, tokens: Sequence[str], scores: Sequence[float] | None,
                 attrs: Sequence[int], merges: Sequence[str] | None, special_ids: Mapping[str, int | None],
                 add_bos: bool, add_eos: bool, add_space_prefix: bool, ignore_merges: bool) -> None:
        self.model, self.pre = model, pre
        self.is_spm = model == "llama"
        self.texts = list(tokens)
        self.n_vocab = len(self.texts)
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * self.n_vocab
        self.attrs = list(attrs)
        self.token_to_id = {t: i for i, t in enumerate(self.texts)}  # a repeated text maps to its last id
        self.special_ids = dict(special_ids)
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self.ignore_merges = ignore_merges
        # merge "left right" -> rank (the first one of duplicates). llama.cpp splits a merge at its first space
        # after the first character; byte-level symbols hold no spaces, so looking up left + " " + right agrees.
        self.ranks: dict[str, int] = {}
        for i, merge in enumerate(merges or ()):
            self.ranks.setdefault(merge, i)
        self._patterns = () if self.is_spm else _pipeline(_PRE[pre][0])
        self._pieces: dict[int, bytes] = {}
        self._words: dict[str, list[int]] = {}  # BPE results by pre-tokenized word
        self.eog_ids: set[int] = set()
        self._special_order: list[int] = []
        self.bos_id: int | None = self.special_ids["BOS_ID"]
        self.eos_id: int | None = self.special_ids["EOS_ID"]
        self.unk_id: int | None = self.special_ids["UNK_ID"]
        self.pad_id: int | None = self.special_ids["PAD_ID"]
        self.eot_id: int | None = None  # set, with EOM, by _finish_specials
        self.eom_id: int | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """llama_vocab::impl::load for "llama" (SentencePiece) and "gpt2" (byte-level BPE) vocabularies."""
        get = _Typed(metadata)
        model = get(KT.MODEL, str)
        if model not in ("llama", "gpt2"):
            raise ValueError(f"unsupported tokenizer model {KT.MODEL}={model!r}: hotcold reads only 'llama' "
                             "(SentencePiece) and 'gpt2' (byte-level BPE) vocabularies")
        tokens = get(KT.LIST, list)
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{KT.LIST} is missing or empty")
        n = len(tokens)
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        if model == "llama":
            pre, ignore_merges, add_bos, add_space_prefix, merges = "default", False, True, True, None
            defaults = {"BOS_ID": 1, "EOS_ID": 2, "UNK_ID": 0}
        else:
            pre = get(KT.PRE, str) or "default"
            if pre not in _PRE:
                raise ValueError(f"unsupported BPE pre-tokenizer {KT.PRE}={pre!r}; "
                                 f"supported: {', '.join(sorted(_PRE))}")
            _, ignore_merges, add_bos = _PRE[pre]
            add_space_prefix, defaults = False, {"BOS_ID": 11, "EOS_ID": 11}
            merges = get(KT.MERGES, list)
            if merges is None or not all(isinstance(m, str) for m in merges):
                raise ValueError(f"{KT.MERGES} is missing: a BPE vocabulary needs its merges")
        scores, types = (get(k, (list, np.ndarray)) for k in (KT.SCORES, KT.TOKEN_TYPE))
        scores, types = (None if a is None else np.asarray(a) for a in (scores, types))
        for key, arr in ((KT.SCORES, scores), (KT.TOKEN_TYPE, types)):
            if arr is not None and (len(arr) < n or arr.dtype.kind not in "iuf" or not np.isfinite(arr[:n]).all()):
                raise ValueError(f"{key} has {len(arr)} entries of {arr.dtype} for {n} tokens; expected finite numbers")
        types = types.tolist() if types is not None else None
        attrs = [_ATTR_OF_TYPE.get(t, Attr.UNDEFINED) for t in types[:n]] if types is not None else [Attr.NORMAL] * n
        special: dict[str, int | None] = {}
        for name in _SPECIAL_NAMES:  # the default if in range, then the metadata's (deprecated key last) if in range
            tid = defaults.get(name)
            special[name] = tid if tid is not None and tid < n else None
            for key in (getattr(KT, name, None), getattr(KT, _FIM_DEPRECATED.get(name, "-"), None)):
                value = get(key, int) if key else None
                if value is not None and 0 <= value < n:
                    special[name] = value
        tok = cls(model, pre, tokens, scores, attrs, merges, special, get(KT.ADD_BOS, bool, add_bos),
                  get(KT.ADD_EOS, bool, False), get(KT.ADD_PREFIX, bool, add_space_prefix), ignore_merges)
        tok._finish_specials(metadata)
        return tok

    def _finish_specials(self, metadata: Mapping[str, Any]) -> None:
        """The text-based fix-ups at the end of llama_vocab::impl::load: EOT/EOM/FIM detection, the EOG set,
        the special-token cache and the per-model lstrip/rstrip attributes."""
        attrs, ids, sid = self.attrs, self.token_to_id, self.special_ids
        for name, texts in (("EOT_ID", _EOT_TEXTS), ("EOM_ID", ("<|eom_id|>",)), *_FIM_TEXTS.items()):
            if sid[name] is None:  # llama.cpp takes the first match in hash-map order; we take the lowest id
                sid[name] = min((ids[t] for t in texts if t in ids), default=None)
                if sid[name] is not None:
                    attrs[sid[name]] |= Attr.CONTROL
        self.eot_id, self.eom_id = sid["EOT_ID"], sid["EOM_ID"]
        for text, tid in ids.items():
            if attrs[tid] & Attr.CONTROL and "unused" in text:
                attrs[tid] |= Attr.UNUSED
        eog = {sid[k] for k in ("FIM_PAD_ID", "FIM_REP_ID", "FIM_SEP_ID", "EOS_ID", "EOT_ID", "EOM_ID")} - {None}
        for text in _EOG_TEXTS & ids.keys():
            eog.add(ids[text])
            attrs[ids[text]] |= Attr.CONTROL
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            if text in ids:
                attrs[ids[text]] = Attr.USER_DEFINED
        eog_texts = {self.texts[t]: t for t in eog}
        has_call = bool(eog_texts.keys() & {"<|call|>", "<|calls|>"})
        if "<|end|>" in eog_texts and has_call and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
            eog.discard(eog_texts["<|end|>"])  # o200k_harmony, solar-open: <|end|> does not end generation
            attrs[eog_texts["<|end|>"]] = Attr.USER_DEFINED
        if "</s>" in eog_texts and eog_texts.keys() & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(eog_texts["</s>"])
            attrs[eog_texts["</s>"]] = Attr.NORMAL
        self.eog_ids = eog
        # cache_special_tokens, longest (in bytes) first; llama.cpp's std::sort is not stable, ties go by id here
        special = [t for t in range(self.n_vocab) if attrs[t] & _PARTITIONED]
        self._special_order = sorted(special, key=lambda t: -len(self.texts[t].encode()))

        def strip(text: str, flag: int, on: bool) -> None:
            if text in ids:
                attrs[ids[text]] = attrs[ids[text]] | flag if on else attrs[ids[text]] & ~flag

        name = str(metadata.get(Keys.General.NAME, "")).lower()
        pre, arch = str(metadata.get(KT.PRE, "")), str(metadata.get(Keys.General.ARCHITECTURE, ""))
        if any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(a in arch for a in ("nomic-bert-moe", "jina-bert-v3")):
            strip("<mask>", Attr.LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for tid in special:
                attrs[tid] |= Attr.RSTRIP
            strip("</s>", Attr.RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                strip(text, Attr.RSTRIP, False)
        elif "modern-bert" in name:
            strip("[MASK]", Attr.LSTRIP, True)

    # --- encoding --------------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize: BOS/EOS as the vocabulary asks (when add_special); special-token texts become their
        tokens when parse_special (user-defined ones always)."""
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._required("BOS_ID"))
        prev_special = True  # SentencePiece prefixes a space to text that starts the prompt or follows a token
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.is_spm:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm(frag.replace(" ", "\u2581"), out)
                prev_special = False
            else:
                for word in _split(frag, self._patterns):
                    out += self._bpe(word)
        if add_special and self.add_eos:
            out.append(self._required("EOS_ID"))
        return out

    def _required(self, name: str) -> int:
        tid = self.special_ids[name]
        if tid is None:
            raise ValueError(f"the vocabulary asks for a {name[:3]} token but has none")
        return tid

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """tokenizer_st_partition: cut special-token texts (longest first) out of the raw text fragments."""
        frags: list[str | int] = [text] if text else []
        for tid in self._special_order:
            attr, special = self.attrs[tid], self.texts[tid]
            if (not parse_special and attr & _SPECIAL) or special not in text:
                continue
            out: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or special not in frag:
                    out.append(frag)
                    continue
                pos, end = 0, len(frag)
                while (match := frag.find(special, pos)) >= 0:
                    left = match
                    while attr & Attr.LSTRIP and left > pos and frag[left - 1] in _C_ISSPACE:
                        left -= 1
                    if left > pos:
                        out.append(frag[pos:left])
                    out.append(tid)
                    pos = match + len(special)
                    while attr & Attr.RSTRIP and pos < end and frag[pos] in _C_ISSPACE:
                        pos += 1
                if pos < end:
                    out.append(frag[pos:])
            frags = out
        return frags

    def _spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize: merge the adjacent pair that forms the best-scoring token
        (leftmost on ties) until none forms a token; what is left and not a token goes out as bytes."""
        ids, scores = self.token_to_id, self.scores
        n = len(text)
        size = [1] * n  # symbol i is text[i:i + size[i]]; 0 once merged into its left neighbour
        prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                tid = ids.get(text[left:right + size[right]])
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], left, right, size[left] + size[right]))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if not size[left] or not size[right] or size[left] + size[right] != total:
                continue  # stale: one side has changed since
            size[left], size[right] = total, 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        i = 0
        while i != -1:
            piece = text[i:i + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out += (self._spm_byte(b) for b in piece.encode())
            i = nxt[i]

    def _spm_byte(self, byte: int) -> int:
        """llama_vocab::byte_to_token for SentencePiece: <0xXX>, else the byte itself as a token."""
        tid = self.token_to_id.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self.token_to_id.get(chr(byte))
        if tid is None:
            raise ValueError(f"the vocabulary has no token for byte 0x{byte:02X}")
        return tid

    def _bpe(self, word: str) -> list[int]:
        """llm_tokenizer_bpe_session::tokenize for one pre-tokenized word: byte-encode it, then merge the
        adjacent pair of lowest merge rank (leftmost on ties) until no pair has a rank."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        ids, ranks = self.token_to_id, self.ranks
        encoded = "".join([_BYTE_TO_CHAR[b] for b in word.encode()])
        if self.ignore_merges and encoded in ids:
            result = [ids[encoded]]
        else:
            syms = list(encoded)  # "" once merged into the left neighbour
            n = len(syms)
            prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
            heap: list[tuple[int, int, int, str]] = []

            def push(left: int, right: int) -> None:
                if left >= 0 and right >= 0:
                    rank = ranks.get(syms[left] + " " + syms[right])
                    if rank is not None:
                        heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

            for i in range(1, n):
                push(i - 1, i)
            while heap:
                _, left, right, merged = heapq.heappop(heap)
                if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                    continue  # stale
                syms[left], syms[right] = merged, ""
                nxt[left] = nxt[right]
                if nxt[right] >= 0:
                    prev[nxt[right]] = left
                push(prev[left], left)
                push(left, nxt[left])
            result = []
            for sym in syms:
                if sym in ids:
                    result.append(ids[sym])
                elif sym:  # not a token: its single-byte (ASCII) characters that are tokens, as llama.cpp
                    result += (ids[c] for c in sym if c < "\x80" and c in ids)
        if len(self._words) > 65536:
            self._words.clear()
        self._words[word] = result
        return result

    # --- decoding --------------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """llama_token_to_piece: the token's bytes; control and unknown tokens give b"" unless `special`."""
        if not 0 <= token_id < self.n_vocab:
            raise IndexError(f"token id {token_id} is out of range for a vocabulary of {self.n_vocab}")
        if not special and self.attrs[token_id] & _SPECIAL:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def _piece(self, tid: int) -> bytes:
        text, attr = self.texts[tid], self.attrs[tid]
        if attr & _PARTITIONED:
            return text.encode()
        if attr & Attr.NORMAL:
            return text.replace("\u2581", " ").encode() if self.is_spm else _decode_byte_level(text)
        if attr & Attr.BYTE:  # llama_vocab::impl::token_to_byte: strtol of the two characters after "<0x"
            digits = re.match(r"[0-9a-fA-F]*", text[3:5])
            return bytes([int(digits.group(), 16) if digits and digits.group() else 0])
        return b""  # unused and undefined tokens

    def detokenize(self, ids: Sequence[int], special: bool = False) -> bytes:
        """llama_cpp.Llama.detokenize: the pieces joined (control tokens hidden unless `special`), less one
        leading space when the first token is BOS (llama-cpp-python drops the space SentencePiece prefixed)."""
        out = b"".join(self.token_to_piece(int(t), special) for t in ids)
        return out[1:] if len(ids) and ids[0] == self.bos_id and out[:1] == b" " else out

    def decode(self, ids: Sequence[int], special: bool = True) -> str:
        """The tokens' pieces joined and decoded as UTF-8 (invalid bytes become U+FFFD)."""
        return b"".join(self.token_to_piece(int(t), special) for t in ids).decode("utf-8", errors="replace")

    def is_eog(self, token_id: int) -> bool:
        """llama_vocab_is_eog: EOS, EOT, EOM, FIM pad/repo/sep and the tokens llama.cpp names by their text."""
        return token_id in self.eog_ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"


def _decode_byte_level(text: str) -> bytes:
    """llama_decode_text: each character back to its byte; characters outside the map are spelled out."""
    out = bytearray()
    for ch in text:
        byte = _CHAR_TO_BYTE.get(ch)
        if byte is not None:
            out.append(byte)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode().hex().encode() + text.encode() + b"]"
    return bytes(out)


class Detokenizer:
    """Streams text: feed token ids one at a time, get back the str that is complete so far (holds back
    incomplete UTF-8 sequences)."""

    def __init__(self, tok: Tokenizer, special: bool = True) -> None:
        self.tok, self.special = tok, special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self.tok.token_to_piece(int(token_id), self.special))

    def flush(self) -> str:
        """Whatever is held back, decoded with errors="replace"; the stream starts afresh."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out
