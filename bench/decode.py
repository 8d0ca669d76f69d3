"""Decode throughput: nanoseek.Engine vs transformers `generate` on the same weights, same run.

    .venv/bin/python bench/decode.py [--preset cpu] [--prompt-lens 32,512] [--new-tokens 64] [--batches 1,16]
    .venv/bin/python bench/decode.py --preset qwen-1.5b --layers 2 --prompt-lens 32 --roofline [--profile]
    .venv/bin/python bench/decode.py --prompt-lens 32 --compile        # + the engine with its compiled decode step
    python3 bench/decode.py --device cuda --dtype bfloat16 --preset small --batches 1,16,64 --compile   # on a GPU

Both sides hold the same random weights and run greedy decoding in float32 with EOS ignored, on the same prompts
(same length within a batch, so transformers needs no padding). DeepSeek presets: a checkpoint written by
transformers (DeepseekV3ForCausalLM) and read by ns.load. Dense presets (qwen2 / llama / qwen3, e.g. qwen-1.5b):
transformers' own model class built from `cfg.to_hf()`, its state dict handed to ours through
`build_from_tensors` (no copy on disk; the widths of a real model with `--layers` of its layers).
Decode time runs from the first generated token (the end of prefill) to the last: transformers is timed with a
streamer whose put() marks each step, the engine by its steps (the first step is the prefill). Decode tokens/s =
batch * (new_tokens - 1) / decode time, best of --repeat interleaved runs; the ratio is engine / transformers.
Each repetition notes the machine's load average (os.getloadavg, 1 minute).

`--roofline`: the memory-bandwidth bound of batch-1 decode, measured in the same run. Bandwidth: the fastest
single-thread read of a float32 array far larger than the caches, by every reader (torch's and numpy's sum, and a
small probe kernel reading 1, 2, 4 or 8 far-apart streams at once: on some CPUs one stream reads well below what a
core can pull), read at the start, before every repetition and at the end, and sustained over 1.5 s (a repetition's
span) by the fastest reader; shares of each side's best run against the highest sustained and the highest single
readings (the strictest), and step by step: one more decode per side in which every step is followed by a read of
the same bytes, the median of read time / step time (the same moment, like for like). Bytes per token:
every weight once (the embedding table counts one row unless tied to the head) plus the K/V (or latent) cache
read at the mean decode context. Our side serves as `nanoseek serve` does: weights in decode_layout
(--training-layout keeps nn.Linear's). Roofline tokens/s = bandwidth / bytes per token. `--profile`: torch profiler
table of the engine's decode steps at each batch. `--compile`: a second engine with Engine(compile=True) (the
decode step as one compiled graph, nanoseek/infer/compiled.py) timed in the same interleaved runs; its graph for
each batch is compiled by the greedy check before the timings, and the compile time is printed.
`--device cuda` (bench/gpu.sh): both models on the GPU in --dtype (float32 or bfloat16; the checkpoint is written in
float32 and both sides are cast after loading), each step's end taken after torch.cuda.synchronize(); the compiled
engine there is CUDA graphs (mode="reduce-overhead"). In bfloat16 the greedy-equality guard counts rows that
agree: rounding may let near-ties go either way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

if "--no-thp" not in sys.argv:    # as the nanoseek command sets it, for both sides (before torch allocates anything)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402


def build(preset: str, folder: str, seed: int = 0, **overrides):
    import transformers

    import nanoseek as ns
    cfg = ns.ModelConfig.preset(preset, **overrides)
    torch.manual_seed(seed)
    if cfg.attention == "gqa":
        from nanoseek.model.weights import build_from_tensors
        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
        return hf, build_from_tensors(cfg, hf.state_dict().items(), "transformers", dtype=torch.float32)
    cfg = cfg.replace(num_nextn_predict_layers=0, initializer_range=0.1)
    v2 = cfg.model_type == "deepseek_v2"     # V2's own class: V3's routes by sigmoid and noaux_tc whatever the config
    config_cls, model_cls = ((transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM) if v2 else
                             (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM))
    hf = model_cls(config_cls(**cfg.to_hf())).eval()
    hf.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ns.load(folder)
    return hf, ours


def sync(device: torch.device) -> None:
    """On a GPU: wait until the queued kernels are done, so that a clock reading marks finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A transformers streamer that only notes when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self, device: torch.device):
        self.times, self.device = [], device

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        sync(self.device)
        self.times.append(time.perf_counter())


def hf_decode_time(hf, prompts, n):
    clock = StepClock(prompts.device)
    with torch.inference_mode():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, streamer=clock)
    return clock.times[-1] - clock.times[1]        # times[1]: the first generated token, after prefill


def engine_decode_time(engine, prompts, n, profiler=None):
    import nanoseek as ns
    engine.reset_prefix_cache()                    # no help from the previous repetition's prompt blocks
    sp = ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for p in prompts.tolist():
        engine.add_request(p, sp)
    engine.step()                                  # admission + prefill + first token
    sync(engine.device)
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.start()
    while engine.has_unfinished():
        engine.step()
    sync(engine.device)
    if profiler is not None:
        profiler.stop()
    return time.perf_counter() - t0


def engine_step_shares(engine, prompts, n, buf) -> list[float]:
    """One greedy decode of the prompts; after each decode step a read of buf (as many bytes as a token reads, by the
    fastest reader): read time / step time per step, that step's share of the roofline at that moment."""
    import nanoseek as ns
    engine.reset_prefix_cache()
    for p in prompts.tolist():
        engine.add_request(p, ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    engine.step()                                  # prefill
    shares = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        read(buf)
        shares.append((time.perf_counter() - t1) / (t1 - t0))
    return shares


class PairedClock:
    """A transformers streamer that reads buf after each step and keeps read time / step time (the first put is the
    prompt, the second ends the prefill: neither is a decode step)."""

    def __init__(self, buf):
        self.buf, self.puts, self.last, self.shares = buf, 0, 0.0, []

    def put(self, value):
        t = time.perf_counter()
        self.puts += 1
        if self.puts > 2:
            read(self.buf)
            self.shares.append((time.perf_counter() - t) / (t - self.last))
        self.last = time.perf_counter()

    def end(self):
        pass


def hf_step_shares(hf, prompts, n, buf) -> list[float]:
    clock = PairedClock(buf)
    with torch.inference_mode():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, streamer=clock)
    return clock.shares


# The roofline's reader: the fastest way one core reads a large array. A torch / numpy `sum` is one sequential stream;
# on some CPUs (this session's Intel Xeon: ~11 GB/s by `sum`) one stream is held by the core's outstanding misses and
# a loop over several far-apart streams reads faster, so a reader that beats `sum` (as the gemv kernel's
# streams do) would otherwise count above 100%. read_streams(x, S): S equal parts of x summed side by side, 16
# floats a load. Built once per machine like the kernels (model/gemv.build); without it, `sum` alone.
PROBE = r"""
#include <torch/extension.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

template <int S>
static double streams(const float* x, int64_t part) {
  double total = 0;
#if defined(__AVX512F__)
  __m512 acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t i = 0; i + 16 <= part; i += 16)
    for (int s = 0; s < S; ++s) acc[s] = _mm512_add_ps(acc[s], _mm512_loadu_ps(x + s * part + i));
  for (int s = 0; s < S; ++s) total += _mm512_reduce_add_ps(acc[s]);
#else
  float acc[S][16] = {};
  for (int64_t i = 0; i + 16 <= part; i += 16)
    for (int s = 0; s < S; ++s)
#pragma omp simd
      for (int k = 0; k < 16; ++k) acc[s][k] += x[s * part + i + k];
  for (int s = 0; s < S; ++s)
    for (int k = 0; k < 16; ++k) total += acc[s][k];
#endif
  return total;
}

double read_streams(torch::Tensor x, int64_t s) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "read_streams: a contiguous float32 tensor");
  const float* p = x.data_ptr<float>();
  const int64_t part = x.numel() / s;
  switch (s) {
    case 1: return streams<1>(p, part);
    case 2: return streams<2>(p, part);
    case 4: return streams<4>(p, part);
    case 8: return streams<8>(p, part);
  }
  TORCH_CHECK(false, "read_streams: 1, 2, 4 or 8 streams");
}
"""
_reader: dict = {}   # "all": the readers; "name", "fn": the fastest, chosen by the first read_bandwidth(); "ways": GB/s


def readers() -> dict:
    """Each way of reading an array end to end on one core: name -> fn(x) (the probe built or loaded once)."""
    if "all" not in _reader:
        from nanoseek.model import gemv
        ways = {"torch sum": lambda x: x.sum(), "numpy sum": lambda x: x.numpy().sum()}
        lib = gemv.build("nanoseek_read_probe", PROBE, ["read_streams"], "read-bandwidth probe", {},
                         instead="torch's and numpy's sum")
        for n in (1, 2, 4, 8) if lib is not None else ():
            ways[f"{n} stream{'s' * (n > 1)}"] = lambda x, n=n: lib.read_streams(x, n)
        _reader["all"] = ways
    return _reader["all"]


def read(x: torch.Tensor) -> None:
    """Read x once with the fastest reader (read_bandwidth chooses it; `sum` before)."""
    _reader.get("fn", torch.sum)(x)


def read_bandwidth(gib: float = 1.0, repeat: int = 5) -> tuple[float, float]:
    """Single-thread read bandwidth in bytes/s: best of `repeat` reads of a float32 array of `gib` GiB, far larger than
    any cache, by every reader (sums and 1-8 streams). Returns (best, torch sum's best). The first call chooses
    the fastest reader for sustained_bandwidth and the step-by-step shares."""
    x = torch.ones(int(gib * 2**30) // 4)
    ways = readers()
    best = dict.fromkeys(ways, 0.0)
    for _ in range(repeat):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn(x)
            best[name] = max(best[name], x.numel() * 4 / (time.perf_counter() - t0))
    if "fn" not in _reader:
        name = max(best, key=best.get)
        _reader.update(name=name, fn=ways[name], ways=best)
    return max(best.values()), best["torch sum"]


def sustained_bandwidth(seconds: float = 1.5, gib: float = 1.0) -> float:
    """Single-thread read bandwidth in bytes/s sustained over `seconds` (back-to-back reads of `gib` GiB by the fastest
    reader): the same span as one timed decode repetition, so that both average over the machine's moments alike
    (a best single read catches its quietest ~30 ms)."""
    x = torch.ones(int(gib * 2**30) // 4)
    read(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        read(x)
        n += 1
    return n * x.numel() * 4 / (time.perf_counter() - t0)


def bytes_per_token(model, context: float) -> float:
    """Bytes one batch-1 decode step reads: every parameter once (the embedding table one row, unless the head
    shares it; of an MoE layer's routed experts the num_experts_per_tok that one token uses) + the cache of
    `context` tokens over all layers."""
    emb = model.embed_tokens.weight
    tied = model.lm_head.weight is emb if hasattr(model, "lm_head") else True
    cfg, n = model.cfg, 0
    for name, p in model.named_parameters():   # lists a tied tensor once
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".mlp.experts." in name else 1.0
        n += p.numel() * p.element_size() * share
    if not tied:
        n -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    import nanoseek as ns
    kv = ns.Engine(model, max_batch=1, max_seq_len=16).kv_bytes_per_token
    return n + context * kv


def load1() -> float:
    return os.getloadavg()[0]


def measure(model, hf, P: int, B: int, args, V: int):
    """One (prompt length, batch) cell: greedy equality guard (which also compiles the compiled engine's graph for
    this batch), then --repeat interleaved timings. Returns tokens/s per side ({"eager", ["compiled",]
    "transformers"}), greedy rows equal to transformers' per engine, loads, and the compile seconds."""
    import nanoseek as ns
    g = torch.Generator().manual_seed(B * 1000 + P)
    prompts = torch.randint(3, V, (B, P), generator=g).to(args.device)
    kinds = {"eager": False, "compiled": True} if args.compile else {"eager": False}
    engines = {k: ns.Engine(model, max_batch=B, max_seq_len=P + args.new_tokens + 8, mtp=args.mtp or None, compile=c)
               for k, c in kinds.items()}
    with torch.inference_mode():
        b = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, min_new_tokens=8,
                        do_sample=False)[:, P:].tolist()
    same = {}
    for k, engine in engines.items():
        a = [c.token_ids for c in engine.generate(prompts.tolist(), ns.SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True))]
        same[k] = sum(x == y for x, y in zip(a, b))
    compile_s = engines["compiled"]._compiled.compile_seconds if "compiled" in engines else 0.0
    n = args.new_tokens
    times, loads, bws = {k: [] for k in [*engines, "transformers"]}, [], []
    roof = args.roofline and B == 1    # the bandwidth moves with the machine's other tenants: read it every time
    for _ in range(args.repeat):    # interleaved, so that load changes on the machine hit every side
        loads.append(load1())
        bws += [(read_bandwidth(repeat=2)[0], sustained_bandwidth())] if roof else []
        for k, engine in engines.items():
            times[k].append(engine_decode_time(engine, prompts, n))
        times["transformers"].append(hf_decode_time(hf, prompts, n))
    loads.append(load1())
    shares = {}
    if roof:     # each decode step against a read of the same bytes right after it (the same moment)
        buf = torch.ones(int(bytes_per_token(model, P + n / 2)) // 4)
        shares = {k: engine_step_shares(engine, prompts, n, buf) for k, engine in engines.items()}
        shares["transformers"] = hf_step_shares(hf, prompts, n, buf)
        del buf
    if args.profile:
        for engine in engines.values():
            profile_engine(engine, prompts, n, B)
    return {k: B * (n - 1) / min(t) for k, t in times.items()}, same, loads, compile_s, (bws, shares)


def profile_engine(engine, prompts, n, B):
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU, *[ProfilerActivity.CUDA] * (engine.device.type == "cuda")])
    t = engine_decode_time(engine, prompts, n, profiler=prof)
    steps = n - 1
    print(f"\nprofile: engine decode, batch {B}, {steps} steps, {1e3 * t / steps:.2f} ms/step under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (real widths, fewer layers)")
    ap.add_argument("--prompt-lens", default="32,512", help="prompt lengths (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--heads", type=int, default=None, help="override num_attention_heads (MLA's cache does not "
                    "grow with heads; transformers' does)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings (the machine is shared)")
    ap.add_argument("--mtp", action="store_true", help="engine with MTP speculation (random MTP: low acceptance)")
    ap.add_argument("--compile", action="store_true", help="also time the engine with its decode step compiled "
                    "(Engine(compile=True); the first generation of each cell compiles, outside the timings)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--roofline", action="store_true", help="batch 1 as a fraction of the memory-bandwidth bound")
    ap.add_argument("--profile", action="store_true", help="torch profiler table of the engine's decode steps")
    ap.add_argument("--no-thp", action="store_true", help="no transparent huge pages for torch's CPU tensors "
                    "(the nanoseek command turns them on; both sides share the setting)")
    ap.add_argument("--training-layout", action="store_true", help="keep nn.Linear's weight layout on our side "
                    "(default: decode_layout, as `nanoseek serve` loads a model)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both models run")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both models' weights, "
                    "activations and caches (bfloat16: on a GPU)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if args.roofline and args.device != "cpu":
        ap.error("--roofline measures the CPU's memory bandwidth: it goes with --device cpu")
    torch.set_num_threads(args.threads)

    overrides = {"num_attention_heads": args.heads, "num_key_value_heads": args.heads} if args.heads else {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory() as d:
        hf, model = build(args.preset, d, **overrides)
    dtype = getattr(torch, args.dtype)
    hf, model = hf.to(args.device, dtype), model.to(args.device, dtype)
    if not args.training_layout:
        from nanoseek.model.layers import decode_layout
        decode_layout(model)
    hf.generation_config.pad_token_id = 0
    cfg = model.cfg
    lens = [int(x) for x in args.prompt_lens.split(",")]
    print(f"preset={args.preset} model_type={cfg.model_type} layers={cfg.num_hidden_layers} "
          f"hidden={cfg.hidden_size} heads={cfg.num_attention_heads} kv_heads={cfg.num_key_value_heads} "
          f"vocab={cfg.vocab_size} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"new_tokens={args.new_tokens} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"cpus={os.cpu_count()} load at start={load1():.2f}"
          + (f" device={torch.cuda.get_device_name()} dtype={args.dtype}" if args.device == "cuda" else ""))
    bw = read_bandwidth() if args.roofline else None
    if bw:
        print(f"read bandwidth (1 thread, 1 GiB): {bw[0] / 1e9:.2f} GB/s by {_reader['name']} (torch sum "
              f"{bw[1] / 1e9:.2f} GB/s; " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in _reader["ways"].items())
              + f"), load={load1():.2f}")
    extra = f" {'compiled tok/s':>15} {'ratio':>6}" if args.compile else ""
    print(f"{'prompt':>6} {'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}{extra}")
    rows = []
    for P in lens:
        for B in [int(b) for b in args.batches.split(",")]:
            tps, same, loads, compile_s, (bws, shares) = measure(model, hf, P, B, args, cfg.vocab_size)
            tps_e, tps_h = tps["eager"], tps["transformers"]
            rows.append((P, B, tps_e, tps_h, tps.get("compiled")))
            extra = (f" {tps['compiled']:>15.2f} {tps['compiled'] / tps_h:>5.2f}x   (compile {compile_s:.1f} s)"
                     if args.compile else "")
            print(f"{P:>6} {B:>5} {tps_e:>13.2f} {tps_h:>19.2f} {tps_e / tps_h:>5.2f}x{extra}   "
                  f"(greedy tokens equal to transformers': {', '.join(f'{k} {v}/{B}' for k, v in same.items())}; "
                  f"load {' '.join(f'{x:.1f}' for x in loads)})", flush=True)
            if bw and B == 1:
                report_roofline(model, P + args.new_tokens / 2, tps, bw[0], bws, shares)
    if bw:
        bw2 = read_bandwidth()
        print(f"read bandwidth again at the end: {bw2[0] / 1e9:.2f} GB/s, load={load1():.2f}")
    return rows


def report_roofline(model, context: float, tps: dict, start_bw: float, bws: list, shares: dict) -> None:
    """Shares of the roofline (bytes per token / bandwidth), two ways. (1) Each side's best tokens/s against the
    highest bandwidth read during the run, sustained over 1.5 s and as a best single ~30 ms read (before every
    repetition, at the start, now): the strictest bounds, since on this shared machine the bandwidth moves by
    10-15% from minute to minute. (2) Step by step: each decode step against a read of the same bytes run right
    after it (shares[side], one ratio per step), the median: the same moment, like for like."""
    nbytes = bytes_per_token(model, context)
    peaks, sustained = [start_bw, read_bandwidth(repeat=3)[0], *(p for p, _ in bws)], [s for _, s in bws]
    print(f"       roofline: {nbytes / 1e6:.1f} MB/token (weights + cache at mean context {context:.0f}); "
          f"load {load1():.2f}", flush=True)
    for name, readings in (("sustained", sustained), ("peak", peaks)):
        bw = max(readings)
        told = ", ".join(f"{k} {100 * v * nbytes / bw:.0f}%" for k, v in tps.items())
        print(f"       {name:>9} bandwidth {bw / 1e9:.2f} GB/s (highest of {len(readings)}, lowest "
              f"{min(readings) / 1e9:.2f}) -> {bw / nbytes:.2f} tok/s; {told}", flush=True)
    told = ", ".join(f"{k} {100 * statistics.median(v):.0f}% (quartiles {100 * statistics.quantiles(v)[0]:.0f}-"
                     f"{100 * statistics.quantiles(v)[2]:.0f}%)" for k, v in shares.items())
    print(f"       step by step, each step against a read of the same bytes right after it (median of "
          f"{len(next(iter(shares.values())))} steps): {told}", flush=True)


if __name__ == "__main__":
    main()
