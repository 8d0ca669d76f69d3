"""One request's failure is that request's alone (issue 9): specified on the engine and on the server's worker.

A batch of four runs once as is (the reference), then again with a failure injected into ONE request: in its
sampling, its detokenising or its stop-string handling, in the middle of its generation. That request must end
with finish_reason "error" and a message; the other three must stream and complete exactly what they did in the
reference run (same tokens, same text, same logprobs), and every cache block must come back. A failure inside a
batched forward fails the requests of that forward only, and the engine serves the next ones as before.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
import torch

import nanoseek as ns
from nanoseek.infer import engine as engine_mod
from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.worker import EngineWorker, RequestFailed

N_NEW = 14
VICTIM = "r2"


@pytest.fixture(scope="module")
def tok():
    text = ["The quick brown fox jumps over the lazy dog. naïve café, 日本語のテキスト 🙂 1234567890\n"] * 50
    return ns.Tokenizer.train(text, vocab_size=320, progress=False)


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.3)
    return ns.Transformer(cfg).eval()


def batch(tok) -> list[tuple[list[int], SamplingParams]]:
    """Four requests that exercise different paths: greedy (MTP-speculated), seeded sampling with logprobs,
    penalties with top-p, and greedy with a stop string that never appears."""
    prompts = [tok.encode(s) for s in ("The quick brown", "naïve café", "1234 fox", "日本語 the lazy dog")]
    params = [SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=N_NEW, ignore_eos=True, logprobs=True,
                             top_logprobs=2),
              SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, stop=("@@never@@",)),
              SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5, seed=11, max_tokens=N_NEW,
                             ignore_eos=True)]
    return list(zip(prompts, params))


@dataclass
class Result:
    text: str = ""            # the deltas' raw_text joined
    content: str = ""
    reasoning: str = ""
    completion: object = None


def run(eng, reqs, inject=None) -> dict[str, Result]:
    """Add the requests as r0..r3, call inject(engine) once they are in, step to the end; each request's stream."""
    out = {}
    for i, (p, sp) in enumerate(reqs):
        out[eng.add_request(p, sp, request_id=f"r{i}")] = Result()
    if inject:
        inject(eng)
    while eng.has_unfinished():
        for d in eng.step():
            r = out[d.request_id]
            r.text += d.raw_text
            r.content += d.text
            r.reasoning += d.reasoning_text
            if d.finished:
                assert r.completion is None
                r.completion = d.completion
    assert eng.stats()["blocks_used"] == 0 and not eng.requests
    return out


def same(a: Result, b: Result) -> bool:
    """Same stream and completion. Logprobs to 1e-5: a batch of three instead of four runs the same float32
    forward with other matmul blocking (last-bit differences; the tokens' logit gaps are far larger)."""
    ca, cb = a.completion, b.completion

    def lps(c):
        return (c.logprobs or []) + [v for d in c.top_logprobs or [] for v in d.values()]

    return (a.text, a.content, a.reasoning) == (b.text, b.content, b.reasoning) and (
        ca.token_ids, ca.text, ca.finish_reason, [list(d) for d in ca.top_logprobs or []]) == (
        cb.token_ids, cb.text, cb.finish_reason, [list(d) for d in cb.top_logprobs or []]) and (
        lps(ca) == pytest.approx(lps(cb), abs=1e-5))


class Boom(Exception):
    pass


def fail_sampling(monkeypatch, after: int):
    """The sampler raises for the victim once it has generated `after` tokens (any batch holding it raises)."""
    real = engine_mod.sample

    def inject(eng):
        victim = eng.requests[VICTIM]

        def flaky(logits, params, generators, prompts, outputs):
            if any(sp is victim.params and len(o) >= after for sp, o in zip(params, outputs)):
                raise Boom("injected sampling failure")
            return real(logits, params, generators, prompts, outputs)

        monkeypatch.setattr(engine_mod, "sample", flaky)
    return inject


def fail_text(method: str, after: int):
    """The victim's own text stream raises in `method` (add: detokenising, _append: stop strings)."""
    def inject(eng):
        ts = eng.requests[VICTIM].text
        real, calls = getattr(ts, method), [0]

        def flaky(*a):
            calls[0] += 1
            if calls[0] > after:
                raise Boom(f"injected failure in {method}")
            return real(*a)

        setattr(ts, method, flaky)
    return inject


@pytest.fixture(scope="module")
def reference(tiny, tok):
    return run(ns.Engine(tiny, tok), batch(tok))


@pytest.mark.parametrize("where", ["sampling at the first token", "sampling mid-stream", "detokenising",
                                   "stop handling"])
def test_a_failure_in_one_request_fails_that_request_alone(tiny, tok, reference, monkeypatch, where):
    inject = {"sampling at the first token": lambda: fail_sampling(monkeypatch, 0),
              "sampling mid-stream": lambda: fail_sampling(monkeypatch, 5),
              "detokenising": lambda: fail_text("add", 4),
              "stop handling": lambda: fail_text("_append", 3)}[where]()
    eng = ns.Engine(tiny, tok)
    got = run(eng, batch(tok), inject)
    victim = got[VICTIM].completion
    assert victim.finish_reason == "error" and "Boom" in victim.error and "injected" in victim.error
    assert len(victim.token_ids) < N_NEW
    for rid in ("r0", "r1", "r3"):
        assert got[rid].completion.error is None
        assert same(got[rid], reference[rid]), rid
    assert eng.stats()["mtp_drafts"] > 0            # the greedy requests were speculating meanwhile
    # the engine goes on: the same batch again, without the failure, is the reference
    monkeypatch.undo()
    again = run(eng, batch(tok))
    assert all(same(again[rid], reference[rid]) for rid in reference)


def test_a_failing_prefill_fails_its_requests_while_running_ones_go_on(tiny, tok, reference, monkeypatch):
    """A newcomer's prefill forward raises (say, out of memory on a long prompt) while the others decode: the
    newcomer fails, the three running requests finish exactly as in the reference."""
    reqs = batch(tok)
    eng = ns.Engine(tiny, tok)
    out = {}
    for i in (0, 1, 3):
        out[eng.add_request(*reqs[i], request_id=f"r{i}")] = []
    deltas = eng.step() + eng.step()
    real = tiny.trunk

    def trunk(inp, *a, **kw):
        if inp.shape[1] == len(reqs[2][0]):           # the victim's prompt (decode forwards hold 1 or 2 tokens)
            raise Boom("injected prefill failure")
        return real(inp, *a, **kw)

    monkeypatch.setattr(tiny, "trunk", trunk)
    eng.add_request(*reqs[2], request_id=VICTIM)
    while eng.has_unfinished():
        deltas += eng.step()
    finals = {d.request_id: d for d in deltas if d.finished}
    assert finals[VICTIM].finish_reason == "error" and "injected prefill failure" in finals[VICTIM].error
    for rid in ("r0", "r1", "r3"):
        assert "".join(d.raw_text for d in deltas if d.request_id == rid) == reference[rid].text
        assert finals[rid].completion.token_ids == reference[rid].completion.token_ids
    assert eng.stats()["blocks_used"] == 0 and not eng.requests


def test_a_failing_decode_forward_fails_its_requests_and_the_engine_recovers(tiny, tok, reference, monkeypatch):
    real, calls = tiny.trunk, [0]

    def trunk(inp, *a, **kw):
        calls[0] += 1
        if calls[0] == 4:                               # prefill, then the third decode forward
            raise Boom("injected decode failure")
        return real(inp, *a, **kw)

    monkeypatch.setattr(tiny, "trunk", trunk)
    eng = ns.Engine(tiny, tok)
    got = run(eng, batch(tok))
    assert {r.completion.finish_reason for r in got.values()} == {"error"}
    assert all("injected decode failure" in r.completion.error for r in got.values())
    assert all(r.completion.token_ids == reference[rid].completion.token_ids[:len(r.completion.token_ids)]
               for rid, r in got.items())
    again = run(eng, batch(tok))                        # the cache and the scheduler are whole
    assert all(same(again[rid], reference[rid]) for rid in reference)


def test_the_worker_reports_a_failed_request_as_that_jobs_error(tiny, tok, reference, monkeypatch):
    """Through the server's engine thread: the victim's job receives a RequestFailed (the HTTP layer answers
    that request alone with an engine_error); the other jobs' deltas are the reference streams."""
    eng = ns.Engine(tiny, tok)
    inject = fail_sampling(monkeypatch, 5)
    real_add = eng.add_request

    def add_request(prompt, params, request_id=None):
        rid = real_add(prompt, params, request_id=request_id)
        if rid == VICTIM:
            inject(eng)
        return rid

    eng.add_request = add_request

    async def collect(worker, prompt, params, rid):
        job = worker.submit(prompt, params, request_id=rid)
        text = ""
        while True:
            item = await job.queue.get()
            if isinstance(item, Exception):
                return text, item
            text += item.raw_text
            if item.finished:
                return text, item.completion

    async def main():
        worker = EngineWorker(eng, max_concurrency=4).start()
        try:
            return worker, await asyncio.gather(*(collect(worker, p, sp, f"r{i}")
                                                  for i, (p, sp) in enumerate(batch(tok))))
        finally:
            worker.stop()

    worker, results = asyncio.run(main())
    got = dict(zip(("r0", "r1", "r2", "r3"), results))
    text, err = got.pop(VICTIM)
    assert isinstance(err, RequestFailed) and "injected sampling failure" in str(err)
    assert err.completion.finish_reason == "error"
    for rid, (text, comp) in got.items():
        assert text == reference[rid].text and comp.token_ids == reference[rid].completion.token_ids
    assert worker.error is None and worker.metrics.finished == {"error": 1, "length": 3}
    assert eng.stats()["blocks_used"] == 0


# ----------------------------------------------------------------------------------------------- through HTTP
HOSTILE = [{"top_k": 2**63, "temperature": 1.0}, {"top_k": 2**31 - 1, "temperature": 0.5, "seed": 2**64 - 1},
           {"temperature": 1e-38, "logprobs": True, "top_logprobs": 5},
           {"temperature": 1e-38, "logprobs": True, "top_logprobs": 3, "stream": True},
           {"presence_penalty": 1e300, "frequency_penalty": -1e300, "temperature": 1.0, "logprobs": True},
           {"repetition_penalty": 1e-300, "temperature": 1e300, "seed": -1},
           {"stop_token_ids": [2**63]}, {"max_tokens": 2**63}]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON, though Python writes them)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_running_stream_survives_hostile_sampling_values(tmp_path_factory):
    """Issue 9 items 1 and 2 end to end: while a stream runs, requests with overflowing integers, tiny or huge
    temperatures and penalties share its batch. Each gets a 2xx with finite JSON numbers or a 4xx, never a 5xx,
    and the stream finishes with exactly the text it has alone."""
    httpx = pytest.importorskip("httpx")
    from test_server import CONVS, MODEL, ServerThread, build_chat_model

    from nanoseek.serve.api import create_app, load_engine

    engine, tok = load_engine(build_chat_model(tmp_path_factory.getbasetemp()), max_batch=8, device="cpu")
    url = "/v1/chat/completions"
    msgs = [{"role": "user", "content": CONVS[1][0]}]
    victim = {"model": MODEL, "messages": msgs, "temperature": 0, "max_tokens": 300, "ignore_eos": True,
              "stream": True}

    async def stream(c, body, started=None) -> str:
        text = []
        async with c.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = strict_json(line[6:])
                    assert "error" not in chunk, chunk
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
                    if started is not None:
                        started.set()
        return "".join(text)

    async def attack(c, body):
        body = {"model": MODEL, "messages": msgs, "max_tokens": 20, **body}
        if body.get("stream"):
            return 200, await stream(c, body)
        r = await c.post(url, json=body)
        assert r.status_code < 500, (body, r.text)
        return r.status_code, strict_json(r.text)

    async def main(hostile):
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            started = asyncio.Event()
            task = asyncio.create_task(stream(c, victim, started))
            await started.wait()
            answers = await asyncio.gather(*(attack(c, h) for h in hostile))
            return await task, answers, engine.stats()["running"]

    with ServerThread(create_app(engine, tok, model_name=MODEL, max_concurrency=8)) as srv:
        alone, _, _ = asyncio.run(main([]))
        attacked, answers, _ = asyncio.run(main(HOSTILE))
    assert len(alone) > 100 and attacked == alone
    assert all(status < 500 for status, _ in answers)
    assert answers[2][0] == 200 and answers[2][1]["choices"][0]["logprobs"]["content"]      # finite logprobs
    assert engine.stats()["blocks_used"] == 0


def test_generate_raises_when_a_request_failed_unless_asked_to_return_it(tiny, tok, monkeypatch):
    """Trainers and eval call generate(): a completion that failed inside the engine must not be scored as a wrong
    answer. Every request still completes (the failure is its own), then generate() raises naming it;
    errors="return" hands the failed completion back instead."""
    reqs = batch(tok)
    real = engine_mod.sample

    def flaky(logits, params, generators, prompts, outputs):
        if any(sp is reqs[2][1] for sp in params):
            raise Boom("injected sampling failure")
        return real(logits, params, generators, prompts, outputs)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    eng = ns.Engine(tiny, tok, max_batch=4)
    with pytest.raises(RuntimeError, match="1 of 4 generations failed.*injected sampling failure"):
        eng.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    assert eng.stats()["blocks_used"] == 0 and not eng.requests
    done = eng.generate([p for p, _ in reqs], [sp for _, sp in reqs], errors="return")
    assert [c.finish_reason for c in done] == ["length", "length", "error", "length"]
