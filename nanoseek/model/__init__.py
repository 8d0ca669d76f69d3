"""The DeepSeek-V2/V3 model: layers.py, rope.py, mla.py, moe.py, transformer.py."""

from .layers import MLP, RMSNorm
from .mla import MLA
from .moe import Experts, Gate, MoE, sequence_balance_loss, update_bias
from .rope import RotaryEmbedding, apply_rope
from .transformer import Block, MTPLayer, Transformer, document_mask

__all__ = ["MLA", "RMSNorm", "MLP", "Experts", "Gate", "MoE", "sequence_balance_loss", "update_bias",
           "RotaryEmbedding", "apply_rope", "Block", "MTPLayer", "Transformer", "document_mask"]

