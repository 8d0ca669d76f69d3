"""n choices, logit_bias and fill-in-the-middle through the API (openai client against `create_app`).

- n > 1: n copies of one prompt; choice i samples with the request's seed + i, so each choice equals a single
  request with that seed; streamed chunks carry their choice's index and reassemble to the whole answer; usage
  counts the prompt once; the copies read the prompt's cache blocks from the first one (engine counters).
- logit_bias: +100 makes a token certain, -100 removes the greedy token; ids outside the vocabulary are refused.
- FIM: `prompt` + `suffix` reach the model as DeepSeek's layout (checked against transformers' encoding of the
  published V3 tokenizer), and a tokenizer without FIM tokens refuses a suffix with a reason.
"""

from __future__ import annotations

import pytest
import torch
from test_server import KEY, MODEL, ServerThread

import nanoseek as ns
from nanoseek.serve.app import create_app
from nanoseek.tokenizer import FIM_TOKENS, Tokenizer

openai = pytest.importorskip("openai")

PROMPT = "hello world " * 12       # > 2 cache blocks of 16 tokens, so the copies can share full blocks


class Recorder:
    """The real engine, noting each request's prompt ids and generated ids (in order of arrival)."""

    def __init__(self, engine):
        self.engine, self.prompts, self.outputs = engine, [], {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, params=None, request_id=None):
        self.prompts.append(list(prompt))
        rid = self.engine.add_request(prompt, params, request_id=request_id)
        self.outputs[rid] = []
        return rid

    def step(self):
        deltas = self.engine.step()
        for d in deltas:
            self.outputs[d.request_id] += d.token_ids
        return deltas

    def last_output(self) -> list[int]:
        return list(self.outputs.values())[-1]


def make_tokenizer(fim: bool) -> Tokenizer:
    tok = Tokenizer.train(iter(["hello world def main(): return 0123456789 x = y + z"] * 30), vocab_size=300,
                          progress=False)
    if fim:
        tok._tk.add_special_tokens(list(FIM_TOKENS))
    return tok


def serve(fim: bool):
    tok = make_tokenizer(fim)
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    engine = Recorder(ns.Engine(ns.Transformer(cfg).eval(), tok, max_batch=8))
    app = create_app(engine, tok, model_name=MODEL, api_key=KEY, max_concurrency=8, max_queue=32,
                     thinking_default=False)
    srv = ServerThread(app)
    srv.engine, srv.tok = engine, tok
    return srv


@pytest.fixture(scope="module")
def srv():
    with serve(fim=True) as s:
        yield s


@pytest.fixture(scope="module")
def plain():
    with serve(fim=False) as s:
        yield s


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


# ----------------------------------------------------------------------------------------------- n
def test_n_choices_are_the_single_requests_with_seeds_seed_plus_i(srv):
    c = client(srv)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    hits = srv.engine.counters["prefix_hit_tokens"]
    many = c.completions.create(n=3, seed=7, **kw)
    shared = srv.engine.counters["prefix_hit_tokens"] - hits
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    singles = [c.completions.create(seed=7 + i, **kw).choices[0].text for i in range(3)]
    assert [ch.text for ch in many.choices] == singles
    assert len(set(singles)) > 1                                  # the choices are not copies of one sample
    n_prompt = len(srv.engine.prompts[-1])
    assert many.usage.prompt_tokens == n_prompt and many.usage.completion_tokens == 36
    assert shared >= 2 * 16                                       # choices 1 and 2 read choice 0's full blocks


def test_n_streamed_chunks_reassemble_per_choice(srv):
    c = client(srv)
    whole = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], n=2, seed=3,
                                      max_tokens=10, temperature=1.0)
    parts, usage = {0: "", 1: ""}, []
    for chunk in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], n=2, seed=3,
                                           max_tokens=10, temperature=1.0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
    assert parts == {i: whole.choices[i].message.content for i in (0, 1)}
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    assert usage[0].prompt_tokens == whole.usage.prompt_tokens


def test_n_above_the_limit_is_refused(srv):
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client(srv).completions.create(model=MODEL, prompt="hi", n=9, max_tokens=2)


# ----------------------------------------------------------------------------------------------- logit_bias
def test_logit_bias_forces_and_bans_tokens(srv):
    c, tok = client(srv), srv.tok
    forced = tok.encode("world")[0]
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=6, temperature=1.0, seed=1,
                             logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 6)
    assert srv.engine.last_output() == [forced] * 6
    c.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0,
                         extra_body={"ignore_eos": True})
    greedy = srv.engine.last_output()
    c.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
                         logit_bias={str(t): -100 for t in set(greedy)})
    banned = srv.engine.last_output()
    assert len(banned) == 3 and not set(banned) & set(greedy)    # the greedy tokens are gone from the answer


@pytest.mark.parametrize("bias", [{"100000": 5}, {"-1": 5}, {"x": 1}, {"3": 101}, {str(i): 1 for i in range(301)}])
def test_bad_logit_bias_is_refused(srv, bias):
    with pytest.raises(openai.UnprocessableEntityError):
        client(srv).completions.create(model=MODEL, prompt="hi", max_tokens=2, logit_bias=bias)


# ----------------------------------------------------------------------------------------------- FIM
def test_fim_prompt_is_deepseeks_layout(srv):
    tok = srv.tok
    r = client(srv).completions.create(model=MODEL, prompt="def main():\n    x = ", suffix="\n    return x\n",
                                       max_tokens=4, temperature=0)
    begin, hole, end = (tok.token_to_id(t) for t in FIM_TOKENS)
    want = [tok.bos_id, begin, *tok.encode("def main():\n    x = "), hole, *tok.encode("\n    return x\n"), end]
    assert srv.engine.prompts[-1] == want
    assert r.choices[0].finish_reason in ("stop", "length")


def test_fim_layout_equals_transformers_on_deepseek_v3s_tokenizer():
    """The published V3/R1 tokenizer: our FIM prompt = transformers' encoding of DeepSeek's documented string."""
    from test_real_tokenizers import _release
    transformers = pytest.importorskip("transformers")
    folder = _release("deepseek-v3")
    ours = Tokenizer.load(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    prefix, suffix = "def quick_sort(arr):\n    if len(arr) <= 1:\n", "\n    return left + [pivot] + right\n"
    text = f"<｜begin▁of▁sentence｜><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>"
    assert ours.fim_prompt(prefix, suffix) == hf.encode(text, add_special_tokens=False)
    assert ours.fim_prompt(prefix, suffix) != hf.encode(text.replace("<｜fim▁hole｜>", ""), add_special_tokens=False)


def suffix_schema(s) -> dict:
    import httpx
    doc = httpx.get(s.url + "/openapi.json").json()
    return doc["components"]["schemas"]["CompletionRequest"]["properties"]["suffix"]


def test_a_tokenizer_without_fim_tokens_refuses_a_suffix(plain, srv):
    with pytest.raises(openai.UnprocessableEntityError, match="fill-in-the-middle"):
        client(plain).completions.create(model=MODEL, prompt="def f(", suffix=")", max_tokens=2)
    ok = client(plain).completions.create(model=MODEL, prompt="def f(", suffix="", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert "maxLength': 0" in str(suffix_schema(plain)) and "maxLength': 0" not in str(suffix_schema(srv))


def test_fim_with_token_id_prompt_is_refused(srv):
    with pytest.raises(openai.UnprocessableEntityError, match="text prompt"):
        client(srv).completions.create(model=MODEL, prompt=[1, 2, 3], suffix="x", max_tokens=2)
