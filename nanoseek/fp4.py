"""FP4 (e2m1) weights as DeepSeek-V4 publishes its routed experts: the maths of dequantising them, no file I/O
(checkpoint.py reads the tensors and hands them here).

The format (DeepSeek-V4 inference/model.py and kernel.py; transformers' FineGrainedFP8Config(expert_dtype="fp4")):
- a weight of logical shape (out, in) is stored (out, in / 2), one byte per two consecutive inputs of a row: the
  low nibble holds the even column 2j, the high nibble the odd column 2j + 1 (stored as int8, as the published
  folders do, or uint8 / torch.float4_e2m1fn_x2, the same bytes);
- each nibble is e2m1: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit, so the 16 codes are
  ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} (code 8 is -0.0);
- one scale per row and per block of FP4_BLOCK = 32 inputs, shape (out, in / 32): a power of two (UE8M0,
  2^(byte - 127), stored as float8_e8m0fnu), so weight = value x scale is exact in float32 and in bfloat16.
"""

from __future__ import annotations

import torch

FP4_BLOCK = 32   # inputs per scale, along a row (DeepSeek-V4's fp4_block_size; the MXFP4 block)
# Packed dtypes: bytes holding two e2m1 codes each (float4_e2m1fn_x2 exists from torch 2.8)
PACKED_DTYPES = tuple(d for d in (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if d)


def e2m1_values() -> torch.Tensor:
    """The 16 e2m1 codes as float32, from the bit fields: (-1)^s x 2^(e-1) x (1 + m/2), or m/2 when e = 0."""
    code = torch.arange(16)
    sign, exp, man = 1 - 2 * (code >> 3), (code >> 1) & 3, (code & 1).float()
    magnitude = torch.where(exp == 0, man / 2, torch.ldexp(1 + man / 2, exp - 1))
    return sign * magnitude


_PAIRS = torch.stack([e2m1_values()[torch.arange(256) & 0xF], e2m1_values()[torch.arange(256) >> 4]], dim=-1)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) bytes -> (out, in) float32 e2m1 values, low nibble first."""
    byte = packed.contiguous().view(torch.uint8).long()
    return _PAIRS.to(packed.device)[byte].flatten(-2)          # (out, in/2, 2) -> (out, in)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 weight (out, in / 2) and float32 scales (out, ceil(in / 32)) -> float32 weight (out, in)."""
    w = unpack_fp4(packed)
    return w * scale.repeat_interleave(FP4_BLOCK, dim=-1)[..., :w.shape[-1]]
