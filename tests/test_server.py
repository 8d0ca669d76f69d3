"""The API server, checked with the official `openai` client against a real uvicorn server started here.

The model is a tiny V3-shaped model trained in the fixture (about 150 AdamW steps, a few seconds) to memorise two R1
style conversations, so greedy decoding emits `<think>\\n...\\n</think>\\n\\n answer <eos>` for real: the
reasoning_content split, usage counts, streaming and stop rules are tested on the real engine and tokenizer, with
answers known in advance.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

import nanoseek as ns  # noqa: E402
from nanoseek.serve.api import Limits, create_app, load_engine  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

KEY = "sk-test-nanoseek"
MODEL = "tiny-r1"
# (question, reasoning, answer) the model memorises; the last answers as the demo model does (R1-Zero's
# `</think> <answer>X</answer>`), for the chat page and the terminal chat, which show X.
CONVS = [("hello", "the user greets me", "Hello! How can I help?"),
         ("what is 2+3?", "2 plus 3 is 5", "The answer is 5."),
         ("what is 3+4?", "3 plus 4 is 7", " <answer>7</answer>")]
LONG_SYSTEM = " ".join(["You are a careful assistant who answers briefly and checks arithmetic."] * 8)


def build_chat_model(root) -> str:
    """A model folder (weights + tokenizer) whose greedy answers to CONVS are known. Built once per session:
    the browser test reuses the same folder."""
    folder = root / "tiny-r1"
    if (folder / "model.safetensors").is_file():
        return str(folder)
    corpus = [f"{q} {r} {a}" for q, r, a in CONVS] * 20 + [LONG_SYSTEM, "the quick brown fox, café 你好"] * 10
    tok = Tokenizer.train(iter(corpus), vocab_size=320, progress=False)  # texts, not file names
    g = torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                eos_token_id=tok.eos_id, max_position_embeddings=512)
    model = ns.Transformer(cfg)
    seqs = [tok.apply_chat_template([{"role": "user", "content": q},
                                     {"role": "assistant", "content": a, "reasoning_content": r}],
                                    add_generation_prompt=False, tokenize=True) for q, r, a in CONVS]
    x = torch.full((len(seqs), max(map(len, seqs))), tok.pad_id)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    targets = x[:, 1:].clone()
    targets[targets == tok.pad_id] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the tiny model did not memorise its conversations (loss {loss.item():.3f})"
    del g
    ns.save(model.eval(), folder, tokenizer=tok)
    return str(folder)


class ServerThread:
    """uvicorn on a free 127.0.0.1 port, in a background thread (lifespan on: the engine thread starts with it),
    configured as `nanoseek serve` runs it (transport.server_config: read deadlines, connection cap); `transport`
    overrides server_config's settings (e.g. header_timeout_s=1)."""

    def __init__(self, app, **transport):
        import uvicorn

        from nanoseek.serve.transport import server_config
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, log_level="warning", **transport))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def served(model_dir):
    engine, tok = load_engine(model_dir, max_batch=8, device="cpu")
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=8, max_queue=64)
    with ServerThread(app) as srv:
        srv.engine, srv.tok, srv.app = engine, tok, app
        yield srv


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(served) -> dict[str, float]:
    text = httpx.get(served.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def ask(client, q, **kw):
    kw = {"temperature": 0, "max_tokens": 60, **kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], **kw)


# ----------------------------------------------------------------------------------------------- API behaviour
def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_chat_splits_reasoning_from_the_answer_and_reports_usage(client, served):
    r = ask(client, "hello")
    msg = r.choices[0].message
    assert msg.reasoning_content == "the user greets me"   # no newline before </think> (R1 format)
    assert msg.content == "Hello! How can I help?"
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == MODEL
    u = r.usage
    prompt = served.tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    expected = served.tok.encode("the user greets me\n</think>\n\nHello! How can I help?") + [served.tok.eos_id]
    assert u.prompt_tokens == len(prompt)
    assert u.completion_tokens == len(expected)       # the final <eos> counts, as in OpenAI's usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == extra["prompt_cache_hit_tokens"]
    # reasoning tokens: everything up to and including </think>
    assert u.completion_tokens_details.reasoning_tokens == expected.index(served.tok.think_end_id) + 1


def test_streamed_text_equals_the_non_streamed_greedy_text(client):
    for q, _, _ in CONVS:
        plain = ask(client, q)
        chunks = list(ask(client, q, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        assert content == plain.choices[0].message.content
        assert reasoning == plain.choices[0].message.reasoning_content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        # include_usage: one last chunk with no choices carries the usage; the others carry none
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        assert all(c.usage is None for c in chunks[:-1])
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1   # really streamed


def test_thinking_switch_reaches_the_chat_template(client, served):
    tok = served.tok
    msgs = [{"role": "user", "content": "hello"}]
    on = len(tok.apply_chat_template(msgs, tokenize=True, thinking=True))
    off = len(tok.apply_chat_template(msgs, tokenize=True, thinking=False))
    assert on != off
    r_off = ask(client, "hello", max_tokens=5, extra_body={"thinking": {"type": "disabled"}})
    r_on = ask(client, "hello", max_tokens=5, extra_body={"thinking": {"type": "enabled"}})
    r_kw = ask(client, "hello", max_tokens=5, extra_body={"chat_template_kwargs": {"thinking": False}})
    assert (r_on.usage.prompt_tokens, r_off.usage.prompt_tokens, r_kw.usage.prompt_tokens) == (on, off, off)
    assert not r_off.choices[0].message.reasoning_content   # the template closed the think block


def test_repeated_long_prompt_is_served_from_the_prefix_cache(client, served):
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "what is 2+3?"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4)
    n = second.usage.prompt_tokens
    block = served.engine.block_size
    assert n > 4 * block
    hit = second.usage.model_extra["prompt_cache_hit_tokens"]
    # every full block of the repeated prompt but the last is reused (the last prompt token is always recomputed
    # to produce the first logits), so at least n - 2 * block tokens hit
    assert hit >= n - 2 * block, (hit, n)
    assert second.usage.model_extra["prompt_cache_miss_tokens"] == n - hit
    assert second.usage.prompt_tokens_details.cached_tokens == hit
    assert first.choices[0].message.content == second.choices[0].message.content


def test_text_completions_keep_think_tags_and_honour_stop_and_echo(client, served):
    prompt = served.tok.apply_chat_template([{"role": "user", "content": "hello"}])
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=60)
    assert r.choices[0].text == "the user greets me\n</think>\n\nHello! How can I help?"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=60, stop=["!"], echo=True)
    assert r.choices[0].text == prompt + "the user greets me\n</think>\n\nHello"
    assert r.choices[0].finish_reason == "stop" and r.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=60, stop=["!"], stream=True))
    assert streamed == "the user greets me\n</think>\n\nHello"


def test_text_completions_leave_out_control_tokens(client, served):
    tok = served.tok
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    kw = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=60, extra_body={"ignore_eos": True})
    r = client.completions.create(logprobs=1, **kw)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    # the model did write its end-of-sentence token (ignore_eos: generation went on past it) ...
    assert tok.eos_token in lp.tokens
    # ... and the text does not carry it, nor any other control token; <think> tags the model wrote stay
    assert text.startswith("the user greets me\n</think>\n\nHello! How can I help?")
    assert not any(s in text for s in (tok.eos_token, tok.bos_token, tok.USER, tok.ASSISTANT, tok.PAD)), text
    # the end-of-sentence token takes no room in the text: the next token's offset is where it stood
    i = lp.tokens.index(tok.eos_token)
    assert lp.text_offset[i + 1] == lp.text_offset[i] == len("the user greets me\n</think>\n\nHello! How can I help?")
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == text


def test_answer_tags_stay_in_api_answers(client):
    r = ask(client, "what is 3+4?")
    assert r.choices[0].message.reasoning_content == "3 plus 4 is 7"
    assert r.choices[0].message.content == " <answer>7</answer>"   # as the model wrote it: display is the client's


def test_logprobs_are_returned_per_token(client, served):
    r = ask(client, "hello", logprobs=True, top_logprobs=3, max_tokens=6)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-5   # greedy: the chosen token is the most likely
    # streamed: the same values, delivered with the chunks
    chunks = list(ask(client, "hello", logprobs=True, top_logprobs=3, max_tokens=6, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    # text completions: OpenAI's legacy format, offsets into the returned text
    r = client.completions.create(model=MODEL, prompt=served.tok.apply_chat_template([{"role": "user", "content": "hello"}]),
                                  temperature=0, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chunks = list(client.completions.create(model=MODEL, prompt=served.tok.apply_chat_template(
        [{"role": "user", "content": "hello"}]), temperature=0, max_tokens=6, logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for x in streamed for t in x.tokens] == lp.tokens
    assert [o for x in streamed for o in x.text_offset] == lp.text_offset


def test_paths_without_v1_prefix_and_health(served):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(served.url + "/models", headers=h).json()["data"][0]["id"] == MODEL
    r = httpx.post(served.url + "/chat/completions", headers=h,
                   json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------- errors
def test_wrong_key_is_401(served):
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(served.url + "/v1/models").status_code == 401           # no key at all


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (b"[" * 100_000 + b"]" * 100_000, 400),                                                  # nested too deep
    (json.dumps({"model": MODEL}).encode(), 422),                                            # missing messages
    (json.dumps({"messages": []}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 17}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30, "logprobs": True}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [10**6]}).encode(), 422),
    (json.dumps({"messages": "hi"}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}).encode(), 422),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 9}).encode(), 422),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),                        # lone surrogate
    (json.dumps({"messages": [{"role": "user", "content": "hi " * 2000}]}).encode(), 400),   # longer than context
    (b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}', 400),      # body > 1 MiB
])
def test_bad_requests_get_4xx_with_an_error_body(served, body, status):
    r = httpx.post(served.url + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"]


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x " * 2000)


def test_unknown_paths_and_methods_answer_json(served):
    r = httpx.get(served.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.delete(served.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# ----------------------------------------------------------------------------------------------- load
def test_32_concurrent_streams_all_complete_correctly(served):
    expected = {q: (r, a) for q, r, a in CONVS}

    async def one(c, q):
        stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                 temperature=0, max_tokens=60, stream=True)
        content, reasoning = [], []
        async for ch in stream:
            if ch.choices:
                content.append(ch.choices[0].delta.content or "")
                reasoning.append(getattr(ch.choices[0].delta, "reasoning_content", None) or "")
        return q, "".join(reasoning), "".join(content)

    async def main():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[one(c, CONVS[i % 2][0]) for i in range(32)])

    results = asyncio.run(main())
    assert len(results) == 32
    for q, reasoning, content in results:
        assert (reasoning.strip(), content) == expected[q]
    m = metrics(served)
    assert m["nanoseek_requests_running"] == 0 and m["nanoseek_requests_waiting"] == 0


def test_full_queue_answers_429_at_once_and_the_server_stays_healthy(model_dir, served):
    # A second engine on the same weights (the engine shares parameters), one slot and one queue place.
    engine = ns.Engine(served.engine.model, served.tok, max_batch=1)
    app = create_app(engine, served.tok, model_name=MODEL, max_concurrency=1, max_queue=1,
                     limits=Limits(max_messages=4, keepalive_s=0.05))
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 150, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with ServerThread(app) as srv:
        async def one(c):
            t = time.perf_counter()
            async with c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
                text = await r.aread()
                return r.status_code, time.perf_counter() - t, r.headers.get("retry-after"), text

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*[one(c) for _ in range(6)])

        results = asyncio.run(main())
        ok = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] == 429]
        assert len(ok) == 2 and len(rejected) == 4, [r[:3] for r in results]
        slowest_ok = min(r[1] for r in ok)
        for _, secs, retry_after, text in rejected:
            assert retry_after == "1" and json.loads(text)["error"]["type"] == "rate_limit_error"
            assert secs < slowest_ok, "a 429 must come at once, not after waiting"
        for r in ok:
            assert r[3].endswith(b"data: [DONE]\n\n")
        # the queued one heard ": keep-alive" comments while it waited (SSE comments, ignored by clients)
        assert any(b": keep-alive\n\n" in r[3] for r in ok)
        assert httpx.get(srv.url + "/health").status_code == 200
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 60, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello! How can I help?"
        m = httpx.get(srv.url + "/metrics").text
        assert 'nanoseek_requests_total{endpoint="/chat/completions",status="429"} 4' in m
        assert "nanoseek_rejected_requests_total 4\n" in m
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}] * 5})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"

        # a client that leaves while queued gives its queue place back
        long = {**body, "max_tokens": 400}
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with c1.stream("POST", srv.url + "/v1/chat/completions", json=long) as running:
                lines_a = running.iter_lines()       # (keep the iterators: dropping one closes the connection)
                next(lines_a)
                with c2.stream("POST", srv.url + "/v1/chat/completions", json=long) as queued:
                    lines_b = queued.iter_lines()
                    next(lines_b)
                    assert "nanoseek_requests_waiting 1\n" in httpx.get(srv.url + "/metrics").text
                deadline = time.time() + 10
                while "nanoseek_requests_waiting 0\n" not in httpx.get(srv.url + "/metrics").text:
                    assert time.time() < deadline, "the queued request that hung up still holds its place"
                    time.sleep(0.05)
                with c2.stream("POST", srv.url + "/v1/chat/completions", json=long) as again:
                    assert again.status_code == 200


def test_a_disconnected_stream_frees_its_slot_and_cache_blocks(served):
    before = metrics(served)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                running = metrics(served)
                assert running["nanoseek_requests_running"] == 1 and running["nanoseek_cache_blocks_used"] > 0
                break
    deadline = time.time() + 10
    while True:
        m = metrics(served)
        if m["nanoseek_requests_running"] == 0 and m["nanoseek_cache_blocks_used"] == 0:
            break
        assert time.time() < deadline, "the aborted request still holds its slot or its blocks"
        time.sleep(0.05)
    key = 'nanoseek_request_finish_total{reason="abort"}'
    assert m[key] == before.get(key, 0) + 1
    generated = m["nanoseek_generation_tokens_total"] - before["nanoseek_generation_tokens_total"]
    assert generated < 400, "the generation went on after the client left"
    assert served.engine.stats()["running"] == 0


def test_metrics_are_prometheus_text(served):
    text = httpx.get(served.url + "/metrics").text
    for name, kind in [("nanoseek_requests_total", "counter"), ("nanoseek_prompt_tokens_total", "counter"),
                       ("nanoseek_generation_tokens_total", "counter"),
                       ("nanoseek_prefix_cache_hit_tokens_total", "counter"),
                       ("nanoseek_time_to_first_token_seconds", "histogram"),
                       ("nanoseek_time_per_output_token_seconds", "histogram"),
                       ("nanoseek_requests_running", "gauge"), ("nanoseek_requests_waiting", "gauge"),
                       ("nanoseek_cache_blocks_used", "gauge"), ("nanoseek_cache_blocks_total", "gauge")]:
        assert f"# TYPE {name} {kind}" in text
    m = metrics(served)
    assert m['nanoseek_requests_total{endpoint="/chat/completions",status="200"}'] > 0
    assert m["nanoseek_time_to_first_token_seconds_count"] > 0
    assert m['nanoseek_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["nanoseek_time_to_first_token_seconds_count"]
    assert m["nanoseek_prefix_cache_hit_tokens_total"] > 0
    assert m["nanoseek_cache_blocks_total"] == served.engine.stats()["blocks_total"]
    assert re.search(r'nanoseek_requests_total\{endpoint="/chat/completions",status="4\d\d"\}', text)


# ----------------------------------------------------------------------------------------------- the terminal chat
def test_terminal_chat_streams_dims_thinking_and_resets(served):
    from nanoseek.infer.engine import SamplingParams
    from nanoseek.serve.chat import DIM, RESET, chat_loop
    engine = ns.Engine(served.engine.model, served.tok, max_batch=1)
    lines = iter(["hello", "/reset", "what is 2+3?", "/reset", "what is 3+4?", "/exit"])
    out = io.StringIO()
    code = chat_loop(engine, served.tok, SamplingParams(temperature=0, max_tokens=60), read=lambda _: next(lines),
                     out=out, color=True)
    text = out.getvalue()
    assert code == 0
    assert f"{DIM}thinking: the user greets me{RESET}\nHello! How can I help?\n" in text
    assert "(new conversation)" in text and "The answer is 5." in text
    # an <answer>X</answer> completion shows X, without the tags
    assert f"{DIM}thinking: 3 plus 4 is 7{RESET}\n7\n" in text and "answer>" not in text


def test_serve_cli_rejects_a_folder_that_is_not_a_model(tmp_path):
    from nanoseek.cli import main
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["chat", "--model", str(tmp_path)]) == 2


def test_ctrl_c_stops_a_terminal_answer_and_frees_its_blocks(served):
    from nanoseek.infer.engine import SamplingParams
    from nanoseek.serve.chat import answer
    engine = ns.Engine(served.engine.model, served.tok, max_batch=1)
    prompt = served.tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    chunks = []

    def write(kind, text):
        chunks.append(text)
        if len(chunks) == 5:
            os.kill(os.getpid(), signal.SIGINT)      # the user presses Ctrl-C while the answer streams

    reasoning, content, reason = answer(engine, prompt, SamplingParams(temperature=0, max_tokens=300,
                                                                       ignore_eos=True), write)
    assert reason == "interrupted"
    assert 5 <= len(chunks) < 300
    stats = engine.stats()
    assert stats["running"] == 0 and stats["blocks_used"] == 0 and not engine.has_unfinished()


def test_engine_failure_is_a_clean_error_and_a_stopped_engine_is_503(served):
    class FlakyEngine:
        """The real engine, except that its first step() raises (a bug, an out-of-memory...)."""

        def __init__(self, engine):
            self.engine, self.failed = engine, False

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def step(self):
            if not self.failed:
                self.failed = True
                raise RuntimeError("simulated engine failure")
            return self.engine.step()

    engine = FlakyEngine(ns.Engine(served.engine.model, served.tok, max_batch=2))
    app = create_app(engine, served.tok, model_name=MODEL)
    msg = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 60, "temperature": 0}
    with ServerThread(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=msg, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        r = httpx.post(srv.url + "/v1/chat/completions", json=msg, timeout=60)   # the server recovered
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello! How can I help?"
        assert engine.engine.stats()["blocks_used"] == 0
        app.state.worker.stop()
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/chat/completions", json=msg, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"]
