"""OpenAI's API over the batch engine, as llama-server and llama-cpp-python's server serve it: /v1/completions,
/v1/chat/completions (server-sent events when streaming), /v1/models, /health, /metrics.

Handlers run on uvicorn's event loop; generation runs on the engine's thread, whose events each request's
asyncio queue receives. A client that goes away cancels its request, which frees its slot at the next step.
Errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}}. Beyond OpenAI's fields, a request may
carry `slo_ms` (its latency objective) and `task` (its task label) for --schedule task and the expert predictor.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from hotcold.engine.api import Model
from hotcold.engine.batch import BatchEngine, ContextOverflow, Event, Finish, Request
from hotcold.engine.chat import ChatTemplateError
from hotcold.engine.sampling import SamplingParams

from .metrics import exposition, registry
from .schema import ChatRequest, CompletionRequest, Sampling

POLL_S = 0.5   # how often a non-streamed request looks whether its client is still there


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def create_app(model: Model, engine: BatchEngine, api_key: str | None = None, name: str | None = None) -> FastAPI:
    """The app over a started engine; `name` is the model id clients give (default: the file's name)."""
    model_id = name or model.path.name
    created = int(time.time())
    app = FastAPI(title="hotcold moe-server")
    metrics = registry(engine)
    template = None

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})").response()
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        what = first.get("msg", "invalid request")
        return ApiError(400, f"{where}: {what}" if where else what, param=where or None).response()

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid API key (give it as 'Authorization: Bearer KEY')", "authentication_error",
                           "invalid_api_key")

    def check_model(m: str | None) -> None:
        if m is not None and m not in (model_id, str(model.path)):
            raise ApiError(404, f"the model {m!r} does not exist; this server serves {model_id!r} (GET /v1/models)",
                           code="model_not_found", param="model")

    def sampling(body: Sampling) -> SamplingParams:
        return SamplingParams(body.temperature, body.top_k, body.top_p, body.min_p, body.repeat_penalty,
                              seed=body.seed if body.seed is not None else model.seed)

    def submit(ids: list[int], body: Sampling, max_tokens: int | None, logprobs: int | None) -> tuple[Request, asyncio.Queue]:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        req = Request(ids, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), sampling(body), max_tokens,
                      body.stops(), body.ignore_eos, logprobs, slo_ms=body.slo_ms, task=body.task)
        try:
            engine.submit(req)
        except ContextOverflow as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages" if isinstance(body, ChatRequest)
                           else "prompt") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return req, q

    async def events(req: Request, q: asyncio.Queue, http: HttpRequest | None) -> AsyncIterator[Event]:
        """The request's events up to its finish; cancelled if the consumer stops early (a client gone)."""
        done = False
        try:
            while True:
                if http is None:
                    ev = await q.get()
                else:
                    try:
                        ev = await asyncio.wait_for(q.get(), POLL_S)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
                        continue
                if ev.finish is not None:
                    done = True
                yield ev
                if done:
                    return
        finally:
            if not done:
                req.cancel()

    async def collect(req: Request, q: asyncio.Queue, http: HttpRequest) -> tuple[str, list, Event | None]:
        """A non-streamed reply: its text, logprobs and finishing event (None: the client left first)."""
        text, lps, last = [], [], None
        async for ev in events(req, q, http):
            text.append(ev.text)
            lps.extend(ev.logprobs)
            last = ev
        if last is None or last.finish is None or last.finish is Finish.CANCELLED:
            return "", [], None
        if last.finish is Finish.ERROR:
            raise failed(last)
        return "".join(text), lps, last

    def failed(ev: Event) -> ApiError:
        return ApiError(500, ev.error or "generation failed", "server_error")

    def usage(ev: Event) -> dict[str, int]:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    def finish_reason(ev: Event) -> str | None:
        return ev.finish.value if ev.finish in (Finish.STOP, Finish.LENGTH) else None

    def sse(chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
        async def gen() -> AsyncIterator[dict[str, str]]:
            async for c in chunks:
                yield {"data": json.dumps(c)}
            yield {"data": "[DONE]"}
        return EventSourceResponse(gen(), ping=15)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "slots_idle": len(engine.slots) - engine.active, "slots_processing": engine.active,
                "requests_waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics_() -> Response:
        return Response(exposition(metrics), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "hotcold", "meta": {"n_ctx": model.n_ctx,
                                                                            "n_ctx_train": model.n_ctx_train,
                                                                            "n_vocab": model.n_vocab}}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: HttpRequest) -> Any:
        authorize(request)
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request (a list of several is not supported)", param="prompt")
            prompt = prompt[0]
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported by moe-server", param="echo")
        ids = model.tokenize(prompt, add_bos=True, special=True)
        req, q = submit(ids, body, body.max_tokens or 0, body.logprobs)
        cid = f"cmpl-{uuid.uuid4()}"
        now = int(time.time())

        def chunk(text: str, finish: str | None, lp: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

        offset = 0 if body.echo else len(prompt)

        def logprobs(ev: Event) -> dict[str, Any] | None:
            nonlocal offset
            if body.logprobs is None:
                return None
            lp = model._completion_logprobs(ev.logprobs, offset)
            offset += sum(len(t) for t in lp["tokens"])
            return lp

        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                if body.echo:
                    yield chunk(prompt, None)
                async for ev in events(req, q, None):
                    if ev.finish is Finish.ERROR:
                        yield {"error": {"message": ev.error, "type": "server_error"}}
                        return
                    if ev.finish is None:
                        yield chunk(ev.text, None, logprobs(ev))
                    else:
                        yield chunk("", finish_reason(ev))
                        if body.stream_options is not None and body.stream_options.include_usage:
                            yield {**chunk("", None), "choices": [], "usage": usage(ev)}
            return sse(chunks())
        text, lps, last = await collect(req, q, request)
        if last is None:
            return Response(status_code=499)
        out = chunk((prompt if body.echo else "") + text, finish_reason(last),
                    None if body.logprobs is None else model._completion_logprobs(lps, len(prompt)))
        out["usage"] = usage(last)
        return out

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: HttpRequest) -> Any:
        nonlocal template
        authorize(request)
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            template = template or model.chat_template()
            prompt = template.render([{"role": m.role, "content": m.text()} for m in body.messages],
                                     add_generation_prompt=True)
        except (ChatTemplateError, ValueError) as e:
            raise ApiError(400, f"chat template: {e}", param="messages") from None
        ids = model.tokenize(prompt, add_bos=False, special=True)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req, q = submit(ids, body, max_tokens or 0, int(body.top_logprobs or 0) if body.logprobs else None)
        cid = f"chatcmpl-{uuid.uuid4()}"
        now = int(time.time())

        def chunk(delta: dict[str, str], finish: str | None, lp: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for ev in events(req, q, None):
                    if ev.finish is Finish.ERROR:
                        yield {"error": {"message": ev.error, "type": "server_error"}}
                        return
                    if ev.finish is None:
                        yield chunk({"content": ev.text}, None,
                                    model._chat_logprobs(ev.logprobs) if body.logprobs else None)
                    else:
                        yield chunk({}, finish_reason(ev))
                        if body.stream_options is not None and body.stream_options.include_usage:
                            yield {**chunk({}, None), "choices": [], "usage": usage(ev)}
            return sse(chunks())
        text, lps, last = await collect(req, q, request)
        if last is None:
            return Response(status_code=499)
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": model._chat_logprobs(lps) if body.logprobs else None,
                             "finish_reason": finish_reason(last)}],
                "usage": usage(last)}

    return app

