"""The held-out policy: which task problems training may see and which only evaluation sees.

Every problem belongs to exactly one split, decided by a hash of its task name and question: `split_of(problem)` is
"eval" for 1 question in EVAL_FRACTION and "train" for the rest. SFT, GRPO, distillation and the pretraining corpus
draw their problems through `draw_problems(..., split="train")` (or skip eval-split ones themselves), and
`nanoseek eval` only draws eval-split ones, so "problems not seen in training" holds whatever seeds the two sides
use. Seeded streams alone would not guarantee it: small tasks have few distinct problems and two streams collide.
The two sides also use different seed streams (`train_rng`, `eval_rng`), so the same --seed does not replay the
same draws.

This module needs nothing but a problem's `task` and `question` (and a task's `generate`), so every side can
import it without importing the others.
"""

from __future__ import annotations

import hashlib
import random

from ..errors import UsageError

EVAL_FRACTION = 8  # 1 question in EVAL_FRACTION is held out for evaluation


def split_of(problem) -> str:
    """"eval" or "train": a fixed partition of each task's problem space (by question text)."""
    h = hashlib.sha1(f"{problem.task}\x00{problem.question}".encode()).digest()
    return "eval" if int.from_bytes(h[:4], "little") % EVAL_FRACTION == 0 else "train"


def train_rng(seed: int, *stream) -> random.Random:
    """The training side's problem stream (string seeds hash deterministically across runs, unlike hash())."""
    return random.Random("train:" + ":".join(str(s) for s in (seed, *stream)))


def eval_rng(seed: int) -> random.Random:
    """The evaluation side's problem stream."""
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
            raise UsageError(f"task {getattr(task, 'name', task)!r} at difficulty {difficulty} produced no "
                             f"{split}-split problem in {max_tries} draws (too few distinct problems)")
    return out
