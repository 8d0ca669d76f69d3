"""The cross-entropy kernel for CPU training (nanoseek/model/cpu_cross_entropy.py) vs torch, as the losses call each.

    .venv/bin/python bench/cross_entropy.py [--shapes 1024x1024,...] [--threads 1]      # loss, forward + backward
    .venv/bin/python bench/cross_entropy.py --step [--compile]     # + a whole pretraining step, kernel on / off

A shape is N x V (rows of logits, vocabulary); the default is the `cpu` preset's step (8 x 128 tokens, 1,024 words),
then V3's vocabulary. Per shape: both sides' losses first agree with float64 (max error printed), then forward +
backward of the mean loss is timed, the sides alternating in rounds of --iters calls, median per side; then GRPO's
token log-probs and entropy (rl.token_logprobs at temperature 0.9) at --grpo's G x T x V against the log-softmax,
gather and entropy it ran before (the kernel's fallback).

--step: the `cpu` preset's pretraining step in one process (bench/cpu_attention.py's ab_step), the kernel switched
on and off between blocks of 3 steps; --compile: every block compiled.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cpu_attention import ab_step, alternate, start  # (bench/ is the script's folder)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1024x1024,4096x1024,512x129280")
    ap.add_argument("--grpo", default="32x64x1024", help="G x T x V of the token log-probs case ('' skips it)")
    ap.add_argument("--iters", type=int, default=5, help="calls per side per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", action="store_true", help="also A/B a whole pretraining step (cpu preset)")
    ap.add_argument("--compile", action="store_true", help="--step with every block compiled")
    return ap.parse_args(argv)


_built: dict = {}   # the kernel's state once built (main), restored when switched back on


def use_kernel(on: bool) -> None:
    """Switch the cross-entropy kernel on or off (off: its callers take torch's path, as where it does not run)."""
    from nanoseek.model import cpu_cross_entropy
    cpu_cross_entropy._state.clear()
    cpu_cross_entropy._state.update(_built if on else {"error": "switched off by the bench"})


def loss(args, shape: str) -> None:
    from nanoseek.model import cpu_cross_entropy
    N, V = (int(x) for x in shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 3).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    sides = {"torch": F.cross_entropy, "kernel": cpu_cross_entropy.cross_entropy}
    ref = F.cross_entropy(x.double(), t)
    err = {n: abs(f(x, t).item() - ref.item()) for n, f in sides.items()}
    med = alternate(args, {n: (lambda f=f: torch.autograd.grad(f(x, t), x)) for n, f in sides.items()})
    print(f"{shape:>12}: torch {1e3 * med['torch']:7.2f} ms  kernel {1e3 * med['kernel']:7.2f} ms  speed-up "
          f"{med['torch'] / med['kernel']:.2f}x   loss error vs float64: torch {err['torch']:.1e}, kernel "
          f"{err['kernel']:.1e}")


def logprobs(args) -> None:
    from nanoseek import rl
    G, T, V = (int(x) for x in args.grpo.split("x"))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(G, T, V, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, V, (G, T), generator=g)
    w = torch.randn(G, T, generator=g)

    def call(kernel: bool):
        use_kernel(kernel)
        logp, _ = rl.token_logprobs(x, tokens, 0.9)
        torch.autograd.grad((logp * w).sum(), x)

    med = alternate(args, {"log-softmax": lambda: call(False), "kernel": lambda: call(True)})
    use_kernel(True)
    print(f"token log-probs + entropy {args.grpo}: log-softmax, gather {1e3 * med['log-softmax']:7.2f} ms  kernel "
          f"{1e3 * med['kernel']:7.2f} ms  speed-up {med['log-softmax'] / med['kernel']:.2f}x")


def step(args) -> None:
    ab_step(args, "kernel", {"torch": lambda: use_kernel(False), "kernel": lambda: use_kernel(True)})


def main(argv=None) -> None:
    args = parse_args(argv)
    from nanoseek.model import cpu_cross_entropy
    start(args, cpu_cross_entropy)
    _built.update(cpu_cross_entropy._state)
    for shape in filter(None, args.shapes.split(",")):
        loss(args, shape)
    if args.grpo:
        logprobs(args)
    if args.step:
        step(args)


if __name__ == "__main__":
    main()
