"""`nanoseek speedrun`: the whole DeepSeek story in one command (what `make demo` runs).

corpus -> tokenizer -> pretrain -> eval -> SFT -> eval -> GRPO -> eval -> OUT/report.md [-> serve the chat page]

Every stage is the ordinary CLI command run in-process, writing into its own folder under OUT; OUT/stages.json
records finished stages, so a re-run skips them and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import PRESETS, ModelConfig
from .errors import UsageError

# Sizes per preset: (corpus documents, pretrain steps). Post-training settings come from the stage modules'
# SPEEDRUN_DEFAULTS, where they were tuned.
SCALE = {
    "tiny": dict(docs=4000, pretrain_steps=60, eval_n=40),
    "cpu": dict(docs=60000, pretrain_steps=1500, eval_n=200),
    "small": dict(docs=400000, pretrain_steps=4000, eval_n=500),
}


def add_arguments(p):
    p.add_argument("--preset", default="cpu", choices=sorted(SCALE), help="model size (default: cpu, ~30 min on 2 cores)")
    p.add_argument("--out", default="runs/speedrun", help="run folder (re-running skips finished stages)")
    p.add_argument("--task", default=None, help="task for SFT/GRPO/eval (default: the tuned one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="serve the final model with the chat page at the end")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the cpu preset's matmuls are too small to gain from a second "
                        "thread, and on a busy machine spinning OpenMP threads slow every step down many times)")


class Stages:
    """OUT/stages.json: name -> {wall_s, dir, ...}, written after each finished stage."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn, **info):
        if name in self.done:
            print(f"[speedrun] {name}: done already ({self.done[name].get('wall_s', 0):.0f} s), skipping")
            return self.done[name]
        print(f"\n[speedrun] === {name} ===")
        t0 = time.time()
        result = fn() or {}
        self.done[name] = {"wall_s": time.time() - t0, **info, **result}
        self.path.write_text(json.dumps(self.done, indent=2))
        return self.done[name]


def _cli(argv: list[str]) -> None:
    from .cli import main as cli_main

    rc = cli_main(argv)
    if rc:
        raise UsageError(f"stage `nanoseek {' '.join(argv)}` failed with exit code {rc}")


def final_model(stage_dir: Path) -> Path:
    """The model a stage produced: STAGE/final, else its newest checkpoint."""
    if (stage_dir / "final" / "config.json").exists():
        return stage_dir / "final"
    ckpts = sorted((stage_dir / "ckpt").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        raise UsageError(f"{stage_dir}: no final model or checkpoint found")
    return ckpts[-1]


def main(args) -> int:
    import torch

    from .data.tasks import corpus_documents, get_task
    from .eval import evaluate
    from .train import grpo as grpo_mod
    from .train import sft as sft_mod

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(SCALE)}")
    scale = SCALE[args.preset]
    sft_defaults = dict(getattr(sft_mod, "SPEEDRUN_DEFAULTS", {}))
    grpo_defaults = dict(getattr(grpo_mod, "SPEEDRUN_DEFAULTS", {}))
    task = args.task or grpo_defaults.pop("task", None) or "arithmetic"
    grpo_defaults.pop("task", None)
    sft_defaults.pop("task", None)
    get_task(task)  # unknown task: a clear error before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    cfg = ModelConfig.preset(args.preset)
    t_start = time.time() - sum(s.get("wall_s", 0) for s in stages.done.values())
    corpus = out / "data" / "corpus.txt"

    def make_corpus():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(corpus, "w") as f:
            for doc in corpus_documents(scale["docs"], seed=args.seed):
                f.write(json.dumps({"text": doc}) + "\n")
                n += 1
        return {"documents": n}

    corpus = corpus.with_suffix(".jsonl")
    stages.run("corpus", make_corpus, dir=str(corpus))
    stages.run("tokenizer", lambda: _cli(["tokenizer", "--data", str(corpus), "--vocab-size", str(cfg.vocab_size),
                                           "--out", str(out / "tokenizer")]), dir=str(out / "tokenizer"))

    def resume(d: Path) -> list[str]:
        return ["--resume"] if (d / "ckpt").exists() and any((d / "ckpt").glob("step-*")) else []

    def stage_args(defaults: dict) -> list[str]:
        argv = []
        for k, v in defaults.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        return argv

    pre = out / "pretrain"
    stages.run("pretrain", lambda: _cli(["pretrain", "--preset", args.preset, "--data", str(corpus), "--tokenizer",
                                          str(out / "tokenizer"), "--steps", str(scale["pretrain_steps"]), "--out",
                                          str(pre), "--seed", str(args.seed)] + resume(pre)), dir=str(pre))
    evals: dict[str, dict] = {}

    def run_eval(name: str, model_dir: Path):
        res = stages.run(f"eval-{name}", lambda: {"result": evaluate(str(model_dir), task, n=scale["eval_n"],
                                                                     k=1, seed=10_000 + args.seed)},
                         dir=str(model_dir))
        evals[name] = res["result"]

    run_eval("pretrain", final_model(pre))
    sft_dir = out / "sft"
    stages.run("sft", lambda: _cli(["sft", "--model", str(final_model(pre)), "--task", task, "--out", str(sft_dir),
                                    "--seed", str(args.seed)] + stage_args(sft_defaults) + resume(sft_dir)),
               dir=str(sft_dir))
    run_eval("sft", final_model(sft_dir))
    grpo_dir = out / "grpo"
    stages.run("grpo", lambda: _cli(["grpo", "--model", str(final_model(sft_dir)), "--task", task, "--out",
                                     str(grpo_dir), "--seed", str(args.seed)] + stage_args(grpo_defaults)
                                    + resume(grpo_dir)), dir=str(grpo_dir))
    run_eval("grpo", final_model(grpo_dir))

    tokens = _tokens_processed(out)
    from .report import write_report

    report = write_report(out, cfg, {k: v for k, v in stages.done.items() if not k.startswith("eval-")}, evals, task,
                          tokens, time.time() - t_start)
    print(f"\n[speedrun] report: {report}")
    for name, ev in evals.items():
        print(f"  {name:>9}: held-out pass@1 {100 * ev.get('pass@1', 0):5.1f}%  format {100 * ev.get('format_rate', 0):5.1f}%")
    print(f"  total wall time {(time.time() - t_start) / 60:.1f} min")
    if args.serve:
        _cli(["serve", "--model", str(final_model(grpo_dir)), "--port", str(args.port)])
    return 0


def _tokens_processed(out: Path) -> int:
    """Training tokens over all stages, from their metrics.jsonl (field `tokens`, cumulative or per step)."""
    from .report import read_metrics

    total = 0
    for stage in ("pretrain", "sft", "grpo"):
        rows = read_metrics(out / stage / "metrics.jsonl")
        if rows and "tokens_seen" in rows[-1]:
            total += int(rows[-1]["tokens_seen"])
        else:
            total += int(sum(r.get("tokens", 0) for r in rows))
    return total
