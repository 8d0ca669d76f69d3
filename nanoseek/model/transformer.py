"""The decoder: embedding -> Blocks (attention + MLP or MoE) -> RMSNorm -> head, plus MTP.

DeepSeek-V2/V3 blocks are MLA + a dense MLP or MoE, with MTP modules after the trunk; the dense families (qwen2,
llama, qwen3) are GQA + a SwiGLU MLP in every block, with no MTP. The block picks its modules from the config.

`Transformer(cfg)(input_ids)` returns logits (B, T, vocab). It is the ONE forward of every caller; the rest are
keywords: `positions` (B, T) for RoPE, `mask` (boolean, True = may attend) for the full attention path, e.g.
`document_mask` of packed training rows, `cache` (the cache protocol of MLA.forward: latents, absorbed path; or of
GQA.forward: keys and values), and `return_hidden` (the final hidden state, input to the MTP module). Its pieces are public so that no
caller writes the forward again: `trunk` (embedding -> blocks -> final norm), `head` (the output projection),
`mtp_hidden` / `mtp_forward` (one multi-token-prediction depth) and `losses` (the training objective).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .cpu_cross_entropy import cross_entropy  # F.cross_entropy; on the CPU in float32 one fused kernel
from .dsa import DSA
from .gqa import GQA
from .layers import MLP, Linear, RMSNorm
from .mla import MLA
from .moe import MoE
from .rope import RotaryEmbedding
from .v4 import HyperHead, V4Block, V4MoE, V4Rotary, init_v4
from .v4 import trunk as v4_trunk
from .v4_mtp import V4MTP, main_streams


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of packed rows: documents (B, T), the packed-example index of each token (-1 =
    padding) -> (B, 1, T, T) boolean, True = may attend. A token sees the earlier tokens of its own document only,
    so each document is computed exactly as if it ran alone (with positions restarting at 0). A padding token
    sees itself: a row with no True would make softmax 0/0 = NaN, and NaN poisons the gradients through 0 * NaN."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    same = (documents[:, :, None] == documents[:, None, :]) & (documents >= 0)[:, :, None]        # (B, T, T)
    itself = torch.eye(T, dtype=torch.bool, device=documents.device)
    return ((same & causal) | itself)[:, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.attention == "mla" else GQA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.is_moe_layer(layer) or layer >= cfg.num_hidden_layers  # the MTP block is an MoE block (V3)
        self.mlp = MoE(cfg) if moe and cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, dsa=None, prefix=None):
        """x (B, T, hidden) -> (B, T, hidden); mask, cache, dsa (DeepSeek-V3.2's options) and prefix (a shared
        prefix's keys and values) as in MLA.forward (GQA.forward ignores dsa: no indexer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer, dsa, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(nn.Module):
    """Multi-token prediction module k (V3 Section 2.2, eq. 21-23).

    h'_i = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))] -> Transformer block -> shared head predicts t_{i+k+1}.
    The embedding and output head are the main model's (shared); checkpoint.py writes copies of them under this
    layer's names because published checkpoints carry them. The concatenation puts the embedding first, as the
    published eh_proj weights expect (the order DeepSeek's and vLLM's MTP code use), not the paper's order.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h, bias=False)
        self.block = Block(cfg, layer)
        self.shared_head = SharedHead(cfg)

    def forward(self, hidden, next_emb, cos, sin, mask=None, cache=None, dsa=None):
        """hidden, next_emb (B, T, hidden) -> (B, T, hidden), normed for the shared head."""
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(hidden)], dim=-1))   # (B, T, 2 hidden) -> h
        return self.shared_head.norm(self.block(x, cos, sin, mask, cache, dsa))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        v4 = cfg.model_type == "deepseek_v4"   # model/v4.py: mHC streams, hybrid attention; MTP: model/v4_mtp.py
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList((V4Block if v4 else Block)(cfg, i) for i in range(cfg.num_hidden_layers))
        if v4:
            self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers
        self.mtp = nn.ModuleList(V4MTP(cfg) if v4 else MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp))
        self.rotary = V4Rotary(cfg) if v4 else RotaryEmbedding(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases and the routing bias."""
        std = std or self.cfg.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                continue
            if "norm" in name and name.endswith("weight"):       # (the indexer's LayerNorm also has a bias)
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        for w in self._unfused_matrices():
            w.copy_(torch.empty(w.shape, dtype=w.dtype, device=w.device).normal_(0.0, std))
        for m in self.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()
        if self.cfg.model_type == "deepseek_v4":
            init_v4(self)

    def _unfused_matrices(self):
        """Every weight matrix, the parts of a fused one (gate_up, MLA's qkv_a, GQA's qkv) one by one, in the order
        of the unfused layout (q_a, q_b, kv_a; gate, up; q, k, v): a seeded model draws the same weights as it did
        before the projections were fused (the DSA tests' exact ties depend on them)."""
        kv_a = None
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith("qkv_a_proj.weight"):               # q_a now, kv_a after q_b_proj (the old order)
                q_a, kv_a = p.split([self.cfg.q_lora_rank, p.shape[0] - self.cfg.q_lora_rank])
                yield q_a
            elif name.endswith("qkv_proj.weight"):
                kv = self.cfg.num_key_value_heads * self.cfg.head_dim
                yield from p.split([p.shape[0] - 2 * kv, kv, kv])
            elif name.endswith("gate_up_proj.weight") or name.endswith("experts.gate_up_proj"):
                yield from p.chunk(2, dim=p.dim() - 2)           # [gate; up], per expert when stacked
            else:
                yield p
                if name.endswith("self_attn.q_b_proj.weight") and kv_a is not None:
                    yield kv_a
                    kv_a = None

    def trunk(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              cache=None, dsa: DSA | None = None, prefix=None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The main model up to its final norm: input_ids (B, T) -> h (B, T, hidden) and rope = (cos, sin), each
        (B, T, rope_dim // 2). The head is separate so that a caller who needs logits at a few positions
        (the engine) pays vocab x hidden for those only; rope serves the MTP module at the same positions.
        dsa: DeepSeek-V3.2's per-forward options (model/dsa.py: dense or sparse, training records). prefix
        (rl.SharedPrefix): every layer's attention also reads keys and values computed before these tokens, e.g.
        GRPO's prompt of a group, computed once and read by its G completions (positions then continue the
        prefix's); deepseek_v2/v3 and the dense families, full path."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if prefix is not None and self.cfg.model_type == "deepseek_v4":
            raise ValueError("a shared prefix is for deepseek_v2/v3 and the dense families: deepseek_v4's attention "
                             "(model/v4.py) does not take one")
        if self.cfg.model_type == "deepseek_v4":
            if dsa is not None:
                raise ValueError("dsa options are for deepseek_v32; deepseek_v4's indexer is part of its CSA layers")
            return v4_trunk(self, input_ids, positions, mask, cache), None
        rope = self.rotary(positions)
        x = self.embed_tokens(input_ids)                                               # (B, T, hidden)
        for block in self.layers:
            x = block(x, *rope, mask, cache, dsa, prefix)
        return self.norm(x), rope

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states (..., hidden) -> logits (..., vocab)."""
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache=None, return_hidden: bool = False, logits_to_keep: int = 0,
                dsa: DSA | None = None, prefix=None):
        """input_ids (B, T) -> logits (B, T, vocab) [, final hidden (B, T, hidden) after the last norm].

        positions (B, T): RoPE positions (default 0..T-1). mask: boolean (B, 1, T, T) or (T, T), True = may
        attend, for the full attention path (default causal). cache: the absorbed path through a latent cache
        (MLA.forward's protocol), which supplies its own mask. logits_to_keep k > 0: logits of the last k
        positions only (B, k, vocab), as transformers' argument: the head is skipped where no loss is taken.
        dsa (deepseek_v32 only): dsa.DSA(sparse=False) runs dense attention; DSA(records=[]) collects, per layer,
        the indexer's scores and the attention it is trained to match (model/dsa.py). prefix: keys and values
        shared by several rows, before their tokens (trunk; rl.SharedPrefix)."""
        h, _ = self.trunk(input_ids, positions, mask, cache, dsa, prefix)
        logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return (logits, h) if return_hidden else logits

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, cache=None, depth: int = 0, rope=None,
                   dsa: DSA | None = None) -> torch.Tensor:
        """MTP depth `depth` (V3 eq. 21-22): hidden (B, T, hidden) of position i (the trunk's for depth 0, else
        depth - 1's) and the token t_{i+depth+1} (B, T) -> this depth's hidden state (B, T, hidden), normed for
        the shared head. rope: the trunk's (cos, sin) at the same positions, or None to compute it.
        deepseek_v4: hidden is the main model's hc_mult streams (B, T, n, hidden) (model/v4_mtp.py)."""
        if self.cfg.model_type == "deepseek_v4":
            return self._v4_mtp(hidden, next_ids, positions, mask, cache, depth)[0]
        if rope is None:
            B, T = next_ids.shape
            if positions is None:
                positions = torch.arange(T, device=next_ids.device).expand(B, T)
            rope = self.rotary(positions)
        return self.mtp[depth](hidden, self.embed_tokens(next_ids), *rope, mask, cache, dsa)

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, cache=None, depth: int = 0, rope=None, dsa: DSA | None = None):
        """mtp_hidden plus the shared head: -> (logits (B, T, vocab) for t_{i+depth+2}, what feeds depth + 1: the
        MTP hidden state, or for deepseek_v4 its hc_mult streams (B, T, n, hidden))."""
        if self.cfg.model_type == "deepseek_v4":
            h, streams = self._v4_mtp(hidden, next_ids, positions, mask, cache, depth)
            return self.head(h), streams
        h = self.mtp_hidden(hidden, next_ids, positions, mask, cache, depth, rope, dsa)
        return self.head(h), h

    def _v4_mtp(self, streams, next_ids, positions, mask, cache, depth):
        """V4's MTP depth (model/v4_mtp.py): streams (B, T, n, hidden), next_ids (B, T) -> (normed hidden, streams)."""
        if mask is not None or cache is not None:
            raise NotImplementedError("deepseek_v4's MTP module runs the full causal forward only (no document "
                                      "mask, no cache), as its trunk does")
        if positions is None:
            positions = torch.arange(next_ids.shape[1], device=next_ids.device).expand(next_ids.shape)
        return self.mtp[depth](streams, self.embed_tokens(next_ids), positions, self.rotary, next_ids)

    def losses(self, input_ids: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
               documents: torch.Tensor | None = None, ignore_index: int = -100, dsa: DSA | None = None) -> dict:
        """Next-token loss, the MTP loss (V3 eq. 24-25: mean over depths) and the sequence-wise balance loss.

        targets[b, i] is the token after input_ids[b, i] (or ignore_index); MTP depth k at position i predicts
        targets[b, i + k + 1], the token k + 2 places after input_ids[b, i]. documents (B, T), for packed rows:
        the example index of each token (-1 = padding); attention stays inside each example (document_mask, built
        once for every layer) and an MTP label from another example is ignored. dsa (deepseek_v32): dense or sparse
        attention for every layer, MTP included; its records come from the main model's layers only.
        """
        mask = None if documents is None else document_mask(documents)                # (B, 1, T, T)
        with main_streams(self) as streams:          # deepseek_v4: its MTP reads the streams, not h (v4_mtp.py)
            h, rope = self.trunk(input_ids, positions, mask, dsa=dsa)
        logits = self.head(h)
        V = logits.shape[-1]
        out = {"loss": cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=ignore_index)}
        mtp_dsa = None if dsa is None else DSA(sparse=dsa.sparse)
        out["mtp_loss"] = self._mtp_loss(input_ids, targets, streams[-1] if streams else h, rope, mask, documents,
                                         ignore_index, mtp_dsa, positions)
        bl = [m.balance_loss for m in self.moe_layers() if getattr(m, "balance_loss", None) is not None]
        out["balance_loss"] = torch.stack(bl).sum() if bl else logits.new_zeros(())
        return out

    def _mtp_loss(self, input_ids, targets, h, rope, mask, documents, ignore_index, dsa=None,
                  positions=None) -> torch.Tensor:
        """Mean over depths of each depth's mean cross-entropy (a depth with no label to predict counts 0)."""
        losses = []
        for k in range(len(self.mtp)):
            T = input_ids.shape[1] - (k + 1)
            if T <= 0:
                break
            labels = targets[:, k + 1:k + 1 + T]                                       # (B, T)
            if documents is not None:  # position i's label comes from position i + k + 1: same example only
                labels = labels.masked_fill(documents[:, k + 1:k + 1 + T] != documents[:, :T], ignore_index)
            # depth k sees h_i (from depth k-1) and the embedding of t_{i+k+1}, read from input_ids (targets may
            # hold ignore_index where the loss is masked, which is no token to embed); the first T positions keep
            # their rope and their rows/columns of the mask
            rope_k = None if rope is None else (rope[0][:, :T], rope[1][:, :T])         # (None: V4's own rotary)
            mask_k = None if mask is None else mask[..., :T, :T]
            pos_k = None if positions is None else positions[:, :T]
            logits, h = self.mtp_forward(h[:, :T], input_ids[:, k + 1:k + 1 + T], pos_k, mask_k, depth=k, rope=rope_k,
                                         dsa=dsa)
            # sum / count rather than the mean: an all-ignored depth (short packed examples) gives 0, not 0/0 NaN
            ce = cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="sum")
            losses.append(ce / (labels != ignore_index).sum().clamp(min=1))
        return torch.stack(losses).mean() if losses else h.new_zeros(())

    def moe_layers(self) -> list[MoE | V4MoE]:
        """The MoE modules of the main model (not the MTP block), in layer order."""
        return [b.mlp for b in self.layers if isinstance(b.mlp, (MoE, V4MoE))]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device
