"""DeepSeekMoE: shared experts + fine-grained routed experts (V2 Section 2.2, V3 Section 2.1.2).

The gate scores every routed expert (softmax in V2, sigmoid in V3), selects num_experts_per_tok of them
(greedy, V2's group-limited greedy, or V3's noaux_tc where `e_score_correction_bias` steers SELECTION ONLY),
and mixes the chosen experts' outputs with weights taken from the unbiased scores. Routed experts are computed
batched: tokens are sorted by expert and each expert runs one matmul over all of its tokens.

Load balancing (V3 Section 2.1.2): `update_bias` is the auxiliary-loss-free rule applied after each optimizer
step, and `MoE.balance_loss` the small sequence-wise balance loss (eq. 17-20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import gemv
from .layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # b_i of V3 eq. 16: added to the scores for choosing experts, never to the mixing weights. A buffer, not a
        # parameter: it is moved by update_bias, not by the gradient.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x (N, hidden) -> weights (N, k), expert indices (N, k), scores (N, E)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.topk_method != "greedy" and self.topk_group < self.n_group:  # (keeping every group limits nothing)
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":  # a group's strength: the sum of its two best (biased) scores
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:                                # group_limited_greedy: its best score
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            fill = float("-inf") if self.topk_method == "noaux_tc" else 0.0
            choice = grouped.masked_fill(~group_mask[..., None], fill).flatten(1)
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:  # also for top_k = 1 (weight 1), as DeepSeek's V3 code and transformers do
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, idx, scores


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts stored stacked, for batched computation: gate_up_proj (E, 2 * inter, hidden)
    holds each expert's [W_gate; W_up] (one grouped matmul for both, as in MLP), down_proj (E, hidden, inter).

    The checkpoint keeps one tensor per expert and projection (mlp.experts.E.gate_proj.weight ...); weights.py maps
    between the two layouts.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, h))
        self.down_proj = nn.Parameter(torch.empty(E, h, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), weights/idx (N, k) -> (N, hidden).

        The N*k (token, expert) pairs are sorted by expert so that each expert's tokens form one contiguous slice;
        then every projection is one grouped matmul over all experts (no loop over tokens), and the outputs are
        scattered back to their tokens with index_add.
        """
        E, hidden, inter = self.down_proj.shape
        if x.shape[0] == 1 and gemv.applies(self.gate_up_proj, x):   # one token: its k experts, read once each
            return self.one_token_forward(x, weights, idx)
        if x.shape[0] * E * inter * hidden <= DENSE_EXPERTS_MAX_MACS:
            return self.dense_forward(x, weights, idx)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self.gathered_forward(x, weights, idx)   # the compiled decode step (infer/compiled.py): no sort
        N, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)                        # (N*k,) pairs grouped by expert
        token = order // k                                       # the token of each sorted pair
        counts = flat.new_zeros(E).index_add_(0, flat, torch.ones_like(flat))   # (E,) pairs per expert
        gate, up = grouped_linear(x[token], self.gate_up_proj, counts).chunk(2, dim=-1)  # (N*k, inter) each
        # the routing weight g_i scales the expert's output; applied before down_proj it costs inter, not hidden,
        # multiplies per pair (down_proj is linear, so the result is the same)
        h = F.silu(gate) * up * weights.flatten()[order, None].to(gate.dtype)          # (N*k, inter)
        ys = grouped_linear(h, self.down_proj, counts)           # (N*k, hidden)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def dense_forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same result computed by running EVERY expert on every token, mixed with weight 0 for the experts
        a token did not choose: three matmuls, no sort, no per-expert kernels, no scatter. For a handful of tokens
        (decoding a small model) that is cheaper than routing; see DENSE_EXPERTS_MAX_MACS."""
        N = x.shape[0]
        E, hidden, inter = self.down_proj.shape
        g = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, idx, weights.to(x.dtype))  # (N, E)
        gate, up = (x @ self.gate_up_proj.view(E * 2 * inter, hidden).t()).view(N, E, 2 * inter).chunk(2, dim=-1)
        h = F.silu(gate) * up * g[..., None]                                                    # (N, E, inter)
        return torch.bmm(h.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)           # (E, N, h) -> (N, h)

    def one_token_forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same result for one token (batch-1 decoding) through the one-row kernel (model/gemv.py): each chosen
        expert's weights are streamed once, in place; no copy, no sort. x (1, hidden), weights/idx (1, k)."""
        k = idx.shape[1]
        which = idx[0].long()
        gate, up = gemv.gemv(self.gate_up_proj, x.expand(k, -1).contiguous(), which).chunk(2, dim=-1)  # (k, inter)
        h = F.silu(gate) * up * weights[0, :, None].to(x.dtype)                                      # (k, inter)
        return gemv.gemv(self.down_proj, h.contiguous(), which).sum(0, keepdim=True)                 # (1, hidden)

    def gathered_forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same result with shapes fixed by N and k alone, for a compiled decode step: each (token, expert) pair
        gathers its expert's weights and two bmm compute every pair; no sort, no per-expert counts, no host sync.
        It copies k experts' weights per token, so it suits a few tokens (decoding), never training batches."""
        N, k = idx.shape
        E, hidden, inter = self.down_proj.shape
        flat = idx.flatten()                                                                   # (N*k,) experts
        xs = x.repeat_interleave(k, dim=0)[:, :, None]                                         # (N*k, hidden, 1)
        gate, up = torch.bmm(self.gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)        # (N*k, inter) each
        h = F.silu(gate) * up * weights.flatten()[:, None].to(x.dtype)                        # (N*k, inter)
        return torch.bmm(self.down_proj[flat], h[:, :, None]).view(N, k, hidden).sum(1)      # (N, hidden)


# Routing has a fixed cost: a sort, a scatter and ~one matmul kernel per expert and projection (CPU's _grouped_mm
# loops over the experts). Computing every expert densely costs n_routed_experts / num_experts_per_tok times the
# FLOPs instead. Below this many multiply-adds per projection (tokens x experts x inter x hidden) the dense FLOPs
# are cheaper than the fixed cost: decode of the `cpu` preset at batch 1-16 (routed experts 1.6-4x faster on
# 1 CPU thread), never training batches nor large models (V3 at one token: 3.8e9).
DENSE_EXPERTS_MAX_MACS = 2**20
# Without a grouped-matmul kernel, experts run as one padded bmm while the padding (every expert padded to the
# busiest one's rows) at most doubles the rows multiplied; a more skewed routing loops over the experts instead.
PADDED_MAX_ROWS_RATIO = 2


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (S, in) with rows grouped by expert (counts (E,) rows each), w (E, out, in) -> (S, out): x_e @ w_e^T.

    One torch._grouped_mm call where the kernel takes these operands (CPU, or bf16 on a CUDA GPU of compute
    capability >= 8.0; rows 16-byte aligned); otherwise padded_grouped_linear (one bmm) while the padding stays
    within PADDED_MAX_ROWS_RATIO, else one matmul per expert that has tokens.
    """
    if _grouped_mm_ok(x, w):
        offs = counts.cumsum(0).to(torch.int32)                  # end row of each expert's slice
        if torch.compiler.is_compiling():                        # a compiled training block (compiled.compile_blocks)
            return compiled_grouped_mm(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    sizes = counts.tolist()                                      # the one host sync
    if max(sizes, default=0) * len(sizes) <= PADDED_MAX_ROWS_RATIO * x.shape[0]:
        return padded_grouped_linear(x, w, counts, max(sizes))
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            outs.append(x[start:start + n] @ w[e].t())
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


# torch._grouped_mm inside a compiled graph: its shape function wants bf16 operands (the CUDA kernel's), while the CPU
# kernel takes float32. As our own op, with the shape given here and the backward written with the same kernel, a
# compiled training block keeps the grouped experts in its graph (compiled.compile_blocks).
@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def compiled_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (S, in) grouped by expert (offs (E,) int32: each group's end row), w (E, out, in) -> (S, out): x_e @ w_e^T."""
    return torch._grouped_mm(x.contiguous(), w.transpose(1, 2), offs=offs)


@compiled_grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grad (S, out), x (S, in), grouped alike -> (E, out, in): grad_e^T @ x_e, the gradient of each w_e."""
    return torch._grouped_mm(grad.contiguous().t(), x.contiguous(), offs=offs)


@grouped_mm_weight_grad.register_fake
def _(grad, x, offs):
    return grad.new_empty(offs.shape[0], grad.shape[1], x.shape[1])


def _grouped_mm_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    gx = compiled_grouped_mm(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None   # grad_e @ w_e
    gw = grouped_mm_weight_grad(grad, x, offs) if ctx.needs_input_grad[1] else None
    return gx, gw, None


compiled_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_context)


def padded_grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """grouped_linear as one batched matmul, no loop over experts: each expert's rows are placed in a zero-padded
    (E, capacity, in) block (capacity = the largest expert's row count), multiplied by w^T in one bmm, and read
    back in their grouped order. Padding rows are zero and never read back, so the result (and its gradients)
    equal the per-expert products."""
    E = w.shape[0]
    starts = counts.cumsum(0) - counts                                                 # (E,) first row of each
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])   # (S,)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert]                  # row within its expert
    flat = expert * capacity + slot                                                    # (S,) row in the block
    block = x.new_zeros(E * capacity, x.shape[1]).index_copy(0, flat, x).view(E, capacity, -1)
    return torch.bmm(block, w.transpose(1, 2)).view(E * capacity, -1)[flat]           # (S, out)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    size = x.element_size()  # the kernel wants every row stride and base pointer 16-byte aligned (a compiled
    # training block, compiled.compile_blocks, has no pointers to look at: its buffers and the parameters are aligned)
    aligned = torch.compiler.is_compiling() or all(t.data_ptr() % 16 == 0 for t in (x, w))
    return aligned and all(t.stride(-2) * size % 16 == 0 and t.stride(-1) == 1 for t in (x, w))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.load: torch.Tensor | None = None           # tokens routed to each expert in the last forward with
                                                        # gradients (forwards without, the engine's, leave it)
        self.balance_loss: torch.Tensor | None = None   # sequence-wise balance loss of the last training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, idx, scores = self.gate(flat)
        y = self.experts(flat, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if torch.is_grad_enabled():   # (not in the engine's forwards: no one reads it there, ~20 us a layer a step)
            # tokens per expert as a scatter, not bincount: a fixed (E,) shape, so a compiled graph keeps it
            self.load = torch.zeros_like(scores[0], dtype=torch.long).index_add_(0, idx.flatten(), torch.ones_like(
                idx.flatten()))
        if self.training and self.aux_loss_alpha > 0:
            self.balance_loss = sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1), self.aux_loss_alpha)
        return y.view(B, T, D)


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch.

    f_i = E / (K T) * (number of tokens choosing expert i); P_i = mean over tokens of the normalised score
    s_i / sum_j s_j. Minimal (= alpha) when routing is uniform within every sequence.
    """
    B, T, E = scores.shape
    K = idx.shape[-1]
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(1, idx.reshape(B, -1),
                                                                  torch.ones(B, T * K, device=scores.device))
    f = counts * E / (K * T)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return alpha * (f * p).sum(-1).mean()


@torch.no_grad()
def update_bias(gate: Gate, load: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing (V3 eq. 16 and after): after a training step, push overloaded experts down
    and underloaded experts up by gamma: b_i += gamma * sign(mean_load - load_i)."""
    load = load.float()
    gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
