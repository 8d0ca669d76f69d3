"""DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556 Section 2.1): the lightning indexer.

For a query token t the indexer scores every token s it may see (paper eq. 1):

    I(t, s) = sum_j w_{t,j} * ReLU(q_{t,j} . k_s)

with index_n_heads small query heads q_{t,j} projected from MLA's query latent, ONE key k_s per token shared by the
heads (as MLA's k_pe is), and per-head weights w_{t,j} projected from the hidden state. MLA then attends only to
the `index_topk` tokens of highest I(t, :) (eq. 2): O(index_topk) attention per query instead of O(context). The
indexer itself still reads every key, but a key is index_head_dim wide (128) where MLA's latent is 576.

As transformers' DeepseekV32Indexer computes it (the oracle, tests/test_dsa.py):
* k_s = LayerNorm(wk h_s), a LayerNorm with a bias (MLA's norms are RMSNorms); q_{t,j} = wq_b(query latent);
* RoPE on the FIRST qk_rope_head_dim dims of q and k, in half-split pairs (MLA's own rope is interleaved);
* the dot products are scaled by index_head_dim^-0.5 and the weights by index_n_heads^-0.5.
DeepSeek's reference also rotates q and k by a Hadamard matrix and scores in FP8: the rotation is orthogonal (dot
products unchanged) and FP8 is a precision optimisation, so neither is here.

Training hooks (paper Section 2.1.1). Pass `dsa=DSA(sparse=..., records=[])` to `Transformer.forward` / `trunk`
/ `losses`: `sparse=False` runs dense attention (the warm-up stage), `sparse=True` (the default of a deepseek_v32
model) attends to the selected tokens only. With `records` a list, every DSA layer of a full-path forward appends
an `IndexRecord`: the indexer's scores (with gradient into the indexer only: its inputs are detached, as the paper
trains the indexer by its own loss alone), the main attention's distribution summed over heads (the KL target, no
gradient) and the selected set. `indexer_kl(records, sparse)` is the indexer's loss (eq. 3 dense, eq. 4 sparse),
`kept_mass(records)` the share of the attention mass the selected set holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .layers import Linear
from .rope import apply_rope


@dataclass
class IndexRecord:
    """What one DSA layer computed in a full-path forward, for the indexer's training objective."""
    layer: int
    index_scores: torch.Tensor   # (B, T, S) float32 I(t, s); -inf where t may not attend (causal / document mask)
    attention: torch.Tensor      # (B, T, S) float32 main attention summed over heads / n_heads: each row sums to 1
    selected: torch.Tensor       # (B, T, S) bool: the top-index_topk visible tokens (all of them when fewer)


@dataclass
class DSA:
    """Per-forward options of DeepSeek Sparse Attention (models without an indexer ignore them)."""
    sparse: bool = True                       # False: dense MLA over every visible token (the indexer still runs)
    records: list[IndexRecord] | None = field(default=None, repr=False)   # a list: collect an IndexRecord per layer


class LightningIndexer(nn.Module):
    """Scores (B, T, S) of T queries over S keys; parameter names as transformers' (self_attn.indexer.*)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim ** -0.5

    def _rope(self, x, cos, sin):
        """Half-split RoPE on the first qk_rope_head_dim dims of x (..., index_head_dim); the rest passes."""
        rot, rest = x.split([self.rope, self.head_dim - self.rope], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin, interleave=False), rest], dim=-1)

    def keys(self, x, cos, sin):
        """x (B, T, hidden) -> the one indexer key per token (B, T, index_head_dim): what the cache stores."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def forward(self, x, q_latent, cos, sin, keys):
        """x (B, T, hidden), q_latent (B, T, q_lora_rank), keys (B, S, index_head_dim) -> I (B, T, S) float32."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), cos, sin)   # (B, T, n, d)
        # in place: at a long context the (B, T, n, S) products are the indexer's largest tensor (4 MB a query at
        # 16k tokens); scaling and ReLU in new tensors cost ~25% more than the matmul alone (bench/dsa.py)
        dots = (q.float() @ keys.float().transpose(1, 2)[:, None]).mul_(self.scale).relu_()   # (B, T, n, S)
        w = self.weights_proj(x).float() * self.n_heads ** -0.5                                 # (B, T, n)
        return (w[:, :, None, :] @ dots).squeeze(2)                                              # (B, T, S)


def causal_visible(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool: the last T of S positions as queries, each seeing itself and everything before."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def top_k(scores: torch.Tensor, visible: torch.Tensor, k: int):
    """The selection of eq. 2: scores (B, T, S), visible (B|1, T, S) bool -> (positions (B, T, k') of the top
    k' = min(k, S) visible scores, valid (B, T, k') bool: False where a row has fewer than k' visible tokens).

    Equal scores go to the later token. Ties are common (a token none of a query's heads responds to scores exactly
    0 after the ReLU), and torch.topk's choice among them depends on the shape of the call: decoding, chunked
    prefill and MTP verification would select different sets for the same query. So the top-k runs over int64 keys
    that order like the float32 scores, with the position in the low 32 bits."""
    S = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32).long()            # + 0.0 turns -0.0 into 0.0
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)            # negative floats: flip to ascending order
    keys = (order * 2 ** 32 + torch.arange(S, device=scores.device)).masked_fill(~visible, torch.iinfo(torch.int64).min)
    positions = keys.topk(min(k, S), dim=-1).indices
    return positions, visible.expand_as(scores).gather(-1, positions)


def selection_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, S) bool: True at the top-k visible tokens of each query (all visible ones when there are <= k)."""
    positions, valid = top_k(scores, visible, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, positions, valid)


def indexer_kl(records: list[IndexRecord], sparse: bool) -> torch.Tensor:
    """The indexer's loss, mean over layers and query tokens of KL(p_t || softmax(I_t)) (paper eq. 3 and 4).

    p_t is the main attention summed over heads and L1-normalised (record.attention, a fixed target). Dense
    warm-up (sparse=False): over every visible token. Sparse training: over the selected set S_t only, where both
    distributions live (the attention was computed on S_t)."""
    losses = []
    for r in records:
        support = r.selected if sparse else torch.isfinite(r.index_scores)
        log_q = torch.log_softmax(r.index_scores.masked_fill(~support, float("-inf")), dim=-1)
        p = r.attention
        kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q.clamp_min(-1e30)), 0.0).sum(-1)
        losses.append(kl.mean())
    return torch.stack(losses).mean()


def kept_mass(records: list[IndexRecord]) -> torch.Tensor:
    """Mean over layers and query tokens of the attention mass inside the selected set (1.0: selection loses
    nothing). Meaningful on a dense forward, where record.attention is the full attention."""
    return torch.stack([(r.attention * r.selected).sum(-1).mean() for r in records]).mean()


# --------------------------------------------------------------------------------------------- training stages
STAGES = ("warmup", "sparse", "dense")   # `nanoseek pretrain --dsa`


def trains(name: str, stage: str | None) -> bool:
    """Whether parameter `name` of the model learns in a training stage (paper Section 2.1.1): the dense "warmup"
    trains the indexers alone, "sparse" everything, "dense" (the dense model the warm-up starts from, or a dense
    baseline) everything but the indexers. The MTP block's indexer never learns: Transformer.losses collects
    records from the main layers only, so no loss would reach it."""
    if ".indexer." not in name:
        return stage != "warmup"
    return stage in ("warmup", "sparse") and not name.startswith("mtp.")


def stage_loss(stage: str, records: list[IndexRecord], lm_loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A stage's training loss from the model's loss L and the records of its forward, and what to log. "warmup":
    the indexer KL alone, over the dense attention (eq. 3). "sparse": L + the KL on the selected set (eq. 4); the
    KL reaches only the indexers (their inputs are detached), L never does (the selection is not differentiable),
    so this sum optimises the two separately, as the paper does. "dense": L, the KL only logged. kept_mass is
    logged except in "sparse", whose attention covers the selected set only (see dense_kept_mass)."""
    kl = indexer_kl(records, sparse=stage == "sparse")
    logs = {"indexer_kl": kl} if stage == "sparse" else {"indexer_kl": kl, "kept_mass": kept_mass(records)}
    return {"warmup": kl, "sparse": lm_loss + kl}.get(stage, lm_loss), logs


@torch.no_grad()
def dense_kept_mass(forward, *args, **kwargs) -> torch.Tensor:
    """kept_mass of a dense `forward(*args, dsa=..., **kwargs)` without gradients (about a third of a training
    step): what sparse training measures every few steps, its own forward attending to the selected set only."""
    dsa = DSA(sparse=False, records=[])
    forward(*args, dsa=dsa, **kwargs)
    return kept_mass(dsa.records)
