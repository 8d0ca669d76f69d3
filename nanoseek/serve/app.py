"""`nanoseek serve`: a DeepSeek/OpenAI-compatible HTTP API and the web chat page, on one machine.

    nanoseek serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints (each also without the /v1 prefix): POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /v1/limits (what a request may ask for), GET /health, GET /metrics (Prometheus text), and the chat page at /
with its stored conversations under /ui/ (ui.py).
GET routes answer HEAD too; a wrong method gets 405 with the route's Allow. With an API key, the /v1 endpoints
need `Authorization: Bearer KEY`; /health, /metrics and the page (which asks for the key) do not. The wire format
(schemas, errors, response and chunk builders) lives in protocol.py, the engine thread in worker.py; this module
holds the routes, the one streaming pump both generation endpoints share, and the command.

The path of a request: `parse` (key, body, schema) -> prompt ids -> `make_params` (limits) -> `worker.submit`
(backpressure) -> the engine thread steps the engine -> StreamDeltas come back on the job's queue -> `run_to_end`
(one JSON answer) or `pump` (server-sent events, through a ChatStream or CompletionStream that turns deltas into
chunks).

Robustness rules, because a public endpoint meets every kind of client:
- every request is bounded (body bytes before any JSON parsing, number of messages, prompt characters against
  the context before any tokenizing, then prompt tokens, max_tokens), and every error is an OpenAI-style body
  {"error": {"message", "type", "code"}} with the status of DeepSeek's table: 400 bad JSON / format, 401 bad key,
  422 invalid parameters, 429 queue full, 503 engine down. A client's mistake is never a 500;
- backpressure: at most --max-concurrency requests in the engine and --max-queue waiting; the next one gets 429 and
  Retry-After at once (an unbounded queue only turns overload into timeouts for everybody);
- a client that disconnects cancels its generation (engine.abort frees its cache blocks), streamed or not;
- nothing slow runs on the event loop: chat templates and tokenizing run in a worker thread, after the length check;
- browsers: only this server's own page, or --allowed-origins, may call it (403 otherwise), a POST body must be
  declared JSON (415: web pages send text/plain anywhere without asking), a Host header that is not one of this
  server's names is refused (403: DNS rebinding), and every answer carries a strict CSP and nosniff / frame /
  referrer headers (`Guard`);
- slow clients are cut off by read deadlines, and open connections are capped far above what the queue admits
  (transport.py), so an overload is still answered 429.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..errors import UsageError
from . import protocol as P
from . import tools
from .history import History
from .history import default_path as default_history_path
from .protocol import APIError, CompletionRequest, Limits
from .ui import add_ui_routes
from .worker import EngineWorker, Job, Metrics, QueueFull, WorkerDead

log = logging.getLogger("nanoseek.serve")
WEB = Path(__file__).parent / "web"


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
                    return await error_response(err)(scope, receive, send)
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

    ENDPOINTS = ("/chat/completions", "/completions", "/models", "/limits", "/health", "/metrics")

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


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")       # as Host headers write them
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1", "[::1]")  # as --host writes them
# The page loads its script, style and data from this server only: no inline code, no other site, no frames.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", PAGE_CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


def split_host(host: str) -> tuple[str, str]:
    """A Host header -> (name, port): 'LocalHost:8000' -> ('localhost', '8000'), '[::1]' -> ('[::1]', '')."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


class Guard:
    """What every request must pass before any route, and the headers every answer carries.

    - Host: a name this server answers to: 127.0.0.1, localhost or [::1] with the server's port, plus
      `allowed_hosts` ("name" for any port, "name:port", "*" for any). A web page whose own name was re-pointed at
      127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused.
    - Origin (browsers send it with cross-site requests): this server's own page, or one of `allowed_origins`
      (which also get CORS headers, preflight included, from the CORS middleware inside); any other page is
      refused, so a site the user visits cannot use a keyless local server.
    - a POST body is declared `application/json`: a page may send text/plain or a form to any address without
      asking first (a CORS "simple" request), but never JSON.
    - every answer, errors included, carries the page's CSP, nosniff, frame and referrer protection.
    """

    def __init__(self, app, allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = ()):
        self.app = app
        self.hosts = {h.strip().lower() for h in allowed_hosts}
        self.origins = {o.strip().lower().rstrip("/") for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", ()), *SECURITY_HEADERS]}
            await send(msg)

        err = self.refusal(scope, Headers(scope=scope))
        if err is not None:
            return await error_response(err)(scope, receive, secured_send)
        await self.app(scope, receive, secured_send)

    def refusal(self, scope, headers: Headers) -> APIError | None:
        host, origin = headers.get("host", ""), headers.get("origin")
        if not self.host_ok(host, scope.get("server")):
            return APIError(403, f"this server does not answer to the host name {host!r} (a web page reaching it "
                            "through DNS rebinding looks like this); to serve that name, start it with "
                            "--allowed-hosts NAME", "host_not_allowed")
        if origin is not None and not self.origin_ok(origin, host):
            return APIError(403, f"requests from the web page at {origin} are not allowed; to let that page call "
                            f"this server, start it with --allowed-origins {origin}", "origin_not_allowed")
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("completions"):   # the JSON endpoints
            ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                f"(got {ctype or 'no Content-Type'}); with curl, add "
                                "-H 'Content-Type: application/json'", "unsupported_media_type")
        return None

    def host_ok(self, host: str, server) -> bool:
        if "*" in self.hosts:
            return True
        name, port = split_host(host)
        if name in LOOPBACK_NAMES:   # with this server's port (the browser sends it unless it is 80)
            ours = str(server[1]) if server and server[1] else None
            return ours is None or port == ours or (not port and ours == "80")
        return bool(name) and (name in self.hosts or f"{name}:{port}" in self.hosts)

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if "*" in self.origins or origin in self.origins:
            return True
        _, sep, netloc = origin.partition("://")   # this server's own page: the origin's host:port is its Host
        return bool(sep and host) and netloc == host.strip().lower()


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


# --------------------------------------------------------------------------------------------- the service
@dataclass
class Service:
    """What the route handlers share: the engine's worker and tokenizer, the limits, the served model's name.
    One per app, at `app.state.service`."""
    worker: EngineWorker
    tokenizer: object
    model_name: str
    api_keys: tuple[str, ...]             # the keys that may call (none: an open server)
    limits: Limits
    sampling_params: type
    thinking_default: bool | None         # None: the chat template's own default
    ctx: int | None                       # the engine's context (prompt + generated tokens)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.max_prompt = self.limits.max_prompt_tokens or (self.ctx - 1 if self.ctx else None)
        self.fingerprint = f"fp_nanoseek_{uuid.uuid5(uuid.NAMESPACE_DNS, self.model_name).hex[:8]}"
        self.vocab = self.tokenizer.vocab_size
        self.control_ids = self.tokenizer.control_ids   # never in a text; legacy logprobs skip them too
        # the request models with this server's limits in them, and the OpenAPI document built from the same models
        # (so that schema-valid means acceptable, up to the two limits JSON Schema cannot say: prompt tokens, bytes)
        template = getattr(self.tokenizer, "chat_template", None)
        prompt_format = getattr(self.tokenizer, "prompt_format", None)   # (V4: no template, DSML tool calls)
        self.tool_format = tools.detect(template, prompt_format)
        self.shows_tools = tools.shows_tools(template, prompt_format)
        fmt = self.tool_format and self.tool_format.name
        fim = getattr(self.tokenizer, "fim_ids", None) is not None
        self.chat_request, self.completion_request = P.request_models(self.limits, self.model_name, self.ctx,
                                                                      self.vocab, tool_format=fmt, fim=fim)
        self.openapi = P.openapi_schema(self.limits, self.model_name, self.ctx, self.vocab, auth=bool(self.api_keys),
                                        tool_format=fmt, fim=fim)
        # The most characters one token stands for (a byte-level token's string has one character per byte, so
        # it is never shorter than the text it encodes): a prompt longer than max_prompt of these cannot fit.
        self.max_token_chars = max((len(self.tokenizer.id_to_token(i) or "") for i in range(self.vocab)),
                                   default=1) or 1

    def check_key(self, request: Request) -> str | None:
        """The request's API key if it is one of ours (None on an open server); else 401."""
        if not self.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        # every key compared, in constant time each: the time taken tells nothing about which key is near
        if not sum(hmac.compare_digest(given.encode(), k.encode()) for k in self.api_keys):
            shown = f"****{given[-4:]}" if len(given) > 4 else "(none)"
            raise APIError(401, f"Authentication Fails, your api key {shown} is invalid. Send the key as "
                           "'Authorization: Bearer KEY'.", "invalid_api_key")
        return given

    async def parse(self, request: Request, schema):
        """Key, then the body as JSON, then the schema: (request, thinking default of the model name asked for)."""
        self.check_key(request)
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise APIError(499, "the client closed the connection before sending its whole request",
                           "client_closed_request") from None
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
            raise APIError(422, P.validation_message(e.errors()), "invalid_parameter") from None
        if req.model is None or req.model == self.model_name:
            return req, self.thinking_default
        if req.model not in P.MODEL_ALIASES:
            raise APIError(400, f"Model Not Exist: {req.model!r}; this server serves {self.model_name!r} "
                           "(see GET /v1/models)", "model_not_found", param="model")
        return req, P.MODEL_ALIASES[req.model]

    def check_length(self, chars: int) -> None:
        """Refuse a prompt by its length in characters alone, before any tokenizing: beyond max_prompt tokens of the
        longest token, it cannot fit the context. (Tokenizing a 1 MB text takes a second.)"""
        if self.max_prompt is not None and chars > self.max_prompt * self.max_token_chars:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt has {chars} "
                           "characters, more than that many tokens can hold. Shorten the conversation.",
                           "context_length_exceeded")

    def check_tokens(self, n_prompt: int) -> None:
        if self.max_prompt is not None and n_prompt > self.max_prompt:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt has "
                           f"{n_prompt} tokens. Shorten the conversation.", "context_length_exceeded")

    async def off_loop(self, fn, *args, **kw):
        """fn(*args, **kw) in a worker thread: chat templates and tokenizing are CPU work that would stall every
        other request (and /health) if they ran on the event loop."""
        return await anyio.to_thread.run_sync(partial(fn, *args, **kw))

    def make_params(self, req, n_prompt: int, logprobs: bool, top_logprobs: int):
        """The engine's SamplingParams for `req`, checked against the context and this server's limits."""
        self.check_tokens(n_prompt)
        want = req.wanted_tokens()
        if want is not None and want > self.limits.max_tokens:
            raise APIError(422, f"max_tokens={want} is above this server's limit of {self.limits.max_tokens}",
                           "invalid_parameter", param="max_tokens")
        max_tokens = want or self.limits.max_tokens
        if self.ctx:  # never past the context: the answer ends with finish_reason "length"
            max_tokens = max(1, min(max_tokens, self.ctx - n_prompt))
        if req.stop_token_ids and max(req.stop_token_ids) >= self.vocab:
            raise APIError(422, f"stop_token_ids must be below the vocabulary size {self.vocab}", "invalid_parameter",
                           param="stop_token_ids")
        kw = dict(max_tokens=max_tokens, stop=tuple(req.stop or ()), stop_token_ids=tuple(req.stop_token_ids or ()),
                  ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs, seed=req.seed)
        if req.logit_bias:
            kw["logit_bias"] = req.logit_bias
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        if req.top_k is not None:
            kw["top_k"] = max(0, req.top_k)
        try:
            return self.sampling_params(**kw)
        except (ValueError, UsageError) as e:  # a combination the sampler refuses
            raise APIError(422, f"invalid parameters: {e}", "invalid_parameter") from None

    def response_constraint(self, params, fmt):
        """params with response_format's JSON as their constraint: any JSON object (json_object) or JSON valid under
        json_schema.schema, compiled off the event loop (once per schema: grammar.py caches them). A schema the
        grammar library refuses is the client's mistake: 400 with its reason."""
        import dataclasses

        from ..infer.grammar import Grammar
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        try:
            grammar = (Grammar.json_object(self.tokenizer) if schema is None
                       else Grammar.json_schema(self.tokenizer, schema))
        except UsageError as e:
            raise APIError(400, f"response_format.json_schema.schema cannot be enforced: {e}", "invalid_json_schema",
                           param="response_format") from None
        return dataclasses.replace(params, constraint=grammar)

    def check_room(self) -> None:
        """429 at once when the queue is already full, before the prompt is rendered and tokenized for nothing (under
        an overload, that work would delay every answer, the 429s included). `submit` decides for real."""
        w = self.worker
        s = w.snapshot()
        if s["running"] + s["waiting"] >= w.max_concurrency + w.max_queue:
            with w.metrics.lock:
                w.metrics.rejected += 1                  # (as worker.submit counts its own refusals)
            raise self.busy(f"{w.max_concurrency} requests running and {w.max_queue} waiting")

    @staticmethod
    def busy(why) -> APIError:
        return APIError(429, f"Rate limit reached: the server is busy ({why}). Retry after a second.", "queue_full",
                        headers={"Retry-After": "1"})

    def submit(self, prompt: list[int], params, prefix: str) -> tuple[Job, dict]:
        """Queue the request: its job and the fields every response of it carries (id, created, model)."""
        jobs, base = self.submit_n(prompt, params, prefix, 1)
        return jobs[0], base

    def submit_n(self, prompt: list[int], params, prefix: str, n: int) -> tuple[list[Job], dict]:
        """Queue n choices of one prompt (the engine shares the prompt's cache blocks between them). Choice i samples
        with the request's seed + i (choice 0 as with n=1), or its own random seed. All or none: a queue that fills
        up half way cancels those already queued (429)."""
        rid = f"{prefix}-{uuid.uuid4().hex}"
        jobs: list[Job] = []
        try:
            for i in range(n):
                p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                jobs.append(self.worker.submit(prompt, p, request_id=rid if i == 0 else f"{rid}-{i}"))
        except (QueueFull, WorkerDead) as e:
            for job in jobs:
                self.worker.cancel(job)
            if isinstance(e, QueueFull):
                raise self.busy(e) from None
            raise APIError(503, f"Server overloaded: {e}", "engine_unavailable", headers={"Retry-After": "5"}) from None
        base = {"id": rid, "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": self.fingerprint}
        return jobs, base

    async def next_item(self, job: Job):
        """The job's next StreamDelta; None on a keep-alive tick. Raises what the engine thread reported, or 499
        when the client hung up (`watch_hang_up`)."""
        try:
            item = await asyncio.wait_for(job.queue.get(), self.limits.keepalive_s)
        except TimeoutError:
            return None
        return self.checked(item)

    async def next_of(self, jobs: list[Job], gets: dict) -> list[tuple[int, object]]:
        """The next items of several jobs (n choices), as (choice, StreamDelta) for each job that has one ready;
        [] on a keep-alive tick. `gets` keeps each job's pending queue read between calls, so nothing is lost."""
        for i, job in enumerate(jobs):
            if i not in gets and job is not None:
                gets[i] = asyncio.ensure_future(job.queue.get())
        done, _ = await asyncio.wait(list(gets.values()), timeout=self.limits.keepalive_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready = sorted(i for i, t in gets.items() if t in done)
        return [(i, self.checked(gets.pop(i).result())) for i in ready]

    def checked(self, item):
        """A job's queue item as a StreamDelta, or the APIError it stands for."""
        if item is HUNG_UP:
            raise APIError(499, "the client closed the connection before its answer was ready",
                           "client_closed_request")
        if isinstance(item, WorkerDead):
            raise APIError(503, f"Server overloaded: {item}", "engine_unavailable", headers={"Retry-After": "5"})
        if isinstance(item, (ValueError, UsageError)):
            raise APIError(400, f"the engine refused the request: {item}", "invalid_request")
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", "engine_error")
        return item

    async def run_to_end(self, job: Job, request: Request):
        """Collect a non-streamed request; a client that hangs up meanwhile cancels it (the engine frees its cache
        blocks). Nothing is written before the end, so no failed write would tell: the connection is watched."""
        return (await self.run_all([job], request))[0]

    async def run_all(self, jobs: list[Job], request: Request) -> list:
        """run_to_end for the n choices of one request: their Completions, in order."""
        watcher = asyncio.ensure_future(watch_hang_up(request.receive, *jobs))

        async def one(job):
            while True:
                d = await self.next_item(job)
                if d is not None and d.finished:
                    return d.completion
        try:
            return list(await asyncio.gather(*map(one, jobs)))
        finally:
            watcher.cancel()
            for job in jobs:
                self.worker.cancel(job)  # no-op when finished

    def token_str(self, i: int) -> str:
        return self.tokenizer.decode([int(i)])

    def usage(self, comp) -> dict:
        return P.usage(comp, self.tokenizer.think_end_id)

    # ------------------------------------------------------------------ tool calls (serve/tools.py)
    def forced_tool(self, req) -> str | None:
        """For tool_choice "required" or a named function: the Lark grammar of the answer (a call of the named
        function, or of any tool), else None. A name that is not among the tools is the client's mistake (400)."""
        choice = req.tool_choice
        if not req.tools or choice in (None, "auto", "none"):
            return None
        name = choice.function.name if isinstance(choice, P.NamedToolChoice) else None
        names = [t.function.name for t in req.tools]
        if name is not None and name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                           f"({', '.join(names)}); name one of them", "unknown_tool", param="tool_choice")
        try:
            return tools.forced_call_grammar(self.tool_format, [t.model_dump(exclude_none=True) for t in req.tools],
                                             self.marker_id, name, req.parallel_tool_calls)
        except UsageError as e:   # (a schema this format's calls cannot be held to)
            raise APIError(400, f"the tools' parameters cannot be enforced while sampling: {e}", "invalid_tools",
                           param="tools") from None

    def marker_id(self, text: str) -> int | None:
        """The id of a tool-call marker when it is one added token of the vocabulary (else it is spelled out)."""
        tid = self.tokenizer.token_to_id(text)
        return tid if tid is not None and tid in self.tokenizer.special_ids else None

    def constrain(self, params, grammar_text: str):
        """params with the grammar of a forced call as their constraint (compiled off the event loop)."""
        import dataclasses

        from ..infer.grammar import Grammar
        try:
            grammar = Grammar.lark(self.tokenizer, grammar_text)
        except UsageError as e:
            raise APIError(400, f"the tools' parameters cannot be enforced while sampling: {e}", "invalid_tools",
                           param="tools") from None
        return dataclasses.replace(params, constraint=grammar)

    def answer_reader(self, req):
        """What reads the model's content: a tool-call parser when tools are offered and may be called, a reader that
        drops stray tool-call markers when the template has a format but no calls are wanted, else None (as is)."""
        if self.tool_format is None:
            return None
        if req.tools and req.tool_choice != "none":
            return tools.ToolCallParser(self.tool_format)
        return tools.PlainAnswer.of(self.tool_format)

    def stream(self, jobs: Job | list[Job], adapters) -> SSEResponse:
        """The SSE response of one job and its adapter, or of n choices (lists of both)."""
        jobs, adapters = (jobs, adapters) if isinstance(jobs, list) else ([jobs], [adapters])
        return SSEResponse(pump(self, jobs, adapters), on_close=lambda: [self.worker.cancel(j) for j in jobs])


HUNG_UP = object()     # put on a job's queue when its client closed the connection


async def watch_hang_up(receive, *jobs: Job) -> None:
    """Wait until the client closes its connection, then wake the request's waiters with HUNG_UP. (Once the body
    is read, the server's `receive` gives nothing but the disconnect.)"""
    while (await receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.queue.put_nowait(HUNG_UP)


# --------------------------------------------------------------------------------------------- streaming
async def pump(svc: Service, jobs: list[Job], adapters: list) -> AsyncIterator[str]:
    """The one streaming loop of both generation endpoints: the adapters' opening chunks, then the chunks of each
    StreamDelta as it comes (a keep-alive comment while none does), then [DONE]. n choices (one job and adapter
    each) interleave as they come, each chunk carrying its choice's index; with include_usage their usage comes
    once, summed, at the end. An error met on the way is sent as a last {"error": ...} event (the status line has
    long gone out)."""
    live, gets, usages = list(jobs), {}, []
    try:
        for i, a in enumerate(adapters):
            for chunk in a.opening():
                yield P.sse(indexed(chunk, i))
        while any(j is not None for j in live):
            ready = await svc.next_of(live, gets)
            if not ready:
                yield P.KEEPALIVE
            for i, d in ready:
                for chunk in adapters[i].chunks(d):
                    if len(jobs) == 1 or chunk["choices"]:
                        yield P.sse(indexed(chunk, i))
                if d.finished:
                    live[i] = None
                    usages.append(svc.usage(d.completion))
        if len(jobs) > 1 and adapters[0].include_usage:
            yield P.sse(P.usage_chunk(adapters[0].base, adapters[0].OBJECT, P.total_usage(usages)))
    except APIError as e:
        yield P.sse(e.body())
        return
    finally:
        for t in gets.values():
            t.cancel()
    yield P.DONE


def indexed(chunk: dict, i: int) -> dict:
    """A choice's chunk with its index (adapters write index 0)."""
    if i and chunk.get("choices"):
        chunk["choices"] = [{**c, "index": i} for c in chunk["choices"]]
    return chunk


@dataclass
class ChatStream:
    """StreamDeltas -> chat.completion.chunk dicts: reasoning_content and content deltas, then the finish chunk
    (and the usage chunk when asked). Logprobs go with each delta, or all with the last chunk when the deltas
    carried none."""
    base: dict
    usage: Callable
    token_str: Callable[[int], str]
    include_usage: bool
    logprobs: bool
    top_n: int
    streamed_lp: bool = False
    OBJECT: ClassVar[str] = "chat.completion.chunk"
    answer: object = None                 # a tools.ToolCallParser / PlainAnswer that reads the content, or None

    def chunk(self, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return P.chat_chunk(self.base, delta, reason, logprobs, self.include_usage)

    def pieces(self, d) -> list[dict]:
        """The delta's content as deltas: as is, or through the answer's reader (tool calls, marker-free text)."""
        if self.answer is None:
            return [{"content": d.text}] if d.text else []
        return self.answer.feed(d.text, final=d.finished) if d.text or d.finished else []

    def opening(self) -> list[dict]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def chunks(self, d) -> list[dict]:
        out, delta, pieces = [], {}, self.pieces(d)
        if d.reasoning_text:
            delta["reasoning_content"] = d.reasoning_text
        if pieces and "content" in pieces[0]:
            delta["content"] = pieces.pop(0)["content"]
        lp = P.chat_logprobs(d, self.top_n, self.token_str) if self.logprobs and d.token_ids else None
        self.streamed_lp = self.streamed_lp or lp is not None
        if delta or lp:
            out.append(self.chunk(delta, logprobs=lp))
        out += [self.chunk(p) for p in pieces]           # tool calls: a call's start, then its arguments
        if d.finished:
            comp = d.completion
            lp = P.chat_logprobs(comp, self.top_n, self.token_str) if self.logprobs and not self.streamed_lp else None
            calls = bool(self.answer is not None and self.answer.calls)
            out.append(self.chunk({}, P.finish_reason(d.finish_reason, calls), lp))
            if self.include_usage:
                out.append(P.usage_chunk(self.base, "chat.completion.chunk", self.usage(comp)))
        return out


@dataclass
class CompletionStream:
    """StreamDeltas -> text_completion pieces: the echoed prompt first, then the text as generated (<think> tags
    included; the engine decodes without control tokens), legacy logprobs with offsets into the returned text."""
    base: dict
    usage: Callable
    token_str: Callable[[int], str]
    include_usage: bool
    logprobs: bool
    top_n: int
    echo: str
    hidden: frozenset[int]                # control token ids: in token_ids, not in the text
    pos: int = 0                          # text offset of the next token
    streamed_lp: bool = False
    OBJECT: ClassVar[str] = "text_completion"

    def __post_init__(self):
        self.pos = len(self.echo)

    def chunk(self, text: str, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return P.completion_chunk(self.base, text, reason, logprobs, self.include_usage)

    def opening(self) -> list[dict]:
        return [self.chunk(self.echo)] if self.echo else []

    def chunks(self, d) -> list[dict]:
        out, lp, text = [], None, d.raw_text
        if self.logprobs and d.token_ids and d.logprobs is not None:
            lp = P.text_logprobs(d, self.top_n, self.pos, self.token_str, self.hidden)
            self.pos += sum(len(self.token_str(t)) for t in d.token_ids if t not in self.hidden)
            self.streamed_lp = True
        if text or lp:
            out.append(self.chunk(text, logprobs=lp))
        if d.finished:
            comp = d.completion
            lp = None
            if self.logprobs and not self.streamed_lp:
                lp = P.text_logprobs(comp, self.top_n, len(self.echo), self.token_str, self.hidden)
            out.append(self.chunk("", P.finish_reason(d.finish_reason), lp))
            if self.include_usage:
                out.append(P.usage_chunk(self.base, "text_completion", self.usage(comp)))
        return out


# --------------------------------------------------------------------------------------------- routes
def service(request: Request) -> Service:
    return request.app.state.service


async def chat_completions(request: Request):
    svc = service(request)
    req, thinking = await svc.parse(request, svc.chat_request)
    svc.check_room()
    if len(req.messages) > svc.limits.max_messages:
        raise APIError(400, f"too many messages: {len(req.messages)} > {svc.limits.max_messages}",
                       "too_many_messages")
    if req.top_logprobs and not req.logprobs:
        raise APIError(422, "top_logprobs requires logprobs=true", "invalid_parameter", param="top_logprobs")
    thinking, effort = P.chat_thinking(req, thinking), P.chat_effort(req)
    forced = svc.forced_tool(req)
    messages = P.template_messages(req, svc.tool_format)
    tool_list = P.template_tools(req, messages, svc.shows_tools)
    svc.check_length(P.chat_chars(messages, tool_list))   # (every template writes each message's content)
    extra = {"tools": tool_list} if tool_list else {}
    if effort is not None:   # (V4's prompt format reads it; a chat template sees one more variable)
        extra["reasoning_effort"] = effort
    try:
        prompt = await svc.off_loop(svc.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                    tokenize=True, thinking=thinking, **extra)
    except Exception as e:  # a template that rejects this conversation (e.g. role order)
        raise APIError(400, f"the chat template could not render these messages: {e}", "invalid_messages") from None
    top_n = req.top_logprobs or 0
    params = svc.make_params(req, len(prompt), req.logprobs, top_n)
    if forced is not None:
        params = await svc.off_loop(svc.constrain, params, forced)
    elif req.response_format is not None and req.response_format.type != "text":
        params = await svc.off_loop(svc.response_constraint, params, req.response_format)
    jobs, base = svc.submit_n(prompt, params, "chatcmpl", req.n)
    readers = [svc.answer_reader(req) for _ in jobs]          # one tool-call reader per choice
    if req.stream:
        return svc.stream(jobs, [ChatStream(base, svc.usage, svc.token_str, req.include_usage(), req.logprobs, top_n,
                                            answer=r) for r in readers])
    answers = []
    for comp, reader in zip(await svc.run_all(jobs, request), readers):
        lp = P.chat_logprobs(comp, top_n, svc.token_str) if req.logprobs else None
        answer = None
        if reader is not None:
            reader.feed(comp.content or "", final=True)
            answer = reader.message()
        answers.append(P.chat_response(base, comp, lp, svc.usage(comp), answer))
    return P.merge_choices(answers, P.total_usage([a["usage"] for a in answers]))


async def completion_prompt_ids(svc: Service, req: CompletionRequest) -> tuple[list[int], str]:
    """(prompt ids, prompt text) of a /v1/completions request, checked for length before it is encoded or decoded
    (off the event loop)."""
    p = P.completion_prompt(req)
    if req.suffix:   # (the request model takes a suffix only when the tokenizer has FIM tokens)
        if not isinstance(p, str):
            raise APIError(422, "suffix (fill-in-the-middle) needs a text prompt, not token ids", "invalid_parameter",
                           param="suffix")
        svc.check_length(len(p) + len(req.suffix))
        prompt = await svc.off_loop(svc.tokenizer.fim_prompt, p, req.suffix)
        svc.check_tokens(len(prompt))
        return prompt, p
    if isinstance(p, str):
        svc.check_length(len(p))
        bos = svc.tokenizer.bos_token
        prompt = await svc.off_loop(svc.tokenizer.encode, p, add_bos=not (bos and p.startswith(bos)))  # a chat has it
        text = p
    else:
        if any(not 0 <= t < svc.vocab for t in p):
            raise APIError(422, f"prompt token ids must be in [0, {svc.vocab})", "invalid_parameter", param="prompt")
        svc.check_tokens(len(p))
        prompt, text = list(p), await svc.off_loop(svc.tokenizer.decode, p)
    if not prompt:
        raise APIError(422, "the prompt is empty", "invalid_parameter", param="prompt")
    return prompt, text


async def completions(request: Request):
    svc = service(request)
    req, _ = await svc.parse(request, svc.completion_request)
    svc.check_room()
    prompt, prompt_text = await completion_prompt_ids(svc, req)
    top_n, want_lp = req.logprobs or 0, req.logprobs is not None
    jobs, base = svc.submit_n(prompt, svc.make_params(req, len(prompt), want_lp, top_n), "cmpl", req.n)
    echo = prompt_text if req.echo else ""
    if req.stream:
        return svc.stream(jobs, [CompletionStream(base, svc.usage, svc.token_str, req.include_usage(), want_lp,
                                                  top_n, echo, svc.control_ids) for _ in jobs])
    answers = []
    for comp in await svc.run_all(jobs, request):
        lp = P.text_logprobs(comp, top_n, len(echo), svc.token_str, svc.control_ids) if want_lp else None
        answers.append(P.completion_response(base, echo + comp.text, comp, lp, svc.usage(comp)))
    return P.merge_choices(answers, P.total_usage([a["usage"] for a in answers]))


async def models(request: Request):
    svc = service(request)
    svc.check_key(request)
    return {"object": "list", "data": [P.model_card(svc.model_name, svc.created, svc.ctx)]}


async def model_info(request: Request, model_id: str):
    svc = service(request)
    svc.check_key(request)
    if model_id != svc.model_name:
        raise APIError(404, f"Model Not Exist: {model_id!r}", "model_not_found")
    return P.model_card(svc.model_name, svc.created, svc.ctx)


async def limits(request: Request):
    """What a request may ask for (the chat page sizes its fields with it)."""
    svc = service(request)
    svc.check_key(request)
    lim = svc.limits
    return {"max_tokens": lim.max_tokens, "max_prompt_tokens": svc.max_prompt, "context_length": svc.ctx,
            "max_messages": lim.max_messages, "max_body_bytes": lim.max_body_bytes, "max_n": lim.max_n}


async def health(request: Request):
    svc = service(request)
    if not svc.worker.alive:
        raise APIError(503, "the engine thread is not running", "engine_unavailable")
    s = svc.worker.snapshot()
    return {"status": "ok", "model": svc.model_name, "running": s["running"], "waiting": s["waiting"]}


async def prometheus(request: Request):
    worker = service(request).worker
    return Response(worker.metrics.render(worker), media_type="text/plain; version=0.0.4; charset=utf-8")


def page_file(path: Path):
    """A route serving one file of the chat page."""
    async def serve(request: Request):
        return FileResponse(path)
    return serve


# --------------------------------------------------------------------------------------------- error handlers
async def on_api_error(request, exc: APIError):
    return error_response(exc)


async def on_validation_error(request, exc: RequestValidationError):
    return error_response(APIError(422, P.validation_message(exc.errors()), "invalid_parameter"))


async def on_http_error(request, exc: StarletteHTTPException):
    msg = {404: f"no such endpoint: {request.method} {request.url.path}",
           405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, msg, code, headers=exc.headers))


async def on_unexpected(request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return error_response(APIError(500, f"internal error ({type(exc).__name__}); the request was not completed",
                                   "internal_error"))


# --------------------------------------------------------------------------------------------- the app
async def openapi(request: Request):
    """The OpenAPI document of the real request models with this server's limits (protocol.openapi_schema)."""
    return service(request).openapi


def add_routes(app: FastAPI) -> None:
    """The API (each path also without /v1), then the page's files one by one: a catch-all mount at / would answer
    404 (or 405 with the wrong Allow) for every wrong method on an API path. GET routes answer HEAD too."""
    get = ["GET", "HEAD"]
    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
        app.add_api_route(f"{prefix}/models", models, methods=get)
        app.add_api_route(f"{prefix}/models/{{model_id}}", model_info, methods=get)
        app.add_api_route(f"{prefix}/limits", limits, methods=get)
        app.add_api_route(f"{prefix}/health", health, methods=get)
    app.add_api_route("/metrics", prometheus, methods=get)
    app.add_api_route("/openapi.json", openapi, methods=get, include_in_schema=False)
    if WEB.is_dir():
        app.add_route("/", page_file(WEB / "index.html"), methods=["GET"], include_in_schema=False)  # (+ HEAD)
        for f in sorted(WEB.iterdir()):
            if f.is_file():
                app.add_route(f"/{f.name}", page_file(f), methods=["GET"], include_in_schema=False)


def create_app(engine, tokenizer, model_name: str = "nanoseek", api_key: str | Sequence[str] | None = None,
               max_concurrency: int = 16, max_queue: int = 64, limits: Limits | None = None,
               sampling_params=None, thinking_default: bool | None = None, allowed_hosts: Sequence[str] = (),
               allowed_origins: Sequence[str] = (), history: str | os.PathLike | History | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (not yet started: uvicorn's lifespan starts and stops the engine thread).

    engine: the Engine contract of docs/internals.md (add_request / step / abort / has_unfinished / stats,
    max_seq_len); sampling_params: the SamplingParams class (default: nanoseek.infer.engine.SamplingParams).
    allowed_hosts: Host names answered besides 127.0.0.1 / localhost / [::1] ("*": any); allowed_origins: web
    origins whose pages may call the API, with CORS ("*": any). See `Guard`. api_key: one key or several (each
    its own user of the page's history; none: an open server). history: the page's conversations (ui.py), a
    SQLite file or an open History (None: none kept).
    """
    if sampling_params is None:
        from ..infer.engine import SamplingParams as sampling_params
    limits = limits or Limits()
    worker = EngineWorker(engine, max_concurrency=max_concurrency, max_queue=max_queue, metrics=Metrics())

    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    keys = tuple(k for k in ([api_key] if isinstance(api_key, str) else api_key or ()) if k)
    app.state.service = Service(worker, tokenizer, model_name, keys, limits, sampling_params, thinking_default,
                                ctx=engine.max_seq_len or None)
    app.state.worker, app.state.metrics, app.state.engine, app.state.limits = worker, worker.metrics, engine, limits
    # middleware, innermost first: a request meets CountRequests, Guard, CORS, BodyLimit, then the routes
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    origins = [o.strip().lower().rstrip("/") for o in allowed_origins]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, allowed_origins=origins)
    app.add_middleware(CountRequests, metrics=worker.metrics)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    add_routes(app)
    add_ui_routes(app, history, chat=chat_completions)
    return app


# --------------------------------------------------------------------------------------------- the command
@dataclass
class ServeConfig:
    """`nanoseek serve`: one model folder behind the API and the chat page.

    Who may call it: on a loopback --host the server answers only to the Host names 127.0.0.1, localhost and [::1]
    (a foreign name is how DNS rebinding looks), on any other --host to every name; --allowed-hosts names the ones
    to add. Browsers may call it from its own page only; --allowed-origins https://app.example lets that site's
    pages call it too (with CORS headers). Beyond --max-connections open connections a request is answered 503.

    API keys: without any the server is open; each key (--api-key KEY, repeatable, and --api-keys-file) is one user,
    whose page conversations no other key sees. The page's conversations are kept in --history (default
    DATA/nanoseek/history.db, DATA being $XDG_DATA_HOME or ~/.local/share); --no-history keeps none.
    """
    model: str = ""                      # model folder (config.json, *.safetensors, tokenizer.json)
    host: str = "127.0.0.1"              # interface to bind (127.0.0.1: this machine only)
    port: int = 8000                     # TCP port
    api_key: list[str] = field(default_factory=list)  # a key clients must send (repeatable; else env NANOSEEK_API_KEY)
    api_keys_file: str | None = None     # file of API keys, one per line ('#' comments), besides --api-key
    history: str | None = None           # SQLite file of the page's conversations (default: DATA/nanoseek/history.db)
    no_history: bool = False             # keep no conversations (the page forgets them on reload)
    served_model_name: str | None = None  # the model id clients send (default: the folder's name)
    max_concurrency: int = 16            # requests decoded together (engine batch)
    max_queue: int = 64                  # requests waiting for a slot; beyond: 429
    max_tokens_limit: int = 4096         # largest max_tokens a request may ask for
    max_n: int = 8                       # most choices (n) one request may ask for
    max_seq_len: int | None = None       # context length (default: the model's, at most 4096)
    max_body_bytes: int = 1 << 20        # largest request body
    max_messages: int = 512              # most messages in one chat request
    thinking: bool | None = None         # think first (--no-thinking: not; unset: the chat template's default)
    dtype: str | None = None             # float32 | bfloat16 | float16 (default: the checkpoint's)
    device: str | None = None            # cpu | cuda (default: cuda if available)
    compile: str = "auto"                # decode step as one compiled graph: true, false, auto (when the steps pay for it)
    threads: int = 0                     # torch CPU threads (0: one for small models, all cores for large)
    allowed_hosts: list[str] = field(default_factory=list)    # more Host names to answer (NAME, NAME:PORT; '*': any)
    allowed_origins: list[str] = field(default_factory=list)  # web origins whose pages may call the API ('*': any)
    header_timeout_s: float = 10.0       # a request's line and headers must arrive within this many seconds (else 408)
    body_timeout_s: float = 30.0         # its body within this many seconds after the headers (else 408)
    keep_alive_s: float = 5.0            # an idle kept-alive connection is closed after this many seconds
    max_connections: int | None = None   # open connections at most (default: max(1024, 4 x (concurrency + queue)))
    REQUIRED: ClassVar[tuple] = ("model",)
    ALIASES: ClassVar[dict] = {}

    def __post_init__(self):
        if isinstance(self.api_key, str):     # a config written when the server took one key
            self.api_key = [self.api_key]


CONFIG = ServeConfig


def load_engine(folder: str, max_batch: int = 16, max_seq_len: int | None = None, dtype=None, device=None,
                purpose: str = "serve", compile: bool | str = "auto"):
    """Model + tokenizer + Engine from a model folder (shared by `serve`, `chat` and bench/serve.py)."""
    import torch

    from ..checkpoint import load_model_and_tokenizer
    from ..infer.engine import Engine
    from ..model.layers import decode_layout
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model_and_tokenizer(folder, dtype=dtype, device=device, purpose=purpose)
    decode_layout(model)                 # it only serves: the layout of fast one-row decoding
    return Engine(model.eval(), tok, max_batch=max_batch, max_seq_len=max_seq_len, compile=compile), tok


def check_config(cfg: ServeConfig) -> None:
    for name in ("max_concurrency", "max_tokens_limit", "max_body_bytes", "max_messages", "max_n"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0 (got {cfg.max_queue})")
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds "
                             f"(got {getattr(cfg, name)})")
    admitted = cfg.max_concurrency + cfg.max_queue
    if cfg.max_connections is not None and cfg.max_connections < 2 * admitted:
        raise UsageError(f"--max-connections {cfg.max_connections} must be at least twice --max-concurrency + "
                         f"--max-queue ({admitted}): an overload must be answered 429 by the queue, not 503 by the "
                         "connection cap")


def connection_cap(cfg: ServeConfig) -> int:
    """Open connections at most: --max-connections, else far above what the queue admits (streams, clients that
    will be told 429, /health and /metrics probes all hold one)."""
    return cfg.max_connections or max(1024, 4 * (cfg.max_concurrency + cfg.max_queue))


def hosts_to_allow(cfg: ServeConfig) -> list[str]:
    """Host names answered besides the loopback ones: --allowed-hosts; else none on a loopback bind, any on another
    (whoever binds 0.0.0.0 means the server to be reached under names it cannot know)."""
    if cfg.allowed_hosts:
        return list(cfg.allowed_hosts)
    return [] if cfg.host in LOOPBACK_BINDS else ["*"]


def read_keys_file(path: str) -> list[str]:
    """The keys of --api-keys-file: one per line; blank lines and '#' comments skipped."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--api-keys-file {path}: cannot read it ({e}); give a text file with one key per line") \
            from None
    keys = [s for s in (line.partition("#")[0].strip() for line in lines) if s]
    if not keys:
        raise UsageError(f"--api-keys-file {path} holds no key (one per line; '#' starts a comment)")
    return keys


def api_keys_of(cfg: ServeConfig) -> list[str]:
    """--api-key (each of them) and the keys of --api-keys-file, else the NANOSEEK_API_KEY environment variable
    (none, or only empty ones: an open server)."""
    keys = list(cfg.api_key) + (read_keys_file(cfg.api_keys_file) if cfg.api_keys_file else [])
    if not keys and os.environ.get("NANOSEEK_API_KEY"):
        keys = [os.environ["NANOSEEK_API_KEY"]]
    return [k for k in keys if k]


def history_of(cfg: ServeConfig) -> Path | None:
    """The history database: --history, else the default under the user's data directory; None with --no-history."""
    if cfg.no_history:
        return None
    return Path(cfg.history).expanduser() if cfg.history else default_history_path()


def main(cfg: ServeConfig) -> int:
    import uvicorn

    from ..options import set_threads
    from .transport import server_config
    check_config(cfg)
    keys, history = api_keys_of(cfg), history_of(cfg)     # (a bad keys file or database fails before the model loads)
    store = None if history is None else History(history)
    engine, tok = load_engine(cfg.model, max_batch=cfg.max_concurrency, max_seq_len=cfg.max_seq_len,
                              dtype=cfg.dtype, device=cfg.device, compile=cfg.compile)
    threads = set_threads(cfg.threads, sum(p.numel() for p in engine.model.parameters()))
    name = cfg.served_model_name or Path(cfg.model).resolve().name
    limits = Limits(max_body_bytes=cfg.max_body_bytes, max_messages=cfg.max_messages, max_tokens=cfg.max_tokens_limit,
                    max_n=cfg.max_n)
    app = create_app(engine, tok, model_name=name, api_key=keys, max_concurrency=cfg.max_concurrency,
                     max_queue=cfg.max_queue, limits=limits, thinking_default=cfg.thinking,
                     allowed_hosts=hosts_to_allow(cfg), allowed_origins=cfg.allowed_origins, history=store)
    if cfg.host not in LOOPBACK_BINDS and not keys:
        print(f"warning: serving on {cfg.host} without an API key: anyone who can reach this port can use it "
              "(set --api-key or NANOSEEK_API_KEY)")
    print(f"nanoseek: serving {name!r} on http://{cfg.host}:{cfg.port}/ (chat page) and "
          f"http://{cfg.host}:{cfg.port}/v1 (API); {threads} CPU thread(s); chat history: "
          f"{history or 'off (--no-history)'}")
    uvicorn.Server(server_config(app, cfg.host, cfg.port, header_timeout_s=cfg.header_timeout_s,
                                 body_timeout_s=cfg.body_timeout_s, keep_alive_s=cfg.keep_alive_s,
                                 max_connections=connection_cap(cfg))).run()
    return 0
