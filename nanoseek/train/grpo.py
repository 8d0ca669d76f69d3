"""GRPO: group relative policy optimisation with rule-checked rewards (DeepSeekMath Section 4; DeepSeek-R1).

For each prompt q the policy samples a group of G completions o_1..o_G (through nanoseek.Engine, which shares
the policy's weights), a grader scores each one (accuracy + format, weighted), and every token of o_i is pushed
up or down by its group-relative advantage A_i = (r_i - mean(r)) / std(r):

    J = E[ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_k3(pi_theta || pi_ref) ]

rho_it = pi_theta(o_it) / pi_old(o_it) is the ratio to the policy that sampled (1 with a stop-gradient when
num_iterations = 1; the value then is ~0 by construction while the gradient is not). Aggregation over tokens is
the `loss_type`: "grpo" (per-sequence token mean, then mean: length-biased), "dapo" (token sum over the batch /
total tokens), "dr_grpo" (token sum / (N * max_tokens), with no std division of the advantage in Dr. GRPO's
recipe: choose scale_rewards="none" for that). DAPO extras: clip-higher (eps_high > eps_low), dynamic sampling
(groups whose rewards are all equal carry no signal and are dropped), and masking of truncated completions.

The pure math (advantages, k3 KL, the clipped surrogate and its aggregation) sits at the top of this file and is
tested against hand-computed numbers in tests/test_grpo.py; the training loop below it only moves tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


# ---------------------------------------------------------------------------------------------------- the math
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




# ---------------------------------------------------------------------------------------------------- rewards
def accuracy_reward(problems, texts, task) -> list[float]:
    """The task's strict grader: 1.0 when the final answer is right."""
    return [float(task.grade(p, t)) for p, t in zip(problems, texts)]


def format_reward(problems, texts, task) -> list[float]:
    """The task's format check (think/answer structure well formed)."""
    return [float(task.format_reward(t)) for t in texts]


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class GRPOConfig:
    model: str = ""                 # policy (and reference) model folder
    task: str = ""
    out: str = ""
    difficulty: int | None = None   # None: the task's default level
    steps: int = 100                # rollout steps (each: sample, score, num_iterations optimizer steps)
    prompts_per_step: int = 8       # P prompts per step
    group_size: int = 8             # G completions per prompt
    max_tokens: int = 128           # completion budget (dr_grpo's L)
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0               # k3 KL weight; 0 keeps no reference model
    eps_low: float = 0.2
    eps_high: float = 0.28          # DAPO's clip-higher
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1         # optimizer steps per rollout batch (mu of GRPO); > 1 uses the old-policy ratio
    dynamic_sampling: bool = True   # drop groups whose rewards are all equal
    mask_truncated: bool = True     # completions cut at max_tokens get no loss (DAPO overlong filtering)
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    micro_batch: int = 32           # completions per forward/backward
    seed: int = 0
    save_every: int = 50
    sample_every: int = 10          # completions to OUT/samples.jsonl every N steps
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int = 0             # stop (with a checkpoint) after this step, as if interrupted
    progress: bool = True


@dataclass
class Rollout:
    """One step's samples: P*G completions, flattened group by group."""
    problems: list                  # (P,)
    prompts: list                   # (P,) prompt token ids
    completions: list               # (P*G,) engine Completions
    rewards: torch.Tensor           # (P, G) weighted reward
    parts: dict                     # reward name -> (P, G)


def rollout(engine, tok, task, problems: list, cfg: GRPOConfig, step: int, reward_funcs, reward_weights) -> Rollout:
    """Sample G completions for each prompt through the engine (one batched call) and score them."""
    from ..eval import prompt_ids
    from ..infer.engine import SamplingParams

    P, G = len(problems), cfg.group_size
    prompts = [prompt_ids(tok, task, p) for p in problems]
    # one seed per completion, a pure function of (seed, step, index): sampling replays exactly on resume
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=(cfg.seed * 1_000_003 + step) * 4096 + i, logprobs=True) for i in range(P * G)]
    comps = engine.generate([pr for pr in prompts for _ in range(G)], params)
    flat_problems = [p for p in problems for _ in range(G)]
    texts = [c.text for c in comps]
    # accuracy and format are always measured (logged as accuracy / format_rate), whatever the reward is made of
    parts = {"accuracy": torch.tensor(accuracy_reward(flat_problems, texts, task)),
             "format_rate": torch.tensor(format_reward(flat_problems, texts, task))}
    known = {accuracy_reward: "accuracy", format_reward: "format_rate"}
    total = torch.zeros(P * G)
    for fn, w in zip(reward_funcs, reward_weights):
        if fn in known:
            r = parts[known[fn]]
        else:
            r = torch.tensor([float(x) for x in fn(flat_problems, texts, task)], dtype=torch.float32)
            parts[getattr(fn, "__name__", "reward")] = r
        total += w * r
    parts = {k: v.view(P, G) for k, v in parts.items()}
    return Rollout(problems, prompts, comps, total.view(P, G), parts)


def _rows(comps, idx, pad_id):
    """Completions `idx` as right-padded rows prompt + completion -> (inputs, targets, completion mask, engine
    logprobs) (n, T); the completion's tokens are the targets at positions len(prompt) - 1 onwards."""
    seqs = [list(comps[i].prompt_token_ids) + list(comps[i].token_ids) for i in idx]
    T = max(len(s) for s in seqs) - 1
    n = len(idx)
    inputs = torch.full((n, T), pad_id, dtype=torch.long)
    targets = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n, T))
    eng_lp = torch.zeros((n, T))
    for r, (i, s) in enumerate(zip(idx, seqs)):
        L = len(s) - 1
        inputs[r, :L] = torch.tensor(s[:-1])
        targets[r, :L] = torch.tensor(s[1:])
        start, k = len(comps[i].prompt_token_ids) - 1, len(comps[i].token_ids)
        mask[r, start:start + k] = 1.0
        if comps[i].logprobs and k:
            eng_lp[r, start:start + k] = torch.tensor([float(x) for x in comps[i].logprobs[:k]])
    return inputs, targets, mask, eng_lp


def forward_logprobs(model, inputs, targets, temperature: float):
    """Training forward of right-padded rows -> per-token log-probs and entropies (N, T) of the targets."""
    logits = model(inputs)
    return token_logprobs(logits, targets, temperature)


def train_on_rollout(model, optimizer, ro: Rollout, cfg: GRPOConfig, pad_id: int, ref_model=None,
                     scheduler=None) -> dict:
    """num_iterations optimizer steps on one rollout batch; returns the step's statistics.

    Old log-probs (the denominator of rho) are the policy's own, recorded without gradient in the first iteration,
    before any update: exactly the policy that sampled. The engine's sampling log-probs are compared to them
    (`logprob_gap`: ~0 when engine and training forward agree; large values mean the ratio is off-policy noise).
    """
    P, G = ro.rewards.shape
    adv = group_advantages(ro.rewards, cfg.scale_rewards).flatten()             # (P*G,)
    zero = zero_std_groups(ro.rewards)                                          # (P,)
    keep_group = ~zero if cfg.dynamic_sampling else torch.ones(P, dtype=torch.bool)
    truncated = torch.tensor([c.finish_reason == "length" for c in ro.completions])
    idx = [i for i in range(P * G) if keep_group[i // G]]
    stats = {"frac_zero_std": zero.float().mean().item(), "groups_kept": int(keep_group.sum()),
             "truncated_frac": truncated.float().mean().item()}
    # loss mask per completion: dropped for truncated ones (they would be graded wrong for being cut, DAPO 3.3)
    seq_ok = ~truncated if cfg.mask_truncated else torch.ones(P * G, dtype=torch.bool)
    idx = [i for i in idx if seq_ok[i]]
    if not idx:
        stats.update({"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": float("nan"), "logprob_gap": float("nan"),
                      "trained_tokens": 0, "skipped": 1})
        return stats
    idx.sort(key=lambda i: len(ro.completions[i].prompt_token_ids) + len(ro.completions[i].token_ids))
    chunks = [idx[j:j + cfg.micro_batch] for j in range(0, len(idx), cfg.micro_batch)]
    rows = [_rows(ro.completions, c, pad_id) for c in chunks]
    num_tokens = sum(r[2].sum() for r in rows).clamp(min=1.0)
    ref = []
    if cfg.beta != 0.0:
        with torch.no_grad():
            ref = [forward_logprobs(ref_model, r[0], r[1], cfg.temperature)[0] for r in rows]
    old: list[torch.Tensor] = []
    agg = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "logprob_gap": 0.0}
    for it in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for j, (c, (inputs, targets, mask, eng_lp)) in enumerate(zip(chunks, rows)):
            logp, ent = forward_logprobs(model, inputs, targets, cfg.temperature)
            if it == 0:
                old.append(logp.detach())
                gap = ((logp.detach() - eng_lp).abs() * mask).max().item()
                agg["logprob_gap"] = max(agg["logprob_gap"], gap)
                agg["entropy"] += (ent * mask).sum().item()
            out = policy_loss(logp, old[j], adv[c], mask, loss_type=cfg.loss_type, eps_low=cfg.eps_low,
                              eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=ref[j] if ref else None,
                              max_tokens=cfg.max_tokens, num_seqs=len(idx), num_tokens=num_tokens)
            out.loss.backward()
            w = mask.sum().item() / num_tokens.item()
            if it == cfg.num_iterations - 1:
                agg["loss"] += out.loss.item()
                agg["kl"] += out.kl.item() * w
                agg["clip_frac"] += out.clip_frac.item() * w
        if cfg.grad_clip:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    agg["entropy"] /= num_tokens.item()
    stats.update(agg)
    stats["trained_tokens"] = int(num_tokens.item())
    return stats


# ---------------------------------------------------------------------------------------------------- the loop
def grpo(cfg: GRPOConfig | dict, reward_funcs=None, reward_weights=None, model=None, tokenizer=None) -> Path:
    """Run GRPO and return OUT/final (a model folder with the tokenizer).

    reward_funcs: callables fn(problems, texts, task) -> list[float] (one score per completion); default the task's
    accuracy and format graders weighted by cfg.accuracy_weight and cfg.format_weight. reward_weights: one weight
    per function (default 1.0 each for user functions).
    """
    import copy

    from ..data.tasks import get_task
    from ..eval import draw_problems, prompt_ids, train_rng
    from ..infer.engine import Engine
    from . import loop
    from .sft import _check_out, load_model_and_tokenizer

    if isinstance(cfg, dict):
        cfg = GRPOConfig(**cfg)
    if cfg.loss_type not in LOSS_TYPES:
        raise UsageError(f"--loss-type {cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise UsageError(f"--scale-rewards {cfg.scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    if cfg.group_size < 2:
        raise UsageError(f"--group-size must be >= 2 (advantages are relative to the group), got {cfg.group_size}")
    out = Path(cfg.out)
    _check_out(out, cfg.resume)
    task = get_task(cfg.task)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    if reward_funcs is None:
        reward_funcs, reward_weights = [accuracy_reward, format_reward], [cfg.accuracy_weight, cfg.format_weight]
    reward_weights = list(reward_weights or [1.0] * len(reward_funcs))
    if len(reward_weights) != len(reward_funcs):
        raise UsageError(f"{len(reward_funcs)} reward functions but {len(reward_weights)} reward weights")
    difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
    torch.manual_seed(cfg.seed)
    model.float().eval()   # no dropout anywhere; eval mode skips the MoE balance-loss bookkeeping
    # the frozen reference pi_ref: only when the KL term is on (beta = 0 keeps no second model in memory)
    # (copied before a resume loads the checkpoint's weights: pi_ref is the starting model)
    ref_model = copy.deepcopy(model).requires_grad_(False) if cfg.beta != 0.0 else None
    opt = torch.optim.AdamW(loop.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
    step = 0
    ckpt = loop.find_resume_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        loop.load_model_weights(ckpt, model)
        doc = loop.load_trainer_state(ckpt, model, opt)
        step = doc["step"]
        print(f"[grpo] resuming from {ckpt} (step {step})")
        samples = out / "samples.jsonl"
        if samples.exists():   # rows logged after the checkpoint were lost with the run: drop them
            keep = [ln for ln in samples.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            samples.write_text("".join(ln + "\n" for ln in keep))
    out.mkdir(parents=True, exist_ok=True)
    logger = loop.MetricsLogger(out / "metrics.jsonl", resume_step=step if ckpt else None)
    # the engine runs on the policy's own parameters: every update is seen by the next rollout
    # context: the longest prompt the task writes (with room to spare) plus the completion budget
    longest = max(len(prompt_ids(tokenizer, task, p)) for p in draw_problems(task, train_rng(cfg.seed, "len"),
                                                                            difficulty, 64))
    engine = Engine(model, tokenizer, max_batch=min(256, cfg.prompts_per_step * cfg.group_size),
                    max_seq_len=2 * longest + cfg.max_tokens + 16)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    bar = loop.progress(cfg.steps, step, "grpo", cfg.progress)
    tokens_seen = int(logger.rows[-1].get("tokens_seen", 0)) if logger.rows else 0
    with loop.StopOnSigint() as stop:
        while step < cfg.steps:
            t0 = time.time()
            problems = draw_problems(task, train_rng(cfg.seed, "grpo", step), difficulty, cfg.prompts_per_step)
            ro = rollout(engine, tokenizer, task, problems, cfg, step, reward_funcs, reward_weights)
            t_sample = time.time() - t0
            lr = loop.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup_steps, schedule="cosine",
                            min_lr_ratio=1.0)
            loop.set_lr(opt, lr)
            stats = train_on_rollout(model, opt, ro, cfg, pad_id, ref_model)
            engine.reset_prefix_cache()   # cached prefixes hold latents of the old weights
            step += 1
            lengths = torch.tensor([float(c.completion_tokens) for c in ro.completions])
            tokens_seen += sum(len(c.prompt_token_ids) + len(c.token_ids) for c in ro.completions)
            row = {"step": step, "reward_mean": ro.rewards.mean().item(), "reward_std": ro.rewards.std().item(),
                   "completion_len": lengths.mean().item(), "completion_len_max": lengths.max().item(),
                   "lr": lr, "sample_s": t_sample, "step_s": time.time() - t0, "tokens_seen": tokens_seen}
            row.update({name: r.mean().item() for name, r in ro.parts.items()})
            row.update(stats)
            logger.log(row)
            if cfg.sample_every and (step == 1 or step % cfg.sample_every == 0):
                _write_samples(out / "samples.jsonl", step, ro, cfg.group_size)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row.get('accuracy', 0):.2f}")
            if step % cfg.save_every == 0 or stop.requested or step in (cfg.steps, cfg.stop_after):
                loop.save_checkpoint(out, step, model, model, opt, tokenizer=tokenizer, keep=cfg.keep_checkpoints,
                                     state={"tokens_seen": tokens_seen, "config": vars(cfg)})
            if stop.requested or step == cfg.stop_after:
                print(f"[grpo] stopped at step {step}; continue with --resume")
                break
    bar.close()
    logger.close()
    plot_rewards(logger.rows, out / "reward.png")
    final = out / "final"
    if step >= cfg.steps:
        from ..checkpoint import save as save_model
        save_model(model, final, tokenizer=tokenizer)
        print(f"[grpo] wrote {final}")
    return final


def _write_samples(path: Path, step: int, ro: Rollout, G: int, groups: int = 2):
    with open(path, "a") as f:
        for p in range(min(groups, len(ro.problems))):
            for g in range(G):
                c = ro.completions[p * G + g]
                f.write(json.dumps({"step": step, "question": ro.problems[p].question, "answer": str(ro.problems[p].answer),
                                    "completion": c.text, "reward": ro.rewards[p, g].item(),
                                    "finish_reason": c.finish_reason}) + "\n")


def plot_rewards(rows: list[dict], path: Path) -> Path | None:
    """OUT/reward.png: reward and accuracy per step (raw and a moving average)."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, color in (("reward_mean", "#4d6bfe"), ("accuracy", "#e07b39")):
        ys = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        k = max(1, len(ys) // 20)
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(steps, ys, color=color, alpha=0.25)
        ax.plot(steps, smooth, color=color, label=key)
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.05, 1.15)
    ax.legend()
    ax.set_title("GRPO: reward and accuracy on training prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- CLI
# The cpu speedrun's GRPO stage (keys are CLI flags; the calibration runs are in docs/benchmarks.md, "Post-training
# calibration"). What mattered on the 1.3M model: large groups of prompts per step (P=32: with P=8-16 the update is
# mostly noise and held-out accuracy fell), a small lr (>= 1e-4 collapsed the policy onto confident wrong facts,
# e.g. "4-2=0" in 7 of 8 samples), the k3 KL to the SFT model as a brake, and ~100 steps: measured 37% -> 51.5%
# (step 100) / 47.5% (step 110) held-out greedy pass@1, ~3 s per step on one thread of the shared box.
# With the corpus no longer holding eval problems the pretrained model starts lower (13.5%, SFT 14.5%) and 110 steps
# gave only +3.5 points; 250 steps (train accuracy still rising) gave 14.5% -> 29.5% (docs/benchmarks.md, Speedrun).
SPEEDRUN_DEFAULTS: dict = {"task": "linear", "difficulty": 1, "steps": 250, "prompts_per_step": 32, "group_size": 8,
                           "max_tokens": 96, "temperature": 0.7, "lr": 5e-5, "beta": 0.04, "loss_type": "dapo"}


def add_arguments(p):
    p.add_argument("--model", help="policy model folder (with tokenizer.json)")
    p.add_argument("--task", help="task whose generator gives prompts and whose grader gives rewards")
    p.add_argument("--out", help="run folder (metrics.jsonl, samples.jsonl, reward.png, ckpt/, final/)")
    p.add_argument("--config", help="TOML file with any of the options below (command line wins)")
    p.add_argument("--difficulty", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--prompts-per-step", type=int, help="P prompts per step")
    p.add_argument("--group-size", type=int, help="G completions per prompt")
    p.add_argument("--max-tokens", type=int, help="completion budget")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--beta", type=float, help="k3 KL weight (0: no reference model)")
    p.add_argument("--eps-low", type=float)
    p.add_argument("--eps-high", type=float)
    p.add_argument("--loss-type", choices=LOSS_TYPES)
    p.add_argument("--scale-rewards", choices=SCALE_REWARDS)
    p.add_argument("--num-iterations", type=int)
    p.add_argument("--dynamic-sampling", metavar="BOOL", help="drop groups whose rewards are all equal (true/false)")
    p.add_argument("--mask-truncated", metavar="BOOL", help="no loss on completions cut at --max-tokens")
    p.add_argument("--accuracy-weight", type=float)
    p.add_argument("--format-weight", type=float)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")


def main(args) -> int:
    from .loop import make_config

    cfg = make_config(GRPOConfig, args, required=("model", "task", "out"))
    grpo(cfg)
    return 0
