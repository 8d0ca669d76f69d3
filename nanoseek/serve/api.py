"""`nanoseek serve`: a DeepSeek/OpenAI-compatible HTTP API and the web chat page, on one machine.

    nanoseek serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints (each also without the /v1 prefix): POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus text), and the chat page at /. With an API key, the /v1 endpoints need
`Authorization: Bearer KEY`; /health, /metrics and the page (which asks for the key) do not. The request and
response fields are those of DeepSeek's API (docs: shared/spec/api.md): `reasoning_content` carries the text inside
<think>...</think>, usage reports prompt_cache_hit_tokens / prompt_cache_miss_tokens from the engine's prefix cache.

Robustness rules, because a public endpoint meets every kind of client:
- every request is bounded (body bytes before any JSON parsing, number of messages, prompt tokens against the
  context, max_tokens), and every error is an OpenAI-style body {"error": {"message", "type", "code"}} with the
  status of DeepSeek's table: 400 bad JSON / format, 401 bad key, 422 invalid parameters, 429 queue full, 503
  engine down. A client's mistake is never a 500;
- backpressure: at most --max-concurrency requests in the engine and --max-queue waiting; the next one gets 429 and
  Retry-After at once (an unbounded queue only turns overload into timeouts for everybody);
- a client that disconnects cancels its generation (engine.abort frees its cache blocks).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UsageError
from .worker import EngineWorker, Metrics, QueueFull, WorkerDead

log = logging.getLogger("nanoseek.serve")
WEB = Path(__file__).parent / "web"
# Model names that DeepSeek's own API uses, accepted so that tools configured for it work unchanged:
# deepseek-reasoner thinks first (R1 style), deepseek-chat answers directly.
ALIASES = {"deepseek-reasoner": True, "deepseek-chat": False}


@dataclass
class Limits:
    """Per-request bounds. Prompt tokens are also bounded by the engine's context (max_seq_len)."""
    max_body_bytes: int = 1 << 20        # 1 MiB of JSON is ~250k tokens of text: far beyond any context we serve
    max_messages: int = 512
    max_tokens: int = 4096               # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # None: the engine's context minus one generated token
    keepalive_s: float = 5.0             # SSE ": keep-alive" comment while a request waits (also detects hang-ups)


# --------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as {"error": {...}} with its HTTP status (and headers, e.g. Retry-After)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.param = status, message, code, headers, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(errors) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",)) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid parameters: " + "; ".join(parts) + more


# --------------------------------------------------------------------------------------------- request schemas
class _Open(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI-compatible servers do (clients send vendor extras).
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ResponseFormat(_Open):
    type: Literal["text", "json_object"] = "text"


class ThinkingOption(_Open):
    type: Literal["enabled", "disabled"]


class _Sampling(_Open):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)                # -1 or 0: off (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)   # what torch.Generator.manual_seed accepts
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    n: int = Field(1, ge=1, le=1)                          # one choice per request (ask twice for two)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if len(v) > 16:
            raise ValueError(f"at most 16 stop sequences (got {len(v)})")
        if any(not s or len(s) > 256 for s in v):
            raise ValueError("each stop sequence must have 1 to 256 characters")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v and any(i < 0 for i in v):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return v


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None      # json_object is accepted; output is not constrained
    tools: list[dict] | None = None                    # accepted; this server never emits tool_calls
    tool_choice: Any = None
    thinking: ThinkingOption | bool | None = None      # deep-think switch (DeepSeek style: {"type": "enabled"})
    chat_template_kwargs: dict | None = None           # vLLM style: {"thinking": true}


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=1)


# --------------------------------------------------------------------------------------------- ASGI middleware
class BodyLimit:
    """Refuse bodies over max_bytes before they are read whole or parsed (Content-Length, then while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = APIError(400, f"request body exceeds {self.max_bytes} bytes", "request_too_large")
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    return await err.response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise err
            return msg

        await self.app(scope, limited_receive, send)


class CountRequests:
    """Counts answered requests by endpoint and status for /metrics (streams count when their headers go out)."""

    ENDPOINTS = ("/chat/completions", "/completions", "/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path[3:] if path.startswith("/v1/") else path
        endpoint = next((e for e in self.ENDPOINTS if path == e or path.startswith(e + "/")), "other")

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                self.metrics.count_request(endpoint, int(msg["status"]))
            await send(msg)

        await self.app(scope, receive, counting_send)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` when it ends, whatever ended it (done, hang-up, error)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# --------------------------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_name: str = "nanoseek", api_key: str | None = None,
               max_concurrency: int = 16, max_queue: int = 64, limits: Limits | None = None,
               sampling_params=None, thinking_default: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` (not yet started: uvicorn's lifespan starts and stops the engine thread).

    engine: the Engine contract of docs/internals.md (add_request / step / abort / has_unfinished / stats);
    sampling_params: the SamplingParams class (default: nanoseek.infer.engine.SamplingParams).
    """
    if sampling_params is None:
        from ..infer.engine import SamplingParams as sampling_params
    limits = limits or Limits()
    metrics = Metrics()
    worker = EngineWorker(engine, max_concurrency=max_concurrency, max_queue=max_queue, metrics=metrics)
    ctx = int(getattr(engine, "max_seq_len", None) or 0) or None
    max_prompt = limits.max_prompt_tokens or (ctx - 1 if ctx else None)
    created = int(time.time())
    fingerprint = f"fp_nanoseek_{uuid.uuid5(uuid.NAMESPACE_DNS, model_name).hex[:8]}"
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)

    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.metrics, app.state.engine, app.state.limits = worker, metrics, engine, limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)

    # ------------------------------------------------------------------ error handlers: a clean body, always
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return APIError(422, _validation_message(exc.errors()), "invalid_parameter").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, msg, {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"internal error ({type(exc).__name__}); the request was not completed",
                        "internal_error").response()

    # ------------------------------------------------------------------ shared request handling
    def check_key(request: Request) -> None:
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            shown = f"****{given[-4:]}" if len(given) > 4 else "(none)"
            raise APIError(401, f"Authentication Fails, your api key {shown} is invalid. Send the key as "
                           "'Authorization: Bearer KEY'.", "invalid_api_key")

    async def parse(request: Request, schema):
        check_key(request)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # (RecursionError: nesting too deep for the parser)
            raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", "invalid_request")
        try:  # JSON may escape lone UTF-16 surrogates ("\ud800") that no UTF-8 text (or tokenizer) can hold
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request contains invalid unicode (a lone surrogate escape)", "invalid_unicode") \
                from None
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise APIError(422, _validation_message(e.errors()), "invalid_parameter") from None
        thinking = thinking_default
        if req.model is not None and req.model != model_name:
            if req.model not in ALIASES:
                raise APIError(400, f"Model Not Exist: {req.model!r}; this server serves {model_name!r} "
                               "(see GET /v1/models)", "model_not_found", param="model")
            thinking = ALIASES[req.model]
        return req, thinking

    def make_params(req, n_prompt: int, logprobs: bool, top_logprobs: int):
        if max_prompt is not None and n_prompt > max_prompt:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n_prompt} "
                           "tokens. Shorten the conversation.", "context_length_exceeded")
        want = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if want is not None and want > limits.max_tokens:
            raise APIError(422, f"max_tokens={want} is above this server's limit of {limits.max_tokens}",
                           "invalid_parameter", param="max_tokens")
        max_tokens = want or limits.max_tokens
        if ctx:  # never past the context: the answer ends with finish_reason "length"
            max_tokens = max(1, min(max_tokens, ctx - n_prompt))
        if req.stop_token_ids and vocab and max(req.stop_token_ids) >= vocab:
            raise APIError(422, f"stop_token_ids must be below the vocabulary size {vocab}", "invalid_parameter",
                           param="stop_token_ids")
        kw = dict(max_tokens=max_tokens, stop=tuple(req.stop or ()), stop_token_ids=tuple(req.stop_token_ids or ()),
                  ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs, seed=req.seed)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        if req.top_k is not None:
            kw["top_k"] = max(0, req.top_k)
        try:
            return sampling_params(**kw)
        except (ValueError, UsageError) as e:  # a combination the sampler refuses
            raise APIError(422, f"invalid parameters: {e}", "invalid_parameter") from None

    def submit(prompt: list[int], params, rid: str):
        try:
            return worker.submit(prompt, params, request_id=rid)
        except QueueFull as e:
            raise APIError(429, f"Rate limit reached: the server is busy ({e}). Retry after a second.",
                           "queue_full", headers={"Retry-After": "1"}) from None
        except WorkerDead as e:
            raise APIError(503, f"Server overloaded: {e}", "engine_unavailable", headers={"Retry-After": "5"}) from None

    async def next_item(job, request: Request | None):
        """The job's next StreamDelta; None on a keep-alive tick. Raises what the engine thread reported."""
        try:
            item = await asyncio.wait_for(job.queue.get(), limits.keepalive_s)
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                raise asyncio.CancelledError() from None
            return None
        if isinstance(item, WorkerDead):
            raise APIError(503, f"Server overloaded: {item}", "engine_unavailable", headers={"Retry-After": "5"})
        if isinstance(item, (ValueError, UsageError)):
            raise APIError(400, f"the engine refused the request: {item}", "invalid_request")
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", "engine_error")
        return item

    async def run_to_end(job, request: Request):
        """Collect a non-streamed request; a client that hangs up meanwhile cancels it."""
        try:
            while True:
                d = await next_item(job, request)
                if d is not None and d.finished:
                    return d.completion
        finally:
            worker.cancel(job)  # no-op when finished

    def token_str(i: int) -> str:
        return tokenizer.decode([int(i)])

    def top_list(entry) -> list[tuple[int, float]]:
        """One position's top logprobs as (token_id, logprob), from a dict {id: lp} or pairs."""
        if entry is None:
            return []
        items = entry.items() if isinstance(entry, dict) else entry
        return [(int(t), float(lp)) for t, lp in items]

    def chat_logprobs(x, top_n: int) -> dict | None:
        """OpenAI's chat logprobs {"content": [{token, logprob, bytes, top_logprobs}]} of a Completion or delta."""
        lps = getattr(x, "logprobs", None)
        if lps is None:
            return None
        tops = getattr(x, "top_logprobs", None) or [None] * len(lps)
        content = []
        for tid, lp, top in zip(x.token_ids, lps, tops):
            s = token_str(tid)
            content.append({"token": s, "logprob": float(lp), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": token_str(t), "logprob": v, "bytes": list(token_str(t).encode())}
                                             for t, v in top_list(top)[:top_n]]})
        return {"content": content}

    def text_logprobs(comp, top_n: int, offset0: int) -> dict | None:
        lps = getattr(comp, "logprobs", None)
        if lps is None:
            return None
        tops = getattr(comp, "top_logprobs", None) or [None] * len(lps)
        tokens, offsets, off = [], [], offset0
        for tid in comp.token_ids:
            s = token_str(tid)
            tokens.append(s)
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": [float(x) for x in lps], "text_offset": offsets,
                "top_logprobs": [{token_str(t): v for t, v in top_list(top)[:top_n]} for top in tops]}

    def reasoning_tokens(comp) -> int:
        think_end = getattr(tokenizer, "think_end_id", None)
        ids = list(comp.token_ids)
        if think_end is not None and think_end in ids:
            return ids.index(think_end) + 1
        if getattr(comp, "reasoning_content", None) and not getattr(comp, "content", None):
            return len(ids)  # cut off while still thinking
        return 0

    def usage(comp) -> dict:
        p, c = int(comp.prompt_tokens), int(comp.completion_tokens)
        hit = int(getattr(comp, "cached_tokens", 0) or 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": p - hit,
                "prompt_tokens_details": {"cached_tokens": hit},
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens(comp)}}

    def finish(reason: str | None) -> str:
        return reason if reason in ("stop", "length") else "stop"

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(request: Request):
        req, thinking = await parse(request, ChatRequest)
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"too many messages: {len(req.messages)} > {limits.max_messages}", "too_many_messages")
        if req.top_logprobs and not req.logprobs:
            raise APIError(422, "top_logprobs requires logprobs=true", "invalid_parameter", param="top_logprobs")
        if isinstance(req.thinking, bool):
            thinking = req.thinking
        elif req.thinking is not None:
            thinking = req.thinking.type == "enabled"
        if req.chat_template_kwargs:
            for k in ("thinking", "enable_thinking"):
                if k in req.chat_template_kwargs:
                    thinking = bool(req.chat_template_kwargs[k])
        messages = []
        for m in req.messages:
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise APIError(422, "only text content parts are supported by this model", "invalid_parameter",
                                   param="messages")
                text = "".join(p.text or "" for p in m.content)
            else:
                text = m.content or ""
            role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
            msg = {"role": role, "content": text}
            if m.role == "assistant" and m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            messages.append(msg)
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   thinking=thinking)
        except Exception as e:  # a template that rejects this conversation (e.g. role order)
            raise APIError(400, f"the chat template could not render these messages: {e}", "invalid_messages") from None
        top_n = req.top_logprobs or 0
        params = make_params(req, len(prompt), req.logprobs, top_n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job = submit(prompt, params, rid)
        now = int(time.time())
        base = {"id": rid, "created": now, "model": model_name, "system_fingerprint": fingerprint}
        if not req.stream:
            comp = await run_to_end(job, request)
            msg = {"role": "assistant", "content": comp.content or "", "reasoning_content": comp.reasoning_content or None}
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": msg,
                                 "logprobs": chat_logprobs(comp, top_n) if req.logprobs else None,
                                 "finish_reason": finish(comp.finish_reason)}],
                    "usage": usage(comp)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, reason=None, logprobs=None) -> str:
            c = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
            if include_usage:
                c["usage"] = None
            return _sse(c)

        async def events():
            streamed_lp = False   # per-delta logprobs sent (else all of them go with the last chunk)
            yield chunk({"role": "assistant", "content": ""})
            try:
                while True:
                    d = await next_item(job, None)
                    if d is None:
                        yield ": keep-alive\n\n"
                        continue
                    delta = {}
                    if d.reasoning_text:
                        delta["reasoning_content"] = d.reasoning_text
                    if d.text:
                        delta["content"] = d.text
                    lp = chat_logprobs(d, top_n) if req.logprobs and d.token_ids else None
                    streamed_lp = streamed_lp or lp is not None
                    if delta or lp:
                        yield chunk(delta, logprobs=lp)
                    if d.finished:
                        comp = d.completion
                        lp = chat_logprobs(comp, top_n) if req.logprobs and not streamed_lp else None
                        yield chunk({}, finish(d.finish_reason), lp)
                        if include_usage:
                            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(comp)})
                        break
            except APIError as e:
                yield _sse(e.body())
                return
            yield "data: [DONE]\n\n"

        return SSEResponse(events(), on_close=lambda: worker.cancel(job))

    async def completions(request: Request):
        req, _ = await parse(request, CompletionRequest)
        if req.suffix:
            raise APIError(422, "suffix (fill-in-the-middle) is not supported by this model", "invalid_parameter",
                           param="suffix")
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(422, "one prompt per request (send a list of prompts as separate requests)",
                               "invalid_parameter", param="prompt")
            p = p[0]
        if isinstance(p, str):
            prompt_text = p
            bos = getattr(tokenizer, "bos_token", None)
            prompt = tokenizer.encode(p, add_bos=not (bos and p.startswith(bos)))  # a rendered chat has its bos
        else:
            if vocab and any(not 0 <= t < vocab for t in p):
                raise APIError(422, f"prompt token ids must be in [0, {vocab})", "invalid_parameter", param="prompt")
            prompt, prompt_text = list(p), tokenizer.decode(p)
        if not prompt:
            raise APIError(422, "the prompt is empty", "invalid_parameter", param="prompt")
        top_n = req.logprobs or 0
        params = make_params(req, len(prompt), req.logprobs is not None, top_n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        job = submit(prompt, params, rid)
        base = {"id": rid, "created": int(time.time()), "model": model_name, "system_fingerprint": fingerprint}
        echo = prompt_text if req.echo else ""
        if not req.stream:
            comp = await run_to_end(job, request)
            return {**base, "object": "text_completion",
                    "choices": [{"index": 0, "text": echo + comp.text,
                                 "logprobs": text_logprobs(comp, top_n, len(echo)) if req.logprobs is not None else None,
                                 "finish_reason": finish(comp.finish_reason)}],
                    "usage": usage(comp)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text: str, reason=None, logprobs=None) -> str:
            c = {**base, "object": "text_completion",
                 "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
            if include_usage:
                c["usage"] = None
            return _sse(c)

        async def events():
            pos, streamed_lp = len(echo), False   # text offset of the next token; per-delta logprobs sent
            try:
                if echo:
                    yield chunk(echo)
                while True:
                    d = await next_item(job, None)
                    if d is None:
                        yield ": keep-alive\n\n"
                        continue
                    text = raw_text(d)
                    lp = None
                    if req.logprobs is not None and d.token_ids and getattr(d, "logprobs", None) is not None:
                        lp = text_logprobs(d, top_n, pos)
                        pos = lp["text_offset"][-1] + len(lp["tokens"][-1])
                        streamed_lp = True
                    if text or lp:
                        yield chunk(text, logprobs=lp)
                    if d.finished:
                        comp = d.completion
                        lp = text_logprobs(comp, top_n, len(echo)) if req.logprobs is not None and not streamed_lp \
                            else None
                        yield chunk("", finish(d.finish_reason), lp)
                        if include_usage:
                            yield _sse({**base, "object": "text_completion", "choices": [], "usage": usage(comp)})
                        break
            except APIError as e:
                yield _sse(e.body())
                return
            yield "data: [DONE]\n\n"

        return SSEResponse(events(), on_close=lambda: worker.cancel(job))

    def raw_text(d) -> str:
        # /v1/completions returns the text as generated, <think> tags included (the delta's raw_text); an engine
        # without it gets the two halves glued back (tags lost).
        raw = getattr(d, "raw_text", None)
        return raw if raw is not None else (d.reasoning_text or "") + (d.text or "")

    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": ctx}

    async def model_info(request: Request, model_id: str):
        check_key(request)
        if model_id != model_name:
            raise APIError(404, f"Model Not Exist: {model_id!r}", "model_not_found")
        return model_card()

    async def health():
        if not worker.alive:
            raise APIError(503, "the engine thread is not running", "engine_unavailable")
        s = worker.snapshot()
        return {"status": "ok", "model": model_name, "running": s["running"], "waiting": s["waiting"]}

    async def prometheus():
        return Response(metrics.render(worker), media_type="text/plain; version=0.0.4; charset=utf-8")

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
        app.add_api_route(f"{prefix}/models/{{model_id}}", model_info, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    if WEB.is_dir():
        app.mount("/", StaticFiles(directory=WEB, html=True), name="web")
    return app


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: env NANOSEEK_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests decoded together (engine batch)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: 429")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--max-messages", type=int, default=512, help="most messages in one chat request")
    p.add_argument("--no-thinking", action="store_true", help="answer without <think> unless a request asks")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


def load_engine(folder: str, max_batch: int = 16, max_seq_len: int | None = None, dtype=None, device=None):
    """Model + tokenizer + Engine from a model folder (shared by `serve`, `chat` and bench/serve.py)."""
    from ..errors import UsageError
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json); pass the folder written by "
                         "`nanoseek pretrain/sft/grpo` or a Hugging Face DeepSeek-V2/V3 folder")
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"{folder} has no tokenizer.json; serve needs the model's tokenizer in the same folder")
    import torch

    from ..checkpoint import load
    from ..infer.engine import Engine
    from ..tokenizer import Tokenizer
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(path, dtype=dtype, device=device).eval()
    tok = Tokenizer.load(path)
    return Engine(model, tok, max_batch=max_batch, max_seq_len=max_seq_len), tok


def main(args) -> int:
    import uvicorn

    from ..errors import UsageError
    for name in ("max_concurrency", "max_tokens_limit", "max_body_bytes", "max_messages"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0 (got {args.max_queue})")
    engine, tok = load_engine(args.model, max_batch=args.max_concurrency, max_seq_len=args.max_seq_len,
                              dtype=args.dtype, device=args.device)
    name = args.served_model_name or Path(args.model).resolve().name
    limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_tokens=args.max_tokens_limit)
    app = create_app(engine, tok, model_name=name, api_key=args.api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, limits=limits, thinking_default=not args.no_thinking)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use it "
              "(set --api-key or NANOSEEK_API_KEY)")
    print(f"nanoseek: serving {name!r} on http://{args.host}:{args.port}/ (chat page) and "
          f"http://{args.host}:{args.port}/v1 (API)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
