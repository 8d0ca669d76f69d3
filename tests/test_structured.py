"""response_format through the real server and the official openai client: json_object and json_schema (strict)
enforced while decoding, bad schemas refused with 400, and a thinking model's constraint applied to its answer only.

Two models: a random tiny one (it writes noise, so JSON that validates was made so by the constraint) for the
sampled checks, and test_server's tiny trained R1-style model for thinking (it reasons, writes </think>, then is
held to the schema).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from test_grammar import SCHEMA, valid
from test_server import KEY, MODEL, ServerThread, build_chat_model

import nanoseek as ns
from nanoseek.serve.app import create_app, load_engine
from nanoseek.tokenizer import Tokenizer

openai = pytest.importorskip("openai")


def json_schema(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def random_server():
    corpus = ['{"name": "Ada", "age": 36, "ok": true, "tags": ["a", "b"]} hello world 0123456789'] * 30
    tok = Tokenizer.train(iter(corpus), vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    engine = ns.Engine(ns.Transformer(cfg).eval(), tok, max_batch=16)
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=16, max_queue=128,
                     thinking_default=False)      # (a random model would "reason" to the end of its budget)
    with ServerThread(app) as srv:
        yield srv


def ask_many(url, n, **kw):
    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        return await asyncio.gather(*[client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], seed=i, temperature=1.0, **kw)
            for i in range(n)])
    return asyncio.run(main())


def test_json_schema_100_of_100_sampled_answers_parse_and_validate(random_server):
    answers = ask_many(random_server.url, 100, max_tokens=80, response_format=json_schema(SCHEMA))
    assert [a.choices[0].finish_reason for a in answers] == ["stop"] * 100
    assert all(valid(json.loads(a.choices[0].message.content)) for a in answers)


def test_json_object_answers_parse_whenever_they_stop(random_server):
    answers = ask_many(random_server.url, 16, max_tokens=120, response_format={"type": "json_object"})
    stopped = [a.choices[0].message.content for a in answers if a.choices[0].finish_reason == "stop"]
    assert stopped and all(isinstance(json.loads(t), dict) for t in stopped)
    free = ask_many(random_server.url, 8, max_tokens=40)                       # the control: no constraint
    assert not any(_parses(a.choices[0].message.content) for a in free)


def test_too_few_tokens_finish_with_length(random_server):
    answers = ask_many(random_server.url, 4, max_tokens=4, response_format=json_schema(SCHEMA))
    assert [a.choices[0].finish_reason for a in answers] == ["length"] * 4


def test_a_streamed_constrained_answer_parses(random_server):
    client = openai.OpenAI(base_url=random_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], seed=3,
                                                 max_tokens=80, stream=True, response_format=json_schema(SCHEMA)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert valid(json.loads(text)) and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("fmt, words", [
    (json_schema({"type": "integer", "minimum": 5, "maximum": 3}), "minimum"),
    (json_schema({"not": {"type": "string"}}), "not"),
    (json_schema({"type": "wat"}), "wat"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_that_says_why(random_server, fmt, words):
    client = openai.OpenAI(base_url=random_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format=fmt)
    assert e.value.status_code == 400 and words in str(e.value) and "json_schema" in str(e.value)


def test_json_schema_without_a_schema_object_is_refused(random_server):
    client = openai.OpenAI(base_url=random_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema"})
    assert e.value.status_code in (400, 422) and "json_schema" in str(e.value)


def test_a_thinking_model_reasons_freely_and_answers_under_the_schema(tmp_path_factory):
    """The trained R1-style model reasons as it learned ("2 plus 3 is 5"), closes </think>, and its answer is then
    held to the schema: content parses, the reasoning is untouched."""
    engine, tok = load_engine(build_chat_model(tmp_path_factory.getbasetemp()), max_batch=4, device="cpu")
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY)
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer"], "additionalProperties": False}
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what is 2+3?"}],
                                           temperature=0, max_tokens=60, response_format=json_schema(schema))
    msg = r.choices[0].message
    assert msg.reasoning_content == "2 plus 3 is 5"
    assert r.choices[0].finish_reason == "stop" and set(json.loads(msg.content)) == {"answer"}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
