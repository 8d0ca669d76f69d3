"""DeepSeek-V4 in the engine: the cached forward (infer/v4_cache.py V4Cache) against the full forward, and the
engine's greedy tokens against transformers' DeepseekV4ForCausalLM.generate (float32, CPU).

Models: the tiny-v4 preset (a sliding, two CSA and an HCA layer; window 8, CSA 4:1 with overlap, HCA 8:1,
index_topk 3, hc_mult 2) and a variant with three streams, a window of 5, HCA 16:1 and index_topk 5. Sequences
of 40+ tokens run past the window and give CSA's indexer more entries than index_topk to choose from. Weights are
drawn large (std 0.15-0.3, as tests/test_v4.py) so every mechanism moves the logits and greedy steps are far from
ties. index_n_heads is 16 (the preset has 4): a CSA score is exactly 0 when every head's ReLU is 0, and torch.topk
breaks such ties by the number of entries it sees, which a cached step (fewer entries) and a whole sequence do not
share; with 16 heads such a tie has probability ~2^-16 per entry instead of 1/16.

Tolerance 1e-5 relative to the largest logit: both paths compute in float32 with the same operations; they differ
by the order of the sums over keys (masked keys add exact zeros) and matmul blocking, ~5e-7 seen.
"""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import v4_pair  # noqa: E402

import nanoseek as ns  # noqa: E402
from nanoseek.errors import UsageError  # noqa: E402
from nanoseek.infer.compiled import CompiledV4  # noqa: E402
from nanoseek.infer.v4_cache import V4Cache  # noqa: E402
from nanoseek.model.v4 import sinkhorn, sinkhorn_bordered  # noqa: E402

TOL = 1e-5
CONFIGS = {
    "tiny-v4": dict(index_n_heads=16),
    "hc3-window5": dict(index_n_heads=16, hc_mult=3, sliding_window=5, index_topk=5, scoring_func="sigmoid",
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}),
}


def random_pair(**overrides):
    """conftest.v4_pair, with transformers' generate set to pure argmax for max_new_tokens steps (as ignore_eos)."""
    hf, ours = v4_pair(**overrides)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return random_pair(**CONFIGS[request.param])


@pytest.fixture(scope="module")
def tiny():
    return random_pair(**CONFIGS["tiny-v4"])


IDS = torch.randint(0, 512, (2, 44), generator=torch.Generator().manual_seed(1))
PREFILL = 32         # tokens run in chunks; the rest one at a time


def cached_logits(model, ids, chunks, cache_cls=V4Cache):
    """Logits (B, T, V) of ids run through a cache: row b's first PREFILL tokens in chunks of chunks[b] (rows at
    different positions share each forward, as in the engine), then one token per forward."""
    B, T = ids.shape
    cache = cache_cls(model.cfg, num_slots=B, max_len=64)
    slots = [cache.pool.allocate() for _ in range(B)]
    done, out = [0] * B, [[] for _ in range(B)]
    while min(done) < T:
        rows = [b for b in range(B) if done[b] < T]
        lens = [min(chunks[b] if done[b] < PREFILL else 1, (PREFILL if done[b] < PREFILL else T) - done[b])
                for b in rows]
        pos = cache.plan([[slots[b]] for b in rows], [done[b] for b in rows], lens)
        x = torch.stack([torch.nn.functional.pad(ids[b, done[b]:done[b] + n], (0, max(lens) - n))
                         for b, n in zip(rows, lens)])
        with torch.no_grad():
            logits = model(x, pos, cache=cache)
        for i, (b, n) in enumerate(zip(rows, lens)):
            out[b].append(logits[i, :n])
            done[b] += n
    return torch.stack([torch.cat(o) for o in out])


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def full_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def test_the_sequences_exercise_every_branch(pair):
    cfg = pair[1].cfg
    assert IDS.shape[1] > PREFILL > cfg.sliding_window
    assert PREFILL // cfg.compress_rates["compressed_sparse_attention"] > cfg.index_topk
    assert IDS.shape[1] >= 2 * cfg.compress_rates["heavily_compressed_attention"]
    assert set(cfg.layer_types) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert cfg.hc_mult > 1


@pytest.mark.parametrize("chunks", [(1, 1), (3, 3), (4, 4), (7, 7), (32, 32), (3, 5), (8, 1)])
def test_cached_forward_equals_full_forward(pair, chunks):
    """Chunked prefill of any chunk size (shorter and longer than a compressed window, not aligned to it; rows at
    different positions in one forward), then decoding token by token: the logits of every position."""
    _, model = pair
    assert rel_err(full_logits(model), cached_logits(model, IDS, chunks)) < TOL


class ForgetsPending(V4Cache):
    """Negative control: forgets the compressors' pending tokens between forwards."""

    def pending(self, layer, name, kv, gate, rate, overlap):
        br = self.branches[layer][name]
        br.kv.zero_()
        br.gate.zero_()
        return super().pending(layer, name, kv, gate, rate, overlap)


class ShortWindow(V4Cache):
    """Negative control: a window ring of sliding_window - 2 rows, one short of the keys before a query that its
    window holds (the oldest key of each query's window is lost)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_kv = [r[:, 2:].contiguous() for r in self.window_kv]


class NoOverlap(V4Cache):
    """Negative control: keeps only the incomplete window's pending tokens, not the previous window's first series
    that CSA's next entry pools (its ring rows for that window read as zeros)."""

    def pending(self, layer, name, kv, gate, rate, overlap):
        windows = super().pending(layer, name, kv, gate, rate, overlap)
        if overlap and windows is not None:
            windows[0][:, :rate] = 0
        return windows


@pytest.mark.parametrize("broken", [ForgetsPending, ShortWindow, NoOverlap])
def test_a_cache_that_loses_state_fails_the_comparison(tiny, broken):
    _, model = tiny
    full = full_logits(model)
    assert rel_err(full, cached_logits(model, IDS, (3, 5))) < TOL
    assert rel_err(full, cached_logits(model, IDS, (3, 5), broken)) > 100 * TOL


class CountsReads(V4Cache):
    """Records what each layer's compressed branches read: (layer, name, shape) of every entries() / selected()."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def entries(self, layer, name, new, first):
        out = super().entries(layer, name, new, first)
        self.reads.append(("entries", layer, name, tuple(out.shape)))
        return out

    def selected(self, layer, name, positions):
        out = super().selected(layer, name, positions)
        self.reads.append(("selected", layer, name, tuple(out.shape)))
        return out


class PicksTheNextEntry(V4Cache):
    """Negative control: gathers the entry after each chosen one (a gathered path that reads the wrong entries)."""

    def selected(self, layer, name, positions):
        return super().selected(layer, name, (positions + 1) % (positions.max() + 1))


def test_a_decode_step_can_run_twice(pair):
    """The engine reruns a compiled decode step that failed half-way eager, on the cache that step wrote in part:
    running a decode step again on the same cache gives the same logits, at every position of a 12-token decode
    past the window and the compressors' windows. A ring of sliding_window - 1 rows (the keys a window needs, no
    spare row) makes the second run read the new key in place of its window's oldest: the check can fail."""
    _, model = pair
    for rows, ok in ((None, True), (model.cfg.sliding_window - 1, False)):
        cache = V4Cache(model.cfg, num_slots=2, max_len=64)
        if rows is not None:
            cache.window_kv = [r[:, -rows:].contiguous() for r in cache.window_kv]
        slots = [[cache.pool.allocate()] for _ in range(2)]
        with torch.no_grad():
            model(IDS[:, :PREFILL], cache.plan(slots, [0, 0], [PREFILL] * 2), cache=cache)
            diffs = []
            for t in range(PREFILL, IDS.shape[1]):
                first, again = (model(IDS[:, t:t + 1], cache.plan(slots, [t, t], [1, 1]), cache=cache)
                                for _ in range(2))
                diffs.append(rel_err(first, again))
        assert (max(diffs) == 0) == ok


def test_a_csa_decode_step_reads_its_top_k_entries_only(tiny):
    """After a 40-token prompt (10 CSA entries > index_topk 3), a decode step gathers k = 3 entries per CSA layer
    for its query (and the HCA layer still reads its entries whole); the CSA compressor's entries are never read
    whole. The indexer reads all its keys (it ranks them)."""
    _, model = tiny
    cfg, k = model.cfg, model.cfg.index_topk
    cache = CountsReads(cfg, num_slots=2, max_len=64)
    slots = [cache.pool.allocate() for _ in range(2)]
    with torch.no_grad():
        model(IDS[:, :40], cache.plan([[s] for s in slots], [0, 0], [40, 40]), cache=cache)
        cache.reads.clear()
        model(IDS[:, 40:41], cache.plan([[s] for s in slots], [40, 40], [1, 1]), cache=cache)
    csa = [i for i, t in enumerate(cfg.layer_types) if t == "compressed_sparse_attention"]
    assert sorted(r for r in cache.reads if r[2] == "compressor" and r[1] in csa) == \
        [("selected", i, "compressor", (2, 1, k, cfg.head_dim)) for i in csa]
    assert all(r[0] == "entries" for r in cache.reads if r[2] == "indexer" or r[1] not in csa)
    assert ("entries", csa[0], "indexer", (2, 41 // 4, cfg.index_head_dim)) in cache.reads


def test_gathered_top_k_equals_the_masked_attention(tiny, monkeypatch):
    """The same cached run with the gathered path (decode and short chunks: T x k < entries) and with every CSA
    step attending to all entries under the selection mask: equal logits (same tolerance as above: they differ by
    the order of the softmax's sums). A gathered path reading the wrong entries fails the comparison."""
    import nanoseek.model.v4 as v4
    _, model = tiny
    gathered = cached_logits(model, IDS, (1, 3))
    wrong = cached_logits(model, IDS, (1, 3), PicksTheNextEntry)
    monkeypatch.setattr(v4, "gather_selected", lambda T, S, k: False)
    masked = cached_logits(model, IDS, (1, 3))
    assert rel_err(masked, gathered) < TOL
    assert rel_err(masked, wrong) > 100 * TOL


def greedy(n):
    return ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def test_greedy_tokens_equal_transformers_single_prompts(pair):
    hf, model = pair
    eng = ns.Engine(model, max_seq_len=96)
    for prompt in prompts_of([3, 30, 41]):
        assert eng.generate([prompt], greedy(14))[0].token_ids == hf_greedy(hf, prompt, 14)


def test_continuous_batching_equals_transformers(pair):
    """Two slots for five requests of different lengths and budgets: requests join as others leave (a slot's
    previous sequence is never read), prefill and decode rows share steps."""
    hf, model = pair
    prompts, budgets = prompts_of([30, 5, 41, 17, 9], seed=1), [6, 20, 12, 16, 9]
    eng = ns.Engine(model, max_batch=2, max_seq_len=96)
    out = eng.generate(prompts, [greedy(n) for n in budgets])
    assert eng.stats()["blocks_total"] == 2 and eng.counters["prefill_forwards"] >= 3
    for prompt, n, c in zip(prompts, budgets, out):
        assert c.token_ids == hf_greedy(hf, prompt, n) and c.finish_reason == "length"


def test_chunked_prefill_in_the_engine_equals_transformers(tiny):
    hf, model = tiny
    prompts = prompts_of([41, 26, 33], seed=2)
    eng = ns.Engine(model, max_batch=3, max_seq_len=96)
    eng.prefill_tokens = 10             # 3 rows: chunks of 3 tokens; then 5, then 10 as rows finish
    out = eng.generate(prompts, greedy(10))
    assert eng.counters["prefill_forwards"] >= 41 // 10
    for prompt, c in zip(prompts, out):
        assert c.token_ids == hf_greedy(hf, prompt, 10)


def test_copies_of_a_prompt_each_compute_it(tiny):
    """n > 1 copies: no prefix reuse for V4 (nothing comes from a cache), every copy gets the right tokens."""
    hf, model = tiny
    prompt = prompts_of([37], seed=3)[0]
    eng = ns.Engine(model, max_seq_len=96)
    out = eng.generate([prompt] * 3, greedy(8))
    ref = hf_greedy(hf, prompt, 8)
    assert all(c.token_ids == ref and c.cached_tokens == 0 for c in out)
    assert eng.stats()["blocks_cached"] == 0 and eng.counters["prefix_hit_tokens"] == 0


def test_engine_options_v4_does_not_take(tiny):
    _, model = tiny
    with pytest.raises(UsageError, match="deepseek_v4"):
        ns.Engine(model, mtp=True)


def test_without_a_compiler_v4_decodes_eager_with_a_notice(tiny, capsys, monkeypatch):
    import nanoseek.infer.engine as engine_mod
    hf, model = tiny
    monkeypatch.setattr(engine_mod, "unavailable", lambda device: "no C++ compiler found (test)")
    eng = ns.Engine(model, max_seq_len=64, compile=True)
    prompt = prompts_of([12], seed=7)[0]
    assert eng.generate([prompt], greedy(4))[0].token_ids == hf_greedy(hf, prompt, 4)
    assert eng._compiled is None and eng.compile is False
    assert "decoding eager: no C++ compiler found (test)" in capsys.readouterr().err


def test_auto_compile_stays_eager_for_short_work_and_says_so(tiny, capsys):
    """compile="auto" (the default) follows the paged caches' rule (compiled.AUTO_MIN_STEPS) for V4 too."""
    _, model = tiny
    eng = ns.Engine(model, max_seq_len=64)
    eng.generate(prompts_of([12]), greedy(4))
    assert eng._compiled is None and "decoding eager (compile='auto'" in capsys.readouterr().err


def test_sinkhorn_in_place_equals_the_plain_loop():
    """Without gradients sinkhorn runs in place on an eps-bordered copy (sinkhorn_bordered): the same divisions by
    sums + eps, in another order of the additions only, so within a few float32 ulps (1e-6; ~1e-7 seen). One
    iteration fewer moves the result far more: the comparison can fail."""
    torch.manual_seed(0)
    for n in (2, 3, 4):
        m = torch.softmax(3 * torch.randn(5, 7, n, n), dim=-1) + 1e-6                  # as HyperConnection's comb
        with torch.enable_grad():
            plain = sinkhorn(m.clone().requires_grad_(), 20, 1e-6)
        with torch.no_grad():
            assert (sinkhorn(m, 20, 1e-6) - plain).abs().max() < 1e-6
            assert (sinkhorn(m, 19, 1e-6) - plain).abs().max() > 1e-4
            assert (sinkhorn_bordered(m, 20, 1e-6) - plain).abs().max() < 1e-6


def test_sorted_experts_equal_the_loop(tiny):
    """Without gradients the routed experts run sorted by expert (ClampedExperts.sorted_forward, grouped matmuls);
    training runs the loop over the picked experts: the same products per (token, expert) pair, so within float
    rounding (1e-6 relative; equal bits seen on the CPU). Swapped routing weights move the result: it can fail."""
    _, model = tiny
    experts = model.layers[0].mlp.experts
    E, k = experts.down_proj.shape[0], model.cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(3)
    for N in (1, 3, 17):
        x = torch.randn(N, model.cfg.hidden_size, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
        w = torch.rand(N, k, generator=g)
        with torch.enable_grad():
            loop = experts(x, w, idx)
        with torch.no_grad():
            assert rel_err(loop, experts(x, w, idx)) < 1e-6
            assert rel_err(loop, experts(x, w.flip(-1), idx)) > 1e-3


def test_compiled_v4_decode_equals_eager(tiny, capsys):
    """Engine(compile=True) on deepseek_v4 compiles the mHC and the attention's projections and softmax
    (infer/compiled.py CompiledV4; batch 3, 2 and 1 as requests end: the batch-1 and the dynamic-batch graphs):
    the same greedy tokens as eager and as transformers, log-probs within 1e-5 (inductor fuses the same float32
    arithmetic, ~1e-7 apart)."""
    hf, model = tiny
    prompts = prompts_of([30, 41, 12], seed=6)
    params = [ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=True) for n in (12, 5, 9)]
    eager = ns.Engine(model, max_batch=3, max_seq_len=96, compile=False).generate(prompts, params)
    eng = ns.Engine(model, max_batch=3, max_seq_len=96, compile=True)
    compiled = eng.generate(prompts, params)
    assert isinstance(eng._compiled, CompiledV4) and "compiled deepseek_v4's decode pieces" in capsys.readouterr().err
    # the compiled twins were this model's for the steps only: no module keeps one afterwards
    assert not any({"weights", "collapse", "project", "output", "rank"} & m.__dict__.keys() for m in model.modules())
    for e, c, prompt, p in zip(eager, compiled, prompts, params):
        assert c.token_ids == e.token_ids == hf_greedy(hf, prompt, p.max_tokens)
        assert max(abs(a - b) for a, b in zip(c.logprobs, e.logprobs)) < TOL


def test_the_server_loop_runs_a_v4_model(tiny):
    """The server drives add_request / step with sampled requests that come and go; stream() too."""
    _, model = tiny
    eng = ns.Engine(model, max_batch=2, max_seq_len=64)
    assert 0 < eng.kv_bytes_per_token and eng.cache.bytes_per_slot > 0
    ids = [eng.add_request(p, ns.SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=6 + i))
           for i, p in enumerate(prompts_of([12, 20, 3], seed=4))]
    finished = {}
    while eng.has_unfinished():
        for d in eng.step():
            if d.finished:
                finished[d.request_id] = d.completion
    assert sorted(finished) == sorted(ids)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 6 + i for i, c in enumerate(finished[r] for r in ids))
    streamed = [t for d in eng.stream([5, 6, 7], greedy(4)) for t in d.token_ids]
    assert len(streamed) == 4 and eng.stats()["blocks_used"] == 0


def test_a_saved_v4_folder_serves_through_load_engine(tiny, tmp_path):
    """`nanoseek serve` / `chat`'s loader (serve/app.py load_engine: the folder, its tokenizer, the decode layout)
    gives a V4 engine whose greedy text answers equal the in-memory model's."""
    from nanoseek.serve.app import load_engine
    _, model = tiny
    tok = ns.Tokenizer.train(["The quick brown fox jumps over the lazy dog. 1234567890\n"] * 20, vocab_size=300,
                             progress=False)
    ns.save(model, tmp_path / "v4", tokenizer=tok)
    eng, tok = load_engine(str(tmp_path / "v4"), max_batch=2, max_seq_len=64, device="cpu")
    prompt = "The quick brown fox jumps over the lazy dog."
    served = eng.generate([prompt, prompt + " 123"], greedy(6))
    direct = ns.Engine(model, tok, max_seq_len=64).generate([prompt, prompt + " 123"], greedy(6))
    assert [c.token_ids for c in served] == [c.token_ids for c in direct]
    assert all(len(c.token_ids) == 6 and isinstance(c.text, str) for c in served)


def test_an_engine_on_a_cache_that_forgets_gives_other_tokens(tiny):
    """The engine comparison can fail: the same engine over a cache that forgets the compressors' pending tokens."""
    hf, model = tiny
    prompts = prompts_of([30, 41], seed=5)
    ref = [hf_greedy(hf, p, 12) for p in prompts]
    eng = ns.Engine(model, max_seq_len=96)
    assert [c.token_ids for c in eng.generate(prompts, greedy(12))] == ref
    eng.cache = ForgetsPending(model.cfg, eng.cache.pool.capacity, eng.cache.max_len)
    eng.pool = eng.cache.pool
    assert [c.token_ids for c in eng.generate(prompts, greedy(12))] != ref
