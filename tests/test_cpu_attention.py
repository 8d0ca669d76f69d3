"""model/cpu_attention.py: the attention kernel for CPU training equals attention computed in float64 (causal and
under the masks training passes), in values and gradients, at shapes off its vector widths and on strided inputs;
MLA's full path runs it and trains as it does through SDPA; without the kernel SDPA stays."""

import pytest
import torch
from conftest import randomize_, rel_err, require_cpu_kernel

import nanoseek as ns
from nanoseek.model import cpu_attention as CA
from nanoseek.model import gemv
from nanoseek.model.dsa import causal_visible


@pytest.fixture(scope="module")
def kernel():
    require_cpu_kernel(CA, "causal attention kernel")


def reference(q, k, v, scale, mask=None):
    """softmax(q k^T scale) v in float64, causal or under mask (B | 1, 1, T, S) or (T, S). A query that may see nothing
    gets 0 with zero gradients (mla.explicit_attention's softmax would give NaN there, in values and gradients)."""
    mask = causal_visible(q.shape[1], k.shape[1], q.device) if mask is None else mask
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * scale
    return torch.einsum("bhts,bshd->bthd", s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(), v.double())


def inputs(B, T, H, d, dv, seed=0, S=None):
    """q (B, T, H, d) stored head-major (strided over T), k (B, S, H, d) contiguous, v a view into a wider
    (B, S, H, d + dv) tensor, as MLA's value is a view of kv_b_proj's output."""
    g = torch.Generator().manual_seed(seed)
    S = S or T
    q = torch.randn(B, H, T, d, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, H, d, generator=g).requires_grad_()
    kv = torch.randn(B, S, H, d + dv, generator=g).requires_grad_()
    return q, k, kv, kv[..., d:]


def check_against_float64(q, k, kv, v, scale, mask=None):
    out = CA.attention(q, k, v, scale, mask)
    ref = reference(q, k, v, scale, mask=mask)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, kv), grad)
    want = torch.autograd.grad(ref, (q, k, kv), grad.double())
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 2e-5
    return out


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 3, 24, 20), (1, 5, 2, 48, 32), (1, 70, 1, 72, 136)])
def test_values_and_gradients_equal_float64_attention(kernel, monkeypatch, shape, rowwise):
    # both backwards: dK, dV by columns of p and dS held whole, and added up per block of query rows
    monkeypatch.setattr(CA, "ROWS_BACKWARD_MIN_T", 0 if rowwise else 10**9)
    monkeypatch.setattr(CA, "ROWS_BACKWARD_MAX_WIDTH", 10**9)
    B, T, H, d, dv = shape
    q, k, kv, v = inputs(*shape)
    scale = d ** -0.5 * 1.3
    out = check_against_float64(q, k, kv, v, scale)
    # negative control: attention that also hides each token from itself is far from the kernel's
    hidden = torch.ones(T, T, dtype=torch.bool).tril(-1)
    assert (out.double() - reference(q, k, v, scale, hidden)).abs().max() > 1e-2


def test_masked_attention_equals_float64_attention(kernel):
    """The masks training passes: packed documents (block-diagonal causal, padding seeing itself), a shared prompt
    prefix before each row's own keys (GRPO: S > T, the prompt's padding hidden), a mask shared by the batch, and an
    arbitrary one (non-causal, a row that sees nothing gets 0)."""
    from nanoseek.model.transformer import document_mask
    from nanoseek.rl import SharedPrefix
    g = torch.Generator().manual_seed(5)
    documents = torch.tensor([[0] * 7 + [1] * 12 + [2] * 9 + [-1] * 5, [3] * 20 + [4] * 13])
    check_against_float64(*inputs(2, 33, 3, 24, 20), 0.3, document_mask(documents))
    prefix = SharedPrefix(torch.tensor([9, 14]), torch.tensor([0, 0, 1]))
    prefix.read(16, 21)                                             # prompts padded to 16 columns, 21 own tokens
    check_against_float64(*inputs(3, 21, 2, 24, 16, S=37), 0.3, prefix.mask)
    shared = torch.rand(25, 25, generator=g) < 0.5
    check_against_float64(*inputs(2, 25, 2, 32, 16), 0.3, shared)
    general = torch.rand(2, 1, 19, 30, generator=g) < 0.3
    general[1, 0, 4] = False                                        # a query that may attend nothing
    out = check_against_float64(*inputs(2, 19, 2, 16, 16, S=30), 0.3, general)
    assert out[1, 4].abs().max() == 0
    # negative control: the document mask's neighbour (documents 1 and 2 merged) gives other values
    q, k, kv, v = inputs(2, 33, 3, 24, 20)
    merged = document_mask(documents.masked_fill(documents == 2, 1))
    assert (CA.attention(q, k, v, 0.3, document_mask(documents)) - CA.attention(q, k, v, 0.3, merged)).abs().max() > 1e-2


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
    q, k, _, v = inputs(1, 9, 2, 16, 8, S=11)
    torch.library.opcheck(CA.causal_attention, (q.detach(), k.detach()[:, :9], v.detach()[:, :9], 0.25))
    mask = torch.ones(9, 11, dtype=torch.bool).tril(2)
    torch.library.opcheck(CA.causal_attention, (q.detach(), k.detach(), v.detach(), 0.25, mask))


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
    monkeypatch.setattr(spy, "causal_forward", lambda q, k, v, scale, m: spy.lib.causal_forward(q, k, v, scale * 1.1, m))
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


def test_a_failed_build_says_so_once_and_sdpa_trains(monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    def fail(*a, **k):
        raise RuntimeError("Error building extension 'nanoseek_training': c++: not found")

    monkeypatch.setattr(CA, "_state", {})
    monkeypatch.setattr(ext, "load_inline", fail)
    q, k, _, v = inputs(1, 8, 2, 16, 8)
    assert not CA.applies(q, k, v) and not CA.applies(q, k, v)
    err = capsys.readouterr().err
    assert err.count("kernels for CPU training (attention, cross-entropy) not built") == 1
    assert "using SDPA and F.cross_entropy" in err
    assert "c++: not found" in err
