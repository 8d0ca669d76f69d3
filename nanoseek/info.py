"""`nanoseek info`: parameter counts and KV-cache cost of a preset or a model folder (reads shapes only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .config import PRESETS, ModelConfig
from .errors import UsageError


@dataclass
class InfoConfig:
    what: str = "cpu"               # a preset name (cpu, v3, ...) or a model folder
    POSITIONAL: ClassVar[tuple] = ("what",)   # `nanoseek info v3` as well as `--what v3`


CONFIG = InfoConfig


def summary(cfg: ModelConfig, name: str = "") -> str:
    n = cfg.num_params()
    L = cfg.num_hidden_layers
    mla, mha = cfg.kv_cache_elems_per_token * L, cfg.mha_cache_elems_per_token * L
    lines = [
        f"model {name} ({cfg.model_type}): {L} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"{cfg.n_routed_experts or 0} routed + {cfg.n_shared_experts or 0} shared experts, top-{cfg.num_experts_per_tok}",
        f"  parameters: {n['total'] / 1e6:,.2f}M total, {n['activated'] / 1e6:,.2f}M activated per token"
        + (f" (+ {cfg.num_nextn_predict_layers} MTP layer)" if cfg.num_nextn_predict_layers else ""),
        f"  KV cache per token: MLA latent {mla:,} elements ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} per layer) "
        f"vs {mha:,} for MHA with the same heads ({mha / mla:.1f}x smaller)",
    ]
    return "\n".join(lines)


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
