"""DeepSeek-R1's chat format as a transformers chat template, and the renderer that applies a template exactly as
transformers does (sandboxed jinja2, the same variables and helpers).

It lives apart from the Tokenizer because text is rendered before any tokenizer exists: the pretraining corpus and
the tokenizer's own training data hold chats (`{"messages": [...]}` rows, the tasks' worked solutions), and a
tokenizer is trained on their rendered text. `nanoseek.tokenizer` uses it for `apply_chat_template`.

The helpers at the end (`strings_in`, `mark_strings`, `unused_chars`) let the tokenizer tell, in a rendered chat,
the control tokens the template wrote from the control-token strings a user typed (see Tokenizer.encode_chat).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice

from .encoding_v4 import DSML
from .errors import UsageError

# The template's default special tokens (DeepSeek-V3's own strings; a trained Tokenizer gives them ids 0 and 1).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

# Tool-call markers, written by a model in its answer (DeepSeek's added tokens; the tags of Qwen2/Qwen3 templates;
# DeepSeek-V4's one DSML token, which its tags are spelled around: <｜DSML｜invoke name="...">, see encoding_v4).
# The tokenizer keeps them in generated text (they are not control_ids) so that serve/tools.py can read the calls.
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
QWEN_CALL_BEGIN, QWEN_CALL_END = "<tool_call>", "</tool_call>"
TOOL_MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP, QWEN_CALL_BEGIN, QWEN_CALL_END, DSML)

# DeepSeek-R1's chat format, written as a transformers chat template. Variables (the same names transformers
# passes): messages, add_generation_prompt, bos_token, eos_token; plus `thinking` (default on), the "deep think"
# switch: off, the prompt ends with an empty think block so the model answers directly.
# An assistant turn is always `<think>\n{reasoning}\n</think>\n\n{content}<eos>`, so the generation prompt (with
# thinking on) is a prefix of the rendered conversation: SFT can mask the prompt by its length.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages if message['role'] == 'system' -%}{{ message['content'] }}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set reasoning = message.get('reasoning_content') or '' -%}"
    "{{ '<｜Assistant｜><think>\\n' + reasoning + '\\n</think>\\n\\n' + (message['content'] or '') + eos_token }}"
    "{%- elif message['role'] != 'system' -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if thinking is not defined or thinking -%}{{ '<｜Assistant｜><think>\\n' }}"
    "{%- else -%}{{ '<｜Assistant｜><think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# The names transformers uses for a message's reasoning; the first is what templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _jinja_env():
    """A jinja2 environment configured like transformers' (sandboxed, trim/lstrip blocks, same helpers)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


_TEMPLATES: dict[str, object] = {}


def render_chat(messages: list[dict], template: str = CHAT_TEMPLATE, add_generation_prompt: bool = True,
                **variables) -> str:
    """Render a chat template as transformers does (no tokenizer needed: the corpus generator uses this too)."""
    import jinja2
    compiled = _TEMPLATES.get(template)
    if compiled is None:
        compiled = _TEMPLATES[template] = _jinja_env().from_string(template)
    chat = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise UsageError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}   # (a template handles a missing key, not always a None)
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        # reasoning under each name templates read: reasoning_content, and thinking (gpt-oss), as transformers does
        chat.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None else m)
    variables.setdefault("bos_token", BOS)
    variables.setdefault("eos_token", EOS)
    variables.setdefault("tools", None)          # (OpenAI-style tool dicts when given, as transformers passes them)
    try:
        return compiled.render(messages=chat, documents=None, add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"chat template failed: {e}") from e


# ---------------------------------------------------------------- user strings inside a rendered chat
def strings_in(value) -> Iterator[str]:
    """Every string inside `value` (messages, or any JSON-like value): the text a user may have written."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings_in(v)


def mark_strings(value, spots: Callable[[str], list[tuple[int, int]]], open_: str, close: str):
    """`value` with the spots of each of its strings wrapped as open_ + spot + close (dict keys are left alone).
    spots(s) gives (start, end) pairs, sorted and apart. A template passes the markers through with the text they
    sit in, or drops them with it, so that in the rendered chat they still say which characters a user wrote."""
    if isinstance(value, str):
        out, at = [], 0
        for start, end in spots(value):
            out += [value[at:start], open_, value[start:end], close]
            at = end
        return "".join(out) + value[at:] if out else value
    if isinstance(value, dict):
        return {k: mark_strings(v, spots, open_, close) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mark_strings(v, spots, open_, close) for v in value)
    return value


def unused_chars(texts: Iterable[str], n: int) -> list[str]:
    """Up to n characters found in none of `texts`: private-use ones first (U+E000..., planes 15 and 16)."""
    used = set().union(*map(set, texts))
    candidates = chain(range(0xE000, 0xF900), range(0xF0000, 0x110000), range(0x80, 0xD800), range(0x10000, 0xF0000))
    return list(islice((c for c in map(chr, candidates) if c not in used), n))


def partial_suffix(text: str, words) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `words`: text a stream holds back
    until the next piece shows whether a tag or marker starts there (the engine's think tags, the tool parser's)."""
    best = 0
    for w in words:
        for n in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:n]):
                best = n
                break
    return best
