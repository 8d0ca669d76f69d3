"""The decode step as one captured graph: trunk + head over the decode rows, against the engine's paged cache,
compiled with torch.compile (inductor's C++ backend on the CPU; CUDA graphs, mode="reduce-overhead", on a GPU).

Why: a decode step of a small model is hundreds of microsecond-sized ops (docs/benchmarks.md, "Decode"), each paying
eager PyTorch's dispatch cost, and on a GPU a kernel launch. Captured once, inductor fuses them into a few loops (a
CUDA graph replays the whole step in one launch), and no Python runs per layer.

Static shapes by buckets (a graph is specialised to its input shapes, so the step's shapes take few values):
* batch: padded to the next power of two (1, 2, 4, 8, ... capped at max_batch). A padding row has start 0 and an
  all-zero block table: it writes the scratch slot 0, attends to it alone (no empty softmax row), and its logits are
  dropped.
* context: the block table as many blocks as the longest row holds (at least 2); positions past a row's length
  read slot 0 under a False mask. This dimension is compiled symbolic: one graph per batch bucket for every context.
  On a GPU the table is padded to a power-of-two number of blocks, since CUDA graphs record one replay per size;
  on the CPU an exact table reads no padding blocks (batch 32, cpu preset: ~9% more tokens/s than padded).
The inputs are three small tensors: each row's token, block table and start position. The slots a row writes and
reads and its mask are computed inside the graph (the eager engine's PagedCache.plan computes the same in Python);
PagedCache.update and DSA's update_indexer / update_selected then run unchanged inside it.

While compiling, the model takes its static-shape twins (tests/test_compiled.py checks each equal to eager):
interleaved RoPE in real arithmetic (rope.rotate_pairs), Linear's oneDNN product as one opaque custom op
(layers.onednn_linear), routed experts through
Experts.dense_forward or gathered_forward (never the sorted route, whose per-expert counts need a host sync),
MoE.load as a scatter. DeepSeek-V3.2's selection runs over the padded context's visible tokens: the same top-k.

Compiled artifacts (inductor's FX graph cache and AOT autograd cache) live under ~/.cache/nanoseek/inductor
($XDG_CACHE_HOME/nanoseek/inductor; TORCHINDUCTOR_CACHE_DIR wins if set), so a second start only traces the step
(seconds) instead of running the C++ compiler again. Each new batch bucket prints its compile time.

DeepSeek-V4's slot cache (infer/v4_cache.py) does not trace into one graph (Python spans, the experts' loop):
CompiledV4 compiles the pure pieces of its decode forward instead (the mHC, the attention's projections and output,
the indexer's scores) and runs the rest eager between them.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types

import numpy as np
import torch

from ..errors import UsageError
from ..model import cpu_attention, cpu_cross_entropy, v4
from ..model.dsa import DSA

# The "auto" rule (Engine(compile="auto")): compile once the decode steps an engine has run plus those in sight
# reach this many. Measured on the shared 2-core CPU (docs/benchmarks.md, "Compiled decode"), `cpu` preset, C++
# wrapper (re-measured 2026-12-01 19:35): a process's first batch bucket compiles in ~28 s cold and ~6 s from the disk
# cache, each further bucket in ~19 s / ~2 s, and the compiled step saves ~2.3 ms at batch 1 and ~2.2-2.9 ms at batch
# 16, so a cold compile pays back after ~7,000-12,000 steps and a cached one after ~700-2,500; the bar sits between,
# for a machine whose cache is warm after its first run. Model size cancels out
# to first order: compile time and the saving per step both grow with the number of layers. On a GPU compiling is
# cheaper (triton kernels, no C++ toolchain) and a launch-bound step saves more, hence the lower bar (an estimate:
# no GPU was at hand to measure it).
AUTO_MIN_STEPS = {"cpu": 4000, "cuda": 500}


def compile_mode(value) -> bool | str:
    """Engine(compile=...) and --compile: True / False / "auto", also as the strings true / false / auto."""
    modes = {"auto": "auto", "true": True, "false": False, "on": True, "off": False}
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in modes:
        return modes[value.lower()]
    raise UsageError(f"compile={value!r}: expected true, false or auto (compile the decode step once it pays)")


def bucket(n: int, cap: int) -> int:
    """The next power of two >= n, at most cap (and never below n)."""
    return max(n, min(cap, 1 << max(0, n - 1).bit_length()))


def unavailable(device: torch.device) -> str | None:
    """Why this device's compiled step cannot be built here, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "triton is not installed (torch.compile's GPU backend needs it)"
    if device.type != "cpu":
        return f"no compiled decode for device {device.type!r}"
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:                                   # inductor's own search: $CXX, else g++
        get_cpp_compiler()
    except Exception:
        return (f"no C++ compiler found ({os.environ.get('CXX') or 'g++'}; inductor's CPU backend needs one: "
                f"install g++ or point CXX at a compiler)")
    return None


def say(msg: str) -> None:
    """One line for the person running the engine (stderr: stdout may carry a command's results)."""
    print(f"nanoseek: {msg}", file=sys.stderr, flush=True)


def use_disk_cache() -> str:
    """Point inductor's on-disk caches at ~/.cache/nanoseek/inductor unless the user chose a folder. (Inductor
    writes its default, a folder under /tmp, into the environment the first time anything asks for it, so that
    value counts as unset.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", os.path.abspath(default_cache_dir())):
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "nanoseek", "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def prepare_training_graphs(device: torch.device) -> str | None:
    """Why training graphs cannot be compiled here, or None once the disk cache is set and, on the CPU, the training
    kernels (attention, cross-entropy: one extension) are built: a graph calls them only if they exist as it traces."""
    why = unavailable(device)
    if not why:
        use_disk_cache()
        if device.type == "cpu":
            cpu_attention.load()
            cpu_cross_entropy.load()
    return why


def compile_blocks(model: torch.nn.Module, device: torch.device) -> str:
    """torch.compile every transformer block of `model` in place (main layers and MTP blocks), torchtitan's way:
    per block, before DDP / FSDP2 wrap them, so a graph holds one layer's forward and backward and is compiled once
    for all layers of a kind (dense and MoE blocks: two graphs). Inductor's C++ backend on the CPU, Triton on a GPU.
    Shapes stay static (a pretraining run's batch never changes shape). Returns a line for the log; without a
    compiler the blocks stay eager and the line says why. The model itself is unchanged (same parameters, same
    state_dict names: a compiled block keeps its module, only its call goes through the graph)."""
    why = prepare_training_graphs(device)
    if why:
        return f"--compile: {why}; training eager"
    blocks = [*model.layers, *getattr(model, "mtp", [])]
    for b in blocks:
        b.compile(dynamic=False)
    return f"--compile: {len(blocks)} blocks compiled (the first step compiles them; inductor cache: " \
           f"{os.environ['TORCHINDUCTOR_CACHE_DIR']})"


def compile_losses(model: torch.nn.Module, device: torch.device) -> str:
    """torch.compile the whole of `model.losses` in place, forward and backward: embedding, every block, the head and
    the loss as one graph (nanoGPT's way), with inductor's C++ wrapper on the CPU (the code that allocates buffers and
    calls kernels is C++, not Python). For one process; DDP / FSDP2 want compile_blocks. On the `cpu` preset's step
    it is ~1.1x compile_blocks (docs/benchmarks.md, "The whole loss as one graph"): no Python between blocks, and the
    head and loss inside the graph. Shapes stay static; the first step compiles. Returns a line for the log.
    deepseek_v4 goes block by block (its MTP reads the streams through hooks registered in each forward)."""
    if model.cfg.model_type == "deepseek_v4":
        return compile_blocks(model, device) + " (deepseek_v4: block by block, its MTP hooks cut a whole graph)"
    why = prepare_training_graphs(device)
    if why:
        return f"--compile: {why}; training eager"
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    model.losses = torch.compile(model.losses, fullgraph=True, dynamic=False, options=options)
    return f"--compile: the whole loss as one graph (the first step compiles it; inductor cache: " \
           f"{os.environ['TORCHINDUCTOR_CACHE_DIR']})"


def decode_step(model, cache, ids: torch.Tensor, table: torch.Tensor, starts: torch.Tensor,
                sparse: bool) -> torch.Tensor:
    """One decode token per row: ids (B,), block tables (B, nb), start positions (B,) -> logits (B, vocab).

    Row b's token sits at position starts[b] and sees positions 0..starts[b] of its blocks (the mask of
    PagedCache.plan for one token per row); this is the function torch.compile captures."""
    bs = cache.block_size
    S = table.shape[1] * bs
    j = torch.arange(S, device=ids.device)
    total = starts[:, None] + 1                                                   # (B, 1) visible tokens
    read = (table[:, j // bs] * bs + j % bs).masked_fill(j >= total, 0)            # (B, S) slots, past the end -> 0
    write = read.gather(1, starts[:, None]).view(-1)                              # (B,) the new token's slot
    cache.set_step(write, read, (j < total)[:, None, None])                       # mask (B, 1, 1, S)
    h, _ = model.trunk(ids[:, None], starts[:, None], cache=cache, dsa=None if sparse else DSA(sparse=False))
    # no step state outlives the graph (a CUDA graph's intermediates are overwritten by its next replay)
    cache.set_step(None, None, None)
    return model.head(h[:, 0])                                                    # (B, vocab)


class CompiledDecode:
    """The engine's decode forward as compiled graphs, one per batch bucket."""

    def __init__(self, model, cache, max_batch: int, max_blocks: int):
        self.model, self.cache = model, cache
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.device = model.embed_tokens.weight.device
        self.cuda = self.device.type == "cuda"
        self.cache_dir = use_disk_cache()
        # every engine is a new set of guards on the same function: allow one graph per bucket of each
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        if self.cuda:   # the cache pools are written in place: CUDA graphs must see them at fixed addresses (the
            # pools and the flat per-layer views of them that update() scatters into are distinct tensor objects)
            for t in [*(t for name in cache.names for t in getattr(cache, name)), *(t for v in cache._flat for t in v)]:
                torch._dynamo.mark_static_address(t)
        # on the CPU the graph's wrapper, the code that allocates buffers and calls kernels, in C++ rather than
        # Python: ~0.1-0.15 ms less per step (batch 1: 1,389 -> 1,729 tok/s, `cpu` preset; docs/benchmarks.md)
        self.step = torch.compile(decode_step, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead" if self.cuda else None,
                                  options=None if self.cuda else {"cpp_wrapper": True})
        self.compile_seconds = 0.0

    def logits(self, tokens: list[int], tables: list[list[int]], starts: list[int], sparse: bool) -> torch.Tensor:
        """Logits (B, vocab) of the next token of each row: tokens[b] at position starts[b], whose block table
        tables[b] covers starts[b] + 1 tokens."""
        B = len(tokens)
        Bp = bucket(B, self.max_batch)
        nb = max(2, max(len(t) for t in tables))
        nb = bucket(nb, max(2, self.max_blocks)) if self.cuda else nb
        pad = Bp - B
        # (flat lists through numpy: ~3x faster than torch.tensor of nested lists, ~30 us a step at batch 32)
        rows = [b for t in tables for b in (*t, *[0] * (nb - len(t)))] + [0] * (pad * nb)
        table = _ints(rows, self.device).view(Bp, nb)
        meta = _ints(tokens + [0] * pad + starts + [0] * pad, self.device).view(2, Bp)
        # one compiled graph for every context of this batch (on a GPU, CUDA graphs still record one per size)
        torch._dynamo.maybe_mark_dynamic(table, 1)
        graphs = _graphs()
        t0 = time.perf_counter()
        out = self.step(self.model, self.cache, meta[0], table, meta[1], sparse)
        if _graphs() > graphs:         # this call traced and compiled a new graph (inductor's cache may have helped)
            dt = time.perf_counter() - t0
            self.compile_seconds += dt
            say(f"compiled the decode step for batch {Bp} in {dt:.1f} s (cache: {self.cache_dir})")
        if self.cuda:
            out = out.clone()          # a CUDA graph's output is overwritten by its next replay
        return out[:B]


class CompiledV4:
    """deepseek_v4's decode step (V4Cache, one slot per sequence) with its pure pieces compiled, each one inductor
    graph shared by every layer: the mHC (HyperConnection's weights: RMS norm, projection, sigmoids, softmax and
    the hc_sinkhorn_iters Sinkhorn-Knopp normalisations; HyperHead's collapse), the attention's projections (query
    latent, normed and rotated queries and keys: V4Attention.project), its softmax over keys and sinks and output
    projections (V4Attention.output), the lightning indexer's scores of its keys (Indexer.rank).
    The rest stays eager between them: V4Cache's bookkeeping (Python spans, boolean writes), the compressors and the
    indexer's top-k, the experts' loop over the picked experts, none of which traces into one static graph as the
    paged caches' step does.

    Why: at small hidden sizes a V4 decode step is thousands of microsecond-sized calls, the Sinkhorn iterations
    the largest share of them (docs/benchmarks.md, "DeepSeek-V4 decode"); compiled, each piece is one call. The
    same arithmetic up to float rounding (rope_tail in real arithmetic, rope.rotate_pairs; tests/test_v4_engine.py:
    tokens equal, log-probs within 1e-5)."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.weight.device
        self.cache_dir = use_disk_cache()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        # dynamic=None (automatic): a graph for the first shapes, then one whose changed dims (batch; the number of
        # keys of HCA layers) are symbolic; hc_mult, hidden and the iterations stay constants, so inductor unrolls
        # the Sinkhorn loop into one kernel (dynamic=True would make hc_mult symbolic: a loop of kernels)
        def compiled(fn):
            return torch.compile(fn, dynamic=None)

        # (class, attribute, the compiled twin) swapped in for a step
        self.swaps = [(v4.HyperConnection, "weights", staticmethod(compiled(v4.hyper_connection))),
                      (v4.HyperHead, "collapse", staticmethod(compiled(v4.hyper_collapse))),
                      (v4.V4Attention, "project", compiled(v4.V4Attention.project)),
                      (v4.V4Attention, "output", compiled(v4.V4Attention.output)),
                      (v4.Indexer, "rank", compiled(v4.Indexer.rank))]
        self.compile_seconds = 0.0

    def logits(self, tokens: list[int], tables: list[list[int]], starts: list[int], sparse: bool) -> torch.Tensor:
        """As CompiledDecode.logits: row b's token tokens[b] at position starts[b] in the slot tables[b][0]."""
        positions = self.cache.plan(tables, starts, [1] * len(tokens))                          # (B, 1)
        ids = torch.tensor(tokens, device=self.device)[:, None]                                   # (B, 1)
        graphs, t0 = _graphs(), time.perf_counter()
        # the twins go on this model's modules only, for this step (instance attributes shadow the class's methods)
        swapped = [(m, name) for owner, name, _ in self.swaps for m in self.model.modules() if isinstance(m, owner)]
        try:
            for owner, name, twin in self.swaps:
                for m in self.model.modules():
                    if isinstance(m, owner):
                        object.__setattr__(m, name, twin.__func__ if isinstance(twin, staticmethod)
                                           else types.MethodType(twin, m))
            h, _ = self.model.trunk(ids, positions, cache=self.cache)                              # (B, 1, hidden)
        finally:
            for m, name in swapped:
                m.__dict__.pop(name, None)
        if _graphs() > graphs:
            dt = time.perf_counter() - t0
            self.compile_seconds += dt
            say(f"compiled deepseek_v4's decode pieces for batch {len(tokens)} in {dt:.1f} s "
                f"(cache: {self.cache_dir})")
        return self.model.head(h[:, 0])                                                           # (B, vocab)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    """A flat list of ints as an int64 tensor on device."""
    t = torch.from_numpy(np.array(values, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device)


def _graphs() -> int:
    """Graphs dynamo has captured in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def steps_in_sight(remaining: list[int], max_batch: int) -> int:
    """Decode steps the given remaining token budgets need at most max_batch rows per step (a lower bound)."""
    if not remaining:
        return 0
    return max(max(remaining), math.ceil(sum(remaining) / max_batch))
