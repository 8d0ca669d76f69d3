"""The DeepSeek-V2/V3 decoder: embedding -> Blocks (MLA + dense MLP or MoE) -> RMSNorm -> head, plus MTP.

`Transformer(cfg)(input_ids)` returns logits (B, T, vocab). Everything a trainer or an engine needs beyond that
is a keyword: `positions` (B, T) for RoPE, `cache` (the latent KV cache protocol of MLA.forward) and
`return_hidden` (the final hidden state, input to the MTP module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mla import MLA, RMSNorm
from .moe import MLP, MoE
from .rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.is_moe_layer(layer) or layer >= cfg.num_hidden_layers  # the MTP block is an MoE block (V3)
        self.mlp = MoE(cfg) if moe and cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer)
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
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = Block(cfg, layer)
        self.shared_head = SharedHead(cfg)

    def forward(self, hidden, next_emb, cos, sin, cache=None):
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(self.block(x, cos, sin, cache))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for the routing bias."""
        std = std or self.cfg.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        for m in self.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                return_hidden: bool = False):
        """input_ids (B, T) -> logits (B, T, vocab) [, final hidden (B, T, hidden) after the last norm]."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        h = self.norm(x)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                    cache=None, depth: int = 0):
        """MTP depth `depth`: hidden (B, T, hidden) of position i and token t_{i+1} (B, T) -> (logits for t_{i+2},
        the MTP hidden state, which feeds depth + 1)."""
        B, T = next_ids.shape
        if positions is None:
            positions = torch.arange(T, device=next_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        h = self.mtp[depth](hidden, self.embed_tokens(next_ids), cos, sin, cache)
        return self.lm_head(h), h

    def losses(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> dict:
        """Next-token loss, the MTP loss (V3 eq. 24-25: mean over depths) and the sequence-wise balance loss.

        targets[b, i] is the token after input_ids[b, i] (or ignore_index); MTP depth k at position i predicts
        targets[b, i + k + 1], the token k + 2 places after input_ids[b, i].
        """
        logits, h = self.forward(input_ids, return_hidden=True)
        V = logits.shape[-1]
        out = {"loss": F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=ignore_index)}
        mtp_losses = []
        for k in range(len(self.mtp)):
            T = input_ids.shape[1] - (k + 1)
            if T <= 0:
                break
            # depth k sees h_i (from depth k-1) and the embedding of t_{i+k+1}, read from input_ids (targets may
            # hold ignore_index where the loss is masked, which is no token to embed)
            mtp_logits, h = self.mtp_forward(h[:, :T], input_ids[:, k + 1:k + 1 + T], depth=k)
            mtp_losses.append(F.cross_entropy(mtp_logits.reshape(-1, V).float(), targets[:, k + 1:k + 1 + T].reshape(-1),
                                              ignore_index=ignore_index))
        out["mtp_loss"] = torch.stack(mtp_losses).mean() if mtp_losses else logits.new_zeros(())
        bl = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        out["balance_loss"] = torch.stack(bl).sum() if bl else logits.new_zeros(())
        return out

    def moe_layers(self) -> list[MoE]:
        """The MoE modules of the main model (not the MTP block), in layer order."""
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device


class LatentCache:
    """A contiguous latent KV cache for B sequences that advance together (tests, simple generation).

    Holds, per layer, c_kv (B, max_len, kv_lora_rank) and k_pe (B, max_len, qk_rope_head_dim) and nothing else:
    that is all MLA needs. The serving engine's paged cache (nanoseek.infer.cache) implements the same `update`.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.c_kv = torch.zeros(n, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0   # tokens already cached (the same for every layer once a forward finishes)
        self._new = 0

    def update(self, layer, c_kv, k_pe):
        T = c_kv.shape[1]
        start = self.length
        self.c_kv[layer, :, start:start + T] = c_kv
        self.k_pe[layer, :, start:start + T] = k_pe
        self._new = T
        S = start + T
        mask = None
        if T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=c_kv.device).tril(start)
        return self.c_kv[layer, :, :S], self.k_pe[layer, :, :S], mask

    def advance(self):
        """Call after each forward: the tokens just written become part of the context."""
        self.length += self._new
        self._new = 0
