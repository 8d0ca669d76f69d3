"""`nanoseek distill`: a teacher's reasoning traces -> rejection sampling -> SFT of a student (DeepSeek-R1 Section 2.4).

R1's distilled models are plain SFT on ~800k samples that R1 wrote and a grader accepted. The same three steps:
1. the teacher samples `samples_per_problem` completions for each training-split problem, through the engine;
2. only the correct ones are kept (the task's grader; at most `keep_per_problem` per problem, distinct texts):
   OUT/traces.jsonl holds them as chat conversations (reasoning_content + content), OUT/rejection.json the counts
   and the keep rate;
3. the student (fresh from a preset with the teacher's tokenizer, or an existing model folder) is fine-tuned on
   them with nanoseek.train.sft, writing OUT/metrics.jsonl, OUT/ckpt/ and OUT/final as SFT does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import UsageError
from .loop import make_config
from .sft import SFTConfig, load_model_and_tokenizer, sft


@dataclass
class DistillConfig:
    teacher: str = ""
    task: str = ""
    out: str = ""
    student_preset: str | None = None     # a fresh student of this preset (teacher's tokenizer and vocabulary)
    student: str | None = None            # or an existing student model folder
    difficulty: int | None = None
    problems: int = 256                   # training-split problems the teacher attempts
    samples_per_problem: int = 4
    keep_per_problem: int = 2             # correct traces kept per problem (distinct texts)
    temperature: float = 0.8
    max_tokens: int = 256
    # the student's SFT
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    save_every: int = 100
    resume: bool = False
    progress: bool = True


def split_completion(text: str, eos: str = "") -> tuple[str, str]:
    """Engine text of a completion after "<think>\\n" -> (reasoning, answer), as the chat template renders them."""
    if eos:
        text = text.replace(eos, "")
    if "</think>" not in text:
        return "", text.strip()
    reasoning, content = text.split("</think>", 1)
    return reasoning.strip("\n"), content.strip("\n")


def teacher_traces(model, tok, task, problems: list, cfg: DistillConfig, progress: bool = True) -> tuple[list, dict]:
    """Sample, grade and keep: -> (conversations of the accepted traces, counts)."""
    from ..eval import prompt_ids
    from ..infer.engine import Engine, SamplingParams

    S = cfg.samples_per_problem
    prompts = [prompt_ids(tok, task, p) for p in problems]
    engine = Engine(model, tok, max_batch=64, max_seq_len=max(map(len, prompts)) + cfg.max_tokens + 1)
    params = [SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed * 1_000_003 + i)
              for i in range(len(problems) * S)]
    comps = engine.generate([pr for pr in prompts for _ in range(S)], params, progress=progress)
    convs, solved = [], 0
    for i, p in enumerate(problems):
        kept: set[str] = set()
        for c in comps[i * S:(i + 1) * S]:
            if c.finish_reason != "stop" or float(task.grade(p, c.text)) < 1.0 or c.text in kept:
                continue
            if len(kept) >= cfg.keep_per_problem:
                break
            kept.add(c.text)
            reasoning, content = split_completion(c.text, tok.eos_token or "")
            convs.append(task.messages(p) + [{"role": "assistant", "reasoning_content": reasoning,
                                              "content": content}])
        solved += bool(kept)
    n = len(comps)
    stats = {"generated": n, "kept": len(convs), "keep_rate": len(convs) / max(1, n),
             "problems": len(problems), "problems_solved": solved}
    return convs, stats


def distill(cfg: DistillConfig | dict) -> Path:
    """Rejection-sample the teacher's traces and train the student on them; returns OUT/final."""
    import torch

    import nanoseek as ns

    from ..data.tasks import get_task
    from ..eval import draw_problems, train_rng

    if isinstance(cfg, dict):
        cfg = DistillConfig(**cfg)
    if (cfg.student_preset is None) == (cfg.student is None):
        raise UsageError("pass exactly one of --student-preset NAME (a new student) or --student DIR")
    if cfg.student_preset is not None and cfg.student_preset not in ns.PRESETS:
        raise UsageError(f"unknown preset {cfg.student_preset!r}; known presets: {', '.join(ns.PRESETS)}")
    out = Path(cfg.out)
    task = get_task(cfg.task)
    traces, report = out / "traces.jsonl", out / "rejection.json"
    if not cfg.resume and (traces.exists() or (out / "final").exists()):
        raise UsageError(f"{out} already holds a distillation run; pass --resume or choose another --out")
    teacher, tok = load_model_and_tokenizer(cfg.teacher)
    if not (cfg.resume and traces.exists() and report.exists()):
        difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
        problems = draw_problems(task, train_rng(cfg.seed, "distill"), difficulty, cfg.problems)
        convs, stats = teacher_traces(teacher.float().eval(), tok, task, problems, cfg, cfg.progress)
        if not convs:
            raise UsageError(f"the teacher solved none of {cfg.problems} problems of {cfg.task} "
                             f"({stats['generated']} samples): nothing to distill; use a stronger teacher, an "
                             f"easier --difficulty or more --samples-per-problem")
        out.mkdir(parents=True, exist_ok=True)
        tmp = traces.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
        tmp.replace(traces)
        report.write_text(json.dumps(stats, indent=2) + "\n")
    stats = json.loads(report.read_text())
    print(f"[distill] teacher: {stats['kept']} of {stats['generated']} samples kept "
          f"(keep rate {100 * stats['keep_rate']:.1f}%, {stats['problems_solved']}/{stats['problems']} problems solved)")
    del teacher
    if cfg.student is not None:
        student, stok = load_model_and_tokenizer(cfg.student)
        if stok.vocab_size > student.cfg.vocab_size or stok.encode("<think>") != tok.encode("<think>"):
            raise UsageError(f"the student {cfg.student} has a different tokenizer from the teacher's; distillation "
                             f"by SFT on text needs the same special tokens (or use --student-preset)")
    else:
        torch.manual_seed(cfg.seed)
        scfg = ns.ModelConfig.preset(cfg.student_preset, vocab_size=max(tok.vocab_size, 1),
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        student, stok = ns.Transformer(scfg), tok
    sft_fields = {f.name for f in fields(SFTConfig)}
    scfg = SFTConfig(**{k: v for k, v in vars(cfg).items() if k in sft_fields and k not in ("task", "difficulty")},
                     data=str(traces), model=cfg.student or "")
    return sft(scfg, model=student, tokenizer=stok)


def add_arguments(p):
    p.add_argument("--teacher", help="teacher model folder (with tokenizer.json)")
    p.add_argument("--task")
    p.add_argument("--out")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--student-preset", help="train a new student of this preset (teacher's tokenizer)")
    who.add_argument("--student", help="or fine-tune this student model folder")
    p.add_argument("--config", help="TOML file with any of the options below (command line wins)")
    p.add_argument("--difficulty", type=int)
    p.add_argument("--problems", type=int, help="problems the teacher attempts")
    p.add_argument("--samples-per-problem", type=int)
    p.add_argument("--keep-per-problem", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--steps", type=int, help="student SFT steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None)


def main(args) -> int:
    cfg = make_config(DistillConfig, args, required=("teacher", "task", "out"))
    distill(cfg)
    return 0
