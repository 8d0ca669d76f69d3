"""`nanoseek info`: parameter counts and KV-cache cost of a preset or a model folder (reads shapes only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .config import PRESETS, ModelConfig
from .errors import UsageError


@dataclass
class InfoConfig:
    what: str = "cpu"               # a preset name (cpu, v3, qwen-7b, ...) or a model folder
    POSITIONAL: ClassVar[tuple] = ("what",)   # `nanoseek info v3` as well as `--what v3`


CONFIG = InfoConfig


def summary(cfg: ModelConfig, name: str = "") -> str:
    n = cfg.num_params()
    L = cfg.num_hidden_layers
    if cfg.attention == "gqa":
        shape = (f"{cfg.num_attention_heads} query heads over {cfg.num_key_value_heads} key/value heads (GQA), "
                 f"head_dim {cfg.head_dim}, dense SwiGLU MLP")
    else:
        shape = (f"{cfg.num_attention_heads} heads (MLA), {cfg.n_routed_experts or 0} routed + "
                 f"{cfg.n_shared_experts or 0} shared experts, top-{cfg.num_experts_per_tok}")
    lines = [
        f"model {name} ({cfg.model_type}): {L} layers, hidden {cfg.hidden_size}, {shape}",
        f"  parameters: {n['total'] / 1e6:,.2f}M total, {n['activated'] / 1e6:,.2f}M activated per token"
        + (f" (+ {cfg.num_nextn_predict_layers} MTP layer)" if cfg.num_nextn_predict_layers else ""),
        *cache_lines(cfg),
    ]
    return "\n".join(lines)


def cache_lines(cfg: ModelConfig) -> list[str]:
    """The KV cache one token costs, all layers, next to the other attention's: MLA's latent (kv_lora_rank +
    qk_rope_head_dim per layer, + the indexer key with DSA) vs GQA's keys and values (2 x num_key_value_heads x head_dim per layer)."""
    L = cfg.num_hidden_layers
    own, mha = cfg.kv_cache_elems_per_token * L, cfg.mha_cache_elems_per_token * L
    kb = 2 / 1024  # bf16 bytes per element, in KiB
    if cfg.attention == "mla" and cfg.dsa:
        return [f"  KV cache per token: MLA latent + DSA indexer key {own:,} elements ({cfg.kv_lora_rank} + "
                f"{cfg.qk_rope_head_dim} + {cfg.index_head_dim} per layer, {own * kb:,.1f} KiB in bf16) vs {mha:,} for "
                f"MHA with the same heads ({mha / own:.1f}x smaller)",
                f"  DeepSeek Sparse Attention: each query attends to the top {cfg.index_topk:,} tokens chosen by a "
                f"lightning indexer of {cfg.index_n_heads} heads x {cfg.index_head_dim}"]
    if cfg.attention == "mla":
        return [f"  KV cache per token: MLA latent {own:,} elements ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} per "
                f"layer, {own * kb:,.1f} KiB in bf16) vs {mha:,} for MHA with the same heads ({mha / own:.1f}x "
                f"smaller)"]
    v3 = PRESETS["v3"]
    latent = (v3["kv_lora_rank"] + v3["qk_rope_head_dim"]) * L
    return [f"  KV cache per token: GQA keys + values {own:,} elements (2 x {cfg.num_key_value_heads} kv heads x "
            f"{cfg.head_dim} per layer, {own * kb:,.1f} KiB in bf16); MHA with the same heads: {mha:,}",
            f"  for comparison, an MLA latent of V3's width ({v3['kv_lora_rank']} + {v3['qk_rope_head_dim']} per "
            f"layer) over these {L} layers: {latent:,} elements ({own / latent:.1f}x smaller than this GQA cache)"]


def resolve(what: str) -> ModelConfig:
    """A preset name or a model folder -> its ModelConfig; anything else is one clear UsageError."""
    if Path(what).is_dir():
        from .checkpoint import read_config

        return read_config(what)
    if what in PRESETS:
        return ModelConfig.preset(what)
    presets = ", ".join(PRESETS)
    if any(sep in what for sep in ("/", "\\")) or Path(what).exists():
        why = "not a folder" if Path(what).exists() else "no such folder"
        raise UsageError(f"{what} is neither a preset nor a model folder ({why}); pass a folder with a config.json, "
                         f"or a preset: {presets}")
    raise UsageError(f"unknown preset {what!r}; presets: {presets} (or pass a model folder)")


def main(cfg: InfoConfig) -> int:
    print(summary(resolve(cfg.what), cfg.what))
    return 0
