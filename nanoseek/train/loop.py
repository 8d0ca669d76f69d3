"""The pieces every trainer shares (pretrain, SFT, GRPO, distill), as small functions.

    rt = init_runtime()                                   # torchrun env -> process group (gloo CPU / NCCL GPU)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    for step ...:
        with grad_sync(module, last_micro), autocast(rt.device): loss.backward()
        set_lr(opt, lr_at(step, total=..., lr=..., warmup=..., schedule="cosine"))
        grad_norm = clip_grad(module.parameters(), 1.0); opt.step()
        logger.log({...})                                 # OUT/metrics.jsonl, rank 0 only
        save_checkpoint(out, step, module, model, opt, state={...}, tokenizer=tok, rt=rt)

Checkpoints: `OUT/ckpt/step-N/` is a Hugging Face model folder (ns.save, with the tokenizer) plus
`trainer_state.safetensors` (optimizer tensors and RNG states, flattened by hand: nothing is ever pickled) and
`trainer_state.json` (step, data position, optimizer hyper-parameters, the trainer's own state and a manifest of
file sizes). It is written into `OUT/ckpt/.tmp-step-N/` and renamed into place, so a folder named `step-N` is
complete unless someone damaged it afterwards, which `check_checkpoint` detects from the manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UsageError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


# --------------------------------------------------------------------------------------------- device, processes
@dataclass
class Runtime:
    """Where this process runs and who its peers are. One process (world_size 1) needs no process group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None      # "gloo" | "nccl" when torch.distributed is initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (sum | mean | max); a no-op in one process. Returns t."""
        if self.distributed:
            red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(t, op=red)
            if op == "mean":
                t /= self.world_size
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (e.g. one of them got Ctrl-C)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce(t, "max").item())


def init_runtime(device: str | None = None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group: NCCL when this
    process has a GPU, gloo on CPU. Without torchrun: one process, on the GPU when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else (device or "cpu"))
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
    return Runtime(rank, world, local, dev, backend)


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device):
    """bf16 autocast on GPU (weights and optimizer stay float32); plain float32 on CPU, where bf16 matmuls are
    slower than fp32 on most CPUs and exact resume tests want deterministic fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (including stacked experts); none on norms, biases and embeddings
    (decaying them only pulls scales and token vectors toward zero, the usual GPT-2/nanoGPT choice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, *, total: int, lr: float, warmup: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup` steps, then
      cosine: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2;
      wsd (warmup-stable-decay, MiniCPM; DeepSeek-V3 likewise holds its lr constant, then decays): lr until the
      last `decay_frac` of the steps, then linear to min_lr. A WSD run can be continued from any stable-phase
      checkpoint without re-warming.
    """
    min_lr = lr * min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_steps = max(1, int(round(total * decay_frac)))
        start = total - decay_steps
        if step < start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - start + 1) / decay_steps)
    raise UsageError(f"unknown schedule {schedule!r}; expected cosine or wsd")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, sync: bool):
    """Gradient accumulation: skip the DDP all-reduce / FSDP reduce-scatter on all but the last micro-batch
    (gradients add up locally), so one optimizer step costs one communication round."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP) and not sync:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    yield


def clip_grad(params, max_norm: float) -> float:
    """Clip the global gradient norm (max_norm <= 0: measure only). Works on DTensor (FSDP2) gradients."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# --------------------------------------------------------------------------------------------- parallel wrappers
def wrap_ddp(module: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """DistributedDataParallel. Buffers (the MoE routing bias) are not re-broadcast each forward: every rank applies
    the same bias update from the same all-reduced loads, so they stay identical."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def apply_fsdp(module: torch.nn.Module, blocks, rt: Runtime) -> torch.nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (embedding, final norm, head). Under gloo the mesh
    is an explicit CPU mesh (a gloo group on a machine with GPUs crashes otherwise)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if rt.backend == "nccl" else "cpu", (rt.world_size,))
    for b in blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def all_reduce_loads(loads: list[torch.Tensor], rt: Runtime) -> list[torch.Tensor]:
    """Sum per-expert token counts over ranks (one collective for all layers), as V3's bias update needs the
    global load."""
    if not loads:
        return loads
    flat = torch.stack([t.to(rt.device, torch.float32) for t in loads])
    rt.all_reduce(flat, "sum")
    return list(flat.unbind(0))


# --------------------------------------------------------------------------------------------- FLOPs / MFU
def flops_per_token(cfg, seq_len: int, mtp: bool = True) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 * activated parameters (embedding lookup excluded) plus the
    attention matmuls, 6 * layers * heads * seq_len * (qk_head_dim + v_head_dim) (QK^T and AV, fwd + bwd; with
    qk = v = Q this is PaLM's 12 L H Q T). The MTP modules count as one more block + eh_proj + head each."""
    act = cfg.num_params()["activated"]
    attn_layer = 6 * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    total = 6 * act + attn_layer * cfg.num_hidden_layers
    if mtp and cfg.num_nextn_predict_layers:
        one = cfg.replace(num_hidden_layers=1, first_k_dense_replace=0, vocab_size=0, num_nextn_predict_layers=0)
        h = cfg.hidden_size
        block = one.num_params()["activated"] - h  # an MoE block's activated parameters (no final norm)
        per = block + 2 * h * h + 3 * h + cfg.vocab_size * h
        total += (6 * per + attn_layer) * cfg.num_nextn_predict_layers
    return float(total)


# dense bf16 tensor-core peaks (vendor datasheets), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_FLOPS.items():
        if key in name:
            return v
    return None


# --------------------------------------------------------------------------------------------- logging
def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


class MetricsLogger:
    """OUT/metrics.jsonl, one JSON object per step, flushed at once (a killed run keeps what it logged).

    On resume from step N the rows after N (logged after that checkpoint, then lost) are dropped, so the file
    reads as one continuous run. Only the main rank writes; other ranks' logger does nothing.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        self.rows: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self.rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _finite(v) for k, v in row.items()}
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()


def read_jsonl(path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a half-written last line of a killed run
    return rows


def progress(total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


class StopOnSigint:
    """Ctrl-C asks the loop to stop after the current step (it then saves a checkpoint and exits cleanly);
    a second Ctrl-C interrupts at once. Use as a context manager around the loop; check `.requested`."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[nanoseek] Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# --------------------------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Python, numpy, torch (and CUDA) generator states as tensors + small json, for an exact resume."""
    version, py, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.python": torch.tensor(py, dtype=torch.int64),
               "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"python": {"version": version, "gauss_next": gauss},
            "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    p = meta["python"]
    random.setstate((p["version"], tuple(int(x) for x in tensors["rng.python"].tolist()), p["gauss_next"]))
    n = meta["numpy"]
    np.random.set_state((n["name"], tensors["rng.numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


# --------------------------------------------------------------------------------------------- checkpoints
def _model_prefix(module: torch.nn.Module, model: torch.nn.Module) -> str:
    """The name under which `model` sits inside `module` (a training wrapper), e.g. "model."."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = module.module if isinstance(module, DDP) else module
    for name, m in inner.named_modules():
        if m is model:
            return name + "." if name else ""
    raise ValueError("the model is not inside the module")


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def save_checkpoint(out: str | os.PathLike, step: int, module: torch.nn.Module, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, state: dict, tokenizer=None, rt: Runtime | None = None,
                    keep: int = 3) -> Path:
    """Write OUT/ckpt/step-N atomically (see the module docstring). Call on every rank (FSDP gathers the full
    weights and optimizer state collectively); only the main rank writes. `state` is the trainer's json-able
    state (data position, config, ...). Keeps the newest `keep` checkpoints (0: all)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from ..checkpoint import save as save_model

    rt = rt or Runtime()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(module, optimizer, options=opts)
    plain = model
    if _is_sharded(module):  # gather the full weights into a meta-built copy (rank 0 keeps them on CPU)
        msd = get_model_state_dict(module, options=opts)
        if rt.is_main:
            prefix = _model_prefix(module, model)
            with torch.device("meta"):
                plain = type(model)(model.cfg)
            plain.load_state_dict({k[len(prefix):]: v for k, v in msd.items() if k.startswith(prefix)},
                                  strict=False, assign=True)
    ckpt_dir = Path(out) / "ckpt"
    final = ckpt_dir / f"step-{step}"
    if rt.is_main and final.exists() and check_checkpoint(final) is not None:
        # a damaged folder under this name (resume went back to an older one): keep it aside, never delete it
        os.replace(final, final.with_name(f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
    if rt.is_main and not final.exists():  # an existing complete step-N holds this very state: keep it
        tmp = ckpt_dir / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(plain, tmp, tokenizer=tokenizer)
        _test_hook_sleep(step)
        tensors, rng_meta = rng_state()
        scalars: dict = {}
        for fqn, st in osd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim/{fqn}/{k}"] = v.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(fqn, {})[k] = v
        save_file(tensors, tmp / STATE_TENSORS, metadata={"format": "nanoseek-trainer-state-v1"})
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        doc = {"step": step, "state": state, "rng": rng_meta,
               "optimizer": {"param_groups": osd["param_groups"], "scalars": scalars},
               "world_size": rt.world_size, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
        with open(tmp / STATE_JSON, "w") as f:
            json.dump(doc, f, indent=1, default=list)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)   # the commit point: before it, the folder does not exist under its name
        if keep > 0:
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return final


def _test_hook_sleep(step: int) -> None:
    """Tests make the writer pause mid-checkpoint (model written, trainer state not yet) to SIGKILL it there:
    NANOSEEK_TEST_CKPT_SLEEP="STEP:SECONDS"."""
    spec = os.environ.get("NANOSEEK_TEST_CKPT_SLEEP")
    if spec:
        at, secs = spec.split(":")
        if int(at) == step:
            print(f"[test hook] sleeping {secs}s inside checkpoint step-{step}", flush=True)
            time.sleep(float(secs))


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """OUT/ckpt/step-N folders, oldest first (temporary folders of interrupted writes are not listed)."""
    d = Path(out) / "ckpt"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """None when the checkpoint is complete, else what is wrong with it (one line)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        doc = json.loads((path / STATE_JSON).read_text())
        files = doc["files"]
        int(doc["step"])
    except FileNotFoundError:
        return f"{path}: {STATE_JSON} is missing (an incomplete checkpoint)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{path}: {STATE_JSON} is unreadable ({type(e).__name__}: {e})"
    for name, size in files.items():
        f = path / name
        if not f.exists():
            return f"{path}: {name} is missing"
        if f.stat().st_size != size:
            return f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {size} (truncated or damaged)"
        if name.endswith(".safetensors"):
            try:
                with safe_open(f, "pt") as sf:
                    sf.keys()
            except Exception as e:
                return f"{path}: {name} is not a readable safetensors file ({e})"
    if not (path / "config.json").exists():
        return f"{path}: config.json is missing"
    return None


def find_resume_checkpoint(out: str | os.PathLike, log=print) -> Path | None:
    """The newest complete checkpoint of OUT. A damaged newer one is skipped with a message when an older complete
    one exists; when checkpoints exist but none is complete, UsageError. None when OUT has no checkpoint at all."""
    ckpts = list_checkpoints(out)
    problems = []
    for p in reversed(ckpts):
        why = check_checkpoint(p)
        if why is None:
            for msg in problems:
                log(f"[nanoseek] skipping damaged checkpoint: {msg}; resuming from {p.name}")
            return p
        problems.append(why)
    if problems:
        raise UsageError(f"cannot resume: {problems[0]}" + (f" (and {len(problems) - 1} older damaged checkpoint(s))"
                                                           if len(problems) > 1 else "")
                         + "; delete it or start a fresh run with another --out")
    return None


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Copy a checkpoint folder's weights and routing-bias buffers into `model` (before any DDP/FSDP wrapping)."""
    from ..checkpoint import CheckpointError
    from ..checkpoint import load as load_model

    try:
        loaded = load_model(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(f"cannot resume from {path}: {e}") from None
    sd = loaded.state_dict()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]
    if missing or unexpected:
        raise UsageError(f"cannot resume from {path}: its weights do not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); use the same --preset and overrides as the original run")


def load_trainer_state(path: str | os.PathLike, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       restore_rng: bool = True) -> dict:
    """Restore optimizer state (resharded to this run's layout by torch.distributed.checkpoint) and RNG states;
    returns the trainer_state.json document (its "step" and "state")."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(path)
    doc = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(path / STATE_TENSORS)
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            fqn, k = key[len("optim/"):].rsplit("/", 1)
            state.setdefault(fqn, {})[k] = t
    for fqn, sc in doc["optimizer"]["scalars"].items():
        state.setdefault(fqn, {}).update(sc)
    groups = doc["optimizer"]["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"cannot resume from {path}: the optimizer state does not fit this model ({e})") from None
    if restore_rng:
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, doc["rng"])
    return doc


# ---------------------------------------------------------------------------------------------- configuration
def parse_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"expected a boolean (true/false), got {v!r}")


def make_config(cls, args=None, required: tuple[str, ...] = (), **overrides):
    """dataclass `cls` from its defaults < a --config TOML file < explicit command-line values < overrides;
    each field named in `required` must end up set (else "--name is required").

    TOML keys are the option names, with `-` or `_` (`bias-gamma` = `bias_gamma`); an unknown key is an error that
    lists the valid ones. Every training command (pretrain, sft, grpo, distill) builds its config here.
    """
    import dataclasses
    import tomllib

    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    path = getattr(args, "config", None) if args is not None else None
    if path:
        if not Path(path).is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            doc = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"--config {path}: not valid TOML ({e})") from None
        doc = {k.replace("-", "_"): v for k, v in doc.items()}
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise UsageError(f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
        values.update(doc)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    values.update(overrides)
    for k, f in fields.items():
        if k in values and f.type in ("bool", bool):
            values[k] = parse_bool(values[k])
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise UsageError(f"bad configuration: {e}") from None
    for name in required:
        if not getattr(cfg, name):
            raise UsageError(f"--{name.replace('_', '-')} is required")
    return cfg

