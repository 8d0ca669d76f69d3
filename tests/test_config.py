"""ModelConfig reads the configs people have (published DeepSeek config.json files, transformers >= 5 configs) and
writes one that both read back."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import nanoseek as ns
from nanoseek.model import MLA

# DeepSeek-V3's config.json as published (FP8 weights; `rope_scaling` + `rope_theta`, topk_method, scoring_func)
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

# DeepSeek-V2-Lite's config.json as published: q_lora_rank null, softmax greedy routing, YaRN mscale 0.707
PUBLISHED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 102400,
}

# training-time knobs and file metadata, not architecture: presets may differ from a release's config.json there
_NOT_ARCH = {"extra", "quantization_config", "torch_dtype", "aux_loss_alpha"}


def _arch(cfg: ns.ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCH}


@pytest.mark.parametrize("published,preset", [(PUBLISHED_V3, "v3"), (PUBLISHED_V2_LITE, "v2-lite")],
                         ids=["v3", "v2-lite"])
def test_published_config_reads_as_the_preset(published, preset):
    cfg = ns.ModelConfig.from_hf(published)
    assert _arch(cfg) == _arch(ns.ModelConfig.preset(preset))


def test_published_config_fields():
    v3 = ns.ModelConfig.from_hf(PUBLISHED_V3)
    assert v3.rope_scaling["type"] == "yarn" and v3.rope_scaling["factor"] == 40 and v3.rope_theta == 10000
    assert (v3.topk_method, v3.scoring_func, v3.num_nextn_predict_layers) == ("noaux_tc", "sigmoid", 1)
    assert v3.quantization_config["weight_block_size"] == [128, 128]
    assert v3.extra["ep_size"] == 1  # unknown keys are kept, and written back
    lite = ns.ModelConfig.from_hf(PUBLISHED_V2_LITE)
    assert lite.q_lora_rank is None and lite.num_nextn_predict_layers == 0
    assert ns.ModelConfig.from_hf({**PUBLISHED_V2_LITE, "q_lora_rank": 0}).q_lora_rank is None
    # a V2 config.json without routing keys gets V2's rules, not V3's
    bare = {k: v for k, v in PUBLISHED_V2_LITE.items() if k not in ("topk_method", "scoring_func", "norm_topk_prob")}
    lite2 = ns.ModelConfig.from_hf(bare)
    assert (lite2.topk_method, lite2.scoring_func, lite2.norm_topk_prob) == ("greedy", "softmax", False)


def test_transformers5_config_with_rope_parameters():
    """transformers >= 5 keeps rope_theta and the YaRN values together under rope_parameters."""
    import transformers

    yarn = dict(rope_type="yarn", rope_theta=50000.0, factor=8.0, original_max_position_embeddings=512,
                beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5)
    hf = transformers.DeepseekV3Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, q_lora_rank=None,
                                       n_routed_experts=8, n_group=2, topk_group=1, rope_parameters=yarn)
    cfg = ns.ModelConfig.from_hf(hf.to_dict())
    assert cfg.rope_theta == 50000.0 and cfg.q_lora_rank is None
    assert cfg.rope_scaling == {"type": "yarn", **{k: v for k, v in yarn.items() if k not in ("rope_type", "rope_theta")}}
    with torch.device("meta"):  # MLA owns its softmax scale (YaRN's temperature), as DeepSeek's inference code
        attn = MLA(cfg)
    assert attn.softmax_scale == pytest.approx((128 + 64) ** -0.5 * (0.1 * 0.5 * math.log(8) + 1) ** 2)
    # and what we write, transformers reads back to the same values
    back = transformers.DeepseekV3Config(**cfg.to_hf())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "q_lora_rank", "n_routed_experts", "n_group",
                "topk_group", "num_nextn_predict_layers", "rope_interleave"):
        assert getattr(back, key) == getattr(hf, key), key
    # (transformers also merges our published-style rope_scaling into rope_parameters, adding its "type" key)
    assert {k: v for k, v in back.rope_parameters.items() if k != "type"} == hf.rope_parameters


@pytest.mark.parametrize("name", list(ns.PRESETS))
def test_to_hf_round_trip(name):
    cfg = ns.ModelConfig.preset(name)
    d = cfg.to_hf()
    json.dumps(d)  # a config.json must be plain JSON
    back = ns.ModelConfig.from_hf(json.loads(json.dumps(d)))
    assert {k: v for k, v in dataclasses.asdict(back).items() if k != "extra"} == \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"}
    assert back.to_hf() == d


def test_published_config_round_trip_keeps_every_key():
    d = ns.ModelConfig.from_hf(PUBLISHED_V3).to_hf()
    for key, value in PUBLISHED_V3.items():
        if key not in ("rope_scaling", "transformers_version"):
            assert d[key] == value, key
    assert d["rope_scaling"]["factor"] == 40 and d["rope_parameters"]["rope_type"] == "yarn"


def test_bad_config_values_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="model_type='mistral'"):
        ns.ModelConfig.from_hf({**PUBLISHED_V3, "model_type": "mistral"})
    with pytest.raises(ValueError, match="topk_method"):
        ns.ModelConfig.preset("tiny", topk_method="top2")
    with pytest.raises(ValueError, match="not divisible by n_group"):
        ns.ModelConfig.preset("tiny", n_routed_experts=6, n_group=4)
    with pytest.raises(ValueError, match="rope_scaling type 'linear'"):  # silently ignoring it would be wrong
        ns.ModelConfig.from_hf({**PUBLISHED_V3, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="unknown preset"):
        ns.ModelConfig.preset("v4")
