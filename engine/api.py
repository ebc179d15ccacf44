"""The Python API, shaped like llama-cpp-python's `Llama` so its users feel at home.

    m = hotcold.Model.load("model.gguf", n_ctx=2048)
    for piece in m.generate("def fib(n):", max_tokens=64, temperature=0):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import inspect
import logging
import resource
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numba
import numpy as np
from gguf import Keys

from hotcold.keys import cold_path_for, predictor_path_for
from hotcold.quant import QType, repack
from hotcold.quant.dequant import dequantize_rows

from .backend import Backend, CpuBackend, finite_extremes
from .chat import ChatTemplate
from .completion import Completion, token_logprobs
from .context import Context
from .experts.ahead import Ahead
from .experts.cache import ExpertCache
from .experts.cold import cold_experts, open_cold
from .experts.disk import StagedCold, expert_extents
from .experts.planner import MemoryPlan, expert_shape
from .experts.rules import MissMode
from .experts.tiered import dense_extents, tiered_store
from .memory import available_memory, owned_bytes
from .config import CacheType
from .gguf_file import GGUFFile
from .model import Transformer
from .options import Device, Options
from .predictor import Predictor
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .trace import Traces


def kernels_uncached() -> bool:
    """Whether Numba's on-disk cache lacks the engine's kernels (a first run: they will compile)."""
    from . import kernels
    try:
        return not Path(kernels.attention_f16._cache._cache_file._index_path).exists()
    except AttributeError:  # another Numba's internals: say nothing rather than guess
        return False


def _major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def file_defaults(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What the files next to the model choose where the user did not: with an expert or RAM budget, the expert
    predictor MODEL.predictor.npz (eMoE: moe-predictor train -m MODEL writes it there); under a RAM budget, misses
    adaptive (served by the cold copy while the hot one loads) when the cold copies are there (prefetch: see
    _disk_cache)."""
    budget = options.get("ram_budget") is not None or options.get("expert_budget") is not None
    out = dict(options)
    if budget and "predictor" not in out and predictor_path_for(path).is_file():
        out["predictor"] = predictor_path_for(path)
    if options.get("ram_budget") is None:
        return out
    cold = options.get("cold_path")
    if "miss" not in out and Path(cold if cold is not None else cold_path_for(path)).is_file():
        out["miss"] = MissMode.ADAPTIVE
    return out


log = logging.getLogger("hotcold")
DEFAULT_CTX = 4096  # the context when none is given: the model's training context, up to this (llama-cli's default)


class ModelBusyError(RuntimeError):
    """A second generation on a Model already generating (another thread, or an unfinished generator)."""


class Model:
    """A loaded GGUF model with one context (KV cache) that successive calls reuse by common prefix.

    Keywords are the fields of engine.options.Options (n_ctx, n_batch, n_threads, seed, verbose and the
    expert residency options), the same as moe-run's flags."""

    def __init__(self, path: str | Path | None = None, **options: Any) -> None:
        model_path = options.pop("model_path", None)   # llama-cpp-python's Llama(model_path=...)
        if (path is None) == (model_path is None):
            raise TypeError("give the model file once: Model(path) or Model(model_path=path)")
        path = path if path is not None else model_path
        t0 = time.perf_counter()
        self._busy = threading.Lock()
        self.options = opt = Options.parse(**file_defaults(Path(path), options))
        if opt.predictor is not None and "predictor" not in options:
            log.info("expert predictor: %s (next to the model; --predictor none for none)", opt.predictor)
        self._prefetch_given = "prefetch" in options
        self.verbose = opt.verbose
        self.path = Path(path)
        if opt.n_threads is not None:   # llama.cpp takes any count; Numba's pool is NUMBA_NUM_THREADS at most
            numba.set_num_threads(min(opt.n_threads, numba.config.NUMBA_NUM_THREADS))
        self.file = GGUFFile(self.path, random_access=opt.ram_budget is not None)
        self._helper = self._start_precompile(opt)
        self.plan: MemoryPlan | None = None
        self._cold_buf: np.ndarray | None = None
        if opt.ram_budget is not None:   # the dense tensors only: experts are read by the disk tier
            self.file.prefault(dense_extents(self.file))
        elif self.file.size < 0.9 * available_memory():
            self.file.prefault()   # page faults at load, not during the first tokens (llama.cpp copies at load)
        self.metadata: dict[str, Any] = self.file.metadata
        self.gpu = None
        self.model = Transformer.load(self.file, self._backend(opt), place_experts=self._repack_experts(opt))
        n_ctx = opt.n_ctx or min(self.model.cfg.n_ctx_train, DEFAULT_CTX)   # llama.cpp's -c 0: the model's
        if n_ctx > self.model.cfg.n_ctx_train:   # llama.cpp's llama_context warns the same
            log.warning("n_ctx=%d is more than the %d tokens %s was trained on: expect worse text past that",
                        n_ctx, self.model.cfg.n_ctx_train, self.path.name)
        # the context's KV cache and buffers come before the arena: on a GPU the arena takes what they leave
        self.ctx: Context = self.model.context(n_ctx, opt.n_batch, type_k=opt.type_k, type_v=opt.type_v,
                                               memory_limit=self._ram_bytes(opt), n_seq=opt.n_seq_max)
        self.cache: ExpertCache | None = self._expert_cache(opt) if opt.residency else None
        if self.cache is not None:
            self.ctx.experts = self.cache
        self.predictor: Predictor | None = self._predictor(opt) if opt.predictor is not None else None
        self.tokenizer = Tokenizer.from_metadata(self.metadata)
        self.seed = opt.seed
        self._warmup()
        self._stats_base = (_major_faults(), self.ctx.forward_s)
        self._load_s = time.perf_counter() - t0

    def _warmup(self) -> None:
        """A prompt of two tokens and one decode step, as llama.cpp warms up at load: the kernels compile (or
        load from Numba's cache) now, so that no prompt is timed with compilation in it. Through the plain
        store, so that no expert moves into an arena; the context is left empty."""
        from . import precompile
        if kernels_uncached():
            print("compiling kernels (first run only)", file=sys.stderr, flush=True)
        if self._helper is not None:   # this process's part, then the helper's from the cache
            helper, self._helper = self._helper, None
            try:
                precompile.compile_all(self._precompile[0])
            finally:
                try:
                    helper.wait(timeout=600)
                except subprocess.TimeoutExpired:   # whatever it has not cached, the warm-up compiles
                    helper.kill()
                    helper.wait()
        # every kernel, from the cache: the forward below does not call those for 5-8 or more than 8 rows
        precompile.compile_all(self._precompile[0] + self._precompile[1])
        ctx, store = self.ctx, self.ctx.experts
        bos = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0
        disk = self.plan is not None   # experts are never read through the map then: warm up through the store
        if not disk:
            ctx.experts = self.model.experts
        try:
            self.model.forward(np.full(min(2, ctx.n_batch, ctx.n_ctx - 1) or 1, bos), ctx)
            if ctx.n_past < ctx.n_ctx:
                self.model.forward(np.array([bos]), ctx)
        finally:
            ctx.experts = store
            ctx.seek(0)
        if self.cache is not None and self.cache.cold:
            self._warm_cold()
        if disk:
            self.cache.clear()

    def _warm_cold(self) -> None:
        """The cold copies' product kernels (their types are the cold file's, which the forward above did not
        run), for one row and for two, on the host where cold experts are computed."""
        host, s, act = self.model.backend.host, self.ctx.state, self.model.cfg.spec.activation
        for e in self.cache.cold_samples():
            for n in range(1, min(2, self.ctx.n_batch) + 1):
                x = s.h_host[:n]
                x.fill(0)
                host.glu(e, host.acts(x, s.host_h_acts), s.host_ffn, s.moe_host[:n], act)

    def _start_precompile(self, opt: Options) -> Any:
        """The kernels a CPU forward pass may call (self._precompile: the warm-up loads them all, so that none is
        compiled or loaded during a prompt), and on a first run a second process compiling half of them
        (precompile.py)."""
        self._precompile = ([], [])
        if opt.device != Device.CPU:
            return None
        from . import precompile
        files = [self.file.tensors.values()]
        if opt.residency and (opt.miss != MissMode.HOT or opt.cold_path is not None):
            try:                                                                 # the cold copies' types too
                cold = GGUFFile(opt.cold_path or cold_path_for(self.path))
                files.append(list(cold.tensors.values()))
                cold.close()
            except (OSError, ValueError):
                pass                                                             # the store says what is wrong
        types = [t.qtype for ts in files for t in ts if len(t.shape) >= 2 and t.name != "token_embd.weight"
                 and "_gate_inp" not in t.name]                                  # routers: small_matmul
        embd = self.file.tensors.get("token_embd.weight")
        args = (types, embd.qtype if embd is not None else QType.F32, opt.type_k == CacheType.F16)
        self._precompile = precompile.signatures(*args, store=opt.residency, repack=not opt.no_repack)
        if not kernels_uncached() or numba.config.NUMBA_NUM_THREADS < 2:
            return None
        return precompile.start(*args, repack=not opt.no_repack)

    def _repack_experts(self, opt: Options) -> bool:
        """Whether the plain store's experts are interleaved at load: with no expert store (every expert then stays
        resident) and room for the copy; a store's arena holds its own copies."""
        if opt.no_repack or opt.residency:
            return False
        if self.file.size > 0.5 * available_memory():
            log.info("experts kept as the file lays them out: interleaving them would copy %.1f GiB",
                     self.file.size / 2**30)
            return False
        if not repack.huge_pages():   # on 4 KiB pages they decode slower than the file's layout (quant/repack.py)
            log.info("experts kept as the file lays them out: transparent huge pages are off (%s)", repack.THP)
            return False
        return True

    def _backend(self, opt: Options) -> Backend:
        if opt.device != Device.CUDA:
            return CpuBackend(batch_invariant=opt.n_seq_max > 1, repack=not opt.no_repack)
        from .cuda.backend import CudaBackend  # numba.cuda is only needed on this path
        from .cuda.memory import Gpu
        self.gpu = Gpu(opt.vram_budget.nbytes if opt.vram_budget is not None else None)
        return CudaBackend(self.gpu)

    def _expert_cache(self, opt: Options) -> ExpertCache:
        """The hot arena over this file's experts and, when the miss mode needs them, the cold copies."""
        if not self.model.cfg.is_moe:
            raise ValueError(f"{self.path} is a dense model: expert residency options need an MoE model")
        if opt.ram_budget is not None:
            return self._disk_cache(opt)
        cold = None
        if opt.miss != MissMode.HOT or opt.cold_path is not None:
            self.cold_file = open_cold(self.file, opt.cold_path or cold_path_for(self.path))
            cold = cold_experts(self.cold_file, self.model.cfg.n_layer)
        cache = self.model.backend.expert_cache(self.model.file_experts, opt, cold, self.ctx)
        if self.verbose and cache.miss_cost is not None:
            c = cache.miss_cost
            print(f"cold miss cost: GPU {c.gpu_s[0] * 1e3:.3f}/{c.gpu_s[1] * 1e3:.3f} ms, CPU {c.cpu_s[0] * 1e3:.3f}/"
                  f"{c.cpu_s[1] * 1e3:.3f} ms for 1/{c.n} tokens", file=sys.stderr)
        return cache

    def _predictor(self, opt: Options) -> Predictor:
        """The expert predictor of --predictor, checked against this model, driving the cache before each prompt."""
        pred = Predictor.load(opt.predictor)
        cfg = self.model.cfg
        pred.check_model(cfg.n_embd, tuple(i for i, m in enumerate(cfg.moe_layers) if m), cfg.n_expert, self.path.name)
        assert self.cache is not None   # a predictor turns residency on
        self.cache.ahead = Ahead(pred, self.prompt_features, cfg.n_layer, cfg.n_expert_used, opt.predict_every)
        return pred

    def prompt_features(self, ids: Sequence[int]) -> np.ndarray:
        """(n_embd,) float32: the mean of the prompt's token embeddings, the expert predictor's input (eMoE-A)."""
        ids = np.asarray([int(t) for t in ids], dtype=np.int64)
        if not len(ids):
            raise ValueError("prompt_features needs at least one token")
        self._check_ids(ids.tolist())
        emb = self.model.token_embd
        out = np.empty((len(ids), emb.cols), dtype=np.float32)
        return dequantize_rows(emb.raw, emb.qtype, ids, out).mean(0)

    def predict_experts(self, ids: Sequence[int], task: str | None = None) -> np.ndarray | None:
        """(n_layer, n_expert) bool: the experts the predictor would load for this prompt with this arena (None
        without a predictor, or for a task it skips)."""
        if self.predictor is None or self.cache is None or not self.predictor.sensitive(task):
            return None
        slots = self.cache.arena.n_slots // max(len(self.predictor.layers), 1)
        return self.cache.ahead.mask(ids, task, slots)

    def predicted_output_tokens(self, task: str | None = None) -> float | None:
        """Tokens a request of `task` is expected to generate, from the predictor's traces (None without one)."""
        return None if self.predictor is None else self.predictor.output_tokens_for(task)

    def trace(self, prompts: Sequence[str | Mapping[str, str]], max_tokens: int = 32) -> "Traces":
        """Expert traces of greedy generations of `prompts` (strings or {"prompt", "task"}), as moe-trace writes."""
        from .trace import trace
        return trace(self, prompts, max_tokens)

    def _disk_cache(self, opt: Options) -> ExpertCache:
        """Under a RAM budget: experts read from disk into the hot arena, cold copies resident or read from disk,
        split by the planner (experts/planner.py)."""
        budget = self._ram_bytes(opt)
        hot = self.model.file_experts
        cold_layouts = None
        if opt.miss != MissMode.HOT or opt.cold_path is not None:
            self.cold_file = open_cold(self.file, opt.cold_path or cold_path_for(self.path), random_access=True)
            cold_layouts = cold_experts(self.cold_file, self.model.cfg.n_layer)
        store = tiered_store(self.file, hot, getattr(self, "cold_file", None), cold_layouts, opt, budget,
                             self._fixed_memory(), self.model.cfg.n_expert_used, self._prefetch_given)
        self.plan, self._readers, self._cold_buf = store.plan, store.readers, store.cold_buf
        if self.verbose:
            print(store.plan.describe(expert_shape(hot).count), file=sys.stderr)
        return store.cache

    def _ram_bytes(self, opt: Options) -> int | None:
        """The RAM budget in bytes (a share is of the file's size); None without one."""
        b = opt.ram_budget
        return None if b is None else b.nbytes if b.nbytes is not None else int(b.fraction * self.file.size)

    def _fixed_memory(self) -> dict[str, int]:
        """What the model holds whatever the experts do: dense weights (the file's non-expert tensors, in the
        page cache, and the copies made at load), the KV cache, the buffers of a forward pass."""
        m, ctx = self.model, self.ctx
        dense_file = sum(n for _, n in dense_extents(self.file))
        dense = dense_file + owned_bytes(m.blocks, m.token_embd, m.output, m.output_norm)
        return {"dense": dense, "kv_cache": ctx.kv.k.nbytes + ctx.kv.v.nbytes,
                "buffers": owned_bytes(ctx.state, ctx.rope_cos, ctx.rope_sin, ctx.pos, ctx.seq)}

    def memory(self) -> dict[str, int]:
        """Bytes of host memory by part: dense, kv_cache, buffers (see _fixed_memory), hot_arena, experts (the
        plain store's interleaved copies, engine/weights.py interleaved), cold (the
        resident cold copies, or the ring they are read into), page_cache (expert bytes of the model's files in
        the page cache now: under a RAM budget only what the reads could not drop), and their total."""
        parts = self._fixed_memory()
        cache = self.cache
        parts["hot_arena"] = cache.arena.buf.nbytes if cache is not None and self.gpu is None else 0
        plain = self.model.experts.experts
        parts["experts"] = owned_bytes(plain) if plain is not self.model.file_experts else 0   # interleaved copies
        cold = cache.cold if cache is not None else None
        parts["cold"] = (self._cold_buf.nbytes if self._cold_buf is not None
                         else cold.nbytes if isinstance(cold, StagedCold) else 0)
        files = [(self.file, self.model.file_experts)]
        if cache is not None and cold is not None and getattr(self, "cold_file", None) is not None:
            files.append((self.cold_file, cold.disk.layouts if isinstance(cold, StagedCold) else
                          cold_experts(self.cold_file, self.model.cfg.n_layer)))
        parts["page_cache"] = sum(f.cached_bytes([x for layer in expert_extents(f, ex) for e in layer for x in e])
                                  for f, ex in files)
        parts["total"] = sum(parts.values())
        return parts

    @property
    def timings(self) -> dict[str, float]:
        """load_s, and for the last generate(): prompt_tokens and prompt_s (the prompt's evaluation), gen_tokens and
        gen_s (the tokens generated and the wall time after the prompt), eval_runs and eval_s (the forward
        passes after the prompt, llama.cpp's "eval")."""
        return {"load_s": self._load_s, **self.ctx.timings}

    @property
    def last_finish_reason(self) -> str | None:
        return self.ctx.finish_reason

    def expert_stats(self) -> dict[str, Any]:
        """Expert-cache counters: totals under tokens/hits/misses/cold/skipped/bytes_moved, `layers` per layer,
        `activations` (layer x expert selection counts); since the last reset: major_faults (page faults that
        read the disk), stall_s (waiting for expert reads), compute_s (the rest of the forward passes)."""
        r = self.ctx.experts.report()
        faults, fwd = self._stats_base
        r["major_faults"] = _major_faults() - faults
        r["compute_s"] = max(self.ctx.forward_s - fwd - r.get("stall_s", 0.0), 0.0)
        r.setdefault("stall_s", 0.0)
        return r

    def save_expert_heatmap(self, path: str | Path) -> Path:
        """PNG of the layer x expert activation shares counted so far."""
        from .heatmap import save_heatmap
        return save_heatmap(np.array(self.expert_stats()["activations"]), path, f"{self.path.name}: expert activations")

    def reset_expert_stats(self) -> None:
        self.ctx.experts.reset_stats()
        self._stats_base = (_major_faults(), self.ctx.forward_s)

    @classmethod
    def load(cls, path: str | Path | None = None, **options: Any) -> "Model":
        return cls(path, **options)

    # --- properties ------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.model.cfg.n_vocab

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained on (its GGUF's context_length)."""
        return self.model.cfg.n_ctx_train

    def reset(self) -> None:
        """Empty the context (llama-cpp-python's Llama.reset)."""
        with self._exclusive():
            self.ctx.seek(0)

    def eval(self, ids: Sequence[int]) -> None:
        """Append tokens to the context, n_batch at a time (llama-cpp-python's Llama.eval)."""
        with self._exclusive():
            ids = [int(t) for t in ids]
            self._check_fits(self.ctx.n_past + len(ids))
            self._check_ids(ids)
            if ids:
                self._check_logits(self._forward(ids)[-1])

    # --- tokens ----------------------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """UTF-8 bytes of the tokens' text, as llama-cpp-python returns them."""
        ids = [int(t) for t in ids]
        self._check_ids(ids)
        return self.tokenizer.detokenize(ids)

    # --- evaluation ------------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One sequence at a time: the context (KV cache, buffers, expert store) is the Model's only one. A second
        caller, from another thread or while a generator is unfinished, gets a ModelBusyError, never a
        corrupted cache; many sequences on one model are the server's scheduler's work."""
        if not self._busy.acquire(blocking=False):
            raise ModelBusyError(f"{self.path.name}: this Model is already generating (in another thread, or a "
                                 "generator not yet finished or closed); use one Model per thread, or finish the "
                                 "first generation")
        try:
            yield
        finally:
            self._busy.release()

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {self.n_vocab} (0..{self.n_vocab - 1})")

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit the context of {self.n_ctx}; raise n_ctx (--ctx-size) "
                             "or shorten the prompt")

    def _check_logits(self, logits: np.ndarray) -> np.ndarray:
        """A NaN or infinity in the logits is a broken model (weights the load could not check), not a token."""
        if not finite_extremes(logits, self.ctx.state.finite):
            raise ValueError(f"{self.path.name}: the model computed NaN or infinite logits at position "
                             f"{self.ctx.n_past}; its weights are corrupt (or overflow in this precision)")
        return logits

    def _eval(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Bring the KV cache to hold `ids`, reusing the longest common prefix; logits of the new tokens."""
        self._check_fits(len(ids))
        self._check_ids(ids)
        keep = 0
        for a, b in zip(self.ctx.tokens, ids):
            if a != b:
                break
            keep += 1
        self.ctx.seek(min(keep, len(ids) - 1))  # always evaluate at least the last token, for its logits
        return self._forward(ids[self.ctx.n_past:], all_logits=all_logits)

    def _forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the context in batches of n_batch; logits of all of them or of the last (the
        context's buffer, valid until the next forward)."""
        nb = self.ctx.n_batch
        ids = np.asarray(ids, dtype=np.int64)
        outs = [self.model.forward(ids[i:i + nb], self.ctx, all_logits=all_logits) for i in range(0, len(ids), nb)]
        return np.concatenate(outs) if all_logits else outs[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (len(ids), n_vocab) of every position, from a fresh context."""
        with self._exclusive():
            return self._logits(ids)

    def _logits(self, ids: Sequence[int]) -> np.ndarray:
        if not ids:
            raise ValueError("logits() needs at least one token")
        self._check_fits(len(ids))
        self._check_ids(ids)
        self.ctx.seek(0)
        return self._check_logits(self._forward(ids, all_logits=True))

    def perplexity(self, text: str | Sequence[int], n_ctx: int | None = None) -> float:
        """llama.cpp `perplexity`'s measure: text (or its token ids) cut into chunks of n_ctx tokens (default: the
        context, at most the training context), each starting with BOS; the second half of each chunk is scored
        (its first half is context)."""
        nll = np.concatenate(list(self.perplexity_chunks(text, n_ctx)))
        return float(np.exp(nll.mean()))

    def perplexity_chunks(self, text: str | Sequence[int], n_ctx: int | None = None) -> Iterator[np.ndarray]:
        """For each chunk of `perplexity`, the negative log-likelihoods (float64) of its scored tokens."""
        n = min(n_ctx or min(self.n_ctx, self.n_ctx_train), self.n_ctx)
        ids = self.tokenize(text, add_bos=False) if isinstance(text, str) else list(text)
        if n < 2 or len(ids) < n:
            raise ValueError(f"perplexity needs at least n_ctx={n} tokens of text (and n_ctx >= 2), got {len(ids)}")
        for start in range(0, len(ids) - n + 1, n):
            chunk = ids[start:start + n]
            if self.tokenizer.bos_id is not None and self.tokenizer.add_bos:
                chunk = [self.tokenizer.bos_id] + chunk[1:]
            with self._exclusive():
                logits = self._logits(chunk).astype(np.float64)
            first = n // 2
            z = logits[first - 1:n - 1]
            lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            yield lse - z[np.arange(len(z)), chunk[first:]]

    # --- generation ------------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False, add_bos: bool = True, task: str | None = None,
                 _logprobs: tuple[list, int] | None = None) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece (stops on EOS/EOT, a stop string, or max_tokens).
        `task` labels the prompt for an expert predictor (eMoE: some tasks are not predicted for).
        `_logprobs` (completions' logprobs): a list that gets (token, its logprob, the n best (token, logprob))
        for each generated token, n the tuple's second item."""
        with self._exclusive():   # released when the generator finishes, is closed or is collected
            ids = list(prompt) if not isinstance(prompt, str) else self.tokenize(prompt, add_bos=add_bos, special=True)
            stops = [stop] if isinstance(stop, str) else list(stop or [])
            self._check_fits(len(ids) + 1)
            sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                             seed=self.seed if seed is None else seed))
            for t in ids:
                sampler.accept(t)
            comp = Completion(self.tokenizer, sampler, len(ids), self.n_ctx, max_tokens, stops, ignore_eos,
                              None if _logprobs is None else _logprobs[1])
            if _logprobs is not None:
                comp.logprobs = _logprobs[0]
            t0 = time.perf_counter()
            self.ctx.experts.begin_prompt(ids, task)
            logits = self._check_logits(self._eval(ids)[-1])
            t1 = time.perf_counter()
            runs, eval_s = 0, 0.0
            while True:
                piece = comp.step(logits)
                if piece:
                    yield piece
                if comp.finish is not None:
                    break
                te = time.perf_counter()
                logits = self._check_logits(self._forward([comp.token])[-1])
                eval_s += time.perf_counter() - te
                runs += 1
            t2 = time.perf_counter()
            self.ctx.finish_reason = comp.finish
            self.ctx.timings = dict(prompt_tokens=len(ids), prompt_s=t1 - t0, gen_tokens=comp.n_gen, gen_s=t2 - t1,
                                    eval_runs=runs, eval_s=eval_s)

    def __call__(self, prompt: str, **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """create_completion, as llama-cpp-python's Llama is called."""
        return self.create_completion(prompt, **kwargs)

    def create_completion(self, prompt: str, max_tokens: int | None = 16, stream: bool = False, echo: bool = False,
                          logprobs: int | None = None, **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped text completion (llama-cpp-python's create_completion): `echo` puts the prompt before the
        text, `logprobs=n` gives each token's log-probability and the n most likely (with echo, the prompt's too)."""
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text: str, finish: str | None, lp: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": str(self.path),
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

        if logprobs is not None and (stream or int(logprobs) < 0):
            raise ValueError("logprobs needs stream=False and a count >= 0 (of the most likely tokens to list)")
        ids = self.tokenize(prompt, add_bos=True, special=True)
        trace: list = []
        pieces = self.generate(ids, max_tokens=max_tokens or 0, _logprobs=None if logprobs is None else
                               (trace, int(logprobs)), **kwargs)
        if stream:
            def gen() -> Iterator[dict[str, Any]]:
                if echo:
                    yield chunk(prompt, None)
                for p in pieces:
                    yield chunk(p, None)
                yield chunk("", self.last_finish_reason)
            return gen()
        text = "".join(pieces)
        lp = None
        if logprobs is not None:
            entries = trace
            if echo:
                entries = self._prompt_logprobs(ids, int(logprobs)) + trace
            lp = self._completion_logprobs(entries, 0 if echo else len(prompt))
        out = chunk(prompt + text if echo else text, self.last_finish_reason, lp)
        n_prompt, n_gen = int(self.timings["prompt_tokens"]), int(self.timings["gen_tokens"])
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
        return out

    def _chat_logprobs(self, trace: list) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            b = self.tokenizer.token_to_piece(t, special=False)
            return {"token": b.decode("utf-8", errors="ignore"), "logprob": lp, "bytes": list(b)}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(c, v) for c, v in top]} for t, lp, top in trace]}

    def _piece(self, t: int) -> str:
        return self.tokenizer.token_to_piece(t, special=False).decode("utf-8", errors="ignore")

    def _prompt_logprobs(self, ids: list[int], n: int) -> list:
        """(token, logprob, n best) of each prompt token given those before it; the first has none."""
        z = self.logits(ids)
        return [(ids[0], None, None)] + [token_logprobs(z[i - 1], ids[i], n) for i in range(1, len(ids))]

    def _completion_logprobs(self, entries: list, pos: int) -> dict[str, Any]:
        """llama-cpp-python's logprobs object: tokens, text_offset (into prompt + text: the first at `pos`),
        token_logprobs, top_logprobs."""
        tokens, offsets, lps, tops = [], [], [], []
        for t, lp, top in entries:
            piece = self._piece(t)
            tokens.append(piece)
            offsets.append(pos)
            pos += len(piece)
            lps.append(lp)
            tops.append(None if top is None else {self._piece(c): v for c, v in top})
        return {"tokens": tokens, "text_offset": offsets, "token_logprobs": lps, "top_logprobs": tops}

    def chat_template(self) -> ChatTemplate:
        tok = self.tokenizer
        piece = lambda i: tok.token_to_piece(i).decode("utf-8", errors="replace") if i is not None else ""  # noqa: E731
        return ChatTemplate(self.file.get_typed(Keys.Tokenizer.CHAT_TEMPLATE, str), piece(tok.bos_id), piece(tok.eos_id))

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None,
                               stream: bool = False, logprobs: bool = False, top_logprobs: int | None = None,
                               **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped chat completion: the model's chat template, then a completion; `logprobs` (with
        `top_logprobs` alternatives) as OpenAI's and llama-cpp-python's chat logprobs."""
        if logprobs and stream:
            raise ValueError("logprobs needs stream=False")
        prompt = self.chat_template().render(messages, add_generation_prompt=True)
        ids = self.tokenize(prompt, add_bos=False, special=True)
        cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        trace: list = []
        pieces = self.generate(ids, max_tokens=max_tokens or 0,
                               _logprobs=(trace, int(top_logprobs or 0)) if logprobs else None, **kwargs)

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": str(self.path),
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            def gen() -> Iterator[dict[str, Any]]:
                yield chunk({"role": "assistant"}, None)
                for p in pieces:
                    yield chunk({"content": p}, None)
                yield chunk({}, self.last_finish_reason)
            return gen()
        text = "".join(pieces)
        n_prompt, n_gen = int(self.timings["prompt_tokens"]), int(self.timings["gen_tokens"])
        return {"id": cid, "object": "chat.completion", "created": created, "model": str(self.path),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": self._chat_logprobs(trace) if logprobs else None,
                             "finish_reason": self.last_finish_reason}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}


# help(Model) and IDEs show the options as keywords
Model.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
     inspect.Parameter("model_path", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields(Options)])
