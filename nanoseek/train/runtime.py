"""Where training runs: device, processes (torchrun), seeding, bf16 autocast, DDP / FSDP2 applied from outside.

    rt = runtime.init(cfg.device)             # torchrun env -> process group (gloo on CPU, NCCL on GPUs)
    module = runtime.parallelize(TrainModule(model), rt, fsdp=cfg.fsdp, blocks=[*model.layers, *model.mtp])
    with runtime.grad_sync(module, last_micro), runtime.autocast(rt.device):
        loss = module(x, y)["loss"]

The model file never mentions ranks: parallelism wraps a built model here (torchtitan's way). One process
(world_size 1) needs no process group and gets the model back unwrapped.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError


@dataclass
class Runtime:
    """Where this process runs and who its peers are. The collectives are no-ops in one process."""
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
        """t in place over all ranks (sum | mean | max). Returns t."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.div_(self.world_size) if op == "mean" else t

    def sum(self, *values: float, op: str = "sum") -> list[float]:
        """Python numbers reduced over ranks (one collective)."""
        return self.all_reduce(torch.tensor(values, dtype=torch.float64, device=self.device), op).tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t (same shape on each) concatenated along dim 0, in rank order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(parts, t.to(self.device).contiguous())
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable obj, in rank order."""
        out = [obj] * self.world_size
        if self.distributed:
            dist.all_gather_object(out, obj)
        return out

    def share(self, n: int, what: str) -> slice:
        """This rank's slice of the n items of a global batch."""
        if n % self.world_size:
            raise UsageError(f"{what} = {n} must be a multiple of the number of processes ({self.world_size})")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)


def init(device: str | None = None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group: NCCL when this
    process has a GPU, gloo on CPU. Without torchrun: one process, on the GPU when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else (device or "cpu"))
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = ("nccl" if use_cuda else "gloo") if world > 1 else None
    if backend and not dist.is_initialized():
        dist.init_process_group(backend)
    return Runtime(rank, world, local, dev, backend)


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed(s: int) -> None:
    """Python, numpy and torch generators, the same on every rank (weights start identical everywhere)."""
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def autocast(device: torch.device):
    """bf16 autocast on GPU (weights and optimizer stay float32); plain float32 on CPU, where bf16 matmuls are
    slower than fp32 on most CPUs and exact resume tests want deterministic fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def grad_sync(module: nn.Module, sync: bool):
    """Gradient accumulation: skip the DDP all-reduce / FSDP reduce-scatter on all but the last micro-batch
    (gradients add up locally), so one optimizer step costs one communication round."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    with module.no_sync() if hasattr(module, "no_sync") and not sync else contextlib.nullcontext():   # DDP
        yield


class TrainModule(nn.Module):
    """What DDP / FSDP2 wrap for a loss: forward(...) -> model.losses(...). Going through forward (not model.losses
    directly) is what lets the wrappers' hooks sync gradients and gather sharded weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> dict:
        return self.model.losses(*args, **kwargs)


def parallelize(module: nn.Module, rt: Runtime, fsdp: bool = False, blocks=(), unused: bool = False) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` each of `blocks`, then the root) under torchrun; `module` itself in one process.
    DDP does not re-broadcast buffers (the MoE routing bias): every rank applies the same bias update from the same
    all-reduced loads. unused=True: parameters the loss may not reach (GRPO does not train the MTP block). Under
    gloo the FSDP mesh is an explicit CPU mesh (a gloo group on a machine with GPUs crashes otherwise)."""
    if not rt.distributed:
        if fsdp and rt.is_main:
            print("[nanoseek] --fsdp has no effect in one process (run under torchrun to shard)", flush=True)
        return module
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if rt.backend == "nccl" else "cpu", (rt.world_size,))
    for b in blocks:
        fully_shard(b, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def full_state_dict(module: nn.Module, cpu: bool = False) -> dict:
    """The model's full weights and buffers from a (possibly sharded) training module, named as in the model
    (no wrapper prefix). Collective under FSDP: every rank calls it; cpu=True: only rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu))
    wrapped = isinstance(getattr(module, "module", module), TrainModule)    # (DDP's own prefix is dropped already)
    return {k.removeprefix("model.") if wrapped else k: v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Python, numpy, torch (and CUDA) generator states as tensors + small json, for an exact resume."""
    version, py, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.python": torch.tensor(py, dtype=torch.int64), "rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": {"version": version, "gauss_next": gauss},
                     "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                               "cached_gaussian": float(cached)}}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    p, n = meta["python"], meta["numpy"]
    random.setstate((p["version"], tuple(int(x) for x in tensors["rng.python"].tolist()), p["gauss_next"]))
    np.random.set_state((n["name"], tensors["rng.numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
