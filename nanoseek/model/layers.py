"""Layers shared by every block: the projection (Linear), RMSNorm and the SwiGLU MLP (dense layers and shared
experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv

# Inference on the CPU: which matrix product runs a projection. Decoding is a stream of skinny products (one row
# per sequence), and there MKL's product over nn.Linear's (out, in) weight reads memory at about half the speed of
# oneDNN's or of MKL's over an (in, out) copy (docs/benchmarks.md, "Dense decode"). Above ONEDNN_MIN_WEIGHT elements
# the projection runs through oneDNN (its fixed cost, ~13 us a call, is lost below). One or two rows run
# model/gemv.py's kernel, which reads the (out, in) weight at memory speed, once decode_layout() has built it; without a compiler
# decode_layout() stores the widest weights (in, out) for MKL's one-row product instead.
ONEDNN_MIN_WEIGHT = 1 << 20
_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose forward, when no gradient is wanted on the CPU in
    float32, picks the faster matrix product; training and other devices run F.linear as nn.Linear does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if 0 < x.numel() <= gemv.MAX_ROWS * x.shape[-1] and gemv.applies(w, x):   # 1-2 rows: gemv.py's kernel,
            return gemv.linear(x, w, self.bias)                                  # where decode_layout built it
        if (_ONEDNN is None or torch.is_grad_enabled() or x.device.type != "cpu" or w.dtype != torch.float32
                or x.dtype != torch.float32 or w.numel() < ONEDNN_MIN_WEIGHT):
            return F.linear(x, w, self.bias)
        rows = x.numel() // x.shape[-1]
        if rows == 1 and w.stride(0) == 1:     # one row and an (in, out) weight: MKL's x @ w.T streams it fastest
            return F.linear(x, w, self.bias)
        if torch.compiler.is_compiling():      # a compiled graph (infer/compiled.py) calls it as one opaque op
            return onednn_linear(x, w, self.bias)
        return _onednn_linear(x, w, self.bias)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ w.T + bias through oneDNN, w (out, in) as stored."""
    y = _ONEDNN(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


# The same product as a custom op: torch.compile cannot trace the oneDNN call itself, and would otherwise replace it
# by its own matmul, which at 16 rows of Qwen2.5-1.5B's widths runs ~1.4x slower (docs/benchmarks.md).
@torch.library.custom_op("nanoseek::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear(x, w, bias)


@onednn_linear.register_fake
def _(x, w, bias):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Prepare a model that only serves for fast one-row decoding on the CPU. First choice: the one-row kernel
    (model/gemv.py, built once per machine), which reads nn.Linear's own (out, in) layout at memory speed: nothing
    moves, returns 0. Without it (no C++ compiler): store the weight of every Linear wider out than in (the
    vocabulary head, the MLP's fused gate_up, ...) as (in, out) in memory, where MKL's one-row product is fastest.
    Same values, shapes and names (the parameter becomes a transposed view of an (in, out) buffer), so save() writes
    the same file; a model that keeps training keeps nn.Linear's layout. One weight at a time (the peak is one weight
    more); returns how many moved. Weights read directly rather than through forward (MLA's kv_b_proj) are plain
    nn.Linear."""
    first = next(model.parameters())
    if (first.device.type == "cpu" and first.dtype == torch.float32          # the kernel is float32's, and no use
            and any(p.numel() >= gemv.MIN_WEIGHT for p in model.parameters())   # (nor worth its build) to small models
            and gemv.load()):
        return 0
    moved = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.out_features > m.in_features and m.weight.is_contiguous():
            m.weight.data = m.weight.data.t().contiguous().t()
            moved += 1
    return moved


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # low precision: normalise in float32, as the published models (and transformers) do
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts.

    gate and up are one projection, gate_up_proj (2 * inter, dim) = [W_gate; W_up]: one matrix product reads x
    once (and its backward sums one input gradient, not two). Checkpoints keep transformers' two tensors,
    mlp.gate_proj.weight and mlp.up_proj.weight (weights.py splits and joins them)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_up_proj = Linear(dim, 2 * inter, bias=False)
        self.down_proj = Linear(inter, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                    # (..., inter) each
        return self.down_proj(F.silu(gate) * up)
