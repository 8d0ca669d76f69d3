"""Training throughput: `nanoseek pretrain`'s step vs a transformers DeepseekV3ForCausalLM step, same run.

Both models hold the same weights (ours saved with ns.save, loaded by transformers), see the same batch and use
the same AdamW (same parameter groups), gradient clipping and float32 on CPU. Ours is `train_step` from
nanoseek/train/pretrain.py, exactly what `nanoseek pretrain` runs (including the V3 bias update); MTP is off for
the comparison because transformers has no MTP module (--mtp adds our MTP step as a second line, for reference).
Steps alternate in blocks so both sides see the same machine load; the median step time is reported.

    .venv/bin/python bench/train_step.py [--preset cpu] [--batch 8] [--seq 128] [--steps 12] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per side")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--mtp", action="store_true", help="also time our step with the MTP module and loss on")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import nanoseek as ns
    from nanoseek.train import optim
    from nanoseek.train.pretrain import train_step
    from nanoseek.train.runtime import Runtime, TrainModule

    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset(args.preset, num_nextn_predict_layers=0)
    ours = ns.Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ns.save(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    rt = Runtime()
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    tokens = args.batch * args.seq

    def adamw(model):
        return torch.optim.AdamW(optim.param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    module = TrainModule(ours)
    opt_ours, opt_hf = adamw(module), adamw(hf)
    optim.add_bias_update(opt_ours, optim.ExpertLoads(ours, rt), 0.001)   # V3's bias update, as pretrain runs it

    # same weights and batch -> same loss before any step (checks the comparison is like for like)
    with torch.no_grad():
        l_ours = ours.losses(x, y)["loss"].item()
        l_hf = F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1).float(), y.flatten()).item()
    print(f"loss before training: nanoseek {l_ours:.6f}  transformers {l_hf:.6f}")

    def step_ours(mod=module, opt=opt_ours, lam=0.0):
        train_step(mod, opt, [(x, y)], mtp_lambda=lam, grad_clip=1.0, rt=rt)

    def step_hf():
        logits = hf(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    sides = {"nanoseek": step_ours, "transformers": step_hf}
    if args.mtp:
        torch.manual_seed(0)
        m2 = ns.Transformer(ns.ModelConfig.preset(args.preset)).train()
        mod2 = TrainModule(m2)
        o2 = adamw(mod2)
        optim.add_bias_update(o2, optim.ExpertLoads(m2, rt), 0.001)
        sides["nanoseek+MTP"] = lambda: step_ours(mod2, o2, 0.3)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for fn in sides.values():  # warm-up (allocator, first-call overheads)
        fn()
        fn()
    block = 3
    for _ in range(max(1, args.steps // block)):
        for name, fn in sides.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = cfg.num_params()
    print(f"preset {args.preset} ({n['total'] / 1e6:.2f}M params, {n['activated'] / 1e6:.2f}M activated), batch "
          f"{args.batch} x {args.seq} tokens, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    for k, v in med.items():
        print(f"  {k:<14} {tokens / v:10,.0f} tokens/s  (median step {1000 * v:7.1f} ms over {len(times[k])})")
    print(f"ratio nanoseek / transformers: {med['transformers'] / med['nanoseek']:.2f}x training tokens/s")


if __name__ == "__main__":
    main()
