"""FlashMLA (nanoseek/model/flash_mla.py, one Triton kernel) vs the torch path it replaces, per decode call.

    python3 bench/flash_mla.py [--batches 1,16,64] [--contexts 1024,4096] [--dtype bfloat16]      # on a GPU
    TRITON_INTERPRET=1 .venv/bin/python bench/flash_mla.py --tiny     # a dry run on the CPU (numbers meaningless)

One call is what one MLA layer runs for a decode step of B sequences of `context` tokens in the paged latent cache
(V3's widths by default: 128 heads, kv_lora_rank 512, rope 64, 16-token blocks scattered over the pool as a long-
running engine leaves them). Both sides write the step's latents into the cache and absorb the query by W_UK; then
- torch path: PagedLatentCache.update gathers each row's latents into a padded (B, S, 576) copy and
  MLA.latent_attention runs scores, softmax and the weighted sum as separate ops (what the engine runs without
  the kernel);
- kernel: PagedLatentCache.update_paged hands over the pools and block table and flash_mla() reads the blocks in
  place with an online softmax.
Each cell first checks the two outputs agree (relative error printed), then times --iters calls per side after a
warm-up, synchronized on CUDA, best of --repeat. "cache GB/s" is the latent cache's bytes (B x context x 576
elements) over the kernel's time: its fraction of the GPU's memory bandwidth is how close the kernel is to the
bound of a decode step's attention.

The kernel runs on CUDA; on the CPU only under Triton's interpreter (TRITON_INTERPRET=1, numpy, each program in
turn: slow, only --tiny shapes, float32 since the interpreter misreads bfloat16 dot operands), as a dry run of the
script itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

TINY = dict(heads=16, rank=64, rope=16, batches="1,2", contexts="32,64", iters=2, repeat=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="cache and query dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="1024,4096", help="tokens in the cache per row (comma-separated)")
    ap.add_argument("--heads", type=int, default=128, help="attention heads (V3: 128)")
    ap.add_argument("--rank", type=int, default=512, help="kv_lora_rank (V3: 512)")
    ap.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim (V3: 64)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per cache block (the engine's default)")
    ap.add_argument("--iters", type=int, default=20, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=5, help="best of N timings per side")
    ap.add_argument("--tiny", action="store_true", help="dry-run sizes: " + ", ".join(f"{k} {v}" for k, v in
                                                                                      TINY.items()))
    args = ap.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def refusal(args) -> str | None:
    """Why this cannot run here, or None."""
    from nanoseek.model import flash_mla
    if not flash_mla.available():
        return "triton is not installed (the kernel's language; it ships with torch's CUDA builds)"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA GPU here"
    if args.device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return ("the kernel runs on a GPU; on the CPU only under Triton's interpreter: "
                    "TRITON_INTERPRET=1 python bench/flash_mla.py --tiny (a dry run, numbers meaningless)")
        if not args.tiny:
            return "under the interpreter only --tiny sizes finish in reasonable time"
        if args.dtype != torch.float32:
            return "the interpreter misreads bfloat16 dot operands: --dtype float32 on the CPU"
    return None


def make_layer(args):
    """One MLA layer at the bench's attention widths (the hidden size does not enter the timed part)."""
    import nanoseek as ns
    from nanoseek.model.mla import MLA
    cfg = ns.ModelConfig.preset("tiny", num_attention_heads=args.heads, kv_lora_rank=args.rank,
                                qk_rope_head_dim=args.rope, qk_nope_head_dim=128 if args.rank >= 128 else 16,
                                v_head_dim=128 if args.rank >= 128 else 16, num_hidden_layers=1)
    torch.manual_seed(0)
    with torch.device(args.device):
        mla = MLA(cfg).eval()
    return cfg, mla.to(args.dtype)


def make_step(cfg, B: int, context: int, args):
    """A one-layer paged cache whose blocks hold random latents, with B rows of `context` tokens each on shuffled
    blocks, planned for one decode token per row; and that step's inputs."""
    from nanoseek.infer.cache import PagedLatentCache
    bs, dev = args.block_size, args.device
    per_row = -(-context // bs)
    cache = PagedLatentCache(cfg, 1, num_blocks=B * per_row + 1, block_size=bs, dtype=args.dtype, device=dev)
    for pool in (cache.c_kv[0], cache.k_pe[0]):
        pool.normal_()
    blocks = (torch.randperm(B * per_row) + 1).view(B, per_row).tolist()     # block 0 is the scratch block
    cache.plan(blocks, [context - 1] * B, [1] * B)
    H, g = cfg.num_attention_heads, torch.Generator(device=dev).manual_seed(B * 7 + context)
    step = dict(c_kv=torch.randn(B, 1, cfg.kv_lora_rank, device=dev, generator=g),
                k_pe=torch.randn(B, 1, cfg.qk_rope_head_dim, device=dev, generator=g),
                q_nope=torch.randn(B, 1, H, cfg.qk_nope_head_dim, device=dev, generator=g),
                q_pe=torch.randn(B, 1, H, cfg.qk_rope_head_dim, device=dev, generator=g))
    return cache, {k: v.to(args.dtype) for k, v in step.items()}


def best_ms(fn, args) -> float:
    """Milliseconds per call: best of --repeat timings of --iters calls, after warm-up calls (the kernel's compile,
    the allocator); synchronized on CUDA."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / args.iters)
    return 1e3 * best


def cell(cfg, mla, B: int, context: int, args) -> dict:
    from nanoseek.model import flash_mla
    cache, s = make_step(cfg, B, context, args)

    def torch_path():
        return mla.latent_attention(s["q_nope"], s["q_pe"], *cache.update(0, s["c_kv"], s["k_pe"]))

    def kernel():
        c_kv, k_pe, table, kv_len = cache.update_paged(0, s["c_kv"], s["k_pe"])
        return flash_mla.flash_mla(mla.absorb(s["q_nope"]), s["q_pe"], c_kv, k_pe, table, kv_len, mla.softmax_scale)

    with torch.no_grad():
        ref, got = torch_path().float(), kernel().float()
        err = ((got - ref).norm() / ref.norm()).item()
        ms_torch, ms_kernel = best_ms(torch_path, args), best_ms(kernel, args)
    nbytes = B * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * args.dtype.itemsize
    return dict(B=B, context=context, torch=ms_torch, kernel=ms_kernel, err=err, gbs=nbytes / ms_kernel / 1e6)


def main(argv=None) -> int:
    args = parse_args(argv)
    why = refusal(args)
    if why:
        print(f"bench/flash_mla.py: skipped: {why}", file=sys.stderr)
        return 2
    import triton
    cfg, mla = make_layer(args)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU under TRITON_INTERPRET=1 (dry run)"
    print(f"FlashMLA kernel vs torch path, one decode token per row: heads {args.heads}, kv_lora_rank {args.rank}, "
          f"rope {args.rope}, block {args.block_size}, {str(args.dtype).removeprefix('torch.')}, {where}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'batch':>5} {'context':>7} {'torch ms':>9} {'kernel ms':>10} {'speed-up':>8} {'cache GB/s':>10} "
          f"{'rel err':>8}")
    for context in [int(c) for c in args.contexts.split(",")]:
        for B in [int(b) for b in args.batches.split(",")]:
            r = cell(cfg, mla, B, context, args)
            print(f"{B:>5} {context:>7} {r['torch']:>9.3f} {r['kernel']:>10.3f} {r['torch'] / r['kernel']:>7.2f}x "
                  f"{r['gbs']:>10.1f} {r['err']:>8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
