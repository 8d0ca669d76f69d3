"""DeepSeek-V4 (model/v4.py), specified against transformers' DeepseekV4ForCausalLM (float32, CPU).

The "tiny-v4" preset has every layer type (sliding window only, CSA, HCA), both routings (hash, learned top-k),
hc_mult 2, a window of 8, compression 4 (CSA) and 8 (HCA) and index_topk 3: a 40-token sequence runs past the
window, gives CSA 10 entries to choose 3 from and HCA 5. Weights are drawn with std 0.15-0.3 (not 0.02), so that
the attention, the sinks, the stream mixing and the routing all move the logits. Tolerance 1e-5 relative to the
largest logit: both sides compute in float32 in the same order of operations, up to matmul blocking (~1e-7 seen).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import v4_pair  # noqa: E402

import nanoseek as ns  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402

TOL = 1e-5


random_pair = v4_pair


def rel_err(hf, ours, ids) -> float:
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    return ((a - b).abs().max() / a.abs().max()).item()


IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "tiny-v4": {},
    # three streams, a window of 5, other rates, more entries kept, sigmoid scores
    "hc3-window5": dict(hc_mult=3, sliding_window=5, index_topk=5, scoring_func="sigmoid",
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}),
    # YaRN on the compressed layers' rope, as published (scaled down), and hash routing in two layers
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32,
                               "beta_slow": 1}, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    hf, ours = random_pair(**CONFIGS[name])
    cfg = ours.cfg
    assert IDS.shape[1] > cfg.sliding_window
    assert IDS.shape[1] // cfg.compress_rates["compressed_sparse_attention"] > cfg.index_topk
    assert set(cfg.layer_types) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert set(cfg.mlp_layer_types) == {"hash_moe", "moe"} and cfg.hc_mult > 1
    assert rel_err(hf, ours, IDS) < TOL


def test_negative_controls_fail_the_comparison():
    """Each mechanism matters at these weights: breaking it on our side alone moves the logits far beyond TOL."""
    hf, ours = random_pair()
    assert rel_err(hf, ours, IDS) < TOL
    hcs = [m for m in ours.modules() if type(m).__name__ == "HyperConnection"]
    for m in hcs:
        m.iters = 1                                     # Sinkhorn: one column normalisation only
    assert rel_err(hf, ours, IDS) > 100 * TOL
    for m in hcs:
        m.iters = ours.cfg.hc_sinkhorn_iters
    for block in ours.layers:
        block.self_attn.window += 1                     # one more raw key per query
    assert rel_err(hf, ours, IDS) > 100 * TOL
    for block in ours.layers:
        block.self_attn.window -= 1
    saved = [b.self_attn.sinks.detach().clone() for b in ours.layers]
    with torch.no_grad():
        for b in ours.layers:
            b.self_attn.sinks.zero_()                   # sinks at 0: still a sink, other weights
    assert rel_err(hf, ours, IDS) > 100 * TOL
    with torch.no_grad():
        for b, s in zip(ours.layers, saved):
            b.self_attn.sinks.copy_(s)
    assert rel_err(hf, ours, IDS) < TOL


def test_folder_round_trip_with_transformers(tmp_path):
    """transformers' folder (published tensor names) loads into ours; ours saves a folder transformers loads."""
    hf, ours = random_pair()
    hf.save_pretrained(tmp_path / "hf")
    loaded = ns.load(tmp_path / "hf")
    assert loaded.cfg.layer_types == ours.cfg.layer_types
    assert rel_err(hf, loaded, IDS) < TOL
    ns.save(loaded, tmp_path / "ours")
    back = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, hf(IDS).logits)
    assert rel_err(back, ns.load(tmp_path / "ours"), IDS) < TOL


def test_config_round_trips_through_transformers():
    cfg = ModelConfig.preset("v4-flash")
    hf_cfg = transformers.DeepseekV4Config(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    back = ModelConfig.from_hf(hf_cfg.to_dict())
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "qk_rope_head_dim", "rope_scaling",
              "compress_rope_theta", "o_groups", "o_lora_rank", "index_topk", "sliding_window", "hc_mult"):
        assert getattr(back, k) == getattr(cfg, k), k
    assert hf_cfg.rope_parameters["compress"]["rope_type"] == "yarn"


@pytest.mark.parametrize("name,total,active", [("v4-flash", 284e9, 13e9), ("v4-pro", 1.6e12, 49e9)])
def test_preset_sizes_match_the_published_counts(name, total, active):
    """Published: V4-Flash 284B total / 13B active, V4-Pro 1.6T / 49B (model cards). Ours, without the MTP module:
    284.3B / 13.27B and 1.573T / 48.8B; the published figures carry two or three significant digits, and ours
    round to them."""
    n = ModelConfig.preset(name).num_params()
    digits = 3 if total == 284e9 else 2
    assert float(f"{n['total']:.{digits}g}") == total
    assert float(f"{n['activated']:.2g}") == active


def test_v4_pro_schedule_and_weight_count_match_the_published_checkpoint():
    """V4-Pro's config.json: compress_ratios [128, 128] + [4, 128] * 29 + [4] (HCA on layers 0-1, then CSA on the
    even layers); its tensor listing holds 1,598,837,347,742 weights (861.6B stored elements, FP4 experts packed two
    per byte, scales and tid2eid left out), which is num_params with the MTP module. transformers' default schedule
    (CSA on the odd layers) gives another count: the check can fail."""
    cfg = ModelConfig.preset("v4-pro")
    rates = [128 if t == "heavily_compressed_attention" else 4 for t in cfg.layer_types]
    assert rates == [128, 128] + [4, 128] * 29 + [4]
    assert cfg.num_params(include_mtp=True)["total"] == 1_598_837_347_742
    other = ModelConfig.preset("v4-pro", layer_types=None)
    assert other.num_params(include_mtp=True)["total"] != 1_598_837_347_742
