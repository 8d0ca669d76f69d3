"""GRPO's math (DeepSeekMath Section 4; DAPO; Dr. GRPO), pure functions of tensors: group-relative advantages, the k3
KL estimate, the clipped surrogate aggregated by loss type, and token log-probs at the sampling temperature.
train/grpo.py is the trainer that feeds them; tests/test_grpo.py checks each against hand-computed numbers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import cpu_cross_entropy

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
    # on the CPU one fused pass a row (model/cpu_cross_entropy.py: no (N, T, V) log-softmax kept for the backward);
    # elsewhere one log-softmax, gathered, which the entropy reads too
    logp, entropy = cpu_cross_entropy.logprobs(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return logp.view(tokens.shape), entropy.view(tokens.shape)


# ---------------------------------------------------------------------------------------------- the training forward
# A group's G completions share their prompt. Run as G padded rows prompt + completion, every prompt token is computed
# G times (the cpu-preset bench: 25-token prompts, <= 64-token completions, 25% of the positions); with a shared
# prefix each distinct prompt runs once and its completions attend to its keys and values.
class SharedPrefix:
    """Keys and values of P prompts, computed once and read by the N completions that follow them: the `prefix`
    argument of Transformer.forward / trunk (MLA.forward and GQA.forward call update() in every layer).

    First forward, over the prompts (P, Tp), right-padded: update(layer, k, v) records the layer's keys and values
    (P, Tp, heads, d) and returns them as they are, with no mask (causal). read(T) turns to the second forward, over
    the completions (N, T): update returns [its prompt's keys ; its own keys] (N, Tp + T, heads, d), the same for the
    values, and the mask (N, 1, T, Tp + T): the first lengths[group[n]] prompt columns, then causal. Gradients of the
    N copies (an index into the recorded tensors) sum back into each prompt's keys and values: what computing the
    prompt once per completion gives."""

    def __init__(self, lengths: torch.Tensor, group: torch.Tensor):
        self.lengths, self.group = lengths, group       # (P,) prompt lengths; (N,) the prompt row of each completion
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None          # set by read(): from then on update() reads

    def read(self, width: int, T: int) -> None:
        """Switch to the completions' forward: prompts right-padded to `width` columns, completions of T."""
        dev = self.lengths.device
        prompt = torch.arange(width, device=dev) < self.lengths[self.group][:, None]                 # (N, Tp)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        N = len(self.group)
        self.mask = torch.cat([prompt[:, None].expand(N, T, width), causal.expand(N, T, T)], dim=-1)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.mask is None:
            self.kv[layer] = (k, v)
            return k, v, None
        pk, pv = self.kv[layer]                    # (P, Tp, heads, d) -> each completion's prompt (N, Tp, heads, d)
        return (torch.cat([pk.index_select(0, self.group), k], dim=1),
                torch.cat([pv.index_select(0, self.group), v], dim=1), self.mask)


@dataclass
class GroupBatch:
    """Completions as one shared-prefix batch: each distinct prompt once, each completion one row after it. Column 0
    of targets / mask / engine_logprobs is a completion's first token, predicted at its prompt's last position."""
    prompts: torch.Tensor           # (P, Tp) the distinct prompts, right-padded
    lengths: torch.Tensor           # (P,) their lengths
    group: torch.Tensor             # (N,) the prompt row of each completion
    inputs: torch.Tensor            # (N, T) each completion but its last token, right-padded (T >= 1)
    targets: torch.Tensor           # (N, T + 1) the completion tokens
    mask: torch.Tensor              # (N, T + 1) 1.0 where targets holds a completion token
    engine_logprobs: torch.Tensor   # (N, T + 1) the sampler's log-probs of them (0 where it gave none)

    def to(self, device) -> GroupBatch:
        return GroupBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def group_batch(comps, idx: list[int], pad_id: int) -> GroupBatch:
    """Completions comps[i] for i in idx (anything with prompt_token_ids, token_ids, logprobs: engine Completions)
    -> their GroupBatch; completions of equal prompts share one prompt row. No completion: one padding row that the
    mask excludes (a process with nothing left still runs every forward)."""
    rows: dict[tuple, int] = {}
    group = [rows.setdefault(tuple(comps[i].prompt_token_ids), len(rows)) for i in idx]
    outs = [list(comps[i].token_ids) for i in idx]
    if not idx:
        rows, group, outs = {(pad_id,): 0}, [0], [[]]
    Tp, T = max(len(p) for p in rows), max(2, *(len(o) for o in outs)) - 1
    pad = lambda seqs, width: torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])    # noqa: E731
    lps = [[float(x) for x in (comps[i].logprobs or [])[:len(o)]] for i, o in zip(idx, outs)] or [[]]
    return GroupBatch(pad([list(p) for p in rows], Tp), torch.tensor([len(p) for p in rows]), torch.tensor(group),
                      pad([o[:-1] for o in outs], T), pad(outs, T + 1),
                      torch.tensor([[1.0] * len(o) + [0.0] * (T + 1 - len(o)) for o in outs]),
                      torch.tensor([x + [0.0] * (T + 1 - len(x)) for x in lps]))


def takes_prefix(cfg) -> bool:
    """Does the model's attention read a SharedPrefix? Not deepseek_v4's (model/v4.py) nor DSA's indexer."""
    return cfg.model_type != "deepseek_v4" and not cfg.dsa


def group_logits(model, b: GroupBatch) -> torch.Tensor:
    """The logits of every completion token of b, (N, T + 1, vocab): the prompts' forward, recording each layer's
    keys and values, then the completions' forward reading them, at the positions after their prompt's (padded_logits
    for a model whose attention takes no prefix)."""
    if not takes_prefix(getattr(model, "module", model).cfg):       # (DDP wraps the model as .module)
        return padded_logits(model, b)
    prefix = SharedPrefix(b.lengths, b.group)
    prompt_logits = model(b.prompts, prefix=prefix)                                  # (P, Tp, vocab)
    N, T = b.inputs.shape
    prefix.read(b.prompts.shape[1], T)
    positions = b.lengths[b.group][:, None] + torch.arange(T, device=b.inputs.device)   # (N, T)
    logits = model(b.inputs, positions, prefix=prefix)                               # (N, T, vocab)
    first = prompt_logits[torch.arange(len(b.lengths), device=b.lengths.device), b.lengths - 1]   # (P, vocab)
    return torch.cat([first[b.group][:, None], logits], dim=1)


def padded_logits(model, b: GroupBatch) -> torch.Tensor:
    """group_logits the plain way: one right-padded row prompt + completion per completion (N, Tp + T), and the
    logits at its completion tokens' positions, (N, T + 1, vocab)."""
    lengths, prompts = b.lengths[b.group], b.prompts[b.group]                      # (N,), (N, Tp)
    (N, T), Tp = b.inputs.shape, b.prompts.shape[1]
    cols = torch.arange(Tp + T, device=b.inputs.device).expand(N, -1)               # (N, Tp + T)
    rows = torch.where(cols < lengths[:, None], prompts.gather(1, cols.clamp(max=Tp - 1)),
                       b.inputs.gather(1, (cols - lengths[:, None]).clamp(0, T - 1)))
    logits = model(rows)                                                           # (N, Tp + T, vocab)
    at = lengths[:, None] - 1 + torch.arange(T + 1, device=lengths.device)         # (N, T + 1)
    return logits.gather(1, at[..., None].expand(N, T + 1, logits.shape[-1]))


def group_logprobs(model, b: GroupBatch, temperature: float = 1.0):
    """token_logprobs of group_logits: log-probs and entropies (N, T + 1) of b's completion tokens."""
    return token_logprobs(group_logits(model, b), b.targets, temperature)


_compiled: dict = {}


def compiled_group_logprobs(model, b: GroupBatch, temperature: float = 1.0):
    """group_logprobs as one torch.compile graph, forward and backward, with dynamic shapes (one graph for every
    number of completions and every prompt / completion length): GRPO's training forward with --compile
    (train/grpo.py: training_compile). The same values as group_logprobs (tests/test_grpo_prefix.py)."""
    if "fn" not in _compiled:
        if next(model.parameters()).device.type == "cpu":
            cpu_cross_entropy.load()         # built before tracing, so that the graph calls it (token_logprobs)
        _compiled["fn"] = torch.compile(group_logprobs, dynamic=True)
    # no "duck" sizes: two sizes that happen to be equal in the first batch (3 prompt columns, 3 completions) are not
    # assumed equal ever after, which would cost a graph for the first batch where they differ
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        return _compiled["fn"](model, b, temperature)


# The compiled training forward (rl.compiled_group_logprobs) compiles in ~30 s (disk cache) to ~100 s (cold) and saves
# ~15% of a cpu-preset GRPO step (docs/benchmarks.md): "auto" compiles it for runs that repay even a cold compile.
AUTO_TRAIN_STEPS = 2000


def training_compile(compile, steps_left: int, device, distributed: bool = False) -> tuple[bool, str]:
    """Whether the training forward runs compiled, and why: compile=True, or "auto" with >= AUTO_TRAIN_STEPS steps to
    run; never without a compiler (compiled.unavailable) or under torchrun (untested around DDP / FSDP2)."""
    from .infer.compiled import compile_mode, unavailable
    mode = compile_mode(compile)
    if mode is False or (mode == "auto" and steps_left < AUTO_TRAIN_STEPS):
        return False, "" if mode is False else f"training forward eager ('auto': {steps_left} < {AUTO_TRAIN_STEPS} " \
            "steps)"
    why = unavailable(device) or ("not under torchrun" if distributed else None)
    return (False, f"training forward eager: {why}") if why else (True, "training forward compiled (in the first step)")
