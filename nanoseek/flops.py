"""Training FLOPs per token of a model shape and the accelerators' peaks: the model FLOPs utilisation (MFU) that
training logs (train/run.py) is their ratio to the measured tokens per second."""

from __future__ import annotations

import torch


def flops_per_token(cfg, seq_len: int, mtp: bool = True) -> float | None:
    """Training FLOPs per token, PaLM appendix B: 6 * activated parameters (embedding lookup excluded) plus the
    attention matmuls, 6 * layers * heads * seq_len * (qk_head_dim + v_head_dim) (QK^T and AV, fwd + bwd; with
    qk = v = Q, GQA's head_dim, this is PaLM's 12 L H Q T). MTP modules count as one more block + eh_proj + head."""
    if cfg.model_type == "deepseek_v4":
        return None   # not counted yet: V4's attention spans a window plus compressed entries, not seq_len (no MFU)
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


# dense bf16 tensor-core peaks (vendor datasheets), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for key, v in PEAK_BF16_FLOPS.items() if key in name), None)
