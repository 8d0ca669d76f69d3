"""Multi-head Latent Attention (DeepSeek-V2 Section 2.1).

Keys and values are compressed into one latent per token, c_kv = RMSNorm(W_DKV h) of kv_lora_rank dims, plus one
rotary key k_pe shared by all heads. Two ways to compute the same attention:

* full path (training, and prefill without a cache): up-project c_kv with kv_b_proj into per-head k_nope and v,
  concatenate k_pe, run ordinary attention. Cheap when T is large and every position is a query.
* absorbed path (decode, DeepSeek's serving path): W_UK is folded into the query and W_UV into the output, so
  attention runs directly against the cached latent [c_kv, k_pe] (kv_lora_rank + qk_rope_head_dim per token)
  as multi-query attention with one 576-dim "key" (V3) and the 512-dim latent as "value".

tests/test_model.py checks the two paths give the same output.

DeepSeek-V3.2 (model_type deepseek_v32) adds DeepSeek Sparse Attention: a LightningIndexer (dsa.py) picks the
index_topk tokens each query may attend to. The full path folds the selection into its mask; the absorbed path
(decode) reads only the selected latents from the cache, so its attention cost stops growing past index_topk
(tests/test_dsa.py: both equal transformers' DeepseekV32, and each other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import cpu_attention, flash_mla, gemv
from .dsa import DSA, IndexRecord, LightningIndexer, causal_visible, selection_mask, top_k
from .layers import Linear, RMSNorm
from .rope import apply_rope, yarn_get_mscale, yarn_scaling


def gather_selected(T: int, S: int, k: int) -> bool:
    """Decode-time DSA: read the T x k selected latents from the cache (True) or all S under a selection mask (False,
    cheaper when T x k >= S, e.g. a long prefill chunk). Both give the same attention (tests/test_dsa.py)."""
    return T * k < S


# A compiled graph on the CPU (GRPO's training forward; `pretrain --compile` on packed documents) computes masked
# attention on the full path as two matmuls around a softmax that inductor fuses with the mask and the scale, without
# the zero columns SDPA's kernel needs: at small heads (the cpu preset's 4 x 48, GRPO's 63 x 88 scores a row) SDPA's
# CPU kernel runs at ~15-20 GFLOP/s (forward and backward of one layer, compiled: 13.0-13.4 vs 10.3-10.8 ms). It holds
# the (B, H, T, S) scores for the backward, so only up to this many; above, SDPA's flash kernel. Both are the
# fallbacks of model/cpu_attention.py's kernel, which runs attention on the CPU in float32, causal or masked, eager
# or compiled, wherever it applies (a CPU with AVX-512, up to its MAX_T tokens).
EXPLICIT_SCORES = 2**24


def explicit_attention(q, k, v, mask, scale: float):
    """softmax(q k^T * scale, masked) v: q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv), mask (B|1, 1, T, S) or (T, S)
    True = may attend -> (B, T, H, dv)."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale                       # (B, H, T, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", probs, v)                              # (B, T, H, dv)


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
            # [W_DQ; W_DKV; W_KR]: both down-projections read the same x, so they run as one matmul (checkpoints
            # keep transformers' q_a_proj and kv_a_proj_with_mqa; weights.py splits and joins them)
            self.qkv_a_proj = Linear(h, self.q_lora_rank + self.kv_lora_rank + self.rope, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)  # W_UQ, W_QR
        else:
            self.q_proj = Linear(h, self.n_heads * self.qk_dim, bias=False)
            self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope, bias=bias)  # W_DKV and W_KR
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        # W_UK, W_UV; plain nn.Linear: the absorbed path reads its weight directly
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, h, bias=bias)
        self.indexer = LightningIndexer(cfg) if cfg.dsa else None      # DeepSeek-V3.2's DSA

    def down(self, x):
        """The down-projections of x (B, T, hidden): W_DQ x (B, T, q_lora_rank) or None without q_lora_rank, and
        [W_DKV; W_KR] x (B, T, kv_lora_rank + rope); one matmul when q_lora_rank is set."""
        if self.q_lora_rank:
            return self.qkv_a_proj(x).split([self.q_lora_rank, self.kv_lora_rank + self.rope], dim=-1)
        return None, self.kv_a_proj_with_mqa(x)

    def queries(self, x, q_a, cos, sin):
        """x and its W_DQ x (down) -> q_nope (B, T, H, nope), roped q_pe (B, T, H, rope), the query latent (B, T,
        q_lora_rank) or None."""
        B, T, _ = x.shape
        q_latent = self.q_a_layernorm(q_a) if self.q_lora_rank else None
        q = self.q_b_proj(q_latent) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # (B, T, H, nope), (B, T, H, rope)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave), q_latent

    def latent(self, kv_a, cos, sin):
        """[W_DKV; W_KR] x (down) -> the per-token cache entry: normalised c_kv (B, T, kv_lora_rank) and roped
        k_pe (B, T, rope)."""
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.interleave)

    def forward(self, x, cos, sin, mask=None, cache=None, layer: int = 0, dsa: DSA | None = None, prefix=None):
        """x (B, T, hidden) -> (B, T, hidden).

        Without `cache`: the full path over these T tokens, causal, or under `mask` (B, 1, T, T) or (T, T),
        True = may attend (every row needs one True). With `cache`: the absorbed path through it.
        `prefix` (rl.SharedPrefix, the full path only): keys and values computed before these tokens, shared by
        several rows (GRPO: a group's prompt, once for its G completions); prefix.update(layer, k, v) takes this
        layer's per-head keys (B, T, H, qk_dim) and values (B, T, H, v_dim) and returns the ones attention reads,
        (B, S, H, .) each, with their mask (B, 1, T, S) or None for causal.
        cache.update(layer, c_kv, k_pe) stores this step's latents and returns every visible latent
        (B, S, kv_lora_rank), (B, S, rope) and a boolean mask (B, 1, T, S) (True = may attend) or None.
        With an indexer (DSA), see dsa_forward for the two more cache methods; `dsa` (dsa.DSA) switches the
        selection off (sparse=False) or collects training records; None = sparse, no records.
        """
        if mask is not None and cache is not None:
            raise ValueError("MLA got both a mask and a cache: the cache supplies the mask of the absorbed path "
                             "(cache.update returns it); pass one of them")
        if prefix is not None and (mask is not None or cache is not None or self.indexer is not None):
            raise ValueError("MLA's shared prefix runs on the full path without a mask (it supplies its own), a cache "
                             "or DSA's indexer; pass the prefix alone")
        q_a, kv_a = self.down(x)
        q_nope, q_pe, q_latent = self.queries(x, q_a, cos, sin)
        c_kv, k_pe = self.latent(kv_a, cos, sin)
        if self.indexer is not None:
            return self.dsa_forward(x, q_latent, (q_nope, q_pe), (c_kv, k_pe), (cos, sin), mask, cache, layer,
                                    dsa or DSA())
        if cache is None:
            return self.full_attention(q_nope, q_pe, c_kv, k_pe, mask, prefix, layer)
        return self.cached_attention(q_nope, q_pe, c_kv, k_pe, cache, layer)

    def cached_attention(self, q_nope, q_pe, c_kv, k_pe, cache, layer: int):
        """The absorbed path through the cache: one kernel over the paged cache's blocks where flash_mla.use_kernel
        says so (CUDA, triton), else update()'s gathered latents and the torch path (tested equal)."""
        if flash_mla.use_kernel(cache, q_nope.device):
            out = flash_mla.flash_mla(self.absorb(q_nope), q_pe, *cache.update_paged(layer, c_kv, k_pe),
                                      self.softmax_scale)                              # (B, T, H, r)
            return self.up_project(out)
        c_kv, k_pe, mask = cache.update(layer, c_kv, k_pe)
        return self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)

    def dsa_forward(self, x, q_latent, q, latent, rope, mask, cache, layer: int, dsa: DSA):
        """DeepSeek Sparse Attention: MLA over the index_topk tokens of highest indexer score (dsa.py).

        Full path: the selection becomes the attention mask. Cache path: cache.update_indexer(layer, keys (B, T,
        index_head_dim)) stores the indexer keys and returns all visible ones (B, S, index_head_dim) with the mask
        (B|1, 1, T, S) or None; then cache.update_selected(layer, c_kv, k_pe, positions (B, T, k)) stores this step's
        latents and returns only the selected ones, (B, T, k, kv_lora_rank) and (B, T, k, rope), which attention
        reads (or cache.update and a selection mask when that reads less: gather_selected). Until a row has more
        than index_topk visible tokens, every visible token is selected and the indexer's scores are not needed."""
        (q_nope, q_pe), (c_kv, k_pe) = q, latent
        B, T, H, _ = q_nope.shape
        k = self.indexer.topk
        x, q_latent = x.detach(), q_latent.detach()    # the indexer learns from its own loss only (paper 2.1.1)
        keys = self.indexer.keys(x, *rope)                                             # (B, T, index_head_dim)
        if cache is None:
            visible = (causal_visible(T, T, x.device) if mask is None else mask).reshape(-1, T, T)   # (B|1, T, T)
            if T <= k and dsa.records is None:                                         # everything is selected
                return self.full_attention(q_nope, q_pe, c_kv, k_pe, mask)
            scores = self.indexer(x, q_latent, *rope, keys)                            # (B, T, T)
            selected = selection_mask(scores, visible, k)
            if dsa.records is not None:
                with torch.no_grad():
                    p = self.attention_probs(q_nope, q_pe, c_kv, k_pe, (selected if dsa.sparse else visible)[:, None])
                scores = scores.masked_fill(~visible, float("-inf"))
                dsa.records.append(IndexRecord(layer, scores, p.sum(2) / H, selected))
            return self.full_attention(q_nope, q_pe, c_kv, k_pe, selected[:, None] if dsa.sparse else mask)
        if dsa.records is not None:
            raise ValueError("DSA records are collected on the full path (training forwards without a cache)")
        keys, mask = cache.update_indexer(layer, keys)                                 # (B, S, index_head_dim)
        S = keys.shape[1]
        if not dsa.sparse or S <= k:
            return self.cached_attention(q_nope, q_pe, c_kv, k_pe, cache, layer)
        visible = causal_visible(T, S, x.device)[None] if mask is None else mask.reshape(-1, T, S)
        positions, valid = top_k(self.indexer(x, q_latent, *rope, keys), visible, k)  # (B, T, k) each
        if not gather_selected(T, S, k):
            c_kv, k_pe, _ = cache.update(layer, c_kv, k_pe)
            selected = torch.zeros(B, T, S, dtype=torch.bool, device=x.device).scatter(-1, positions, valid)
            return self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, selected[:, None])
        c_sel, pe_sel = cache.update_selected(layer, c_kv, k_pe, positions)           # (B, T, k, r), (B, T, k, rope)
        # each query attends to its own k latents: fold the queries into the batch, one query per row
        out = self.absorbed_attention(q_nope.reshape(B * T, 1, H, self.nope), q_pe.reshape(B * T, 1, H, self.rope),
                                      c_sel.flatten(0, 1), pe_sel.flatten(0, 1), valid.reshape(B * T, 1, 1, -1))
        return out.view(B, T, -1)

    def full_attention(self, q_nope, q_pe, c_kv, k_pe, mask=None, prefix=None, layer: int = 0):
        """Attention with per-head keys/values expanded from the latent (the training path): causal when mask is
        None, else under the boolean mask (B|1, 1, T, T) or (T, T), True = may attend; a shared prefix's keys and
        values come first when `prefix` is given (forward)."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)                                          # (B, T, H, qk_dim)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, H, self.rope)], dim=-1)
        if prefix is not None:
            k, v, mask = prefix.update(layer, k, v)                   # (B, S, H, qk_dim), (B, S, H, v), (B, 1, T, S)
        if cpu_attention.applies(q, k, v, mask):                 # on the CPU: one fused kernel per (row, head)
            return self.o_proj(cpu_attention.attention(q, k, v, self.softmax_scale, mask).reshape(B, T, H * self.v_dim))
        if (torch.compiler.is_compiling() and q.device.type == "cpu" and mask is not None
                and B * H * T * k.shape[1] <= EXPLICIT_SCORES):
            return self.o_proj(explicit_attention(q, k, v, mask, self.softmax_scale).reshape(B, T, H * self.v_dim))
        # SDPA's fused (flash) kernels want one head size for q, k and v; with v_head_dim != qk_head_dim (V3: 128
        # vs 192) it silently falls back to the unfused math path, about 2x slower on CPU with backward. Zero
        # columns change neither the scores (explicit scale) nor the first v_head_dim output columns.
        d = max(self.qk_dim, self.v_dim)
        q, k, v = (F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] < d else t for t in (q, k, v))
        # (mask None: keys are these T tokens, so causal holds for any T, one included; no test of T, which a compiled
        # training forward with dynamic shapes holds symbolic)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             is_causal=mask is None, scale=self.softmax_scale)  # (B, H, T, d)
        out = out.transpose(1, 2)[..., : self.v_dim]                                     # (B, T, H, v)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def attention_probs(self, q_nope, q_pe, c_kv, k_pe, mask=None):
        """The attention distribution of every head, (B, T, H, S) float32, computed against the latent (c_kv
        (B, S, r), k_pe (B, S, rope)) under mask (B|1, 1, T, S) or (T, S), True = may attend (causal when None)."""
        B, T, H, _ = q_nope.shape
        # Multi-query attention against ONE latent "head", written as two matmuls (DeepSeek's inference code does
        # the same): no concatenated [c_kv, k_pe] keys and no per-head expansion of the cache, which SDPA's math
        # fallback (q and v head sizes differ) would materialise: 2-5x faster decode attention on CPU.
        S, r = c_kv.shape[1], self.kv_lora_rank
        q_lat = self.absorb(q_nope).reshape(B, T * H, r)                               # heads folded into rows
        scores = torch.baddbmm(q_lat @ c_kv.transpose(1, 2), q_pe.reshape(B, T * H, self.rope),
                               k_pe.transpose(1, 2)).view(B, T, H, S)                 # (B, T, H, S)
        if mask is None and T > 1:
            mask = causal_visible(T, S, c_kv.device)
        if mask is not None:                                                           # (B|1, 1, T, S) or (T, S)
            scores = scores.masked_fill(~mask.reshape(-1, T, 1, S), float("-inf"))
        return torch.softmax(scores.float() * self.softmax_scale, dim=-1)

    def absorb(self, q_nope):
        """q_nope (B, T, H, nope) -> q_nope W_UK (B, T, H, kv_lora_rank): each head's query in latent space."""
        B, T, H, _ = q_nope.shape
        w_uk = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)[:, : self.nope]  # (H, nope, r)
        if B * T == 1 and gemv.applies(w_uk, q_nope):     # one token: W_UK's rows streamed once (model/gemv.py)
            return gemv.vecmat(w_uk, q_nope.reshape(H, self.nope), torch.arange(H)).view(B, T, H, self.kv_lora_rank)
        # per head, q_nope @ W_UK as one bmm over heads (einsum costs ~2x as much per call at decode sizes)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, self.nope).transpose(0, 1), w_uk)   # (H, B*T, r)
        return q_lat.transpose(0, 1).reshape(B, T, H, self.kv_lora_rank)

    def latent_attention(self, q_nope, q_pe, c_kv, k_pe, mask=None):
        """Attention computed against the latent: scores = (q_nope W_UK) . c_kv + q_pe . k_pe, output the weighted
        sum of c_kv, (B, T, H, kv_lora_rank), before W_UV (flash_mla.py is the same as one kernel)."""
        B, T, H, _ = q_nope.shape
        S, r = c_kv.shape[1], self.kv_lora_rank
        p = self.attention_probs(q_nope, q_pe, c_kv, k_pe, mask).to(c_kv.dtype)       # (B, T, H, S)
        return (p.view(B, T * H, S) @ c_kv).view(B, T, H, r)

    def up_project(self, out):
        """The latent output of every head (B, T, H, kv_lora_rank) -> o_proj(out W_UV) (B, T, hidden)."""
        B, T, H, r = out.shape
        w_uv = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, r)[:, self.nope:]  # (H, v, r)
        if B * T == 1 and gemv.applies(w_uv, out):       # one token: W_UV's rows streamed once (model/gemv.py)
            return self.o_proj(gemv.gemv(w_uv, out.reshape(H, r), torch.arange(H)).view(B, T, H * self.v_dim))
        out = torch.bmm(out.view(B * T, H, r).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # (B*T, H, v)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, mask=None):
        """The absorbed path over gathered latents c_kv (B, S, r), k_pe (B, S, rope) -> (B, T, hidden)."""
        return self.up_project(self.latent_attention(q_nope, q_pe, c_kv, k_pe, mask))
