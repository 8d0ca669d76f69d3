"""Tool calls in each model family's own words: which format a chat template uses, the parser that turns a model's
answer back into OpenAI `tool_calls` (whole, or streamed as deltas), and the grammar that forces a call.

The formats, as the published chat templates write a past assistant turn (and so as the models were trained):

    DeepSeek V3 / R1   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
                       [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]<｜tool▁calls▁end｜>
    DeepSeek V3.1      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    Qwen2 / Qwen3      <tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>   (one block per call)

The family is read from the chat template's text (`detect`). The markers are single added tokens in these
vocabularies; the tokenizer keeps them in generated text (they are not `control_ids`), so the parser reads text.

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

CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP = ct.CALLS_BEGIN, ct.CALLS_END, ct.CALL_BEGIN, ct.CALL_END, ct.TOOL_SEP
QWEN_CALL_BEGIN, QWEN_CALL_END, TOOL_MARKERS = ct.QWEN_CALL_BEGIN, ct.QWEN_CALL_END, ct.TOOL_MARKERS

FENCE = "```json\n"   # V3/R1 write the arguments as a JSON code block


@dataclass(frozen=True)
class ToolFormat:
    """How one template family writes tool calls."""
    name: str                 # "deepseek-v3" (V3 and R1), "deepseek-v3.1", "qwen" (Qwen2.5, Qwen3 and their kin)
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
        return f'{QWEN_CALL_BEGIN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n' \
               f"{QWEN_CALL_END}"

    def answer_text(self, calls: list[tuple[str, str]], content: str = "") -> str:
        """A whole answer with these (name, arguments) calls, as the template writes a past one (tests use it)."""
        if self.name == "deepseek-v3":
            return content + CALLS_BEGIN + "\n".join(self.call_text(n, a) for n, a in calls) + CALLS_END
        if self.name == "deepseek-v3.1":
            return content + CALLS_BEGIN + "".join(self.call_text(n, a) for n, a in calls) + CALLS_END
        return (content + "\n" if content else "") + "\n".join(self.call_text(n, a) for n, a in calls)


DEEPSEEK_V3 = ToolFormat("deepseek-v3", CALLS_BEGIN, args_as_dict=False)
DEEPSEEK_V31 = ToolFormat("deepseek-v3.1", CALLS_BEGIN, args_as_dict=False)
QWEN = ToolFormat("qwen", QWEN_CALL_BEGIN, args_as_dict=True)


def detect(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template writes past calls in; None when it writes none (it cannot take tools).
    V3/R1 put the arguments in a ```json block, V3.1 right after the separator; Qwen templates use <tool_call>."""
    if not template:
        return None
    if CALL_BEGIN in template and TOOL_SEP in template:
        return DEEPSEEK_V3 if "```json" in template else DEEPSEEK_V31
    if QWEN_CALL_BEGIN in template:
        return QWEN
    return None


def shows_tools(template: str | None) -> bool:
    """Does the template read the `tools` variable (write the tool list into the prompt itself)? DeepSeek's V3, R1
    and V3.1 templates do not: their model cards put the list in the system prompt (see `tools_system_prompt`)."""
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


@dataclass
class ToolCallParser:
    """A model's answer (its content, after the reasoning) -> content and tool calls, fed in pieces.

    feed(text) returns OpenAI delta dicts: {"content": ...} for text outside calls, and {"tool_calls": [...]} for
    a call's start (index, id, type, function.name, arguments "") and then its arguments in pieces. A piece's end
    that could start a marker is held until the next piece decides. `content` / `calls` accumulate the result.
    Whitespace between text and calls is dropped; an answer with no calls comes out exactly as it went in."""
    fmt: ToolFormat
    content: str = ""
    calls: list[dict] = field(default_factory=list)
    state: str = "text"          # text | block (V3 family: inside the calls) | head | args
    buf: str = ""
    after_call: bool = False     # the text state follows a call: its leading whitespace goes
    sent: str = ""               # the current call's arguments sent so far

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
        self.buf = self.buf.lstrip()
        for marker, state in ((CALL_BEGIN, "head"), (CALLS_END, "text")):
            if self.buf.startswith(marker):
                self.buf, self.state, self.after_call = self.buf[len(marker):], state, state == "text"
                return True
        found = [i for i in (self.buf.find(CALL_BEGIN), self.buf.find(CALLS_END)) if i >= 0]
        if found:
            self.buf = self.buf[min(found):]
            return True
        return False

    def _head(self, final: bool, out: list[dict]) -> bool:
        """A call's name, up to where its arguments begin."""
        head = {"deepseek-v3": self._head_v3, "deepseek-v3.1": self._head_v31, "qwen": self._head_qwen}[self.fmt.name]
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

    def _broken(self, end: int, final: bool) -> bool:
        """A call with no separator before its end: dropped."""
        if end < 0:
            if final:
                self.buf = ""
            return False
        self.buf, self.state = self.buf[end + len(CALL_END):], "block"
        return True

    def _start(self, out: list[dict], name: str, consumed: int) -> bool:
        call = {"id": new_call_id(), "type": "function", "function": {"name": name.strip(), "arguments": ""}}
        self.calls.append(call)
        out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}]})
        self.buf, self.state, self.sent = self.buf[consumed:], "args", ""
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

    def feed(self, text: str, final: bool = False) -> list[dict]:
        buf = self.buf + text
        for m in TOOL_MARKERS:
            buf = buf.replace(m, "")
        keep = 0 if final else ct.partial_suffix(buf, TOOL_MARKERS)
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
    spelling; others are plain strings."""
    def lit(text: str) -> str:
        tid = token_id(text)
        return f"<[{tid}]>" if tid is not None else _lark_str(text)

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
        else:
            head = '\n{"name": ' + json.dumps(n, ensure_ascii=False) + ', "arguments": '
            body = f'{lit(QWEN_CALL_BEGIN)} {_lark_str(head)} {args} "}}\\n" {lit(QWEN_CALL_END)}'
        rules.append(f"call_{i}: {body}")
    calls = ("call+" if fmt.name == "deepseek-v3.1" else 'call ("\\n" call)*') if parallel else "call"
    start = f"{lit(CALLS_BEGIN)} {calls} {lit(CALLS_END)}" if fmt.deepseek else calls
    alternatives = " | ".join(f"call_{i}" for i in range(len(funcs)))
    return "\n".join([f"start: {start}", f"call: {alternatives}", *rules]) + "\n"
