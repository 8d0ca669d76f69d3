"""`nanoseek eval`: pass@1 (greedy), pass@k and maj@k (sampled), and the format rate of a model on a task.

Held-out problems. Every problem belongs to exactly one split, decided by a hash of its task name and question:
`split_of(problem)` is "eval" for 1 in 8 questions and "train" for the rest. SFT, GRPO and distillation draw
their problems through `draw_problems(..., split="train")`, which skips eval-split questions, and `evaluate` only
draws eval-split ones, so "problems not seen in training" holds whatever seeds the two sides use (seeded streams
alone would not guarantee it: small tasks have few distinct problems and two streams collide). The two sides also
use different seed streams (`train_rng`, `eval_rng`), so the same --seed does not replay the same draws.

pass@k is the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n-c, k) / C(n, k) from n >= k samples of
which c are correct; maj@k grades the most frequent final answer among k samples (self-consistency).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from .errors import UsageError

EVAL_FRACTION = 8  # 1 question in EVAL_FRACTION is held out for evaluation


def split_of(problem) -> str:
    """"eval" or "train": a fixed partition of each task's problem space (by question text)."""
    h = hashlib.sha1(f"{problem.task}\x00{problem.question}".encode()).digest()
    return "eval" if int.from_bytes(h[:4], "little") % EVAL_FRACTION == 0 else "train"


def train_rng(seed: int, *stream) -> random.Random:
    """The training side's problem stream (string seeds hash deterministically across runs, unlike hash())."""
    return random.Random("train:" + ":".join(str(s) for s in (seed, *stream)))


def eval_rng(seed: int) -> random.Random:
    return random.Random(f"eval:{seed}")


def draw_problems(task, rng: random.Random, difficulty: int, n: int, split: str = "train",
                  max_tries: int = 1000) -> list:
    """n problems of `split` from task.generate(rng, difficulty), skipping those of the other split."""
    out = []
    for _ in range(n):
        for _ in range(max_tries):
            p = task.generate(rng, difficulty)
            if split_of(p) == split:
                out.append(p)
                break
        else:
            raise UsageError(f"task {task.name if hasattr(task, 'name') else task!r} at difficulty {difficulty} "
                             f"produced no {split}-split problem in {max_tries} draws (too few distinct problems)")
    return out


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


def prompt_ids(tok, task, problem) -> list[int]:
    """The chat-template prompt (generation prompt included) for a problem, as the engine receives it."""
    return tok.apply_chat_template(task.messages(problem), add_generation_prompt=True, tokenize=True)


def _load(model_or_dir):
    """A model folder, or (model, tokenizer) -> (model, tokenizer)."""
    if isinstance(model_or_dir, (tuple, list)):
        return model_or_dir
    from .checkpoint import load
    from .tokenizer import Tokenizer

    folder = Path(model_or_dir)
    if not (folder / "tokenizer.json").exists():
        raise UsageError(f"{folder}: no tokenizer.json in the model folder (train one with `nanoseek tokenizer` "
                         f"and pass it to pretraining, or copy it into the folder)")
    return load(folder), Tokenizer.load(folder)


def evaluate(model_or_dir, task: str, n: int = 100, k: int = 1, difficulty: int | None = None, seed: int = 0,
             samples: int | None = None, temperature: float = 1.0, max_tokens: int = 256, engine=None,
             progress: bool = False) -> dict:
    """Evaluate on n held-out problems: greedy pass@1, pass@k / maj@k from `samples` (>= k) sampled completions
    per problem when k > 1, and the format rate of the greedy completions.

    model_or_dir: a model folder (with tokenizer.json) or a (model, tokenizer) pair (then the model is used in
    place: the speedrun and GRPO evaluate without a save/load). difficulty None: the task's default level.
    """
    from .data.tasks import get_task
    from .infer.engine import Engine, SamplingParams

    t = get_task(task)
    if n < 1 or k < 1:
        raise UsageError(f"--n and --k must be >= 1 (got n={n}, k={k})")
    samples = max(samples or k, k)
    model, tok = _load(model_or_dir)
    level = difficulty if difficulty is not None else getattr(t, "default_difficulty", 1)
    problems = draw_problems(t, eval_rng(seed), level, n, split="eval")
    prompts = [prompt_ids(tok, t, p) for p in problems]
    was_training = model.training
    model.eval()
    # a context just long enough for these prompts and completions keeps the paged cache small
    eng = engine or Engine(model, tok, max_batch=64, max_seq_len=max(map(len, prompts)) + max_tokens + 1)
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
def add_arguments(p):
    p.add_argument("--model", required=True, help="model folder (with tokenizer.json)")
    p.add_argument("--task", required=True, help="task name (see nanoseek.data.tasks)")
    p.add_argument("--n", type=int, default=100, help="held-out problems (default 100)")
    p.add_argument("--k", type=int, default=1, help="k of pass@k and maj@k (k > 1 samples k completions each)")
    p.add_argument("--samples", type=int, default=None, help="samples per problem for pass@k (>= k; default k)")
    p.add_argument("--difficulty", type=int, default=None, help="task difficulty (default: the task's default)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k / maj@k")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="which held-out problems (eval seed stream)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def main(args) -> int:
    if args.json and Path(args.json).exists():
        raise UsageError(f"{args.json} exists already; choose another --json path (results are never overwritten)")
    res = evaluate(args.model, args.task, n=args.n, k=args.k, difficulty=args.difficulty, seed=args.seed,
                   samples=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, progress=True)
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0
