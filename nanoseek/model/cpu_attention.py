"""Attention for training on the CPU: one fused kernel per (sequence, head), forward and backward, causal or masked.

At the widths a CPU trains (the `cpu` preset: 4 heads of 48 query/key and 32 value dims, 128 tokens) SDPA's CPU
flash kernel spends more time moving blocks than multiplying: it wants one head size for q, k and v (MLA's value
head is narrower, so a third of its value columns are zeros, mla.py), works on 32-query blocks, and forward and
backward of one layer ran at ~15-20 GFLOP/s, a fifth of a training step (docs/benchmarks.md, "Training step ...
causal attention kernel"). Here each (sequence, head) is one task whose keys, values and probabilities stay in
the core's caches:

    forward, four query rows at a time:  s = q K^T (keys 0..i only) -> p = softmax(s * scale) -> o = p V
                                         saved: o and lse = log sum exp (s * scale) per row
    backward:  p recomputed from lse;  dP = dO V^T;  dS = p * (dP - rowsum(dO * o)) * scale
               dQ = dS K;   dK = dS^T Q;   dV = p^T dO        (FlashAttention-2's backward, Dao 2023, Alg. 2)

Under a boolean mask (B | 1, 1, T, S) (packed documents, GRPO's shared prompt prefix before each row's own keys,
DSA's selection, any other) a block of four query rows computes only the keys from the first to the last any of
them may see, and the mask hides the rest; a row that may see nothing gets 0 (SDPA: NaN).

Scores are computed against K^T held in the task's buffer, 16 keys per AVX-512 multiply-add and four query rows
per load of K^T; e^x is a degree-6 polynomial after a base-2 range reduction (relative error ~1e-7). q, k, v are
read in place through their strides ((B, T, H, d), last dim contiguous: MLA's value is a view of kv_b_proj's
output) and the outputs come back in the same (B, T, H, d) layout, so no transpose is copied on either side.

AVX-512 (F, BW, VL) only (other CPUs keep SDPA: the kernel reports it was built without it). Built on first use like gemv.py's
kernel (torch.utils.cpp_extension, -O3 -march=native, cached per kind of CPU); without a compiler, SDPA stays and
one line says why. The two steps are custom ops, so a compiled training block (compiled.compile_blocks) calls
them as they are. tests/test_cpu_attention.py checks values and gradients against float64 attention.
"""

from __future__ import annotations

import torch

from . import gemv

# What the CPU training kernels start with (this attention's, then cpu_cross_entropy.py's, in one extension): headers,
# NS_AVX512, e^x for 16 floats, has_avx512().
PREAMBLE = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)   // masked byte loads: BW and VL
#define NS_AVX512 1
#else
#define NS_AVX512 0
#endif
#if NS_AVX512
#include <immintrin.h>

// e^x for 16 floats: x = n ln2 + f with |f| <= ln2 / 2, e^f by its degree-6 Taylor polynomial, times 2^n (scalef).
// Inputs below -87 (a masked score's -inf too) give e^-87, which the callers mask to 0 where it matters.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);     // ln2 in two parts (Cody-Waite)
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

static inline int64_t up16(int64_t n) { return (n + 15) / 16 * 16; }
static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
#endif

bool has_avx512() {
#if NS_AVX512
  return true;
#else
  return false;
#endif
}
"""

SOURCE = PREAMBLE + r"""
#if NS_AVX512
static inline __mmask16 part(int u, int U, __mmask16 last) { return u == U - 1 ? last : 0xFFFF; }   // vector u of U

// out[r * os + j] = sum_c a[r * as + c] * bt[c * ld + j], r < R, j < up16(n): R rows against a matrix held
// transposed (len x ld, zero past its columns); 64 columns (4 vectors) at a time, each load of bt feeds R rows.
template <int R>
static void rows_bt(const float* a, int64_t as, const float* bt, int64_t ld, int64_t len, int64_t n, float* out,
                    int64_t os) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int U = (int)std::min<int64_t>(4, (n - j0 + 15) / 16);
    __m512 acc[R][4], b[4];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < len; ++c) {
      for (int u = 0; u < 4; ++u) if (u < U) b[u] = _mm512_loadu_ps(bt + c * ld + j0 + 16 * u);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(a[r * as + c]);
        for (int u = 0; u < 4; ++u) if (u < U) acc[r][u] = _mm512_fmadd_ps(x, b[u], acc[r][u]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u) if (u < U) _mm512_storeu_ps(out + r * os + j0 + 16 * u, acc[r][u]);
  }
}

// out[r * os + w] = sum_{i < n} coef[r * cr + i * ci] * b[i * bs + w], r < R, w < width: R weighted sums of b's
// rows, 64 columns at a time (the coefficients of one row r are coef's row (ci = 1) or column (cr = 1)).
template <int R>
static void rows_b(const float* coef, int64_t cr, int64_t ci, const float* b, int64_t bs, int64_t n, int64_t width,
                   float* out, int64_t os) {
  for (int64_t w0 = 0; w0 < width; w0 += 64) {
    const int U = (int)std::min<int64_t>(4, (width - w0 + 15) / 16);
    const __mmask16 last = first(width - w0 - 16 * (U - 1));
    __m512 acc[R][4], v[4];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      for (int u = 0; u < 4; ++u) if (u < U) v[u] = _mm512_maskz_loadu_ps(part(u, U, last), b + i * bs + w0 + 16 * u);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(coef[r * cr + i * ci]);
        for (int u = 0; u < 4; ++u) if (u < U) acc[r][u] = _mm512_fmadd_ps(x, v[u], acc[r][u]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u)
        if (u < U) _mm512_mask_storeu_ps(out + r * os + w0 + 16 * u, part(u, U, last), acc[r][u]);
  }
}

// out[j * os + w] += sum_{r < R} coef[r * ld + j] * x[r * xs + w] for j < n, w < width: the R rows of x, held in
// registers, added into n rows of out with the weights of coef's column j (dK += dS^T Q, dV += P^T dO by row blocks).
template <int R>
static void outer_add(const float* coef, int64_t ld, const float* x, int64_t xs, int64_t width, int64_t n, float* out,
                      int64_t os) {
  for (int64_t w0 = 0; w0 < width; w0 += 64) {
    const int U = (int)std::min<int64_t>(4, (width - w0 + 15) / 16);
    const __mmask16 last = first(width - w0 - 16 * (U - 1));
    __m512 xr[R][4], acc[4];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u)
        if (u < U) xr[r][u] = _mm512_maskz_loadu_ps(part(u, U, last), x + r * xs + w0 + 16 * u);
    for (int64_t j = 0; j < n; ++j) {
      float* o = out + j * os + w0;
      for (int u = 0; u < 4; ++u) if (u < U) acc[u] = _mm512_maskz_loadu_ps(part(u, U, last), o + 16 * u);
      for (int r = 0; r < R; ++r) {
        const __m512 c = _mm512_set1_ps(coef[r * ld + j]);
        for (int u = 0; u < 4; ++u) if (u < U) acc[u] = _mm512_fmadd_ps(c, xr[r][u], acc[u]);
      }
      for (int u = 0; u < 4; ++u) if (u < U) _mm512_mask_storeu_ps(o + 16 * u, part(u, U, last), acc[u]);
    }
  }
}

// f(std::integral_constant<int, R>) for R = rows in 1..4: the row count is a template argument (registers)
template <class F>
static void by_rows(int64_t rows, F f) {
  if (rows >= 4) f(std::integral_constant<int, 4>());
  else if (rows == 3) f(std::integral_constant<int, 3>());
  else if (rows == 2) f(std::integral_constant<int, 2>());
  else f(std::integral_constant<int, 1>());
}

// x (T rows of d at row stride xs) -> xt (d x ld), zero past column T
static void transpose(const float* x, int64_t xs, int64_t T, int64_t d, float* xt, int64_t ld) {
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t t = 0; t < T; ++t) xt[c * ld + t] = x[t * xs + c];
    for (int64_t t = T; t < ld; ++t) xt[c * ld + t] = 0.f;
  }
}

// The keys of a block of query rows: [L, L + n) of the sequence. Row r keeps column j (key L + j) when j < n and,
// with a mask, its byte mrow[r][j] is set (mrow[r] already offset by L), else when j <= last[r] (causal).
struct Keep {
  const uint8_t* mrow[4];
  int64_t last[4], n;
  __mmask16 at(int r, int64_t j) const {
    __mmask16 k = j < n ? first(n - j) : 0;
    if (mrow[r]) {
      const __m128i b = _mm_maskz_loadu_epi8(k, mrow[r] + j);
      return _mm_test_epi8_mask(b, b);
    }
    return j <= last[r] ? (__mmask16)(k & first(last[r] - j + 1)) : 0;
  }
};

// rows r < R of s (ld columns): p = e^(s * scale - m) where kept, 0 elsewhere. Forward (given = false): m = the row's
// largest kept score, p normalised, lse[r] = m + log(sum) (+inf for a row that keeps nothing, whose p stays 0).
// Backward (given): m = lse[r].
static void softmax_rows(float* s, int64_t ld, int R, const Keep& keep, float scale, float* lse, bool given) {
  for (int r = 0; r < R; ++r) {
    float* row = s + r * ld;
    float m = given ? lse[r] : 0.f;
    if (!given) {
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < keep.n; j += 16) mx = _mm512_mask_max_ps(mx, keep.at(r, j), mx, _mm512_loadu_ps(row + j));
      m = _mm512_reduce_max_ps(mx) * scale;
    }
    const __m512 sc = _mm512_set1_ps(scale), mm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < ld; j += 16) {
      const __mmask16 k = keep.at(r, j);
      const __m512 p = _mm512_maskz_mov_ps(k, k ? exp16(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), sc, mm)) : sc);
      _mm512_storeu_ps(row + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    if (!given) {
      const float l = _mm512_reduce_add_ps(sum);
      if (l > 0.f) {
        const __m512 inv = _mm512_set1_ps(1.f / l);
        for (int64_t j = 0; j < ld; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), inv));
      }
      lse[r] = l > 0.f ? m + std::log(l) : INFINITY;
    }
  }
}

// A block of R query rows from i0 against keys of S: the keys any of them may see, [L, L + keep.n), with each row's
// keep rule. Causal (no mask): [0, i0 + R). Mask rows (mrow(i), or nullptr): from the first to the last set byte.
template <class M>
static Keep block_keys(M mrow, int64_t i0, int R, int64_t S, int64_t& L) {
  Keep keep{};
  int64_t lo = S, hi = 0;
  for (int r = 0; r < R; ++r) {
    const uint8_t* m = mrow(i0 + r);
    int64_t a = 0, b = i0 + r + 1;
    if (m) {
      for (a = 0; a < S && !m[a]; ++a) {}
      for (b = S; b > a && !m[b - 1]; --b) {}
    }
    if (b > a) lo = std::min(lo, a), hi = std::max(hi, b);
  }
  L = hi > lo ? lo : 0;
  keep.n = hi > lo ? hi - lo : 0;
  for (int r = 0; r < R; ++r) {
    const uint8_t* m = mrow(i0 + r);
    keep.mrow[r] = m ? m + L : nullptr;
    keep.last[r] = i0 + r - L;
  }
  return keep;
}
#endif

// A (B, T, H, d) tensor with a contiguous last dim: head (b, h)'s rows start at p + b sB + h sH, sT apart.
struct Heads {
  float* p;
  int64_t sB, sT, sH, H;
  explicit Heads(const torch::Tensor& x)
      : p(x.data_ptr<float>()), sB(x.stride(0)), sT(x.stride(1)), sH(x.stride(2)), H(x.size(2)) {}
  float* at(int64_t task) const { return p + (task / H) * sB + (task % H) * sH; }
};

// The optional mask (B | 1, T, S) bool, True = may attend, last dim contiguous; row (b, i) at p + b sB + i sT.
struct Mask {
  const uint8_t* p = nullptr;
  int64_t sB = 0, sT = 0;
  explicit Mask(const c10::optional<torch::Tensor>& m) {
    if (!m || !m->defined()) return;
    p = reinterpret_cast<const uint8_t*>(m->data_ptr<bool>());
    sB = m->size(0) == 1 ? 0 : m->stride(0);
    sT = m->stride(1);
  }
};

static void check(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const c10::optional<torch::Tensor>& mask) {
#if !NS_AVX512
  TORCH_CHECK(false, "causal attention kernel: built without AVX-512");
#endif
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
              k.size(3) == q.size(3) && v.sizes().slice(0, 3) == k.sizes().slice(0, 3),
              "causal attention: q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv)");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.stride(3) == 1, "causal attention: float32, last dim contiguous");
  if (mask && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 3 && mask->size(1) == q.size(1) &&
                (mask->size(0) == 1 || mask->size(0) == q.size(0)) && mask->size(2) == k.size(1) &&
                mask->stride(2) == 1, "causal attention: mask (B | 1, T, S) bool, last dim contiguous");
  } else {
    TORCH_CHECK(k.size(1) == q.size(1), "causal attention: without a mask, as many keys as queries");
  }
}

// q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv) -> o (B, T, H, dv), lse (B, H, T): softmax(q k^T * scale) v,
// causal (S = T) or under mask (B | 1, T, S)
std::vector<torch::Tensor> causal_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                                          c10::optional<torch::Tensor> mask) {
  check(q, k, v, mask);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), d = q.size(3), S = k.size(1), dv = v.size(3);
  auto o = torch::empty({B, T, H, dv}, q.options());
  auto lse = torch::empty({B, H, T}, q.options());
#if NS_AVX512
  const Heads Q(q), K(k), V(v), O(o);
  const Mask M(mask);
  const int64_t ld = up16(S) + 16;      // a block's columns start anywhere in [0, S): room for its last 16
  float* LS = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> kt(d * ld), s(4 * ld);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / H;
      const float *qn = Q.at(n), *vn = V.at(n);
      float* on = O.at(n);
      auto mrow = [&](int64_t i) { return M.p ? M.p + b * M.sB + i * M.sT : nullptr; };
      transpose(K.at(n), K.sT, S, d, kt.data(), ld);
      for (int64_t i0 = 0; i0 < T; i0 += 4) {
        by_rows(T - i0, [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          int64_t L;
          const Keep keep = block_keys(mrow, i0, R, S, L);
          rows_bt<R>(qn + i0 * Q.sT, Q.sT, kt.data() + L, ld, d, keep.n, s.data(), ld);
          softmax_rows(s.data(), ld, R, keep, (float)scale, LS + n * T + i0, false);
          rows_b<R>(s.data(), ld, 1, vn + L * V.sT, V.sT, keep.n, dv, on + i0 * O.sT, O.sT);
        });
      }
    }
  });
#endif
  return {o, lse};
}

// causal_forward's gradients: dout (B, T, H, dv) -> dq (B, T, H, d), dk (B, S, H, d), dv (B, S, H, dv). dK and dV:
// by columns of p and dS held whole (T x ld each; causal only), or, rowwise or under a mask, added up per block of
// query rows (4 x ld buffers).
std::vector<torch::Tensor> causal_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor o,
                                           torch::Tensor lse, torch::Tensor dout, double scale,
                                           c10::optional<torch::Tensor> mask, bool rowwise) {
  check(q, k, v, mask);
  TORCH_CHECK(o.sizes() == dout.sizes() && o.size(1) == q.size(1) && o.size(3) == v.size(3) && o.stride(3) == 1 &&
              dout.stride(3) == 1 && lse.is_contiguous(),
              "causal attention backward: o, dout (B, T, H, dv), lse (B, H, T)");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), d = q.size(3), S = k.size(1), dv = v.size(3);
  auto dq = torch::empty({B, T, H, d}, q.options()), dk = torch::empty({B, S, H, d}, q.options());
  auto dvv = torch::empty({B, S, H, dv}, q.options());
#if NS_AVX512
  const Heads Q(q), K(k), V(v), O(o), G(dout), DQ(dq), DK(dk), DV(dvv);
  const Mask M(mask);
  rowwise = rowwise || M.p;
  const int64_t ld = up16(S) + 16;
  const float* LS = lse.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, B * H, 1, [&](int64_t n0, int64_t n1) {
    const int64_t held = rowwise ? 4 : T;                                      // rows of p and dS kept
    std::vector<float> kt(d * ld), vt(dv * ld), P(held * ld), DS(held * ld), delta(T);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / H;
      const float *qn = Q.at(n), *kn = K.at(n), *vn = V.at(n), *on = O.at(n), *gn = G.at(n);
      float *dkn = DK.at(n), *dvn = DV.at(n);
      auto mrow = [&](int64_t i) { return M.p ? M.p + b * M.sB + i * M.sT : nullptr; };
      for (int64_t j = 0; rowwise && j < S; ++j) {
        std::fill(dkn + j * DK.sT, dkn + j * DK.sT + d, 0.f);
        std::fill(dvn + j * DV.sT, dvn + j * DV.sT + dv, 0.f);
      }
      transpose(kn, K.sT, S, d, kt.data(), ld);
      transpose(vn, V.sT, S, dv, vt.data(), ld);
      for (int64_t i = 0; i < T; ++i) {                                   // delta_i = dO_i . O_i
        float acc = 0.f;
        for (int64_t c = 0; c < dv; ++c) acc += gn[i * G.sT + c] * on[i * O.sT + c];
        delta[i] = acc;
      }
      for (int64_t i0 = 0; i0 < T; i0 += 4) {
        by_rows(T - i0, [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          int64_t L;
          const Keep keep = block_keys(mrow, i0, R, S, L);
          const int64_t keys = keep.n, w = up16(keys);
          float *p = P.data() + (rowwise ? 0 : i0 * ld), *ds = DS.data() + (rowwise ? 0 : i0 * ld);
          rows_bt<R>(qn + i0 * Q.sT, Q.sT, kt.data() + L, ld, d, keys, p, ld);       // scores again
          softmax_rows(p, ld, R, keep, sc, const_cast<float*>(LS + n * T + i0), true);   // p from the saved lse
          rows_bt<R>(gn + i0 * G.sT, G.sT, vt.data() + L, ld, dv, keys, ds, ld);     // dP = dO V^T
          for (int r = 0; r < R; ++r) {                                              // dS = p (dP - delta) scale
            const __m512 dl = _mm512_set1_ps(delta[i0 + r]), s = _mm512_set1_ps(sc);
            for (int64_t j = 0; j < w; j += 16) {
              const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(ds + r * ld + j), dl);
              _mm512_storeu_ps(ds + r * ld + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p + r * ld + j), x), s));
            }
            for (int64_t j = w; j < ld; j += 16) _mm512_storeu_ps(ds + r * ld + j, _mm512_setzero_ps());
          }
          rows_b<R>(ds, ld, 1, kn + L * K.sT, K.sT, keys, d, DQ.at(n) + i0 * DQ.sT, DQ.sT);    // dQ = dS K
          if (rowwise) {
            outer_add<R>(ds, ld, qn + i0 * Q.sT, Q.sT, d, keys, dkn + L * DK.sT, DK.sT);       // dK += dS^T Q
            outer_add<R>(p, ld, gn + i0 * G.sT, G.sT, dv, keys, dvn + L * DV.sT, DV.sT);       // dV += P^T dO
          }
        });
      }
      for (int64_t j0 = 0; !rowwise && j0 < T; j0 += 4) {   // key rows j0..: dK = dS^T Q, dV = P^T dO, queries i >= j0
        by_rows(T - j0, [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          rows_b<R>(DS.data() + j0 * ld + j0, 1, ld, qn + j0 * Q.sT, Q.sT, T - j0, d, dkn + j0 * DK.sT, DK.sT);
          rows_b<R>(P.data() + j0 * ld + j0, 1, ld, gn + j0 * G.sT, G.sT, T - j0, dv, dvn + j0 * DV.sT, DV.sT);
        });
      }
    }
  });
#endif
  return {dq, dk, dvv};
}
"""

# Tokens per sequence up to which the kernel runs. Its backward holds p and dS (2 T^2 floats a thread) and reads them
# by columns: past L2 it slows. One layer forward + backward against SDPA (bench/cpu_attention.py, one thread): 1.9-2.2x
# up to 512 tokens, 1.7x at 768, 1.1-1.3x at 1,024, 0.75x at 2,048.
MAX_T = 1024
# Which backward: by default dK and dV are sums over the columns of p and dS, held whole (T^2 floats each); from
# ROWS_BACKWARD_MIN_T tokens with narrow heads (d + dv up to ROWS_BACKWARD_MAX_WIDTH) they are added up row block by
# row block instead (causal_backward's rowwise: O(T) buffers, each key row of dK and dV loaded and stored per block).
# Backward alone, one thread: (T, d, dv) = (1024, 48, 32) 16.5 -> 11.1 ms, (2048, 48, 32) 99 -> 43, (1024, 96, 64)
# 75 -> 58, (768, 48, 32) 19.4 -> 13.8; slower with wide heads ((1024, 192, 128) 269 -> 300) and short rows
# ((256, 64, 64) 5.4 -> 6.6); equal at (128, 48, 32) and (512, 96, 64).
ROWS_BACKWARD_MIN_T = 768
ROWS_BACKWARD_MAX_WIDTH = 160
_state: dict = {}   # "lib": the built extension (with AVX-512), or "error": why not


# The other CPU training kernels compiled into the same extension (one build, not one each): (C++ source, function
# names), added by their module when imported (cpu_cross_entropy.py); importing nanoseek.model imports them all.
ALSO: list[tuple[str, tuple[str, ...]]] = []


def load(verbose: bool = True) -> bool:
    """Build (first time on this kind of CPU) or load the kernels for CPU training: this attention and those in
    ALSO, one extension (one ~45 s build); True when they run here. Never raises."""
    if "lib" not in _state and "error" not in _state:
        lib = gemv.build("nanoseek_training", SOURCE + "".join(src for src, _ in ALSO),
                         ["causal_forward", "causal_backward", "has_avx512", *(f for _, fs in ALSO for f in fs)],
                         "kernels for CPU training (attention, cross-entropy)", _state, verbose,
                         instead="SDPA and F.cross_entropy")
        if lib is not None and not lib.has_avx512():
            _state["error"] = "this CPU has no AVX-512 (F, BW, VL)"
        elif lib is not None:
            _state["lib"] = lib
    return "lib" in _state


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """The kernel serves this attention: q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv) float32 on the CPU with
    1 < T, S <= MAX_T; causal (mask None, S = T) or under a boolean mask (B | 1, 1, T, S) or (T, S); and the kernel
    built, or built now outside a compiled graph (compile_blocks builds it first)."""
    T, S = q.shape[1], k.shape[1]
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and q.dim() == 4
            and 1 < T <= MAX_T and S <= MAX_T):
        return False
    if mask is None and S != T or mask is not None and (mask.dtype != torch.bool or mask.shape[-2:] != (T, S)
                                                        or mask.dim() == 4 and mask.shape[1] != 1):
        return False
    return "lib" in _state or (not torch.compiler.is_compiling() and load())


def _rows(mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The mask as the kernel reads it: (B | 1, T, S), last dim contiguous."""
    if mask is None:
        return None
    m = mask.reshape(-1, T, mask.shape[-1])
    return m if m.stride(-1) == 1 else m.contiguous()


def _last(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


@torch.library.custom_op("nanoseek::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv) float32 -> (out (B, T, H, dv), lse (B, H, T)): softmax(q k^T
    scale) v, causal (mask None) or under mask (B | 1, 1, T, S) bool, True = may attend; and each row's log-sum-exp
    of its scaled scores (what the backward recomputes p from; +inf for a row that may attend nothing: out 0)."""
    o, lse = _state["lib"].causal_forward(*_last(q, k, v), scale, _rows(mask, q.shape[1]))
    return o, lse


@causal_attention.register_fake
def _(q, k, v, scale, mask=None):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T)


@torch.library.custom_op("nanoseek::causal_attention_backward", mutates_args=())
def causal_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              grad: torch.Tensor, scale: float, mask: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of causal_attention's out with respect to q, k and v, given grad (B, T, H, dv)."""
    rows = q.shape[1] >= ROWS_BACKWARD_MIN_T and q.shape[-1] + v.shape[-1] <= ROWS_BACKWARD_MAX_WIDTH
    dq, dk, dv = _state["lib"].causal_backward(*_last(q, k, v, o), lse.contiguous(), grad.contiguous(), scale,
                                               _rows(mask, q.shape[1]), rows)
    return dq, dk, dv


@causal_attention_backward.register_fake
def _(q, k, v, o, lse, grad, scale, mask=None):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


def _context(ctx, inputs, output):
    q, k, v, scale, mask = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, *output, mask)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, o, lse, mask = ctx.saved_tensors
    return (*causal_attention_backward(q, k, v, o, lse, grad_out, ctx.scale, mask), None, None)


causal_attention.register_autograd(_backward, setup_context=_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention through the kernel (check applies() first): q (B, T, H, d), k (B, S, H, d), v (B, S, H, dv),
    causal or under mask -> (B, T, H, dv)."""
    return causal_attention(q, k, v, scale, mask)[0]
