"""The API's wire format: request schemas, errors, limits and the pure builders of responses and stream chunks.

Field names are those of DeepSeek's API (an OpenAI superset): `reasoning_content` carries the text inside
<think>...</think>; usage reports prompt_cache_hit_tokens / prompt_cache_miss_tokens. Nothing here touches the
network, the engine or FastAPI: every builder takes plain values (a Completion, a StreamDelta, a `token_str`
function) and returns the dict that goes out as JSON, so each can be read and tested on its own. app.py wires
them to the routes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Model names that DeepSeek's own API uses, accepted so that tools configured for it work unchanged:
# deepseek-reasoner thinks first (R1 style), deepseek-chat answers directly.
MODEL_ALIASES = {"deepseek-reasoner": True, "deepseek-chat": False}
KEEPALIVE = ": keep-alive\n\n"       # an SSE comment: clients ignore it, a closed connection shows on the write
DONE = "data: [DONE]\n\n"


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


def validation_message(errors) -> str:
    """pydantic's error list as one line: `invalid parameters: messages.0.role: ...; max_tokens: ...`."""
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

    def wanted_tokens(self) -> int | None:
        """The max_tokens the client asked for (None: the server's limit)."""
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


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

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens   # (OpenAI's newer name wins)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=1)


# --------------------------------------------------------------------------------------------- requests -> engine
def chat_thinking(req: ChatRequest, default: bool) -> bool:
    """The deep-think switch: DeepSeek's `thinking` ({"type": ...} or a bool), then vLLM's chat_template_kwargs."""
    thinking = default
    if isinstance(req.thinking, bool):
        thinking = req.thinking
    elif req.thinking is not None:
        thinking = req.thinking.type == "enabled"
    for k in ("thinking", "enable_thinking"):
        if req.chat_template_kwargs and k in req.chat_template_kwargs:
            thinking = bool(req.chat_template_kwargs[k])
    return thinking


def template_messages(req: ChatRequest) -> list[dict]:
    """The request's messages as the chat template reads them: text only; developer -> system, tool -> user;
    an assistant turn keeps its reasoning_content (a template may show or drop it)."""
    messages = []
    for m in req.messages:
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise APIError(422, "only text content parts are supported by this model", "invalid_parameter",
                               param="messages")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        msg = {"role": {"developer": "system", "tool": "user"}.get(m.role, m.role), "content": text}
        if m.role == "assistant" and m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        messages.append(msg)
    return messages


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a /v1/completions request: a string, or token ids."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], str):
        if len(p) != 1:
            raise APIError(422, "one prompt per request (send a list of prompts as separate requests)",
                           "invalid_parameter", param="prompt")
        p = p[0]
    return p


# --------------------------------------------------------------------------------------------- text filtering
class StripStrings:
    """Removes every occurrence of some strings from a text that arrives in pieces: a piece's end that could be the
    start of one of them is held back until the next piece (or the end) decides. Feeding the pieces one by one gives
    the same text as feeding their concatenation at once, so a stream and a non-streamed answer agree."""

    def __init__(self, words):
        words = sorted({w for w in words if w}, key=len, reverse=True)   # longest first at a given position
        self.pattern = re.compile("|".join(map(re.escape, words))) if words else None
        self.prefixes = {w[:n] for w in words for n in range(1, len(w))}
        self.longest = max(map(len, words), default=0)
        self.buf = ""

    def feed(self, text: str, final: bool = False) -> str:
        """The filtered text now known to be final (all of it when `final`)."""
        buf, self.buf = self.buf + text, ""
        if self.pattern is None:
            return buf
        out, last = [], 0
        for m in self.pattern.finditer(buf):
            out.append(buf[last:m.start()])
            last = m.end()
        rest = buf[last:]
        keep = 0 if final else self._held(rest)
        out.append(rest[:len(rest) - keep])
        self.buf = rest[len(rest) - keep:]
        return "".join(out)

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins one of the words."""
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            if text[-n:] in self.prefixes:
                return n
        return 0


def control_tokens(tokenizer) -> tuple[set[int], tuple[str, ...]]:
    """The tokenizer's control tokens (ids, strings): its special tokens except <think> and </think>, which are
    text the model writes. /v1/completions leaves them out of its text (decoding with special tokens skipped)."""
    ids = set(tokenizer.special_ids) - {tokenizer.think_start_id, tokenizer.think_end_id}
    return ids, tuple(tokenizer.id_to_token(i) for i in sorted(ids))


# --------------------------------------------------------------------------------------------- response pieces
def sse(obj) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_reason(reason: str | None) -> str:
    """The engine's finish reason as the API names it ("abort" and "error" never reach a client as such)."""
    return reason if reason in ("stop", "length") else "stop"


def reasoning_tokens(comp, think_end_id: int | None) -> int:
    """Generated tokens spent thinking: everything up to and including </think>; all of them when the answer
    was cut off while still thinking."""
    ids = list(comp.token_ids)
    if think_end_id is not None and think_end_id in ids:
        return ids.index(think_end_id) + 1
    if comp.reasoning_content and not comp.content:
        return len(ids)
    return 0


def usage(comp, think_end_id: int | None) -> dict:
    """DeepSeek's usage object (OpenAI's fields plus prompt_cache_hit_tokens / prompt_cache_miss_tokens)."""
    p, c, hit = int(comp.prompt_tokens), int(comp.completion_tokens), int(comp.cached_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": p - hit,
            "prompt_tokens_details": {"cached_tokens": hit},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens(comp, think_end_id)}}


def _top(entry, top_n: int) -> list[tuple[int, float]]:
    """One position's top logprobs as (token_id, logprob), from a dict {id: lp} or pairs."""
    if entry is None:
        return []
    items = entry.items() if isinstance(entry, dict) else entry
    return [(int(t), float(lp)) for t, lp in items][:top_n]


def chat_logprobs(x, top_n: int, token_str: Callable[[int], str]) -> dict | None:
    """OpenAI's chat logprobs {"content": [{token, logprob, bytes, top_logprobs}]} of a Completion or a delta."""
    if x.logprobs is None:
        return None
    tops = x.top_logprobs or [None] * len(x.logprobs)
    content = []
    for tid, lp, top in zip(x.token_ids, x.logprobs, tops):
        s = token_str(tid)
        content.append({"token": s, "logprob": float(lp), "bytes": list(s.encode()),
                        "top_logprobs": [{"token": token_str(t), "logprob": v, "bytes": list(token_str(t).encode())}
                                         for t, v in _top(top, top_n)]})
    return {"content": content}


def text_logprobs(x, top_n: int, offset: int, token_str: Callable[[int], str],
                  hidden: set[int] = frozenset()) -> dict | None:
    """OpenAI's legacy completion logprobs {tokens, token_logprobs, text_offset, top_logprobs}; offsets count from
    `offset` in the returned text, where the `hidden` (control) tokens take no room."""
    if x.logprobs is None:
        return None
    tops = x.top_logprobs or [None] * len(x.logprobs)
    tokens, offsets = [], []
    for tid in x.token_ids:
        s = token_str(tid)
        tokens.append(s)
        offsets.append(offset)
        offset += 0 if tid in hidden else len(s)
    return {"tokens": tokens, "token_logprobs": [float(v) for v in x.logprobs], "text_offset": offsets,
            "top_logprobs": [{token_str(t): v for t, v in _top(top, top_n)} for top in tops]}


def chat_chunk(base: dict, delta: dict, reason: str | None = None, logprobs: dict | None = None,
               include_usage: bool = False) -> dict:
    """One `chat.completion.chunk` (with "usage": null when the client asked for usage at the end)."""
    c = {**base, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
    if include_usage:
        c["usage"] = None
    return c


def completion_chunk(base: dict, text: str, reason: str | None = None, logprobs: dict | None = None,
                     include_usage: bool = False) -> dict:
    """One streamed `text_completion` piece."""
    c = {**base, "object": "text_completion",
         "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
    if include_usage:
        c["usage"] = None
    return c


def usage_chunk(base: dict, obj: str, usage_: dict) -> dict:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return {**base, "object": obj, "choices": [], "usage": usage_}


def chat_response(base: dict, comp, logprobs: dict | None, usage_: dict) -> dict:
    """A whole `chat.completion`: the answer in content, the thinking in reasoning_content."""
    msg = {"role": "assistant", "content": comp.content or "", "reasoning_content": comp.reasoning_content or None}
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": msg, "logprobs": logprobs,
                         "finish_reason": finish_reason(comp.finish_reason)}],
            "usage": usage_}


def completion_response(base: dict, text: str, comp, logprobs: dict | None, usage_: dict) -> dict:
    """A whole `text_completion`."""
    return {**base, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason(comp.finish_reason)}],
            "usage": usage_}


def model_card(name: str, created: int, max_model_len: int | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "nanoseek", "max_model_len": max_model_len}
