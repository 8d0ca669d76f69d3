"""`nanoseek sft`: supervised fine-tuning on chat conversations (DeepSeek-R1's cold start; distillation's student).

    nanoseek sft --model runs/pretrain/final --task linear --out runs/sft
    nanoseek sft --model DIR --data chats.jsonl --out runs/sft [--resume]
    torchrun --standalone --nproc_per_node=2 -m nanoseek.cli sft ... [--fsdp]

Data (nanoseek/data/chat.py): a jsonl file of {"messages": [{"role", "content"[, "reasoning_content"]}, ...]}, or
--task NAME, whose generator writes problems with worked, step-by-step solutions; rendered with the model's chat
template, loss on the assistant's tokens only, several examples packed per row. The model trains on its full
attention path, `model.losses(..., positions=, documents=)`: a block-diagonal causal mask and positions that restart
at each example keep the packed examples from seeing one another, exactly as if each ran alone. The loss is the mean
over the trained tokens of the whole global batch, whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..data.chat import IGNORE, ExampleStream, pack, read_conversations, render
from ..errors import UsageError
from . import optim, runtime
from .run import Run
from .runtime import TrainModule

__all__ = ["SFTConfig", "CONFIG", "sft", "main", "IGNORE", "pack", "render", "read_conversations"]


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class SFTConfig:
    model: str = ""                 # model folder to fine-tune (with tokenizer.json)
    out: str = ""                   # run folder (metrics.jsonl, config.toml, ckpt/, final/)
    data: str | None = None         # jsonl file, one {"messages": [...]} per line
    task: str | None = None         # or: a task's worked solutions, generated fresh every step
    difficulty: int | None = None   # task difficulty (None: the task's default)
    steps: int = 300                # optimizer steps
    batch_size: int = 16            # packed rows per optimizer step (over all processes)
    seq_len: int = 512              # tokens per packed row
    lr: float = 1e-3                # peak learning rate
    min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
    warmup: int = 20                # warmup steps
    schedule: str = "cosine"        # cosine | wsd
    weight_decay: float = 0.0       # AdamW decay of matrices
    grad_clip: float = 1.0          # 0: no clipping (the norm is still logged)
    mtp_lambda: float = 0.3         # weight of the MTP loss (V3 uses 0.3 early in training), when the model has MTP
    bias_update_speed: float = 0.0  # V3's routing-bias gamma; 0 keeps the pretrained routing as it is
    seed: int = 0                   # data order (file) or problem stream (task)
    save_every: int = 100           # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2       # newest checkpoints kept (0: all)
    resume: bool = False            # continue from the newest complete OUT/ckpt/step-N
    stop_after: int = 0             # stop (with a checkpoint) after this step, as if interrupted
    fsdp: bool = False              # FSDP2 fully_shard instead of DDP (under torchrun)
    device: str | None = None       # cpu | cuda; None: the GPU when there is one
    progress: bool = True           # tqdm bar
    REQUIRED: ClassVar[tuple] = ("model", "out")
    ALIASES: ClassVar[dict] = {"bias_gamma": "bias_update_speed"}


CONFIG = SFTConfig


# ---------------------------------------------------------------------------------------------------- training
def sft(cfg: SFTConfig, model=None, tokenizer=None, record=None) -> Path:
    """Fine-tune and return OUT/final (a model folder with the tokenizer). `model`/`tokenizer` given: train them
    in place (distillation's fresh student), else load cfg.model. record: the config written to OUT/config.toml
    (default cfg)."""
    from ..checkpoint import load_model_and_tokenizer
    from ..data.tasks import get_task

    if (cfg.data is None) == (cfg.task is None):
        raise UsageError("pass exactly one of --data FILE.jsonl or --task NAME")
    rt = runtime.init(cfg.device)
    try:
        run = Run(cfg, "sft", rt, record)
        mine = rt.share(cfg.batch_size, "--batch-size")       # this process's rows of each global batch
        task = get_task(cfg.task) if cfg.task else None
        convs = read_conversations(cfg.data) if cfg.data else None
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, purpose="sft")
        difficulty = cfg.difficulty if cfg.difficulty is not None else getattr(task, "default_difficulty", 1)
        stream = ExampleStream(tokenizer, cfg.seed, cfg.batch_size, cfg.seq_len, convs, task, difficulty)
        runtime.seed(cfg.seed)
        model = model.float().to(rt.device).train()    # float32 weights and optimizer; bf16 autocast on GPU
        run.restore_weights(model)
        module = runtime.parallelize(TrainModule(model), rt, cfg.fsdp, blocks=[*model.layers, *model.mtp])
        opt = optim.adamw(module, cfg.lr, cfg.weight_decay)
        optim.add_bias_update(opt, optim.ExpertLoads(model, rt), cfg.bias_update_speed)
        run.start(module, model, opt, tokenizer)
        mtp_lambda, W = cfg.mtp_lambda if len(model.mtp) else 0.0, rt.world_size
        for step in run.steps():
            lr = optim.set_lr(opt, optim.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio))
            batch = stream.batch(step)[mine].to(rt.device)
            with runtime.autocast(rt.device):
                out = module(batch.input_ids, batch.targets, positions=batch.positions, documents=batch.documents)
            # means over the GLOBAL batch's labels: each process weighs its own means by its share of the labels
            # (times W, as DDP / FSDP average the gradients over processes)
            n, n_mtp = batch.trained_tokens, batch.mtp_labels
            N, N_mtp, tokens = rt.sum(n, n_mtp, int((batch.documents >= 0).sum()))
            w, w_mtp = n * W / max(N, 1), n_mtp * W / max(N_mtp, 1)
            (out["loss"] * w + mtp_lambda * out["mtp_loss"] * w_mtp + out["balance_loss"]).backward()
            grad_norm = optim.clip_grad(module.parameters(), cfg.grad_clip)
            opt.step()     # (the bias-update hook runs here)
            opt.zero_grad(set_to_none=True)
            # (a process whose rows hold no trained token has a NaN mean, weighed 0: its gradient is 0, not NaN)
            loss, mtp_loss = rt.sum(out["loss"].item() * w / W if n else 0.0, out["mtp_loss"].item() * w_mtp / W)
            run.log({"loss": loss, "mtp_loss": mtp_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                     "trained_tokens": int(N)}, tokens=int(tokens), loss=loss)
        return run.finish(summary=("loss", "mtp_loss") if len(model.mtp) else ("loss",))
    finally:
        runtime.shutdown(rt)


def main(cfg: SFTConfig) -> int:
    sft(cfg)
    return 0
