"""`nanoseek info` for DeepSeek-V4: the KV cache per token and at 1M context next to V3's and V3.2's, decode FLOPs,
DeepSeek's reported ratios beside ours, and a meta-device build that counts the published models without memory."""

import pytest

from nanoseek import info
from nanoseek.config import ModelConfig
from nanoseek.options import make_config


def test_cache_bytes_by_hand_on_a_small_v4():
    # tiny-v4: layers window-only, CSA (4:1), HCA (8:1), CSA; window 8; head_dim 32 of which 8 RoPE; indexer key 16
    cfg = ModelConfig.preset("tiny-v4")
    entry_fp8, entry_bf16 = 24 * 1 + 8 * 2, 32 * 2
    window = 4 * 8                                     # every layer keeps its last 8 entries
    assert info.cache_bytes(cfg, 40) == window * entry_fp8 + 2 * 10 * (entry_fp8 + 16) + 5 * entry_fp8 == 2600
    assert info.cache_bytes(cfg, 40, fp8=False) == window * entry_bf16 + 2 * 10 * (entry_bf16 + 32) + 5 * entry_bf16
    assert info.cache_bytes(cfg, 5) == 4 * 5 * entry_fp8 + 2 * 1 * (entry_fp8 + 16)   # (shorter than the window)


@pytest.mark.parametrize("name", ["tiny-v4", "v4-flash", "v4-pro", "v3", "v3.2", "qwen-7b"])
def test_one_account_of_the_cache_per_token(name):
    """config.py's kv_cache_elems_per_token (x layers) is what info.cache_bytes grows by per token in BF16, and what
    the engine's cache reports (V4Cache; the paged caches for MLA / GQA), in the long run."""
    from nanoseek.infer.cache import paged_cache_class
    from nanoseek.infer.v4_cache import V4Cache
    cfg = ModelConfig.preset(name)
    L, per = cfg.num_hidden_layers, cfg.kv_cache_elems_per_token
    n = 8 * 128 * 1024                                         # a multiple of every compress rate
    assert info.cache_bytes(cfg, 2 * n, fp8=False) - info.cache_bytes(cfg, n, fp8=False) == n * L * per * 2
    if cfg.attention == "hybrid":
        csa = cfg.layer_types.count("compressed_sparse_attention")
        hca = cfg.layer_types.count("heavily_compressed_attention")
        rates = cfg.compress_rates
        by_hand = (csa * (cfg.head_dim + cfg.index_head_dim) / rates["compressed_sparse_attention"]
                   + hca * cfg.head_dim / rates["heavily_compressed_attention"])
        assert L * per == by_hand
        if name == "tiny-v4":      # the cache itself (a real one is cheap only at this size)
            assert V4Cache(cfg, num_slots=1, max_len=64).bytes_per_token == 4 * L * per
    else:
        assert paged_cache_class(cfg).elems_per_token(cfg) == per
        assert isinstance(per, int)


def test_v4_flash_caches_what_deepseek_v4_describes_per_token():
    """V4-Flash: 21 CSA layers (a 512 entry + a 128 indexer key per 4 tokens), 20 HCA (512 per 128), 2 window-only."""
    cfg = ModelConfig.preset("v4-flash")
    kinds = [cfg.layer_types.count(k) for k in ("compressed_sparse_attention", "heavily_compressed_attention")]
    assert cfg.num_hidden_layers * cfg.kv_cache_elems_per_token == kinds[0] * 640 // 4 + kinds[1] * 512 // 128
    v3 = ModelConfig.preset("v3")                            # a tenth of V3's per token (576 x 61 = 35,136)
    assert cfg.num_hidden_layers * cfg.kv_cache_elems_per_token < v3.num_hidden_layers * v3.kv_cache_elems_per_token / 10


def test_v3_and_v32_caches_are_one_latent_per_token_and_layer():
    v3, v32 = ModelConfig.preset("v3"), ModelConfig.preset("v3.2")
    assert info.cache_bytes(v3, 1) == 61 * (512 * 1 + 64 * 2) == 39_040          # FP8 latent, BF16 RoPE dims
    assert info.cache_bytes(v32, 1) == 61 * (512 + 64 * 2 + 128) == 46_848       # + the indexer key in FP8
    assert info.cache_bytes(v3, 1, fp8=False) == 61 * 576 * 2


def test_v4_pro_at_1m_is_near_deepseeks_reported_ratios():
    pro, v32 = ModelConfig.preset("v4-pro"), ModelConfig.preset("v3.2")
    kv = info.cache_bytes(pro, info.MILLION) / info.cache_bytes(v32, info.MILLION)
    flops = info.decode_flops(pro, info.MILLION) / info.decode_flops(v32, info.MILLION)
    paper_kv, paper_flops = info.DEEPSEEK_V4_PRO_VS_V32
    # DeepSeek reports ~10% and 27% (read off a figure); our count leaves out the compressors' state and the FP8
    # scales, and its FLOPs are matmuls and attention alone, so within a few points, not equal
    assert abs(kv - paper_kv) < 0.03 and abs(flops - paper_flops) < 0.05, (kv, flops)
    # the long-context cost grows with the compressed entries alone: doubling the context doubles it, less the window
    grow = info.cache_bytes(pro, 2 * info.MILLION) - info.cache_bytes(pro, info.MILLION)
    assert info.cache_bytes(pro, info.MILLION) - grow == 61 * 128 * (448 + 128)


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_the_meta_build_counts_num_params_without_memory(name):
    cfg = ModelConfig.preset(name)
    built = info.meta_build(cfg)
    assert built["params"] == cfg.num_params(include_mtp=True)["total"]
    assert built["bf16"] == 2 * built["params"]
    # FP4 experts and FP8 projections: a bit over a quarter of BF16 (the published V4-Pro folder is ~805 GiB)
    assert 0.25 < built["published"] / built["bf16"] < 0.3


def test_the_meta_build_equals_a_real_build():
    import torch

    import nanoseek as ns
    cfg = ModelConfig.preset("tiny-v4", num_nextn_predict_layers=1)
    real = ns.Transformer(cfg)
    biases = sum(b.numel() for n, b in real.named_buffers() if n.endswith("e_score_correction_bias"))
    assert info.meta_build(cfg)["params"] == sum(p.numel() for p in real.parameters()) + biases > 0
    assert all(p.device == torch.device("cpu") for p in real.parameters())


def test_info_v4_pro_prints_the_comparison(capsys):
    assert info.main(make_config(info.CONFIG, what="v4-pro")) == 0
    out = capsys.readouterr().out
    pro, v3, v32 = (ModelConfig.preset(n) for n in ("v4-pro", "v3", "v3.2"))
    for label, c in (("V3 ", v3), ("V3.2 ", v32), ("v4-pro ", pro)):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert f"{info.cache_bytes(c, info.MILLION) / 1e9:,.2f} GB" in row, row
        per_token = info.cache_bytes(c, 2 * info.MILLION) - info.cache_bytes(c, info.MILLION)
        assert f"{per_token / info.MILLION:,.0f} B/t" in row, row
    assert "DeepSeek reports V4-Pro at 10% and 27%" in out
    assert f"{info.meta_build(pro)['params']:,} parameters" in out
    assert f"{pro.num_params()['total'] / 1e9:,.2f}B total" in out
