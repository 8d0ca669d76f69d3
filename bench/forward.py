"""Forward+backward throughput of nanoseek's Transformer vs transformers' DeepseekV3ForCausalLM, same weights.

    .venv/bin/python bench/forward.py                  # the `cpu` preset shape and a bigger one
    .venv/bin/python bench/forward.py --shapes cpu --rounds 7 --threads 1

One training step = zero grads, forward, next-token cross-entropy, backward (no optimizer: it is the same for
both). Our random model is saved with `ns.save` and loaded by `transformers.AutoModelForCausalLM`, so both hold
the same weights; the logits are compared first (the ratio means nothing if the models differ). transformers
runs with its defaults (SDPA attention, grouped_mm experts). The two models alternate round by round and each
reports its median, so load from other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import nanoseek as ns

# name -> (ModelConfig.preset name, overrides, batch, seq)
SHAPES = {
    "cpu": ("cpu", {}, 8, 256),
    # wider and deeper, more and finer experts: 6 layers, hidden 256, 16 experts top-4 in 4 groups
    "bigger": ("cpu", dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128,
                           n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                           vocab_size=4096), 4, 512),
}


def train_step(model, ids, targets, hf: bool):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits if hf else model(ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()


def bench_shape(name: str, rounds: int, steps: int) -> dict:
    import transformers

    preset, overrides, B, T = SHAPES[name]
    cfg = ns.ModelConfig.preset(preset, num_nextn_predict_layers=0, **overrides)  # transformers has no MTP
    torch.manual_seed(0)
    ours = ns.Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns.save(ours, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        a, b = ours.eval()(ids), hf.eval()(ids).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < 1e-4, f"models differ (relative error {err:.1e}): the benchmark would compare different things"
    ours.train()
    hf.train()
    times = {"nanoseek": [], "transformers": []}
    runs = {"nanoseek": lambda: train_step(ours, ids, targets, False),
            "transformers": lambda: train_step(hf, ids, targets, True)}
    for f in runs.values():  # warm-up: allocator, kernels, lazy init
        f()
    for _ in range(rounds):
        for key, f in runs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[key].append((time.perf_counter() - t0) / steps)
    n = cfg.num_params()
    tok = {k: B * T / statistics.median(v) for k, v in times.items()}
    return dict(name=name, B=B, T=T, params=n["total"], active=n["activated"], err=err, ours=tok["nanoseek"],
                hf=tok["transformers"], ratio=tok["nanoseek"] / tok["transformers"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    p.add_argument("--steps", type=int, default=2, help="training steps per round")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice). On a shared, oversubscribed machine use 1: "
                        "OpenMP threads spinning against other jobs slow both models ~10x and drown the comparison")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"float32, forward + cross-entropy + backward", flush=True)
    print(f"{'shape':8} {'params':>9} {'active':>9} {'B x T':>9} {'rel.err':>8} {'nanoseek tok/s':>15} "
          f"{'transformers tok/s':>19} {'ratio':>6}")
    for name in args.shapes:
        r = bench_shape(name, args.rounds, args.steps)
        print(f"{r['name']:8} {r['params'] / 1e6:8.2f}M {r['active'] / 1e6:8.2f}M {r['B']:>4} x {r['T']:<4}"
              f"{r['err']:8.1e} {r['ours']:15.0f} {r['hf']:19.0f} {r['ratio']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
