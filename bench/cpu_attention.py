"""The causal attention kernel for CPU training (nanoseek/model/cpu_attention.py) vs SDPA, as MLA calls each.

    .venv/bin/python bench/cpu_attention.py [--shapes 8x128x4x48x32,...] [--threads 1]     # one layer, fwd + bwd
    .venv/bin/python bench/cpu_attention.py --step [--compile]        # + a whole pretraining step, kernel on / off

A shape is B x T x H x d x dv (batch, tokens, heads, query/key head size, value head size; the default is the `cpu`
preset's layer at bench/train_step.py's batch, then V2-Lite's head sizes), causal; B x T x H x d x dv x P adds a
shared prompt prefix of P keys before each row's own T (GRPO's training forward, rl.SharedPrefix: the first P - 4
prefix columns visible, then causal), run under that boolean mask. Per shape: both sides first agree with
float64 attention (max error printed), then forward + backward of one layer is timed, the sides alternating in
rounds of --iters calls, median per side. SDPA's side is what MLA.full_attention runs without the kernel: the
value head zero-padded to the query's (its flash kernel wants one head size), heads moved to dim 1 and back.
"GFLOP/s" counts the causal half of the five products (forward q k^T, p v; backward dP, dQ, dK, dV, and the kernel's
recomputed q k^T not counted) over the side's time.

--step: the `cpu` preset's pretraining step (nanoseek.train.pretrain.train_step, batch 8 x 128, MTP off, as
bench/train_step.py), one model, the kernel switched on and off (cpu_attention.MAX_T) between blocks of 3 steps,
median of each; --compile: every block compiled (each switch state is its own cached graph).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x128x4x48x32,1x512x16x192x128,32x64x4x48x32x32")
    ap.add_argument("--iters", type=int, default=5, help="calls per side per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", action="store_true", help="also A/B a whole pretraining step (cpu preset)")
    ap.add_argument("--compile", action="store_true", help="--step with every block compiled")
    return ap.parse_args(argv)


def sdpa(q, k, v, scale, mask=None):
    """MLA.full_attention's SDPA call: value zero-padded to the query's head size."""
    d, dv = q.shape[-1], v.shape[-1]
    v = F.pad(v, (0, d - dv)) if dv < d else v
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None, scale=scale)
    return out.transpose(1, 2)[..., :dv]


def float64(q, k, v, scale, mask=None):
    from nanoseek.model import mla
    from nanoseek.model.dsa import causal_visible
    mask = causal_visible(q.shape[1], k.shape[1], q.device) if mask is None else mask
    return mla.explicit_attention(q.double(), k.double(), v.double(), mask, scale)


def alternate(args, sides: dict) -> dict:
    """sides: name -> a call to time; after one warm-up call each, the sides in turn, --iters calls a round for
    --rounds rounds; the median per side."""
    times = {n: [] for n in sides}
    for f in sides.values():
        f()
    for _ in range(args.rounds):
        for n, f in sides.items():
            for _ in range(args.iters):
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def start(args, kernel) -> None:
    """Threads as asked, the kernel module's extension built (or exit saying why not), the header line."""
    torch.set_num_threads(args.threads)
    if not kernel.load():
        raise SystemExit(f"the kernel does not run here: {kernel._state.get('error')}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32")


def layer(args, shape: str) -> None:
    from nanoseek.model import cpu_attention
    B, T, H, d, dv, *prefix = (int(x) for x in shape.split("x"))
    P = prefix[0] if prefix else 0
    mask = None
    if P:                                                                   # [prompt (P - 4 visible) ; own causal]
        mask = torch.cat([torch.arange(P).expand(T, P) < P - 4, torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, d, generator=g, requires_grad=True)
    k = torch.randn(B, P + T, H, d, generator=g, requires_grad=True)
    kv = torch.randn(B, P + T, H, d + dv, generator=g, requires_grad=True)   # MLA's value: a view of kv_b_proj's output
    v, grad, scale = kv[..., d:], torch.randn(B, T, H, dv, generator=g), d ** -0.5
    sides = {"SDPA": sdpa, "kernel": cpu_attention.attention}
    ref = float64(q, k, v, scale, mask)
    err = {n: (f(q, k, v, scale, mask).double() - ref).abs().max().item() for n, f in sides.items()}

    med = alternate(args, {n: (lambda f=f: torch.autograd.grad(f(q, k, v, scale, mask), (q, k, kv), grad))
                           for n, f in sides.items()})
    pairs = T * (T + 1) / 2 + T * max(P - 4, 0)                            # (query, visible key) pairs per head
    flops = 2 * B * H * pairs * (3 * d + 3 * dv)                             # fwd: d + dv; bwd: dv + 2d + dv
    print(f"{shape:>18}: SDPA {1e3 * med['SDPA']:7.2f} ms ({flops / med['SDPA'] / 1e9:5.1f} GFLOP/s)  kernel "
          f"{1e3 * med['kernel']:7.2f} ms ({flops / med['kernel'] / 1e9:5.1f} GFLOP/s)  speed-up "
          f"{med['SDPA'] / med['kernel']:.2f}x   max error vs float64: SDPA {err['SDPA']:.1e}, kernel {err['kernel']:.1e}")


def step(args) -> None:
    from nanoseek.model import cpu_attention
    max_t = cpu_attention.MAX_T
    ab_step(args, "kernel", {"SDPA": lambda: setattr(cpu_attention, "MAX_T", 0),
                             "kernel": lambda: setattr(cpu_attention, "MAX_T", max_t)})


def ab_step(args, on: str, switch: dict) -> None:
    """The `cpu` preset's pretraining step in one process, switch[name]() called before each block of 3 steps of
    that side (the sides in turn, round 0 a warm-up that also compiles); medians, and the ratio to side `on`."""
    import nanoseek as ns
    from nanoseek.infer.compiled import compile_blocks
    from nanoseek.train import optim
    from nanoseek.train.pretrain import train_step
    from nanoseek.train.runtime import Runtime, TrainModule
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("cpu", num_nextn_predict_layers=0)
    model = ns.Transformer(cfg).train()
    if args.compile:
        print(compile_blocks(model, torch.device("cpu")))
    rt = Runtime(device=torch.device("cpu"))
    rows = torch.randint(0, cfg.vocab_size, (8, 129), generator=torch.Generator().manual_seed(1))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    module = TrainModule(model)
    opt = optim.fused_adamw(optim.param_groups(module, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    optim.add_bias_update(opt, optim.ExpertLoads(model, rt), 0.001)
    times = {n: [] for n in switch}
    for rnd in range(args.rounds + 1):
        for n, turn in switch.items():
            turn()
            for _ in range(3):
                t0 = time.perf_counter()
                train_step(module, opt, [(x, y)], mtp_lambda=0.0, grad_clip=1.0, rt=rt)
                if rnd:                                                 # round 0: warm-up (and compiles)
                    times[n].append(time.perf_counter() - t0)
    switch[on]()
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"pretraining step ({'compiled' if args.compile else 'eager'}, cpu preset, 8 x 128): " + ", ".join(
        f"{n} {1e3 * m:.1f} ms" for n, m in med.items()) + ", " + ", ".join(
        f"{on} {m / med[on]:.2f}x faster than {n}" for n, m in med.items() if n != on) +
        f" ({len(times[on])} steps each)")


def main(argv=None) -> None:
    args = parse_args(argv)
    from nanoseek.model import cpu_attention
    start(args, cpu_attention)
    for shape in args.shapes.split(","):
        layer(args, shape)
    if args.step:
        step(args)


if __name__ == "__main__":
    main()
