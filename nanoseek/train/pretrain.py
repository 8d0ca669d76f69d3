"""`nanoseek pretrain`: train a DeepSeek-V3-style MoE model from text, top to bottom.

    nanoseek pretrain --preset tiny --steps 200 --out runs/tiny            # the embedded task corpus, offline
    nanoseek pretrain --preset v4-tiny --optimizer muon --steps 200 --out runs/v4   # DeepSeek-V4 (MTP, Muon)
    nanoseek pretrain --preset cpu --data books/ --steps 2000 --out runs/cpu --resume
    nanoseek pretrain --init runs/v31/final --dsa warmup --steps 100 --out runs/warm  # DeepSeek-V3.2's two stages
    nanoseek pretrain --init runs/warm/final --dsa sparse --steps 1000 --out runs/dsa
    torchrun --standalone --nproc_per_node=2 -m nanoseek.cli pretrain ... [--fsdp]

One optimizer step (V3 Sections 2.1.2 and 2.2):
  L = L_main + mtp_lambda * L_MTP + L_balance        (eq. 25: MTP weight lambda; eq. 17-20: alpha, the small
                                                       sequence-wise balance loss, inside L_balance)
  AdamW (or --optimizer muon: Muon for the matrices) on L with warmup + cosine (or WSD) and gradient clipping,
  gradients accumulated over grad_accum micro-batches (and averaged over processes by DDP / FSDP2); then the
  auxiliary-loss-free bias update b_i += gamma * sign(mean load - load_i) (optim.add_bias_update, an optimizer-step
  hook; V4: its learned-routing layers), from the expert loads summed over micro-batches and processes.

DeepSeek Sparse Attention (V3.2 Section 2.1.1) trains from a dense model (--dsa dense) in two stages, --dsa warmup
(only the indexers learn) then --dsa sparse (model/dsa.py: stage_loss); metrics.jsonl adds indexer_kl, kept_mass.

The global batch of a step is batch_size * grad_accum * world_size sequences of seq_len tokens, taken in a fixed
order from one seeded sampler, so N processes see exactly the sequences one process would with N times the
accumulation, and their losses agree (tests check this to 1e-4).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import flops, plots
from ..checkpoint import read_config
from ..config import PRESETS, ModelConfig
from ..errors import UsageError
from ..infer.compiled import compile_blocks, compile_losses
from ..model.dsa import DSA, STAGES, dense_kept_mass, stage_loss, trains
from . import optim, runtime
from .run import Run
from .runtime import Runtime, TrainModule


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run; CLI flags and TOML keys have the same names (dashes or underscores)."""
    preset: str = "tiny"              # model shape: one of nanoseek.config.PRESETS
    init: str | None = None           # start from this model folder (its weights, config, tokenizer), not --preset
    dsa: str | None = None            # warmup | sparse | dense, for models with lightning indexers; None: sparse
    kept_mass_every: int = 10         # --dsa sparse: measure kept_mass on a no-grad dense forward every N steps
    data: str | None = None           # .txt/.jsonl/.parquet file or folder, or hf:NAME[:split]; None: embedded corpus
    steps: int = 200                  # optimizer steps of the whole run (the LR schedule spans them)
    out: str = "runs/pretrain"        # run folder (metrics.jsonl, config.toml, ckpt/, final/, loss.png)
    seed: int = 0                     # weights, data order and tokenizer corpus
    resume: bool = False              # continue from the newest complete OUT/ckpt/step-N
    batch_size: int = 8               # sequences per micro-batch per process
    seq_len: int = 128                # tokens per sequence
    lr: float = 3e-3                  # peak learning rate
    grad_accum: int = 1               # micro-batches per optimizer step
    schedule: str = "cosine"          # cosine | wsd
    warmup: int = -1                  # warmup steps; -1: 5% of steps, at most 200
    min_lr_ratio: float = 0.1         # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1         # AdamW decay of matrices (not norms or embeddings)
    optimizer: str = "adamw"          # adamw | muon (torch's Muon for the 2-D matrices, AdamW for the rest)
    grad_clip: float = 1.0            # 0: no clipping (the norm is still logged)
    bias_update_speed: float = 0.001  # V3's routing-bias update speed gamma (0: auxiliary-loss-free balancing off)
    balance_alpha: float = 0.0001     # V3's sequence-wise balance loss weight alpha (the config's aux_loss_alpha)
    mtp_lambda: float = 0.3           # V3: 0.3 for the first 10T tokens, 0.1 after
    fsdp: bool = False                # FSDP2 fully_shard instead of DDP (under torchrun)
    compile: bool = False             # torch.compile forward + backward (compiled.compile_losses / compile_blocks)
    tokenizer: str | None = None      # a tokenizer folder; None: train one on the data (vocab_size of the model)
    vocab_size: int | None = None     # override the preset's vocab_size (and the trained tokenizer's)
    corpus_docs: int = 4000           # documents of the embedded corpus when data is None
    save_every: int = 0               # checkpoint every N steps (0: only at the end or when stopped)
    keep_checkpoints: int = 3         # newest checkpoints kept (0: all)
    stop_after: int = 0               # stop (with a checkpoint) after this step, as if interrupted; 0: run to `steps`
    device: str | None = None         # cpu | cuda; None: the GPU when there is one
    progress: bool = True             # tqdm bar
    ALIASES: ClassVar[dict] = {"bias_gamma": "bias_update_speed"}


CONFIG = PretrainConfig


def validate(cfg: PretrainConfig) -> None:
    for name, valid in (("preset", list(PRESETS)), ("schedule", ["cosine", "wsd"]), ("optimizer", ["adamw", "muon"])):
        if getattr(cfg, name) not in valid:
            raise UsageError(f"unknown {name} {getattr(cfg, name)!r}; valid {name}s: {', '.join(valid)}")
    for name, least in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 2)):
        if int(getattr(cfg, name)) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr}")
    if cfg.bias_update_speed < 0 or cfg.balance_alpha < 0 or cfg.mtp_lambda < 0:
        raise UsageError("--bias-update-speed, --balance-alpha and --mtp-lambda must be >= 0")
    if cfg.dsa not in (None, *STAGES) or (cfg.init and (cfg.vocab_size or cfg.tokenizer)):
        raise UsageError(f"--dsa takes {', '.join(STAGES)}, not {cfg.dsa!r}" if cfg.dsa not in (None, *STAGES) else
                         "--init brings the model's vocabulary and tokenizer: drop --vocab-size and --tokenizer")


def model_config(cfg: PretrainConfig, tok=None) -> ModelConfig:
    kw = {"aux_loss_alpha": cfg.balance_alpha, **({"vocab_size": cfg.vocab_size} if cfg.vocab_size else {})}
    if tok is not None:
        kw.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        kw.update({"pad_token_id": tok.pad_id} if getattr(tok, "pad_id", None) is not None else {})
    mcfg = read_config(cfg.init).replace(**kw) if cfg.init else ModelConfig.preset(cfg.preset, **kw)
    if cfg.dsa and not mcfg.dsa:
        raise UsageError(f"--dsa {cfg.dsa}: {cfg.init or cfg.preset} has no lightning indexers (DeepSeek Sparse "
                         f"Attention is DeepSeek-V3.2's); use --preset tiny-v3.2 or v3.2, or drop --dsa")
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the {cfg.preset} preset's max_position_embeddings "
                         f"{mcfg.max_position_embeddings}")
    return mcfg


def _documents(cfg: PretrainConfig, tok=None):
    from ..data.corpus import default_documents, read_documents

    return default_documents(cfg.corpus_docs, seed=cfg.seed) if cfg.data is None else read_documents(cfg.data, tok)


def prepare(cfg: PretrainConfig, rt: Runtime) -> tuple[Run, object, object]:
    """The run folder (refusing to overwrite a run), the tokenizer (from the checkpoint being resumed, --tokenizer,
    or trained on the data by rank 0) and OUT/data, the packed shards (built once, reused on resume, which must then
    name the same data). On bad input only what this call created is removed again."""
    from ..data.corpus import HEADER, build_shards, open_shards, read_documents
    from ..tokenizer import Tokenizer

    out, existed, vocab = Path(cfg.out), Path(cfg.out).exists(), model_config(cfg).vocab_size
    source = str(cfg.data) if cfg.data is not None else f"embedded:{cfg.corpus_docs}:{cfg.seed}"
    try:
        run = Run(cfg, "pretrain", rt)
        if cfg.data is not None:
            read_documents(cfg.data)  # missing / empty / unsupported -> UsageError before any work
        folder = run.resume_from or Path(cfg.init or cfg.tokenizer or out / "tokenizer")
        if run.resume_from is None and not (cfg.tokenizer or cfg.init) and rt.is_main:
            print(f"[pretrain] training a {vocab}-token BPE tokenizer on {source}", flush=True)
            Tokenizer.train(_documents(cfg), vocab, progress=False).save(folder)
        rt.barrier()
        if not (folder / "tokenizer.json").exists():
            raise UsageError(f"{folder}: no tokenizer.json there (train one with `nanoseek tokenizer`)")
        tok = Tokenizer.load(folder)
        if tok.vocab_size > vocab:
            raise UsageError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab}; pass "
                             f"--vocab-size {tok.vocab_size} (or more), or a tokenizer with at most {vocab} tokens")
        if tok.eos_id is None:
            raise UsageError("the tokenizer has no end-of-sentence token, which separates packed documents")
        want = {"source": source, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
        if rt.is_main:
            head = json.loads((out / "data" / HEADER).read_text()) if (out / "data" / HEADER).exists() else None
            if head is not None and any(head.get(k) != v for k, v in want.items()) and run.resume_from:
                raise UsageError(f"--resume: {out} was trained on {head.get('source')} ({head.get('vocab_size')}-"
                                 f"token tokenizer), not {source}; resume with the same --data")
            if head is None or any(head.get(k) != v for k, v in want.items()):
                build_shards(_documents(cfg, tok), tok, out / "data", source=source, progress=cfg.progress)
        rt.barrier()
        ds = open_shards(out / "data")
        if ds.num_sequences(cfg.seq_len) < 1:
            raise UsageError(f"--data {source} has {ds.num_tokens} tokens, fewer than one training sequence (--seq-len "
                             f"{cfg.seq_len} needs {cfg.seq_len + 1}); give more text or a smaller --seq-len")
    except UsageError:
        if rt.is_main and not existed and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return run, tok, ds


def train_step(module, optimizer, micro_batches, *, mtp_lambda: float, grad_clip: float, rt: Runtime,
               dsa: str | None = None) -> dict:
    """One optimizer step over this process's micro-batches [(inputs, targets) (B, T)]: L = loss + mtp_lambda *
    mtp_loss + balance_loss (V3 eq. 25), gradients accumulated, clipped, AdamW (the bias-update hook runs inside
    optimizer.step()). Returns the losses averaged over micro-batches and processes, and the gradient norm.
    dsa: a DSA training stage (dsa.stage_loss; + indexer_kl, kept_mass); "sparse" clips the indexers' gradient
    apart, so that the model's update is L's alone."""
    sums, n = 0, len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        hook = DSA(sparse=dsa == "sparse", records=[]) if dsa else None
        with runtime.grad_sync(module, i == n - 1):
            with runtime.autocast(rt.device):
                out = module(x, y, dsa=hook)
            total = out["loss"] + mtp_lambda * out["mtp_loss"] + out["balance_loss"]
            total, logs = stage_loss(dsa, hook.records, total) if hook else (total, {})
            (total / n).backward()
        out |= logs
        sums = sums + torch.stack(list(out.values())).detach().float()
    apart = dsa == "sparse" and [[p for n, p in module.named_parameters() if (".indexer." in n) == ix] for ix in (0, 1)]
    grad_norm = [optim.clip_grad(ps, grad_clip) for ps in (apart or [module.parameters()])][0]   # (names: DSA only)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**dict(zip(out, rt.all_reduce(sums / n, "mean").tolist())), "grad_norm": grad_norm}


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining; returns OUT/final. Raises UsageError on bad input, before writing anything."""
    from ..data.corpus import BatchSampler
    from ..model import Transformer

    validate(cfg)
    rt = runtime.init(cfg.device)
    try:
        run, tok, ds = prepare(cfg, rt)
        runtime.seed(cfg.seed)
        mcfg = model_config(cfg, tok)
        model = Transformer(mcfg).to(rt.device).train()
        run.restore_weights(model, init=cfg.init)
        dsa = cfg.dsa or ("sparse" if mcfg.dsa else None)
        for name, p in model.named_parameters():   # frozen: no gradient, no optimizer state
            p.requires_grad_(trains(name, dsa))
        if cfg.compile:   # one process: the whole loss as one graph; block by block under DDP / FSDP2 and with DSA
            run.print(f"[pretrain] {(compile_blocks if rt.distributed or dsa else compile_losses)(model, rt.device)}")
        module = runtime.parallelize(TrainModule(model), rt, cfg.fsdp, blocks=[*model.layers, *model.mtp])
        opt = optim.build(cfg.optimizer, module, cfg.lr, cfg.weight_decay)
        loads = optim.ExpertLoads(model, rt)
        optim.add_bias_update(opt, loads, 0.0 if dsa == "warmup" else cfg.bias_update_speed)   # biases frozen too
        B, T, A, W = cfg.batch_size, cfg.seq_len, cfg.grad_accum, rt.world_size
        sampler = BatchSampler(ds.num_sequences(T), B * A * W, seed=cfg.seed)
        saved = run.start(module, model, opt, tok, state=lambda: {"data": sampler.state_dict()},
                          flops_per_token=flops.flops_per_token(mcfg, T))
        if saved:
            sampler.load_state_dict(saved["data"])
        n = mcfg.num_params()
        run.print(f"[pretrain] {cfg.init or cfg.preset}{f' --dsa {dsa}' if dsa else ''}: {n['total'] / 1e6:.2f}M "
                  f"parameters ({n['activated'] / 1e6:.2f}M activated), {ds.num_tokens:,} tokens of data, global batch {B * A * W} x {T} tokens, {W} "
                  f"process(es){' FSDP' if cfg.fsdp and W > 1 else ''} on {rt.device}")
        warmup = cfg.warmup if cfg.warmup >= 0 else min(200, cfg.steps // 20)
        for step in run.steps():
            idx = sampler.next_batch()    # the global batch; this process takes rows (a * W + rank) * B ...
            micro = []
            for a in range(A):
                x, y = ds.batch(idx[(a * W + rt.rank) * B:(a * W + rt.rank + 1) * B], T)
                micro.append((torch.from_numpy(x).to(rt.device), torch.from_numpy(y).to(rt.device)))
            lr = optim.set_lr(opt, optim.lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=warmup,
                                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio))
            r = train_step(module, opt, micro, mtp_lambda=cfg.mtp_lambda, grad_clip=cfg.grad_clip, rt=rt, dsa=dsa)
            if dsa == "sparse" and cfg.kept_mass_every > 0 and (step % cfg.kept_mass_every == 0 or step + 1 == cfg.steps):
                with runtime.autocast(rt.device):
                    r["kept_mass"] = rt.all_reduce(dense_kept_mass(module, *micro[0]).reshape(1), "mean").item()
            expert_load = [t.tolist() for t in loads.collect()[:len(model.moe_layers())]]   # main layers
            run.log({**r, "lr": lr, "load_imbalance": optim.load_imbalance(expert_load), "expert_load": expert_load},
                    tokens=B * A * W * T, loss=r["loss"], lr=lr)
            if not math.isfinite(r["loss"]):
                raise UsageError(f"the loss became {r['loss']} at step {step + 1}; lower --lr (now {cfg.lr})")
        if rt.is_main:
            plots.pretrain_plots(run.out, run.rows)
        return run.finish(summary=("loss", "mtp_loss", "load_imbalance", "indexer_kl", "kept_mass"))
    finally:
        runtime.shutdown(rt)


def main(cfg: PretrainConfig) -> int:
    pretrain(cfg)
    return 0
