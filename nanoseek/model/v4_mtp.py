"""DeepSeek-V4's multi-token prediction module (num_nextn_predict_layers, one in the published models).

As in V3 (Section 2.2) depth k combines the hidden state of position i with the embedding of token t_{i+k+1}
and predicts t_{i+k+2} through the shared embedding and output head. What V4 changes is the residual: the main
model carries hc_mult streams (mHC), and the MTP module reads those streams, not the final hidden state. In
DeepSeek's published inference code (model.py, MTPBlock) the module IS a V4 block with a few extra tensors:

    x = e_proj(enorm(Emb(t_{i+1}))) + h_proj(hnorm(streams_i))      the embedding added to every stream
    streams' = Block(x)                                              one V4 block over the hc_mult streams
    logits = head(norm(hc_head(streams')))                           its own stream collapse and final norm

Its block is a sliding-window layer with learned (not hashed) routing: in V4-Flash's config.json the MTP layer's
entry of compress_ratios (the last, index num_hidden_layers) is 0, its tensors hold no compressor, and its gate has
a bias (mtp.0.ffn.gate.bias). transformers builds no MTP for V4 (it ignores mtp.* on load); weights.py maps the
published names mtp.K.* onto ours (mtp.K.self_attn..., mtp.K.hc_head.hc_fn, ...).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .v4 import HyperHead, V4Block, V4Rotary

MTP_LAYER = {"layer_types": ["sliding_attention"], "mlp_layer_types": ["moe"]}   # the published MTP layer's kind


class V4MTP(V4Block):
    """One V4 MTP depth: a V4Block (its parameters under the block's own names, as the published MTPBlock(Block))
    plus e_proj / h_proj, enorm / hnorm, its own hc_head and final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.replace(num_hidden_layers=1, **MTP_LAYER), 0)
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.e_proj = Linear(h, h, bias=False)
        self.h_proj = Linear(h, h, bias=False)
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, streams: torch.Tensor, next_emb: torch.Tensor, positions: torch.Tensor, rotary: V4Rotary,
                next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """streams (B, T, n, hidden): the main model's last streams at positions i (or the previous depth's);
        next_emb (B, T, hidden): the embedding of t_{i+1}, next_ids (B, T) its ids; positions (B, T) those of i.
        -> (the hidden state (B, T, hidden), normed for the shared head; this depth's streams (B, T, n, hidden))."""
        x = self.e_proj(self.enorm(next_emb)).unsqueeze(2) + self.h_proj(self.hnorm(streams))   # (B, T, n, hidden)
        streams = super().forward(x, positions, rotary, next_ids)                              # (B, T, n, hidden)
        return self.norm(self.hc_head(streams)), streams


@contextmanager
def main_streams(model):
    """Within the block: the hc_mult streams (B, T, n, hidden) the main model's hc_head collapses, appended to the
    list it yields, for V4's MTP module (recorded by a pre-hook on hc_head, so Transformer.trunk stays the one V4
    forward). Yields an empty list, and records nothing, for a model without hc_head or MTP."""
    seen: list[torch.Tensor] = []
    head = getattr(model, "hc_head", None)
    if head is None or not len(model.mtp):
        yield seen
        return
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
