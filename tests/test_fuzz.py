"""A bounded property-based fuzz of the HTTP API (issue 9).

schemathesis reads the server's own /openapi.json and sends every operation requests made from it, valid and invalid
(the coverage phase's boundary values, then random ones), in process through ASGI, to the real engine serving the
tiny trained model of test_server.py. Every check schemathesis has runs on every answer: no 5xx; status, content
type, headers and body as the document says; invalid data refused with a 4xx; valid data accepted; the API key
enforced; unsupported methods answered 405. Three checks of ours are added:
- a stream that started ends with [DONE], never with an error event (the 5xx a stream can no longer send);
- answers are strict JSON (no NaN or Infinity, which Python writes and no JSON parser need read);
- valid data may be refused only for the two limits JSON Schema cannot state (the prompt's length in tokens, the
  body's size in bytes), and then with their own error codes.

Bounded: the coverage phase, then FUZZ_EXAMPLES random requests per operation, about 40 s on two cores. The seed is
fixed so that a failure reproduces; NANOSEEK_FUZZ_SEED=N explores others, NANOSEEK_FUZZ_EXAMPLES=N goes further.
"""

from __future__ import annotations

import collections
import json
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from test_server import KEY, MODEL, build_chat_model  # noqa: E402

from nanoseek.serve import protocol as P  # noqa: E402
from nanoseek.serve.app import create_app, load_engine  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("NANOSEEK_FUZZ_EXAMPLES", "300"))
SEED = int(os.environ.get("NANOSEEK_FUZZ_SEED", "9"))
# The limits JSON Schema cannot state (app.py answers them with 400 and these codes).
UNSTATED_LIMITS = {"context_length_exceeded", "request_too_large"}
LIMITS = P.Limits(max_tokens=8, max_messages=8, max_body_bytes=1 << 14, keepalive_s=0.5)

CONFIG = {
    "seed": SEED,
    "continue-on-failure": True,                       # every failure of an operation, not only its first
    "auth": {"openapi": {"bearer": {"bearer": KEY}}},
    # (the key comes from "auth": generated Authorization headers would make most requests a 401)
    "generation": {"max-examples": FUZZ_EXAMPLES, "database": "none", "mode": "all",
                   "with-security-parameters": False},
    # schemathesis' own list, and 400 (for the limits above only: see valid_data_is_refused_only_for_unstated_limits)
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "400", "401", "403", "404", "409",
                                                                  "429", "5xx"]}},
    "phases": {"stateful": {"enabled": False}},       # no links between operations: nothing to chain
}


# ----------------------------------------------------------------------------------------------- our checks
def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def event_data(body: str) -> list[str]:
    """The data of each server-sent event (comments such as ': keep-alive' left out)."""
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def content_type(response) -> str:
    return (response.headers.get("content-type") or [""])[0].split(";")[0]


@schemathesis.check
def streams_end_with_done(ctx, response, case):
    """A stream that started ends with [DONE]; an error met on the way is an event, and a failure."""
    if content_type(response) != "text/event-stream" or response.stream_cut_short:
        return None                                    # (cut short: schemathesis stopped reading, nothing to judge)
    data = event_data(response.text)
    errors = [d for d in data if d.startswith('{"error"')]
    assert not errors, f"the stream failed after its status line: {errors[0]}"
    assert data and data[-1] == "[DONE]", f"the stream did not end with [DONE] (last event: {data[-1:]})"
    return True


@schemathesis.check
def answers_are_strict_json(ctx, response, case):
    if content_type(response) == "application/json":
        strict_json(response.text)
    elif content_type(response) == "text/event-stream":
        for d in event_data(response.text):
            if d != "[DONE]":
                strict_json(d)
    return True


@schemathesis.check
def valid_data_is_refused_only_for_unstated_limits(ctx, response, case):
    """schemathesis' positive_data_acceptance lets 400 through (see CONFIG); this says which 400s may answer data
    the document calls valid."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = strict_json(response.text)["error"]["code"]
    assert code in UNSTATED_LIMITS, f"valid data refused with 400 {code}: {response.text}"
    return True


# ----------------------------------------------------------------------------------------------- the run
def streams_half_the_time(context, body):
    """Random bodies seldom hold an optional field: add stream (and logprobs) where the body left them out, so that
    streams are fuzzed too (a field that was absent cannot be what makes an invalid body invalid)."""
    from hypothesis import strategies as st
    if not isinstance(body, dict) or "stream" in body:
        return st.just(body)
    logprobs = st.booleans() if "messages" in body else st.none() | st.integers(0, 5)
    return st.tuples(st.booleans(), logprobs).map(
        lambda drawn: {**body, "stream": drawn[0], **({} if "logprobs" in body else {"logprobs": drawn[1]})})


def fuzz(app, config: dict = CONFIG):
    """Run schemathesis over the app's /openapi.json: (failures, Counter of (operation, status, content type))."""
    from schemathesis.engine import Status, events, from_schema

    schema = schemathesis.openapi.from_asgi("/openapi.json", app,
                                            config=schemathesis.config.SchemathesisConfig.from_dict(config))
    schema.hook("flatmap_body")(streams_half_the_time)
    failures, answers = [], collections.Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for i in event.recorder.interactions.values():
                if i.response is not None:
                    answers[event.recorder.label, i.response.status_code, content_type(i.response)] += 1
            if event.status not in (Status.SUCCESS, Status.SKIP):
                failures += describe(event) or [f"{event.recorder.label}: {event.status}"]
        elif isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: {event.info.title}: {event.info}\n{event.info.code_sample or ''}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            assert event.stop_reason == "completed", f"the fuzz stopped early: {event.stop_reason}"
    return list(dict.fromkeys(failures)), answers


def describe(event) -> list[str]:
    """The failed checks of a finished scenario, each with the request that reproduces it and the answer."""
    out = []
    for case_id, checks in event.recorder.checks.items():
        interaction = event.recorder.interactions.get(case_id)
        answer = interaction and interaction.response
        answer = f"-> {answer.status_code} {answer.content[:400]!r}" if answer else "-> (no answer)"
        for c in checks:
            if c.failure_info is not None:
                f = c.failure_info.failure
                out.append(f"{event.recorder.label}: {c.name}: {f.title}\n{f.message}\n"
                           f"{c.failure_info.code_sample}\n{answer}")
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    engine, tok = load_engine(build_chat_model(tmp_path_factory.getbasetemp()), max_batch=4, device="cpu")
    # A small max_tokens keeps each generation short; few messages and a small body keep the coverage phase's
    # longest values (which it builds from the document's bounds) cheap.
    yield create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=4, max_queue=64, limits=LIMITS,
                     allowed_hosts=["testserver"])            # the Host schemathesis' in-process client sends
    from schemathesis.python.asgi import shutdown_lifespans
    shutdown_lifespans()                                       # stops the engine thread schemathesis started


# ----------------------------------------------------------------------------------------------- tests
def test_the_published_schema_is_the_one_of_the_request_models(app):
    from starlette.testclient import TestClient

    svc = app.state.service
    r = TestClient(app).get("/openapi.json")       # (no lifespan: the engine thread starts once, for the fuzz)
    assert r.status_code == 200
    assert r.json() == P.openapi_schema(svc.limits, MODEL, ctx=svc.ctx, vocab_size=svc.vocab, auth=True)


def test_every_operation_answers_as_its_schema_says(app):
    failures, answers = fuzz(app)
    assert not failures, f"{len(failures)} failure(s):\n\n" + "\n\n".join(failures)
    # the run reached the engine: each operation answered, each generation endpoint both ways and refused some
    for op in ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/models/{model_id}",
               "GET /v1/limits", "GET /health", "GET /metrics"):
        assert any(label == op and status == 200 for label, status, _ in answers), (op, answers)
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        for status, ctype in ((200, "application/json"), (200, "text/event-stream"), (422, "application/json")):
            assert answers[op, status, ctype] >= 5, (op, status, ctype, answers)


class FakeResponse:
    def __init__(self, status_code, text, ctype="application/json"):
        self.status_code, self.text, self.headers, self.stream_cut_short = status_code, text, \
            {"content-type": [ctype]}, False


def test_our_checks_can_fail():
    """Negative controls: each check of ours refuses what it is there to refuse."""
    with pytest.raises(ValueError, match="NaN is not JSON"):
        answers_are_strict_json(None, FakeResponse(200, '{"logprob": NaN}'), None)
    with pytest.raises(ValueError):
        answers_are_strict_json(None, FakeResponse(200, 'data: {"x": -Infinity}\n\n', "text/event-stream"), None)
    with pytest.raises(AssertionError, match="failed after its status line"):
        streams_end_with_done(None, FakeResponse(200, 'data: {"a":1}\n\ndata: {"error":{"message":"boom"}}\n\n',
                                                 "text/event-stream"), None)
    with pytest.raises(AssertionError, match="did not end"):
        streams_end_with_done(None, FakeResponse(200, 'data: {"a":1}\n\n: keep-alive\n\n', "text/event-stream"), None)
    assert streams_end_with_done(None, FakeResponse(200, 'data: {"a":1}\n\ndata: [DONE]\n\n', "text/event-stream"),
                                 None)

    class Positive:
        meta = type("Meta", (), {"generation": type("G", (), {"mode": type("M", (), {"is_positive": True})})})
    refused = '{"error":{"message":"m","type":"invalid_request_error","param":null,"code":"%s"}}'
    with pytest.raises(AssertionError, match="model_not_found"):
        valid_data_is_refused_only_for_unstated_limits(None, FakeResponse(400, refused % "model_not_found"), Positive)
    assert valid_data_is_refused_only_for_unstated_limits(None, FakeResponse(400, refused % "context_length_exceeded"),
                                                          Positive)
