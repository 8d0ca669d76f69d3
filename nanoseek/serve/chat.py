"""`nanoseek chat --model DIR`: chat with a model in the terminal.

The answer streams as it is generated; the model's thinking (the text inside <think>...</think>) is shown dimmed
above it. Commands: /reset (new conversation), /think on|off (the deep-think switch), /exit. Ctrl-C while the model
writes stops that answer (the request is aborted in the engine, its cache blocks freed); Ctrl-C or Ctrl-D at the
prompt leaves. The engine is driven directly (add_request / step / abort): no server, no threads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"
HELP = "commands: /reset (new chat), /think on|off (deep think), /exit. Ctrl-C stops an answer."


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, as DeepSeek-R1 advises)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=1024, help="longest answer, in tokens")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--no-thinking", action="store_true", help="start with deep think off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


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
            line = read(f"{bold}you>{reset} " if color else "you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            out.write("(new conversation)\n")
            continue
        if text.startswith("/think"):
            arg = text.split()[1:] or ["on" if not thinking else "off"]
            thinking = arg[0].lower() in ("on", "1", "true", "yes")
            out.write(f"(deep think {'on' if thinking else 'off'})\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": text}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, thinking=thinking)
        limit = getattr(engine, "max_seq_len", None)
        if limit and len(prompt) >= limit:
            out.write(f"(the conversation has {len(prompt)} tokens, the context is {limit}: /reset to start over)\n")
            continue
        state = {"mode": None, "newlines": ""}

        def write(kind: str, s: str, state=state) -> None:
            if kind != state["mode"]:
                if kind == "reasoning":
                    out.write(f"{dim}thinking: ")
                else:
                    out.write(f"{reset}\n" if state["mode"] == "reasoning" else "")
                state["mode"] = kind
            if kind == "reasoning":  # hold back trailing newlines: the thinking ends in one before </think>
                s = state["newlines"] + s
                kept = s.rstrip("\n")
                state["newlines"], s = s[len(kept):], kept
            out.write(s)
            out.flush()

        out.write("model> " if not color else f"{bold}model>{reset} ")
        reasoning, content, reason = answer(engine, prompt, params, write)
        out.write(f"{reset}" if state["mode"] == "reasoning" else "")
        if reason == "interrupted":
            out.write(" [stopped]")
        elif reason == "length":
            out.write(" [max tokens reached]")
        out.write("\n")
        out.flush()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": content}]


def main(args) -> int:
    from ..errors import UsageError
    from ..infer.engine import SamplingParams
    from .api import load_engine
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if not 0 <= args.temperature <= 2:
        raise UsageError(f"--temperature must be in [0, 2] (got {args.temperature})")
    engine, tok = load_engine(args.model, max_batch=1, dtype=args.dtype, device=args.device)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return chat_loop(engine, tok, params, thinking=not args.no_thinking, system=args.system)
