"""The request schemas of the API (nanoseek/serve/protocol.py), checked without a server: known fields are strictly
typed, sampling parameters are bounded, the served limits are part of the schema, and the published OpenAPI document
says what the models accept (a body the document calls valid is one the models take, and the other way round)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from nanoseek.serve import protocol as P
from nanoseek.serve.protocol import ChatRequest, CompletionRequest, Limits

jsonschema_rs = pytest.importorskip("jsonschema_rs")

HI = [{"role": "user", "content": "hi"}]


def chat(**kw) -> dict:
    return {"messages": HI, **kw}


def completion(**kw) -> dict:
    return {"prompt": "hi", **kw}


# ----------------------------------------------------------------------------------------------- strict types
@pytest.mark.parametrize("model,body", [
    (ChatRequest, chat(max_tokens=True)),                     # true is not 1
    (ChatRequest, chat(stream="yes")),                        # "yes" is not true
    (ChatRequest, chat(stream=1)),
    (ChatRequest, chat(max_tokens="5")),                      # a string is not a number
    (ChatRequest, chat(max_tokens=5.5)),                      # an integer has no fraction
    (ChatRequest, chat(temperature="0.5")),
    (ChatRequest, chat(temperature=True)),
    (ChatRequest, chat(seed=True)),
    (ChatRequest, chat(logprobs=1)),
    (ChatRequest, chat(logprobs="true")),
    (ChatRequest, chat(top_logprobs=True, logprobs=True)),
    (ChatRequest, chat(ignore_eos="false")),
    (ChatRequest, chat(stream_options={"include_usage": "true"})),
    (ChatRequest, chat(thinking="enabled")),
    (ChatRequest, chat(chat_template_kwargs={"thinking": "no"})),    # was read as bool("no") == True
    (ChatRequest, chat(stop=5)),
    (ChatRequest, chat(stop_token_ids=[True])),
    (ChatRequest, {"messages": [{"role": "user", "content": 5}]}),
    (ChatRequest, {"messages": [{"role": "user", "content": "hi", "name": 3}]}),
    (CompletionRequest, completion(logprobs=False)),          # OpenAI: an integer or null; false is not 0
    (CompletionRequest, completion(logprobs=True)),
    (CompletionRequest, completion(echo=1)),
    (CompletionRequest, completion(max_tokens=2.5)),
    (CompletionRequest, {"prompt": [1, 2.5]}),
    (CompletionRequest, {"prompt": [1, True]}),
    (CompletionRequest, {"prompt": 5}),
])
def test_known_fields_are_not_coerced(model, body):
    with pytest.raises(ValidationError):
        model.model_validate(body)


def test_numbers_are_numbers_whichever_way_written_and_vendor_extras_are_accepted():
    req = ChatRequest.model_validate(chat(temperature=1, top_p=1, logit_bias={"5": 1}, vendor={"x": [1, "a"]},
                                          messages=[{"role": "user", "content": "hi", "x-trace": 7}]))
    assert req.temperature == 1.0 and isinstance(req.temperature, float)
    assert req.logit_bias == {"5": 1} and req.vendor == {"x": [1, "a"]}
    # JSON has one kind of number: 5.0 is the integer 5 (JSON Schema agrees, and clients write either)
    req = ChatRequest.model_validate(chat(max_tokens=5.0, seed=7.0, top_k=40.0))
    assert (req.max_tokens, req.seed, req.top_k) == (5, 7, 40) and type(req.max_tokens) is int
    assert CompletionRequest.model_validate({"prompt": [1.0, 2]}).prompt == [1, 2]
    req = CompletionRequest.model_validate(completion(logprobs=0, extra_field=None))
    assert req.logprobs == 0


def test_the_thinking_switches_read_booleans():
    assert P.chat_thinking(ChatRequest.model_validate(chat(chat_template_kwargs={"thinking": False})), True) is False
    assert P.chat_thinking(ChatRequest.model_validate(chat(chat_template_kwargs={"enable_thinking": True})), False)
    assert P.chat_thinking(ChatRequest.model_validate(chat(thinking={"type": "disabled"})), True) is False
    assert P.chat_thinking(ChatRequest.model_validate(chat(chat_template_kwargs={"other": "x"})), True) is True


# ----------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("body", [
    chat(top_k=2**63),                                        # overflowed the sampler's int64 tensor (issue 9, 1)
    chat(top_k=P.MAX_TOP_K + 1),
    chat(top_k=-2),
    chat(seed=2**64),
    chat(seed=-(2**63) - 1),
    chat(temperature=2.5),
    chat(temperature=-0.1),
    chat(top_p=0),
    chat(top_p=1.5),
    chat(presence_penalty=2.5),
    chat(frequency_penalty=-3),
    chat(repetition_penalty=0),
    chat(min_p=1.5),
    chat(n=0),
    chat(n=129),
    chat(max_tokens=0),
    chat(max_completion_tokens=0),
    chat(top_logprobs=21, logprobs=True),
    chat(top_logprobs=2),                                     # top_logprobs needs logprobs=true
    chat(stop=["x"] * 17),
    chat(stop=""),
    chat(stop="x" * 257),
    chat(stop_token_ids=[-1]),
    chat(stop_token_ids=list(range(65))),
    chat(user="u" * (P.SHORT_TEXT + 1)),
    chat(model="m" * (P.SHORT_TEXT + 1)),
    chat(tools=[{}] * 129),
    {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "hi", "name": "n" * (P.SHORT_TEXT + 1)}]},
])
def test_chat_parameters_out_of_range_are_refused(body):
    with pytest.raises(ValidationError):
        ChatRequest.model_validate(body)


def test_infinite_and_nan_numbers_are_refused():
    # Python's json module reads NaN and Infinity (not JSON, but the server parses with it)
    for text in ('{"temperature": NaN}', '{"presence_penalty": -Infinity}', '{"top_p": NaN}'):
        with pytest.raises(ValidationError):
            ChatRequest.model_validate({**json.loads(text), "messages": HI})


@pytest.mark.parametrize("body", [
    {"prompt": []},
    {"prompt": ["a", "b"]},                                   # one prompt per request
    {"prompt": [-1]},
    {"prompt": "x", "suffix": "y"},                           # no fill-in-the-middle
    completion(logprobs=21),
    completion(best_of=2),
])
def test_completion_parameters_out_of_range_are_refused(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_errors_name_the_field_and_say_what_is_wanted():
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"prompt": ["a", "b"]})
    assert "one prompt per request" in P.validation_message(e.value.errors())
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert "only text content parts" in P.validation_message(e.value.errors())
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate(chat(max_tokens=True))
    assert P.validation_message(e.value.errors()).startswith("invalid parameters: max_tokens: ")


def test_served_limits_bound_the_request_models():
    chat_model, completion_model = P.request_models(Limits(max_tokens=64), model_name="m", ctx=100, vocab_size=50)
    chat_model.model_validate(chat(max_tokens=64, max_completion_tokens=64, stop_token_ids=[49]))
    for body in (chat(max_tokens=65), chat(max_completion_tokens=65), chat(stop_token_ids=[50])):
        with pytest.raises(ValidationError):
            chat_model.model_validate(body)
    completion_model.model_validate({"prompt": [0, 49], "max_tokens": 64})
    for body in ({"prompt": [50]}, {"prompt": "x", "max_tokens": 65}):
        with pytest.raises(ValidationError):
            completion_model.model_validate(body)
    with pytest.raises(ValidationError) as e:
        completion_model.model_validate({"prompt": [7, 50]})
    assert "[0, 50)" in P.validation_message(e.value.errors())
    # the module's own models stay unbounded by any server's limits
    ChatRequest.model_validate(chat(max_tokens=10**6))


# ----------------------------------------------------------------------------------------------- the OpenAPI document
LIMITS = Limits(max_tokens=64, max_messages=3)


@pytest.fixture(scope="module")
def doc():
    return P.openapi_schema(LIMITS, "tiny", ctx=100, vocab_size=50, auth=True)


def body_validator(doc, path):
    """A validator of one operation's request body (its $refs resolved against the whole document)."""
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**doc, **ref, "$schema": "https://json-schema.org/draft/2020-12/schema"})


def test_openapi_lists_every_operation_with_its_responses(doc):
    json.dumps(doc, allow_nan=False)                          # plain JSON
    assert doc["openapi"].startswith("3.")
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ops == {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                   ("/v1/models/{model_id}", "get"), ("/v1/limits", "get"), ("/health", "get"), ("/metrics", "get")}
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "422", "429"} <= set(chat_op["responses"])
    assert set(chat_op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat_op["security"] == [{"bearer": []}] and "security" not in doc["paths"]["/health"]["get"]
    assert "security" not in P.openapi_schema(LIMITS, "tiny")["paths"]["/v1/chat/completions"]["post"]


def test_openapi_states_the_served_limits(doc):
    chat_schema = doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat_schema["messages"]["maxItems"] == 3
    assert next(s for s in chat_schema["max_tokens"]["anyOf"] if s["type"] == "integer")["maximum"] == 64
    assert next(s for s in chat_schema["model"]["anyOf"] if s.get("type") == "string")["enum"] == \
        ["tiny", *P.MODEL_ALIASES]
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    ids = next(s for s in prompt if s.get("items", {}).get("type") == "integer")
    assert ids["maxItems"] == 99 and ids["items"]["exclusiveMaximum"] == 50    # the context minus one new token


@pytest.mark.parametrize("path,body,valid", [
    ("/v1/chat/completions", chat(), True),
    ("/v1/chat/completions", chat(max_tokens=64, model="tiny", vendor_extra=[1]), True),
    ("/v1/chat/completions", chat(model="deepseek-reasoner", top_k=-1, seed=2**64 - 1), True),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=20, stop="x"), True),
    ("/v1/chat/completions", chat(top_logprobs=0), True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, True),
    ("/v1/chat/completions", chat(max_tokens=65), False),
    ("/v1/chat/completions", chat(max_tokens=True), False),
    ("/v1/chat/completions", chat(stream="yes"), False),
    ("/v1/chat/completions", chat(top_logprobs=2), False),
    ("/v1/chat/completions", chat(top_k=2**63), False),
    ("/v1/chat/completions", chat(model="gpt-4"), False),
    ("/v1/chat/completions", {"messages": HI * 4}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, False),
    ("/v1/completions", completion(), True),
    ("/v1/completions", {"prompt": [0, 49], "logprobs": 0, "echo": True}, True),
    ("/v1/completions", {"prompt": ["one"], "suffix": ""}, True),
    ("/v1/completions", completion(logprobs=False), False),
    ("/v1/completions", {"prompt": [50]}, False),
    ("/v1/completions", {"prompt": [1] * 100}, False),
    ("/v1/completions", {"prompt": ["a", "b"]}, False),
    ("/v1/completions", {"prompt": []}, False),
    ("/v1/completions", completion(suffix="y"), False),
])
def test_the_openapi_document_and_the_models_agree(doc, path, body, valid):
    assert body_validator(doc, path).is_valid(body) == valid
    served = dict(zip(("/v1/chat/completions", "/v1/completions"),
                      P.request_models(LIMITS, "tiny", ctx=100, vocab_size=50)))[path]
    # what the schema states but app.py checks (with statuses of their own): the model's name, the number of
    # messages, a token prompt against the context
    app_checked = body.get("model") == "gpt-4" or len(body.get("messages", ())) > 3 or len(body.get("prompt", "")) == 100
    if valid or not app_checked:
        try:
            served.model_validate(body)
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == valid
