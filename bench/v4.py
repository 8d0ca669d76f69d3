"""DeepSeek-V4 decode: nanoseek.Engine vs transformers DeepseekV4ForCausalLM.generate, same weights, same run;
and the KV cache one sequence holds vs context for V3, V3.2 and V4 (config.py cache_entries, info.cache_bytes).

    OMP_NUM_THREADS=1 .venv/bin/python bench/v4.py [--prompt-lens 256,1024] [--batches 1,8] [--new-tokens 32]
                                                   [--compile true]

The model is tiny-v4 widened (hidden 256, 8 heads of 64 over one shared key=value head, 16 RoPE dims, q_lora_rank
128, grouped output 2 x 64; layers sliding / CSA / HCA / CSA with V4's rates 4 and 128 and window 128; indexer 16
heads x 32, index_topk 64; 8 routed experts of 128, top 2, + 1 shared; hc_mult 2; vocabulary 1,024): at a 1,024-token
prompt a CSA layer holds 256 entries and a decode query reads its window and 64 of them. transformers builds it
from our config (cfg.to_hf()), its weights are drawn (matrices N(0, 1/fan_in), vectors N(0, 0.3), a random hash
table: far from greedy ties) and loaded into ours; ours runs in decode_layout, as `nanoseek serve` loads a model.

Three sides per (prompt length, batch), greedy, float32, EOS ignored, the same random prompts: the engine (eager);
the engine with CSA's gathered top-k turned off (model/v4.gather_selected -> False: every CSA step attends to all
entries under the selection mask, as before the gathered path); transformers' generate. --compile true adds a
fourth, the engine with its compiled decode pieces (Engine(compile=True), infer/compiled.py CompiledV4), run once
untimed first so that its compiling stays out of the timings. Decode time runs from the
step that gives every row its first token (the end of prefill) to the last step: decode tokens/s = batch x
(new_tokens - 1) / that time, best of --repeat interleaved repetitions (each notes the 1-minute load average).
Every repetition checks that the three sides' tokens are equal, row by row.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

SMALL = dict(vocab_size=1024, hidden_size=256, num_attention_heads=8, head_dim=64, qk_rope_head_dim=16,
             q_lora_rank=128, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, o_groups=2,
             o_lora_rank=64, sliding_window=128, index_n_heads=16, index_head_dim=32, index_topk=64,
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
             max_position_embeddings=4096)
SIDES = ("engine", "engine, masked CSA", "transformers", "engine, compiled")
CACHE_PRESETS = {"V3": "v3", "V3.2": "v3.2", "V4-Flash": "v4-flash", "V4-Pro": "v4-pro"}


def build(seed: int = 0):
    """(transformers' DeepseekV4ForCausalLM, our Transformer in decode_layout) with the same random weights."""
    import transformers

    import nanoseek as ns
    from nanoseek.model.layers import decode_layout
    torch.manual_seed(seed)
    cfg = ns.ModelConfig.preset("tiny-v4", **SMALL)
    kw = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**kw)).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.dim() < 2 else p.shape[-1] ** -0.5)
        for m in hf.modules():
            if hasattr(m, "tid2eid"):
                m.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts).argsort(-1)[:, :cfg.num_experts_per_tok])
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = ns.Transformer(cfg).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    decode_layout(ours)
    return hf, ours


class StepClock:
    """A transformers streamer that notes when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


def hf_run(hf, prompts: torch.Tensor, n: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of every row and the decode time (first generated token to the last)."""
    clock = StepClock()
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, streamer=clock)
    return out[:, prompts.shape[1]:].tolist(), clock.times[-1] - clock.times[1]


def engine_run(engine, prompts: torch.Tensor, n: int) -> tuple[list[list[int]], float]:
    """The same through Engine.step(): decode time from the step after which every row has a token."""
    import nanoseek as ns
    sp = ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts.tolist()]
    got, t0 = {i: [] for i in ids}, None
    while engine.has_unfinished():
        for d in engine.step():
            got[d.request_id] += d.token_ids
        if t0 is None and all(got.values()):
            t0 = time.perf_counter()
    return [got[i] for i in ids], time.perf_counter() - t0


@contextlib.contextmanager
def masked_csa():
    """Every CSA step attends to all compressed entries under the indexer's selection mask (no gathering)."""
    import nanoseek.model.v4 as v4
    real = v4.gather_selected
    v4.gather_selected = lambda T, S, k: False
    try:
        yield
    finally:
        v4.gather_selected = real


def measure(hf, model, P: int, B: int, args) -> dict:
    """One cell: --repeat interleaved repetitions of the sides; best decode tokens/s of each, rows whose tokens
    equal transformers' (per side, over all repetitions), the load average before each and at the end."""
    import nanoseek as ns
    g = torch.Generator().manual_seed(1000 * B + P)
    prompts = torch.randint(3, model.cfg.vocab_size, (B, P), generator=g)
    engines = {side: ns.Engine(model, max_batch=B, max_seq_len=P + args.new_tokens + 8,
                               compile=side == "engine, compiled") for side in sides(args) if side != "transformers"}
    if "engine, compiled" in engines:
        engine_run(engines["engine, compiled"], prompts, args.new_tokens)          # compiles (or reads the cache)
    best, equal, loads = dict.fromkeys(sides(args), 0.0), dict.fromkeys(engines, 0), []
    for _ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        ref, t = hf_run(hf, prompts, args.new_tokens)
        runs = {"transformers": t}
        for side, engine in engines.items():
            with masked_csa() if side == "engine, masked CSA" else contextlib.nullcontext():
                tokens, runs[side] = engine_run(engine, prompts, args.new_tokens)
            equal[side] += sum(a == b for a, b in zip(tokens, ref))
        for side, t in runs.items():
            best[side] = max(best[side], B * (args.new_tokens - 1) / t)
    loads.append(os.getloadavg()[0])
    return dict(prompt=P, batch=B, tps=best, equal=equal, rows=B * args.repeat, loads=loads)


def sides(args) -> tuple[str, ...]:
    """The sides this run measures (the compiled engine with --compile true)."""
    return SIDES if args.compile else SIDES[:3]


def cache_table(contexts: list[int]) -> dict[str, list[int]]:
    """Bytes of KV cache one sequence holds at each context, per preset (RoPE dims BF16, the rest FP8)."""
    from nanoseek import info
    from nanoseek.config import ModelConfig
    return {label: [info.cache_bytes(ModelConfig.preset(p), n) for n in contexts]
            for label, p in CACHE_PRESETS.items()}


def plot(rows: list[dict], contexts: list[int], cache: dict[str, list[int]], path: Path, title: str) -> None:
    """Left: decode tokens/s of each side per cell. Right: cache bytes per sequence vs context (log-log)."""
    from nanoseek.plots import _pyplot
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    shown = [s for s in SIDES if s in rows[0]["tps"]]
    width, colors = 0.8 / len(shown), ("#4d6bfe", "#8fa3ff", "#e07b39", "#1b2a80")
    for j, (side, color) in enumerate(zip(shown, colors)):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(rows))]
        bars = a.bar(xs, [r["tps"][side] for r in rows], width, color=color, label=side)
        if side != "transformers":
            a.bar_label(bars, labels=[f"{r['tps'][side] / r['tps']['transformers']:.1f}x" for r in rows],
                        fontsize=7)
    a.set_xticks(range(len(rows)), [f"prompt {r['prompt']}\nbatch {r['batch']}" for r in rows], fontsize=8)
    a.set_ylabel("decode tokens / s (1 CPU thread, float32)")
    a.set_title("greedy decode, same weights and tokens", fontsize=10)
    a.legend(fontsize=8)
    for (label, ys), style in zip(cache.items(), ("o--", "s--", "o-", "s-")):
        b.plot(contexts, [y / 2**30 for y in ys], style, label=label, ms=4)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xticks(contexts, [f"{c // 1024}k" if c < 2**20 else f"{c // 2**20}M" for c in contexts], fontsize=8)
    b.set_xlabel("context (tokens)")
    b.set_ylabel("KV cache per sequence (GiB)")
    b.set_title("cache per sequence (RoPE dims BF16, the rest FP8)", fontsize=10)
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-lens", default="256,1024", help="prompt lengths (comma-separated)")
    ap.add_argument("--batches", default="1,8", help="batch sizes (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="best of N interleaved repetitions (the machine is shared)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--compile", default="false", choices=["true", "false"],
                    help="also time the engine with its compiled decode pieces (Engine(compile=True))")
    ap.add_argument("--plot", default="docs/bench-v4.png", help="PNG of both results ('' for none)")
    args = ap.parse_args(argv)
    args.compile = args.compile == "true"
    torch.set_num_threads(args.threads)
    hf, model = build()
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: tiny-v4 widened, layers {cfg.layer_types}, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}x{cfg.head_dim}, window {cfg.sliding_window}, rates {cfg.compress_rates}, "
          f"index_topk {cfg.index_topk}, params {n_params / 1e6:.2f}M; new_tokens {args.new_tokens}, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, cpus {os.cpu_count()}, load at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    shown = sides(args)
    print(f"{'prompt':>6} {'batch':>5} " + " ".join(f"{s + ' tok/s':>26}" for s in shown)
          + "".join(f" {s.removeprefix('engine, ') + ' / tf':>13}" for s in shown if s != "transformers"))
    rows = []
    for P in [int(x) for x in args.prompt_lens.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            r = measure(hf, model, P, B, args)
            rows.append(r)
            t, n = r["tps"], r["rows"]
            print(f"{P:>6} {B:>5} " + " ".join(f"{t[s]:>26.1f}" for s in shown)
                  + " ".join(f"{t[s] / t['transformers']:>12.2f}x" for s in shown if s != "transformers") + "   "
                  f"(tokens equal to transformers': {', '.join(f'{k} {v}/{n}' for k, v in r['equal'].items())};"
                  f" load {' '.join(f'{x:.1f}' for x in r['loads'])})", flush=True)
    contexts = [2**k for k in range(10, 21, 2)]
    cache = cache_table(contexts)
    print("\nKV cache per sequence (RoPE dims BF16, the rest FP8; config.py cache_entries via info.cache_bytes):")
    print(f"{'context':>9} " + " ".join(f"{label:>12}" for label in cache) + "   V4-Pro / V3.2")
    for i, n in enumerate(contexts):
        print(f"{n:>9,} " + " ".join(f"{cache[label][i] / 2**20:>8,.1f} MiB" for label in cache)
              + f"   {cache['V4-Pro'][i] / cache['V3.2'][i]:>12.1%}")
    if args.plot:
        plot(rows, contexts, cache, Path(args.plot), f"DeepSeek-V4 (tiny-v4 widened: hidden {cfg.hidden_size}, "
             f"{cfg.num_hidden_layers} layers, index_topk {cfg.index_topk}): nanoseek engine vs transformers "
             f"generate; KV cache per sequence of V3 / V3.2 / V4 presets")
        print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    main()
