"""Grouped-query attention (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints"): the attention of the dense families R1 was distilled into (qwen2, llama, qwen3).

num_attention_heads query heads are split into num_key_value_heads groups; the heads of one group share one key
and one value head. num_key_value_heads = heads is multi-head attention, 1 is multi-query attention. The cache
holds K and V per token: 2 x num_key_value_heads x head_dim elements per layer (Qwen2.5-7B: 1,024), where MLA holds
one latent (V3: 576) for 128 heads.

Per family (transformers' Qwen2Attention / LlamaAttention / Qwen3Attention):
* qwen2: q/k/v projections carry a bias, o_proj none.
* llama: no biases (attention_bias=true puts one on all four projections).
* qwen3: RMSNorm over each q and k head (q_norm / k_norm, weight of head_dim) before RoPE; head_dim is its own
  setting, not hidden_size / heads (Qwen3-8B: 32 heads x 128 = 4,096 = hidden; Qwen3-0.6B: 16 x 128 > 1,024).
All rotate whole heads in half-split pairs (rope.apply_rope with interleave=False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .rope import apply_rope


class GQA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.softmax_scale = self.head_dim ** -0.5
        h, qwen2 = cfg.hidden_size, cfg.model_type == "qwen2"
        qkv_bias, o_bias = qwen2 or cfg.attention_bias, cfg.attention_bias and not qwen2
        # [W_q; W_k; W_v] as one matmul over x (checkpoints keep q_proj, k_proj and v_proj: weights.py splits them)
        self.qkv_proj = Linear(h, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=o_bias)
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.interleave = cfg.rope_interleave  # False for every dense family (the config refuses True)

    def forward(self, x, cos, sin, mask=None, cache=None, layer: int = 0, dsa=None, prefix=None):
        """x (B, T, hidden) -> (B, T, hidden).

        Without `cache`: attention over these T tokens, causal, or under `mask` (B, 1, T, T) or (T, T), True = may
        attend (every row needs one True). With `cache`: cache.update(layer, k, v) stores this step's keys (after
        RoPE and k_norm) and values, each (B, T, n_kv_heads, head_dim), and returns every visible key and value
        (B, S, n_kv_heads, head_dim) and a boolean mask (B|1, 1, T, S) (True = may attend) or None (the last T of
        the S positions are these tokens: causal among them, all earlier ones visible). `prefix` (rl.SharedPrefix,
        without a cache): keys and values shared by several rows that come before these tokens (as in MLA.forward:
        prefix.update(layer, k, v) returns the keys and values to read, (B, S, n_kv_heads, d), and their mask).
        """
        if mask is not None and cache is not None:
            raise ValueError("GQA got both a mask and a cache: the cache supplies the mask (cache.update returns "
                             "it); pass one of them")
        if prefix is not None and (mask is not None or cache is not None):
            raise ValueError("GQA's shared prefix supplies its own mask and runs without a cache; pass it alone")
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)                   # (B, T, heads, d) each
        if self.qk_norm:  # qwen3: per-head RMSNorm before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)                                     # (B, S, n_kv_heads, d)
            S = k.shape[1]
            if mask is None and T > 1:  # SDPA's is_causal aligns to the top-left corner; ours is bottom-right
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        elif prefix is not None:
            k, v, mask = prefix.update(layer, k, v)                                    # (B, S, n_kv_heads, d)
        out = self.attend(q, k, v, mask, causal=cache is None and mask is None and T > 1)    # (B, T, H, d)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v with each group of n_heads / n_kv_heads query heads reading one
        key/value head (query head i reads kv head i // group, as transformers' repeat_kv): q (B, T, H, d), k and
        v (B, S, n_kv_heads, d) -> (B, T, H, d)."""
        B, T, H, d = q.shape
        group = H // self.n_kv_heads
        if T == 1 and group > 1:
            # Decode: the group's query heads become `group` query rows against their one K/V head, so attention
            # reads each cached K/V head once. SDPA's enable_gqa would instead copy K and V per query head, which
            # is slower per decode step on CPU (docs/benchmarks.md, "GQA decode attention").
            m = None if mask is None else mask.reshape(-1, 1, 1, mask.shape[-1])          # (B|1, 1, 1, S)
            out = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, group, d), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=m, scale=self.softmax_scale)
            return out.reshape(B, 1, H, d)                                             # (B, n_kv, group, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                             enable_gqa=group > 1)                     # (B, H, T, d)
        return out.transpose(1, 2)
