"""Cross-entropy for training on the CPU: the next-token loss and its gradient as one fused pass over the logits.

The loss of a training step reads the (tokens, vocabulary) logits, the largest activation a small model makes
(the `cpu` preset: 1,024 x 1,024 floats a step). torch's cross_entropy runs it as log_softmax (a new (N, V) tensor),
nll_loss, and in the backward a zero-filled (N, V) tensor, the scatter of -1 and log_softmax's backward: four passes
over N x V floats and two fresh 4 MB buffers, ~6 ms of a ~90 ms compiled `cpu` preset step (docs/benchmarks.md,
"Training step ... cross-entropy kernel"). Here, per row of logits x and target t:

    forward:   m = max_j x_j;  lse = m + log sum_j e^(x_j - m);  loss = lse - x_t      (saved: lse, one float a row)
    backward:  dx_j = (e^(x_j - lse) - [j = t]) * grad           (one pass, written into one new (N, V) tensor)

Rows whose target is ignore_index have loss 0 and gradient 0 (torch's ignore_index). With entropy=True the forward
also returns each row's entropy, lse - sum_j p_j x_j, from the same pass (sum_j e^(x_j - m) x_j): `logprobs` serves
GRPO's token log-probs (rl.token_logprobs) with it. e^x is cpu_attention's polynomial (relative error ~1e-7).
AVX-512 only, built on first use in one extension with the attention kernel (cpu_attention.load); elsewhere, or
when not float32 on the CPU, `cross_entropy` is F.cross_entropy and `logprobs` a log-softmax, gathered.
tests/test_cpu_cross_entropy.py checks both against torch in float64; bench/cross_entropy.py times them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_attention

# Compiled after cpu_attention.SOURCE (its PREAMBLE: headers, NS_AVX512, exp16, first) into one extension.
SOURCE = r"""
static void check_ce(const torch::Tensor& x, const torch::Tensor& t, int64_t ignore) {
#if !NS_AVX512
  TORCH_CHECK(false, "cross-entropy kernel: built without AVX-512");
#endif
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "cross entropy: logits (N, V) float32, last dim contiguous");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.scalar_type() == at::kLong && t.is_contiguous(),
              "cross entropy: targets (N,) int64");
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t n = 0; n < t.size(0); ++n)
    TORCH_CHECK(tp[n] == ignore || (tp[n] >= 0 && tp[n] < x.size(1)), "cross entropy: target ", tp[n],
                " is out of bounds for ", x.size(1), " classes");
}

// logits (N, V), targets (N,) -> loss (N,) = lse - logits[n, t] (0 where t == ignore), lse (N,) = log sum_j e^x_j,
// and with entropy: H (N,) = lse - sum_j p_j x_j, the entropy of p = softmax(x) (else an empty tensor)
std::vector<torch::Tensor> ce_forward(torch::Tensor x, torch::Tensor t, int64_t ignore, bool entropy) {
  check_ce(x, t, ignore);
  const int64_t N = x.size(0), V = x.size(1), ld = x.stride(0);
  auto loss = torch::empty({N}, x.options()), lse = torch::empty({N}, x.options());
  auto ent = torch::empty({entropy ? N : 0}, x.options());
#if NS_AVX512
  const float* X = x.data_ptr<float>();
  const int64_t* T = t.data_ptr<int64_t>();
  float *L = loss.data_ptr<float>(), *E = lse.data_ptr<float>(), *H = ent.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* r = X + n * ld;
      __m512 m = _mm512_set1_ps(-INFINITY), s = _mm512_setzero_ps(), sx = _mm512_setzero_ps();
      for (int64_t j = 0; j < V; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, first(V - j), r + j));
      const float mx = _mm512_reduce_max_ps(m);
      m = _mm512_set1_ps(mx);
      for (int64_t j = 0; j < V; j += 16) {
        const __mmask16 k = first(V - j);
        const __m512 xj = _mm512_maskz_loadu_ps(k, r + j), e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(xj, m)));
        s = _mm512_add_ps(s, e);
        if (entropy) sx = _mm512_fmadd_ps(e, xj, sx);
      }
      const float sum = _mm512_reduce_add_ps(s);
      E[n] = mx + std::log(sum);
      L[n] = T[n] == ignore ? 0.f : E[n] - r[T[n]];
      if (entropy) H[n] = E[n] - _mm512_reduce_add_ps(sx) / sum;
    }
  });
#endif
  return {loss, lse, ent};
}

// grad (N,) of ce_forward's loss -> d logits (N, V) = (e^(x - lse) - onehot(t)) * grad[n], 0 on ignored rows
torch::Tensor ce_backward(torch::Tensor x, torch::Tensor t, torch::Tensor lse, torch::Tensor grad, int64_t ignore) {
  check_ce(x, t, ignore);
  TORCH_CHECK(lse.is_contiguous() && grad.is_contiguous() && lse.numel() == x.size(0) && grad.numel() == x.size(0),
              "cross entropy backward: lse and grad (N,) contiguous");
  const int64_t N = x.size(0), V = x.size(1), ld = x.stride(0);
  auto out = torch::empty({N, V}, x.options());
#if NS_AVX512
  const float *X = x.data_ptr<float>(), *E = lse.data_ptr<float>(), *G = grad.data_ptr<float>();
  const int64_t* T = t.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* r = X + n * ld;
      float* o = O + n * V;
      const bool skip = T[n] == ignore;
      const __m512 g = _mm512_set1_ps(skip ? 0.f : G[n]), e = _mm512_set1_ps(E[n]);
      for (int64_t j = 0; j < V; j += 16) {
        const __mmask16 k = first(V - j);
        const __m512 p = skip ? _mm512_setzero_ps() : exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, r + j), e));
        _mm512_mask_storeu_ps(o + j, k, _mm512_mul_ps(p, g));
      }
      if (!skip) o[T[n]] -= G[n];
    }
  });
#endif
  return out;
}
"""

if (SOURCE, ("ce_forward", "ce_backward")) not in cpu_attention.ALSO:       # built with the attention kernel
    cpu_attention.ALSO.append((SOURCE, ("ce_forward", "ce_backward")))
_state: dict = {}   # "lib": the built extension (with AVX-512), or "error": why not


def load(verbose: bool = True) -> bool:
    """Build (first time on this kind of CPU) or load the kernel, built with the attention kernel
    (cpu_attention.load); True when it runs here. Never raises."""
    if "lib" not in _state and "error" not in _state:
        if cpu_attention.load(verbose) and hasattr(cpu_attention._state["lib"], "ce_forward"):
            _state["lib"] = cpu_attention._state["lib"]
        else:
            _state["error"] = cpu_attention._state.get("error", "the CPU training extension was built without it")
    return "lib" in _state


def applies(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """The kernel serves this loss: logits (N, V) float32 on the CPU, targets (N,) int64, the kernel built (or built
    now, outside a compiled graph)."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and targets.dim() == 1 and targets.dtype == torch.int64 and logits.shape[0] > 0 and logits.shape[1] > 0
            and ("lib" in _state or (not torch.compiler.is_compiling() and load())))


@torch.library.custom_op("nanoseek::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, entropy: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) float32, targets (N,) int64 -> (loss (N,), lse (N,), entropy): each row's -log
    softmax(logits)[target] (0 where the target is ignore_index), its log-sum-exp, and with entropy=True the
    entropy of softmax(logits) per row (N,) (no gradient; else an empty tensor)."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss, lse, ent = _state["lib"].ce_forward(x, targets.contiguous(), ignore_index, entropy)
    return loss, lse, ent


@cross_entropy_rows.register_fake
def _(logits, targets, ignore_index, entropy=False):
    N = logits.shape[0]
    return logits.new_empty(N), logits.new_empty(N), logits.new_empty(N if entropy else 0)


@torch.library.custom_op("nanoseek::cross_entropy_rows_backward", mutates_args=())
def cross_entropy_rows_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                                ignore_index: int) -> torch.Tensor:
    """The gradient of cross_entropy_rows' loss with respect to logits, given grad (N,)."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _state["lib"].ce_backward(x, targets.contiguous(), lse.contiguous(), grad.contiguous(), ignore_index)


@cross_entropy_rows_backward.register_fake
def _(logits, targets, lse, grad, ignore_index):
    return logits.new_empty(logits.shape)


def _context(ctx, inputs, output):
    logits, targets, ignore_index, _ = inputs
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(logits, targets, output[1])


def _backward(ctx, grad_loss, grad_lse, grad_entropy):
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_rows_backward(logits, targets, lse, grad_loss, ctx.ignore_index), None, None, None


cross_entropy_rows.register_autograd(_backward, setup_context=_context)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits)[tokens] and the entropy of softmax(logits) (no gradient), per row: logits (N, V),
    tokens (N,) -> two (N,). Through the kernel where applies() (a token -100 reads as ignored: log-prob 0); else
    log_softmax, gathered."""
    if applies(logits, tokens):
        loss, _, entropy = cross_entropy_rows(logits, tokens, -100, True)
        return -loss, entropy
    logp_all = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, tokens[:, None]).squeeze(-1), entropy


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(logits (N, V), targets (N,), ignore_index=, reduction=) with the same values and gradients;
    float32 on the CPU through the kernel ("mean": over the rows not ignored, NaN when all are, as torch's)."""
    if reduction not in ("mean", "sum", "none") or not applies(logits, targets):     # (torch says what is wrong)
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    loss = cross_entropy_rows(logits, targets, ignore_index)[0]
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()
