"""`nanoseek info`: parameter counts and KV-cache cost of a preset or a model folder (reads shapes only)."""

from __future__ import annotations

import re
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
    if cfg.attention == "hybrid":
        return v4_summary(cfg, name)
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


# ------------------------------------------------------------------------------------------- DeepSeek-V4
# The cache's storage as DeepSeek-V4's report gives it: the RoPE dims of each entry in BF16, the other dims in FP8
# (e4m3), the indexer keys in FP8; the FP8 values' block scales (1 byte per 64) are not counted. vLLM and FlashMLA
# store V3 / V3.2's latent the same way, so the comparison below uses it for all three; `fp8=False` is BF16 throughout.
MILLION = 1 << 20                          # "1M context": 1,048,576 tokens
DEEPSEEK_V4_PRO_VS_V32 = (0.10, 0.27)      # DeepSeek-V4 report, Figure 1: V4-Pro at 1M / V3.2 (KV cache, FLOPs)


def _entry_bytes(nope: int, rope: int, fp8: bool) -> int:
    """One cache entry of `nope` + `rope` dims (a V4 key=value vector, an MLA latent) in bytes."""
    return nope * (1 if fp8 else 2) + rope * 2


def cache_bytes(cfg: ModelConfig, tokens: int, fp8: bool = True) -> int:
    """Bytes of KV cache one sequence of `tokens` tokens holds, all layers (not the MTP layer's): every layer's
    cache_entries (config.py) at one per `rate` tokens, their RoPE dims in BF16 and the rest in FP8 (or BF16).

    MLA (V2/V3): one latent, kv_lora_rank + qk_rope_head_dim, per token and layer, + the indexer key with DSA (V3.2).
    GQA: keys and values, 2 x num_key_value_heads x head_dim per token and layer.
    V4: a CSA layer one entry and one indexer key (index_head_dim) per compress_rate (4) tokens, an HCA layer one
    entry per 128; and every layer its window's last `sliding_window` entries (head_dim each: constant in length).
    (The compressors' partial blocks, under 2 x 4 and 128 tokens of state per layer, are left out.)"""
    total = 0
    for layer in range(cfg.num_hidden_layers):
        for rate, n, rope in cfg.cache_entries(layer):
            total += tokens // rate * _entry_bytes(n - rope, rope, fp8)
        if cfg.attention == "hybrid":
            total += min(tokens, cfg.sliding_window) * _entry_bytes(cfg.head_dim - cfg.qk_rope_head_dim,
                                                                     cfg.qk_rope_head_dim, fp8)
    return total


def decode_flops(cfg: ModelConfig, tokens: int) -> float:
    """Multiply-adds x 2 that one generated token costs at a context of `tokens`: 2 per activated parameter (MTP
    aside), plus attention's scores and weighted sums over the entries it reads (MLA absorbed: kv_lora_rank +
    qk_rope_head_dim per score, kv_lora_rank per sum; V4: head_dim each), plus the indexers' scores (index_n_heads
    x index_head_dim per key) over every key they rank. What DeepSeek plots as single-token FLOPs."""
    f = 2.0 * cfg.num_params()["activated"]
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    index = 2 * (cfg.index_n_heads or 0) * (cfg.index_head_dim or 0)       # per key ranked
    if cfg.attention == "mla":
        per_entry = 2 * H * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        read = min(tokens, cfg.index_topk) if cfg.dsa else tokens
        return f + L * (per_entry * read + (index * tokens if cfg.dsa else 0))
    if cfg.attention == "gqa":
        return f + L * 4 * H * cfg.head_dim * tokens
    per_entry = 4 * H * cfg.head_dim
    for kind in cfg.layer_types:
        read = min(tokens, cfg.sliding_window)
        if kind != "sliding_attention":
            n = tokens // cfg.compress_rates[kind]
            read += min(n, cfg.index_topk) if kind == "compressed_sparse_attention" else n
            f += index * n if kind == "compressed_sparse_attention" else 0
        f += per_entry * read
    return f


def v4_summary(cfg: ModelConfig, name: str) -> str:
    n, full = cfg.num_params(), cfg.num_params(include_mtp=True)
    kinds = {k: cfg.layer_types.count(k) for k in ("compressed_sparse_attention", "heavily_compressed_attention",
                                                    "sliding_attention")}
    rates = cfg.compress_rates
    lines = [
        f"model {name} ({cfg.model_type}): {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads over one shared key=value head (head_dim {cfg.head_dim}, "
        f"{cfg.qk_rope_head_dim} RoPE dims); every layer a {cfg.sliding_window}-token window, "
        f"{kinds['compressed_sparse_attention']} CSA ({rates['compressed_sparse_attention']}:1, top "
        f"{cfg.index_topk}) + {kinds['heavily_compressed_attention']} HCA ({rates['heavily_compressed_attention']}:1) "
        f"+ {kinds['sliding_attention']} window-only layers; {cfg.n_routed_experts} routed + "
        f"{cfg.n_shared_experts} shared experts, top-{cfg.num_experts_per_tok}, mHC x{cfg.hc_mult}",
        f"  parameters: {n['total'] / 1e9:,.2f}B total ({full['total'] / 1e9:,.2f}B with "
        f"{cfg.num_nextn_predict_layers} MTP layer), {n['activated'] / 1e9:,.2f}B activated per token",
        *v4_cache_lines(cfg, name),
    ]
    built = meta_build(cfg)
    lines.append(f"  built on the meta device (shapes only, nothing allocated): {built['params']:,} parameters, "
                 f"{built['bf16'] / 1e9:,.1f} GB in BF16, {built['published'] / 1e9:,.1f} GB as published (FP4 routed "
                 "experts, FP8 projections)")
    return "\n".join(lines)


# How DeepSeek-V4's checkpoints store each weight (bytes per value, scales included): routed experts FP4 with one
# UE8M0 scale per 32 values, the attention / shared-expert / MTP projections FP8 with one per 128 x 128 block, the
# mHC mappings, sinks, compressors' position biases and routing biases FP32, the rest BF16.
_PUBLISHED = ((re.compile(r"\.mlp\.experts\."), 0.5 + 1 / 32),
              (re.compile(r"(self_attn\.(q_a|q_b|kv|o_a|o_b)_proj|indexer\.q_b_proj|shared_experts\.\w+|[eh]_proj)"
                          r"\.weight$"), 1 + 1 / 128**2),
              (re.compile(r"(sinks|position_bias|_hc\.\w+|hc_head\.\w+|e_score_correction_bias)$"), 4))


def meta_build(cfg: ModelConfig) -> dict:
    """The model built on torch's meta device (every tensor's shape, no storage: a 1.6T model in a second):
    {"params": weights counted as num_params(include_mtp=True) counts them (the routing biases are buffers
    here), "bf16": their bytes in BF16, "published": their bytes as DeepSeek-V4 publishes them}."""
    import torch

    from .model import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    weights = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers()
                                             if n.endswith("e_score_correction_bias"))]
    published = sum(t.numel() * next((size for pattern, size in _PUBLISHED if pattern.search(n)), 2)
                    for n, t in weights)
    count = sum(t.numel() for _, t in weights)
    return {"params": count, "bf16": 2 * count, "published": published}


def v4_cache_lines(cfg: ModelConfig, name: str) -> list[str]:
    """The KV cache per token and at 1M context next to V3's and V3.2's, with decode FLOPs and DeepSeek's figures."""
    rows = [("V3", ModelConfig.preset("v3")), ("V3.2", ModelConfig.preset("v3.2")), (name or "this", cfg)]
    head = (f"  {'':<10}{'per token (long context)':>26}{'at 1M tokens':>15}{'(BF16 at 1M)':>15}"
            f"{'decode FLOPs at 1M':>21}")
    lines = ["  KV cache, RoPE dims in BF16 and the rest FP8 as DeepSeek-V4 stores it (indexer keys FP8, block scales "
             "not counted):", head]
    for label, c in rows:
        marginal = cache_bytes(c, 2 * MILLION) - cache_bytes(c, MILLION)
        lines.append(f"  {label:<10}{marginal / MILLION:>22,.0f} B/t{cache_bytes(c, MILLION) / 1e9:>12,.2f} GB"
                     f"{cache_bytes(c, MILLION, fp8=False) / 1e9:>12,.2f} GB"
                     f"{decode_flops(c, MILLION) / 1e12:>15,.2f} TFLOP")
    window = cfg.num_hidden_layers * cfg.sliding_window * _entry_bytes(cfg.head_dim - cfg.qk_rope_head_dim,
                                                                       cfg.qk_rope_head_dim, True)
    kv, flops = (cache_bytes(cfg, MILLION) / cache_bytes(rows[1][1], MILLION),
                 decode_flops(cfg, MILLION) / decode_flops(rows[1][1], MILLION))
    paper_kv, paper_flops = DEEPSEEK_V4_PRO_VS_V32
    lines += [f"  (the window's {cfg.sliding_window} raw entries per layer are {window / 2**20:,.1f} MiB whatever the "
              "length; the compressed entries grow with it)",
              f"  {name or 'this'} / V3.2 at 1M tokens: KV cache {kv:.1%}, decode FLOPs {flops:.1%} (DeepSeek reports "
              f"V4-Pro at {paper_kv:.0%} and {paper_flops:.0%})"]
    return lines


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
