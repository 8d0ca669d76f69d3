"""The engine on grouped-query attention (the dense students: qwen2, llama, qwen3), specified against transformers.

The paged K/V cache is first checked alone, against plain causal attention over whole sequences; then the engine's
greedy tokens are compared with transformers' greedy `generate` on random tiny checkpoints of each family (float32),
token for token, for single prompts and for a continuously batched, chunked, prefix-sharing workload.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

import nanoseek as ns
from nanoseek.infer.cache import KVCache, PagedKVCache


def gqa_attention(q, k, v, mask=None):
    """q (B, T, H, d), k/v (B, S, n_kv, d) -> (B, T, H, d): each kv head serves H / n_kv consecutive query heads."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2).transpose(1, 2) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                         is_causal=mask is None and q.shape[1] > 1)
    return out.transpose(1, 2)


def _chunk_schedule(lengths, rng):
    """Per step, the rows still running and how many new tokens each runs (a prefill chunk or a decode token)."""
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths)):
        rows = [i for i, (d, n) in enumerate(zip(done, lengths)) if d < n]
        lens = [min(rng.randint(1, 5), lengths[i] - done[i]) for i in rows]
        steps.append([(i, done[i], n) for i, n in zip(rows, lens)])
        for i, n in zip(rows, lens):
            done[i] += n
    return steps


def test_paged_kv_attention_equals_attention_over_whole_sequences():
    """Three sequences of different lengths go through PagedKVCache in chunks of 1-5 tokens (rows of one step
    right-padded to the longest), their blocks handed out in shuffled order, two layers with different K/V. Grouped
    attention (4 query heads on 2 kv heads) through cache.update equals causal attention over each whole sequence,
    and each layer's pool holds that layer's K and V at the slots of the block table."""
    cfg = SimpleNamespace(num_key_value_heads=2, head_dim=8)
    H, d, bs, lengths = 4, 8, 4, [6, 13, 9]
    g = torch.Generator().manual_seed(0)
    seqs = [[torch.randn(n, *shape, generator=g) for shape in ((H, d), (2, d), (2, d))] for n in lengths]
    cache = PagedKVCache(cfg, num_layers=2, num_blocks=12, block_size=bs, dtype=torch.float32, device="cpu")
    blocks = [cache.pool.allocate() for _ in range(11)]
    random.Random(1).shuffle(blocks)
    tables, got = [], [[torch.zeros(n, H, d) for n in lengths] for _ in range(2)]
    for n in lengths:
        tables.append([blocks.pop() for _ in range(-(-n // bs))])
    for step in _chunk_schedule(lengths, random.Random(2)):
        rows = [i for i, _, _ in step]
        pos = cache.plan([tables[i] for i in rows], [s for _, s, _ in step], [n for _, _, n in step])
        T = pos.shape[1]
        q, k, v = (torch.stack([F.pad(seqs[i][j][s:s + n], (0, 0, 0, 0, 0, T - n)) for i, s, n in step])
                   for j in range(3))                                                     # (B, T, heads, d)
        assert pos.tolist() == [list(range(s, s + T)) for _, s, _ in step]
        for layer in range(2):
            k_all, v_all, mask = cache.update(layer, k * (layer + 1), v - layer)
            out = gqa_attention(q, k_all, v_all, mask)
            for b, (i, s, n) in enumerate(step):
                got[layer][i][s:s + n] = out[b, :n]
    for layer in range(2):
        for (q, k, v), out, table in zip(seqs, got[layer], tables):
            ref = gqa_attention(q[None], k[None] * (layer + 1), v[None] - layer)[0]
            assert torch.allclose(out, ref, atol=1e-6)
            slots = torch.tensor([table[j // bs] * bs + j % bs for j in range(len(q))])
            assert torch.equal(cache.k[layer].view(-1, 2, d)[slots], k * (layer + 1))
            assert torch.equal(cache.v[layer].view(-1, 2, d)[slots], v - layer)
    assert cache.bytes_per_token == 2 * 2 * 2 * d * 4          # layers x (K + V) x n_kv_heads x head_dim x float32


def test_contiguous_kv_cache_follows_the_same_protocol():
    """KVCache (contiguous, for tests and simple generation) answers update() like the paged one."""
    cfg = SimpleNamespace(num_key_value_heads=2, head_dim=8, num_hidden_layers=1)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 9, 4, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 9, 2, 8,
                                                                                                        generator=g)
    cache, outs, start = KVCache(cfg, batch=2, max_len=9), [], 0
    for n in (4, 1, 3, 1):
        k_all, v_all, mask = cache.update(0, k[:, start:start + n], v[:, start:start + n])
        outs.append(gqa_attention(q[:, start:start + n], k_all, v_all, mask))
        cache.advance()
        start += n
    assert torch.allclose(torch.cat(outs, 1), gqa_attention(q, k, v), atol=1e-6)
    assert cache.k.shape == (1, 2, 9, 2, 8)


# ----------------------------------------------------------------------------------------- engine vs transformers
N_NEW = 12
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)        # positions beyond 16 take the scaled frequencies
# GQA ratios 2, 1 and 3; tied (qwen2) and untied embeddings; llama3 rope scaling; qwen3's head_dim (24) differs from
# hidden / heads (64 / 6) and its q/k norms; qwen2's q/k/v biases.
FAMILIES = {
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope=LLAMA3),
    "qwen3": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
}


def make_hf_dense(family: str, seed: int = 0, scale: float = 0.3, rope: dict | None = None, **cfg):
    """A random tiny transformers Qwen2/Llama/Qwen3 model (eval, float32), weights drawn large as in conftest (std
    `scale`, biases std 1, norms in [0.5, 1.5]) so that a wrong position, mask or cache slot changes the tokens."""
    import transformers

    classes = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[family]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_parameters={"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}, **cfg)
    model = model_cls(config_cls(**kw)).float().eval()
    randomize_(model, seed, scale)
    model.generation_config.eos_token_id = None     # pure argmax for N_NEW steps, as ignore_eos in the engine
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def dense_pair(request, tmp_path_factory):
    """(transformers model, the same folder loaded by ns.load) for one family."""
    hf = make_hf_dense(request.param, seed=5, **FAMILIES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    model = ns.load(folder)
    assert model.cfg.attention == "gqa"
    return hf, model


def hf_greedy(hf, prompt, n=N_NEW):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(n=N_NEW):
    return ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def prompts_of(lengths, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_greedy_tokens_equal_transformers_single_prompts(dense_pair):
    hf, model = dense_pair
    eng = ns.Engine(model, block_size=4)
    assert isinstance(eng.cache, PagedKVCache)
    for p in prompts_of([1, 7, 19], model.cfg.vocab_size):     # 19 + 12 positions: past llama3's original 16
        (c,) = eng.generate([p], greedy())
        assert c.token_ids == hf_greedy(hf, p)
        assert (c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("length", len(p), N_NEW)


def batched_workload(vocab):
    """Six prompts of different lengths; the second and third share a 13-token prefix."""
    p = prompts_of([5, 13, 4, 3, 2, 21, 9], vocab, seed=1)
    return [p[0], p[1] + p[2], p[1] + p[3], p[4], p[5], p[6]]


def run_staggered(eng, prompts, arrivals, check_step=None):
    """Add prompts before the steps named in `arrivals` (step -> how many) and step until all finish; returns
    the completions in prompt order."""
    ids, done, step = [], {}, 0
    while len(done) < len(prompts):
        for _ in range(arrivals.get(step, 0)):
            ids.append(eng.add_request(prompts[len(ids)], greedy()))
        for d in eng.step():
            if d.finished:
                done[d.request_id] = d.completion
        if check_step is not None:
            check_step(step, eng)
        step += 1
    return [done[rid] for rid in ids]


def test_greedy_tokens_equal_transformers_with_continuous_batching(dense_pair):
    """Six prompts join a running batch at different steps, three batch slots for six requests (some wait for a
    slot), prompts prefilled in chunks of 4-8 tokens (prefill budget 8), and the third prompt's first 12 tokens (3
    blocks) found in the prefix cache, written by the second, which is still running and shares them. Each gets
    exactly its own transformers greedy tokens."""
    hf, model = dense_pair
    prompts = batched_workload(model.cfg.vocab_size)
    eng = ns.Engine(model, max_batch=3, block_size=4)
    eng.prefill_tokens = 8
    seen = []

    def check(step, eng):
        st = eng.stats()
        seen.append((st["running"], st["waiting"]))
        if step == 2:                          # the second and third prompts hold the same three blocks
            a, b = eng.running[1:3]
            assert a.blocks[:3] == b.blocks[:3] and all(eng.pool.ref[x] == 2 for x in a.blocks[:3])

    out = run_staggered(eng, prompts, {0: 2, 2: 1, 3: 1, 6: 1, 7: 1}, check)
    for c, p in zip(out, prompts):
        assert c.token_ids == hf_greedy(hf, p)
    assert [c.cached_tokens for c in out] == [0, 0, 12, 0, 0, 0]
    assert any(r == 3 and w >= 1 for r, w in seen)                        # slots full: a request waited
    st = eng.stats()
    assert st["prefill_forwards"] > 6              # the 17- and 21-token prompts took several chunks
    assert st["prefix_hit_tokens"] == 12 and st["blocks_used"] == 0


def test_kv_cache_holds_k_and_v_per_kv_head(dense_pair):
    """kv_bytes_per_token = 2 x n_kv_heads x head_dim x layers x dtype bytes; the pools hold exactly that."""
    _, model = dense_pair
    cfg = model.cfg
    L, n_kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    eng = ns.Engine(model, block_size=4, num_blocks=10)
    assert len(eng.cache.k) == len(eng.cache.v) == L
    assert all(t.shape == (10, 4, n_kv, hd) for t in eng.cache.k + eng.cache.v)
    assert eng.kv_bytes_per_token == 2 * n_kv * hd * L * 4 == L * cfg.kv_cache_elems_per_token * 4
    assert eng.stats()["kv_bytes_per_token"] == eng.kv_bytes_per_token
    pool = sum(t.numel() * t.element_size() for t in eng.cache.k + eng.cache.v)
    assert pool == 10 * 4 * eng.kv_bytes_per_token
    half = ns.Engine(copy.deepcopy(model).to(torch.bfloat16), block_size=4, num_blocks=10)
    assert half.kv_bytes_per_token == 2 * n_kv * hd * L * 2


def test_prefix_cache_reuses_full_blocks_with_identical_output(dense_pair):
    _, model = dense_pair
    eng = ns.Engine(model, block_size=4)
    p = prompts_of([23], model.cfg.vocab_size, seed=2)[0]
    first = eng.generate([p], greedy())[0]
    again = eng.generate([p], greedy())[0]
    assert first.cached_tokens == 0 and again.cached_tokens == 20   # full blocks before the last prompt token
    assert again.token_ids == first.token_ids
    other = eng.generate([p[:9] + [5, 6, 7]], greedy())[0]          # shares two full blocks
    assert other.cached_tokens == 8
    assert eng.stats()["prefix_hit_tokens"] == 28
    eng.reset_prefix_cache()
    assert eng.generate([p], greedy())[0].cached_tokens == 0
    follow = eng.generate([p + first.token_ids + [9]], greedy(4))[0]   # generated tokens fill blocks too
    assert follow.cached_tokens == 32                                 # 23 + 11 written, 8 full blocks


def test_the_comparison_catches_a_wrong_decode_position(dense_pair):
    """Negative control: decode tokens run one position too far (prefill right). RoPE is relative, so the error
    is a shifted distance between the decoded query and every cached key: the tokens must leave transformers'."""
    hf, model = dense_pair
    eng = ns.Engine(model, block_size=4)
    plan = eng.cache.plan

    def off_by_one(tables, starts, lens):
        pos = plan(tables, starts, lens)
        return pos + 1 if max(lens) == 1 else pos

    eng.cache.plan = off_by_one
    prompts = prompts_of([7, 19], model.cfg.vocab_size)
    out = eng.generate(prompts, greedy())
    assert any(c.token_ids != hf_greedy(hf, p) for c, p in zip(out, prompts))
    assert all(c.token_ids[0] == hf_greedy(hf, p, 1)[0] for c, p in zip(out, prompts))   # prefill untouched
