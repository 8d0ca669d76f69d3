"""The serving engine, specified against transformers and against itself.

Reference: transformers' greedy `generate` on random tiny V2 and V3 checkpoints (float32), token for token. The
weights are drawn large (conftest: std 0.3), so the top two logits of a step are far apart compared with the
~1e-6 float32 differences between the two implementations: a wrong mask, position or cache slot changes tokens.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch
from conftest import YARN, make_hf_model

import nanoseek as ns
from nanoseek.errors import UsageError
from nanoseek.infer import engine as engine_mod
from nanoseek.infer.cache import BlockPool, block_keys
from nanoseek.infer.engine import _ReasoningSplit, _TextStream
from nanoseek.infer.sampling import Sampled, SamplingParams, Uniforms, sample

N_NEW = 12


def greedy(n=N_NEW, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module", params=["v3", "v2"])
def pair(request, tmp_path_factory):
    """(transformers model, the same checkpoint loaded by ns.load). V3 with YaRN (positions pass the original
    context of 16), V2 without q_lora (V2-Lite's shape)."""
    kind = request.param
    hf = make_hf_model(kind, seed=3, **({"rope": YARN} if kind == "v3" else {"q_lora_rank": None}))
    hf.generation_config.eos_token_id = None       # pure argmax for N_NEW steps, as ignore_eos in the engine
    hf.generation_config.pad_token_id = 0
    folder = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(folder)
    return hf, ns.load(folder)


def hf_greedy(hf, prompt, n=N_NEW):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def prompts_of(lengths, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_greedy_tokens_equal_transformers_single_prompts(pair):
    hf, model = pair
    eng = ns.Engine(model, block_size=4)
    for p in prompts_of([1, 7, 19], model.cfg.vocab_size):
        (c,) = eng.generate([p], greedy())
        assert c.token_ids == hf_greedy(hf, p)
        assert (c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("length", len(p), N_NEW)


def test_greedy_tokens_equal_transformers_with_continuous_batching(pair):
    """Five prompts of different lengths join a running batch at different steps; two batch slots are fewer than
    the requests, so some wait for a slot. Each must still get exactly its own single-prompt greedy tokens."""
    hf, model = pair
    prompts = prompts_of([5, 13, 2, 21, 9], model.cfg.vocab_size, seed=1)
    eng = ns.Engine(model, max_batch=3, block_size=4)
    eng.prefill_tokens = 8                         # long prompts are prefilled in chunks of 4-8 tokens
    arrivals = {0: 2, 2: 1, 3: 1, 5: 1}            # step -> requests added before it
    ids, done, step = [], {}, 0
    while len(done) < len(prompts):
        for _ in range(arrivals.get(step, 0)):
            ids.append(eng.add_request(prompts[len(ids)], greedy()))
        for d in eng.step():
            if d.finished:
                done[d.request_id] = d.completion
        if step == 3:
            assert eng.stats()["running"] == 3 and eng.stats()["waiting"] >= 1   # slots full: others wait
        step += 1
    for rid, p in zip(ids, prompts):
        assert done[rid].token_ids == hf_greedy(hf, p)
    assert eng.stats()["blocks_used"] == 0


def test_cache_holds_only_the_latent(pair):
    hf, model = pair
    cfg = model.cfg
    eng = ns.Engine(model, block_size=4, num_blocks=10)
    L, r, rope = cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert len(eng.cache.c_kv) == len(eng.cache.k_pe) == L
    assert all(t.shape == (10, 4, r) for t in eng.cache.c_kv)
    assert all(t.shape == (10, 4, rope) for t in eng.cache.k_pe)
    assert eng.kv_bytes_per_token == L * (r + rope) * 4
    pool = sum(t.numel() * t.element_size() for t in eng.cache.c_kv + eng.cache.k_pe)
    assert pool == 10 * 4 * eng.kv_bytes_per_token
    # transformers' cache for the same model holds per-head K and V
    mha = L * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    assert eng.kv_bytes_per_token < mha / 3


@pytest.fixture(scope="module")
def tok():
    text = ["The quick brown fox jumps over the lazy dog. naïve café, 日本語のテキスト 🙂 1234567890\n"] * 50
    return ns.Tokenizer.train(text, vocab_size=320, progress=False)


@pytest.fixture(scope="module")
def tiny(tok):
    """A random nanoseek model with an MTP layer, vocabulary = the test tokenizer's."""
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.3)
    return ns.Transformer(cfg).eval()


def test_prefix_cache_reuses_full_blocks_with_identical_output(tiny):
    eng = ns.Engine(tiny, block_size=4, mtp=False)
    p = prompts_of([23], tiny.cfg.vocab_size, seed=2)[0]
    first = eng.generate([p], greedy())[0]
    again = eng.generate([p], greedy())[0]
    assert first.cached_tokens == 0 and again.cached_tokens == 20   # full blocks before the last prompt token
    assert again.token_ids == first.token_ids
    other = eng.generate([p[:9] + [5, 6, 7]], greedy())[0]          # shares two full blocks
    assert other.cached_tokens == 8
    assert eng.stats()["prefix_hit_tokens"] == 28
    eng.reset_prefix_cache()
    assert eng.generate([p], greedy())[0].cached_tokens == 0
    # generated tokens fill blocks too: a follow-up turn that extends prompt + answer hits them
    follow = eng.generate([p + first.token_ids + [9]], greedy(4))[0]
    assert follow.cached_tokens >= 20


def test_block_pool_evicts_least_recently_used_unreferenced_prefixes():
    pool = BlockPool(num_blocks=4, block_size=2)              # 3 usable blocks (0 is scratch)
    keys = block_keys([1, 2, 3, 4, 5, 6], 2, 3)
    blocks = [pool.allocate() for _ in range(3)]
    for b, k in zip(blocks, keys):
        pool.register(b, k)
    assert pool.num_free() == 0
    for b in (blocks[1], blocks[0], blocks[2]):               # released in this order: LRU = blocks[1]
        pool.release(b)
    assert pool.num_free() == 3 and pool.num_used() == 0       # cached but unreferenced blocks are reusable
    assert pool.lookup(keys[2]) == blocks[2]                  # a hit takes a block out of the evictable set
    assert pool.allocate() == blocks[1]                       # eviction takes the least recently used
    assert pool.lookup(keys[1]) is None and pool.lookup(keys[0]) == blocks[0]
    pool.reset_prefix_cache()
    assert pool.lookup(keys[2]) is None and pool.cached == {}


def test_mtp_speculation_gives_exactly_plain_greedy_output(tiny):
    """The random MTP head's drafts are nearly always wrong, so drafts are also overridden: 70% with the true
    next token (from plain decoding), 30% with a wrong one. Accepted and rejected drafts must both leave the output
    equal to plain greedy decoding, in a batch of different lengths."""
    prompts = prompts_of([3, 17, 8], tiny.cfg.vocab_size, seed=4)
    plain = ns.Engine(tiny, mtp=False, block_size=4).generate(prompts, greedy(16))
    eng = ns.Engine(tiny, block_size=4)
    eng.prefill_tokens = 8                     # chunked prefill: the MTP layer's cache is filled chunk by chunk
    assert eng.mtp and len(eng.cache.c_kv) == tiny.cfg.num_hidden_layers + 1         # MTP layer cached too
    ref = {eng.add_request(p, greedy(16)): c.token_ids for p, c in zip(prompts, plain)}
    rng, done = random.Random(0), {}
    while eng.has_unfinished():
        for d in eng.step():
            if d.finished:
                done[d.request_id] = d.completion.token_ids
        for r in eng.running:
            n = len(r.output)
            if n < len(ref[r.id]):
                r.draft = ref[r.id][n] if rng.random() < 0.7 else (ref[r.id][n] + 1) % tiny.cfg.vocab_size
    assert done == ref
    st = eng.stats()
    assert st["mtp_drafts"] > 10 and 0.3 < st["mtp_acceptance"] < 1.0
    assert st["decode_forwards"] < 15          # accepted drafts saved forwards (plain needs 15)
    assert st["prefill_forwards"] >= 4         # the 17-token prompt took 4 chunks (4, 4, 8, 1 tokens)
    # with the MTP head's own drafts (no override) the output is plain greedy too
    assert [c.token_ids for c in ns.Engine(tiny, block_size=4).generate(prompts, greedy(16))] == \
           [c.token_ids for c in plain]


def test_mtp_auto_mode_switches_off_an_untrained_head(tiny):
    """The random MTP head's drafts are rejected: in auto mode (mtp=None) the engine stops speculating after its
    probe, mtp=True keeps speculating; the output is plain greedy either way."""
    prompts = prompts_of([3, 17, 8], tiny.cfg.vocab_size, seed=4)
    plain = [c.token_ids for c in ns.Engine(tiny, mtp=False).generate(prompts, greedy(32))]
    auto, forced = ns.Engine(tiny), ns.Engine(tiny, mtp=True)
    assert [c.token_ids for c in auto.generate(prompts, greedy(32))] == plain
    assert [c.token_ids for c in forced.generate(prompts, greedy(32))] == plain
    a, f = auto.stats(), forced.stats()
    assert a["mtp_acceptance"] < 0.25 and not a["mtp_active"] and a["mtp_drafts"] < f["mtp_drafts"]
    assert f["mtp_active"] and f["mtp_drafts"] > 64
    auto.reset_prefix_cache()
    assert auto.stats()["mtp_active"]


def test_stop_strings_stop_tokens_and_max_tokens(tiny, tok):
    eng = ns.Engine(tiny, tok, mtp=False)
    prompt = "The quick brown"
    base = eng.generate(prompt, greedy(30))[0]
    text = base.text
    assert len(text) > 8
    stop = text[5:7]
    c = eng.generate(prompt, greedy(30, stop=["zzzz-never", stop]))[0]
    assert c.finish_reason == "stop" and c.text == text[:text.find(stop)]
    assert c.token_ids == base.token_ids[:len(c.token_ids)]
    c = eng.generate(prompt, greedy(5))[0]
    assert (c.finish_reason, c.completion_tokens, c.token_ids) == ("length", 5, base.token_ids[:5])
    t = base.token_ids[3]
    c = eng.generate(prompt, greedy(30, stop_token_ids=[t]))[0]
    assert c.finish_reason == "stop" and c.token_ids == base.token_ids[:base.token_ids.index(t) + 1]


def test_same_seed_same_text_whatever_the_batch(tiny):
    ps = prompts_of([6, 11, 3], tiny.cfg.vocab_size, seed=5)
    sp = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=123, max_tokens=16, ignore_eos=True)
    eng = ns.Engine(tiny, block_size=4)
    alone = eng.generate([ps[0]], sp)[0].token_ids
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2)]
    batch = eng.generate(ps[1:2] + [ps[0]] + ps[2:], [others[0], sp, others[1]])
    assert batch[1].token_ids == alone
    other_seed = eng.generate([ps[0]], SamplingParams(temperature=1.0, seed=124, max_tokens=16, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_abort_frees_blocks(tiny):
    eng = ns.Engine(tiny, block_size=4)
    ps = prompts_of([10, 5, 7], tiny.cfg.vocab_size, seed=6)
    a = eng.add_request(ps[0], greedy(40))
    b = eng.add_request(ps[1], greedy(6))
    for _ in range(3):
        eng.step()
    used = eng.stats()["blocks_used"]
    held = len(eng.requests[a].blocks)
    assert held >= 3
    assert eng.abort(a)
    assert eng.stats()["blocks_used"] == used - held
    c = eng.add_request(ps[2], greedy(4))
    assert eng.abort(c) and eng.stats()["waiting"] == 0      # a waiting request can be aborted too
    finals = {}
    while eng.has_unfinished():
        for d in eng.step():
            if d.finished:
                finals[d.request_id] = d.finish_reason
    assert finals == {a: "abort", b: "length", c: "abort"}
    assert eng.stats()["blocks_used"] == 0 and not eng.abort(a)


def test_text_stream_never_splits_a_utf8_character(tok):
    text = "naïve café — 日本語 🙂 ok 🙂🙂"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs tokens holding partial characters"
    ts, deltas = _TextStream(tok, (), thinking=False), []
    for i in ids:
        ts.add(i)
        deltas.append(ts.flush(final=False)[0])
    deltas.append(ts.flush(final=True)[0])
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_reasoning_split_streams_tags_safely():
    def run(text, thinking):
        s = _ReasoningSplit(thinking)
        parts = [s.feed(ch) for ch in text] + [s.feed("", final=True)]
        return "".join(p[0] for p in parts), "".join(p[1] for p in parts)

    assert run("<think>\nplan a</think>\n\nanswer <b>", False) == ("plan a", "answer <b>")
    assert run("plan </thin b\n</think>\n\nok", True) == ("plan </thin b", "ok")       # prompt ended in <think>\n
    # newlines held back as a possible "\n</think>" come out when more reasoning follows
    assert run("a\n\nb\n</think>c", True) == ("a\n\nb", "c")
    assert run("cut off while thinking\n", True) == ("cut off while thinking\n", "")
    assert run("no tags at all", False) == ("", "no tags at all")
    assert run("<thi", False) == ("", "<thi")


def scripted(monkeypatch) -> dict:
    """Replace the sampler: a request whose prompt is a key of the returned dict emits that token script (the
    model still runs every step; only the choice of token is fixed)."""
    scripts = {}

    def fake_sample(logits, params, generators, prompts, outputs):
        return Sampled([scripts[tuple(p)][min(len(o), len(scripts[tuple(p)]) - 1)] for p, o in zip(prompts, outputs)])

    monkeypatch.setattr(engine_mod, "sample", fake_sample)
    return scripts


def test_stream_deltas_join_to_the_completion_with_multibyte_text(tiny, tok, monkeypatch):
    script = "<think>\nstep 日本 🙂</think>\n\nanswer: naïve 🙂 done"
    scripts = scripted(monkeypatch)
    eng = ns.Engine(tiny, tok, mtp=False)
    prompt = tok.encode("The quick brown")
    scripts[tuple(prompt)] = tok.encode(script) + [tok.eos_id]
    deltas = list(eng.stream(prompt, SamplingParams(temperature=0, max_tokens=100)))
    comp = deltas[-1].completion
    assert deltas[-1].finished and comp.finish_reason == "stop" and comp.token_ids[-1] == tok.eos_id  # EOS
    assert comp.text == script
    assert (comp.reasoning_content, comp.content) == ("step 日本 🙂", "answer: naïve 🙂 done")
    assert "".join(d.reasoning_text for d in deltas) == comp.reasoning_content
    assert "".join(d.text for d in deltas) == comp.content
    assert "".join(d.raw_text for d in deltas) == comp.text
    assert all("\ufffd" not in d.text + d.reasoning_text for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) == comp.completion_tokens


def test_prompt_ending_in_think_starts_in_reasoning(tiny, tok, monkeypatch):
    scripts = scripted(monkeypatch)
    eng = ns.Engine(tiny, tok, mtp=False)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=True)
    assert tok.decode(prompt).endswith("<think>\n")
    scripts[tuple(prompt)] = tok.encode("add them</think>\n\n4") + [tok.eos_id]
    c = eng.generate(prompt, SamplingParams(temperature=0, max_tokens=50))[0]
    assert (c.reasoning_content, c.content) == ("add them", "4")


def test_logprobs_equal_a_training_forward(tiny):
    """GRPO recomputes log softmax(logits / T) of the sampled tokens with a full forward: the engine's numbers
    must agree (float32, decode path vs full path: 1e-4 absolute)."""
    p = prompts_of([9], tiny.cfg.vocab_size, seed=7)[0]
    sp = SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=10, ignore_eos=True, logprobs=True,
                        top_logprobs=3)
    c = ns.Engine(tiny, block_size=4).generate([p], sp)[0]
    with torch.no_grad():
        logits = tiny(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1]
    ref = torch.log_softmax(logits / 0.7, -1)
    got = torch.tensor(c.logprobs)
    assert torch.allclose(got, ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=1e-4)
    top = ref.topk(3, -1)
    for d, vals, idx in zip(c.top_logprobs, top.values, top.indices):
        assert list(d) == idx.tolist() and torch.allclose(torch.tensor(list(d.values())), vals, atol=1e-4)


def test_sampler_filters_and_penalties_are_vectorised_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    best = logits.argmax(-1)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6),
              SamplingParams(temperature=1.0, min_p=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=100.0),
              SamplingParams(temperature=0, presence_penalty=100.0)]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    outputs = [[], [], [], [], [], [int(best[5])]]
    prompts = [[], [], [], [], [int(best[4])], []]
    out = sample(logits.clone(), params, gens, prompts, outputs)
    assert out.tokens[:4] == best[:4].tolist()                     # top-k 1, tiny top-p, min-p 1, greedy
    assert out.tokens[4] != best[4] and out.tokens[5] != best[5]   # penalised tokens lose their lead
    # sampling follows the distribution: the empirical frequency of the argmax token matches its probability
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sp = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    n = sum(sample(x, [sp], [gen], [[]], [[]]).tokens[0] == 0 for _ in range(2000))
    assert abs(n / 2000 - x.softmax(-1)[0, 0].item()) < 0.04      # ~4 standard deviations


def test_a_requests_uniforms_are_its_generators_draws_one_by_one_whatever_the_block():
    # Uniforms draws BLOCK numbers at a time; on the CPU they are the numbers one draw per token would give
    stream, g = Uniforms(torch.Generator().manual_seed(7)), torch.Generator().manual_seed(7)
    got = []
    for _ in range(2 * Uniforms.BLOCK + 5):        # across refills
        assert stream.peek() == stream.peek()       # peeking consumes nothing
        got.append(stream.peek())
        stream.take()
    assert got == [torch.rand((), generator=g).item() for _ in range(len(got))]
    assert got != [torch.rand((), generator=torch.Generator().manual_seed(8)).item() for _ in range(len(got))]
    # through the sampler: a Uniforms row samples exactly what a bare generator of the same seed does, and a call
    # that fails (a constraint that allows nothing) uses no number: the next call samples as if it had not happened
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    sp = [SamplingParams(temperature=1.0)] * 3
    bare = [torch.Generator().manual_seed(i) for i in range(3)]
    mine = [Uniforms(torch.Generator().manual_seed(i)) for i in range(3)]
    nothing = torch.full((40,), -math.inf)
    with pytest.raises(ValueError):
        sample(logits.clone(), sp, mine, [[]] * 3, [[]] * 3, masks=[None, nothing, None])
    for _ in range(3):
        assert sample(logits, sp, mine, [[]] * 3, [[]] * 3).tokens == sample(logits, sp, bare, [[]] * 3, [[]] * 3).tokens
    # one request in two rows of a call (its stream twice) takes two numbers in turn, as a bare generator draws them
    flat = torch.zeros(2, 1000)                    # uniform over 1,000 tokens: the token is floor(1000 u)
    twice, g = Uniforms(torch.Generator().manual_seed(3)), torch.Generator().manual_seed(3)
    for _ in range(40):                            # across refills
        assert sample(flat, sp[:2], [twice, twice], [[]] * 2, [[]] * 2).tokens == \
            sample(flat, sp[:2], [g, g], [[]] * 2, [[]] * 2).tokens


def test_bad_requests_are_usage_errors(tiny):
    eng = ns.Engine(tiny, max_seq_len=32)
    for bad in ([], [tiny.cfg.vocab_size], list(range(3, 40))):
        with pytest.raises(UsageError):
            eng.add_request(bad, greedy())
    with pytest.raises(UsageError):
        eng.add_request("text needs a tokenizer", greedy())
    with pytest.raises(UsageError):
        SamplingParams(temperature=-1)
    with pytest.raises(UsageError):
        ns.Engine(ns.Transformer(ns.ModelConfig.preset("tiny", num_nextn_predict_layers=0)), mtp=True)
    # max_tokens is clipped to the context: finish_reason "length" at max_seq_len
    c = eng.generate([list(range(3, 30))], greedy(100))[0]
    assert c.completion_tokens == 32 - 27 and c.finish_reason == "length"


# ----------------------------------------------------------------------------------------- hostile parameters
def test_huge_integers_in_sampling_params_are_clamped_to_the_model(tiny):
    """top_k beyond the vocabulary is no limit (it overflowed an int64 tensor: issue 9, item 1), a seed counts
    modulo 2^64 (torch's generators hold 64 bits), max_tokens beyond the context ends at the context."""
    p = prompts_of([5], tiny.cfg.vocab_size, seed=8)[0]
    eng = ns.Engine(tiny, max_seq_len=24, mtp=False)
    base = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    ref = eng.generate([p], base)[0].token_ids
    assert eng.generate([p], replace(base, top_k=2**63, seed=2**64 + 5))[0].token_ids == ref
    assert eng.generate([p], replace(base, top_k=10**40, seed=5 - 2**64))[0].token_ids == ref
    assert eng.generate([p], replace(base, seed=6))[0].token_ids != ref          # the seed does matter
    c = eng.generate([p], replace(base, max_tokens=2**70))[0]
    assert (c.finish_reason, c.completion_tokens) == ("length", 24 - 5)


@pytest.mark.parametrize("field, value", [
    ("temperature", math.inf), ("temperature", math.nan), ("top_p", math.nan), ("min_p", math.nan),
    ("presence_penalty", math.nan), ("frequency_penalty", -math.inf), ("repetition_penalty", math.inf),
    ("top_k", 2.5), ("seed", 1.5), ("max_tokens", True), ("max_tokens", 3.0), ("top_logprobs", "2"),
    ("temperature", "0.5")])
def test_sampling_params_refuse_non_finite_and_mistyped_values(field, value):
    with pytest.raises(UsageError, match=field):
        SamplingParams(**{field: value})


def test_stop_token_ids_outside_the_vocabulary_are_usage_errors(tiny):
    eng = ns.Engine(tiny, mtp=False)
    for bad in ([tiny.cfg.vocab_size], [-1], [3, 2**63]):
        with pytest.raises(UsageError, match="stop_token_ids"):
            eng.add_request([5, 6], greedy(stop_token_ids=bad))
    assert not eng.has_unfinished()


def test_huge_penalties_and_temperatures_keep_the_sampler_finite(tiny):
    """Floats that overflow float32 (1e300 -> inf) gave inf * 0 = NaN logits (greedy then chose token 0 forever).
    Penalties and temperatures are clamped to +-1e6 (1e-6 for a repetition penalty), far beyond any logit gap."""
    p = prompts_of([6], tiny.cfg.vocab_size, seed=9)[0]
    eng = ns.Engine(tiny, mtp=False)
    c = eng.generate([p], greedy(12, presence_penalty=1e300))[0]
    assert len(set(c.token_ids)) == 12                            # an enormous presence penalty: nothing repeats
    assert c.token_ids == eng.generate([p], greedy(12, presence_penalty=1e6))[0].token_ids
    assert c.token_ids == eng.generate([p], greedy(12, frequency_penalty=1e300))[0].token_ids
    sp = SamplingParams(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True, logprobs=True)
    for kw, same in ((dict(repetition_penalty=1e-300), dict(repetition_penalty=1e-6)),
                     (dict(temperature=1e300), dict(temperature=1e6))):
        a, b = eng.generate([p, p], [replace(sp, **kw), replace(sp, **same)])
        assert a.token_ids == b.token_ids and all(math.isfinite(x) for x in a.logprobs)


def test_logprobs_are_finite_json_numbers(tiny, monkeypatch):
    """A temperature of 1e-38 made logits / T overflow (NaN logprobs, issue 9 item 2); a token the model rules
    out (-inf logit) had logprob -inf. Neither is JSON: logprobs are floored at LOGPROB_FLOOR = -9999.0, as
    OpenAI reports impossible tokens, and a temperature below 1e-5 is greedy."""
    V = tiny.cfg.vocab_size
    p = prompts_of([7], V, seed=10)[0]
    eng = ns.Engine(tiny, mtp=False)
    sp = SamplingParams(temperature=1e-38, seed=1, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5)
    c = eng.generate([p], sp)[0]
    json.dumps([c.logprobs, [list(d.values()) for d in c.top_logprobs]], allow_nan=False)
    assert c.token_ids == eng.generate([p], greedy(8))[0].token_ids
    head = tiny.head
    monkeypatch.setattr(tiny, "head", lambda h: head(h).index_fill(-1, torch.arange(3, V), float("-inf")))
    for temperature in (0.0, 0.7, 1e-38):
        c = eng.generate([p], replace(sp, temperature=temperature))[0]
        tops = [v for d in c.top_logprobs for v in d.values()]
        json.dumps([c.logprobs, tops], allow_nan=False)
        assert set(c.token_ids) <= {0, 1, 2} and min(tops) == -9999.0 and min(c.logprobs) > -9999.0
    # more top_logprobs asked than the vocabulary has: all of it
    out = sample(torch.tensor([[0.0, -math.inf, 1.0, 2.0]]), [SamplingParams(temperature=0, top_logprobs=20)],
                 [None], [[]], [[]])
    assert out.top_logprobs[0].keys() == {3, 2, 0, 1} and out.top_logprobs[0][1] == -9999.0
