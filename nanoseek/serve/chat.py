"""`nanoseek chat --model DIR`: chat with a model in the terminal.

The answer streams as it is generated; the model's thinking (the text inside <think>...</think>) is shown dimmed
above it. Commands: /reset (new conversation), /think on|off (the deep-think switch), /exit. Ctrl-C while the model
writes stops that answer (the request is aborted in the engine, its cache blocks freed); Ctrl-C or Ctrl-D at the
prompt leaves. The engine is driven directly (add_request / step / abort): no server, no threads.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

from .protocol import StripStrings

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"
HELP = "commands: /reset (new chat), /think on|off (deep think), /exit. Ctrl-C stops an answer."
# C0 and C1 control characters (and DEL), but for tab and newline: model output must not move the cursor, clear
# the screen or retitle the window, so each is shown as U+FFFD.
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# The demo model (trained on the R1-Zero format) answers `<think>...</think> <answer>X</answer>`: the answer shown
# is X. The tags are dropped for display only; the conversation sent back to the model keeps its own text.
ANSWER_TAGS = ("<answer>", "</answer>")


@dataclass
class ChatConfig:
    """`nanoseek chat`: a terminal conversation with a model folder."""
    model: str = ""                      # model folder (config.json, *.safetensors, tokenizer.json)
    temperature: float = 0.6             # 0 = greedy (0.6 is what DeepSeek-R1 advises)
    top_p: float = 0.95                  # nucleus sampling: keep the most likely tokens up to this probability mass
    max_tokens: int = 1024               # longest answer, in tokens
    system: str | None = None            # a system prompt
    thinking: bool = True                # start with deep think on (--no-thinking: off)
    seed: int | None = None              # sampling seed (default: random)
    dtype: str | None = None             # float32 | bfloat16 | float16 (default: the checkpoint's)
    device: str | None = None            # cpu | cuda (default: cuda if available)
    threads: int = 0                     # torch CPU threads (0: one for small models, all cores for large)
    REQUIRED: ClassVar[tuple] = ("model",)
    ALIASES: ClassVar[dict] = {}


CONFIG = ChatConfig


def printable(text: str) -> str:
    """`text` safe to write to a terminal: control characters but tab and newline replaced by U+FFFD."""
    return CONTROLS.sub("\ufffd", text)


def answer(engine, prompt: list[int], params, write) -> tuple[str, str, str]:
    """Generate one answer, calling write(kind, text) with kind "reasoning" or "content" as text arrives.
    Returns (reasoning, content, finish_reason). Ctrl-C (SIGINT) stops it between two engine steps (never inside
    one, so the engine's state stays whole): the request is aborted, its blocks freed, the reason is "interrupted"."""
    interrupted = threading.Event()
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    rid = engine.add_request(prompt, params)
    reasoning, content, reason = [], [], None
    try:
        while reason is None and engine.has_unfinished():
            if interrupted.is_set():
                engine.abort(rid)
                while engine.has_unfinished():   # let the engine emit the aborted request's final delta
                    engine.step()
                reason = "interrupted"
                break
            for d in engine.step():
                if d.request_id != rid:
                    continue
                if d.reasoning_text:
                    reasoning.append(d.reasoning_text)
                    write("reasoning", d.reasoning_text)
                if d.text:
                    content.append(d.text)
                    write("content", d.text)
                if d.finished:
                    reason = d.finish_reason
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    return "".join(reasoning), "".join(content), reason or "abort"


class AnswerView:
    """Writes one answer to the terminal as it streams: the thinking dimmed after "thinking: ", then the answer on
    its own line (its <answer> tags dropped, leading blanks skipped), all of it made safe by `printable`."""

    def __init__(self, out, dim: str = "", reset: str = ""):
        self.out, self.dim, self.reset = out, dim, reset
        self.mode = None          # "reasoning" | "content": what was written last
        self.newlines = ""        # trailing newlines of the thinking, held back (one comes before </think>)
        self.tags = StripStrings(ANSWER_TAGS)
        self.started = False      # the answer has shown a character

    def write(self, kind: str, s: str) -> None:
        if kind != self.mode:
            if kind == "reasoning":
                self.out.write(f"{self.dim}thinking: ")
            elif self.mode == "reasoning":
                self.out.write(f"{self.reset}\n")
            self.mode = kind
        if kind == "reasoning":
            s = self.newlines + s
            kept = s.rstrip("\n")
            self.newlines, s = s[len(kept):], kept
        else:
            s = self._answer(self.tags.feed(s))
        self.out.write(printable(s))
        self.out.flush()

    def _answer(self, s: str) -> str:
        if not self.started:
            s = s.lstrip()
            self.started = bool(s)
        return s

    def close(self) -> None:
        """The answer ended: write what the tag filter still held, and end the dimming."""
        if self.mode == "content":
            self.out.write(printable(self._answer(self.tags.feed("", final=True))))
        elif self.mode == "reasoning":
            self.out.write(self.reset)


def chat_loop(engine, tokenizer, params, read=input, out=sys.stdout, thinking: bool = True,
              system: str | None = None, color: bool | None = None) -> int:
    """The read-eval-print loop (read() returns a line, raises EOFError at the end). Returns the exit code."""
    if color is None:
        color = out.isatty() and not os.environ.get("NO_COLOR")
    dim, bold, reset = (DIM, BOLD, RESET) if color else ("", "", "")
    history: list[dict] = []
    out.write(f"{HELP}\n")
    out.flush()
    while True:
        try:
            text = read(f"{bold}you>{reset} ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text.startswith("/") or not text:
            history, thinking = command(text, history, thinking, out)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": text}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, thinking=thinking)
        if len(prompt) >= engine.max_seq_len:
            out.write(f"(the conversation has {len(prompt)} tokens, the context is {engine.max_seq_len}: "
                      "/reset to start over)\n")
            continue
        out.write(f"{bold}model>{reset} ")
        view = AnswerView(out, dim, reset)
        _, content, reason = answer(engine, prompt, params, view.write)
        view.close()
        out.write({"interrupted": " [stopped]", "length": " [max tokens reached]"}.get(reason, "") + "\n")
        out.flush()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": content}]


def command(text: str, history: list[dict], thinking: bool, out) -> tuple[list[dict], bool]:
    """A /command (or an empty line): returns the new (history, thinking)."""
    if text == "/reset":
        out.write("(new conversation)\n")
        return [], thinking
    if text.startswith("/think"):
        arg = text.split()[1:] or ["on" if not thinking else "off"]
        thinking = arg[0].lower() in ("on", "1", "true", "yes")
        out.write(f"(deep think {'on' if thinking else 'off'})\n")
    elif text:
        out.write(f"unknown command {text.split()[0]}; {HELP}\n")
    return history, thinking


def main(cfg: ChatConfig) -> int:
    from ..errors import UsageError
    from ..infer.engine import SamplingParams
    from ..options import set_threads
    from .app import load_engine
    if cfg.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1 (got {cfg.max_tokens})")
    if not 0 <= cfg.temperature <= 2:
        raise UsageError(f"--temperature must be in [0, 2] (got {cfg.temperature})")
    engine, tok = load_engine(cfg.model, max_batch=1, dtype=cfg.dtype, device=cfg.device, purpose="chat")
    set_threads(cfg.threads, sum(p.numel() for p in engine.model.parameters()))
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return chat_loop(engine, tok, params, thinking=cfg.thinking, system=cfg.system)
