"""The models: layers.py, rope.py, mla.py (DeepSeek), dsa.py (V3.2's sparse attention), gqa.py (dense families),
moe.py, transformer.py."""

from .dsa import DSA, IndexRecord, LightningIndexer, indexer_kl, kept_mass
from .gqa import GQA
from .layers import MLP, Linear, RMSNorm, decode_layout
from .mla import MLA
from .moe import Experts, Gate, MoE, sequence_balance_loss, update_bias
from .rope import RotaryEmbedding, apply_rope
from .transformer import Block, MTPLayer, Transformer, document_mask

__all__ = ["MLA", "DSA", "IndexRecord", "LightningIndexer", "indexer_kl", "kept_mass", "GQA", "Linear", "decode_layout", "RMSNorm", "MLP", "Experts", "Gate", "MoE", "sequence_balance_loss", "update_bias",
           "RotaryEmbedding", "apply_rope", "Block", "MTPLayer", "Transformer", "document_mask"]

