"""`nanoseek grpo`: group relative policy optimisation with rule-checked rewards (DeepSeekMath Section 4; R1).

    nanoseek grpo --model runs/sft/final --task linear --out runs/grpo
    torchrun --standalone --nproc_per_node=2 -m nanoseek.cli grpo ...      # each process samples P / N prompts

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

The pure math (advantages, k3 KL, the clipped surrogate and its aggregation) is nanoseek/rl.py, tested against
hand-computed numbers in tests/test_grpo.py; this file only moves tensors.

What a step costs: one batched engine call (decoding through the compiled graph in a run long enough to repay it:
rollout_compile); training forwards that compute each group's prompt once (rl.group_batch / group_logits: its G
completions attend to the prompt's keys and values, as exact as G padded rows prompt + completion), as one compiled
graph in a run long enough (training_compile); pi_old's log-probs are the first iteration's own training forward,
detached (no extra forward, reused by iterations 2..mu); pi_ref's come from one batched no-grad forward per rollout
(reference_logprobs). The next rollout is not overlapped with the optimizer step: in every mode of this loop (mu = 1
or more, as in DeepSeekMath's Algorithm 1) the next batch is sampled by the weights that step produces, so
overlapping would sample one step off-policy, a different algorithm (asynchronous GRPO), not a faster run of this
one. Under torchrun every statistic that spans the batch (group and batch advantages, the dapo / dr_grpo
denominators, the logged means) is taken over all processes, and sampling seeds depend on a completion's global
index, so N processes compute what one process would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import plots
from ..data.jsonl import read_jsonl, write_jsonl
from ..errors import UsageError
from ..rl import LOSS_TYPES, SCALE_REWARDS, group_advantages, group_batch, group_logprobs, policy_loss, zero_std_groups
from . import optim, runtime
from .run import Run


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
    task: str = ""                  # task whose generator gives prompts and whose grader gives rewards
    out: str = ""                   # run folder (metrics.jsonl, samples.jsonl, reward.png, ckpt/, final/)
    difficulty: int | None = None   # None: the task's default level
    steps: int = 100                # rollout steps (each: sample, score, num_iterations optimizer steps)
    prompts_per_step: int = 8       # P prompts per step (over all processes)
    group_size: int = 8             # G completions per prompt
    max_tokens: int = 128           # completion budget (dr_grpo's L)
    temperature: float = 1.0        # sampling temperature (also of the trained log-probs)
    top_p: float = 1.0              # nucleus sampling
    lr: float = 1e-5                # learning rate (constant after warmup)
    warmup: int = 0                 # warmup steps
    weight_decay: float = 0.0       # AdamW decay of matrices
    grad_clip: float = 1.0          # 0: no clipping
    beta: float = 0.0               # k3 KL weight; 0 keeps no reference model
    eps_low: float = 0.2            # clip range below 1
    eps_high: float = 0.28          # clip range above 1 (DAPO's clip-higher)
    loss_type: str = "dapo"         # grpo | dapo | dr_grpo
    scale_rewards: str = "group"    # group | batch | none (Dr. GRPO)
    num_iterations: int = 1         # optimizer steps per rollout batch (mu of GRPO); > 1 uses the old-policy ratio
    dynamic_sampling: bool = True   # drop groups whose rewards are all equal
    mask_truncated: bool = True     # completions cut at max_tokens get no loss (DAPO overlong filtering)
    accuracy_weight: float = 1.0    # weight of the task's grader in the reward
    format_weight: float = 0.1      # weight of the format check in the reward
    micro_batch: int = 32           # completions per forward/backward
    bias_update_speed: float = 0.0  # V3's routing-bias gamma (from the training forwards, not the rollouts)
    seed: int = 0                   # problem stream and sampling seeds
    save_every: int = 50            # checkpoint every N steps (and at the end)
    sample_every: int = 10          # completions to OUT/samples.jsonl every N steps
    keep_checkpoints: int = 2       # newest checkpoints kept (0: all)
    resume: bool = False            # continue from the newest complete OUT/ckpt/step-N
    stop_after: int = 0             # stop (with a checkpoint) after this step, as if interrupted
    fsdp: bool = False              # FSDP2 fully_shard instead of DDP (under torchrun)
    device: str | None = None       # cpu | cuda; None: the GPU when there is one
    compile: str = "auto"           # compiled rollouts and training forward: true, false, auto (when the run repays it)
    progress: bool = True           # tqdm bar
    REQUIRED: ClassVar[tuple] = ("model", "task", "out")
    ALIASES: ClassVar[dict] = {"warmup_steps": "warmup", "bias_gamma": "bias_update_speed"}


CONFIG = GRPOConfig


def validate(cfg: GRPOConfig) -> None:
    if cfg.loss_type not in LOSS_TYPES:
        raise UsageError(f"--loss-type {cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise UsageError(f"--scale-rewards {cfg.scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    if cfg.group_size < 2:
        raise UsageError(f"--group-size must be >= 2 (advantages are relative to the group), got {cfg.group_size}")


def rollout_compile(compile, rollouts_left: int, max_tokens: int, device: torch.device) -> tuple[bool | str, str]:
    """The rollout engine's compile= and a note saying why. "auto" weighs the whole run, which the engine cannot see
    (its own rule counts one generate call's decode steps and compiles only after thousands were run eager): compile
    when rollouts_left x max_tokens, an upper bound of the decode steps still to run, reaches compiled.AUTO_MIN_STEPS
    of the device (4,000 on the CPU: e.g. 63 rollouts of 64 tokens)."""
    from ..infer.compiled import AUTO_MIN_STEPS, compile_mode
    mode = compile_mode(compile)
    if mode != "auto":
        return mode, ""
    steps, bar = rollouts_left * max_tokens, AUTO_MIN_STEPS.get(device.type, float("inf"))
    return steps >= bar, (f"rollouts decode {'compiled' if steps >= bar else 'eager'} (compile='auto': "
                          f"{rollouts_left} rollouts x {max_tokens} tokens, compiling pays from {bar} decode steps)")


# ---------------------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One step's samples: this process's prompts and completions, every process's scores."""
    problems: list                  # (p,) this process's prompts
    completions: list               # (p*G,) their engine Completions, group by group
    first: int                      # index of this process's first group among all P
    rewards: torch.Tensor           # (P, G) weighted reward, all processes
    parts: dict                     # reward name -> (P, G), all processes
    lengths: torch.Tensor           # (P*G,) completion tokens, all processes
    truncated: torch.Tensor         # (P*G,) bool: cut at max_tokens, all processes


def rollout(engine, tok, task, problems: list, first: int, cfg: GRPOConfig, step: int, reward_funcs, reward_weights,
            rt) -> Rollout:
    """Sample G completions for each of this process's prompts (one batched engine call), score them, and gather
    the scores of every process."""
    from ..data.tasks import prompt_ids
    from ..infer.engine import SamplingParams

    G = cfg.group_size
    prompts = [prompt_ids(tok, task, p) for p in problems]
    # one seed per completion, a pure function of (seed, step, global index): sampling replays exactly on resume,
    # and N processes together draw the samples one process would
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=(cfg.seed * 1_000_003 + step) * 4096 + first * G + i, logprobs=True)
              for i in range(len(prompts) * G)]
    # the first completion of every group goes first: the engine prefills the P prompts in one forward and the G-1
    # copies of each in the next, from its prefix cache (a copy waits for the blocks its first one writes, so in group
    # order the batch ramps up one group per step, through every batch bucket of a compiled decode step)
    order = sorted(range(len(params)), key=lambda i: (i % G != 0, i))
    comps = engine.generate([prompts[i // G] for i in order], [params[i] for i in order])
    comps = [c for _, c in sorted(zip(order, comps), key=lambda x: x[0])]
    flat, texts = [p for p in problems for _ in range(G)], [c.text for c in comps]
    # accuracy and format are always measured (logged as accuracy / format_rate), whatever the reward is made of
    parts = {"accuracy": accuracy_reward(flat, texts, task), "format_rate": format_reward(flat, texts, task)}
    total = torch.zeros(len(comps))
    for fn, w in zip(reward_funcs, reward_weights):
        name = {accuracy_reward: "accuracy", format_reward: "format_rate"}.get(fn) or getattr(fn, "__name__", "reward")
        if name not in parts:
            parts[name] = [float(x) for x in fn(flat, texts, task)]
        total += w * torch.tensor(parts[name], dtype=torch.float32)
    everyone = lambda values: rt.gather(torch.as_tensor(values, dtype=torch.float32))
    return Rollout(problems, comps, first, everyone(total).view(-1, G),
                   {k: everyone(v).view(-1, G) for k, v in parts.items()},
                   everyone([c.completion_tokens for c in comps]),
                   everyone([c.finish_reason == "length" for c in comps]).bool())


def forward_logprobs(model, b, temperature: float, device, compiled: bool = False):
    """Training forward of an rl.GroupBatch (each prompt once, its completions after it) -> log-probs and entropies
    (N, T + 1) of the completion tokens; compiled: through rl.compiled_group_logprobs (training_compile)."""
    from ..rl import compiled_group_logprobs
    with runtime.autocast(device):
        return (compiled_group_logprobs if compiled else group_logprobs)(model, b.to(device), temperature)


# logits one no-grad forward of the reference model may hold (float32: 512 MiB; log-softmax and the gather add about
# as much again): beyond it the rollout's rows go through in slices of whole micro-batches
REF_FORWARD_LOGITS = 2**27


def _runs(chunks: list, rows: list, vocab_size: int, max_logits: int) -> list[list[int]]:
    """Consecutive micro-batches grouped so that each group's logits fit max_logits; a padding micro-batch (no
    completion: a process with nothing left) goes alone."""
    runs, n, K = [], 0, 0
    for j, c in enumerate(chunks):
        n, K = n + len(c), max(K, rows[j].targets.shape[1])
        if not runs or not c or not chunks[j - 1] or n * K * vocab_size > max_logits:
            runs.append([])
            n, K = len(c), rows[j].targets.shape[1]
        runs[-1].append(j)
    return runs


@torch.no_grad()
def reference_logprobs(ref_model, comps, chunks: list, rows: list, pad_id: int, temperature: float, device,
                       max_logits: int = REF_FORWARD_LOGITS) -> list[torch.Tensor]:
    """pi_ref's log-probs for every micro-batch (completions chunks[j], GroupBatch rows[j]) from one batched forward
    over all of them: the frozen model needs no gradient, so none of the micro-batching the backward needs (slices of
    whole micro-batches only where the logits would pass max_logits). Column 0 of every row is its first completion
    token, so micro-batch j's K_j columns are the joint batch's first K_j. -> one (n_j, K_j) tensor per micro-batch."""
    out = []
    for run in _runs(chunks, rows, ref_model.cfg.vocab_size, max_logits):
        b = rows[run[0]] if len(run) == 1 else group_batch(comps, [i for j in run for i in chunks[j]], pad_id)
        logp = forward_logprobs(ref_model, b, temperature, device)[0]
        out += [lp[:, :rows[j].targets.shape[1]] for j, lp in zip(run, logp.split([len(rows[j].group) for j in run]))]
    return out


def train_on_rollout(module, optimizer, ro: Rollout, cfg: GRPOConfig, pad_id: int, ref_model, rt,
                     compiled: bool = False) -> dict:
    """num_iterations optimizer steps on one rollout batch; returns the step's statistics (over all processes).
    Old log-probs (the denominator of rho) are the policy's own, recorded without gradient in the first iteration,
    before any update: exactly the policy that sampled. The engine's sampling log-probs are compared to them
    (`logprob_gap`: ~0 when engine and training forward agree; large values mean the ratio is off-policy noise)."""
    P, G = ro.rewards.shape
    mine = slice(ro.first * G, (ro.first + len(ro.problems)) * G)
    adv = group_advantages(ro.rewards, cfg.scale_rewards).flatten()[mine]       # global group/batch statistics
    zero = zero_std_groups(ro.rewards)                                          # (P,)
    keep = (~zero if cfg.dynamic_sampling else torch.ones(P, dtype=torch.bool)).repeat_interleave(G)
    stats = {"frac_zero_std": zero.float().mean().item(), "groups_kept": int(keep.sum()) // G,
             "truncated_frac": ro.truncated.float().mean().item()}
    if cfg.mask_truncated:   # no loss on truncated completions (they would be graded wrong for being cut, DAPO 3.3)
        keep &= ~ro.truncated
    if not (n_seqs := int(keep.sum())):
        return {**stats, "loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": float("nan"),
                "logprob_gap": float("nan"), "trained_tokens": 0, "skipped": 1}
    comps = ro.completions
    idx = [i for i in range(len(comps)) if keep[mine][i]]       # group by group: a micro-batch runs each prompt once
    chunks = [idx[j:j + cfg.micro_batch] for j in range(0, len(idx), cfg.micro_batch)]
    chunks += [[]] * (int(rt.sum(len(chunks), op="max")[0]) - len(chunks))   # every process runs as many forwards
    rows = [group_batch(comps, c, pad_id) for c in chunks]
    num_tokens = torch.tensor(rt.sum(sum(r.mask.sum().item() for r in rows))[0]).clamp(min=1.0)
    ref = reference_logprobs(ref_model, comps, chunks, rows, pad_id, cfg.temperature, rt.device) if cfg.beta else []
    old: list[torch.Tensor] = []
    agg, gap = torch.zeros(4, dtype=torch.float64), 0.0    # loss, kl, clip_frac, entropy sum (global units)
    for it in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for j, (c, b) in enumerate(zip(chunks, rows)):
            mask, adv_c = b.mask.to(rt.device), (adv[c] if c else torch.zeros(1)).to(rt.device)
            with runtime.grad_sync(module, j == len(rows) - 1):
                logp, ent = forward_logprobs(module, b, cfg.temperature, rt.device, compiled)
                if it == 0:
                    old.append(logp.detach())
                    gap = max(gap, ((logp.detach() - b.engine_logprobs.to(rt.device)).abs() * mask).max().item())
                    agg[3] += (ent * mask).sum().item()
                out = policy_loss(logp, old[j], adv_c, mask, loss_type=cfg.loss_type, eps_low=cfg.eps_low,
                                  eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=ref[j] if ref else None,
                                  max_tokens=cfg.max_tokens, num_seqs=n_seqs, num_tokens=num_tokens)
                # global denominators; times the number of processes, as DDP / FSDP average the gradients
                (out.loss * rt.world_size).backward()
            if it == cfg.num_iterations - 1:
                w = mask.sum().item() / num_tokens.item()
                agg[:3] += torch.tensor([out.loss.item(), out.kl.item() * w, out.clip_frac.item() * w],
                                        dtype=torch.float64)
        stats["grad_norm"] = optim.clip_grad(module.parameters(), cfg.grad_clip)
        optimizer.step()
    loss, kl, clip_frac, entropy = rt.sum(*agg.tolist())
    return {**stats, "loss": loss, "kl": kl, "clip_frac": clip_frac, "entropy": entropy / num_tokens.item(),
            "logprob_gap": rt.sum(gap, op="max")[0], "trained_tokens": int(num_tokens.item())}


# ---------------------------------------------------------------------------------------------------- the loop
def grpo(cfg: GRPOConfig, reward_funcs=None, reward_weights=None, model=None, tokenizer=None) -> Path:
    """Run GRPO and return OUT/final (a model folder with the tokenizer).

    reward_funcs: callables fn(problems, texts, task) -> list[float] (one score per completion); default the task's
    accuracy and format graders weighted by cfg.accuracy_weight and cfg.format_weight. reward_weights: one weight
    per function (default 1.0 each for user functions).
    """
    from ..checkpoint import load_model_and_tokenizer
    from ..data.split import draw_problems, train_rng
    from ..data.tasks import get_task, prompt_ids
    from ..infer.engine import Engine

    validate(cfg)
    if reward_funcs is None:
        reward_funcs, reward_weights = [accuracy_reward, format_reward], [cfg.accuracy_weight, cfg.format_weight]
    reward_weights = list(reward_weights or [1.0] * len(reward_funcs))
    if len(reward_weights) != len(reward_funcs):
        raise UsageError(f"{len(reward_funcs)} reward functions but {len(reward_weights)} reward weights")
    rt = runtime.init(cfg.device)
    try:
        run = Run(cfg, "grpo", rt)
        mine = rt.share(cfg.prompts_per_step, "--prompts-per-step")    # this process's prompts of each step
        task = get_task(cfg.task)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, purpose="grpo")
        difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
        runtime.seed(cfg.seed)
        model = model.float().to(rt.device).eval()   # no dropout anywhere; eval mode skips the balance-loss bookkeeping
        # the frozen reference pi_ref, only when the KL term is on: the starting model (copied before a resume loads
        # newer weights)
        ref_model = copy.deepcopy(model).requires_grad_(False) if cfg.beta != 0.0 else None
        run.restore_weights(model)
        # the engine samples from the policy's own parameters, or from a full copy refreshed each step when FSDP
        # shards them; the MTP block is not trained (its loss is not part of GRPO's)
        policy = copy.deepcopy(model) if rt.distributed and cfg.fsdp else model
        module = runtime.parallelize(model, rt, cfg.fsdp, blocks=[*model.layers, *model.mtp], unused=True)
        opt = optim.adamw(module, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
        optim.add_bias_update(opt, optim.ExpertLoads(model, rt), cfg.bias_update_speed)
        run.start(module, model, opt, tokenizer)
        if run.resume_from is not None and rt.is_main:    # samples logged after the checkpoint were lost with it
            write_jsonl(run.out / "samples.jsonl", [r for r in read_jsonl(run.out / "samples.jsonl")
                                                    if r["step"] <= run.step])
        # context: the longest prompt the task writes (with room to spare) plus the completion budget
        longest = max(len(prompt_ids(tokenizer, task, p))
                      for p in draw_problems(task, train_rng(cfg.seed, "len"), difficulty, 64))
        compile, note = rollout_compile(cfg.compile, cfg.steps - run.step, cfg.max_tokens, rt.device)
        from ..rl import training_compile
        train_compiled, train_note = training_compile(cfg.compile, cfg.steps - run.step, rt.device, rt.distributed)
        for n in filter(None, (note, train_note)):
            run.print(f"[grpo] {n}")
        # no MTP (the engine drafts for greedy requests only, GRPO does not train the MTP block); blocks of 8: a group's
        # copies reuse its prompt's full blocks and recompute the rest, ~4 tokens each (~8 with blocks of 16)
        engine = Engine(policy, tokenizer, max_batch=min(256, (mine.stop - mine.start) * cfg.group_size),
                        max_seq_len=2 * longest + cfg.max_tokens + 16, mtp=False, compile=compile, block_size=8)
        for step in run.steps():
            problems = draw_problems(task, train_rng(cfg.seed, "grpo", step), difficulty, cfg.prompts_per_step)
            ro = rollout(engine, tokenizer, task, problems[mine], mine.start, cfg, step, reward_funcs, reward_weights,
                         rt)
            lr = optim.set_lr(opt, optim.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                                               schedule="cosine", min_lr_ratio=1.0))
            stats = train_on_rollout(module, opt, ro, cfg, tokenizer.pad_id or 0, ref_model, rt, train_compiled)
            if policy is not model:
                policy.load_state_dict(runtime.full_state_dict(module))
            engine.reset_prefix_cache()   # cached prefixes hold latents of the old weights
            row = {"reward_mean": ro.rewards.mean().item(), "reward_std": ro.rewards.std().item(),
                   "completion_len": ro.lengths.mean().item(), "completion_len_max": ro.lengths.max().item(),
                   "lr": lr, **{name: r.mean().item() for name, r in ro.parts.items()}, **stats}
            tokens = rt.sum(sum(len(c.prompt_token_ids) + len(c.token_ids) for c in ro.completions))[0]
            run.log(row, tokens=int(tokens), reward=row["reward_mean"], acc=row["accuracy"])
            if rt.is_main and cfg.sample_every and (step == 0 or (step + 1) % cfg.sample_every == 0):
                write_jsonl(run.out / "samples.jsonl", samples(step + 1, ro, cfg.group_size), append=True)
        if rt.is_main:
            plots.reward_plot(run.rows, run.out / "reward.png")
        return run.finish(summary=("reward_mean", "accuracy", "format_rate"))
    finally:
        runtime.shutdown(rt)


def samples(step: int, ro: Rollout, G: int, groups: int = 2) -> list[dict]:
    """OUT/samples.jsonl rows: the completions of the first `groups` prompts, to read what the policy writes."""
    return [{"step": step, "question": ro.problems[p].question, "answer": str(ro.problems[p].answer),
             "completion": ro.completions[p * G + g].text, "reward": ro.rewards[p, g].item(),
             "finish_reason": ro.completions[p * G + g].finish_reason}
            for p in range(min(groups, len(ro.problems))) for g in range(G)]


def main(cfg: GRPOConfig) -> int:
    grpo(cfg)
    return 0
