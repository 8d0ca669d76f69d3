"""One- and two-row matrix products for small-batch decoding on the CPU: y = W x read at the speed of memory.

At one row a projection does 2 FLOPs per 4 bytes of weight it reads: the step is a stream of weights, and its bound
is the memory bandwidth one core can pull. The library products leave a third of it unused on one row (MKL's x @ W.T
over an (in, out) weight reads at ~65% of a plain `sum` over the same bytes, oneDNN's and MKL's over the (out, in)
one at ~50%; docs/benchmarks.md, "Batch-1 decode ... roofline"). The loop below reads W's rows in memory order as four
far-apart sequential streams, prefetched 1 KB ahead, sharing each load of x, 16 float lanes per fused multiply-add,
and reads at 92-98% of the fastest plain read of the same bytes on an Intel Xeon (AMD EPYC, two streams: 85-97% of
`sum`; rows longer than 4,096: 80-91%, four neighbouring rows at a time).

gemv(w, x, which): w (G, out, in) float32, each matrix stored row by row (one Linear's weight with G = 1, a stack
of experts, MLA's per-head W_UV), x (P, in), which (P,) int64 -> (P, out) with y[p] = w[which[p]] @ x[p]. One routed
token's k experts are one call. vecmat(w, x, which): the other orientation, y[p] = x[p] @ w[which[p]] for w
(G, in, out), streaming w's rows and adding each into y (MLA's query absorption through W_UK). linear_rows(w, x):
x (R, in) @ w.T for R = 1 or 2 (a Linear), the weight read once for both rows.

The kernel is compiled on first use by the C++ compiler torch's extensions use (torch.utils.cpp_extension, -O3
-march=native) and cached under ~/.cache/nanoseek/kernels/<cpu_key> ($XDG_CACHE_HOME): once per kind of CPU, ~30 s.
Without a compiler, load() returns False after a one-line notice and callers keep their library product.
"""

from __future__ import annotations

import os
import sys
import time

import torch

SOURCE = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The core: for S weight rows o, o + d, ..., o + (S-1) d and R rows of x (R x in, contiguous), y[r * ys + row] =
// dot(w[row, :], x[r, :]). Each weight row is read once, in memory order, with a software prefetch 1 KB ahead; each
// 16-float load of w serves R fused multiply-adds and each load of x serves S. (S = 4, d = a quarter of the range:
// four far-apart sequential streams; rows longer than 4,096 floats, where x no longer sits in L1 beside the
// streams: S = 4 neighbouring rows. Two far-apart streams without the prefetch read as fast on an AMD EPYC and
// 5-15 points slower on an Intel Xeon. Measured against a plain read of the same bytes, docs/benchmarks.md.)
template <int R, int S>
static void dots(const float* w, const float* x, float* y, int64_t ys, int64_t o, int64_t d, int64_t in) {
#if defined(__AVX512F__)
  const int64_t body = in - in % 16;
  __m512 acc[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) acc[s][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < body; i += 16) {
    __m512 wv[S];
    for (int s = 0; s < S; ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (o + s * d) * in + i + 256), _MM_HINT_T0);   // 1 KB ahead
      wv[s] = _mm512_loadu_ps(w + (o + s * d) * in + i);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * in + i);
      for (int s = 0; s < S; ++s) acc[s][r] = _mm512_fmadd_ps(wv[s], xv, acc[s][r]);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) {
      const float* wr = w + (o + s * d) * in;
      float v = _mm512_reduce_add_ps(acc[s][r]);
      for (int64_t i = body; i < in; ++i) v += wr[i] * x[r * in + i];
      y[r * ys + o + s * d] = v;
    }
#else  // other CPUs: the compiler vectorises the 16 lanes for whatever vector width -march=native gives
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) {
      const float* wr = w + (o + s * d) * in;
      const float* xr = x + r * in;
      float acc[16] = {};
      int64_t i = 0;
      for (; i + 16 <= in; i += 16) {
#pragma omp simd
        for (int k = 0; k < 16; ++k) acc[k] += wr[i + k] * xr[i + k];
      }
      float v = 0.f;
      for (; i < in; ++i) v += wr[i] * xr[i];
      for (int k = 0; k < 16; ++k) v += acc[k];
      y[r * ys + o + s * d] = v;
    }
#endif
}

// y[r * ys + o] = dot(w[o, :], x[r, :]) for o in [o0, o1), r < R.
template <int R>
static void rows(const float* w, const float* x, float* y, int64_t ys, int64_t o0, int64_t o1, int64_t in) {
  int64_t o = o0;
  if (in > 4096) {
    for (; o + 4 <= o1; o += 4) dots<R, 4>(w, x, y, ys, o, 1, in);
  } else {
    const int64_t quarter = (o1 - o0) / 4;
    for (; o < o0 + quarter; ++o) dots<R, 4>(w, x, y, ys, o, quarter, in);
    o = o0 + 4 * quarter;                  // a range not a multiple of 4 leaves its last rows to the loop below
  }
  for (; o < o1; ++o) dots<R, 1>(w, x, y, ys, o, 0, in);
}

// y (out) = x (in) @ w (in, out): w's rows in order, each added into y (in L1) with weight x[i].
static void vec_rows(const float* w, const float* x, float* y, int64_t in, int64_t out) {
  for (int64_t o = 0; o < out; ++o) y[o] = 0.f;
  for (int64_t i = 0; i < in; ++i) {
    const float* r = w + i * out;
    const float xi = x[i];
#pragma omp simd
    for (int64_t o = 0; o < out; ++o) y[o] += xi * r[o];
  }
}

static void check(const torch::Tensor& w, const torch::Tensor& x, const torch::Tensor& which, int64_t in) {
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && which.dim() == 1, "gemv: w (G, rows, cols), x (P, in), which (P,)");
  TORCH_CHECK(w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "gemv: float32 only");
  TORCH_CHECK(which.scalar_type() == at::kLong && which.size(0) == x.size(0), "gemv: which is (P,) int64");
  TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == w.size(2) && x.is_contiguous() && which.is_contiguous(),
              "gemv: each of w's matrices stored row by row, x and which contiguous");
  TORCH_CHECK(x.size(1) == in, "gemv: w and x disagree on `in`");
  const int64_t* wh = which.data_ptr<int64_t>();
  for (int64_t p = 0; p < which.size(0); ++p) TORCH_CHECK(wh[p] >= 0 && wh[p] < w.size(0), "gemv: which out of range");
}

// The checks and output of gemv and vecmat: y (P, out); f(w, group stride, x, which, y) fills it.
template <class F>
static torch::Tensor grouped(torch::Tensor w, torch::Tensor x, torch::Tensor which, int64_t in, int64_t out, F f) {
  check(w, x, which, in);
  auto y = torch::empty({x.size(0), out}, x.options());
  f(w.data_ptr<float>(), w.stride(0), x.data_ptr<float>(), which.data_ptr<int64_t>(), y.data_ptr<float>());
  return y;
}

// w (G, out, in), x (P, in), which (P,) -> y (P, out): y[p] = w[which[p]] @ x[p]. w[g] at w + g * stride(0).
torch::Tensor gemv(torch::Tensor w, torch::Tensor x, torch::Tensor which) {
  const int64_t out = w.size(1), in = w.size(2), P = x.size(0);
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(in, 1));  // >= 256 KB a task
  return grouped(w, x, which, in, out, [&](const float* wp, int64_t gs, const float* xp, const int64_t* wh, float* yp) {
    at::parallel_for(0, P * out, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end;) {
        const int64_t p = t / out, o = t % out, stop = std::min(end, (p + 1) * out);
        rows<1>(wp + wh[p] * gs, xp + p * in, yp + p * out, out, o, o + (stop - t), in);
        t = stop;
      }
    });
  });
}

// w (out, in), x (R, in) with R <= 2 (MAX_ROWS) -> y (R, out) = x @ w.T: the weight read once for both rows.
torch::Tensor linear_rows(torch::Tensor w, torch::Tensor x) {
  TORCH_CHECK(w.dim() == 2 && x.dim() == 2 && x.size(1) == w.size(1), "linear_rows: w (out, in), x (R, in)");
  TORCH_CHECK(w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "linear_rows: float32 only");
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) == w.size(1) && x.is_contiguous(), "linear_rows: contiguous tensors");
  const int64_t R = x.size(0), out = w.size(0), in = w.size(1);
  TORCH_CHECK(R == 1 || R == 2, "linear_rows: 1 or 2 rows of x");
  auto y = torch::empty({R, out}, x.options());
  const float* wp = w.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(in, 1));  // >= 256 KB a task
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    if (R == 1) rows<1>(wp, xp, yp, out, o0, o1, in);
    else rows<2>(wp, xp, yp, out, o0, o1, in);
  });
  return y;
}

// w (G, in, out), x (P, in), which (P,) -> y (P, out): y[p] = x[p] @ w[which[p]].
torch::Tensor vecmat(torch::Tensor w, torch::Tensor x, torch::Tensor which) {
  const int64_t in = w.size(1), out = w.size(2), P = x.size(0);
  return grouped(w, x, which, in, out, [&](const float* wp, int64_t gs, const float* xp, const int64_t* wh, float* yp) {
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) vec_rows(wp + wh[p] * gs, xp + p * in, yp + p * out, in, out);
    });
  });
}
"""

MIN_WEIGHT = 1 << 20        # elements of one matrix below which the library product's fixed cost is no loss
MAX_ROWS = 2                # rows of x linear() takes in one pass over the weight: at 2 rows it reads at 46-72% of
                            # `sum` (oneDNN 33-42%), at 4 about as oneDNN, at 8 slower (docs/benchmarks.md)
_state: dict = {}           # "lib": the built extension, or "error": why it could not be built


def kernel_dir() -> str:
    """Where the built kernel lives: one folder per kind of CPU (cpu_key), since -march=native code built on one
    CPU may use instructions another lacks (a home folder shared by a cluster's machines)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "nanoseek", "kernels", cpu_key())


def cpu_key() -> str:
    """A short name for this CPU's model and instruction sets (Linux: /proc/cpuinfo's model name and flags; elsewhere
    the platform's processor string and torch's CPU capability)."""
    import hashlib
    import platform
    ident = f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().split("\n\n")[0].splitlines() if ln.split(":")[0].strip() in
                     ("model name", "flags", "Features", "CPU part")]
        ident += "\n" + "\n".join(lines)
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def load(verbose: bool = True) -> bool:
    """Build (first time on this machine) or load the kernel; True when gemv runs it. Never raises: without a
    working C++ compiler it notes why once and returns False."""
    if "lib" not in _state and "error" not in _state:
        lib = build("nanoseek_gemv", SOURCE, ["gemv", "vecmat", "linear_rows"], "one-row product kernel", _state,
                    verbose)
        if lib is not None:
            _state["lib"] = lib
    return "lib" in _state


def build(name: str, source: str, functions: list[str], what: str, state: dict, verbose: bool = True,
          instead: str = "the library product"):
    """Build (first time on this kind of CPU) or load the C++ extension `name` (-O3 -march=native, in its own folder
    under kernel_dir(): torch's builder keeps one source file per folder); returns it, or None after setting
    state["error"] and a one-line notice saying what runs instead (no compiler, no ninja, a bad flag)."""
    from torch.utils.cpp_extension import load_inline
    folder = os.path.join(kernel_dir(), name)
    os.makedirs(folder, exist_ok=True)
    if verbose and not any(f.startswith(name) and f.endswith(".so") for f in os.listdir(folder)):
        print(f"nanoseek: building the {what} (once per machine, ~30 s; cache: {folder})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        lib = load_inline(name, cpp_sources=source, functions=functions, build_directory=folder,
                          extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
    except Exception as e:     # what ran before stays
        state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        if verbose:
            print(f"nanoseek: {what} not built ({state['error'][:200]}); using {instead}", file=sys.stderr)
        return None
    if verbose and time.perf_counter() - t0 > 5:
        print(f"nanoseek: built the {what} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return lib


def applies(w: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernels serve this product: loaded, no gradient wanted, float32 on the CPU, each of w's matrices stored
    row by row (stacked at any stride), and w at least MIN_WEIGHT elements."""
    return ("lib" in _state and not torch.is_grad_enabled() and w.device.type == "cpu" and x.device.type == "cpu"
            and w.dtype == torch.float32 and x.dtype == torch.float32 and w.stride(-1) == 1
            and w.stride(-2) == w.shape[-1] and w.numel() >= MIN_WEIGHT)


@torch.library.custom_op("nanoseek::gemv", mutates_args=())
def gemv(w: torch.Tensor, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """w (G, out, in), x (P, in), which (P,) int64 -> (P, out): y[p] = w[which[p]] @ x[p]. An opaque op to
    torch.compile, so a compiled decode step calls the kernel too."""
    return _state["lib"].gemv(w, x.contiguous(), which.contiguous())


@gemv.register_fake
def _(w, x, which):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("nanoseek::vecmat", mutates_args=())
def vecmat(w: torch.Tensor, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """w (G, in, out), x (P, in), which (P,) int64 -> (P, out): y[p] = x[p] @ w[which[p]] (w's rows streamed in
    order, each added into y). MLA's query absorption, x @ W_UK per head, at one token."""
    return _state["lib"].vecmat(w, x.contiguous(), which.contiguous())


@vecmat.register_fake
def _(w, x, which):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("nanoseek::linear_rows", mutates_args=())
def linear_rows(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w (out, in), x (R, in), 1 <= R <= MAX_ROWS -> x @ w.T (R, out), the weight read once for all R rows."""
    return _state["lib"].linear_rows(w, x.contiguous())


@linear_rows.register_fake
def _(w, x):
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for an x of up to MAX_ROWS rows (..., in), w (out, in), through the kernel."""
    y = linear_rows(w, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias
