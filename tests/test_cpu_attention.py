"""model/cpu_attention.py: the causal attention kernel for CPU training equals attention computed in float64, in
values and gradients, at shapes off its vector widths and on strided inputs; MLA's full path runs it and trains as
it does through SDPA; without the kernel SDPA stays."""

import pytest
import torch
from conftest import randomize_, rel_err

import nanoseek as ns
from nanoseek.model import cpu_attention as CA
from nanoseek.model import gemv


@pytest.fixture(scope="module")
def kernel():
    if not CA.load():
        pytest.skip(f"the causal attention kernel does not run here: {CA._state.get('error')}")


def reference(q, k, v, scale, diagonal: int = 1):
    """softmax(q k^T scale) v in float64, key j visible to query i when j < i + diagonal (1: causal)."""
    T = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(diagonal), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", s.softmax(-1).nan_to_num(), v.double())
    return out


def inputs(B, T, H, d, dv, seed=0):
    """q (B, T, H, d) stored head-major (strided over T), k contiguous, v a view into a wider (B, T, H, d + dv)
    tensor, as MLA's value is a view of kv_b_proj's output."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, H, d, generator=g).requires_grad_()
    kv = torch.randn(B, T, H, d + dv, generator=g).requires_grad_()
    return q, k, kv, kv[..., d:]


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 3, 24, 20), (1, 5, 2, 48, 32), (1, 70, 1, 72, 136)])
def test_values_and_gradients_equal_float64_attention(kernel, monkeypatch, shape, rowwise):
    # both backwards: dK, dV by columns of p and dS held whole, and added up per block of query rows
    monkeypatch.setattr(CA, "ROWS_BACKWARD_MIN_T", 0 if rowwise else 10**9)
    monkeypatch.setattr(CA, "ROWS_BACKWARD_MAX_WIDTH", 10**9)
    B, T, H, d, dv = shape
    q, k, kv, v = inputs(*shape)
    scale = d ** -0.5 * 1.3
    out = CA.attention(q, k, v, scale)
    ref = reference(q, k, v, scale)
    assert out.shape == (B, T, H, dv) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5
    grad = torch.randn(B, T, H, dv, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, kv), grad)
    want = torch.autograd.grad(ref, (q, k, kv), grad.double())
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 2e-5
    # negative control: attention that also hides each token from itself is far from the kernel's
    assert (out.double() - reference(q, k, v, scale, diagonal=0)).abs().max() > 1e-2


def test_threads_split_the_heads_and_give_the_same_bits(kernel):
    # one task per (sequence, head), each with its own buffers: two threads compute what one does, bit for bit
    q, k, kv, v = inputs(2, 23, 3, 24, 16, seed=2)
    grad = torch.randn(2, 23, 3, 16, generator=torch.Generator().manual_seed(3))
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = CA.attention(q, k, v, 0.3)
            runs.append((out, *torch.autograd.grad(out, (q, k, kv), grad)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_the_ops_shape_functions_and_autograd_registration_agree(kernel):
    q, k, _, v = inputs(1, 9, 2, 16, 8)
    torch.library.opcheck(CA.causal_attention, (q.detach(), k.detach(), v.detach(), 0.25))


class Spy:
    def __init__(self, lib):
        self.lib, self.calls = lib, 0

    def causal_forward(self, *a):
        self.calls += 1
        return self.lib.causal_forward(*a)

    def causal_backward(self, *a):
        return self.lib.causal_backward(*a)


def losses_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model.losses(ids[:, :-1], ids[:, 1:])
    (out["loss"] + 0.3 * out["mtp_loss"]).backward()
    return out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mla_trains_through_the_kernel_as_through_sdpa(kernel, monkeypatch):
    model = ns.Transformer(ns.ModelConfig.preset("tiny")).train()
    randomize_(model, 0, scale=0.1)                               # peaked attention: a wrong kernel shows
    ids = torch.randint(0, model.cfg.vocab_size, (3, 41), generator=torch.Generator().manual_seed(0))
    spy = Spy(CA._state["lib"])
    monkeypatch.setitem(CA._state, "lib", spy)
    loss, grads = losses_and_grads(model, ids)
    assert spy.calls == len(model.layers) + len(model.mtp)        # every block's attention, MTP's included
    monkeypatch.setattr(CA, "MAX_T", 0)                           # the same model through SDPA
    ref_loss, ref_grads = losses_and_grads(model, ids)
    assert spy.calls == len(model.layers) + len(model.mtp)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) < 1e-4
    # negative control: a kernel whose scale is 10% off trains another model
    monkeypatch.setattr(CA, "MAX_T", 1024)
    monkeypatch.setattr(spy, "causal_forward", lambda q, k, v, scale: spy.lib.causal_forward(q, k, v, scale * 1.1))
    wrong = losses_and_grads(model, ids)[1]
    assert max(rel_err(wrong[n], ref_grads[n]) for n in grads) > 1e-2


def test_without_the_kernel_mla_keeps_sdpa_and_builds_nothing(monkeypatch):
    monkeypatch.setattr(CA, "_state", {"error": "this CPU has no AVX-512"})
    monkeypatch.setattr(gemv, "build", lambda *a, **k: pytest.fail("built although the kernel is known not to run"))
    q, k, _, v = inputs(1, 8, 2, 16, 8)
    assert not CA.applies(q, k, v) and not CA.load()
    model = ns.Transformer(ns.ModelConfig.preset("tiny")).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    assert torch.isfinite(model.losses(ids[:, :-1], ids[:, 1:])["loss"])
    # float64, one token, or more tokens than MAX_T: not the kernel's, whatever is built
    monkeypatch.setattr(CA, "_state", {"lib": object()})
    assert not CA.applies(q.double(), k.double(), v.double())
    assert not CA.applies(q[:, :1], k[:, :1], v[:, :1])
    monkeypatch.setattr(CA, "MAX_T", 4)
    assert not CA.applies(q, k, v)
