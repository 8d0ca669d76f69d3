"""`nanoseek eval`: pass@1 (greedy), pass@k and maj@k (sampled), and the format rate of a model on a task.

Held-out problems only: `evaluate` draws eval-split problems (`nanoseek.data.split`: 1 question in 8, by a hash of
the task name and question), which no training stream draws, whatever seeds either side uses.

pass@k is the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n-c, k) / C(n, k) from n >= k samples of
which c are correct; maj@k grades the most frequent final answer among k samples (self-consistency).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .data.split import EVAL_FRACTION, draw_problems, eval_rng, split_of, train_rng
from .data.tasks import get_task, prompt_ids
from .errors import UsageError

# The split policy lives in nanoseek.data.split (prompt_ids in nanoseek.data.tasks); its names stay importable from
# here, their old home, for code written against it.
__all__ = ["EVAL_FRACTION", "split_of", "train_rng", "eval_rng", "draw_problems", "prompt_ids", "pass_at_k",
           "final_answer", "evaluate", "format_table", "EvalConfig", "CONFIG", "main"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def final_answer(task, text: str) -> str:
    """The answer a completion commits to, for majority voting: the task's own extractor when it has one,
    else the text after the reasoning (after </think>, inside <answer> tags when present), whitespace-normalised."""
    if hasattr(task, "extract_answer"):
        a = task.extract_answer(text)
        return "" if a is None else str(a).strip()
    tail = text.split("</think>")[-1]
    if "<answer>" in tail:
        tail = tail.split("<answer>", 1)[1].split("</answer>", 1)[0]
    return " ".join(tail.split())


def _checked_task(task: str, n: int, k: int):
    """The task, after checking the arguments that need no model (so bad input fails before a model loads)."""
    t = get_task(task)
    if n < 1 or k < 1:
        raise UsageError(f"--n and --k must be >= 1 (got n={n}, k={k})")
    return t


def evaluate(model_or_dir, task: str, n: int = 100, k: int = 1, difficulty: int | None = None, seed: int = 0,
             samples: int | None = None, temperature: float = 1.0, max_tokens: int = 256, engine=None,
             progress: bool = False, compile: bool | str = "auto") -> dict:
    """Evaluate on n held-out problems: greedy pass@1, pass@k / maj@k from `samples` (>= k) sampled completions
    per problem when k > 1, and the format rate of the greedy completions.

    model_or_dir: a model folder (with tokenizer.json) or a (model, tokenizer) pair (then the model is used in
    place: the speedrun and GRPO evaluate without a save/load). difficulty None: the task's default level.
    """
    from .infer.engine import Engine, SamplingParams

    t = _checked_task(task, n, k)
    samples = max(samples or k, k)
    if isinstance(model_or_dir, (tuple, list)):
        model, tok = model_or_dir
    else:
        from .checkpoint import load_model_and_tokenizer
        from .model.layers import decode_layout
        model, tok = load_model_and_tokenizer(model_or_dir, purpose="evaluation")
        decode_layout(model)             # loaded here to be evaluated only
    level = difficulty if difficulty is not None else getattr(t, "default_difficulty", 1)
    problems = draw_problems(t, eval_rng(seed), level, n, split="eval")
    prompts = [prompt_ids(tok, t, p) for p in problems]
    was_training = model.training
    model.eval()
    # a context just long enough for these prompts and completions keeps the paged cache small
    eng = engine or Engine(model, tok, max_batch=64, max_seq_len=max(map(len, prompts)) + max_tokens + 1,
                           compile=compile)
    greedy = eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), progress=progress)
    correct = [float(t.grade(p, c.text)) >= 1.0 for p, c in zip(problems, greedy)]
    fmt = [float(t.format_reward(c.text)) for c in greedy]
    res = {"task": task, "difficulty": level, "n": n, "seed": seed, "split": "eval",
           "pass@1": sum(correct) / n, "format_rate": sum(fmt) / n,
           "mean_completion_tokens": sum(c.completion_tokens for c in greedy) / n}
    if k > 1:
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i)
                  for i in range(len(prompts) * samples)]
        sampled = eng.generate([pr for pr in prompts for _ in range(samples)], params, progress=progress)
        pk = mk = sampled_acc = 0.0
        for i, p in enumerate(problems):
            group = [c.text for c in sampled[i * samples:(i + 1) * samples]]
            ok = [float(t.grade(p, g)) >= 1.0 for g in group]
            pk += pass_at_k(samples, sum(ok), k)
            sampled_acc += sum(ok) / samples
            votes = Counter(a for a in (final_answer(t, g) for g in group[:k]) if a)
            if votes:
                best = votes.most_common(1)[0][0]
                mk += next(o for g, o in zip(group[:k], ok) if final_answer(t, g) == best)
        res.update({f"pass@{k}": pk / n, f"maj@{k}": mk / n, "sampled_pass@1": sampled_acc / n,
                    "samples": samples, "temperature": temperature})
    model.train(was_training)
    return res


def format_table(res: dict) -> str:
    keys = [k for k in res if k.startswith(("pass@", "maj@", "sampled_pass@"))] + ["format_rate"]
    lines = [f"{res['task']} (difficulty {res['difficulty']}, {res['n']} held-out problems)",
             f"{'metric':<16}{'value':>8}", "-" * 24]
    lines += [f"{k:<16}{100 * res[k]:>7.1f}%" for k in keys]
    lines.append(f"{'mean tokens':<16}{res['mean_completion_tokens']:>8.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
@dataclass
class EvalConfig:
    model: str = ""                 # model folder (with tokenizer.json)
    task: str = ""                  # task name (see nanoseek.data.tasks), or FILE.py:NAME for your own
    n: int = 100                    # held-out problems
    k: int = 1                      # k of pass@k and maj@k (k > 1 samples k completions each)
    samples: int | None = None      # samples per problem for pass@k (>= k; default k)
    difficulty: int | None = None   # task difficulty (default: the task's default)
    temperature: float = 1.0        # sampling temperature for pass@k / maj@k
    max_tokens: int = 256           # most tokens per completion
    seed: int = 0                   # which held-out problems (eval seed stream)
    json: str | None = None         # also write the results to this JSON file (never overwritten)
    threads: int = 0                # torch CPU threads (0: one for small models, all cores from ~50M parameters)
    compile: str = "auto"           # decode step as one compiled graph: true, false, auto (when the steps pay for it)
    REQUIRED: ClassVar[tuple] = ("model", "task")


CONFIG = EvalConfig


def main(cfg: EvalConfig) -> int:
    from .checkpoint import load_model_and_tokenizer
    from .model.layers import decode_layout
    from .options import set_threads

    if cfg.json and Path(cfg.json).exists():
        raise UsageError(f"{cfg.json} exists already; choose another --json path (results are never overwritten)")
    _checked_task(cfg.task, cfg.n, cfg.k)
    model, tok = load_model_and_tokenizer(cfg.model, purpose="evaluation")
    decode_layout(model)                 # evaluated only: the layout of fast one-row decoding
    # one thread for a small model: torch's default (every core) makes its eval many times slower on a shared CPU
    set_threads(cfg.threads, sum(p.numel() for p in model.parameters()))
    res = evaluate((model, tok), cfg.task, n=cfg.n, k=cfg.k, difficulty=cfg.difficulty, seed=cfg.seed,
                   samples=cfg.samples, temperature=cfg.temperature, max_tokens=cfg.max_tokens, progress=True,
                   compile=cfg.compile)
    print(format_table(res))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0
