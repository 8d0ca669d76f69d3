"""`nanoseek info`: parameter counts and KV-cache cost of a preset or a model folder (reads shapes only)."""

from __future__ import annotations

from .config import PRESETS, ModelConfig


def add_arguments(p):
    p.add_argument("what", nargs="?", default="cpu", help=f"a preset ({', '.join(PRESETS)}) or a model folder")


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


def main(args) -> int:
    from pathlib import Path

    if Path(args.what).is_dir():
        from .checkpoint import read_config
        cfg, name = read_config(args.what), args.what
    else:
        cfg, name = ModelConfig.preset(args.what), args.what
    print(summary(cfg, name))
    return 0
