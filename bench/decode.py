"""Decode throughput: nanoseek.Engine vs transformers `generate` on the same weights, same run.

    .venv/bin/python bench/decode.py [--preset cpu] [--prompt-lens 32,512] [--new-tokens 64] [--batches 1,16]

Both sides load one random-weight DeepSeek-V3-shaped checkpoint (written by transformers, read by ns.load) and run
greedy decoding in float32 with EOS ignored, on the same prompts (same length within a batch, so transformers
needs no padding). Decode time runs from the first generated token (the end of prefill) to the last: transformers
is timed with a streamer whose put() marks each step, the engine by its steps (the first step is the prefill).
Decode tokens/s = batch * (new_tokens - 1) / decode time, best of --repeat interleaved runs; the ratio is
engine / transformers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch


def build(preset: str, folder: str, seed: int = 0, **overrides):
    import transformers

    import nanoseek as ns
    cfg = ns.ModelConfig.preset(preset, num_nextn_predict_layers=0, initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf())).eval()
    hf.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ns.load(folder)
    return hf, ours


class StepClock:
    """A transformers streamer that only notes when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


def hf_decode_time(hf, prompts, n):
    clock = StepClock()
    with torch.inference_mode():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, streamer=clock)
    return clock.times[-1] - clock.times[1]        # times[1]: the first generated token, after prefill


def engine_decode_time(engine, prompts, n):
    import nanoseek as ns
    engine.reset_prefix_cache()                    # no help from the previous repetition's prompt blocks
    sp = ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for p in prompts.tolist():
        engine.add_request(p, sp)
    engine.step()                                  # admission + prefill + first token
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--prompt-lens", default="32,512", help="prompt lengths (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--heads", type=int, default=None, help="override num_attention_heads (MLA's cache does not "
                    "grow with heads; transformers' does)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings (the machine is shared)")
    ap.add_argument("--mtp", action="store_true", help="engine with MTP speculation (random MTP: low acceptance)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import nanoseek as ns
    with tempfile.TemporaryDirectory() as d:
        hf, model = build(args.preset, d, **({"num_attention_heads": args.heads,
                                               "num_key_value_heads": args.heads} if args.heads else {}))
    hf.generation_config.pad_token_id = 0
    V = model.cfg.vocab_size
    lens = [int(x) for x in args.prompt_lens.split(",")]
    print(f"preset={args.preset} heads={model.cfg.num_attention_heads} new_tokens={args.new_tokens} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} engine kv bytes/token={ns.Engine(model, max_seq_len=64).kv_bytes_per_token} "
          f"transformers kv bytes/token={model.cfg.num_hidden_layers * model.cfg.mha_cache_elems_per_token * 4}")
    print(f"{'prompt':>6} {'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    rows = []
    for P in lens:
        for B in [int(b) for b in args.batches.split(",")]:
            g = torch.Generator().manual_seed(B * 1000 + P)
            prompts = torch.randint(3, V, (B, P), generator=g)
            engine = ns.Engine(model, max_batch=B, max_seq_len=P + args.new_tokens + 8, mtp=args.mtp or None)
            # the same tokens first (a guard on the numbers below)
            a = [c.token_ids for c in engine.generate(prompts.tolist(), ns.SamplingParams(
                temperature=0, max_tokens=8, ignore_eos=True))]
            with torch.inference_mode():
                b = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False)[:, P:].tolist()
            same = sum(x == y for x, y in zip(a, b))
            n = args.new_tokens
            te, th = [], []
            for _ in range(args.repeat):    # interleaved, so that load changes on the machine hit both sides
                te.append(engine_decode_time(engine, prompts, n))
                th.append(hf_decode_time(hf, prompts, n))
            te, th = min(te), min(th)
            tps_e, tps_h = B * (n - 1) / te, B * (n - 1) / th
            rows.append((P, B, tps_e, tps_h))
            print(f"{P:>6} {B:>5} {tps_e:>13.1f} {tps_h:>19.1f} {tps_e / tps_h:>5.2f}x   "
                  f"(greedy tokens equal: {same}/{B})", flush=True)
    return rows


if __name__ == "__main__":
    main()
