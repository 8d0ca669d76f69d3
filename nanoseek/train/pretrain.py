"""`nanoseek pretrain`: train a DeepSeek-V3-style MoE model from text, top to bottom.

    nanoseek pretrain --preset tiny --steps 200 --out runs/tiny            # the embedded task corpus, offline
    nanoseek pretrain --preset cpu --data books/ --steps 2000 --out runs/cpu --resume
    torchrun --standalone --nproc_per_node=2 -m nanoseek.cli pretrain ... [--fsdp]

One optimizer step (V3 Sections 2.1.2 and 2.2):
  L = L_main + mtp_lambda * L_MTP + L_balance        (eq. 25: MTP weight lambda; eq. 17-20: alpha, the small
                                                       sequence-wise balance loss, inside L_balance)
  AdamW on L with warmup + cosine (or WSD) and gradient clipping, gradients accumulated over grad_accum
  micro-batches (and averaged over processes by DDP / FSDP2); then the auxiliary-loss-free bias update
  b_i += gamma * sign(mean load - load_i), from the expert loads summed over micro-batches and processes.

The global batch of a step is batch_size * grad_accum * world_size sequences of seq_len tokens, taken in a fixed
order from one seeded sampler, so N processes see exactly the sequences one process would with N times the
accumulation, and their losses agree (tests check this to 1e-4).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import PRESETS, ModelConfig
from ..errors import UsageError
from . import loop


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run; CLI flags and TOML keys have the same names (dashes or underscores)."""
    preset: str = "tiny"              # model shape: one of nanoseek.config.PRESETS
    data: str | None = None           # .txt/.jsonl/.parquet file or folder, or hf:NAME[:split]; None: embedded corpus
    steps: int = 200                  # optimizer steps of the whole run (the LR schedule spans them)
    out: str = "runs/pretrain"
    seed: int = 0
    resume: bool = False              # continue from the newest complete OUT/ckpt/step-N
    batch_size: int = 8               # sequences per micro-batch per process
    seq_len: int = 128
    lr: float = 3e-3
    grad_accum: int = 1               # micro-batches per optimizer step
    schedule: str = "cosine"          # cosine | wsd
    warmup: int = -1                  # warmup steps; -1: 5% of steps, at most 200
    min_lr_ratio: float = 0.1         # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # 0: no clipping (the norm is still logged)
    bias_gamma: float = 0.001         # V3's bias update speed gamma (0: auxiliary-loss-free balancing off)
    balance_alpha: float = 0.0001     # V3's sequence-wise balance loss weight alpha (the config's aux_loss_alpha)
    mtp_lambda: float = 0.3           # V3: 0.3 for the first 10T tokens, 0.1 after
    fsdp: bool = False                # FSDP2 fully_shard instead of DDP (under torchrun)
    tokenizer: str | None = None      # a tokenizer folder; None: train one on the data (vocab_size of the model)
    vocab_size: int | None = None     # override the preset's vocab_size (and the trained tokenizer's)
    corpus_docs: int = 4000           # documents of the embedded corpus when data is None
    save_every: int = 0               # checkpoint every N steps (0: only at the end or when stopped)
    keep_checkpoints: int = 3         # newest checkpoints kept (0: all)
    stop_after: int = 0               # stop (with a checkpoint) after this step, as if interrupted; 0: run to `steps`
    device: str | None = None         # cpu | cuda; None: the GPU when there is one
    progress: bool = True             # tqdm bar


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


class TrainModule(nn.Module):
    """What DDP / FSDP2 wrap: forward(inputs, targets) -> the model's three losses. Going through forward (not
    model.losses directly) is what lets the wrappers' hooks sync gradients and gather sharded weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> dict:
        return self.model.losses(input_ids, targets)


def all_moes(model) -> list:
    """Every MoE module, main layers first, then the MTP blocks (their gates are balanced too)."""
    from ..model import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def train_step(module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches, *,
               mtp_lambda: float, bias_gamma: float, grad_clip: float, rt: loop.Runtime) -> dict:
    """One optimizer step over this process's micro-batches [(inputs, targets) (B, T)]; returns the losses averaged
    over micro-batches and processes, the gradient norm and the global expert loads of the main MoE layers."""
    moes = all_moes(model)
    loads = [torch.zeros(m.gate.n_experts, device=rt.device) for m in moes]
    sums = torch.zeros(3, device=rt.device)
    n = len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        with loop.grad_sync(module, i == n - 1):
            with loop.autocast(rt.device):
                out = module(x, y)
            total = out["loss"] + mtp_lambda * out["mtp_loss"] + out["balance_loss"]
            (total / n).backward()
        sums += torch.stack([out["loss"], out["mtp_loss"], out["balance_loss"]]).detach().float()
        for acc, m in zip(loads, moes):
            acc += m.load
    grad_norm = loop.clip_grad(module.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loads = loop.all_reduce_loads(loads, rt)
    if bias_gamma > 0:
        from ..model import update_bias

        for m, load in zip(moes, loads):
            if m.gate.topk_method == "noaux_tc":
                update_bias(m.gate, load, bias_gamma)
    sums = rt.all_reduce(sums / n, "mean").tolist()
    n_main = len(model.moe_layers())
    return {"loss": sums[0], "mtp_loss": sums[1], "balance_loss": sums[2], "grad_norm": grad_norm,
            "loads": [t.tolist() for t in loads[:n_main]]}


def load_imbalance(loads: list[list[float]]) -> float | None:
    """max / mean tokens per expert, averaged over the MoE layers (1.0 = perfectly balanced)."""
    vals = [max(lo) / (sum(lo) / len(lo)) for lo in loads if sum(lo) > 0]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------------- setup helpers
def validate(cfg: PretrainConfig) -> None:
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown preset {cfg.preset!r}; valid presets: {', '.join(PRESETS)}")
    if cfg.schedule not in ("cosine", "wsd"):
        raise UsageError(f"unknown schedule {cfg.schedule!r}; valid schedules: cosine, wsd")
    for name in ("steps", "batch_size", "grad_accum"):
        if int(getattr(cfg, name)) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {cfg.seq_len}")
    if not cfg.lr > 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr}")
    if cfg.bias_gamma < 0 or cfg.balance_alpha < 0 or cfg.mtp_lambda < 0:
        raise UsageError("--bias-gamma, --balance-alpha and --mtp-lambda must be >= 0")


def model_config(cfg: PretrainConfig, tok=None) -> ModelConfig:
    kw = {"aux_loss_alpha": cfg.balance_alpha}
    if cfg.vocab_size:
        kw["vocab_size"] = cfg.vocab_size
    if tok is not None:
        kw["bos_token_id"], kw["eos_token_id"] = tok.bos_id, tok.eos_id
        if getattr(tok, "pad_id", None) is not None:
            kw["pad_token_id"] = tok.pad_id
    mcfg = ModelConfig.preset(cfg.preset, **kw)
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the {cfg.preset} preset's max_position_embeddings "
                         f"{mcfg.max_position_embeddings}")
    return mcfg


def _documents(cfg: PretrainConfig, tok=None):
    from ..data.corpus import default_documents, read_documents

    if cfg.data is None:
        return default_documents(cfg.corpus_docs, seed=cfg.seed)
    return read_documents(cfg.data, tokenizer=tok)


def _source(cfg: PretrainConfig) -> str:
    return str(cfg.data) if cfg.data is not None else f"embedded:{cfg.corpus_docs}:{cfg.seed}"


def get_tokenizer(cfg: PretrainConfig, out: Path, ckpt: Path | None, rt: loop.Runtime):
    """The run's tokenizer: from the checkpoint being resumed, --tokenizer, or trained on the data (rank 0 trains,
    others load what it saved). Checked against the model's vocab_size."""
    from ..tokenizer import Tokenizer

    vocab = model_config(cfg).vocab_size
    if ckpt is not None or cfg.tokenizer:
        folder = ckpt if ckpt is not None else Path(cfg.tokenizer)
        if not (Path(folder) / "tokenizer.json").exists():
            raise UsageError(f"--tokenizer {folder}: no tokenizer.json there (train one with `nanoseek tokenizer`)")
        tok = Tokenizer.load(folder)
    elif rt.is_main:
        print(f"[pretrain] training a {vocab}-token BPE tokenizer on {_source(cfg)}", flush=True)
        tok = Tokenizer.train(_documents(cfg), vocab, progress=False)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out / "tokenizer")
        rt.barrier()
    else:
        rt.barrier()
        tok = Tokenizer.load(out / "tokenizer")
    if tok.vocab_size > vocab:
        raise UsageError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab}; pass "
                         f"--vocab-size {tok.vocab_size} (or more), or a tokenizer with at most {vocab} tokens")
    if tok.eos_id is None:
        raise UsageError("the tokenizer has no end-of-sentence token, which separates packed documents")
    return tok


def get_data(cfg: PretrainConfig, tok, out: Path, rt: loop.Runtime, resuming: bool = False):
    """OUT/data: the packed shards, built once and reused on resume (which must then name the same data)."""
    from ..data.corpus import HEADER, build_shards, open_shards

    folder = out / "data"
    want = {"source": _source(cfg), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    if rt.is_main:
        ok = False
        if (folder / HEADER).exists():
            head = json.loads((folder / HEADER).read_text())
            ok = all(head.get(k) == v for k, v in want.items())
            if not ok and resuming:
                raise UsageError(f"--resume: {out} was trained on {head.get('source')} ({head.get('vocab_size')}-token "
                                 f"tokenizer), not {want['source']}; resume with the same --data")
        if not ok:
            build_shards(_documents(cfg, tok), tok, folder, source=want["source"], progress=cfg.progress)
    rt.barrier()
    ds = open_shards(folder)
    n_seq = ds.num_sequences(cfg.seq_len)
    if n_seq < 1:
        raise UsageError(f"--data {want['source']} has {ds.num_tokens} tokens, fewer than one training sequence "
                         f"(--seq-len {cfg.seq_len} needs {cfg.seq_len + 1}); give more text or a smaller --seq-len")
    return ds


def _check_out(cfg: PretrainConfig, out: Path, rt: loop.Runtime) -> Path | None:
    """Refuse to overwrite a finished or running experiment; on --resume return the checkpoint to load."""
    if cfg.resume:
        ckpt = loop.find_resume_checkpoint(out, log=print if rt.is_main else (lambda m: None))
        if ckpt is None and rt.is_main and out.exists() and any(out.iterdir()):
            print(f"[pretrain] --resume: {out} has no checkpoint yet; starting from step 0", flush=True)
        return ckpt
    if out.exists() and any((out / n).exists() for n in ("ckpt", "final", "metrics.jsonl")):
        raise UsageError(f"--out {out} already holds a training run; pass --resume to continue it or choose "
                         f"another --out")
    return None


# --------------------------------------------------------------------------------------------- the run
def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining; returns OUT. Raises UsageError on bad input, before writing anything."""
    validate(cfg)
    rt = loop.init_runtime(cfg.device)
    out = Path(cfg.out)
    existed = out.exists()
    try:
        ckpt = _check_out(cfg, out, rt)
        if cfg.data is not None:
            from ..data.corpus import read_documents
            read_documents(cfg.data)  # missing / empty / unsupported -> UsageError before any work
        tok = get_tokenizer(cfg, out, ckpt, rt)
        ds = get_data(cfg, tok, out, rt, resuming=ckpt is not None)
    except UsageError:
        if rt.is_main and not existed and out.exists():
            shutil.rmtree(out, ignore_errors=True)  # only what this failed call created
        loop.shutdown(rt)
        raise
    try:
        return _train(cfg, rt, out, ckpt, tok, ds)
    finally:
        loop.shutdown(rt)


def _train(cfg: PretrainConfig, rt: loop.Runtime, out: Path, ckpt: Path | None, tok, ds) -> Path:
    from ..data.corpus import BatchSampler
    from ..model import Transformer

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, tok)
    model = Transformer(mcfg).to(rt.device)
    if ckpt is not None:
        loop.load_model_weights(ckpt, model)
    model.train()
    module = TrainModule(model)
    if rt.distributed and cfg.fsdp:
        module = loop.apply_fsdp(module, list(model.layers) + list(model.mtp), rt)
    elif rt.distributed:
        module = loop.wrap_ddp(module, rt)
    elif cfg.fsdp and rt.is_main:
        print("[pretrain] --fsdp has no effect in one process (run under torchrun to shard)", flush=True)
    optimizer = torch.optim.AdamW(loop.param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  eps=1e-8)
    B, T, A, W = cfg.batch_size, cfg.seq_len, cfg.grad_accum, rt.world_size
    global_batch = B * A * W
    sampler = BatchSampler(ds.num_sequences(T), global_batch, seed=cfg.seed)
    start, tokens_seen, elapsed = 0, 0, 0.0
    if ckpt is not None:
        doc = loop.load_trainer_state(ckpt, module, optimizer)
        start = int(doc["step"])
        st = doc["state"]
        sampler.load_state_dict(st["data"])
        tokens_seen, elapsed = int(st.get("tokens_seen", 0)), float(st.get("elapsed_s", 0.0))
        if rt.is_main:
            print(f"[pretrain] resumed from {ckpt} (step {start})", flush=True)
    logger = loop.MetricsLogger(out / "metrics.jsonl", enabled=rt.is_main,
                                resume_step=start if ckpt is not None else None)
    warmup = cfg.warmup if cfg.warmup >= 0 else min(200, cfg.steps // 20)
    fpt = loop.flops_per_token(mcfg, T)
    peak = loop.peak_flops(rt.device)
    if rt.is_main:
        n = mcfg.num_params()
        print(f"[pretrain] {cfg.preset}: {n['total'] / 1e6:.2f}M parameters ({n['activated'] / 1e6:.2f}M activated), "
              f"{ds.num_tokens:,} tokens of data, global batch {global_batch} x {T} tokens, {W} process(es)"
              f"{' FSDP' if cfg.fsdp and W > 1 else ''} on {rt.device}", flush=True)

    def state() -> dict:
        return {"data": sampler.state_dict(), "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                "config": dataclasses.asdict(cfg), "world_size": W}

    def checkpoint(step: int) -> None:
        loop.save_checkpoint(out, step, module, model, optimizer, state=state(), tokenizer=tok, rt=rt,
                             keep=cfg.keep_checkpoints)

    end = cfg.steps if not cfg.stop_after else min(cfg.steps, cfg.stop_after)
    step, stopped = start, False
    bar = loop.progress(cfg.steps, initial=start, desc="pretrain", enabled=rt.is_main and cfg.progress)
    with loop.StopOnSigint() as stop:
        while step < end:
            t0 = time.perf_counter()
            idx = sampler.next_batch()
            micro = []
            for a in range(A):
                rows = idx[(a * W + rt.rank) * B:(a * W + rt.rank + 1) * B]
                x, y = ds.batch(rows, T)
                micro.append((torch.from_numpy(x).to(rt.device), torch.from_numpy(y).to(rt.device)))
            lr = loop.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=warmup, schedule=cfg.schedule,
                            min_lr_ratio=cfg.min_lr_ratio)
            loop.set_lr(optimizer, lr)
            r = train_step(module, model, optimizer, micro, mtp_lambda=cfg.mtp_lambda, bias_gamma=cfg.bias_gamma,
                           grad_clip=cfg.grad_clip, rt=rt)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            elapsed += dt
            tokens_seen += global_batch * T
            tps = global_batch * T / dt
            row = {"step": step, "loss": r["loss"], "mtp_loss": r["mtp_loss"], "balance_loss": r["balance_loss"],
                   "lr": lr, "grad_norm": r["grad_norm"], "tokens_per_s": tps, "tokens_seen": tokens_seen,
                   "load_imbalance": load_imbalance(r["loads"]), "expert_load": r["loads"],
                   "elapsed_s": elapsed}
            if peak:
                row["mfu"] = 100 * fpt * tps / (peak * W)
            logger.log(row)
            bar.set_postfix(loss=f"{r['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            if not math.isfinite(r["loss"]):
                bar.close()
                raise UsageError(f"the loss became {r['loss']} at step {step}; lower --lr (now {cfg.lr})")
            stopped = rt.any(stop.requested)
            if stopped or step == end or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint(step)
            if stopped:
                break
    bar.close()
    if rt.is_main:
        write_plots(out, logger.rows)
        if step >= cfg.steps:
            export_final(out, step)
        print_summary(cfg, out, logger.rows, step, stopped or step < cfg.steps)
    logger.close()
    rt.barrier()
    if stopped:
        raise KeyboardInterrupt  # the CLI turns this into exit code 130 after the checkpoint is safe
    return out


def export_final(out: Path, step: int) -> Path:
    """OUT/final: the finished model as a plain HF folder (the last checkpoint without its trainer state)."""
    src = out / "ckpt" / f"step-{step}"
    final, tmp = out / "final", out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(loop.STATE_JSON, loop.STATE_TENSORS))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_plots(out: Path, rows: list[dict]) -> None:
    """OUT/loss.png (loss and MTP loss per step) and OUT/experts.png (per MoE layer: each expert's share of the
    tokens over training, as load / mean load; a balanced router is a flat 1.0)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="loss (next token)")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP loss (token after next)", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    loads = [r.get("expert_load") or [] for r in rows]
    n_layers = max((len(x) for x in loads), default=0)
    if n_layers == 0:
        return
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.8 * n_layers), squeeze=False)
    for li in range(n_layers):
        mat = np.array([x[li] for x in loads if len(x) > li], dtype=np.float64)  # (steps, experts)
        mat = mat / np.maximum(mat.mean(1, keepdims=True), 1e-9)
        ax = axes[li, 0]
        im = ax.imshow(mat.T, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, mat.shape[1] - 0.5))
        ax.set_ylabel(f"MoE layer {li}\nexpert")
        fig.colorbar(im, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load per layer (1.0 = balanced)")
    fig.tight_layout()
    fig.savefig(out / "experts.png", dpi=120)
    plt.close(fig)


def print_summary(cfg: PretrainConfig, out: Path, rows: list[dict], step: int, interrupted: bool) -> None:
    if not rows:
        return
    first, last = rows[0], rows[-1]
    tail = rows[-max(1, len(rows) // 10):]
    tps = [r["tokens_per_s"] for r in rows[1:] or rows]

    def avg(key, rs):
        v = [r[key] for r in rs if r.get(key) is not None]
        return sum(v) / len(v) if v else float("nan")

    lines = [
        ("steps", f"{step} / {cfg.steps}" + ("  (stopped early; --resume continues)" if interrupted else "")),
        ("tokens seen", f"{last['tokens_seen']:,}"),
        ("loss", f"{first['loss']:.4f} -> {avg('loss', tail):.4f} (mean of the last {len(tail)} steps)"),
        ("MTP loss", f"{first['mtp_loss']:.4f} -> {avg('mtp_loss', tail):.4f}"),
        ("load imbalance", f"{avg('load_imbalance', rows[:len(tail)]):.3f} -> {avg('load_imbalance', tail):.3f} "
                           "(max/mean tokens per expert)"),
        ("tokens/s", f"{sum(tps) / len(tps):,.0f} (mean)"),
        ("wall time", f"{last.get('elapsed_s', 0):.1f} s of training"),
    ]
    if last.get("mfu") is not None:
        lines.append(("MFU", f"{avg('mfu', tail):.1f}%"))
    lines.append(("outputs", f"{out}/metrics.jsonl, loss.png, experts.png, ckpt/"
                             + (", final/" if not interrupted else "")))
    w = max(len(k) for k, _ in lines)
    print("\n".join(f"  {k:<{w}}  {v}" for k, v in lines), flush=True)


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    # Every default is None so that a TOML --config value is only overridden by flags actually given.
    p.add_argument("--config", help="TOML file whose keys are these options' names")
    p.add_argument("--preset", help=f"model shape: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--data", help="a .txt/.jsonl/.parquet file or folder, or hf:NAME[:split] (default: the "
                                  "embedded task corpus, offline)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--out", help="run folder (default runs/pretrain)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--schedule", choices=["cosine", "wsd"])
    p.add_argument("--warmup", type=int, help="warmup steps (default 5%% of steps)")
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--bias-gamma", type=float, help="V3 routing-bias update speed (default 0.001; 0: off)")
    p.add_argument("--balance-alpha", type=float, help="sequence-wise balance loss weight (default 1e-4)")
    p.add_argument("--mtp-lambda", type=float, help="MTP loss weight (default 0.3)")
    p.add_argument("--fsdp", action="store_true", default=None, help="FSDP2 instead of DDP under torchrun")
    p.add_argument("--tokenizer", help="tokenizer folder (default: train one on the data)")
    p.add_argument("--vocab-size", type=int, help="model (and trained tokenizer) vocabulary size")
    p.add_argument("--corpus-docs", type=int, help="documents of the embedded corpus (default 4000)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint after this step (schedule still spans "
                                                  "--steps)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def config_from_args(args) -> PretrainConfig:
    return loop.make_config(PretrainConfig, args)


def main(args) -> int:
    cfg = config_from_args(args)
    pretrain(cfg)
    return 0
