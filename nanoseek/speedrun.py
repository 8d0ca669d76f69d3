"""`nanoseek speedrun`: the whole DeepSeek story in one command (what `make demo` runs), as a plain recipe.

corpus -> tokenizer -> pretrain -> eval -> SFT -> eval -> GRPO -> eval -> OUT/report.md [-> serve the chat page]

Each stage is the same function its command runs, called with a config object; the stage settings come from
configs/speedrun-PRESET.toml (one section per stage, keys = the command's options). OUT/stages.json records finished
stages, so a re-run skips them and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .errors import UsageError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class SpeedrunConfig:
    preset: str = "cpu"             # tiny | cpu | small: picks configs/speedrun-PRESET.toml (cpu: ~20 min on 2 cores)
    out: str = "runs/speedrun"      # run folder (re-running skips finished stages)
    stages: str | None = None       # stage settings TOML (default configs/speedrun-PRESET.toml)
    task: str | None = None         # task for SFT/GRPO/eval (default: the stage file's)
    seed: int = 0
    serve: bool = False             # serve the final model with the chat page at the end
    port: int = 8000
    threads: int = 1                # torch CPU threads (1: the small presets' matmuls gain nothing from a second thread, and spinning threads on a busy machine slow every step down many times)
    REQUIRED: ClassVar[tuple] = ()


CONFIG = SpeedrunConfig


def stage_settings(cfg: SpeedrunConfig) -> dict:
    """The stage file's sections: {"speedrun": {...}, "pretrain": {...}, "sft": {...}, "grpo": {...}}."""
    path = Path(cfg.stages) if cfg.stages else CONFIGS / f"speedrun-{cfg.preset}.toml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("speedrun-") for p in CONFIGS.glob("speedrun-*.toml"))
        raise UsageError(f"no stage settings at {path}" + (f"; presets with settings: {', '.join(known)}" if known
                                                             else "; pass --stages FILE.toml"))
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(doc) - {"speedrun", "pretrain", "sft", "grpo"})
    if unknown:
        raise UsageError(f"{path}: unknown section(s) {', '.join(unknown)}; valid: speedrun, pretrain, sft, grpo")
    return doc


class Stages:
    """OUT/stages.json: name -> {wall_s, dir, threads, load_avg, ...}, written after each finished stage."""

    def __init__(self, out: Path, threads: int):
        self.path, self.threads = out / "stages.json", threads
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn, **info) -> dict:
        if name in self.done:
            print(f"[speedrun] {name}: done already ({self.done[name].get('wall_s', 0):.0f} s), skipping")
            return self.done[name]
        print(f"\n[speedrun] === {name} ===", flush=True)
        t0 = time.time()
        result = fn()
        result = result if isinstance(result, dict) else {}   # a stage function may return its output folder
        # machine load and threads next to the wall time: a slow stage on a busy machine is not a slow stage
        self.done[name] = {"wall_s": time.time() - t0, "threads": self.threads,
                           "load_avg": round(os.getloadavg()[0], 2), **info, **result}
        self.path.write_text(json.dumps(self.done, indent=2))
        return self.done[name]


def final_model(stage_dir: Path) -> Path:
    """The model a stage produced: STAGE/final, else its newest checkpoint."""
    if (stage_dir / "final" / "config.json").exists():
        return stage_dir / "final"
    ckpts = sorted((stage_dir / "ckpt").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        raise UsageError(f"{stage_dir}: no final model or checkpoint found")
    return ckpts[-1]


def has_checkpoint(stage_dir: Path) -> bool:
    return any((stage_dir / "ckpt").glob("step-*"))


def write_corpus(path: Path, docs: int, seed: int) -> dict:
    """The embedded task corpus as {"text": ...} lines (no download)."""
    from .data.jsonl import write_jsonl
    from .data.tasks import corpus_documents

    rows = [{"text": doc} for doc in corpus_documents(docs, seed=seed)]
    write_jsonl(path, rows)
    return {"documents": len(rows)}


def main(cfg: SpeedrunConfig) -> int:
    import torch

    from .data.tasks import get_task
    from .eval import evaluate
    from .options import config_from_dict
    from .tokenizer import CONFIG as TokenizerConfig
    from .tokenizer import main as train_tokenizer
    from .train.grpo import GRPOConfig, grpo
    from .train.pretrain import PretrainConfig, pretrain
    from .train.sft import SFTConfig, sft

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    settings = stage_settings(cfg)
    run = settings.get("speedrun", {})
    task = cfg.task or run.get("task", "linear")
    get_task(task)  # an unknown task: a clear error before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, torch.get_num_threads())
    t_start = time.time() - sum(s.get("wall_s", 0) for s in stages.done.values())
    corpus, tok_dir, pre, sft_dir, grpo_dir = (out / "data" / "corpus.jsonl", out / "tokenizer", out / "pretrain",
                                               out / "sft", out / "grpo")
    pre_cfg = config_from_dict(PretrainConfig, {**settings.get("pretrain", {}), "data": str(corpus), "seed": cfg.seed,
                                                "tokenizer": str(tok_dir), "out": str(pre)})
    from .config import ModelConfig

    vocab = ModelConfig.preset(pre_cfg.preset).vocab_size

    stages.run("corpus", lambda: write_corpus(corpus, int(run.get("docs", 4000)), cfg.seed), dir=str(corpus))
    stages.run("tokenizer", lambda: train_tokenizer(TokenizerConfig(data=[str(corpus)], vocab_size=vocab,
                                                                    out=str(tok_dir))), dir=str(tok_dir))
    pre_cfg.resume = has_checkpoint(pre)
    stages.run("pretrain", lambda: pretrain(pre_cfg), dir=str(pre))
    evals: dict[str, dict] = {}

    def run_eval(name: str, model_dir: Path):
        res = stages.run(f"eval-{name}", lambda: {"result": evaluate(str(model_dir), task, n=int(run.get("eval_n", 40)),
                                                                     k=1, seed=10_000 + cfg.seed)}, dir=str(model_dir))
        evals[name] = ev = res["result"]
        print(f"[speedrun] after {name}: held-out pass@1 {100 * ev.get('pass@1', 0):.1f}%, "
              f"format {100 * ev.get('format_rate', 0):.1f}%", flush=True)

    run_eval("pretrain", final_model(pre))
    sft_cfg = config_from_dict(SFTConfig, {**settings.get("sft", {}), "model": str(final_model(pre)), "task": task,
                                           "out": str(sft_dir), "seed": cfg.seed, "resume": has_checkpoint(sft_dir)})
    stages.run("sft", lambda: sft(sft_cfg), dir=str(sft_dir))
    run_eval("sft", final_model(sft_dir))
    grpo_cfg = config_from_dict(GRPOConfig, {**settings.get("grpo", {}), "model": str(final_model(sft_dir)),
                                             "task": task, "out": str(grpo_dir), "seed": cfg.seed,
                                             "resume": has_checkpoint(grpo_dir)})
    stages.run("grpo", lambda: grpo(grpo_cfg), dir=str(grpo_dir))
    run_eval("grpo", final_model(grpo_dir))
    finish(cfg, out, pre_cfg, stages, evals, task, time.time() - t_start)
    if cfg.serve:
        from .serve.app import CONFIG as ServeConfig
        from .serve.app import main as serve

        serve(ServeConfig(model=str(final_model(grpo_dir)), port=cfg.port))
    return 0


def finish(cfg: SpeedrunConfig, out: Path, pre_cfg, stages: Stages, evals: dict, task: str, wall_s: float) -> None:
    """OUT/report.md and the summary lines."""
    from .config import ModelConfig
    from .report import write_report

    mcfg = ModelConfig.preset(pre_cfg.preset)
    report = write_report(out, mcfg, stages.done, evals, task, tokens_processed(out), wall_s)
    print(f"\n[speedrun] report: {report}")
    for name, ev in evals.items():
        print(f"  {name:>9}: held-out pass@1 {100 * ev.get('pass@1', 0):5.1f}%  format "
              f"{100 * ev.get('format_rate', 0):5.1f}%")
    print(f"  total wall time {wall_s / 60:.1f} min")


def tokens_processed(out: Path) -> int:
    """Training tokens over all stages, from their metrics.jsonl (field `tokens_seen`, else per-step `tokens`)."""
    from .data.jsonl import read_jsonl

    total = 0
    for stage in ("pretrain", "sft", "grpo"):
        rows = read_jsonl(out / stage / "metrics.jsonl")
        if rows and "tokens_seen" in rows[-1]:
            total += int(rows[-1]["tokens_seen"])
        else:
            total += int(sum(r.get("tokens", 0) for r in rows))
    return total
