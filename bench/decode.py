"""Decode throughput: nanoseek.Engine vs transformers `generate` on the same weights, same run.

    .venv/bin/python bench/decode.py [--preset cpu] [--prompt-len 32] [--new-tokens 64] [--batches 1,16]

Both sides load one random-weight DeepSeek-V3-shaped checkpoint (written by transformers, read by ns.load), run
greedy decoding in float32 with EOS ignored, and are timed twice per batch size: generating 1 token (prefill) and
`--new-tokens` tokens. Decode tokens/s = batch * (new_tokens - 1) / (time difference), so prefill is excluded.
Prints tokens/s for both and the ratio engine / transformers per batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch


def build(preset: str, folder: str, seed: int = 0):
    import transformers

    import nanoseek as ns
    cfg = ns.ModelConfig.preset(preset, num_nextn_predict_layers=0, initializer_range=0.1)
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf())).eval()
    hf.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ns.load(folder)
    return hf, ours


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings (the machine is shared)")
    ap.add_argument("--mtp", action="store_true", help="engine with MTP speculation (random MTP: low acceptance)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import nanoseek as ns
    with tempfile.TemporaryDirectory() as d:
        hf, model = build(args.preset, d)
    hf.generation_config.pad_token_id = 0
    eng_kw = dict(max_seq_len=args.prompt_len + args.new_tokens + 8, mtp=args.mtp or None)
    V = model.cfg.vocab_size
    print(f"preset={args.preset} prompt_len={args.prompt_len} new_tokens={args.new_tokens} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(3, V, (B, args.prompt_len), generator=g)
        engine = ns.Engine(model, max_batch=max(B, 1), **eng_kw)

        def run_engine(n):
            sp = ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            engine.reset_prefix_cache()          # no help from the previous repetition's prompt blocks
            return engine.generate(prompts.tolist(), sp)

        def run_hf(n):
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False)

        # the same tokens first (a correctness guard for the numbers below)
        a = [c.token_ids for c in run_engine(8)]
        b = run_hf(8)[:, args.prompt_len:].tolist()
        same = sum(x == y for x, y in zip(a, b))
        n = args.new_tokens
        te = best_of(lambda: run_engine(n), args.repeat) - best_of(lambda: run_engine(1), args.repeat)
        th = best_of(lambda: run_hf(n), args.repeat) - best_of(lambda: run_hf(1), args.repeat)
        tps_e, tps_h = B * (n - 1) / te, B * (n - 1) / th
        rows.append((B, tps_e, tps_h))
        print(f"{B:>5} {tps_e:>13.1f} {tps_h:>19.1f} {tps_e / tps_h:>5.2f}x   (greedy tokens equal: {same}/{B})")
    return rows


if __name__ == "__main__":
    main()
