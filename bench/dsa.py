"""Decode time per token vs context: one model with DeepSeek-V3.2's attention widths, dense MLA vs DSA, same run.

    .venv/bin/python bench/dsa.py [--contexts 1024,2048,4096,8192,16384,32768] [--steps 8] [--repeat 3]
    .venv/bin/python bench/dsa.py --contexts 16384 --profile     # torch profiler tables of both modes

The model keeps V3.2's published attention (128 heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head_dim 128;
lightning indexer of 64 heads x 128, index_topk 2048) with 2 layers, hidden 256, q_lora_rank 128, 4 small routed
experts and a 1,024-token vocabulary: it fits a small CPU, and a step is not dominated by weight reads (kv_b_proj,
16.8M parameters a layer at these widths, is still read whole by every step). Random weights, float32, decode_layout
as `nanoseek serve` loads a model.

One engine, one request, batch 1. The request's cache is filled synthetically: its blocks of the paged cache hold
random latents, rotary keys and indexer keys (unit scale, as the RMSNorm / LayerNorm outputs the model writes) for
its first N tokens, and the engine is told they are cached; prefilling 32k tokens through 128 heads on a CPU would
take longer than the whole benchmark. Then real `Engine.step()` calls decode from there: the engine's own decode
path, cache plan and sampling included. Dense = the same engine and weights with `engine.sparse = False` (every
decode query attends to all N + 1 tokens; the indexer key is still computed and cached). The two modes alternate
within each repetition (same cache contents, same load), each timing --steps steps after one untimed step, and the
context is rewound after each timing so every timing decodes at N; best of --repeat. The machine's load average
(os.getloadavg, 1 minute) is noted per repetition.

Then, once per context and mode, a pass with timers around the parts of the attention (not in the headline numbers,
the timers cost a little): the indexer's scoring (LightningIndexer.forward) and top-k, the cache reads (all indexer
keys; the selected latents, or all of them when dense) and the absorbed attention itself. With DSA the attention
reads index_topk latents whatever N: flat beyond index_topk; the indexer still reads every key (128 wide instead of
576), so a DSA step still grows with N, more slowly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

if "--no-thp" not in sys.argv:    # as the nanoseek command sets it (before torch allocates anything)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

import nanoseek as ns  # noqa: E402
import nanoseek.model.mla as mla_module  # noqa: E402
from nanoseek.infer.cache import PagedDSACache  # noqa: E402

SMALL = dict(num_hidden_layers=2, hidden_size=256, q_lora_rank=128, intermediate_size=512, moe_intermediate_size=128,
             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
             first_k_dense_replace=1, num_nextn_predict_layers=0, vocab_size=1024)
PARTS = ("indexer scoring", "top-k", "cache read: indexer keys", "cache read: latents", "attention")


def build(seed: int = 0):
    """V3.2's attention widths on a small trunk, random weights, in the layout `nanoseek serve` uses."""
    from nanoseek.model.layers import decode_layout
    cfg = ns.ModelConfig.preset("v3.2", **SMALL)
    torch.manual_seed(seed)
    model = ns.Transformer(cfg).eval()
    decode_layout(model)
    return model


def make_engine(model, max_context: int, slack: int) -> ns.Engine:
    """An engine whose pool holds one request of max_context + slack tokens, every slot random (unit scale)."""
    bs = 16
    max_seq_len = max_context + slack
    eng = ns.Engine(model, max_batch=1, max_seq_len=max_seq_len, block_size=bs,
                    num_blocks=math.ceil(max_seq_len / bs) + 2)
    g = torch.Generator().manual_seed(1)
    for name in eng.cache.names:
        for pool in getattr(eng.cache, name):
            pool.copy_(torch.randn(pool.shape, generator=g))
    return eng


def seed_request(eng: ns.Engine, n: int, gen: torch.Generator):
    """A running request whose first n tokens are in the cache (the engine's random blocks) and whose next token
    is the last of its output: the next step() decodes it at position n. Returns the request."""
    V = eng.cfg.vocab_size
    prompt = torch.randint(3, V, (n,), generator=gen).tolist()
    rid = eng.add_request(prompt, ns.SamplingParams(temperature=0, ignore_eos=True, max_tokens=eng.max_seq_len))
    req = eng.requests[rid]
    eng.waiting.remove(req)
    eng._ensure_blocks(req, n)
    req.num_cached = n
    req.num_registered = n // eng.block_size     # synthetic blocks: never offered to the prefix cache
    req.output.append(int(torch.randint(3, V, (1,), generator=gen)))
    eng.running.append(req)
    return req


def rewind(req, n: int) -> None:
    """Back to n cached tokens and one output token (the slots past n are simply written again)."""
    req.num_cached = n
    del req.output[1:]


def time_steps(eng: ns.Engine, req, n: int, steps: int) -> float:
    """Seconds per decode step at context n: one untimed step, then the mean of `steps` timed ones."""
    rewind(req, n)
    eng.step()
    rewind(req, n)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = (time.perf_counter() - t0) / steps
    rewind(req, n)
    return dt


class PartTimers:
    """Wall time of the attention's parts, by wrapping them (the model's layers, DSA's cache, mla's top_k)."""

    def __init__(self, model, eng):
        self.total = defaultdict(float)
        self._undo = []
        for layer in model.layers:
            attn = layer.self_attn
            self._wrap(attn, "absorbed_attention", "attention")
            self._wrap(attn.indexer, "forward", "indexer scoring")
        self._wrap(mla_module, "top_k", "top-k")
        self._wrap(eng.cache, "update_indexer", "cache read: indexer keys")
        self._wrap(eng.cache, "update_selected", "cache read: latents")
        self._wrap(eng.cache, "update", "cache read: latents")

    def _wrap(self, obj, attr, part):
        real = getattr(obj, attr)
        had = attr in vars(obj)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = real(*a, **kw)
            self.total[part] += time.perf_counter() - t0
            return out

        setattr(obj, attr, timed)
        self._undo.append((obj, attr, real if had else None))

    def remove(self):
        for obj, attr, real in reversed(self._undo):
            if real is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, real)


def parts(model, eng, req, n: int, steps: int) -> dict[str, float]:
    """Seconds per decode step of each part of the attention (both layers), and of the whole step, timers on."""
    timers = PartTimers(model, eng)
    try:
        rewind(req, n)
        eng.step()
        rewind(req, n)
        timers.total.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        step = (time.perf_counter() - t0) / steps
        rewind(req, n)
    finally:
        timers.remove()
    return {"step": step, **{p: timers.total[p] / steps for p in PARTS}}


def measure(model, eng, n: int, args, gen) -> dict:
    """One context: --repeat rounds, each timing dense then DSA, then both again with the part timers. Keeps the
    best (smallest) step time of each mode, and the part timers' pass with the fastest step."""
    req = seed_request(eng, n, gen)
    best = {False: math.inf, True: math.inf}
    split = {False: {}, True: {}}
    loads = []
    for _ in range(args.repeat):
        loads.append(load1())
        for sparse in (False, True):
            eng.sparse = sparse
            best[sparse] = min(best[sparse], time_steps(eng, req, n, args.steps))
        for sparse in (False, True):
            eng.sparse = sparse
            p = parts(model, eng, req, n, args.steps)
            if p["step"] < split[sparse].get("step", math.inf):
                split[sparse] = p
    loads.append(load1())
    if args.profile and n == max(args.contexts):
        profile(eng, req, n, args.steps)
    eng.abort(req.id)
    eng.step()                                   # emits the abort's final delta; the blocks are free again
    return dict(context=n, dense=best[False], dsa=best[True], loads=loads, parts=split)


def load1() -> float:
    return os.getloadavg()[0]


def profile(eng, req, n: int, steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for sparse in (False, True):
        eng.sparse = sparse
        rewind(req, n)
        eng.step()
        rewind(req, n)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                eng.step()
        rewind(req, n)
        print(f"\nprofile: {'DSA' if sparse else 'dense'} decode at context {n}, {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768",
                    help="cached tokens before the decode step (comma-separated)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    ap.add_argument("--repeat", type=int, default=3, help="best of N alternated timings (the machine is shared)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--plot", default="docs/bench-dsa.png", help="PNG of time per token vs context ('' for none)")
    ap.add_argument("--profile", action="store_true", help="torch profiler tables at the largest context")
    ap.add_argument("--no-thp", action="store_true", help="no transparent huge pages for torch's CPU tensors")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.contexts = [int(x) for x in args.contexts.split(",")]

    model = build()
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    eng = make_engine(model, max(args.contexts), slack=args.steps + 16)
    assert isinstance(eng.cache, PagedDSACache)
    print(f"model: v3.2 attention widths (heads={cfg.num_attention_heads} kv_lora_rank={cfg.kv_lora_rank} "
          f"qk_nope={cfg.qk_nope_head_dim} qk_rope={cfg.qk_rope_head_dim} v={cfg.v_head_dim}; indexer "
          f"{cfg.index_n_heads}x{cfg.index_head_dim}, index_topk={cfg.index_topk}), layers={cfg.num_hidden_layers} "
          f"hidden={cfg.hidden_size} q_lora_rank={cfg.q_lora_rank} params={n_params / 1e6:.1f}M; "
          f"cache {eng.kv_bytes_per_token} B/token; threads={torch.get_num_threads()} torch={torch.__version__} "
          f"cpus={os.cpu_count()} load at start={load1():.2f}", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'context':>7} {'dense ms/token':>15} {'DSA ms/token':>13} {'dense/DSA':>10}   load per repetition")
    for n in args.contexts:
        r = measure(model, eng, n, args, gen)
        rows.append(r)
        print(f"{n:>7} {1e3 * r['dense']:>15.2f} {1e3 * r['dsa']:>13.2f} {r['dense'] / r['dsa']:>9.2f}x   "
              f"{' '.join(f'{x:.1f}' for x in r['loads'])}", flush=True)
    print_parts(rows)
    if args.plot:
        plot(rows, cfg, Path(args.plot))
        print(f"plot: {args.plot}")
    return rows


def print_parts(rows) -> None:
    print("\nwhere a decode step goes, ms per token (both layers; the fastest pass with timers on; rest = the step "
          "outside the timed parts: weights, MoE, norms, plan, sampling):")
    print(f"{'context':>7} {'mode':>5} {'step':>8} " + " ".join(f"{p:>{max(9, len(p))}}" for p in PARTS) + "  rest")
    for r in rows:
        for sparse in (False, True):
            p = r["parts"][sparse]
            rest = p["step"] - sum(p[k] for k in PARTS)
            print(f"{r['context']:>7} {'DSA' if sparse else 'dense':>5} {1e3 * p['step']:>8.2f} "
                  + " ".join(f"{1e3 * p[k]:>{max(9, len(k))}.2f}" for k in PARTS) + f"  {1e3 * rest:.2f}")


def plot(rows, cfg, path: Path) -> None:
    """Left: ms per decode token, dense and DSA, with their ratio. Right: the attention's parts of a DSA step (the
    attention over the selected latents stays flat beyond index_topk; the indexer grows) and dense attention."""
    from matplotlib.ticker import FuncFormatter

    from nanoseek.plots import _pyplot
    plt = _pyplot()
    ctx = [r["context"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.4))
    a.plot(ctx, [1e3 * r["dense"] for r in rows], "o-", color="#e07b39", label="dense MLA (engine.sparse = False)")
    a.plot(ctx, [1e3 * r["dsa"] for r in rows], "o-", color="#4d6bfe", label="DSA")
    for r in rows:
        a.annotate(f"{r['dense'] / r['dsa']:.1f}x", (r["context"], 1e3 * r["dense"]), textcoords="offset points",
                   xytext=(0, 7), ha="center", fontsize=8)
    a.set_title("decode time per token (batch 1, Engine.step)")
    dense_attn = [1e3 * r["parts"][False]["attention"] for r in rows]
    b.plot(ctx, dense_attn, "o--", color="#e07b39", label="dense: attention over all tokens")
    for part, color in (("attention", "#4d6bfe"), ("indexer scoring", "#2a9d8f"), ("top-k", "#8d99ae"),
                        ("cache read: indexer keys", "#b5838d"), ("cache read: latents", "#6d597a")):
        label = "DSA: attention over the selected" if part == "attention" else f"DSA: {part}"
        ys = [1e3 * r["parts"][True][part] or math.nan for r in rows]     # 0: not run (context <= index_topk)
        b.plot(ctx, ys, "o-", color=color, label=label, ms=4)
    b.set_title("the attention's parts per token (both layers)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ctx, [f"{c // 1024}k" if c >= 1024 else str(c) for c in ctx])
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):     # label 1, 2, 5 x 10^k
            axis(FuncFormatter(lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (1, 2, 5)
                               else ""))
        ax.set_xlabel("context (cached tokens)")
        ax.set_ylabel("ms per token")
        ax.axvline(cfg.index_topk, color="grey", lw=0.8, ls=":")
        ax.text(cfg.index_topk, 0.02, " index_topk", transform=ax.get_xaxis_transform(), fontsize=8, color="grey")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"DeepSeek Sparse Attention vs dense MLA: V3.2's attention widths ({cfg.num_attention_heads} heads, "
                 f"latent {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}, indexer {cfg.index_n_heads}x{cfg.index_head_dim},"
                 f" top {cfg.index_topk}), {cfg.num_hidden_layers} layers, float32, CPU", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
