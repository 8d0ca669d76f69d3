"""Rotary position embedding (RoFormer, Su et al. 2021) with YaRN or llama3 context extension.

DeepSeek-V2 Section 2.1.3: RoPE is incompatible with the low-rank KV compression, so in MLA a separate
`qk_rope_head_dim` slice of each query head and ONE shared key slice (k_pe) carry the positions. The dense families
(GQA) rotate every q/k head over its whole head_dim, in half-split pairs.
YaRN (Peng et al. 2023, used by V2/V3 to extend 4K -> 128K): frequencies whose wavelength is long compared with
the original context are interpolated (divided by `factor`), short ones are kept, with a linear ramp between the
`beta_fast`/`beta_slow` correction dimensions; cos/sin get an attention factor mscale(factor, mscale) /
mscale(factor, mscale_all_dim).
llama3 (Llama 3.1, used by R1-Distill-Llama): frequencies whose wavelength exceeds original / low_freq_factor are
divided by `factor`, those shorter than original / high_freq_factor are kept, and the band between is blended
linearly in original / wavelength; no attention factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def yarn_scaling(cfg: ModelConfig) -> dict | None:
    """cfg.rope_scaling when it asks for YaRN, else None (plain RoPE)."""
    rs = cfg.rope_scaling or {}
    return rs if rs.get("type", rs.get("rope_type")) == "yarn" else None


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_dim(cfg: ModelConfig) -> int:
    """How many dims of a head rotate: MLA's decoupled qk_rope_head_dim, or GQA's whole head_dim."""
    return cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rope_dim // 2,) and the cos/sin attention factor."""
    dim, base = rope_dim(cfg), cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("type", rs.get("rope_type"))
    if kind == "llama3":
        return llama3_frequencies(inv_freq, rs), 1.0
    if kind == "yarn":
        return yarn_frequencies(inv_freq, rs, dim, base)
    return inv_freq, 1.0


def llama3_frequencies(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama 3.1's scaling of the inverse frequencies (see the module docstring)."""
    factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    original = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # smooth: 0 at wavelength original / low_freq_factor (fully interpolated), 1 at original / high_freq_factor
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def yarn_frequencies(inv_freq: torch.Tensor, rs: dict, dim: int, base: float) -> tuple[torch.Tensor, float]:
    """YaRN's interpolated inverse frequencies and attention factor (see the module docstring)."""
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dimension whose wavelength makes num_rotations turns in `original`
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):  # transformers' default; gpt-oss-style configs set truncate=false
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attn = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attn = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attn = yarn_get_mscale(factor)
    return inv_freq, attn


class RotaryEmbedding(nn.Module):
    """Maps positions (B, T) to (cos, sin), each (B, T, rope_dim // 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        training_graph = torch.compiler.is_compiling() and torch.is_grad_enabled()   # (a decode graph: a few rows)
        return (rope_angles if training_graph else cos_sin)(positions, self.inv_freq, self.attention_factor)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) and inverse frequencies (d/2,) -> factor * cos and factor * sin, each (B, T, d/2)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, d/2)
    return freqs.cos() * factor, freqs.sin() * factor


# One opaque op inside a compiled training graph. Inlined, inductor recomputes cos and sin in every kernel that reads
# them (each layer's q and k rotation, forward and backward), in loops that the interleaved rotation keeps scalar:
# ~4% of the compiled `cpu` preset's training step (docs/benchmarks.md, "The whole loss as one graph").
@torch.library.custom_op("nanoseek::rope_angles", mutates_args=())
def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cos_sin(positions, inv_freq, factor)


@rope_angles.register_fake
def _(positions, inv_freq, factor):
    cos = positions.new_empty((*positions.shape, inv_freq.shape[0]), dtype=torch.float32)
    return cos, torch.empty_like(cos)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, [heads,] d) by the angles in cos/sin (B, T, d/2).

    interleave=True: pairs are adjacent dims (x0, x1), (x2, x3)... as DeepSeek's published weights (a complex
    multiply). interleave=False: pairs are (x_i, x_{i+d/2}) (the "rotate_half" layout). Either way the layout of
    the output equals the input's, so q_pe . k_pe is the same dot product transformers computes.
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleave and torch.compiler.is_compiling():
        return rotate_pairs(x, cos, sin)
    if interleave:
        # (x0 + i x1) * (cos + i sin): one complex multiply, as DeepSeek's reference code does. About 4x faster
        # forward+backward on CPU than rotating strided even/odd slices. Complex bf16 does not exist: go via fp32.
        xf = x.float()
        if xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):  # complex views need even strides
            xf = xf.contiguous()
        xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * torch.complex(cos.float(), sin.float())).flatten(-2).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's interleaved rotation in real arithmetic: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) for
    adjacent pairs; cos/sin already broadcast to x's heads. What a compiled graph runs (infer/compiled.py): inductor
    fuses it into its neighbours, where complex tensors would cut the graph (tests/test_compiled.py: equal to the
    complex multiply)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.float(), sin.float()
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
