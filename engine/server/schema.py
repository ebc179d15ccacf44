"""The request bodies of OpenAI's API that moe-server reads, as pydantic models (fields it does not use are
accepted and ignored, as OpenAI's clients send them)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat completions share."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float = Field(0.8, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(40, ge=0)             # llama.cpp's, beyond OpenAI's schema
    min_p: float = Field(0.05, ge=0.0, le=1.0, allow_inf_nan=False)
    repeat_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    seed: int | None = None
    ignore_eos: bool = False                 # llama-server's
    n: int = Field(1, ge=1, le=1)            # one choice per request
    # hotcold's, for --schedule task (eMoE): the latency objective in ms from arrival to the last token (a JSON
    # number, strictly: "100" or true are refused), and the task label the expert predictor and scheduler read
    slo_ms: float | None = Field(None, gt=0, allow_inf_nan=False, strict=True)
    task: str | None = Field(None, min_length=1, max_length=256)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (a list of parts: its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
