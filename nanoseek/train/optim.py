"""Optimisation shared by every trainer: AdamW parameter groups (or Muon for the matrices), lr schedules, gradient
clipping, and DeepSeek-V3's auxiliary-loss-free bias update as one optimizer-step hook (every MoE, MTP included):

    opt = adamw(module, lr, weight_decay); add_bias_update(opt, ExpertLoads(model, rt), speed)
    set_lr(opt, lr_at(step, total=..., lr=..., warmup=...)); ...backward...; clip_grad(params, 1.0); opt.step()
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError
from ..model import MoE, update_bias
from ..model.v4 import V4MoE
from .runtime import Runtime


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (including stacked experts); none on norms, biases and embeddings
    (decaying them only pulls scales and token vectors toward zero, the usual GPT-2/nanoGPT choice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(module: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    return fused_adamw(param_groups(module, weight_decay), lr=lr, betas=betas, eps=1e-8)


def fused_adamw(groups, **kw) -> torch.optim.AdamW:
    """AdamW as one fused kernel (0.9 vs 3.3 ms a cpu-preset step; transformers' Trainer default), but for DTensors."""
    fused = not any(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, **kw, fused=fused or None)


def build(name: str, module: nn.Module, lr: float, weight_decay: float):
    """--optimizer adamw, or muon: torch.optim.Muon for the 2-D matrices but the embedding and head (kept on AdamW by
    Muon's authors and DeepSeek-V4), AdamW for the rest (norms, biases, mHC bases and scales, embedding, head, the
    stacked 3-D experts: torch's Muon takes 2-D only). Muon's update RMS is matched to AdamW's (0.2 sqrt(max(rows,
    cols)), Moonlight), so one --lr and schedule serve both."""
    if name == "adamw":
        return adamw(module, lr, weight_decay)
    mats = {id(p): p for n, p in module.named_parameters() if p.requires_grad and p.dim() == 2 and "embed" not in n
            and "lm_head" not in n}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in mats]} for g in param_groups(module, weight_decay)]
    return Optimizers([torch.optim.Muon(list(mats.values()), lr=lr, weight_decay=weight_decay,
                                        adjust_lr_fn="match_rms_adamw"),
                       fused_adamw(rest, lr=lr, betas=(0.9, 0.95), eps=1e-8)])


class Optimizers(list):
    """Optimizers stepped as one (Muon + AdamW): param_groups, step, zero_grad, a step post-hook (run after the last);
    torch.distributed.checkpoint's get/set_optimizer_state_dict take a list: checkpoints hold them all."""
    param_groups = property(lambda self: [g for o in self for g in o.param_groups])

    def step(self) -> None:
        for o in self:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self:
            o.zero_grad(set_to_none=set_to_none)

    def register_step_post_hook(self, hook):
        return self[-1].register_step_post_hook(hook)


def lr_at(step: int, *, total: int, lr: float, warmup: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup` steps, then
      cosine: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2;
      wsd (warmup-stable-decay, MiniCPM; DeepSeek-V3 likewise holds its lr constant, then decays): lr until the
      last `decay_frac` of the steps, then linear to min_lr. A WSD run can be continued from any stable-phase
      checkpoint without re-warming.
    """
    min_lr = lr * min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_steps = max(1, int(round(total * decay_frac)))
        start = total - decay_steps
        if step < start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - start + 1) / decay_steps)
    raise UsageError(f"unknown schedule {schedule!r}; expected cosine or wsd")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def clip_grad(params, max_norm: float) -> float:
    """Clip the global gradient norm (max_norm <= 0: measure only). Works on DTensor (FSDP2) gradients."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm if max_norm > 0 else
                                          float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --------------------------------------------------------------------------------------------- V3 balancing
class ExpertLoads:
    """Tokens routed to each expert by the training forwards of one optimizer step, for every MoE of the model
    (main layers, then the MTP blocks), summed over micro-batches and, in collect(), over ranks. A training forward
    is one with gradients on: not GRPO's engine rollouts (inference mode), not a no-grad reference pass. The counts
    live on the gates (a non-persistent buffer, one hook function for all: a compiled block stays one graph for all
    its layers, compiled.compile_blocks); one counter per gate, however many ExpertLoads watch the model."""

    def __init__(self, model: nn.Module, rt: Runtime):
        self.rt, self.moes = rt, [m for m in model.modules() if isinstance(m, (MoE, V4MoE))]
        self.last: list[torch.Tensor] = []      # the last step's global loads
        for m in (m for m in self.moes if not hasattr(m.gate, "routed_tokens")):   # gates return (w, experts, ...)
            m.gate.register_buffer("routed_tokens", torch.zeros(len(m.gate.weight), device=m.gate.weight.device), False)
            m.gate.register_forward_hook(count_routed)

    @property
    def fresh(self) -> bool:   # some training forward was counted since the last collect() (one host sync)
        return bool(self.moes) and bool(torch.stack([m.gate.routed_tokens for m in self.moes]).any())

    def collect(self) -> list[torch.Tensor]:
        """This step's global loads (one all-reduce for all layers), then start counting afresh. Collected once per
        step: by the bias hook right after optimizer.step(), else by the first caller; later calls return it."""
        if self.fresh:
            counts = torch.stack([m.gate.routed_tokens for m in self.moes])
            self.last = list(self.rt.all_reduce(counts.to(self.rt.device)).unbind(0))
            for m in self.moes:
                m.gate.routed_tokens.zero_()
        return self.last


def count_routed(gate: nn.Module, args, out) -> None:
    """A gate's forward hook: add the tokens this forward routed to each expert to gate.routed_tokens, in training
    forwards (gradients on) only. A fixed-shape scatter, not bincount, so a compiled block keeps it in its graph."""
    if torch.is_grad_enabled():
        idx = out[1].flatten()
        gate.routed_tokens.index_add_(0, idx, torch.ones_like(idx, dtype=gate.routed_tokens.dtype))


def add_bias_update(optimizer: torch.optim.Optimizer, loads: ExpertLoads, speed: float):
    """V3's auxiliary-loss-free balancing (Section 2.1.2, eq. 16 and after) as an optimizer step post-hook: after
    each step, b_i += speed * sign(mean load - load_i) for every gate routing with the bias (V3's noaux_tc, V4's
    learned routing, not its hash-routed layers), from the step's global loads (so every rank applies the same
    update and the biases stay identical); `speed` is the paper's gamma. Registered only where it does something
    (speed > 0, such a gate): returns its handle, or None. Every trainer calls this."""
    gates = [(i, m.gate) for i, m in enumerate(loads.moes) if hasattr(m.gate, "e_score_correction_bias")
             and getattr(m.gate, "topk_method", "noaux_tc") == "noaux_tc"]
    if speed <= 0 or not gates:
        return None

    def hook(opt, args, kwargs):
        if not loads.fresh:   # a step without a training forward (torch.distributed.checkpoint's state init)
            return
        step_loads = loads.collect()
        for i, gate in gates:
            update_bias(gate, step_loads[i], speed)

    return optimizer.register_step_post_hook(hook)


def load_imbalance(loads: list[list[float]]) -> float | None:
    """max / mean tokens per expert, averaged over the MoE layers (1.0 = perfectly balanced)."""
    vals = [max(lo) / (sum(lo) / len(lo)) for lo in loads if sum(lo) > 0]
    return sum(vals) / len(vals) if vals else None
