"""GRPO's math (DeepSeekMath Section 4; DAPO; Dr. GRPO), pure functions of tensors: group-relative advantages, the k3
KL estimate, the clipped surrogate aggregated by loss type, and token log-probs at the sampling temperature.
train/grpo.py is the trainer that feeds them; tests/test_grpo.py checks each against hand-computed numbers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G): P prompts, G completions each -> advantages (P, G).

    A_i = r_i - mean_group(r), divided by std_group(r) + eps ("group", DeepSeekMath's outcome supervision),
    by the std of all P*G rewards ("batch", as in TRL: keeps the scale of easy and hard prompts comparable) or
    by nothing ("none", Dr. GRPO: the std division up-weights near-unanimous groups). std is the sample (n-1)
    standard deviation, as torch.std and TRL compute it.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        adv = adv / (std + eps)
    return adv


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) -> bool (P,): groups whose G rewards are all equal (no learning signal; DAPO's dynamic sampling)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate k3 (Schulman 2020), DeepSeekMath eq. 4: pi_ref/pi - log(pi_ref/pi) - 1 >= 0.

    Unbiased for KL(pi || pi_ref) when tokens come from pi, always >= 0, and exactly 0 where pi == pi_ref.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@dataclass
class LossParts:
    loss: torch.Tensor          # scalar to backpropagate
    per_token: torch.Tensor     # (N, T) the objective's per-token loss (0 where masked)
    kl: torch.Tensor            # mean k3 KL over unmasked tokens (0 when beta == 0 and no reference)
    clip_frac: torch.Tensor     # fraction of unmasked tokens where clipping removed the gradient
    ratio_mean: torch.Tensor


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str = "grpo", eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, max_tokens: int | None = None,
                num_seqs: int | None = None, num_tokens: float | None = None) -> LossParts:
    """The clipped GRPO surrogate for N completions of T tokens, aggregated by `loss_type`.

    logp, old_logp, ref_logp, mask: (N, T) per completion token (mask 1 = a token the loss sees); advantages (N,).
    num_seqs / num_tokens: the whole batch's N and unmasked token count when this call sees one micro-batch of it
    (gradient accumulation must divide by the batch's totals, not the micro-batch's, for dapo and dr_grpo);
    max_tokens: the completion budget L of dr_grpo's N * L denominator (defaults to T).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    mask = mask.to(logp.dtype)
    A = advantages.to(logp.dtype)[:, None]                                        # (N, 1)
    ratio = torch.exp(logp - old_logp)                                            # rho_it
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * A, clipped * A)                                # (N, T)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference model's log-probs (ref_logp)")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    per_token = per_token * mask
    N, T = logp.shape
    n_seq = num_seqs or N
    if loss_type == "grpo":      # 1/G sum_i 1/|o_i| sum_t: each completion weighs the same, whatever its length
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1.0)).sum() / n_seq
    elif loss_type == "dapo":    # token-level: every token of the batch weighs the same (DAPO eq. 8)
        loss = per_token.sum() / (num_tokens or mask.sum().clamp(min=1.0))
    else:                        # dr_grpo: a constant denominator, so no length bias at all
        loss = per_token.sum() / (n_seq * (max_tokens or T))
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        # the surrogate's gradient is zero where the clipped branch is the min: ratio below 1-eps for A<0,
        # above 1+eps for A>0
        is_clipped = ((ratio < 1.0 - eps_low) & (A < 0)) | ((ratio > 1.0 + eps_high) & (A > 0))
        clip_frac = (is_clipped.to(mask.dtype) * mask).sum() / n
        kl_mean = (kl * mask).sum() / n
        ratio_mean = (ratio * mask).sum() / n
    return LossParts(loss, per_token, kl_mean, clip_frac, ratio_mean)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """log softmax(logits / temperature) at `tokens` and the entropy of that distribution, per position.

    logits (N, T, V) predicting tokens (N, T) -> (logp (N, T), entropy (N, T), no gradient). The temperature is the
    sampling temperature: the policy being optimised is the distribution the engine sampled from (internals.md).
    """
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tokens[..., None]).squeeze(-1) - logz
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1)
        entropy = logz - (p * logits).sum(-1)
    return logp, entropy
