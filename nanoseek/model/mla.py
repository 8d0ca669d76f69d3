"""Multi-head Latent Attention (DeepSeek-V2 Section 2.1).

Keys and values are compressed into one latent per token, c_kv = RMSNorm(W_DKV h) of kv_lora_rank dims, plus one
rotary key k_pe shared by all heads. Two ways to compute the same attention:

* full path (training, and prefill without a cache): up-project c_kv with kv_b_proj into per-head k_nope and v,
  concatenate k_pe, run ordinary attention. Cheap when T is large and every position is a query.
* absorbed path (decode, DeepSeek's serving path): W_UK is folded into the query and W_UV into the output, so
  attention runs directly against the cached latent [c_kv, k_pe] (kv_lora_rank + qk_rope_head_dim per token)
  as multi-query attention with one 576-dim "key" (V3) and the 512-dim latent as "value".

tests/test_model.py checks the two paths give the same output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .rope import apply_rope, yarn_get_mscale, yarn_scaling


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope + self.rope
        # 1/sqrt(d_nope + d_rope), times mscale(factor, mscale_all_dim)^2 under YaRN: YaRN's attention temperature
        # (V2 Appendix), applied to the scores here because cos/sin carry only the ratio of two mscales (rope.py)
        self.softmax_scale = self.qk_dim ** -0.5
        yarn = yarn_scaling(cfg)
        if yarn:
            m = yarn_get_mscale(yarn.get("factor", 1.0), yarn.get("mscale_all_dim", 0.0) or 0.0)
            self.softmax_scale *= m * m
        self.interleave = cfg.rope_interleave
        h, bias = cfg.hidden_size, cfg.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias)         # W_DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)  # W_UQ, W_QR
        else:
            self.q_proj = Linear(h, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope, bias=bias)  # W_DKV and W_KR
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        # W_UK, W_UV; plain nn.Linear: the absorbed path reads its weight directly
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, h, bias=bias)

    def queries(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # (B, T, H, nope), (B, T, H, rope)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def latent(self, x, cos, sin):
        """The per-token cache entry: normalised c_kv (B, T, kv_lora_rank) and roped k_pe (B, T, rope)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.interleave)

    def forward(self, x, cos, sin, mask=None, cache=None, layer: int = 0):
        """x (B, T, hidden) -> (B, T, hidden).

        Without `cache`: the full path over these T tokens, causal, or under `mask` (B, 1, T, T) or (T, T),
        True = may attend (every row needs one True). With `cache`: the absorbed path through it.
        cache.update(layer, c_kv, k_pe) stores this step's latents and returns every visible latent
        (B, S, kv_lora_rank), (B, S, rope) and a boolean mask (B, 1, T, S) (True = may attend) or None.
        """
        if mask is not None and cache is not None:
            raise ValueError("MLA got both a mask and a cache: the cache supplies the mask of the absorbed path "
                             "(cache.update returns it); pass one of them")
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is None:
            return self.full_attention(q_nope, q_pe, c_kv, k_pe, mask)
        c_kv, k_pe, mask = cache.update(layer, c_kv, k_pe)
        return self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)

    def full_attention(self, q_nope, q_pe, c_kv, k_pe, mask=None):
        """Attention with per-head keys/values expanded from the latent (the training path): causal when mask is
        None, else under the boolean mask (B|1, 1, T, T) or (T, T), True = may attend."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)                                          # (B, T, H, qk_dim)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, H, self.rope)], dim=-1)
        # SDPA's fused (flash) kernels want one head size for q, k and v; with v_head_dim != qk_head_dim (V3: 128
        # vs 192) it silently falls back to the unfused math path, about 2x slower on CPU with backward. Zero
        # columns change neither the scores (explicit scale) nor the first v_head_dim output columns.
        d = max(self.qk_dim, self.v_dim)
        q, k, v = (F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] < d else t for t in (q, k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             is_causal=mask is None and T > 1, scale=self.softmax_scale)  # (B, H, T, d)
        out = out.transpose(1, 2)[..., : self.v_dim]                                     # (B, T, H, v)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, mask=None):
        """Attention computed against the latent cache: scores = (q_nope W_UK) . c_kv + q_pe . k_pe."""
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]                              # (H, nope, r), (H, v, r)
        # Multi-query attention against ONE latent "head", written as two matmuls (DeepSeek's inference code does
        # the same): no concatenated [c_kv, k_pe] keys and no per-head expansion of the cache, which SDPA's math
        # fallback (q and v head sizes differ) would materialise: 2-5x faster decode attention on CPU.
        S, r = c_kv.shape[1], self.kv_lora_rank
        # per head, q_nope @ W_UK as one bmm over heads (einsum costs ~2x as much per call at decode sizes)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, self.nope).transpose(0, 1), w_uk)   # (H, B*T, r)
        q_lat = q_lat.transpose(0, 1).reshape(B, T * H, r)                             # heads folded into rows
        scores = torch.baddbmm(q_lat @ c_kv.transpose(1, 2), q_pe.reshape(B, T * H, self.rope),
                               k_pe.transpose(1, 2)).view(B, T, H, S)                 # (B, T, H, S)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=c_kv.device).tril(S - T)
        if mask is not None:                                                           # (B|1, 1, T, S) or (T, S)
            scores = scores.masked_fill(~mask.reshape(-1, T, 1, S), float("-inf"))
        p = torch.softmax(scores.float() * self.softmax_scale, dim=-1).to(c_kv.dtype)
        out = (p.view(B, T * H, S) @ c_kv).view(B * T, H, r)
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)    # (B*T, H, v)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))
