"""The DeepSeek-V2/V3 model: rope.py, mla.py, moe.py, transformer.py."""

from .mla import MLA, RMSNorm
from .moe import MLP, Experts, Gate, MoE, sequence_balance_loss, update_bias
from .rope import RotaryEmbedding, apply_rope
from .transformer import Block, LatentCache, MTPLayer, Transformer

__all__ = ["MLA", "RMSNorm", "MLP", "Experts", "Gate", "MoE", "sequence_balance_loss", "update_bias",
           "RotaryEmbedding", "apply_rope", "Block", "LatentCache", "MTPLayer", "Transformer"]
