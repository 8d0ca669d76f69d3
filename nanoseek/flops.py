"""Training FLOPs per token of a model shape and the accelerators' peaks: the model FLOPs utilisation (MFU) that
training logs (train/run.py) is their ratio to the measured tokens per second."""

from __future__ import annotations

import torch


def flops_per_token(cfg, seq_len: int, mtp: bool = True) -> float | None:
    """Training FLOPs per token, PaLM appendix B: 6 * activated parameters (embedding lookup excluded) plus the
    attention matmuls, 6 * layers * heads * seq_len * (qk_head_dim + v_head_dim) (QK^T and AV, fwd + bwd; with
    qk = v = Q, GQA's head_dim, this is PaLM's 12 L H Q T). MTP modules count as one more block + eh_proj + head."""
    if cfg.model_type == "deepseek_v4":
        return 3 * v4_forward_flops(cfg, seq_len, mtp)
    qk_v = 2 * cfg.head_dim if cfg.attention == "gqa" else cfg.qk_head_dim + cfg.v_head_dim
    act, attn_layer = cfg.num_params()["activated"], 6 * cfg.num_attention_heads * seq_len * qk_v
    total = 6 * act + attn_layer * cfg.num_hidden_layers
    if mtp and cfg.num_nextn_predict_layers:
        one = cfg.replace(num_hidden_layers=1, first_k_dense_replace=0, vocab_size=0, num_nextn_predict_layers=0)
        h = cfg.hidden_size
        block = one.num_params()["activated"] - h  # an MoE block's activated parameters (no final norm)
        per = block + 2 * h * h + 3 * h + cfg.vocab_size * h
        total += (6 * per + attn_layer) * cfg.num_nextn_predict_layers
    return float(total)


def v4_forward_flops(cfg, seq_len: int, mtp: bool = True) -> float:
    """DeepSeek-V4's forward FLOPs per token (2 per multiply-add of a matmul; norms, softmaxes, RoPE and pooling
    sums are not counted), in a sequence of seq_len tokens; training is 3x (backward: 2x, PaLM appendix B).

    Per block: the weights a token multiplies through (v4_block_macs) and its attention: every query scores and
    sums over its window (sliding_window keys) and the layer type's compressed entries, seq_len / 128 of HCA's and
    index_topk of CSA's, whose lightning indexer scores all seq_len / 4 of them. As PaLM counts seq_len keys for
    every query (not the causal average), the counts are a sequence end's. Then hc_head and the head; an MTP depth
    adds e_proj, h_proj (over the hc_mult streams), a sliding-window block, its hc_head and the shared head."""
    h, n, T = cfg.hidden_size, cfg.hc_mult, seq_len
    H, d = cfg.num_attention_heads, cfg.head_dim

    def attention(kind: str) -> int:                   # per query: scores + weighted sums, one shared K=V head
        keys, index = min(cfg.sliding_window, T), 0
        if kind == "heavily_compressed_attention":
            keys += T // cfg.compress_rates[kind]
        elif kind == "compressed_sparse_attention":
            entries = T // cfg.compress_rates[kind]
            keys += min(cfg.index_topk, entries)
            index = cfg.index_n_heads * cfg.index_head_dim * entries            # the indexer ranks every entry
        return 2 * H * d * keys + index

    macs = sum(v4_block_macs(cfg, kind) + attention(kind) for kind in cfg.layer_types)
    macs += n * n * h + h * cfg.vocab_size                                   # hc_head, the head
    if mtp and cfg.num_nextn_predict_layers:
        depth = h * h + n * h * h + v4_block_macs(cfg, "sliding_attention") + attention("sliding_attention")
        macs += (depth + n * n * h + h * cfg.vocab_size) * cfg.num_nextn_predict_layers
    return 2.0 * macs


def v4_block_macs(cfg, kind: str) -> int:
    """Multiply-adds of one V4 block's weights per token (attention of layer type `kind` and MoE) and its mHC."""
    h, n, H, d, q = cfg.hidden_size, cfg.hc_mult, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    r, g = cfg.o_lora_rank, cfg.o_groups
    attn = h * q + q * H * d + h * d + H * d * r + g * r * h          # q_a, q_b, kv, grouped o_a, o_b
    if kind == "heavily_compressed_attention":
        attn += 2 * h * d                                                 # the compressor's kv and gate projections
    elif kind == "compressed_sparse_attention":                           # two series each; the indexer's own
        di, nh = cfg.index_head_dim, cfg.index_n_heads                    # compressor, queries and head weights
        attn += 4 * h * d + 4 * h * di + q * nh * di + h * nh
    moe = h * cfg.n_routed_experts + 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    mhc = 2 * ((2 + n) * n * n * h + n * n * h)     # attention and MoE sides: the mappings, comb^T @ streams
    return attn + moe + mhc


# dense bf16 tensor-core peaks (vendor datasheets), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for key, v in PEAK_BF16_FLOPS.items() if key in name), None)
