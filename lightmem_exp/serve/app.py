"""The OpenAI-compatible HTTP API of `python -m lightmem_exp.serve` (FastAPI; request bodies validated by pydantic).

  GET  /v1/models            the one model served
  POST /v1/chat/completions  `stream` false or true (server-sent events, `data: [DONE]` last). Honoured:
                             `temperature` (0 = greedy; default 1 as OpenAI's), `top_p`, `max_tokens` or
                             `max_completion_tokens` (default: the server's `--max-tokens`; capped at the room the
                             context leaves), `stop` (up to 4 strings), `seed` (a seeded sampled request runs in a
                             batch of its own), `stream_options.include_usage`, and vLLM's `top_k` and `ignore_eos`.
                             The same warpers act on token and memory logits. Other fields are ignored; `n` > 1,
                             tools and a non-text `response_format` are refused.
  GET  /health               status, model, queue length and counters

The recall trace is the extra field `choices[0].recall_trace` (in a stream: on the chunk carrying `finish_reason`):
one item per recall, `{memory_id, index, score, candidates: [{memory_id, score}], memory_text, decoded_text,
closed}`
(see `lightmem_exp.serve.engine`); [] for a reply without recall and for models without a bank. With the `openai`
client: `completion.choices[0].recall_trace`. `content` is the answer: for a recall model, the text after the
decoded memory's end marker.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 malformed request (not JSON, a bad
or missing field, unsupported option) or a prompt that fills the context (code `context_length_exceeded`), 401
missing or wrong bearer token (when one is set), 404 unknown model (`model_not_found`) or path, 503 queue full, 504
no reply within the per-request timeout. A client that disconnects cancels its request: its row stops at the next
step, and the batch it shares goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightmem_exp.serve.engine import Completion, Engine, GenRequest, QueueFull, Sampling
from lightmem_exp.serve.http import UvicornServer, bearer_ok
from lightmem_exp.serve.model import MemoryModel

POLL_S = 0.25  # how often a waiting non-streaming request checks whether its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request schema ------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_chat(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    ignore_eos: bool = False
    n: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: dict | None) -> dict | None:
        if v is not None and v.get("type") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported (only 'text')")
        return v

    def sampling(self) -> Sampling:
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed)


def _validation_error(e: ValidationError) -> ApiError:
    errors = e.errors()
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:3]]
    param = ".".join(str(x) for x in errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return ApiError(400, "; ".join(parts), param=param)


# ---- the app ---------------------------------------------------------------------------------------------------


def create_app(engine: Engine, *, token: str | None = None, timeout_s: float = 60.0,
               default_max_tokens: int = 256) -> FastAPI:
    """The API over `engine` (started and stopped by the caller). `token`: the bearer token every request needs."""
    mm = engine.mm
    created = int(time.time())
    app = FastAPI(title="lightmem_exp serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    def authorise(request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization"), token):
            raise ApiError(401, "missing or wrong bearer token", "authentication_error", code="invalid_api_key")

    @app.get("/health")
    def health(request: Request) -> dict:
        authorise(request)
        return {"status": "ok", "model": mm.name, "kind": mm.kind, "recall": mm.recall if mm.recalls else "off",
                "bank": len(mm.bank) if mm.bank is not None else 0, "auth": bool(token), **engine.stats()}

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        authorise(request)
        return {"object": "list", "data": [{"id": mm.name, "object": "model", "created": created,
                                            "owned_by": "lightmem_exp", "kind": mm.kind,
                                            "context_length": mm.context_tokens}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorise(request)
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise _validation_error(e) from None
        if body.model != mm.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {mm.name!r}",
                           param="model", code="model_not_found")
        prompt = mm.prompt_ids([m.as_chat() for m in body.messages])
        if len(prompt) >= mm.context_tokens:
            raise ApiError(400, f"this model's maximum context length is {mm.context_tokens} tokens; the messages "
                           f"take {len(prompt)}, leaving no room for a reply", param="messages",
                           code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind: str, value: Any) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone (server stopping): nobody waits for this row
                req.cancelled.set()

        req = GenRequest(prompt, body.max_tokens or body.max_completion_tokens or default_max_tokens,
                         body.sampling(), tuple(body.stop), body.ignore_eos,
                         on_text=(lambda t: put("text", t)) if body.stream else None)
        try:
            engine.submit(req, lambda result: put("done", result))
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}", "server_error", code="queue_full") from None
        deadline = loop.time() + timeout_s
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), mm.name)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.stream(events, req, deadline, usage), media_type="text/event-stream")
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=min(POLL_S, deadline - loop.time()))
            except TimeoutError:
                if loop.time() >= deadline:
                    req.cancelled.set()
                    raise ApiError(504, f"no reply within {timeout_s} s", "server_error", code="timeout") from None
                if await request.is_disconnected():
                    req.cancelled.set()
                    return Response(status_code=499)  # nobody reads it: the client is gone
                continue
            if kind == "done":
                break
        if not isinstance(value, Completion):
            raise _failed(value)
        return JSONResponse(reply.body(value))

    return app


def _failed(result: BaseException | None) -> ApiError:
    if result is None:
        return ApiError(503, "the request was cancelled (the server is stopping)", "server_error")
    return ApiError(500, f"generation failed: {type(result).__name__}: {result}", "server_error")


class _Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, cid: str, created: int, model: str):
        self.cid, self.created, self.model = cid, created, model

    def body(self, c: Completion) -> dict:
        return {"id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.content},
                             "finish_reason": c.finish_reason, "recall_trace": c.recall_trace}],
                "usage": c.usage()}

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, **extra}
        return self._event({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [choice]})

    @staticmethod
    def _event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(self, events: asyncio.Queue, req: GenRequest, deadline: float, usage: bool
                     ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - loop.time()))
                if kind == "done":
                    break
                yield self.chunk({"content": value})
            if isinstance(value, Completion):
                yield self.chunk({}, value.finish_reason, recall_trace=value.recall_trace)
                if usage:
                    yield self._event({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                                       "model": self.model, "choices": [], "usage": value.usage()})
            else:
                yield self._event(_failed(value).body())
        except TimeoutError:
            yield self._event(ApiError(504, "no reply within the request timeout", "server_error",
                                       code="timeout").body())
        finally:
            req.cancelled.set()  # a no-op once the row is done; otherwise (timeout, disconnect) its row stops
        yield "data: [DONE]\n\n"


@contextmanager
def serving(mm: MemoryModel, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
            timeout_s: float = 60.0, default_max_tokens: int = 256, **engine_kw: Any) -> Iterator[tuple[str, Engine]]:
    """Serve `mm` from background threads while the block runs (tests, bench): yields (the API's base URL, the
    engine); stops the server and the engine at the end."""
    engine = Engine(mm, **engine_kw).start()
    server = UvicornServer(create_app(engine, token=token, timeout_s=timeout_s, default_max_tokens=default_max_tokens),
                           host, port).start()
    try:
        yield f"{server.url}/v1", engine
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()
