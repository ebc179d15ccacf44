"""The Python API, shaped like llama-cpp-python's `Llama` so its users feel at home.

    m = hotcold.Model.load("model.gguf", n_ctx=2048)
    for piece in m.generate("def fib(n):", max_tokens=64, temperature=0):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numba
import numpy as np
from gguf import Keys

from hotcold.keys import cold_path_for

from .chat import ChatTemplate
from .gguf_file import GGUFFile
from .model import MmapExperts, Transformer
from .residency import Budget, Device, ResidencyOptions
from .store import ExpertCache, cold_experts, open_cold, plain_report
from .sampling import Sampler, SamplingParams
from .tokenizer import Detokenizer, Tokenizer


class Model:
    """A loaded GGUF model with one context (KV cache) that successive calls reuse by common prefix."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, seed: int | None = None,
                 verbose: bool = False, n_batch: int = 512, expert_budget: str | int | float | None = None,
                 cache_policy: str = "lru", miss: str = "hot", eras_alpha: float = 0.0, eras_beta: float = 0.0,
                 prefetch: int = 0, cold_path: str | Path | None = None, miss_t1: float = 0.6,
                 miss_t2: float = 0.9, device: str = "cpu", vram_budget: str | int | None = None,
                 miss_placement: str = "auto") -> None:
        t0 = time.perf_counter()
        self.verbose = verbose
        vram = self._vram_bytes(vram_budget, device, expert_budget)
        self.path = Path(path)
        if n_threads is not None:
            if not 1 <= n_threads <= numba.config.NUMBA_NUM_THREADS:
                raise ValueError(f"n_threads={n_threads}: this machine allows 1..{numba.config.NUMBA_NUM_THREADS}")
            numba.set_num_threads(n_threads)
        self.file = GGUFFile(self.path)
        self.metadata: dict[str, Any] = self.file.metadata
        if n_ctx <= 0:
            raise ValueError(f"n_ctx={n_ctx} must be positive")
        if n_batch <= 0:
            raise ValueError(f"n_batch={n_batch} must be positive")
        self.n_batch = n_batch
        opt = ResidencyOptions.build(Budget.parse("100%" if expert_budget is None else expert_budget), cache_policy,
                                     miss, eras_alpha, eras_beta, prefetch, miss_t1, miss_t2, device, miss_placement)
        self.gpu = None
        if opt.device == Device.CUDA:  # imported here: numba.cuda is only needed on this path
            from .cuda_memory import Gpu
            from .cuda_model import CudaTransformer
            self.gpu = Gpu(vram)
            self.model: Transformer = CudaTransformer(self.file, n_ctx, self.gpu, n_batch)
        else:
            self.model = Transformer(self.file, n_ctx)
        self.cache: ExpertCache | None = None
        residency = (expert_budget is not None or miss != "hot" or eras_alpha or eras_beta or prefetch
                     or cold_path is not None or opt.device != Device.CPU)
        if residency:
            self.cache = self._expert_cache(opt, cold_path)
        self.tokenizer = Tokenizer.from_metadata(self.metadata)
        self.seed = seed
        self._tokens: list[int] = []  # what the KV cache holds
        self.timings: dict[str, float] = {"load_s": time.perf_counter() - t0}

    def _expert_cache(self, opt: ResidencyOptions, cold_path: str | Path | None) -> ExpertCache:
        """The hot arena over this file's experts and, when the miss mode needs them, the cold copies."""
        if not self.model.cfg.is_moe:
            raise ValueError(f"{self.path} is a dense model: expert residency options need an MoE model")
        mmap = self.model.experts
        assert isinstance(mmap, MmapExperts)
        cold = None
        if opt.miss.value != "hot" or cold_path is not None:
            self.cold_file = open_cold(self.file, Path(cold_path) if cold_path else cold_path_for(self.path))
            cold = cold_experts(self.cold_file, self.model.cfg.n_layer)
        if self.gpu is not None:
            from .cuda_model import CudaTransformer, device_cache
            assert isinstance(self.model, CudaTransformer)
            cache = device_cache(self.model, mmap.experts, opt, cold)
            if self.verbose and cache.miss_cost is not None:
                c = cache.miss_cost
                print(f"cold miss cost: GPU {c.gpu_s[0] * 1e3:.3f}/{c.gpu_s[1] * 1e3:.3f} ms, CPU {c.cpu_s[0] * 1e3:.3f}/"
                      f"{c.cpu_s[1] * 1e3:.3f} ms for 1/{c.n} tokens", file=sys.stderr)
        else:
            cache = ExpertCache(mmap.experts, opt, cold)
        self.model.experts, self.model.prefetch = cache, opt.prefetch
        return cache

    @staticmethod
    def _vram_bytes(vram_budget: str | int | None, device: str, expert_budget: object) -> int | None:
        """The VRAM budget in bytes: everything the model keeps on the GPU (dense weights, KV cache,
        buffers, expert slots)."""
        if vram_budget is None:
            return None
        if device != "cuda":
            raise ValueError(f"vram_budget needs device='cuda' (--device cuda), not device={device!r}")
        if expert_budget is not None:
            raise ValueError("give vram_budget (the GPU's share: the hot experts get what the dense layers leave) "
                             "or expert_budget, not both")
        b = Budget.parse(vram_budget)
        if b.nbytes is None:
            raise ValueError(f"vram_budget={vram_budget!r}: give a size such as '6GiB' (a share of the experts "
                             "is expert_budget, --expert-budget)")
        return b.nbytes

    def expert_stats(self) -> dict[str, Any]:
        """Expert-cache counters: totals under tokens/hits/misses/cold/skipped/bytes_moved, `layers` per layer,
        `activations` (layer x expert selection counts)."""
        return self.cache.report() if self.cache else plain_report(self.model.cfg.n_layer)

    def save_expert_heatmap(self, path: str | Path) -> Path:
        """PNG of the layer x expert activation shares counted so far."""
        from .heatmap import save_heatmap
        return save_heatmap(np.array(self.expert_stats()["activations"]), path, f"{self.path.name}: expert activations")

    def reset_expert_stats(self) -> None:
        if self.cache:
            self.cache.reset_stats()

    @classmethod
    def load(cls, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, **options: Any) -> "Model":
        return cls(path, n_ctx=n_ctx, n_threads=n_threads, **options)

    # --- properties ------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.model.cfg.n_vocab

    # --- tokens ----------------------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """UTF-8 bytes of the tokens' text, as llama-cpp-python returns them."""
        return self.tokenizer.detokenize([int(t) for t in ids])

    # --- evaluation ------------------------------------------------------------------------------------

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit the context of {self.n_ctx}; raise n_ctx (--ctx-size) "
                             "or shorten the prompt")

    def _eval(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Bring the KV cache to hold `ids`, reusing the longest common prefix; logits of the new tokens."""
        self._check_fits(len(ids))
        keep = 0
        for a, b in zip(self._tokens, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # always evaluate at least the last token, for its logits
        self._tokens = list(ids[:keep])
        out = self._forward(ids[keep:], start=keep, all_logits=all_logits)
        self._tokens = list(ids)
        return out

    def _forward(self, ids: Sequence[int], start: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate `ids` at positions start.. in batches of n_batch; logits of all of them or of the last."""
        if start == 0 and self.cache:
            self.cache.new_sequence()
        self.model.n_past = start
        ids = np.asarray(ids, dtype=np.int64)
        outs = [self.model.forward(ids[i:i + self.n_batch], all_logits=all_logits)
                for i in range(0, len(ids), self.n_batch)]
        return np.concatenate(outs) if all_logits else outs[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (len(ids), n_vocab) of every position, from a fresh context."""
        if not ids:
            raise ValueError("logits() needs at least one token")
        self._check_fits(len(ids))
        self._tokens = []
        out = self._forward(ids, start=0, all_logits=True)
        self._tokens = list(ids)
        return out

    def perplexity(self, text: str | Sequence[int], n_ctx: int | None = None) -> float:
        """llama.cpp `perplexity`'s measure: text (or its token ids) cut into chunks of n_ctx tokens, each
        starting with BOS; the second half of each chunk is scored (its first half is context)."""
        n = min(n_ctx or self.n_ctx, self.n_ctx)
        ids = self.tokenize(text, add_bos=False) if isinstance(text, str) else list(text)
        if len(ids) < n:
            raise ValueError(f"perplexity needs at least n_ctx={n} tokens of text, got {len(ids)}")
        nll, count = 0.0, 0
        for start in range(0, len(ids) - n + 1, n):
            chunk = ids[start:start + n]
            if self.tokenizer.bos_id is not None and self.tokenizer.add_bos:
                chunk = [self.tokenizer.bos_id] + chunk[1:]
            logits = self.logits(chunk).astype(np.float64)
            first = n // 2
            z = logits[first - 1:n - 1]
            lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            nll += float(np.sum(lse - z[np.arange(len(z)), chunk[first:]]))
            count += len(z)
        return float(np.exp(nll / count))

    # --- generation ------------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 add_bos: bool = True) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece (stops on EOS/EOT, a stop string, or max_tokens)."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenize(prompt, add_bos=add_bos, special=True)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._check_fits(len(ids) + 1)
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty,
                                         seed=self.seed if seed is None else seed))
        for t in ids:
            sampler.accept(t)
        t0 = time.perf_counter()
        logits = self._eval(ids)[-1]
        t1 = time.perf_counter()
        detok = Detokenizer(self.tokenizer, special=False)  # control tokens are not text (llama-cpp-python)
        text, emitted, n_gen = "", 0, 0
        limit = max_tokens if max_tokens and max_tokens > 0 else self.n_ctx - len(ids)
        finish, cut = "length", False
        while n_gen < limit and len(self._tokens) < self.n_ctx:
            tok = sampler.sample(logits)
            n_gen += 1
            if self.tokenizer.is_eog(tok) and not ignore_eos:
                finish = "stop"
                break
            sampler.accept(tok)
            text += detok.feed(tok)
            hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), default=-1)
            if hit >= 0:  # a stop string: emit up to it, never the string itself
                if hit > emitted:
                    yield text[emitted:hit]
                finish, cut = "stop", True
                break
            safe = len(text) - max((_partial_suffix(text, s) for s in stops), default=0)
            if safe > emitted:  # hold back what may be the start of a stop string
                yield text[emitted:safe]
                emitted = safe
            self._tokens.append(tok)
            logits = self._forward([tok], start=len(self._tokens) - 1)[-1]
        if not cut:
            text += detok.flush()
            if len(text) > emitted:
                yield text[emitted:]
        t2 = time.perf_counter()
        self.last_finish_reason = finish
        self.timings.update(prompt_tokens=len(ids), prompt_s=t1 - t0, gen_tokens=n_gen, gen_s=t2 - t1)

    def create_completion(self, prompt: str, max_tokens: int | None = 16, stream: bool = False,
                          **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped text completion (llama-cpp-python's create_completion)."""
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": str(self.path),
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        pieces = self.generate(prompt, max_tokens=max_tokens or 0, **kwargs)
        if stream:
            def gen() -> Iterator[dict[str, Any]]:
                for p in pieces:
                    yield chunk(p, None)
                yield chunk("", self.last_finish_reason)
            return gen()
        text = "".join(pieces)
        out = chunk(text, self.last_finish_reason)
        n_prompt, n_gen = int(self.timings["prompt_tokens"]), int(self.timings["gen_tokens"])
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
        return out

    def chat_template(self) -> ChatTemplate:
        tok = self.tokenizer
        piece = lambda i: tok.token_to_piece(i).decode("utf-8", errors="replace") if i is not None else ""  # noqa: E731
        return ChatTemplate(self.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE), piece(tok.bos_id), piece(tok.eos_id))

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None,
                               stream: bool = False, **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped chat completion: the model's chat template, then a completion."""
        prompt = self.chat_template().render(messages, add_generation_prompt=True)
        ids = self.tokenize(prompt, add_bos=False, special=True)
        cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        pieces = self.generate(ids, max_tokens=max_tokens or 0, **kwargs)

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": str(self.path),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

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
                             "finish_reason": self.last_finish_reason}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop (held back while streaming)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
