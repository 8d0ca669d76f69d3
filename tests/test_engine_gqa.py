"""The engine on grouped-query attention (the dense students: qwen2, llama, qwen3), specified against transformers.

The paged K/V cache is first checked alone, against plain causal attention over whole sequences; then the engine's
greedy tokens are compared with transformers' greedy `generate` on random tiny checkpoints of each family (float32),
token for token, for single prompts and for a continuously batched, chunked, prefix-sharing workload.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch
import torch.nn.functional as F

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
