"""model/cpu_cross_entropy.py: the fused cross-entropy kernel for CPU training gives F.cross_entropy's loss and
gradient (ignored targets, every reduction, vocabularies off the vector width, strided logits), the model's losses
run it, bad targets raise as torch's do, and without the kernel F.cross_entropy stays."""

import pytest
import torch
import torch.nn.functional as F
from conftest import require_cpu_kernel

import nanoseek as ns
from nanoseek.model import cpu_cross_entropy as CE
from nanoseek.model import gemv


@pytest.fixture(scope="module")
def kernel():
    require_cpu_kernel(CE, "cross-entropy kernel")


def logits_and_targets(N, V, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * 4).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,V", [(37, 5), (64, 1024), (9, 1003)])
def test_loss_and_gradient_equal_torch_in_float64(kernel, N, V, reduction):
    x, t = logits_and_targets(N, V, ignore_every=4)
    got = CE.cross_entropy(x, t, ignore_index=-100, reduction=reduction)
    want = F.cross_entropy(x.double(), t, ignore_index=-100, reduction=reduction)
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = 1e-5 * max(1.0, want.abs().max().item())
    assert (got.double() - want).abs().max() < tol
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_want,) = torch.autograd.grad((want * w.double()).sum(), x)
    assert (g_got.double() - g_want).abs().max() < 1e-6 * max(1.0, g_want.abs().max().item())
    assert (g_got[::4] == 0).all()                     # ignored rows: no gradient
    # negative control: the loss of the next class (targets shifted by one) is told apart at the same tolerance
    shifted = torch.where(t == -100, t, (t + 1) % V)
    assert (got.double() - F.cross_entropy(x.double(), shifted, ignore_index=-100, reduction=reduction)).abs().max() > tol


def test_strided_logits_all_ignored_rows_and_bad_targets(kernel):
    x, t = logits_and_targets(16, 300)
    view = x[:, 10:260]                                # rows 300 floats apart, not contiguous
    tv = t.clamp(max=249)
    assert torch.allclose(CE.cross_entropy(view, tv), F.cross_entropy(view, tv), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(CE.cross_entropy(view, tv), x)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(view, tv), x)
    assert (g - g_ref).abs().max() < 1e-7 and (g[:, :10] == 0).all()
    ignored = torch.full_like(t, -100)                 # mean over no rows: NaN, as torch's
    assert CE.cross_entropy(x, ignored).isnan() and F.cross_entropy(x, ignored).isnan()
    assert CE.cross_entropy(x, ignored, reduction="sum") == 0
    for bad in (300, -1):
        with pytest.raises(RuntimeError, match="out of bounds"):
            CE.cross_entropy(x, t.clone().fill_(bad))


def test_threads_give_the_same_bits_and_the_op_checks(kernel):
    x, t = logits_and_targets(200, 515, ignore_every=3)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CE.cross_entropy_rows(x.detach(), t, -100)
        torch.set_num_threads(2)
        two = CE.cross_entropy_rows(x.detach(), t, -100)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    torch.library.opcheck(CE.cross_entropy_rows, (x[:8], t[:8], -100))


def test_logprobs_and_entropy_equal_log_softmax_gathered(kernel, monkeypatch):
    """GRPO's token_logprobs (rl.py): log softmax(logits / temperature) at the tokens, with its gradient, and the
    entropy, computed by the kernel in one pass a row."""
    from nanoseek.rl import token_logprobs
    x, t = logits_and_targets(3 * 7, 301)
    logits, tokens = x.view(3, 7, 301), t.view(3, 7)
    calls = []
    real = CE.cross_entropy_rows
    monkeypatch.setattr(CE, "cross_entropy_rows", lambda *a: calls.append(a[-1]) or real(*a))
    logp, ent = token_logprobs(logits, tokens, temperature=0.7)
    assert calls == [True] and logp.shape == ent.shape == (3, 7) and not ent.requires_grad
    ref_all = torch.log_softmax(logits.double() / 0.7, -1)
    ref = ref_all.gather(-1, tokens[..., None]).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    assert (logp.double() - ref).abs().max() < 1e-5 and (ent.double() - ref_ent).abs().max() < 1e-5
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((logp * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w.double()).sum(), x)
    assert (g.double() - g_ref).abs().max() < 1e-6
    # negative control: the log-probs and entropy at temperature 1 are told apart
    at_one = torch.log_softmax(logits.double(), -1)
    assert (ent.double() + (at_one.exp() * at_one).sum(-1)).abs().max() > 1e-3
    assert (logp.double() - at_one.gather(-1, tokens[..., None]).squeeze(-1)).abs().max() > 1e-3


def test_the_models_losses_run_the_kernel_and_train_as_torchs(kernel, monkeypatch):
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny")).train()          # MTP on: both losses through it
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17))
    calls = []
    real = CE.cross_entropy_rows
    monkeypatch.setattr(CE, "cross_entropy_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    out = model.losses(ids[:, :-1], ids[:, 1:])
    assert len(calls) == 1 + len(model.mtp)
    grads = torch.autograd.grad(out["loss"] + out["mtp_loss"], list(model.parameters()), allow_unused=True)
    monkeypatch.setattr(CE, "_state", {"error": "off"})                  # the same step through F.cross_entropy
    ref = model.losses(ids[:, :-1], ids[:, 1:])
    ref_grads = torch.autograd.grad(ref["loss"] + ref["mtp_loss"], list(model.parameters()), allow_unused=True)
    assert len(calls) == 1 + len(model.mtp)
    for k in ("loss", "mtp_loss"):
        assert abs(out[k].item() - ref[k].item()) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() < 1e-5)


def test_without_the_kernel_torch_computes_it_and_nothing_is_built(monkeypatch):
    monkeypatch.setattr(CE, "_state", {"error": "this CPU has no AVX-512"})
    monkeypatch.setattr(gemv, "build", lambda *a, **k: pytest.fail("built although the kernel is known not to run"))
    x, t = logits_and_targets(8, 33)
    assert not CE.applies(x, t) and not CE.load()
    assert torch.equal(CE.cross_entropy(x, t), F.cross_entropy(x, t))
    monkeypatch.setattr(CE, "_state", {"lib": object()})                   # float64 and 3-d logits: torch's
    assert not CE.applies(x.double(), t) and not CE.applies(x[None], t[None])
