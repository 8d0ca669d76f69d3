"""A training run's folder and bookkeeping, so that each recipe's loop holds only the training.

    run = Run(cfg, "sft", rt)                       # refuses to overwrite a run; finds the checkpoint to resume
    run.restore_weights(model)                      # (before DDP/FSDP wrapping) no-op for a fresh run
    run.start(module, model, opt, tok, state=lambda: {...})   # optimizer + RNG + the recipe's state; OUT/config.toml
    for step in run.steps():                        # from the resume point; Ctrl-C or --stop-after end it early
        ...
        run.log({"loss": ...}, tokens=n)            # a row of OUT/metrics.jsonl, the progress bar
    return run.finish()                             # OUT/final when every step ran; a summary table

Checkpoints: `OUT/ckpt/step-N/` is a Hugging Face model folder (ns.save, with the tokenizer) plus
`trainer_state.safetensors` (optimizer tensors and RNG states, flattened by hand: nothing is ever pickled) and
`trainer_state.json` (step, the trainer's state such as the data position, optimizer hyper-parameters and a manifest
of file sizes). It is written into `OUT/ckpt/.tmp-step-N/` and renamed into place, so a folder named `step-N` is
complete unless someone damaged it afterwards, which `check_checkpoint` detects from the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from ..data.jsonl import read_jsonl, write_jsonl
from ..errors import UsageError
from ..flops import peak_flops
from ..model.weights import fuse_param_state
from ..options import write_config
from .runtime import Runtime, TrainModule, full_state_dict, rng_state, set_rng_state

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


class Run:
    """cfg: a recipe config (out, steps, resume, save_every, ...); record: what OUT/config.toml holds (default cfg)."""

    def __init__(self, cfg, name: str, rt: Runtime, record=None):
        self.cfg, self.name, self.rt, self.record, self.out = cfg, name, rt, record or cfg, Path(cfg.out)
        if not str(cfg.out):
            raise UsageError("--out is required")
        self.resume_from = find_resume_checkpoint(self.out, log=self.print) if cfg.resume else None
        if cfg.resume and self.resume_from is None and self.out.exists() and any(self.out.iterdir()):
            self.print(f"[{name}] --resume: {self.out} has no checkpoint yet; starting from step 0")
        elif not cfg.resume and any((self.out / n).exists() for n in ("ckpt", "final", "metrics.jsonl")):
            raise UsageError(f"--out {self.out} already holds a training run; pass --resume to continue it or "
                             f"choose another --out")
        self.step, self.tokens_seen, self.elapsed, self.stopped, self.rows = 0, 0, 0.0, False, []

    def print(self, msg: str) -> None:
        if self.rt.is_main:
            print(msg, flush=True)

    def restore_weights(self, model: torch.nn.Module, init=None) -> None:
        """The weights and routing biases of the resumed checkpoint, else of `init` (a model folder), into `model`."""
        from ..checkpoint import CheckpointError, load

        if (folder := self.resume_from or init) is None:
            return
        try:
            missing, unexpected = model.load_state_dict(load(folder).state_dict(), strict=False)
        except (CheckpointError, OSError, ValueError) as e:
            raise UsageError(f"cannot start from {folder}: {e}") from None
        if missing or unexpected:
            raise UsageError(f"cannot start from {folder}: its weights do not fit this model (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); use the original --preset and overrides")

    def start(self, module, model, optimizer, tokenizer, state=dict, flops_per_token: float | None = None) -> dict:
        """Restore the optimizer, RNG and counters when resuming; returns the recipe's saved state ({} when fresh).
        state(): the recipe's json-able state to checkpoint (e.g. its data position)."""
        from tqdm import tqdm

        self.module, self.model, self.optimizer, self.tokenizer, self.state = module, model, optimizer, tokenizer, state
        saved: dict = {}
        if self.resume_from is not None:
            doc = load_trainer_state(self.resume_from, module, optimizer)
            self.step, saved = int(doc["step"]), doc["state"]
            self.tokens_seen, self.elapsed = int(saved.get("tokens_seen", 0)), float(saved.get("elapsed_s", 0.0))
            self.print(f"[{self.name}] resumed from {self.resume_from} (step {self.step})")
        if self.rt.is_main:   # OUT/metrics.jsonl: rows logged after the resumed checkpoint were lost with the run
            metrics = self.out / "metrics.jsonl"
            self.rows = [r for r in read_jsonl(metrics) if r.get("step", 0) <= self.step] if self.step else []
            write_jsonl(metrics, self.rows)
            self._log = open(metrics, "a")
            write_config(self.record, self.out / "config.toml")
        peak = peak_flops(self.rt.device)
        self.mfu_scale = 100 * flops_per_token / (peak * self.rt.world_size) if flops_per_token and peak else None
        self.bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                        disable=not (self.rt.is_main and self.cfg.progress))
        return saved

    def steps(self):
        """Yield the index of each step to run; after each, checkpoint when due (save_every, the last step, Ctrl-C).
        Ctrl-C finishes the current step, saves and stops; a second Ctrl-C interrupts at once."""
        cfg, self.interrupted = self.cfg, False
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        try:
            old = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C behaves as usual
            old = None
        try:
            while self.step < end and not self.stopped:
                self._t0 = time.perf_counter()
                yield self.step
                self.step += 1
                self.stopped = self.rt.sum(self.interrupted, op="max")[0] > 0    # any rank got Ctrl-C
                if self.stopped or self.step == end or (cfg.save_every and self.step % cfg.save_every == 0):
                    state = {**self.state(), "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                             "config": dataclasses.asdict(cfg), "world_size": self.rt.world_size}
                    save_checkpoint(self.out, self.step, self.module, self.model, self.optimizer, state=state,
                                    tokenizer=self.tokenizer, rt=self.rt, keep=cfg.keep_checkpoints)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\n[nanoseek] Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def log(self, row: dict, tokens: int = 0, **postfix) -> None:
        """A row of OUT/metrics.jsonl for the step just done (step, timing and token counters added), flushed at once
        (a killed run keeps what it logged); postfix: values shown on the progress bar."""
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        self.elapsed, self.tokens_seen = self.elapsed + dt, self.tokens_seen + tokens
        row = {"step": self.step + 1, **row, "tokens_seen": self.tokens_seen, "step_s": dt, "elapsed_s": self.elapsed}
        if tokens:
            row["tokens_per_s"] = tokens / dt
            if self.mfu_scale:
                row["mfu"] = self.mfu_scale * row["tokens_per_s"]
        if self.rt.is_main:
            row = {k: _finite(v) for k, v in row.items()}     # NaN is not JSON
            self.rows.append(row)
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(1)

    def finish(self, summary: tuple[str, ...] = ("loss",)) -> Path:
        """Close the log, export OUT/final when every step ran, print a summary of the `summary` keys; after Ctrl-C
        raise KeyboardInterrupt, the checkpoint being safe (the CLI exits 130). Returns OUT/final."""
        self.bar.close()
        done = self.step >= self.cfg.steps
        if self.rt.is_main:
            self._log.close()
            if done:   # OUT/final: the last checkpoint as a plain model folder (without the trainer state)
                final, tmp = self.out / "final", self.out / ".tmp-final"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(self.out / "ckpt" / f"step-{self.step}", tmp,
                                ignore=shutil.ignore_patterns(STATE_JSON, STATE_TENSORS))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            print_summary(self, summary, done)
        self.rt.barrier()
        if self.stopped:
            raise KeyboardInterrupt
        return self.out / "final"


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return [_finite(x) for x in v] if isinstance(v, (list, tuple)) else v


def print_summary(run: Run, keys: tuple[str, ...], done: bool) -> None:
    rows, n = run.rows, max(1, len(run.rows) // 10)

    def avg(key, rs):
        v = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
        return f"{sum(v) / len(v):.4g}" if v else "-"

    lines = [("steps", f"{run.step} / {run.cfg.steps}" + ("" if done else "  (stopped early; --resume continues)")),
             ("tokens seen", f"{run.tokens_seen:,}"), ("wall time", f"{run.elapsed:.1f} s of training")]
    lines += [(k, f"{avg(k, rows[:n])} -> {avg(k, rows[-n:])} (mean of the first / last {n} steps)")
              for k in (*keys, "tokens_per_s", "mfu") if any(k in r for r in rows)]
    lines.append(("outputs", f"{run.out}/: " + ", ".join(sorted(p.name for p in run.out.iterdir()))))
    w = max(len(k) for k, _ in lines)
    print(f"[{run.name}] " + ("done" if done else f"stopped at step {run.step}; continue with --resume"))
    print("\n".join(f"  {k:<{w}}  {v}" for k, v in lines), flush=True)


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: str | os.PathLike, step: int, module: torch.nn.Module, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, state: dict, tokenizer=None, rt: Runtime | None = None,
                    keep: int = 3) -> Path:
    """Write OUT/ckpt/step-N atomically (see the module docstring). Call on every rank (FSDP gathers the full
    weights and optimizer state collectively); only the main rank writes. `state` is the trainer's json-able
    state (data position, config, ...). Keeps the newest `keep` checkpoints (0: all)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from ..checkpoint import save as save_model

    rt = rt or Runtime()
    osd = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if any(hasattr(p, "full_tensor") for p in module.parameters()):    # FSDP: gather the full weights on rank 0
        sd = full_state_dict(module, cpu=True)
        if rt.is_main:
            with torch.device("meta"):
                model = type(model)(model.cfg)
            model.load_state_dict(sd, strict=False, assign=True)
    final = Path(out) / "ckpt" / f"step-{step}"
    if rt.is_main and final.exists() and check_checkpoint(final) is not None:
        # a damaged folder under this name (resume went back to an older one): keep it aside, never delete it
        os.replace(final, final.with_name(f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
    if rt.is_main and not final.exists():  # an existing complete step-N holds this very state: keep it
        tmp = final.with_name(f".tmp-step-{step}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, tmp, tokenizer=tokenizer)
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
        doc = {"step": step, "state": state, "rng": rng_meta,
               "optimizer": {"param_groups": osd["param_groups"], "scalars": scalars},
               "world_size": rt.world_size, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}}
        with open(tmp / STATE_JSON, "w") as f:
            json.dump(doc, f, indent=1, default=list)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)   # the commit point: before it, the folder does not exist under its name
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return final


def _test_hook_sleep(step: int) -> None:
    """NANOSEEK_TEST_CKPT_SLEEP="STEP:SECONDS": tests pause the writer mid-checkpoint to SIGKILL it there."""
    at, _, secs = os.environ.get("NANOSEEK_TEST_CKPT_SLEEP", "").partition(":")
    if at and int(at) == step:
        print(f"[test hook] sleeping {secs}s inside checkpoint step-{step}", flush=True)
        time.sleep(float(secs))


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """OUT/ckpt/step-N folders, oldest first (temporary folders of interrupted writes are not listed)."""
    d = Path(out) / "ckpt"
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()] \
        if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """None when the checkpoint is complete, else what is wrong with it (one line)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        doc = json.loads((path / STATE_JSON).read_text())
        files, _ = doc["files"], int(doc["step"])
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
        try:
            if name.endswith(".safetensors"):
                with safe_open(f, "pt") as sf:
                    sf.keys()
        except Exception as e:
            return f"{path}: {name} is not a readable safetensors file ({e})"
    return None if (path / "config.json").exists() else f"{path}: config.json is missing"


def find_resume_checkpoint(out: str | os.PathLike, log=print) -> Path | None:
    """The newest complete checkpoint of OUT. A damaged newer one is skipped with a message when an older complete
    one exists; when checkpoints exist but none is complete, UsageError. None when OUT has no checkpoint at all."""
    problems = []
    for p in reversed(list_checkpoints(out)):
        if (why := check_checkpoint(p)) is None:
            for msg in problems:
                log(f"[nanoseek] skipping damaged checkpoint: {msg}; resuming from {p.name}")
            return p
        problems.append(why)
    if problems:
        raise UsageError(f"cannot resume: {problems[0]}" + (f" (and {len(problems) - 1} older damaged checkpoint(s))"
                         if len(problems) > 1 else "") + "; delete it or start a fresh run with another --out")
    return None


def load_trainer_state(path: str | os.PathLike, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer state (resharded by torch.distributed.checkpoint) and RNG; -> trainer_state.json's doc."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    doc = json.loads((Path(path) / STATE_JSON).read_text())
    tensors = load_file(Path(path) / STATE_TENSORS)
    # parameter names as this run's module spells them: "model.layers..." under a TrainModule, "layers..." for the
    # bare model, whichever wrapper the checkpoint was written with
    wrapped = isinstance(getattr(module, "module", module), TrainModule)   # (inside DDP)
    name = (lambda fqn: "model." * wrapped + fqn.removeprefix("model."))
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            fqn, k = key[len("optim/"):].rsplit("/", 1)
            state.setdefault(name(fqn), {})[k] = t
    for fqn, sc in doc["optimizer"]["scalars"].items():
        state.setdefault(name(fqn), {}).update(sc)
    groups = [{**g, "params": [name(p) for p in g["params"]], **({"betas": tuple(g["betas"])} if "betas" in g else {})}
              for g in doc["optimizer"]["param_groups"]]
    # a run saved before gate_up_proj & co. were fused; not V4's shared experts, which keep gate_proj and up_proj
    own = {n for n, _ in getattr(module, "module", module).named_parameters()}           # (DDP wraps the module)
    state, groups = (state, groups) if set(state) <= own else fuse_param_state(state, groups)
    try:
        set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"cannot resume from {path}: the optimizer state does not fit this model ({e})") from None
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, doc["rng"])
    return doc
