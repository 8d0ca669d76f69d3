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
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator

from .tools import ToolFormat, tools_system_prompt

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
    max_n: int = 8                       # most choices (n) one request may ask for


# --------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as {"error": {...}} with its HTTP status (and headers, e.g. Retry-After)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
             415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             499: "client_closed_request", 500: "server_error", 503: "service_unavailable_error"}

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
# Known fields are strict: JSON's types are not converted into each other. `true` is not 1, "yes" is not true, "5" is
# not 5. A number field takes integers (1 is 1.0); an integer field takes a number with no fraction (5.0 is 5, as JSON
# Schema counts integers, so the published schema is exact), not 5.5. NaN and Infinity (which Python's json module
# reads) are refused. Unknown fields are accepted and ignored, as OpenAI-compatible servers do (vendor extras).
MAX_TOP_K = 2**31 - 1    # top_k above the vocabulary keeps every token; the cap keeps it an ordinary integer everywhere
SHORT_TEXT = 256         # model, user, name: identifiers, not texts
MAX_STOP, MAX_STOP_CHARS, MAX_STOP_IDS, MAX_TOOLS = 16, 256, 64, 128
MAX_BIAS = 300           # OpenAI's bound on logit_bias entries


def integers_below(n: int) -> str:
    """A regex matching the decimal integers 0 .. n-1 without leading zeros (n >= 1). JSON Schema bounds an
    object's keys by a pattern only, and logit_bias's keys are token ids below the vocabulary size."""
    m = str(n - 1)
    L = len(m)
    alts = ["[0-9]" if L > 1 else f"[0-{m}]"]
    alts += [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, L)]                 # fewer digits than n - 1
    if L > 1:                                                              # as many digits, up to n - 1
        for i, d in enumerate(map(int, m)):
            lo = 1 if i == 0 else 0
            if d > lo:
                alts.append(f"{m[:i]}[{lo}-{d - 1}]" + (f"[0-9]{{{L - i - 1}}}" if L - i - 1 else ""))
        alts.append(m)
    return "^(" + "|".join(alts) + ")$"


def bias_map(key_pattern: str = "^(0|[1-9][0-9]*)$"):
    """logit_bias's type: {token id (a JSON key): -100 .. 100}, at most MAX_BIAS entries, no other keys."""
    return Annotated[dict[Annotated[str, Field(pattern=key_pattern)], Annotated[float, Field(ge=-100, le=100)]],
                     Field(max_length=MAX_BIAS, json_schema_extra={"additionalProperties": False})]


def _whole(v):
    """5.0 -> 5 (a JSON number with no fraction is an integer); anything else is left for the strict check."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def integer(**bounds):
    """An integer type with Field's bounds (ge, gt, le, lt) that also takes a number with no fraction: 5.0 is 5."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


TokenId = integer(ge=0)
Short = Annotated[str, Field(max_length=SHORT_TEXT)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class ContentPart(_Open):
    type: Literal["text"]
    text: str | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise ValueError(f"only text content parts are supported by this model (got type {v!r})")
        return v


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]   # OpenAI's rule (plus . and :)


class CalledFunction(_Open):
    name: FunctionName
    arguments: str                                     # a JSON text, as OpenAI sends it


class ToolCall(_Open):
    """A call an earlier assistant turn made (sent back with the conversation)."""
    id: Short
    type: Literal["function"] = "function"
    function: CalledFunction


# a tool message answers a call: it names the call's id (the JSON Schema form of ChatMessage's check)
_TOOL_NEEDS_ID = {"if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
                  "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}}}


class ChatMessage(_Open):
    model_config = ConfigDict(json_schema_extra=_TOOL_NEEDS_ID)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: Short | None = None
    reasoning_content: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None   # assistant turns
    tool_call_id: Short | None = None                                                  # tool turns

    @model_validator(mode="after")
    def _tool_needs_id(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a message with role 'tool' must carry the tool_call_id of the call it answers")
        return self


class FunctionDef(_Open):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None                     # a JSON Schema of the arguments (an object)
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Open):
    name: FunctionName


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Open):
    include_usage: bool = False


class JSONSchemaFormat(_Open):
    """OpenAI's response_format.json_schema: the schema the answer must satisfy, enforced while decoding."""
    model_config = ConfigDict(populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")   # (None: any JSON object)
    strict: bool | None = None                          # the schema is always enforced, strict or not


# type "json_schema" needs the json_schema object (the JSON Schema form of ResponseFormat's check)
_FORMAT_NEEDS_SCHEMA = {"if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
                        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}}


class ResponseFormat(_Open):
    """text (free), json_object (any JSON object) or json_schema (JSON valid under json_schema.schema); the JSON
    kinds are enforced while decoding (nanoseek.infer.grammar): an answer that ends with "stop" always parses."""
    model_config = ConfigDict(json_schema_extra=_FORMAT_NEEDS_SCHEMA)
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema object '
                             '({"name": ..., "schema": {...}})')
        return self


class ThinkingOption(_Open):
    type: Literal["enabled", "disabled"]


# reasoning_effort as DeepSeek's API takes it (api-docs.deepseek.com/guides/thinking_mode: low/high/max, the OpenAI
# names mapped onto them: minimal -> low, medium and xhigh -> high, ultra -> max), and what each selects in V4's
# prompt format, which has two efforts (think-high, think-max: encoding_v4.py): low joins high, as DeepSeek's V4
# launch mapped it. "none" (OpenAI's and DeepSeek's Responses API's) turns thinking off.
REASONING_EFFORTS = {"none": None, "minimal": "high", "low": "high", "medium": "high", "high": "high",
                     "xhigh": "high", "max": "max", "ultra": "max"}


class TemplateKwargs(_Open):
    """vLLM's chat_template_kwargs: the thinking switch under either name; other keys are ignored."""
    thinking: bool | None = None
    enable_thinking: bool | None = None


class _Sampling(_Open):
    model: Short | None = None
    max_tokens: integer(ge=1) | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: integer(ge=-1, le=MAX_TOP_K) | None = None   # -1 or 0: off (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: integer(ge=-(2**63), lt=2**64) | None = None  # what torch.Generator.manual_seed accepts
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_IDS)] | None = None
    logit_bias: bias_map() | None = None                 # {"token id": bias}: added to its logit before sampling
    n: integer(ge=1, le=128) = 1                          # choices: copies sharing the prompt's cache, own seeds
    user: Short | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return [v] if isinstance(v, str) else v

    def wanted_tokens(self) -> int | None:
        """The max_tokens the client asked for (None: the server's limit)."""
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# tool_choice "required" or a named function needs tools (the JSON Schema form of ChatRequest's check)
_CHOICE_NEEDS_TOOLS = {"if": {"properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
                              "required": ["tool_choice"]},
                       "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}}
# top_logprobs > 0 needs logprobs: true (the JSON Schema form of ChatRequest's check)
_TOP_NEEDS_LOGPROBS = {"if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                              "required": ["top_logprobs"]},
                       "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}}


class ChatRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"allOf": [_TOP_NEEDS_LOGPROBS, _CHOICE_NEEDS_TOOLS]})
    tool_format: ClassVar[str | None] = None            # set by request_models: the template's tool-call format
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=20) | None = None
    response_format: ResponseFormat | None = None      # json_object / json_schema: enforced while decoding
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None   # None: auto with tools
    parallel_tool_calls: bool = True
    thinking: ThinkingOption | bool | None = None      # deep-think switch (DeepSeek style: {"type": "enabled"})
    reasoning_effort: Literal[tuple(REASONING_EFFORTS)] | None = None   # how hard to think (V4: high or max)
    chat_template_kwargs: TemplateKwargs | None = None  # vLLM style: {"thinking": true}

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs a non-empty tools list")
        return self

    @field_validator("tools")
    @classmethod
    def _template_takes_tools(cls, v):
        if v and cls.tool_format is None:
            raise ValueError("this model's chat template has no tool-call format (DeepSeek's tool tokens or "
                             "<tool_call> tags), so it cannot be offered tools; serve a model whose template has one")
        return v

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens   # (OpenAI's newer name wins)


class CompletionRequest(_Sampling):
    vocab_size: ClassVar[int | None] = None             # set by request_models: token ids are below it
    fim: ClassVar[bool] = False                         # set by request_models: the tokenizer has FIM tokens
    prompt: str | Annotated[list[TokenId], Field(min_length=1)] | Annotated[list[str], Field(min_length=1,
                                                                                              max_length=1)]
    suffix: Annotated[str, Field(max_length=0)] | None = None   # fill-in-the-middle: the text after the hole
    echo: bool = False
    logprobs: integer(ge=0, le=20) | None = None
    best_of: integer(ge=1, le=1) | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, p):
        """The common mistakes in words (the union's own errors list every alternative)."""
        if isinstance(p, list):
            if not p:
                raise ValueError("the prompt is empty")
            if all(isinstance(x, str) for x in p) and len(p) != 1:
                raise ValueError("one prompt per request (send a list of prompts as separate requests)")
            ids = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
            if ids and cls.vocab_size and not all(0 <= x < cls.vocab_size for x in p):
                raise ValueError(f"prompt token ids must be in [0, {cls.vocab_size})")
        return p

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, v):
        if isinstance(v, str) and v and not cls.fim:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model: its tokenizer has no FIM "
                             "tokens (DeepSeek's V3/R1 and V4 tokenizers have them)")
        return v


def request_models(limits: Limits, model_name: str | None = None, ctx: int | None = None,
                   vocab_size: int | None = None, tool_format: str | None = None, fim: bool = False
                   ) -> tuple[type[ChatRequest], type[CompletionRequest]]:
    """ChatRequest and CompletionRequest as this server accepts them: max_tokens up to limits.max_tokens, token ids
    below the vocabulary. Their JSON schema also states three limits that app.py checks with statuses of its own
    (400), so that the published schema is the whole contract: the model names (served name and MODEL_ALIASES),
    the number of messages, and a token-id prompt's length against the context. A text's length in tokens is only
    known once encoded, so it stays app.py's check (400 context_length_exceeded), as does the body's size in bytes.
    A model whose chat template has no tool-call format (tool_format None, see tools.detect) takes no tools: the
    schema says so (maxItems 0); nor does one without FIM tokens take a suffix (maxLength 0)."""
    max_prompt = limits.max_prompt_tokens or (ctx - 1 if ctx else None)
    names = [model_name, *MODEL_ALIASES] if model_name else None
    model = (Annotated[str, Field(max_length=SHORT_TEXT, json_schema_extra={"enum": names} if names else None)]
             | None, None)
    tokens = (integer(ge=1, le=limits.max_tokens) | None, None)
    token_id = integer(ge=0, lt=vocab_size)
    stop_ids = (Annotated[list[token_id], Field(max_length=MAX_STOP_IDS)] | None, None)
    ids = Annotated[list[token_id], Field(min_length=1, json_schema_extra={"maxItems": max_prompt} if max_prompt
                                          else None)]
    prompt = (str | ids | Annotated[list[str], Field(min_length=1, max_length=1)], ...)
    messages = (list[ChatMessage], Field(min_length=1, json_schema_extra={"maxItems": limits.max_messages}))
    tools = (Annotated[list[Tool], Field(max_length=MAX_TOOLS, json_schema_extra=None if tool_format
                                         else {"maxItems": 0})] | None, None)
    n = (integer(ge=1, le=limits.max_n), 1)
    bias = (bias_map(integers_below(vocab_size)) | None, None) if vocab_size else (bias_map() | None, None)
    chat = create_model("ChatRequest", __base__=ChatRequest, __module__=__name__, model=model, max_tokens=tokens,
                        max_completion_tokens=tokens, stop_token_ids=stop_ids, messages=messages, tools=tools, n=n,
                        logit_bias=bias)
    chat.tool_format = tool_format
    completion = create_model("CompletionRequest", __base__=CompletionRequest, __module__=__name__, model=model,
                              max_tokens=tokens, stop_token_ids=stop_ids, prompt=prompt, n=n, logit_bias=bias,
                              **({"suffix": (str | None, None)} if fim else {}))
    completion.vocab_size, completion.fim = vocab_size, fim
    return chat, completion


# --------------------------------------------------------------------------------------------- requests -> engine
def chat_thinking(req: ChatRequest, default: bool | None) -> bool | None:
    """The deep-think switch: DeepSeek's `thinking` ({"type": ...} or a bool), then vLLM's chat_template_kwargs,
    else `default` (the model alias's, else the server's). None: nobody said, so the variable stays undefined and
    the chat template's own default holds, as transformers renders it (on in nanoseek's, off in DeepSeek-V3.1's)."""
    thinking = default
    if isinstance(req.thinking, bool):
        thinking = req.thinking
    elif req.thinking is not None:
        thinking = req.thinking.type == "enabled"
    kwargs = req.chat_template_kwargs
    for k in ("thinking", "enable_thinking"):
        if kwargs is not None and k in kwargs.model_fields_set:
            thinking = bool(getattr(kwargs, k))     # (an explicit null: off, as before)
    return False if req.reasoning_effort == "none" else thinking


def chat_effort(req: ChatRequest) -> str | None:
    """The reasoning effort for the prompt ("high", "max" or None: unsaid, the format's default), from
    `reasoning_effort`; it matters only while thinking (V4's think-high / think-max, encoding_v4.mode)."""
    return REASONING_EFFORTS.get(req.reasoning_effort) if req.reasoning_effort else None


def template_messages(req: ChatRequest, fmt: ToolFormat | None = None) -> list[dict]:
    """The request's messages as the chat template reads them: text only; developer -> system; an assistant turn
    keeps its reasoning_content (a template may show or drop it). With a tool format (the template writes tool
    calls), a tool message keeps its role and tool_call_id, an assistant turn its tool_calls (content "" when it sent
    none: DeepSeek's V3 template cannot read a missing one; arguments a string, or a dict for templates that write
    them with tojson, as transformers expects);
    without one, a tool message is shown as the user's."""
    messages = []
    for m in req.messages:
        if isinstance(m.content, list):   # (ContentPart admits only text parts)
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        role = {"developer": "system", "tool": "tool" if fmt else "user"}.get(m.role, m.role)
        msg = {"role": role, "content": text}
        if m.role == "assistant" and m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if fmt and m.role == "assistant" and m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": _arguments(c.function.arguments, fmt)}}
                                 for c in m.tool_calls]
        if fmt and m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    return messages


def _arguments(text: str, fmt: ToolFormat):
    """A past call's arguments as its template writes them: the JSON text, or (tojson templates) the object."""
    if not fmt.args_as_dict:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_tools(req: ChatRequest, messages: list[dict], shows_tools: bool) -> list[dict] | None:
    """The tools as the chat template receives them (OpenAI's dicts, as transformers passes them). A template that
    does not show `tools` itself (DeepSeek's V3, R1, V3.1) gets them described in a system message instead, put
    after the conversation's leading system messages (`messages` is changed in place)."""
    if not req.tools:
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if not shows_tools:
        at = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        messages.insert(at, {"role": "system", "content": tools_system_prompt(tools)})
    return tools


def chat_chars(messages: list[dict], tools: list[dict] | None) -> int:
    """Characters of what a template writes from the request (every message's text, calls, the tool list)."""
    n = sum(len(m["content"] or "") + len(m.get("reasoning_content") or "") for m in messages)
    n += sum(len(json.dumps(c, ensure_ascii=False)) for m in messages for c in m.get("tool_calls") or ())
    return n + (len(json.dumps(tools, ensure_ascii=False)) if tools else 0)


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a /v1/completions request: a string, or token ids (the schema allows one string in a list)."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], str):
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


# --------------------------------------------------------------------------------------------- response pieces
def sse(obj) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_reason(reason: str | None, tool_calls: bool = False) -> str:
    """The engine's finish reason as the API names it ("abort" and "error" never reach a client as such); an answer
    that ends with tool calls finishes with "tool_calls"."""
    if reason == "length":
        return reason
    return "tool_calls" if tool_calls else "stop"


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


def total_usage(usages: list[dict]) -> dict:
    """The usage of n choices of one prompt: the prompt (and its cache hits) once, the completions summed."""
    u = {**usages[0], "completion_tokens_details": dict(usages[0]["completion_tokens_details"])}
    for v in usages[1:]:
        u["completion_tokens"] += v["completion_tokens"]
        u["completion_tokens_details"]["reasoning_tokens"] += v["completion_tokens_details"]["reasoning_tokens"]
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    return u


def merge_choices(answers: list[dict], usage_: dict) -> dict:
    """One response of n choices from the n single-choice responses of the same request (choice i at index i)."""
    choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
    return {**answers[0], "choices": choices, "usage": usage_}


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


def chat_response(base: dict, comp, logprobs: dict | None, usage_: dict,
                  answer: tuple[str | None, list[dict]] | None = None) -> dict:
    """A whole `chat.completion`: the answer in content, the thinking in reasoning_content; with `answer` (the
    tool parser's (content, tool_calls)), the calls in tool_calls and finish_reason "tool_calls"."""
    content, calls = answer or (comp.content or "", [])
    msg = {"role": "assistant", "content": content, "reasoning_content": comp.reasoning_content or None}
    if calls:
        msg["tool_calls"] = calls
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": msg, "logprobs": logprobs,
                         "finish_reason": finish_reason(comp.finish_reason, bool(calls))}],
            "usage": usage_}


def completion_response(base: dict, text: str, comp, logprobs: dict | None, usage_: dict) -> dict:
    """A whole `text_completion`."""
    return {**base, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason(comp.finish_reason)}],
            "usage": usage_}


def model_card(name: str, created: int, max_model_len: int | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "nanoseek", "max_model_len": max_model_len}


# --------------------------------------------------------------------------------------------- response schemas
# What the builders above return, as schemas for the OpenAPI document (the fuzz test checks every answer against
# them). Closed objects: a field a builder adds must be added here too.
class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Closed):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Closed):
    error: ErrorDetail


class PromptDetails(_Closed):
    cached_tokens: int = Field(ge=0)


class CompletionDetails(_Closed):
    reasoning_tokens: int = Field(ge=0)


class Usage(_Closed):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_cache_hit_tokens: int = Field(ge=0)
    prompt_cache_miss_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptDetails
    completion_tokens_details: CompletionDetails


LogProb = Annotated[float, Field(le=0)]             # a finite JSON number: log p <= 0
Byte = Annotated[int, Field(ge=0, le=255)]


class TopLogprob(_Closed):
    token: str
    logprob: LogProb
    bytes: list[Byte]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Closed):
    content: list[TokenLogprob]


class TextLogprobs(_Closed):
    tokens: list[str]
    token_logprobs: list[LogProb]
    text_offset: list[Annotated[int, Field(ge=0)]]
    top_logprobs: list[dict[str, LogProb]]


FinishReason = Literal["stop", "length", "tool_calls"]


class _Answer(_Closed):
    id: str
    created: int
    model: str
    system_fingerprint: str


class FunctionCallOut(_Closed):
    name: str
    arguments: str


class ToolCallOut(_Closed):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: str | None                  # null when the answer is tool calls only
    reasoning_content: str | None
    tool_calls: list[ToolCallOut] = None


class ChatChoice(_Closed):
    index: int = Field(ge=0)                                       # the choice (n > 1: 0 .. n-1)
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: Annotated[list[ChatChoice], Field(min_length=1)]          # n of them
    usage: Usage


class FunctionDelta(_Closed):
    name: str = None                     # in a call's first delta
    arguments: str                       # then the arguments' text, in pieces


class ToolCallDelta(_Closed):
    index: int = Field(ge=0)
    id: str = None                       # (id, type and name: in a call's first delta only)
    type: Literal["function"] = None
    function: FunctionDelta


class ChatDelta(_Closed):
    role: Literal["assistant"] = None
    content: str = None
    reasoning_content: str = None
    tool_calls: list[ToolCallDelta] = None


class ChatChunkChoice(_Closed):
    index: int = Field(ge=0)                                       # the choice (n > 1: 0 .. n-1)
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"]
    choices: Annotated[list[ChatChunkChoice], Field(max_length=1)]   # one choice's delta; none in the usage chunk
    usage: Usage | None = None


class TextChoice(_Closed):
    index: int = Field(ge=0)                                       # the choice (n > 1: 0 .. n-1)
    text: str
    logprobs: TextLogprobs | None
    finish_reason: FinishReason | None                             # null in the streamed pieces before the last


class TextCompletion(_Answer):
    object: Literal["text_completion"]
    choices: list[TextChoice]                            # n of them whole; one per streamed piece
    usage: Usage | None = None


class ModelCard(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None


class ModelList(_Closed):
    object: Literal["list"]
    data: list[ModelCard]


class ServedLimits(_Closed):
    """GET /v1/limits: what a request may ask for (the chat page sizes its fields with it)."""
    max_tokens: int = Field(ge=1)
    max_prompt_tokens: int | None
    context_length: int | None
    max_messages: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1)
    max_n: int = Field(ge=1)


class Health(_Closed):
    status: Literal["ok"]
    model: str
    running: int = Field(ge=0)
    waiting: int = Field(ge=0)


# --------------------------------------------------------------------------------------------- the OpenAPI document
def _json(ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _events(chunk: str) -> dict:
    """A stream of server-sent events (OpenAPI 3.2's itemSchema: one event): each carries a JSON chunk, or an error
    met after the status line went out, and the last one says [DONE]."""
    payload = {"contentMediaType": "application/json",
               "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                                           {"$ref": "#/components/schemas/ErrorBody"}]}}
    return {"text/event-stream": {"itemSchema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}}}


def _error(why: str, headers: dict | None = None) -> dict:
    return {"description": why, "content": _json("ErrorBody"), **({"headers": headers} if headers else {})}


# app.py's guard: a web page of a foreign origin, or a Host this server does not answer to (DNS rebinding)
_FORBIDDEN = {"403": _error("a web page of another origin (Origin), or a Host name this server does not answer to")}


def _operation(summary: str, responses: dict, auth: bool, **more) -> dict:
    """One operation; with `auth`, it needs the bearer key (401 without)."""
    op = {"summary": summary, **more, "responses": {**responses, **_FORBIDDEN}}
    if auth:
        op["security"] = [{"bearer": []}]
        op["responses"]["401"] = _error("missing or wrong API key")
    return op


def _generation(summary: str, request: str, answer: str, chunk: str, auth: bool) -> dict:
    retry = {"Retry-After": {"description": "seconds to wait", "required": True, "schema": {"type": "string"}}}
    responses = {
        "200": {"description": "the answer (server-sent events when stream is true)",
                "content": {**_json(answer), **_events(chunk)}},
        "400": _error("the body is not a JSON object, is too large or has invalid unicode; the prompt is longer than "
                      "the context (context_length_exceeded); an unknown model; too many messages"),
        "415": _error("the body is not declared Content-Type: application/json"),
        "422": _error("a parameter is invalid (the schema says which values are accepted)"),
        "429": _error("the server is busy: retry after Retry-After seconds", retry),
        "500": _error("the engine failed while generating"),
        "503": _error("the engine is not running")}
    body = {"required": True, "content": _json(request)}
    return {"post": _operation(summary, responses, auth, requestBody=body)}


def _get(summary: str, answer: dict, auth: bool, errors: dict, **more) -> dict:
    return {"get": _operation(summary, {"200": {"description": summary, "content": answer}, **errors}, auth, **more)}


def openapi_schema(limits: Limits, model_name: str, ctx: int | None = None, vocab_size: int | None = None,
                   auth: bool = False, tool_format: str | None = None, fim: bool = False) -> dict:
    """The OpenAPI document of this server: the request models of `request_models` (so the served limits are in
    it), the answers and stream chunks, the errors with their statuses. auth: the /v1 endpoints need a bearer key."""
    from pydantic.json_schema import models_json_schema

    chat, completion = request_models(limits, model_name, ctx, vocab_size, tool_format, fim)
    models = [(chat, "validation"), (completion, "validation"), (ErrorBody, "serialization"),
              (ChatCompletion, "serialization"), (ChatCompletionChunk, "serialization"),
              (TextCompletion, "serialization"), (ModelList, "serialization"), (ModelCard, "serialization"),
              (ServedLimits, "serialization"), (Health, "serialization")]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    model_path = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths = {
        "/v1/chat/completions": _generation("chat completion", "ChatRequest", "ChatCompletion",
                                            "ChatCompletionChunk", auth),
        "/v1/completions": _generation("text completion", "CompletionRequest", "TextCompletion", "TextCompletion",
                                       auth),
        "/v1/models": _get("the served model", _json("ModelList"), auth, {}),
        "/v1/models/{model_id}": _get("one model", _json("ModelCard"), auth, {"404": _error("no such model")},
                                      parameters=[model_path]),
        "/v1/limits": _get("what a request may ask for", _json("ServedLimits"), auth, {}),
        "/health": _get("the engine is running", _json("Health"), False, {"503": _error("the engine is down")}),
        "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}, False, {}),
    }
    context = f"{ctx} tokens" if ctx else "the model's"
    doc = {"openapi": "3.1.0",
           "info": {"title": "nanoseek", "version": "0.1.0",
                    "description": f"DeepSeek/OpenAI-compatible API serving {model_name!r}. Context: {context} "
                                   f"(prompt and answer); max_tokens at most {limits.max_tokens}; at most "
                                   f"{limits.max_messages} messages; bodies at most {limits.max_body_bytes} bytes."},
           "paths": paths,
           "components": {"schemas": defs["$defs"]}}
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
