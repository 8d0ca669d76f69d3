"""SFT step time: the full attention path with a per-document mask vs the absorbed path it replaced, same run.

    .venv/bin/python bench/sft_step.py                       # the `cpu` preset shape and a bigger one, 1 thread
    .venv/bin/python bench/sft_step.py --shapes cpu --rounds 7

One SFT step = zero grads, losses, (loss + 0.3 mtp_loss + balance_loss).backward(), grad clipping, AdamW, on packed
rows: documents of 16-96 tokens laid end to end with positions restarting at 0, the rest of each row padding.
  before: what nanoseek/train/sft.py did until issue 8: every layer on MLA's absorbed (decode) path through a
          cache-protocol stand-in (`SegmentMask`, re-created below) that stores nothing and returns the
          block-diagonal causal mask; the MTP loss the same way.
  after:  `model.losses(ids, targets, positions=, documents=)`: the full path, SDPA with the boolean document mask.
Both sides hold the same weights (two copies, each with its own AdamW) and see the same batches; their losses are
compared first. Steps alternate in blocks so both sides see the same machine load; medians are reported.
Then SDPA alone at the shape's attention size: which kernel a boolean mask gets on this machine, and its time
against is_causal, an additive float mask and the unfused math kernel.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import nanoseek as ns

IGNORE, MTP_LAMBDA = -100, 0.3
# name -> (ModelConfig.preset name, overrides, packed rows, row length): `cpu` is the speedrun's SFT (16 x 256)
SHAPES = {
    "cpu": ("cpu", {}, 16, 256),
    # bench/forward.py's bigger shape: 6 layers, hidden 256, 8 heads, 16 experts top-4, longer rows
    "bigger": ("cpu", dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128,
                           n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                           vocab_size=4096), 4, 512),
}


def packed_batch(vocab: int, B: int, T: int, seed: int):
    """B rows of T tokens packed with documents of 16-96 tokens -> ids, targets (the first third of each document
    untrained, as a prompt is), positions, documents (-1 = padding), each (B, T)."""
    rng = random.Random(seed)
    ids = torch.zeros(B, T, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1)
    for r in range(B):
        col, s = 0, 0
        while True:
            L = rng.randint(16, 96)
            if col + L > T:
                break
            x = torch.tensor([rng.randrange(vocab) for _ in range(L)])
            ids[r, col:col + L], pos[r, col:col + L], seg[r, col:col + L] = x, torch.arange(L), s
            tgt[r, col + L // 3:col + L - 1] = x[L // 3 + 1:]
            col, s = col + L, s + 1
    return ids, tgt, pos, seg


class SegmentMask:
    """The old SFT route (nanoseek/train/sft.py before issue 8): a cache-protocol stand-in (see MLA.forward) that
    stores nothing and returns the block-diagonal causal mask, so attention runs on the absorbed path."""

    def __init__(self, segments: torch.Tensor):
        T = segments.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        self.mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]   # (B, 1, T, T)

    def update(self, layer, c_kv, k_pe):
        return c_kv, k_pe, self.mask


def absorbed_losses(model, ids, tgt, pos, seg) -> dict:
    """The old sft_losses: main loss and MTP depth 0 through SegmentMask (absorbed path)."""
    logits, h = model(ids, positions=pos, cache=SegmentMask(seg), return_hidden=True)
    V = logits.shape[-1]
    out = {"loss": F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=IGNORE)}
    T = ids.shape[1] - 1
    labels = tgt[:, 1:].masked_fill(seg[:, 1:] != seg[:, :-1], IGNORE)
    m_logits, _ = model.mtp_forward(h[:, :T], ids[:, 1:], positions=pos[:, :T], cache=SegmentMask(seg[:, :T]))
    out["mtp_loss"] = F.cross_entropy(m_logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE)
    out["balance_loss"] = torch.stack([m.balance_loss for m in model.moe_layers()]).sum()
    return out


def full_losses(model, ids, tgt, pos, seg) -> dict:
    return model.losses(ids, tgt, positions=pos, documents=seg, ignore_index=IGNORE)


def sft_step(model, opt, losses, batch) -> None:
    opt.zero_grad(set_to_none=True)
    out = losses(model, *batch)
    (out["loss"] + MTP_LAMBDA * out["mtp_loss"] + out["balance_loss"]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def bench_shape(name: str, rounds: int, steps: int) -> dict:
    preset, overrides, B, T = SHAPES[name]
    cfg = ns.ModelConfig.preset(preset, **overrides)
    torch.manual_seed(0)
    before = ns.Transformer(cfg).train()
    after = ns.Transformer(cfg).train()
    after.load_state_dict(before.state_dict())
    batches = [packed_batch(cfg.vocab_size, B, T, seed) for seed in range(steps)]
    with torch.no_grad():
        a, b = absorbed_losses(before, *batches[0]), full_losses(after, *batches[0])
    err = max(abs(a[k].item() - b[k].item()) / abs(a[k].item()) for k in ("loss", "mtp_loss"))
    assert err < 1e-5, f"the two paths give different losses (relative {err:.1e}): the timing would mean nothing"
    sides = {"before": (before, absorbed_losses), "after": (after, full_losses)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95)) for k, (m, _) in sides.items()}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for k, (m, f) in sides.items():  # warm-up: allocator, first-call overheads
        sft_step(m, opts[k], f, batches[0])
    for _ in range(rounds):
        for k, (m, f) in sides.items():
            for batch in batches:
                t0 = time.perf_counter()
                sft_step(m, opts[k], f, batch)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    real = int((batches[0][3] >= 0).sum())
    return dict(name=name, B=B, T=T, params=cfg.num_params(include_mtp=True)["total"], err=err, real=real,
                before=med["before"], after=med["after"], heads=cfg.num_attention_heads,
                d=max(cfg.qk_head_dim, cfg.v_head_dim), seg=batches[0][3])


def sdpa_kernels(B: int, H: int, T: int, d: int, seg: torch.Tensor, reps: int = 5) -> tuple[str, dict]:
    """SDPA forward+backward at one layer's attention size: the kernel a boolean mask is dispatched to, and the
    median time of each way to express the same attention."""
    from nanoseek.model import document_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=g, requires_grad=True) for _ in range(3))
    mask = document_mask(seg)                                                      # (B, 1, T, T) bool
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    kernel = SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask=mask)).name
    ways = {"is_causal (no documents)": (dict(is_causal=True), None),
            "boolean document mask": (dict(attn_mask=mask), None),
            "additive float mask": (dict(attn_mask=additive), None),
            "boolean mask, math kernel": (dict(attn_mask=mask), SDPBackend.MATH)}
    out = {}
    for name, (kw, backend) in ways.items():
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            if backend is None:
                y = F.scaled_dot_product_attention(q, k, v, **kw)
            else:
                with sdpa_kernel(backend):
                    y = F.scaled_dot_product_attention(q, k, v, **kw)
            y.sum().backward()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts[1:])
    return kernel, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median step is reported")
    p.add_argument("--steps", type=int, default=3, help="steps (distinct batches) per side and round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine spinning OpenMP threads drown the "
                        "comparison)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, SFT step = losses + backward "
          f"+ clip + AdamW; before = absorbed path + SegmentMask, after = full path + document mask", flush=True)
    print(f"{'shape':8} {'params':>8} {'rows x T':>9} {'real tok':>8} {'rel.err':>8} {'before ms':>10} "
          f"{'after ms':>9} {'speedup':>8}")
    for name in args.shapes:
        r = bench_shape(name, args.rounds, args.steps)
        print(f"{r['name']:8} {r['params'] / 1e6:7.2f}M {r['B']:>4} x {r['T']:<4}{r['real']:8} {r['err']:8.1e} "
              f"{1000 * r['before']:10.1f} {1000 * r['after']:9.1f} {r['before'] / r['after']:7.2f}x", flush=True)
        kernel, t = sdpa_kernels(r["B"], r["heads"], r["T"], r["d"], r["seg"])
        print(f"  SDPA alone, (B, H, T, d) = ({r['B']}, {r['heads']}, {r['T']}, {r['d']}), forward+backward; "
              f"a boolean mask dispatches to: {kernel}")
        for way, s in t.items():
            print(f"    {way:28} {1000 * s:8.2f} ms")


if __name__ == "__main__":
    main()
