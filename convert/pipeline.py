"""Hugging Face checkpoint -> mixed-precision GGUF (loadable by llama.cpp) plus its cold expert copies.

Streaming: tensor infos and metadata go out first, then each tensor is read, quantized and written
one expert at a time, so peak memory stays near one tensor. Files are written under a temporary
name and renamed at the end: an error or Ctrl-C leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import gguf
import numpy as np
from tqdm import tqdm

from hotcold import keys
from hotcold.quant import QType, byte_shape, quantize

from .archs import Arch, ConvertError, PlannedTensor, Role, arch_for
from .checkpoint import Checkpoint
from .safetensors_reader import CheckpointError
from .types_plan import TypeRules, fit, output_type, parse_tensor_type
from .vocab import VocabError, load_vocab, write_vocab

log = logging.getLogger("hotcold.convert")

# general.file_type for a file whose 2-D weights are mostly `--type` (llama.h llama_ftype).
_FILE_TYPE = {
    QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16, QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
    QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, QType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    QType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, QType.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
    QType.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}
_HASH_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    cold_path: Path | None
    experts_sha256: str
    tensor_types: dict[str, QType]
    fallbacks: tuple[str, ...]  # "name: wanted -> used" lines, as llama-quantize warns them


def convert(model_dir: str | Path, out: str | Path, *, type: str = "q8_0", expert_type: str | None = None,
            tensor_type: Iterable[str] = (), cold_type: str | None = "q4_k", progress: bool = True) -> ConvertResult:
    """Convert `model_dir` to `out` (and `OUT.cold.gguf` unless cold_type is None or "none")."""
    out = Path(out)
    try:
        ckpt = Checkpoint(model_dir)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    arch = arch_for(ckpt)
    rules = TypeRules(output_type(type), output_type(expert_type) if expert_type else None,
                      tuple(parse_tensor_type(s) for s in tensor_type))
    cold = None if cold_type in (None, "none") else output_type(cold_type)
    _check_writable(out)
    plan = arch.plan()
    _check_shapes(arch, plan)
    n_vocab = next((t.shape[0] for t in plan if t.name == "token_embd.weight"), None)
    if n_vocab is None:
        raise ConvertError(f"{ckpt.dir} has no token embedding (model.embed_tokens.weight)")
    if arch.cfg.get("vocab_size", n_vocab) != n_vocab:   # checked before the vocabulary is padded to it
        raise ConvertError(f"config.json vocab_size={arch.cfg['vocab_size']} but the token embedding has {n_vocab} rows")
    try:
        vocab = load_vocab(ckpt.dir, n_vocab)
    except VocabError as e:
        raise ConvertError(str(e)) from None
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, UnicodeDecodeError) as e:
        raise ConvertError(f"the tokenizer files in {ckpt.dir} are malformed ({type(e).__name__}: {e})") from None

    types = {t.name: rules.choose(t) for t in plan}
    fallbacks = tuple(f"{t.name}: {rules.wanted(t).name} does not fit rows of {t.shape[-1]}, using {types[t.name].name}"
                      for t in plan if types[t.name] != rules.wanted(t))
    for line in fallbacks:
        log.warning("%s", line)
    ftype = _FILE_TYPE[rules.default]

    has_experts = any(t.role == Role.EXPERT for t in plan)
    if cold is not None and not has_experts:
        log.info("%s has no expert tensors: no cold file written", ckpt.dir.name)
        cold = None
    extra = {keys.EXPERTS_SHA256: _HASH_PLACEHOLDER} if has_experts else {}
    _remove_stale(out)
    cold_out = keys.cold_path_for(out) if cold is not None else None
    if cold_out is not None:
        _remove_stale(cold_out)
    written: list[Path] = []
    try:
        tmp, digest = _write(out, arch, plan, types, vocab, ftype, extra, progress,
                             hash_key=keys.EXPERTS_SHA256 if has_experts else None)
        written.append(tmp)
        if cold_out is not None:
            cold_types = {t.name: (fit(cold, t.shape[-1]) if t.role == Role.EXPERT else types[t.name]) for t in plan}
            extra = {keys.COLD_OF: digest, keys.COLD_TYPE: cold.name}
            written.append(_write(cold_out, arch, plan, cold_types, vocab, _FILE_TYPE[cold], extra, progress)[0])
            os.replace(written.pop(), cold_out)   # the cold file first: no main file ever lacks its cold copies
        os.replace(written.pop(), out)
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    return ConvertResult(out, cold_out, digest, types, fallbacks)


def _partial_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.partial-{pid}")


def _remove_stale(path: Path) -> None:
    """Partial files of conversions to `path` whose process is gone (killed: no cleanup of its own ran)."""
    for p in path.parent.glob(f".{path.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted conversion", p)
        except PermissionError:
            pass   # alive, someone else's


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConvertError(f"output {out} is a directory; give a file name such as {out}/model.gguf")
    if not parent.is_dir():
        raise ConvertError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"cannot write to {parent}: permission denied; choose another output path")


def _check_shapes(arch: Arch, plan: list[PlannedTensor]) -> None:
    """Catch a checkpoint that disagrees with its config before writing anything."""
    hidden = arch.cfg.get("hidden_size")
    for t in plan:
        if t.name == "token_embd.weight" and hidden is not None and t.shape[1] != hidden:
            raise ConvertError(f"shape mismatch: token_embd has width {t.shape[1]} but config.json hidden_size is {hidden}")
        if t.role == Role.EXPERT and len(t.shape) != 3:
            raise ConvertError(f"shape mismatch: expert tensor {t.name} has shape {t.shape}, expected 3-D")
        if t.name.endswith(("attn_q.weight", "attn_k.weight")) and arch.permute_qk:
            if "num_attention_heads" not in arch.cfg:
                raise ConvertError(f"{arch.ckpt.dir}/config.json has no num_attention_heads")
            heads = arch.cfg["num_attention_heads"] if "attn_q" in t.name else (
                arch.cfg.get("num_key_value_heads") or arch.cfg["num_attention_heads"])
            if t.shape[0] % (2 * heads):
                raise ConvertError(f"shape mismatch: {t.name} has {t.shape[0]} rows, not a multiple of 2 x {heads} heads")


def _metadata(w: gguf.GGUFWriter, arch: Arch, ftype: gguf.LlamaFileType) -> None:
    """general.* exactly as convert_hf_to_gguf.py's prepare_metadata derives it."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, arch.ckpt.dir, None, total)
    if meta.name is None:
        meta.name = arch.ckpt.dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    arch.write_hparams(w)
    w.add_file_type(ftype)
    arch.write_arch_hparams(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write(path: Path, arch: Arch, plan: list[PlannedTensor], types: dict[str, QType], vocab, ftype,
           extra: dict[str, str], progress: bool, hash_key: str | None = None) -> tuple[Path, str]:
    """Write the GGUF meant for `path` under a temporary name next to it, returned with the sha256 of its expert
    tensors' bytes (which also replaces the placeholder value of `hash_key`); the caller renames it."""
    tmp = _partial_name(path, os.getpid())
    w = gguf.GGUFWriter(None, arch.arch_name)
    for t in plan:
        qt = types[t.name]
        w.add_tensor_info(t.name, byte_shape(t.shape, qt), np.dtype(np.uint8), _nbytes(t, qt), raw_dtype=qt)
    _metadata(w, arch, ftype)
    try:
        write_vocab(w, vocab, arch.ckpt.dir, len(vocab.tokens), llama_space_prefix=arch.writes_space_prefix)
    except (KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"the tokenizer files in {arch.ckpt.dir} are malformed ({type(e).__name__}: {e})") from None
    for k, v in extra.items():
        w.add_string(k, v)
    total = sum(_nbytes(t, types[t.name]) for t in plan)
    digest = hashlib.sha256()
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, file=sys.stderr,
                  disable=not progress, leave=False) as bar:
            for t in plan:
                _write_tensor(w, fout, t, types[t.name], digest if t.role == Role.EXPERT else None, bar)
        w.close()
        if hash_key is not None:
            _patch_string(tmp, hash_key, digest.hexdigest())
    except BaseException:
        try:
            w.close()   # on a full disk this flush fails too: the file goes all the same
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _nbytes(t: PlannedTensor, qt: QType) -> int:
    return int(np.prod(byte_shape(t.shape, qt)))


def _write_tensor(w: gguf.GGUFWriter, fout: BinaryIO, t: PlannedTensor, qt: QType, digest, bar: tqdm) -> None:
    part_shape = t.shape[1:] if len(t.parts) > 1 else t.shape
    w.write_padding(fout, fout.tell())
    if digest is not None:
        digest.update(f"{t.name}:{qt.name}:{t.shape}\n".encode())
    for load in t.parts:
        x = load()
        if x.shape != part_shape:
            raise ConvertError(f"shape mismatch: {t.name} part has shape {x.shape}, expected {part_shape}")
        q = quantize(x, qt)
        fout.write(memoryview(np.ascontiguousarray(q)).cast("B"))
        if digest is not None:
            digest.update(memoryview(q).cast("B"))
        bar.update(q.nbytes)
    w.write_padding(fout, _nbytes(t, qt))


def _patch_string(path: Path, key: str, value: str) -> None:
    """Overwrite a fixed-length string value in the KV section once the data it summarises is known."""
    kb = key.encode()
    needle = struct.pack("<Q", len(kb)) + kb + struct.pack("<I", gguf.GGUFValueType.STRING) + struct.pack("<Q", len(value))
    with open(path, "r+b") as f:
        head = f.read(1 << 24)
        at = head.find(needle)
        if at < 0:
            raise ConvertError(f"internal error: {key} not found in {path}")
        f.seek(at + len(needle))
        f.write(value.encode())
