"""Batch-1 decode is a stream of matrix-vector products: how close does each way of writing one come to the
machine's read bandwidth? Same run, one thread, float32.

    .venv/bin/python bench/roofline.py [--shapes 151936x1536,8960x1536,1536x8960] [--repeat 7]
    .venv/bin/python bench/roofline.py --engine qwen-1.5b --layers 2 [--batches 1,16]

Bandwidth: best single-thread sum over a 1 GiB float32 array (far larger than the caches). For each weight shape
(out x in, the layout of nn.Linear) and each way of computing y = W x for one token, the best of --repeat calls,
as GB/s of weight read (bytes of W / time) and as a fraction of that bandwidth. The load average
(os.getloadavg, 1 minute) is printed with each shape, since the machine is shared.

`--engine PRESET`: the same question end to end. A random-weight model of the preset's widths (`--layers` of its
layers) decodes greedily in nanoseek.Engine, alternating its own nn.Linear layout with a trial layout in which
every projection wider out than in (the vocabulary head, the MLP's gate and up) computes x @ W^T from a contiguous
(in, out) copy of its weight; tokens/s of both, best of --repeat alternated runs, and the greedy tokens compared;
at batch 1 also the fraction of the bandwidth roofline (as in bench/decode.py --roofline).
The trial is applied from outside the model (bench code only), to size a change before making it.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def best_time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ways(W: torch.Tensor, x: torch.Tensor) -> dict:
    """The candidates, each a function computing W x for a (1, in) row x."""
    Wt = W.t().contiguous()                  # (in, out): the transposed layout
    v = x[0]
    return {
        "F.linear(x, W)  (nn.Linear, M=1 mm)": lambda: F.linear(x, W),
        "torch.mv(W, x)": lambda: torch.mv(W, v),
        "x @ W.T": lambda: x @ W.t(),
        "x @ Wt  (weight stored (in, out))": lambda: x @ Wt,
        "torch.mv(Wt.T, x)": lambda: torch.mv(Wt.t(), v),
    }


def wide_transposed(model) -> list:
    """(module, (in, out) copy of its weight) for every nn.Linear with out_features > in_features."""
    return [(m, m.weight.detach().t().contiguous()) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]


def use_layout(pairs, on: bool) -> None:
    for m, wt in pairs:
        if on:
            m.forward = (lambda x, wt=wt, b=m.bias: x @ wt if b is None else x @ wt + b)
        elif "forward" in m.__dict__:
            del m.forward                        # back to nn.Linear.forward


def engine_trial(args) -> None:
    from decode import bytes_per_token, engine_decode_time, read_bandwidth

    import nanoseek as ns
    cfg = ns.ModelConfig.preset(args.engine, **({"num_hidden_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    model = ns.Transformer(cfg).float().eval()
    pairs = wide_transposed(model)
    print(f"engine trial: {args.engine}, {cfg.num_hidden_layers} layers, {len(pairs)} projections in the (in, out) "
          f"layout; load {os.getloadavg()[0]:.2f}")
    n, P = args.new_tokens, 32
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(3, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B))
        engine = ns.Engine(model, max_batch=B, max_seq_len=P + n + 8)
        best, tokens, loads = {False: 0.0, True: 0.0}, {}, []
        for _ in range(args.repeat):
            for on in (False, True):
                use_layout(pairs, on)
                loads.append(os.getloadavg()[0])
                best[on] = max(best[on], B * (n - 1) / engine_decode_time(engine, prompts, n))
                tokens[on] = [c.token_ids for c in engine.generate(prompts.tolist(), ns.SamplingParams(
                    temperature=0, max_tokens=8, ignore_eos=True))]
        use_layout(pairs, False)
        if B == 1:
            bw, nbytes = read_bandwidth(repeat=3)[0], bytes_per_token(model, P + n / 2)
            roof = bw / nbytes
            print(f"  roofline: {nbytes / 1e6:.1f} MB/token, bandwidth {bw / 1e9:.2f} GB/s (load "
                  f"{os.getloadavg()[0]:.2f}) -> {roof:.2f} tok/s; nn.Linear {100 * best[False] / roof:.0f}%, "
                  f"(in, out) layout {100 * best[True] / roof:.0f}%")
        print(f"  batch {B:>2}: nn.Linear {best[False]:8.2f} tok/s, (in, out) layout {best[True]:8.2f} tok/s, "
              f"{best[True] / best[False]:.2f}x; same greedy tokens: {tokens[False] == tokens[True]}; "
              f"load {min(loads):.1f}-{max(loads):.1f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="151936x1536,8960x1536,1536x8960,1536x1536",
                    help="out x in weight shapes (default: Qwen2.5-1.5B's head, MLP up/gate, MLP down, q/o)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", default=None, help="a preset: compare the two layouts inside nanoseek.Engine")
    ap.add_argument("--layers", type=int, default=None, help="with --engine: keep this many layers")
    ap.add_argument("--batches", default="1,16", help="with --engine")
    ap.add_argument("--new-tokens", type=int, default=32, help="with --engine")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine:
        return engine_trial(args)
    big = torch.ones(2**28)                  # 1 GiB
    bw = max(big.numel() * 4 / best_time(big.sum, 1) for _ in range(args.repeat))
    del big
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); read bandwidth (sum over 1 GiB): "
          f"{bw / 1e9:.2f} GB/s; load {os.getloadavg()[0]:.2f}")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(s) for s in shape.split("x"))
        W = torch.randn(out_f, in_f)
        x = torch.randn(1, in_f)
        ref = F.linear(x, W)
        print(f"\nW {out_f} x {in_f} ({W.numel() * 4 / 1e6:.1f} MB), load {os.getloadavg()[0]:.2f}")
        for name, fn in ways(W, x).items():
            assert torch.allclose(fn().reshape(ref.shape), ref, rtol=1e-4, atol=1e-3), name
            t = best_time(fn, args.repeat)
            gbs = W.numel() * 4 / t
            print(f"  {name:<38} {1e3 * t:8.3f} ms  {gbs / 1e9:6.2f} GB/s  {100 * gbs / bw:5.1f}% of bandwidth")


if __name__ == "__main__":
    main()
