"""DeepSeek-V4 (model_type deepseek_v4): hybrid compressed attention, manifold-constrained hyper-connections (mHC),
hash routing. Module and parameter names are transformers' (DeepseekV4ForCausalLM), so a state dict maps one to
one; weights.py maps them to the published tensor names that transformers writes in a folder.

A block keeps hc_mult residual streams (B, T, hc_mult, hidden). Its attention (V4Attention) sees every key of a
sliding window of the raw tokens, plus, per layer type, compressed entries: HCA pools every
compress_rates[HCA] (128) tokens into one entry and attends to all of them; CSA pools every 4 tokens (two overlapping
series, each entry spans 8 tokens) and a lightning indexer (as in V3.2) picks index_topk entries per query. Keys and
values are one shared head (K = V), rotated on their trailing qk_rope_head_dim dims; a per-head sink joins the
softmax; heads are projected out in o_groups groups of rank o_lora_rank. The MoE routes by a frozen token-id ->
experts table in its first layers (hash_moe), by top-k of sqrt(softplus) scores after.

Two paths, one arithmetic: without a cache the forward runs whole sequences (training, scoring); with one
(infer/v4_cache.py V4Cache, the engine's) it runs only the new tokens of each sequence, a prefill chunk of any
size or one decode token, and gives the same outputs: the cache holds what they need of the tokens before, the
window's raw keys, each compressor's entries and its pending tokens (projected, not yet pooled), the indexer's keys.
The cache protocol (the model computes, the cache stores and gathers):
  cache.window(layer, kv, size)                     -> the window's keys (B, S, d) and which query sees which
  cache.pending(layer, name, kv, gate, rate, overlap) -> whole windows of projections to pool, first entry index
  cache.entries(layer, name, new, first)            -> every compressed entry of the sequence so far (B, E, dim)
  cache.store(layer, name, new, first)              -> (stores the completed entries only, reads nothing)
  cache.selected(layer, name, positions)            -> the entries at positions (B, T, k) of each row (B, T, k, dim)
A cached CSA step that reads less that way (T x index_topk < E: decoding) stores its entries and gathers only each
query's index_topk chosen ones, as V3.2's decode does (model/mla.py gather_selected): a decode step's attention
reads the window and k entries, not E = context / 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .mla import gather_selected
from .moe import Experts, grouped_linear, sequence_balance_loss
from .rope import apply_rope, yarn_frequencies, yarn_scaling

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (the per-head query norm, mHC's input norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class V4Rotary(nn.Module):
    """Two RoPE tables over the trailing qk_rope_head_dim dims: "main" (rope_theta) for sliding-window layers,
    "compress" (compress_rope_theta, YaRN when rope_scaling says so) for CSA/HCA layers, their compressed entries
    and the indexer. V4 does not multiply cos/sin by YaRN's attention factor (transformers sets it to 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.qk_rope_head_dim
        for name, base in (("main", cfg.rope_theta), ("compress", cfg.compress_rope_theta)):
            inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            if name == "compress" and yarn_scaling(cfg):
                inv_freq, _ = yarn_frequencies(inv_freq, yarn_scaling(cfg), d, base)
            self.register_buffer(f"{name}_inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * getattr(self, f"{kind}_inv_freq")     # (B, T, d/2)
        return freqs.cos(), freqs.sin()


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2 * cos.shape[-1] dims of x (B, T, [heads,] d) in interleaved pairs; the leading
    dims (no position) pass through."""
    r = 2 * cos.shape[-1]
    return torch.cat([x[..., :-r], apply_rope(x[..., -r:], cos, sin, interleave=True)], dim=-1)


class Compressor(nn.Module):
    """Gated pooling of every `rate` tokens into one entry (V4 report Section 2.3, eq. 9-11 and 20-23):
    C_w = sum_j softmax_j(Z_j + B_j) * C_j over the window's tokens j, then RMSNorm and RoPE at position w * rate.

    overlap (CSA): kv_proj/gate_proj give two series per token (2 dim): entry w pools the previous window's first
    series (Ca) with its own window's second (Cb), 2 * rate tokens; window 0 has no previous one (gate -inf)."""

    cache_name = "compressor"       # this branch's state in a V4Cache layer (the indexer's is "indexer")

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.rate, self.dim, self.overlap = rate, dim, overlap
        c = 2 if overlap else 1
        self.kv_proj = Linear(hidden, c * dim, bias=False)
        self.gate_proj = Linear(hidden, c * dim, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, c * dim))        # B, one row per place in the window
        self.kv_norm = RMSNorm(dim, eps)

    def compress(self, x: torch.Tensor, rotary: V4Rotary, cache=None, layer: int = 0, read: bool = True):
        """No cache: x (B, T, hidden) -> the entries of its T // rate complete windows (B, W, dim), the tail left
        out. With a cache: x holds this step's new tokens; -> every entry of each sequence so far (B, E, dim), or,
        read=False, None: the completed entries are stored and the caller gathers the ones it needs."""
        B, T, _ = x.shape
        if cache is None:
            x = x[:, :T // self.rate * self.rate]
        kv, gate = self.kv_proj(x), self.gate_proj(x)                                 # (B, T', c*dim)
        if cache is None:
            first = torch.zeros(B, 1, dtype=torch.long, device=x.device)
            if self.overlap:                  # window 0's previous window does not exist: weight 0 (gate -inf)
                kv = torch.cat([kv.new_zeros(B, self.rate, kv.shape[-1]), kv], dim=1)
                gate = torch.cat([gate.new_full((B, self.rate, gate.shape[-1]), float("-inf")), gate], dim=1)
            return self.pool(kv, gate, first, rotary)
        # the cache puts the pending tokens of earlier steps (and, overlapping, the previous window) in front; None:
        # no row completes a window in this step (most decode steps), so there is no new entry to pool
        windows = cache.pending(layer, self.cache_name, kv, gate, self.rate, self.overlap)
        if windows is None:
            return cache.entries(layer, self.cache_name, None, None) if read else None
        entries, first = self.pool(*windows, rotary), windows[2]
        if not read:
            return cache.store(layer, self.cache_name, entries, first)
        return cache.entries(layer, self.cache_name, entries, first)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, first: torch.Tensor, rotary: V4Rotary) -> torch.Tensor:
        """kv, gate (B, L, c*dim): the projections of whole windows, L = rate * (W + overlap), a window before the
        first entry's when overlapping (it lends its first series only); first (B, 1): the first entry's index.
        -> entries first, first + 1, ... (B, W, dim), normed and rotated at their first token's position."""
        B, L, c_dim = kv.shape
        m, d = self.rate, self.dim
        kv = kv.view(B, L // m, m, c_dim)                                             # (B, W', m, c*dim)
        gate = gate.view(B, L // m, m, c_dim) + self.position_bias
        if self.overlap:                                                  # (B, W, 2m, dim): [Ca of w-1; Cb of w]
            kv = torch.cat([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], dim=2)
            gate = torch.cat([gate[:, :-1, :, :d], gate[:, 1:, :, d:]], dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)   # (B, W, dim)
        positions = (first + torch.arange(pooled.shape[1], device=kv.device)) * m         # (B, W)
        return rope_tail(self.kv_norm(pooled), *rotary(positions, "compress"))


class Scorer(nn.Module):
    """The lightning indexer's per-head weights w_{t,h} (a module of its own for transformers' name)."""

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.weights_proj = Linear(hidden, n_heads, bias=False)


class Indexer(Compressor):
    """Lightning indexer over CSA's compressed entries (report eq. 13-17; V3.2's, model/dsa.py, on compressed
    keys): its own overlapping compressor at index_head_dim, queries from MLA-style query latent, score(t, s) =
    sum_h w_{t,h} ReLU(q_{t,h} . K_s) * index_head_dim^-0.5 * index_n_heads^-0.5; keeps the top index_topk entries
    that are complete before the query. Equal scores (exact zeros where every head's ReLU is 0) go as torch.topk
    picks them, as in transformers: the choice among them may differ between a whole sequence and a cached step,
    which sees fewer entries; with index_n_heads heads such ties have probability ~2^-index_n_heads per entry."""

    cache_name = "indexer"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.index_head_dim, cfg.compress_rates[CSA], True, cfg.rms_norm_eps)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.scorer = Scorer(cfg.hidden_size, cfg.index_n_heads)

    def scores(self, x, q_latent, positions, rotary: V4Rotary, cache=None, layer: int = 0) -> torch.Tensor:
        """x (B, T, hidden), q_latent (B, T, q_lora_rank) -> index scores (B, T, W) of every compressed entry."""
        keys = self.compress(x, rotary, cache, layer)                                    # (B, W, di)
        return self.rank(x, q_latent, keys, *rotary(positions, "compress"))

    def rank(self, x, q_latent, keys, cos, sin) -> torch.Tensor:
        """The scores (B, T, W) of keys (B, W, di) for the queries of x (B, T, hidden) and q_latent (scores'
        arithmetic after the cache: compiled in a compiled decode step, as V4Attention.project)."""
        B, T, _ = x.shape
        q = rope_tail(self.q_b_proj(q_latent).view(B, T, self.n_heads, self.dim), cos, sin)  # (B, T, nh, di)
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))    # (B, T, nh, W)
        w = self.scorer.weights_proj(x).float() * self.n_heads ** -0.5                   # (B, T, nh)
        return (F.relu(scores) * self.dim ** -0.5 * w.unsqueeze(-1)).sum(dim=2)          # (B, T, W)

    def top(self, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores, visible (B, T, W) -> the top min(index_topk, W) visible entries (B, T, k) and which of them
        are visible (B, T, k) bool: a query with fewer visible entries than k picks some it cannot see."""
        top = scores.masked_fill(~visible, float("-inf")).topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        return top, visible.gather(-1, top)


class CSACompressor(Compressor):
    """Compressed sparse attention's entries (overlapping windows of compress_rates[CSA] = 4) and its indexer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.head_dim, cfg.compress_rates[CSA], True, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg)


class HCACompressor(Compressor):
    """Heavily compressed attention's entries: disjoint windows of compress_rates[HCA] = 128, all attended to."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.head_dim, cfg.compress_rates[HCA], False, cfg.rms_norm_eps)


class GroupedLinear(nn.Module):
    """Grouped output projection, first half (report Section 2.3.1): the heads' outputs in o_groups groups, each
    (H * head_dim / g) -> o_lora_rank with its own block of weight (g * o_lora_rank, H * head_dim / g)."""

    def __init__(self, in_per_group: int, rank: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * rank, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., g, in_per_group) -> (..., g, rank)."""
        w = self.weight.view(self.groups, -1, x.shape[-1])                               # (g, rank, in)
        return torch.einsum("...gi,gri->...gr", x, w)


def window_mask(positions: torch.Tensor, window: int) -> torch.Tensor:
    """positions (B, T) -> (B, T, T) boolean: key s is visible to query t if t - window < s <= t."""
    d = positions[:, :, None] - positions[:, None, :]
    return (d >= 0) & (d < window)


def attend(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor, picked=None) -> torch.Tensor:
    """Softmax attention of q (B, H, T, d) over the shared K = V head kv (B, S, d), where allowed (B, T, S), with
    one extra logit per head (its sink) that takes a share of the softmax and returns nothing -> (B, T, H, d).
    picked: (entries (B, T, k, d), valid (B, T, k)), keys of each query's own (CSA's gathered top-k) that join the
    same softmax."""
    B, H, T, d = q.shape

    def bias(ok):
        return torch.zeros(ok.shape, device=q.device).masked_fill(~ok, float("-inf"))

    scores = torch.matmul(q, kv.unsqueeze(1).transpose(-1, -2)) * d ** -0.5 + bias(allowed)[:, None]  # (B, H, T, S)
    if picked is not None:
        own, valid = picked
        own_scores = torch.einsum("bhtd,btkd->bhtk", q, own) * d ** -0.5 + bias(valid)[:, None]       # (B, H, T, k)
        scores = torch.cat([scores, own_scores], dim=-1)
    logits = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(B, -1, T, 1).to(scores.dtype)], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = logits.softmax(dim=-1)[..., :-1].to(kv.dtype)                                 # the sink's share is dropped
    out = torch.matmul(probs[..., :kv.shape[1]], kv.unsqueeze(1))                          # (B, H, T, d)
    if picked is not None:
        out = out + torch.einsum("bhtk,btkd->bhtd", probs[..., kv.shape[1]:], own)
    return out.transpose(1, 2)


class V4Attention(nn.Module):
    """One V4 attention: the window of raw tokens plus the layer type's compressed entries, one shared K=V head."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        H, d, q = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
        self.kind, self.n_heads, self.head_dim, self.eps = cfg.layer_types[layer], H, d, cfg.rms_norm_eps
        self.layer, self.window = layer, cfg.sliding_window
        self.rope_kind = "main" if self.kind == SLIDING else "compress"
        self.q_a_proj = Linear(cfg.hidden_size, q, bias=False)
        self.q_a_norm = RMSNorm(q, cfg.rms_norm_eps)
        self.q_b_proj = Linear(q, H * d, bias=False)
        self.kv_proj = Linear(cfg.hidden_size, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(H * d // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))                            # one logit per head that takes no value
        self.compressor = {CSA: CSACompressor, HCA: HCACompressor}.get(self.kind, lambda c: None)(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: V4Rotary, cache=None) -> torch.Tensor:
        """x (B, T, hidden), positions (B, T) -> (B, T, hidden). With a cache (V4Cache), x holds the new tokens."""
        cos, sin = rotary(positions, self.rope_kind)
        q_latent, q, kv = self.project(x, cos, sin)
        if cache is None:
            allowed = window_mask(positions, self.window)                                 # (B, T, T)
        else:        # the window's cached keys, then these: (B, S, d), (B, T, S)
            kv, allowed = cache.window(self.layer, kv, self.window)
        picked = None
        if self.compressor is not None:
            entries, visible = self.compressed(x, q_latent, positions, rotary, cache)     # (B, W, d), (B, T, W)
            if entries.dim() == 4:           # CSA's gathered top-k: (B, T, k, d), (B, T, k), each query its own
                picked = entries, visible
            else:
                kv, allowed = torch.cat([kv, entries], dim=1), torch.cat([allowed, visible], dim=-1)
        return self.output(q, kv, allowed, cos, sin, picked)

    # project and output are the attention's arithmetic between the cache's reads and writes: a compiled decode
    # step (infer/compiled.py CompiledV4) swaps in their torch.compile'd twins for the step's duration
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, hidden) -> the query latent (B, T, q_lora_rank), the normed and rotated queries (B, H, T, d)
        and keys = values (B, T, d)."""
        B, T, _ = x.shape
        q_latent = self.q_a_norm(self.q_a_proj(x))                                        # (B, T, q_lora_rank)
        q = unit_rms(self.q_b_proj(q_latent).view(B, T, self.n_heads, self.head_dim), self.eps)
        q = rope_tail(q, cos, sin).transpose(1, 2)                                        # (B, H, T, d)
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)                           # (B, T, d): K = V
        return q_latent, q, kv

    def output(self, q, kv, allowed, cos, sin, picked=None) -> torch.Tensor:
        """attend (q (B, H, T, d) over kv (B, S, d) where allowed (B, T, S), and picked), then the heads back to
        hidden -> (B, T, hidden)."""
        B, _, T, _ = q.shape
        out = attend(q, kv, allowed, self.sinks, picked)                                  # (B, T, H, d)
        # V = K carries its keys' rotation: rotating the output back by the query's position leaves, on the rope
        # dims, a function of the relative positions only
        out = rope_tail(out, cos, -sin)
        groups = self.o_a_proj(out.reshape(B, T, self.o_a_proj.groups, -1))              # (B, T, g, o_lora_rank)
        return self.o_b_proj(groups.flatten(2))

    def compressed(self, x, q_latent, positions, rotary, cache=None):
        """The compressed entries (B, W, d) and which each query may attend to (B, T, W): entry w summarises tokens
        up to (w + 1) * rate - 1, so query t sees it once t + 1 >= (w + 1) * rate; CSA keeps the indexer's top-k.
        With a cache, W counts every entry of the sequences so far, and a CSA step that reads less by gathering
        (gather_selected) gets each query's chosen entries (B, T, k, d) and which of them are visible (B, T, k)."""
        c = self.compressor

        def visible(n):
            ready = (positions + 1) // c.rate                                             # (B, T)
            return torch.arange(n, device=x.device).view(1, 1, -1) < ready[..., None]

        if not isinstance(c, CSACompressor):
            entries = c.compress(x, rotary, cache, self.layer)
            return entries, visible(entries.shape[1])
        scores = c.indexer.scores(x, q_latent, positions, rotary, cache, self.layer)      # (B, T, W)
        W = scores.shape[-1]
        top, valid = c.indexer.top(scores, visible(W))                                    # (B, T, k) each
        if cache is not None and gather_selected(x.shape[1], W, top.shape[-1]):
            c.compress(x, rotary, cache, self.layer, read=False)
            return cache.selected(self.layer, c.cache_name, top), valid                   # (B, T, k, d)
        entries = c.compress(x, rotary, cache, self.layer)     # (with no entry yet it still updates its cache)
        return entries, torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, valid)


def hyper_connection(streams, fn, base, scale, iters: int, eps: float, hc_eps: float):
    """mHC's weights from the streams and what the block reads (HyperConnection's arithmetic, a pure function of
    tensors: infer/compiled.py compiles it, one graph for every layer). streams (B, T, n, h), fn ((2+n) n, n h),
    base ((2+n) n), scale (3) -> post (B, T, n), comb (B, T, n, n), the block's input (B, T, h)."""
    B, T, n, _ = streams.shape
    mix = F.linear(unit_rms(streams.reshape(B, T, -1).float(), eps), fn.float())     # (B, T, (2+n) n)
    pre, post, comb = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = torch.sigmoid(pre * scale[0] + pre_b) + hc_eps                                # (B, T, n)
    post = 2 * torch.sigmoid(post * scale[1] + post_b)                                  # (B, T, n)
    comb = torch.softmax((comb * scale[2] + comb_b).view(B, T, n, n), dim=-1) + hc_eps  # (B, T, n, n)
    comb = sinkhorn(comb, iters, hc_eps)
    return post, comb, (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def hyper_collapse(streams, fn, base, scale, eps: float, hc_eps: float) -> torch.Tensor:
    """HyperHead's arithmetic: streams (B, T, n, h), fn (n, n h), base (n), scale (1) -> (B, T, h)."""
    mix = F.linear(unit_rms(streams.flatten(2).float(), eps), fn.float())               # (B, T, n)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connections (mHC, report Section 2.2): from the hc_mult streams (B, T, n, h),
    pre (n) collapses them into the block's input, post (n) spreads its output back, comb (n x n) mixes the
    residual streams; comb is projected towards the doubly stochastic matrices by hc_sinkhorn_iters Sinkhorn-Knopp
    normalisations (columns, then rows and columns), so the mixing neither grows nor shrinks the streams."""

    # the arithmetic (hyper_connection); a compiled decode step (infer/compiled.py CompiledV4) swaps in its
    # torch.compile'd twin for the step's duration
    weights = staticmethod(hyper_connection)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = self.n = cfg.hc_mult
        self.iters, self.hc_eps, self.eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * cfg.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor):
        """streams (B, T, n, h) -> post (B, T, n), comb (B, T, n, n), the block's input (B, T, h)."""
        return self.weights(streams, self.fn, self.base, self.scale, self.iters, self.eps, self.hc_eps)


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp on positive (..., n, n): normalise columns, then iters - 1 times rows and columns, each
    dividing by its sums + eps. Without gradients (inference) the same arithmetic runs in place on a bordered copy
    (sinkhorn_bordered), in 2 calls a normalisation instead of 3."""
    if not torch.is_grad_enabled():
        return sinkhorn_bordered(m, iters, eps)
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def sinkhorn_bordered(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """sinkhorn's arithmetic for inference: m sits in a (..., n + 1, n + 1) matrix bordered by eps (an extra column
    and row, corner 0), so a row's sum over the bordered row is its sum + eps in one reduction, and each division
    is in place. A decode step's matrices are tiny (n x n per token), so the cost is the number of calls: 2 per
    normalisation instead of 3. Equal to the plain loop up to float rounding (the eps joins the sum last either
    way; tests/test_v4_engine.py checks 1e-6)."""
    n = m.shape[-1]
    bordered = F.pad(m, (0, 1, 0, 1), value=eps)                                          # (..., n+1, n+1)
    bordered[..., n, n] = 0
    core, rows, cols = bordered[..., :n, :n], bordered[..., :n, :], bordered[..., :, :n]  # views: (n, n) (n, n+1) (n+1, n)
    core.div_(cols.sum(dim=-2, keepdim=True))
    for _ in range(iters - 1):
        core.div_(rows.sum(dim=-1, keepdim=True))
        core.div_(cols.sum(dim=-2, keepdim=True))
    return core


class HyperHead(nn.Module):
    """The last collapse of the streams into one hidden state, before the final norm (pre weights only)."""

    collapse = staticmethod(hyper_collapse)         # swapped like HyperConnection.weights in a compiled step

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, self.eps, self.hc_eps = cfg.hc_mult, cfg.rms_norm_eps, cfg.hc_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """(B, T, n, h) -> (B, T, h)."""
        return self.collapse(streams, self.hc_fn, self.hc_base, self.hc_scale, self.eps, self.hc_eps)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit): V4's experts bound their activations (swiglu_limit)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class SharedExpert(nn.Module):
    """The shared expert: a SwiGLU MLP of moe_intermediate_size, clamped as the routed ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, inter = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        self.gate_proj, self.up_proj = Linear(h, inter, bias=False), Linear(h, inter, bias=False)
        self.down_proj = Linear(inter, h, bias=False)
        self.limit = cfg.swiglu_limit

    def forward(self, x):
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class ClampedExperts(Experts):
    """The routed experts (stacked as moe.Experts), each SwiGLU clamped at swiglu_limit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.limit = cfg.swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), weights/idx (N, k) -> (N, hidden): a loop over the experts that were picked (training);
        without gradients, sorted_forward."""
        if not torch.is_grad_enabled():
            return self.sorted_forward(x, weights, idx)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            token, slot = torch.where(idx == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(clamped_swiglu(gate, up, self.limit), self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out

    def sorted_forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The loop's arithmetic with the N*k (token, expert) pairs sorted by expert, each projection one grouped
        matmul (moe.grouped_linear, as moe.Experts): a fixed number of calls however many experts a step hits (a
        batch of decode rows hits most of them). Inference only: the loop stays the training path."""
        N, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)                                                 # (N*k,) grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.down_proj.shape[0])                  # (E,) pairs per expert
        gate, up = grouped_linear(x[token], self.gate_up_proj, counts).chunk(2, dim=-1)   # (N*k, inter) each
        ys = grouped_linear(clamped_swiglu(gate, up, self.limit), self.down_proj, counts)  # (N*k, hidden)
        return torch.zeros_like(x).index_add_(0, token, (ys * weights.flatten()[order, None]).to(x.dtype))


SCORES = {"sqrtsoftplus": lambda s: F.softplus(s).sqrt(), "sigmoid": torch.sigmoid,
          "softmax": lambda s: s.softmax(dim=-1)}


class V4Gate(nn.Module):
    """Routing: scores = sqrt(softplus(x W^T)) (scoring_func); the experts are the top-k of scores + bias (learned,
    "moe"), or the frozen table tid2eid[token id] (hash routing, "hash_moe": report Section 2.1); their weights
    are their scores normalised to sum 1, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.k, self.hashed, self.scale = cfg.num_experts_per_tok, hashed, cfg.routed_scaling_factor
        self.score = SCORES[cfg.scoring_func]
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor):
        """x (N, hidden), input_ids (N,) -> weights (N, k), experts (N, k), scores (N, E) (as moe.Gate)."""
        scores = self.score(F.linear(x, self.weight).float())                            # (N, E)
        if self.hashed:
            idx = self.tid2eid[input_ids].long()
        else:
            idx = torch.topk(scores + self.e_score_correction_bias, self.k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.scale, idx, scores


class V4MoE(nn.Module):
    """Routed experts (hash or learned routing), one shared expert. A learned-routing layer in training keeps V3's
    sequence-wise balance loss of its last forward (moe.sequence_balance_loss, V3 eq. 17-20, on the sqrt(softplus)
    scores; weight aux_loss_alpha, pretrain's --balance-alpha), which the V4 report keeps beside the bias update;
    a hash-routed layer has none (its routing is a fixed table). transformers' V4 offers instead a Switch-style
    batch-wise loss over softmax(router logits) (router_aux_loss_coef, off unless output_router_logits)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate = V4Gate(cfg, cfg.mlp_layer_types[layer] == "hash_moe")
        self.experts = ClampedExperts(cfg)
        self.shared_experts = SharedExpert(cfg)
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.balance_loss: torch.Tensor | None = None   # sequence-wise balance loss of the last training forward

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden), input_ids (B, T) -> (B, T, hidden)."""
        B, T, _ = x.shape
        flat = x.reshape(-1, x.shape[-1])
        weights, idx, scores = self.gate(flat, input_ids.reshape(-1))
        self.balance_loss = None
        if self.training and self.aux_loss_alpha > 0 and not self.gate.hashed:
            self.balance_loss = sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1), self.aux_loss_alpha)
        return self.experts(flat, weights, idx).view_as(x) + self.shared_experts(x)


class V4Block(nn.Module):
    """Attention and MoE, each between an mHC collapse and spread: streams' = post * f(pre . streams)
    + comb^T streams (report eq. 5)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = V4Attention(cfg, layer)
        self.mlp = V4MoE(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, streams, positions, rotary, input_ids, cache=None):
        """streams (B, T, n, hidden) -> (B, T, n, hidden)."""
        post, comb, x = self.attn_hc(streams)
        y = self.self_attn(self.input_layernorm(x), positions, rotary, cache)
        streams = mix(streams, post, comb, y)
        post, comb, x = self.ffn_hc(streams)
        return mix(streams, post, comb, self.mlp(self.post_attention_layernorm(x), input_ids))


def mix(streams, post, comb, y):
    """post (B, T, n) x y (B, T, h) + comb^T (B, T, n, n) @ streams (B, T, n, h): sum_j comb[j, i] streams[j]."""
    dt = streams.dtype
    return post.to(dt).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), streams)


def trunk(model, input_ids: torch.Tensor, positions: torch.Tensor, mask=None, cache=None) -> torch.Tensor:
    """Transformer.trunk for V4: embedding copied to hc_mult streams -> blocks -> hc_head -> norm (B, T, hidden).
    cache: a V4Cache (infer/v4_cache.py) planned for this step (its plan() gave `positions`); input_ids are then
    each sequence's new tokens only."""
    if mask is not None:
        raise NotImplementedError("deepseek_v4 runs causal sequences only: packed document masks are not "
                                  "implemented (pass one document per row)")
    x = model.embed_tokens(input_ids)                                                      # (B, T, hidden)
    streams = x.unsqueeze(2).expand(-1, -1, model.cfg.hc_mult, -1).contiguous()            # (B, T, n, hidden)
    for block in model.layers:
        streams = block(streams, positions, model.rotary, input_ids, cache)
    return model.norm(model.hc_head(streams))


@torch.no_grad()
def init_v4(model) -> None:
    """After Transformer.init_weights: transformers' V4 initial values where they differ from ours (mHC scales 1,
    bases, sinks and position biases 0), and a random hash table (each token -> k distinct experts)."""
    for m in model.modules():
        if isinstance(m, (HyperConnection, HyperHead)):
            for name, p in m.named_parameters():
                (p.fill_(1.0) if "scale" in name else p.zero_() if "base" in name else None)
        elif isinstance(m, Compressor):
            m.position_bias.zero_()
        elif isinstance(m, V4Gate) and m.hashed:
            E = m.weight.shape[0]
            m.tid2eid.copy_(torch.rand(m.tid2eid.shape[0], E).argsort(dim=-1)[:, :m.k])
