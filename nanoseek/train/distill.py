"""`nanoseek distill`: a teacher's reasoning traces -> rejection sampling -> SFT of a student (DeepSeek-R1 Section 2.4).

R1's distilled models are plain SFT on ~800k samples that R1 wrote and a grader accepted. The same three steps:
1. the teacher samples `samples_per_problem` completions for each training-split problem, through the engine
   (under torchrun each process samples its share of the problems);
2. only the correct ones are kept (the task's grader; at most `keep_per_problem` per problem, distinct texts):
   OUT/traces.jsonl holds them as chat conversations (reasoning_content + content), OUT/rejection.json the counts
   and the keep rate;
3. the student is fine-tuned on them with nanoseek.train.sft, writing OUT/metrics.jsonl, OUT/ckpt/ and OUT/final
   as SFT does. The traces are text, not token ids: the student's own chat template renders them and its own
   tokenizer encodes them, so it may be of another architecture and vocabulary (R1's Qwen2 and Llama students of
   a DeepSeek teacher): a model folder or .gguf file (--student), or a fresh preset with the teacher's tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from ..errors import UsageError
from . import runtime
from .sft import SFTConfig, sft


@dataclass
class DistillConfig:
    teacher: str = ""                     # teacher model folder (with tokenizer.json) or .gguf file
    task: str = ""                        # task whose training-split problems the teacher attempts
    out: str = ""                         # run folder (traces.jsonl, rejection.json, the student's SFT run)
    student_preset: str | None = None     # a fresh student of this preset (teacher's tokenizer and vocabulary)
    student: str | None = None            # or a student model folder / .gguf file (any family, its own tokenizer)
    difficulty: int | None = None         # task difficulty (None: the task's default)
    problems: int = 256                   # training-split problems the teacher attempts
    samples_per_problem: int = 4          # teacher samples per problem
    keep_per_problem: int = 2             # correct traces kept per problem (distinct texts)
    temperature: float = 0.8              # teacher sampling temperature
    max_tokens: int = 256                 # teacher completion budget
    steps: int = 200                      # the student's SFT steps
    batch_size: int = 16                  # packed rows per SFT step
    seq_len: int = 512                    # tokens per packed row
    lr: float = 1e-3                      # the student's peak learning rate
    warmup: int = 20                      # warmup steps
    bias_update_speed: float = 0.0        # the student's V3 routing-bias gamma during its SFT (0: off)
    seed: int = 0                         # problems, sampling seeds, a fresh student's weights
    save_every: int = 100                 # checkpoint every N SFT steps
    resume: bool = False                  # reuse OUT/traces.jsonl and continue the student's SFT
    fsdp: bool = False                    # FSDP2 fully_shard instead of DDP (under torchrun)
    device: str | None = None             # cpu | cuda; None: the GPU when there is one
    progress: bool = True                 # progress bars
    REQUIRED: ClassVar[tuple] = ("teacher", "task", "out")
    ALIASES: ClassVar[dict] = {"bias_gamma": "bias_update_speed"}


CONFIG = DistillConfig


def split_completion(text: str, eos: str = "") -> tuple[str, str]:
    """Engine text of a completion after "<think>\\n" -> (reasoning, answer), as the chat template renders them."""
    text = text.replace(eos, "") if eos else text
    if "</think>" not in text:
        return "", text.strip()
    reasoning, content = text.split("</think>", 1)      # (a teacher whose prompt does not open <think> writes it)
    return reasoning.split("<think>")[-1].strip("\n"), content.strip("\n")


def teacher_traces(cfg: DistillConfig, task, teacher, tok, rt) -> tuple[list, dict]:
    """Steps 1-2, each process on its share of the problems: sample, grade, keep -> (the conversations of the accepted
    traces, counts), gathered from every process."""
    from ..data.split import draw_problems, train_rng
    from ..data.tasks import prompt_ids
    from ..infer.engine import Engine, SamplingParams

    S = cfg.samples_per_problem
    difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
    problems = draw_problems(task, train_rng(cfg.seed, "distill"), difficulty, cfg.problems)
    first, last = rt.rank * len(problems) // rt.world_size, (rt.rank + 1) * len(problems) // rt.world_size
    prompts = [prompt_ids(tok, task, p) for p in problems[first:last]]
    engine = Engine(teacher, tok, max_batch=64, max_seq_len=max(map(len, prompts), default=1) + cfg.max_tokens + 1)
    # seeds by global sample index: N processes draw what one process would
    params = [SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                             seed=cfg.seed * 1_000_003 + first * S + i) for i in range(len(prompts) * S)]
    comps = engine.generate([pr for pr in prompts for _ in range(S)], params, progress=cfg.progress and rt.is_main)
    convs, solved = [], 0
    for i, p in enumerate(problems[first:last]):
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
    parts = rt.gather_objects((convs, solved))
    convs = [c for cs, _ in parts for c in cs]
    n = len(problems) * S
    return convs, {"generated": n, "kept": len(convs), "keep_rate": len(convs) / max(1, n),
                   "problems": len(problems), "problems_solved": sum(k for _, k in parts)}


def distill(cfg: DistillConfig) -> Path:
    """Rejection-sample the teacher's traces and train the student on them; returns OUT/final."""
    import torch

    from ..checkpoint import load_model_and_tokenizer
    from ..config import PRESETS, ModelConfig
    from ..data.jsonl import write_jsonl
    from ..data.tasks import get_task
    from ..model import Transformer, decode_layout

    if (cfg.student_preset is None) == (cfg.student is None):
        raise UsageError("pass exactly one of --student-preset NAME (a new student) or --student DIR")
    if cfg.student_preset is not None and cfg.student_preset not in PRESETS:
        raise UsageError(f"unknown preset {cfg.student_preset!r}; known presets: {', '.join(PRESETS)}")
    out, task = Path(cfg.out), get_task(cfg.task)
    traces, report = out / "traces.jsonl", out / "rejection.json"
    if not cfg.resume and (traces.exists() or (out / "final").exists()):
        raise UsageError(f"{out} already holds a distillation run; pass --resume or choose another --out")
    rt = runtime.init(cfg.device)
    try:
        teacher, tok = load_model_and_tokenizer(cfg.teacher, purpose="distillation")
        if not (cfg.resume and traces.exists() and report.exists()):
            decode_layout(teacher := teacher.float().to(rt.device).eval())   # the teacher only generates
            convs, stats = teacher_traces(cfg, task, teacher, tok, rt)
            if not convs:
                raise UsageError(f"the teacher solved none of {cfg.problems} problems of {cfg.task} "
                                 f"({stats['generated']} samples): nothing to distill; use a stronger teacher, an "
                                 f"easier --difficulty or more --samples-per-problem")
            if rt.is_main:
                write_jsonl(traces, [{"messages": c} for c in convs])
                report.write_text(json.dumps(stats, indent=2) + "\n")
            rt.barrier()
        stats = json.loads(report.read_text())
        if rt.is_main:
            print(f"[distill] teacher: {stats['kept']} of {stats['generated']} samples kept (keep rate "
                  f"{100 * stats['keep_rate']:.1f}%, {stats['problems_solved']}/{stats['problems']} problems solved)")
        del teacher
        if cfg.student is not None:
            student, stok = load_model_and_tokenizer(cfg.student, purpose="distillation")
            if stok.vocab_size > student.cfg.vocab_size:
                raise UsageError(f"the student {cfg.student}'s tokenizer has {stok.vocab_size} tokens but its model "
                                 f"only {student.cfg.vocab_size} embeddings; pass a folder whose tokenizer fits it")
        else:
            torch.manual_seed(cfg.seed)
            student, stok = Transformer(ModelConfig.preset(cfg.student_preset, vocab_size=max(tok.vocab_size, 1),
                                                           bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)), tok
        keys = {f.name for f in fields(SFTConfig)} - {"task", "difficulty"}
        scfg = SFTConfig(**{k: v for k, v in vars(cfg).items() if k in keys}, data=str(traces), model=cfg.student or "")
        return sft(scfg, model=student, tokenizer=stok, record=cfg)
    finally:
        runtime.shutdown(rt)


def main(cfg: DistillConfig) -> int:
    distill(cfg)
    return 0
