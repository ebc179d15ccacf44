"""Which GGML type each tensor gets: --type, --expert-type, --tensor-type REGEX=TYPE, and fallbacks.

Rules follow llama-quantize: the first matching --tensor-type regex wins (searched in the GGUF name),
norms and routers stay F32, and a row length that does not fit the block size falls back the way
llama-quant.cpp's tensor_type_fallback does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hotcold.quant import QType, QuantError, block_size, resolve

from .archs import ConvertError, PlannedTensor, Role

# Types a converted file may hold (what llama.cpp can load and hotcold can quantize).
OUTPUT_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
                QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.MXFP4)

# llama-quant.cpp tensor_type_fallback: 256-block types step down to a 32-block type.
_FALLBACK = {QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1,
             QType.Q6_K: QType.Q8_0}


def output_type(name: str) -> QType:
    """A user-given type name (q8_0, Q4_K, f16, ...) that a GGUF file may hold."""
    try:
        t = resolve(name)
    except QuantError as e:
        raise ConvertError(f"{e}; choose one of {', '.join(t.name.lower() for t in OUTPUT_TYPES)}") from None
    if t not in OUTPUT_TYPES:
        raise ConvertError(f"{t.name} cannot be written to a model file; choose one of "
                           f"{', '.join(t.name.lower() for t in OUTPUT_TYPES)}")
    return t


def parse_tensor_type(spec: str) -> tuple[re.Pattern[str], QType]:
    """`REGEX=TYPE` as llama-quantize's --tensor-type takes it."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise ConvertError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'attn_v=q6_k'")
    try:
        return re.compile(pattern), output_type(type_name)
    except re.error as e:
        raise ConvertError(f"--tensor-type {spec!r}: bad regex ({e})") from None


def fit(qtype: QType, row: int) -> QType:
    """The type actually used for rows of length `row` (tensor_type_fallback)."""
    if row % block_size(qtype) == 0:
        return qtype
    t = _FALLBACK.get(qtype, qtype)
    return t if row % block_size(t) == 0 else QType.F16


@dataclass(frozen=True)
class TypeRules:
    default: QType = QType.Q8_0
    expert: QType | None = None
    overrides: tuple[tuple[re.Pattern[str], QType], ...] = ()

    def wanted(self, t: PlannedTensor) -> QType:
        if t.role == Role.FLOAT:
            return QType.F32
        for pattern, qtype in self.overrides:
            if pattern.search(t.name):
                return qtype
        if t.role == Role.EXPERT and self.expert is not None:
            return self.expert
        return self.default

    def choose(self, t: PlannedTensor) -> QType:
        return fit(self.wanted(t), t.shape[-1])
