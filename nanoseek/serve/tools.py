"""Tool calls in each model family's own words: which format a chat template uses, the parser that turns a model's
answer back into OpenAI `tool_calls` (whole, or streamed as deltas), and the grammar that forces a call.

The formats, as the published chat templates write a past assistant turn (and so as the models were trained):

    DeepSeek V3 / R1   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
                       [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]<｜tool▁calls▁end｜>
    DeepSeek V3.1      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    Qwen2 / Qwen3      <tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>   (one block per call)
    DeepSeek V4        \\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="NAME">\\n
                       <｜DSML｜parameter name="KEY" string="true">VALUE</｜DSML｜parameter>\\n...</｜DSML｜invoke>
                       [\\n<｜DSML｜invoke ...>...</｜DSML｜invoke>]\\n</｜DSML｜tool_calls>

V4 writes no JSON object: each argument is one parameter, a string as it is (string="true"), any other value as
JSON (string="false"); DeepSeek's decoder (encoding_dsv4.py) joins them back into the object {"KEY": VALUE, ...}
in the order written, and so does the parser here.

The family is read from the chat template's text (`detect`); V4's tokenizer has no template, its prompt format
(nanoseek.encoding_v4, `Tokenizer.prompt_format == "deepseek-v4"`) says it. The markers are single added tokens in
these vocabularies (V4's tags are text spelled around its one ｜DSML｜ token); the tokenizer keeps them in generated
text (they are not `control_ids`), so the parser reads text.

One parser serves both answers: the non-streamed result is the streaming parser fed the whole answer at once, and
the parser gives the same result however the text is cut into pieces (tests/test_tools.py cuts it at random), so
streamed deltas always reassemble to the non-streamed message.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from .. import chat_template as ct
from ..errors import UsageError

CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP = ct.CALLS_BEGIN, ct.CALLS_END, ct.CALL_BEGIN, ct.CALL_END, ct.TOOL_SEP
QWEN_CALL_BEGIN, QWEN_CALL_END, TOOL_MARKERS = ct.QWEN_CALL_BEGIN, ct.QWEN_CALL_END, ct.TOOL_MARKERS

FENCE = "```json\n"   # V3/R1 write the arguments as a JSON code block

DSML = ct.DSML        # V4's tags, each <｜DSML｜NAME ...> or </｜DSML｜NAME> around the one token
V4_CALLS, V4_CALLS_END = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
V4_INVOKE, V4_INVOKE_END = f"<{DSML}invoke", f"</{DSML}invoke>"
V4_PARAM, V4_PARAM_END = f"<{DSML}parameter", f"</{DSML}parameter>"


@dataclass(frozen=True)
class ToolFormat:
    """How one template family writes tool calls."""
    name: str                 # "deepseek-v3" (V3 and R1), "deepseek-v3.1", "deepseek-v4", "qwen" (Qwen2.5, Qwen3...)
    opens: str                # the text that starts the calls in an answer
    args_as_dict: bool        # the template writes a past call's arguments with tojson: give it a dict, not a string

    @property
    def deepseek(self) -> bool:
        return self.name.startswith("deepseek")

    def call_text(self, name: str, arguments: str) -> str:
        """One call as the model writes it (without the V3 family's outer begin/end markers)."""
        if self.name == "deepseek-v3":
            return f"{CALL_BEGIN}function{TOOL_SEP}{name}\n{FENCE}{arguments}\n```{CALL_END}"
        if self.name == "deepseek-v3.1":
            return f"{CALL_BEGIN}{name}{TOOL_SEP}{arguments}{CALL_END}"
        if self.name == "deepseek-v4":
            return _dsml_invoke(name, arguments)
        return f'{QWEN_CALL_BEGIN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n' \
               f"{QWEN_CALL_END}"

    def answer_text(self, calls: list[tuple[str, str]], content: str = "") -> str:
        """A whole answer with these (name, arguments) calls, as the template writes a past one (tests use it)."""
        if self.name == "deepseek-v3":
            return content + CALLS_BEGIN + "\n".join(self.call_text(n, a) for n, a in calls) + CALLS_END
        if self.name == "deepseek-v3.1":
            return content + CALLS_BEGIN + "".join(self.call_text(n, a) for n, a in calls) + CALLS_END
        if self.name == "deepseek-v4":
            invokes = "\n".join(self.call_text(n, a) for n, a in calls)
            return f"{content}\n\n{V4_CALLS}\n{invokes}\n{V4_CALLS_END}"
        return (content + "\n" if content else "") + "\n".join(self.call_text(n, a) for n, a in calls)


DEEPSEEK_V3 = ToolFormat("deepseek-v3", CALLS_BEGIN, args_as_dict=False)
DEEPSEEK_V31 = ToolFormat("deepseek-v3.1", CALLS_BEGIN, args_as_dict=False)
QWEN = ToolFormat("qwen", QWEN_CALL_BEGIN, args_as_dict=True)
DEEPSEEK_V4 = ToolFormat("deepseek-v4", V4_CALLS, args_as_dict=False)   # (encoding_v4 reads either)


def _dsml_invoke(name: str, arguments: str) -> str:
    """One V4 call as DeepSeek's encoder writes it (encoding_v4 renders past calls the same way): each argument a
    parameter line; arguments that are no JSON object become one parameter named "arguments", as there."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        args = {"arguments": arguments}
    params = [f'{V4_PARAM} name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
              f'{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}{V4_PARAM_END}'
              for k, v in args.items()]
    return f'{V4_INVOKE} name="{name}">\n' + "\n".join(params) + f"\n{V4_INVOKE_END}"


def detect(template: str | None, prompt_format: str | None = None) -> ToolFormat | None:
    """The tool-call format a chat template writes past calls in; None when it writes none (it cannot take tools).
    V3/R1 put the arguments in a ```json block, V3.1 right after the separator; Qwen templates use <tool_call>.
    A tokenizer without a template may have a prompt format of its own (`Tokenizer.prompt_format`): V4's
    ("deepseek-v4", nanoseek.encoding_v4) writes its calls in DSML."""
    if prompt_format == "deepseek-v4":
        return DEEPSEEK_V4
    if not template:
        return None
    if CALL_BEGIN in template and TOOL_SEP in template:
        return DEEPSEEK_V3 if "```json" in template else DEEPSEEK_V31
    if QWEN_CALL_BEGIN in template:
        return QWEN
    return None


def shows_tools(template: str | None, prompt_format: str | None = None) -> bool:
    """Does the template read the `tools` variable (write the tool list into the prompt itself)? DeepSeek's V3, R1
    and V3.1 templates do not: their model cards put the list in the system prompt (see `tools_system_prompt`).
    V4's prompt format does (encoding_v4's tools section, DeepSeek's own wording)."""
    if prompt_format == "deepseek-v4":
        return True
    return bool(template) and re.search(r"\btools\b", template) is not None


def tools_system_prompt(tools: list[dict]) -> str:
    """The tool list as a system prompt, for templates that do not show `tools` themselves: each function's name,
    description and parameter schema, in the layout of DeepSeek-V3.1's model card (plain text: the call format
    itself is what the model was trained to write)."""
    parts = ["## Tools", "You have access to the following tools:"]
    for t in tools:
        f = t.get("function", {})
        parts.append(f"### {f.get('name', '')}\nDescription: {f.get('description', '')}\n\n"
                     f"Parameters: {json.dumps(f.get('parameters', {}), ensure_ascii=False)}")
    parts.append("IMPORTANT: call a tool in the tool-call format, with arguments that are a JSON object matching "
                 "its parameters.")
    return "\n\n".join(parts)


def new_call_id() -> str:
    """A tool call's id, OpenAI style: call_ and 24 random characters."""
    return "call_" + secrets.token_hex(12)


# --------------------------------------------------------------------------------------------- parsing
def _starts(buf: str, lit: str) -> str:
    """Does `buf` start with `lit`: "yes", "no", or "maybe" (too short to tell yet)."""
    if buf.startswith(lit):
        return "yes"
    return "maybe" if lit.startswith(buf) else "no"


_QWEN_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# V4's tag attributes, up to the first '">' (after <｜DSML｜invoke, after <｜DSML｜parameter)
_V4_INVOKE_TAG = re.compile(r'\s*name="([^"]*)">')
_V4_PARAM_TAG = re.compile(r'\s*name="([^"]*)(?:"\s+string="(true|false))?">')
_V4_TAG_STARTS = (f"</{DSML}", f"<{DSML}", DSML)   # a V4 value ends where one of these begins


def _escaped(text: str) -> str:
    """A string's characters as they are inside a JSON string (escaping is per character: pieces may be escaped
    one by one)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _json_value(text: str) -> str:
    """A V4 string="false" value as JSON text: as the model wrote it when it is JSON, else the text as a JSON string
    (so that the arguments stay one JSON object whatever the model wrote)."""
    def refuse(name):
        raise ValueError(name)
    try:
        json.loads(text, parse_constant=refuse)          # (NaN and Infinity are no JSON)
    except ValueError:
        return json.dumps(text, ensure_ascii=False)
    return text.strip()


@dataclass
class ToolCallParser:
    """A model's answer (its content, after the reasoning) -> content and tool calls, fed in pieces.

    feed(text) returns OpenAI delta dicts: {"content": ...} for text outside calls, and {"tool_calls": [...]} for
    a call's start (index, id, type, function.name, arguments "") and then its arguments in pieces. A piece's end
    that could start a marker is held until the next piece decides. `content` / `calls` accumulate the result.
    Whitespace between text and calls is dropped; an answer with no calls comes out exactly as it went in.
    V4's calls are rebuilt into JSON arguments as they stream: "{" at the call's start, '"KEY": ' at each parameter,
    a string's characters escaped as they come, a JSON value once it has ended, "}" at the call's end."""
    fmt: ToolFormat
    content: str = ""
    calls: list[dict] = field(default_factory=list)
    state: str = "text"          # text | block (DeepSeek: inside the calls) | head | args | V4: invoke, param, value
    buf: str = ""
    after_call: bool = False     # the text state follows a call: its leading whitespace goes
    sent: str = ""               # the current call's arguments sent so far
    keys: list[str] = field(default_factory=list)   # V4: the current call's parameters so far
    string: bool | None = None   # V4: the current value is a string (True), JSON (False), or a repeated key (None)

    def feed(self, text: str, final: bool = False) -> list[dict]:
        self.buf += text
        out: list[dict] = []
        while True:
            step = getattr(self, "_" + self.state)(final, out)
            if not step:
                break
        if final:
            self.buf = ""
        return out

    def message(self) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) as the API answers them: content None when there are calls and no text."""
        return (self.content or None) if self.calls else self.content, self.calls

    # the states: each consumes what it can and says whether another step may consume more
    def _text(self, final: bool, out: list[dict]) -> bool:
        if self.after_call:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.after_call = False
        at = self.buf.find(self.fmt.opens)
        if at >= 0:
            self._say(out, self.buf[:at].rstrip())
            self.buf = self.buf[at + len(self.fmt.opens):]
            self.state = "block" if self.fmt.deepseek else "head"
            return True
        if final:
            self._say(out, self.buf.rstrip() if self.calls else self.buf)
            return False
        safe = self.buf[:len(self.buf) - ct.partial_suffix(self.buf, (self.fmt.opens,))].rstrip()
        self._say(out, safe)
        self.buf = self.buf[len(safe):]
        return False

    def _block(self, final: bool, out: list[dict]) -> bool:
        """Between the calls of a DeepSeek block: the next call, or the block's end (anything else is dropped)."""
        begin, end = (V4_INVOKE, V4_CALLS_END) if self.fmt.name == "deepseek-v4" else (CALL_BEGIN, CALLS_END)
        self.buf = self.buf.lstrip()
        for marker, state in ((begin, "head"), (end, "text")):
            if self.buf.startswith(marker):
                self.buf, self.state, self.after_call = self.buf[len(marker):], state, state == "text"
                return True
        found = [i for i in (self.buf.find(begin), self.buf.find(end)) if i >= 0]
        if found:
            self.buf = self.buf[min(found):]
            return True
        return False

    def _head(self, final: bool, out: list[dict]) -> bool:
        """A call's name, up to where its arguments begin."""
        head = {"deepseek-v3": self._head_v3, "deepseek-v3.1": self._head_v31, "qwen": self._head_qwen,
                "deepseek-v4": self._head_v4}[self.fmt.name]
        return head(final, out)

    def _head_v3(self, final: bool, out: list[dict]) -> bool:
        sep, end = self.buf.find(TOOL_SEP), self.buf.find(CALL_END)
        if sep < 0 or (0 <= end < sep):
            return self._broken(end, final)
        newline = self.buf.find("\n", sep)
        if newline < 0 or (0 <= end < newline):
            if end < 0 and not final:
                return False
            newline = end if end >= 0 else len(self.buf)   # a call with no arguments
            return self._start(out, self.buf[sep + len(TOOL_SEP):newline], newline)
        fence = _starts(self.buf[newline + 1:], FENCE)
        if fence == "maybe" and not final:
            return False
        return self._start(out, self.buf[sep + len(TOOL_SEP):newline], newline + 1 + (len(FENCE) if fence == "yes"
                                                                                      else 0))

    def _head_v31(self, final: bool, out: list[dict]) -> bool:
        sep, end = self.buf.find(TOOL_SEP), self.buf.find(CALL_END)
        if sep < 0 or (0 <= end < sep):
            return self._broken(end, final)
        return self._start(out, self.buf[:sep], sep + len(TOOL_SEP))

    def _head_qwen(self, final: bool, out: list[dict]) -> bool:
        m = _QWEN_HEAD.match(self.buf)
        if m:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                name = m.group(1)
            return self._start(out, name, m.end())
        end = self.buf.find(QWEN_CALL_END)
        if end < 0 and not final:
            return False
        body = self.buf if end < 0 else self.buf[:end]
        self.buf = "" if end < 0 else self.buf[end + len(QWEN_CALL_END):]
        self.state, self.after_call = "text", True
        try:                                   # not in the usual key order: read the whole object
            call = json.loads(body)
            name, args = call["name"], call.get("arguments", {})
            assert isinstance(name, str)
        except (ValueError, KeyError, TypeError, AssertionError):   # not a call: the text was the model's
            self._say(out, QWEN_CALL_BEGIN + body + ("" if end < 0 else QWEN_CALL_END))
            return True
        self._start(out, name, 0)
        self.state = "text"
        self._args_piece(out, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
        return True

    def _head_v4(self, final: bool, out: list[dict]) -> bool:
        """After <｜DSML｜invoke: ` name="NAME">` (a malformed tag drops the call: the block skips to the next)."""
        tag = self._tag(_V4_INVOKE_TAG, final)
        if tag is None:
            return False
        if not tag:
            self.state = "block"
            return True
        self._start(out, tag.group(1), tag.end(), state="invoke")
        self.keys = []
        self._args_piece(out, "{")
        return True

    def _tag(self, pattern: re.Pattern, final: bool) -> re.Match | None | bool:
        """A V4 tag's attributes, read once its first '">' has come: the match, False when they are malformed (or a
        DSML tag comes first), None while they may still be coming. (Deciding at the first '">' makes the
        answer the same however the text is cut: a match of `pattern` ends there.)"""
        close, other = self.buf.find('">'), self.buf.find(DSML)
        if close >= 0 and (other < 0 or close < other):
            return pattern.fullmatch(self.buf, 0, close + 2) or False
        return False if other >= 0 or final else None

    def _invoke(self, final: bool, out: list[dict]) -> bool:
        """Inside a V4 call, between its parameters: the next parameter, or the call's end (a call the model left
        open ends at the next call or at the block's end). Anything else (a parameter's end tag) is dropped."""
        self.buf = self.buf.lstrip()
        if self.buf.startswith(V4_PARAM):
            self.buf, self.state = self.buf[len(V4_PARAM):], "param"
            return True
        for marker in (V4_INVOKE_END, V4_INVOKE, V4_CALLS_END):
            if self.buf.startswith(marker):
                self._args_piece(out, "}")
                self.buf, self.state = self.buf.removeprefix(V4_INVOKE_END), "block"
                return True
        found = [i for i in map(self.buf.find, (V4_PARAM, V4_INVOKE_END, V4_INVOKE, V4_CALLS_END)) if i >= 0]
        if found:
            self.buf = self.buf[min(found):]
            return True
        return False

    def _param(self, final: bool, out: list[dict]) -> bool:
        """After <｜DSML｜parameter: ` name="KEY" string="true|false">`, which opens the key in the arguments (a
        malformed tag drops the parameter; a key said twice keeps its first value: the arguments name each key once)."""
        tag = self._tag(_V4_PARAM_TAG, final)
        if tag is None:
            return False
        self.state = "invoke"
        if not tag:
            return True
        key, self.string = tag.group(1), tag.group(2) == "true"   # (no string attribute: JSON if it parses)
        self.buf, self.state = self.buf[tag.end():], "value"
        if key in self.keys:
            self.string = None
            return True
        self._args_piece(out, (", " if self.keys else "") + json.dumps(key, ensure_ascii=False) + ": " +
                         ('"' if self.string else ""))
        self.keys.append(key)
        return True

    def _value(self, final: bool, out: list[dict]) -> bool:
        """A V4 parameter's value, up to the next DSML tag (its </｜DSML｜parameter>, or another one where the model
        left it open). A string streams as it comes, escaped; a JSON value is held to its end (`_json_value`)."""
        at = self.buf.find(DSML)
        if at >= 0:   # the tag starts at its "<" or "</"
            end = at - next(len(s) for s in ("</", "<", "") if self.buf.endswith(s, 0, at))
        else:
            end = len(self.buf) - ct.partial_suffix(self.buf, _V4_TAG_STARTS)
            if not final:
                if self.string:
                    self._args_piece(out, _escaped(self.buf[:end]))
                    self.buf = self.buf[end:]
                return False
        value, self.buf, self.state = self.buf[:end], self.buf[end:], "invoke"
        if self.string:
            self._args_piece(out, _escaped(value) + ('"' if at >= 0 else ""))
        elif self.string is False:
            self._args_piece(out, _json_value(value) if at >= 0 else value)
        return True

    def _broken(self, end: int, final: bool) -> bool:
        """A call with no separator before its end: dropped."""
        if end < 0:
            if final:
                self.buf = ""
            return False
        self.buf, self.state = self.buf[end + len(CALL_END):], "block"
        return True

    def _start(self, out: list[dict], name: str, consumed: int, state: str = "args") -> bool:
        call = {"id": new_call_id(), "type": "function", "function": {"name": name.strip(), "arguments": ""}}
        self.calls.append(call)
        out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}]})
        self.buf, self.state, self.sent = self.buf[consumed:], state, ""
        return True

    def _args(self, final: bool, out: list[dict]) -> bool:
        """A call's arguments, streamed as they come, up to the call's end marker."""
        end_marker = QWEN_CALL_END if self.fmt.name == "qwen" else CALL_END
        end = self.buf.find(end_marker)
        if end >= 0 or final:
            body = self.buf[:end] if end >= 0 else self.buf[:len(self.buf) - ct.partial_suffix(self.buf, (end_marker,))]
            self._args_piece(out, self._final_args(body, closed=end >= 0)[len(self.sent):])
            self.buf = self.buf[end + len(end_marker):] if end >= 0 else ""
            self.state = "text" if self.fmt.name == "qwen" else "block"
            self.after_call = self.state == "text"
            return True
        enders = (end_marker, "\n```" + CALL_END) if self.fmt.name == "deepseek-v3" else (end_marker,)
        safe = self.buf[:len(self.buf) - ct.partial_suffix(self.buf, enders)]
        if self.fmt.name == "qwen":            # the object's own closing brace (and what follows it) waits
            brace = safe.rfind("}")
            safe = (safe[:brace] if brace >= 0 else safe).rstrip()
        self._args_piece(out, safe[len(self.sent):])
        return False

    def _final_args(self, body: str, closed: bool) -> str:
        if self.fmt.name == "deepseek-v3":
            return body.removesuffix("\n```") if closed else body
        if self.fmt.name == "qwen":
            brace = body.rfind("}") if closed else -1
            return (body[:brace] if brace >= 0 else body).rstrip()
        return body

    def _args_piece(self, out: list[dict], piece: str) -> None:
        if not piece:
            return
        self.sent += piece
        call = self.calls[-1]
        call["function"]["arguments"] += piece
        out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})

    def _say(self, out: list[dict], text: str) -> None:
        if text:
            self.content += text
            out.append({"content": text})


@dataclass
class PlainAnswer:
    """An answer read without tool calls (tool_choice "none", or no tools offered) from a model whose template has
    a tool format: the text as it is, less any tool-call markers the model wrote anyway (they are not text; this
    is what the answer was before the markers were kept in generated text). ToolCallParser's interface."""
    content: str = ""
    calls: list[dict] = field(default_factory=list)     # (always empty)
    buf: str = ""
    markers: tuple[str, ...] = TOOL_MARKERS

    @classmethod
    def of(cls, fmt: ToolFormat) -> PlainAnswer:
        """The reader for a model of format `fmt`. V4's vocabulary has DeepSeek's tool tokens and DSML but no
        <tool_call> tags: there they are text, and stay."""
        if fmt.name == "deepseek-v4":
            return cls(markers=tuple(m for m in TOOL_MARKERS if m not in (QWEN_CALL_BEGIN, QWEN_CALL_END)))
        return cls()

    def feed(self, text: str, final: bool = False) -> list[dict]:
        buf = self.buf + text
        for m in self.markers:
            buf = buf.replace(m, "")
        keep = 0 if final else ct.partial_suffix(buf, self.markers)
        piece, self.buf = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.content += piece
        return [{"content": piece}] if piece else []

    def message(self) -> tuple[str, list[dict]]:
        return self.content, []


def parse(fmt: ToolFormat, text: str) -> tuple[str | None, list[dict]]:
    """A finished answer -> (content, tool_calls): the streaming parser fed the whole text at once."""
    p = ToolCallParser(fmt)
    p.feed(text, final=True)
    return p.message()


# --------------------------------------------------------------------------------------------- forcing a call
_DSML_PIECES = re.compile(f"(</?(?={DSML})|{DSML})")   # V4 markup -> text, "<" or "</", the token, text...

# JSON as the templates write it (json.dumps' separators), and no free whitespace: a weak model given room for
# whitespace can spend its whole max_tokens on it.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def forced_call_grammar(fmt: ToolFormat, tools: list[dict], token_id, name: str | None = None,
                        parallel: bool = True) -> str:
    """A Lark grammar (llguidance's syntax, for nanoseek.infer.grammar.Grammar.lark) whose every sentence is a
    tool-call answer in `fmt`: one call (or several, with `parallel`) of `name` or of any of `tools`, each call's
    arguments valid under its function's `parameters` schema (%json). Markers that are one token of the vocabulary
    (`token_id(text)` -> id or None) are written as token literals <[id]>, so the model writes that token, not its
    spelling; others are plain strings. V4's tags are strings around its DSML token, their "<" and "</" strings of
    their own: llguidance's lexer ends a string at a token literal only where the string is whole, so "\\n<" (a
    beginning of "\\n</") could not be followed by the token, while "<" (a string itself) can."""
    def lit(text: str) -> str:
        tid = token_id(text)
        if tid is not None:
            return f"<[{tid}]>"
        if DSML not in text or text == DSML:
            return _lark_str(text)
        return " ".join(lit(p) for p in _DSML_PIECES.split(text) if p)

    funcs = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules = []
    for i, f in enumerate(funcs):
        schema = {**(f.get("parameters") or {"type": "object"}), "x-guidance": JSON_STYLE}
        args = "%json " + json.dumps(schema, ensure_ascii=False)
        n = f["name"]
        if fmt.name == "deepseek-v3":
            body = f'{lit(CALL_BEGIN)} "function" {lit(TOOL_SEP)} {_lark_str(n + chr(10) + FENCE)} {args} ' \
                   f'"\\n```" {lit(CALL_END)}'
        elif fmt.name == "deepseek-v3.1":
            body = f"{lit(CALL_BEGIN)} {_lark_str(n)} {lit(TOOL_SEP)} {args} {lit(CALL_END)}"
        elif fmt.name == "deepseek-v4":
            body = _dsml_call(f, lit)
        else:
            head = '\n{"name": ' + json.dumps(n, ensure_ascii=False) + ', "arguments": '
            body = f'{lit(QWEN_CALL_BEGIN)} {_lark_str(head)} {args} "}}\\n" {lit(QWEN_CALL_END)}'
        rules.append(f"call_{i}: {body}")
    calls = ("call+" if fmt.name == "deepseek-v3.1" else 'call ("\\n" call)*') if parallel else "call"
    if fmt.name == "deepseek-v4":   # (after </think> and the content: "\n\n" and the block, as the encoder writes)
        start = f"{lit(chr(10) * 2 + V4_CALLS + chr(10))} {calls} {lit(chr(10) + V4_CALLS_END)}"
    else:
        start = f"{lit(CALLS_BEGIN)} {calls} {lit(CALLS_END)}" if fmt.deepseek else calls
    alternatives = " | ".join(f"call_{i}" for i in range(len(funcs)))
    return "\n".join([f"start: {start}", f"call: {alternatives}", *rules]) + "\n"


# Keywords of a parameters schema that constrain the object as a whole (or its declared properties by pattern): V4
# writes one parameter at a time, so a forced V4 call cannot be held to them.
_WHOLE_OBJECT = ("minProperties", "maxProperties", "dependentRequired", "dependentSchemas", "dependencies", "if",
                 "allOf", "anyOf", "oneOf", "not", "patternProperties", "propertyNames", "$ref", "enum", "const")
_ANNOTATIONS = {"description", "title", "examples", "default", "$comment", "deprecated", "readOnly", "writeOnly"}


def _dsml_call(f: dict, lit) -> str:
    """A Lark rule body for one V4 call of function `f`: its parameters' declared properties in the schema's order,
    the required ones always and the others optionally; a plain string (or enum of strings) written as is
    (string="true", `_raw_string`), any other value as JSON under the property's schema (string="false", %json).
    Every sentence decodes (DeepSeek's decoder, our parser) to arguments valid under the schema; the model writes
    no property the schema does not declare."""
    schema = f.get("parameters") or {"type": "object"}
    props, required = schema.get("properties") or {}, schema.get("required") or []
    bad = [k for k in _WHOLE_OBJECT if k in schema] + [k for k in required if props.get(k, False) is False]
    if bad or schema.get("type", "object") not in ("object", ["object"]):
        raise UsageError(f"function {f['name']!r}: DeepSeek-V4 writes a call's arguments one parameter at a time, so "
                         "a forced call can follow a parameters schema made of an object's properties (with "
                         f"required and additionalProperties), not {bad or schema.get('type')!r}; simplify the schema "
                         "or use tool_choice auto")
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}   # (for $refs inside the properties)
    params = []
    for key, sub in props.items():
        if sub is False:                  # (a property the schema forbids)
            continue
        sub = sub if isinstance(sub, dict) else {}
        raw = _raw_string(sub)
        value = raw or "%json " + json.dumps({**sub, **defs, "x-guidance": JSON_STYLE}, ensure_ascii=False)
        tag = f'{V4_PARAM} name="{key}" string="{"true" if raw else "false"}">'
        params.append((f"{lit(tag)} {value} {lit(V4_PARAM_END + chr(10))}", key in required))
    head, end = lit(f'{V4_INVOKE} name="{f["name"]}">\n'), lit(V4_INVOKE_END)
    if any(req for _, req in params):
        return f"{head} {' '.join(p if req else f'({p})?' for p, req in params)} {end}"
    # all optional: no parameter ("\n" as the encoder writes an empty list), or the first one written and the rest
    # optional
    firsts = [" ".join([p] + [f"({q})?" for q, _ in params[i + 1:]]) for i, (p, _) in enumerate(params)]
    return f"{head} ({' | '.join([lit(chr(10)), *firsts])}) {end}"


def _raw_string(schema: dict) -> str | None:
    """A Lark expression for a string property written as is (V4's string="true"), or None (written as JSON): a
    string bounded at most by its length (any text without "<" and "｜", which would start a DSML tag), or an enum
    or const of non-empty strings. A pattern or format goes to JSON, where llguidance enforces them."""
    keys = set(schema) - _ANNOTATIONS
    if "enum" in schema or "const" in schema:
        options = schema["enum"] if "enum" in schema else [schema["const"]]
        plain = keys <= {"enum", "const", "type"} and schema.get("type", "string") == "string"
        if plain and options and all(isinstance(o, str) and o and DSML not in o for o in options):
            return "(" + " | ".join(_lark_str(o) for o in options) + ")"
        return None
    if keys - {"type", "minLength", "maxLength"} or schema.get("type") != "string":
        return None
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    return f"/[^<｜]{{{low},{'' if high is None else high}}}/"
