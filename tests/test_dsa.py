"""DeepSeek Sparse Attention (DeepSeek-V3.2), specified against transformers' DeepseekV32ForCausalLM.

The reference models are random and tiny, and their sequences are longer than index_topk, so the indexer's
selection decides which tokens each query attends to. Two things make the comparison meaningful:
* weights drawn so that the selection is not degenerate: the indexer key's LayerNorm bias is redrawn small and
  centred (conftest draws norm vectors in [0.5, 1.5], which gives every key one large shared component, so a query's
  ReLU(q . k) is zero for almost every token and the top-k is a tie among zeros);
* no near-ties at the top-k boundary: `boundary_gap` is checked for every model and sequence used below. Float32
  differences between the implementations are ~1e-6 relative; a gap above 1e-4 means the two pick the same set.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from conftest import TINY_HF, YARN, randomize_, rel_err

import nanoseek as ns
import nanoseek.model.mla as mla_module
from nanoseek.infer.cache import LatentCache, PagedDSACache
from nanoseek.model.dsa import DSA, indexer_kl, kept_mass
from nanoseek.model.weights import ours_to_hf

TOL = 1e-5       # float32, relative: the acceptance bound
MIN_GAP = 1e-4   # relative gap between the k-th and (k+1)-th indexer score of every query with more than k tokens
DSA_HF = dict(index_n_heads=8, index_head_dim=16, index_topk=5)


def make_hf_v32(seed=0, rope=None, **cfg):
    """A random transformers DeepseekV32ForCausalLM (eval, float32) on conftest's tiny shapes plus an indexer."""
    kw = {**TINY_HF, **DSA_HF, **cfg}
    kw["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": 10000.0, **rope} if rope
                             else {"rope_type": "default", "rope_theta": 10000.0})
    hf = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**kw)).float().eval()
    g = randomize_(hf, seed, scale=0.3)
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                t.normal_(0.0, 0.5, generator=g)
            elif name.endswith("indexer.k_norm.bias"):
                t.normal_(0.0, 0.1, generator=g)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def records_of(model, ids, sparse=True):
    recs = []
    with torch.no_grad():
        logits = model(ids, dsa=DSA(sparse=sparse, records=recs))
    return logits, recs


def boundary_gap(recs, k) -> float:
    """Smallest relative gap between the k-th and (k+1)-th indexer score over every layer and every query that
    sees more than k tokens (inf when none does)."""
    gaps = []
    for r in recs:
        s = r.index_scores
        rows = torch.isfinite(s).sum(-1) > k
        if rows.any():
            top = s[rows].topk(k + 1, dim=-1).values
            gaps.append(((top[:, k - 1] - top[:, k]) / top[:, :k].abs().amax(-1).clamp_min(1e-6)).min())
    return min(gaps).item() if gaps else float("inf")


def hf_selections(hf, ids):
    """transformers' top-k indices per layer (B, T, k), hooked from each indexer's output."""
    out = []
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, a, kw, o: out.append(o), with_kwargs=True)
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            logits = hf(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, out


@pytest.fixture(scope="module", params=["plain", "yarn"])
def pair(request, tmp_path_factory):
    """(transformers model, the same folder loaded by ns.load)."""
    hf = make_hf_v32(seed=1, rope=YARN if request.param == "yarn" else None)
    folder = tmp_path_factory.mktemp(f"v32-{request.param}")
    hf.save_pretrained(folder)
    return hf, ns.load(folder)


def ids_of(B, T, vocab=TINY_HF["vocab_size"], seed=0):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_and_selected_sets_equal_transformers(pair):
    hf, model = pair
    ids = ids_of(2, 24)
    k = model.cfg.index_topk
    assert ids.shape[1] > 4 * k                                  # most queries choose among many more than k
    ours, recs = records_of(model, ids)
    assert boundary_gap(recs, k) > MIN_GAP, "this seed has a near-tie at the top-k boundary: pick another"
    ref, hf_sel = hf_selections(hf, ids)
    assert rel_err(ours, ref) < TOL
    for r, idx in zip(recs, hf_sel):                             # the same tokens, query by query, in every layer
        theirs = torch.zeros_like(r.selected).scatter(-1, idx.long(), True) & torch.isfinite(r.index_scores)
        assert torch.equal(r.selected, theirs)
    assert (torch.stack([r.selected.sum(-1) for r in recs]) <= k).all()


def test_comparison_fails_without_the_selection_or_with_top_k_off_by_one(pair):
    """Negative controls: dense attention, or one token more per query, changes the logits far beyond TOL."""
    hf, model = pair
    ids = ids_of(2, 24)
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model(ids, dsa=DSA(sparse=False)), ref) > 100 * TOL
        for layer in model.layers:
            layer.self_attn.indexer.topk += 1
        try:
            assert rel_err(model(ids), ref) > 100 * TOL
        finally:
            for layer in model.layers:
                layer.self_attn.indexer.topk -= 1
        assert rel_err(model(ids), ref) < TOL


@pytest.mark.parametrize("gather", [True, False], ids=["gather-selected", "selection-mask"])
def test_absorbed_path_equals_full_path(pair, gather, monkeypatch):
    """Decoding through LatentCache (prefill chunks, then tokens) gives the full path's logits, whether attention
    reads only the selected latents or all of them under a selection mask."""
    monkeypatch.setattr(mla_module, "gather_selected", lambda T, S, k: gather)
    _, model = pair
    ids = ids_of(2, 24, seed=3)
    full, recs = records_of(model, ids)
    assert boundary_gap(recs, model.cfg.index_topk) > MIN_GAP
    cache, outs, start = LatentCache(model.cfg, batch=2, max_len=24), [], 0
    with torch.no_grad():
        for n in [3, 7, 1, 6] + [1] * 7:
            pos = torch.arange(start, start + n).expand(2, n)
            outs.append(model(ids[:, start:start + n], positions=pos, cache=cache))
            cache.advance()
            start += n
    assert rel_err(torch.cat(outs, 1), full) < TOL


def test_folder_round_trips_through_transformers(pair, tmp_path):
    hf, model = pair
    ns.save(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "DeepseekV32ForCausalLM"
    names = {n for n, _ in ours_to_hf(model)}
    assert {"model.layers.1.self_attn.indexer.k_norm.bias", "model.layers.1.self_attn.indexer.wq_b.weight"} <= names
    ids = ids_of(1, 20, seed=3)
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) < TOL
    again = ns.load(tmp_path / "out")
    assert again.cfg.dsa and (again.cfg.index_n_heads, again.cfg.index_head_dim, again.cfg.index_topk) == (8, 16, 5)


def test_v32_preset_counts_the_published_parameters():
    """DeepSeek-V3.2-Exp's config.json: V3's shapes (671B main model, 37B activated; 685B in the published
    safetensors, which add the MTP layer and its copies of the embedding and head) plus 61 indexers of 64 heads x
    128 (wq_b 1536 x 8192, wk 7168 x 128, weights_proj 7168 x 64, LayerNorm): 0.85B more."""
    cfg = ns.ModelConfig.preset("v3.2")
    v3 = ns.ModelConfig.preset("v3").num_params()
    n = cfg.num_params()
    indexers = 61 * (1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64)
    assert n["total"] - v3["total"] == indexers == 851_524_864
    assert abs(n["total"] / 671e9 - 1) < 0.01 and abs(n["activated"] / 37e9 - 1) < 0.03
    with_mtp = cfg.num_params(include_mtp=True)["total"] + 2 * cfg.vocab_size * cfg.hidden_size  # + MTP's copies
    assert abs(with_mtp / 685e9 - 1) < 0.01
    assert cfg.kv_cache_elems_per_token == 512 + 64 + 128
    d = cfg.to_hf()
    assert (d["model_type"], d["architectures"], d["index_topk"]) == ("deepseek_v32", ["DeepseekV32ForCausalLM"], 2048)
    assert "index_topk" not in ns.ModelConfig.preset("v3").to_hf()


def test_config_refuses_what_v32_does_not_have():
    with pytest.raises(ValueError, match="q_lora_rank"):
        ns.ModelConfig.preset("tiny-v3.2", q_lora_rank=None)
    with pytest.raises(ValueError, match="rope_interleave"):
        ns.ModelConfig.preset("tiny-v3.2", rope_interleave=False)
    hf = ns.ModelConfig.preset("tiny-v3.2").to_hf()
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ns.ModelConfig.from_hf({**hf, "mlp_layer_types": ["sparse", "sparse"]})


def test_training_hooks_give_the_indexer_its_own_loss():
    """records: per layer, indexer scores with gradient into the indexer only, the dense attention summed over heads
    (rows sum to 1) and the selection; indexer_kl is >= 0 and trains the indexer alone; kept_mass is 1 when every
    visible token is selected."""
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny-v3.2", index_topk=6, initializer_range=0.2))
    ids = ids_of(2, 16, vocab=512)
    recs = []
    model(ids, dsa=DSA(sparse=False, records=recs))
    assert [r.layer for r in recs] == [0, 1] and recs[0].index_scores.shape == (2, 16, 16)
    assert torch.allclose(recs[0].attention.sum(-1), torch.ones(2, 16))
    assert not recs[0].attention.requires_grad and recs[0].index_scores.requires_grad
    assert (recs[0].attention.triu(1) == 0).all() and 0 < kept_mass(recs).item() < 1
    loss = indexer_kl(recs, sparse=False)
    assert loss.item() > 0
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad)
    sparse = []
    out = model.losses(ids, ids, dsa=DSA(sparse=True, records=sparse))
    assert torch.isfinite(out["loss"]) and indexer_kl(sparse, sparse=True).item() >= 0
    assert all((r.attention * ~r.selected).sum() == 0 for r in sparse)        # sparse attention stays in the set
    everything = []
    model(ids[:, :6], dsa=DSA(sparse=False, records=everything))
    assert abs(kept_mass(everything).item() - 1) < 1e-6


# ------------------------------------------------------------------------------------------------ engine
def greedy(n=12):
    return ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def hf_greedy(hf, prompt, n=12):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(transformers model, ns.load of it, prompts, transformers' greedy tokens); the gap is checked over each
    whole generated sequence, which the engine's decode steps select from."""
    hf = make_hf_v32(seed=6, rope=YARN)
    folder = tmp_path_factory.mktemp("v32-served")
    hf.save_pretrained(folder)
    model = ns.load(folder)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (3, 14, 9, 21, 6)]
    expected = [hf_greedy(hf, p) for p in prompts]
    for p, e in zip(prompts, expected):
        _, recs = records_of(model, torch.tensor([p + e]))
        assert boundary_gap(recs, model.cfg.index_topk) > MIN_GAP
    return hf, model, prompts, expected


def test_engine_greedy_equals_transformers_single_and_batched(served):
    hf, model, prompts, expected = served
    eng = ns.Engine(model, block_size=4)
    assert isinstance(eng.cache, PagedDSACache)
    for p, e in zip(prompts[:3], expected):
        assert eng.generate([p], greedy())[0].token_ids == e
    eng = ns.Engine(model, max_batch=3, block_size=4)
    eng.prefill_tokens = 8                       # chunked prefill: chunks of 4-8 tokens, longer than index_topk
    arrivals, ids, done, step = {0: 2, 2: 1, 3: 1, 5: 1}, [], {}, 0
    while len(done) < len(prompts):
        for _ in range(arrivals.get(step, 0)):
            ids.append(eng.add_request(prompts[len(ids)], greedy()))
        done.update({d.request_id: d.completion for d in eng.step() if d.finished})
        step += 1
    assert [done[r].token_ids for r in ids] == expected
    assert eng.stats()["blocks_used"] == 0


def test_engine_reuses_prefixes_and_reads_only_the_selected_latents(served, monkeypatch):
    """A prompt sharing full blocks with an earlier one reads their latents and indexer keys from the prefix cache
    and still decodes transformers' tokens; a decode step gathers index_topk latents per layer whatever the
    context, and the cache per token is the latent plus the indexer key."""
    hf, model, prompts, expected = served
    cfg = model.cfg
    eng = ns.Engine(model, block_size=4)
    assert eng.kv_bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim +
                                                              cfg.index_head_dim) * 4
    eng.generate([prompts[3]], greedy())
    reads = []
    real = PagedDSACache.update_selected

    def spy(self, layer, c_kv, k_pe, positions):
        out = real(self, layer, c_kv, k_pe, positions)
        reads.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(PagedDSACache, "update_selected", spy)
    again = eng.generate([prompts[3]], greedy())[0]
    assert again.cached_tokens == 20 and again.token_ids == expected[3]
    assert reads and set(reads) == {(1, 1, cfg.index_topk, cfg.kv_lora_rank)}


def test_engine_with_sparse_off_is_dense_mla_on_the_same_weights(served):
    """Engine(sparse=False), bench/dsa.py's baseline: every decode query attends to every cached token, so its
    greedy tokens are a dense full forward's (DSA(sparse=False)), not the sparse engine's (which are transformers')."""
    _, model, prompts, expected = served
    for p, e in zip(prompts[3:], expected[3:]):           # prompts longer than index_topk: selection matters
        dense = ns.Engine(model, block_size=4, sparse=False).generate([p], greedy())[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([p + dense]), dsa=DSA(sparse=False))
        assert logits[0, len(p) - 1:-1].argmax(-1).tolist() == dense
        assert dense != e


def test_info_shows_the_indexer_key_in_the_cache_per_token():
    from nanoseek.info import summary

    text = summary(ns.ModelConfig.preset("v3.2"), "v3.2")
    assert "indexer key" in text and f"{61 * 704:,}" in text


def test_top_k_orders_like_the_scores_and_gives_ties_to_the_later_token():
    from nanoseek.model.dsa import top_k

    scores = torch.tensor([[[0.5, 0.0, -0.0, -2.0, 0.0, 3.0, -1.5, float("nan")]]])
    visible = torch.tensor([[[True] * 7 + [False]]])
    positions, valid = top_k(scores, visible, 5)
    assert positions.tolist() == [[[5, 0, 4, 2, 1]]] and valid.all()      # 0.0 and -0.0 tie: latest first
    positions, valid = top_k(scores, visible & (torch.arange(8) < 2), 3)
    assert positions[0, 0, :2].tolist() == [0, 1] and valid.tolist() == [[[True, True, False]]]


def test_tied_selections_are_the_same_on_every_path():
    """An untrained indexer ties often (ReLU zeros at the top-k boundary); decoding token by token, chunked
    prefill, MTP verification and one full forward still select alike, so their greedy tokens agree."""
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny-v3.2", initializer_range=0.2)).eval()
    prompt = list(range(3, 40))
    plain = ns.Engine(model, block_size=4, mtp=False).generate([prompt], greedy(20))[0].token_ids
    _, recs = records_of(model, torch.tensor([prompt + plain]))
    assert boundary_gap(recs, model.cfg.index_topk) == 0.0                # there are exact ties to break
    with torch.no_grad():
        assert model(torch.tensor([prompt + plain]))[0, len(prompt) - 1:-1].argmax(-1).tolist() == plain
    spec = ns.Engine(model, block_size=4, mtp=True)
    spec.prefill_tokens = 8
    assert spec.generate([prompt], greedy(20))[0].token_ids == plain and spec.stats()["mtp_drafts"] > 0
