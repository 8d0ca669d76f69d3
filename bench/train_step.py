"""Training throughput: `nanoseek pretrain`'s step vs a transformers DeepseekV3ForCausalLM step, same run.

Both models hold the same weights (ours saved with ns.save, loaded by transformers), see the same batch and use
the same AdamW (same parameter groups), gradient clipping and float32 on CPU. Ours is `train_step` from
nanoseek/train/pretrain.py, exactly what `nanoseek pretrain` runs (including the V3 bias update); MTP is off for
the comparison because transformers has no MTP module (--mtp adds our MTP step as a second line, for reference).
Steps alternate in blocks so both sides see the same machine load; the median step time is reported.

    .venv/bin/python bench/train_step.py [--preset cpu] [--batch 8] [--seq 128] [--steps 12] [--threads N]
    python3 bench/train_step.py --device cuda --preset small --batch 16 --seq 1024    # + MFU (bench/gpu.sh)
    .venv/bin/python bench/train_step.py --threads 1 --compile     # + our step compiled (the whole loss)
    .venv/bin/python bench/train_step.py --threads 1 --compile --processes    # each side in its own process

`--device cuda`: both models, the batch and the optimizers on the GPU, each timed step closed by
torch.cuda.synchronize(). The step runs as `nanoseek pretrain` runs it there: bf16 autocast with float32 weights
and optimizer state (runtime.autocast; transformers' step under the same autocast). It also prints the model FLOPs
utilisation: flops.flops_per_token (6 x activated parameters + attention, PaLM appendix B) x tokens/s over the
GPU's dense bf16 peak (flops.PEAK_BF16_FLOPS; none for an unlisted GPU). `--no-transformers`: our step alone
(no transformers installed, or only the MFU wanted). `--compile`: a third side, our step compiled as `nanoseek
pretrain --compile` compiles it in one process (the whole loss as one graph, compiled.compile_losses; `--compile
blocks`: every block its own graph, compiled.compile_blocks, as under torchrun; `--compile both`: a side each) on a
copy of the same weights; its compile falls in the uncounted warm-up and is printed. `--processes`: each side in
its own Python process holding only its own model (this script again with a hidden --child), the blocks of steps
still alternating: checks that sharing one process (its allocator, caches and three models) does not favour a side.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per side")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--mtp", action="store_true", help="also time our step with the MTP module and loss on")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both steps run (cuda: bf16 "
                    "autocast, as nanoseek pretrain trains on a GPU)")
    ap.add_argument("--compile", nargs="?", const="whole", default="", choices=["whole", "blocks", "both"],
                    help="also time our step compiled: whole (default) = the whole loss as one graph, as nanoseek "
                    "pretrain --compile in one process (compiled.compile_losses); blocks = every block its own graph, "
                    "as under torchrun (compiled.compile_blocks); both = a side each")
    ap.add_argument("--no-transformers", action="store_true", help="time our step only (no comparison)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU against this peak (TFLOP/s) instead of the "
                    "GPU's listed bf16 peak; on the CPU the MFU line is printed only with it")
    ap.add_argument("--processes", action="store_true", help="each side in its own process (holding only its "
                    "own model), steps still alternating in blocks; default: all sides in this process")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)   # one side, for --processes
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                         "run with --device cpu")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    names = ["nanoseek"] + ["transformers"] * (not args.no_transformers) + ["nanoseek+MTP"] * args.mtp \
        + ["nanoseek compiled"] * (args.compile in ("whole", "both")) \
        + ["nanoseek blocks"] * (args.compile in ("blocks", "both"))
    hf_version = "not used" if args.no_transformers else __import__("transformers").__version__
    if args.child:
        serve_side(args, dev)
    elif args.processes:
        report(args, ns_config(args), time_in_processes(args, names), dev, hf_version)
    else:
        sides = make_sides(args, dev, names)
        report(args, ns_config(args), time_sides(sides, args.steps, dev), dev, hf_version)


def ns_config(args):
    import nanoseek as ns
    return ns.ModelConfig.preset(args.preset, num_nextn_predict_layers=0)


def make_sides(args, dev: torch.device, names: list[str], say=print) -> dict:
    """The step function of each named side, ready to time (a compiled side has taken its first, compiling step).
    Every side starts from the same weights (seed 0) and sees the same batch (seed 1)."""
    import nanoseek as ns
    from nanoseek.train import optim
    from nanoseek.train.pretrain import train_step
    from nanoseek.train.runtime import Runtime, TrainModule, autocast

    torch.manual_seed(0)
    cfg = ns_config(args)
    ours = ns.Transformer(cfg).train()
    hf = None
    if "transformers" in names:
        import transformers
        with tempfile.TemporaryDirectory() as d:
            ns.save(ours, d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train().to(dev)
    ours.to(dev)
    rt = Runtime(device=dev)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def adamw(model):   # what nanoseek pretrain steps with (fused; transformers' Trainer default too), both sides
        return optim.fused_adamw(optim.param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    # same weights and batch -> same loss before any step (checks the comparison is like for like)
    with torch.no_grad():
        before = {"nanoseek": ours.losses(x, y)["loss"].item()}
        if hf is not None:
            before["transformers"] = F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1).float(), y.flatten()).item()
    if any(k in names for k in before):
        say("loss before training: " + "  ".join(f"{k} {v:.6f}" for k, v in before.items() if k in names))

    def ours_step(model, lam=0.0):
        module = TrainModule(model)
        opt = adamw(module)
        optim.add_bias_update(opt, optim.ExpertLoads(model, rt), 0.001)   # V3's bias update, as pretrain runs it
        return lambda: train_step(module, opt, [(x, y)], mtp_lambda=lam, grad_clip=1.0, rt=rt)

    def step_hf(opt_hf=adamw(hf) if hf is not None else None):
        with autocast(dev):        # bf16 on a GPU, as our step runs (runtime.autocast); nothing on the CPU
            logits = hf(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    sides = {}
    for name in names:
        if name == "nanoseek":
            sides[name] = ours_step(ours)
        elif name == "transformers":
            sides[name] = step_hf
        elif name == "nanoseek+MTP":
            torch.manual_seed(0)
            sides[name] = ours_step(ns.Transformer(ns.ModelConfig.preset(args.preset)).train().to(dev), 0.3)
        elif name in ("nanoseek compiled", "nanoseek blocks"):
            import copy

            from nanoseek.infer.compiled import compile_blocks, compile_losses
            m3 = copy.deepcopy(ours)
            say((compile_losses if name == "nanoseek compiled" else compile_blocks)(m3, dev))
            sides[name] = ours_step(m3)
            t0 = time.perf_counter()
            sides[name]()                      # the first step compiles (inductor's disk cache may shorten it)
            say(f"{name}: first step {time.perf_counter() - t0:.1f} s")
    return sides


def timed(step, n: int, dev: torch.device) -> list[float]:
    """n calls of step, each timed; on CUDA each timing starts and ends with a synchronize (the step's kernels are
    done, not only queued)."""
    times = []
    for _ in range(n):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return times


def in_blocks(run: dict, steps: int) -> dict[str, list[float]]:
    """run: side -> a call taking n that times n steps of that side; blocks of 3 steps per side in turn, so every
    side sees the same moments of the machine."""
    times: dict[str, list[float]] = {k: [] for k in run}
    for _ in range(max(1, steps // 3)):
        for name, steps_of in run.items():
            times[name] += steps_of(3)
    return times


def time_sides(sides: dict, steps: int, dev: torch.device) -> dict[str, list[float]]:
    """All sides in this process: two warm-up steps each (allocator, first-call overheads), then in_blocks."""
    for fn in sides.values():
        fn()
        fn()
    return in_blocks({name: (lambda n, fn=fn: timed(fn, n, dev)) for name, fn in sides.items()}, steps)


def serve_side(args, dev: torch.device) -> None:
    """--child NAME (what --processes starts): build that side alone, take two warm-up steps, say "ready", then
    for each line n on stdin take n steps and print their times (seconds) on one line."""
    step = make_sides(args, dev, [args.child], say=lambda s: print(s, file=sys.stderr, flush=True))[args.child]
    step()
    step()
    print("ready", flush=True)
    for line in sys.stdin:
        print(" ".join(f"{t:.6f}" for t in timed(step, int(line), dev)), flush=True)


def time_in_processes(args, names: list[str]) -> dict[str, list[float]]:
    """--processes: each side in its own Python process (this script with --child, which warms up), holding only
    its own model; in_blocks asks each in turn."""
    argv = [a for a in sys.argv[1:] if a != "--processes"]
    kids = {name: subprocess.Popen([sys.executable, __file__, *argv, "--child", name], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True) for name in names}

    def ask(name: str, n: int) -> list[float]:
        kids[name].stdin.write(f"{n}\n")
        kids[name].stdin.flush()
        reply = kids[name].stdout.readline().split()
        if len(reply) != n:
            raise SystemExit(f"--processes: the {name} side stopped (its error is above)")
        return [float(t) for t in reply]

    try:
        for name, kid in kids.items():
            if kid.stdout.readline().strip() != "ready":
                raise SystemExit(f"--processes: the {name} side did not start (its error is above)")
        return in_blocks({name: (lambda n, name=name: ask(name, n)) for name in names}, args.steps)
    finally:
        for kid in kids.values():
            kid.stdin.close()
            kid.wait()


def report(args, cfg, times: dict[str, list[float]], dev: torch.device, hf_version: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    n, tokens = cfg.num_params(), args.batch * args.seq
    cuda = dev.type == "cuda"
    where = f"{torch.cuda.get_device_name(dev)}, bf16 autocast" if cuda else f"{torch.get_num_threads()} thread(s)"
    print(f"preset {args.preset} ({n['total'] / 1e6:.2f}M params, {n['activated'] / 1e6:.2f}M activated), batch "
          f"{args.batch} x {args.seq} tokens, {where}, torch {torch.__version__}, transformers {hf_version}")
    for k, v in med.items():
        print(f"  {k:<17} {tokens / v:10,.0f} tokens/s  (median step {1000 * v:7.1f} ms over {len(times[k])})")
    if "transformers" in med:
        print(f"ratio nanoseek / transformers: {med['transformers'] / med['nanoseek']:.2f}x training tokens/s")
        for k in ("nanoseek compiled", "nanoseek blocks"):
            if k in med:
                print(f"ratio {k} / transformers: {med['transformers'] / med[k]:.2f}x")
    if cuda or args.peak_tflops:
        report_mfu(cfg, args.seq, {k: tokens / v for k, v in med.items()}, dev, args.preset, args.peak_tflops)


def report_mfu(cfg, seq: int, tokens_per_s: dict[str, float], dev: torch.device, preset: str,
               peak_tflops: float = 0.0) -> None:
    """MFU per side: training FLOPs per token (the preset's MTP modules counted on the side that runs them) x
    tokens/s / the GPU's dense bf16 peak (or peak_tflops, when given)."""
    import nanoseek as ns
    from nanoseek import flops
    peak = peak_tflops * 1e12 or flops.peak_flops(dev)
    if peak is None:
        print(f"MFU: no bf16 peak listed for {torch.cuda.get_device_name(dev)!r} in nanoseek/flops.py")
        return
    for k, tps in tokens_per_s.items():
        per_token = flops.flops_per_token(ns.ModelConfig.preset(preset) if "MTP" in k else cfg, seq)
        print(f"MFU {k}: {100 * per_token * tps / peak:.1f}% ({per_token * tps / 1e12:.3g} TFLOP/s of "
              f"{peak / 1e12:.3g}; {per_token / 1e9:.3g} GFLOP per token)")


if __name__ == "__main__":
    main()
