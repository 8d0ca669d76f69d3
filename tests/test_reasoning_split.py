"""R1-style chat for the distilled students (issue 10, item 4): their templates open `<think>\\n` in the generation
prompt, so a completion starts inside the reasoning with no opening tag, and has no thinking switch at all. The
reasoning must still be split from the answer, the same way streamed and not, with nothing lost: through the engine,
the HTTP server and the terminal chat (the web page shows the server's reasoning_content deltas).

The model is test_server's tiny R1 model (it memorised three conversations in our template, whose prompt for one
user turn is the same text), with an R1-distill-style template (tests/data) swapped onto its tokenizer.
"""

import io
import re
from pathlib import Path

import pytest

import nanoseek as ns
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.serve.api import create_app, load_engine

openai = pytest.importorskip("openai")
from test_server import CONVS, KEY, MODEL, ServerThread, build_chat_model  # noqa: E402

TEMPLATE = (Path(__file__).parent / "data" / "r1_distill_style_chat_template.jinja").read_text(encoding="utf-8")
GREEDY = SamplingParams(temperature=0, max_tokens=60)
# a second turn: the history's answer is rendered without its reasoning (the model never saw this layout, so its
# completion is whatever it is: the split must hold for any text)
FOLLOW_UP = [{"role": "user", "content": "hello"},
             {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "the user greets me"},
             {"role": "user", "content": "what is 2+3?"}]


def unsplit(raw: str, reasoning: str, content: str) -> bool:
    """reasoning + "</think>" + content is the raw completion, but for the newlines the R1 format writes around the
    tags (`<think>\\n...\\n</think>\\n\\n`), which the split drops; no </think>: all of it is reasoning."""
    if "</think>" not in raw:
        return content == "" and reasoning == raw.lstrip("\n")
    return re.sub(r"\n*</think>\n*", "</think>", raw.lstrip("\n"), count=1) == reasoning + "</think>" + content


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def engine(model_dir):
    engine, tok = load_engine(model_dir, max_batch=4, device="cpu")
    tok.chat_template = TEMPLATE
    return engine


def prompt_of(tok, messages, **kw) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)


def test_the_template_opens_the_reasoning_whatever_the_switch(engine):
    tok = engine.tokenizer
    for thinking in (None, True, False):
        text = tok.apply_chat_template([{"role": "user", "content": "hello"}], thinking=thinking)
        assert text.endswith("<｜Assistant｜><think>\n")


@pytest.mark.parametrize("thinking", [None, False])
def test_engine_splits_a_completion_that_starts_inside_the_reasoning(engine, thinking):
    tok = engine.tokenizer
    for q, r, a in CONVS:
        prompt = prompt_of(tok, [{"role": "user", "content": q}], thinking=thinking)
        done = engine.generate(prompt, GREEDY)[0]
        assert "<think>" not in done.text and "</think>" in done.text     # the tag was in the prompt, not generated
        assert (done.reasoning_content, done.content) == (r, a)
        assert unsplit(done.text, done.reasoning_content, done.content)
        deltas = list(engine.stream(prompt, GREEDY))
        assert "".join(d.reasoning_text for d in deltas) == done.reasoning_content
        assert "".join(d.text for d in deltas) == done.content
        assert "".join(d.raw_text for d in deltas) == done.text
        assert sum(1 for d in deltas if d.reasoning_text) > 1 and sum(1 for d in deltas if d.text) > 1


def test_split_holds_for_any_completion_of_a_second_turn(engine):
    prompt = prompt_of(engine.tokenizer, FOLLOW_UP)
    for seed in range(4):   # sampled: other texts, with or without a </think>
        deltas = list(engine.stream(prompt, SamplingParams(temperature=1.5, max_tokens=40, seed=seed)))
        done = deltas[-1].completion
        assert "".join(d.reasoning_text for d in deltas) == done.reasoning_content
        assert "".join(d.text for d in deltas) == done.content
        assert unsplit(done.text, done.reasoning_content, done.content)


def test_the_check_fails_when_the_engine_misses_the_open_think(engine, monkeypatch):
    # negative control: an engine that looks for "<think>" in the completion only (as servers that fail here do)
    # puts the whole reasoning, and the tag, into the answer; `unsplit` and the expected split both catch it
    monkeypatch.setattr(Engine, "_starts_thinking", lambda self, prompt: False)
    q, r, a = CONVS[0]
    done = engine.generate(prompt_of(engine.tokenizer, [{"role": "user", "content": q}]), GREEDY)[0]
    assert done.reasoning_content == "" and r in done.content and "</think>" in done.content
    assert not unsplit(done.text, done.reasoning_content, done.content)


# ----------------------------------------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def client(model_dir):
    engine, tok = load_engine(model_dir, max_batch=4, device="cpu")
    tok.chat_template = TEMPLATE
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=4, max_queue=16)
    with ServerThread(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize("thinking", [None, "disabled"])
def test_server_splits_the_same_streamed_and_not(client, thinking):
    # "disabled" reaches a template without a switch: the prompt still opens <think>, and the split follows the prompt
    extra = {} if thinking is None else {"thinking": {"type": thinking}}
    for q, r, a in CONVS:
        msgs = [{"role": "user", "content": q}]
        plain = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=60,
                                               extra_body=extra)
        msg = plain.choices[0].message
        assert (msg.reasoning_content, msg.content) == (r, a)
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=60,
                                                     extra_body=extra, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == r
        assert "".join(d.content or "" for d in deltas) == a
        # reasoning tokens: the completion up to and including </think>, though it has no opening tag
        assert 0 < plain.usage.completion_tokens_details.reasoning_tokens < plain.usage.completion_tokens


def test_server_second_turn_matches_the_engine(client, engine):
    done = engine.generate(prompt_of(engine.tokenizer, FOLLOW_UP), GREEDY)[0]
    plain = client.chat.completions.create(model=MODEL, messages=FOLLOW_UP, temperature=0, max_tokens=60)
    chunks = list(client.chat.completions.create(model=MODEL, messages=FOLLOW_UP, temperature=0, max_tokens=60,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    msg = plain.choices[0].message
    assert (msg.reasoning_content or "", msg.content or "") == (done.reasoning_content, done.content)
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == done.reasoning_content
    assert "".join(d.content or "" for d in deltas) == done.content


def test_a_completion_cut_off_while_thinking_is_all_reasoning(engine, client):
    q, r, _ = CONVS[0]
    prompt = prompt_of(engine.tokenizer, [{"role": "user", "content": q}])
    deltas = list(engine.stream(prompt, SamplingParams(temperature=0, max_tokens=3)))
    done = deltas[-1].completion
    assert done.finish_reason == "length" and done.content == "" and r.startswith(done.reasoning_content)
    assert "".join(d.reasoning_text for d in deltas) == done.reasoning_content
    assert unsplit(done.text, done.reasoning_content, done.content)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                                           max_tokens=3)
    assert (plain.choices[0].message.reasoning_content, plain.choices[0].message.content or "") == \
        (done.reasoning_content, "")
    assert plain.usage.completion_tokens_details.reasoning_tokens == 3


# ----------------------------------------------------------------------------------------------- nanoseek chat
def test_terminal_chat_shows_the_reasoning_dimmed_even_with_think_off(engine):
    from nanoseek.serve.chat import DIM, RESET, chat_loop
    chat_engine = ns.Engine(engine.model, engine.tokenizer, max_batch=1)
    lines = iter(["/think off", "hello", "/exit"])
    out = io.StringIO()
    assert chat_loop(chat_engine, engine.tokenizer, GREEDY, read=lambda _: next(lines), out=out, color=True) == 0
    assert f"{DIM}thinking: the user greets me{RESET}\nHello! How can I help?\n" in out.getvalue()
