"""The one-row product kernels (nanoseek/model/gemv.py) and the decode paths that use them: each equals the library
product it replaces (F.linear, the experts' routed forward, MLA's absorption bmm), eager and inside a compiled decode
step, and nothing takes them where they do not apply (gradients, several rows, no kernel built)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, rel_err

import nanoseek as ns
from nanoseek.model import gemv
from nanoseek.model.layers import Linear, decode_layout


@pytest.fixture(scope="session")
def kernel():
    if not gemv.load():
        pytest.skip(f"the one-row kernel could not be built here: {gemv._state.get('error')}")


@pytest.fixture
def small_min(kernel, monkeypatch):
    """Let the kernels take the test's small weights too."""
    monkeypatch.setattr(gemv, "MIN_WEIGHT", 1)


class Calls:
    """Counts the kernel's calls (wraps the built extension)."""

    def __init__(self, lib):
        self.lib, self.n = lib, {"gemv": 0, "vecmat": 0, "linear_rows": 0}

    def gemv(self, *a):
        self.n["gemv"] += 1
        return self.lib.gemv(*a)

    def vecmat(self, *a):
        self.n["vecmat"] += 1
        return self.lib.vecmat(*a)

    def linear_rows(self, *a):
        self.n["linear_rows"] += 1
        return self.lib.linear_rows(*a)


@pytest.fixture
def calls(kernel, monkeypatch):
    spy = Calls(gemv._state["lib"])
    monkeypatch.setitem(gemv._state, "lib", spy)
    return spy.n


# in: below 16 / not a multiple of 16 or 32 / the four-row path of rows longer than 4,096 (with an out that is not a
# multiple of 4); out: odd
@pytest.mark.parametrize("out_f,in_f", [(7, 5), (33, 48), (130, 1000), (9, 4100), (6, 8192)])
def test_gemv_equals_the_matrix_product(kernel, out_f, in_f):
    torch.manual_seed(0)
    w, x = torch.randn(3, out_f, in_f), torch.randn(4, in_f)
    which = torch.tensor([2, 0, 2, 1])
    ref = torch.stack([w[g].double() @ x[p].double() for p, g in enumerate(which.tolist())]).float()
    assert rel_err(gemv.gemv(w, x, which), ref) < 2e-6      # float32 sums of up to 8,192 products, another order
    # negative control: another matrix for one row is caught
    assert rel_err(gemv.gemv(w, x, torch.tensor([2, 0, 1, 1])), ref) > 0.1


def test_threads_split_the_rows_and_give_the_same_result(kernel):
    torch.manual_seed(0)
    w, x, which = torch.randn(2, 4099, 64), torch.randn(3, 64), torch.tensor([1, 0, 1])   # ~4 tasks per row of x
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.gemv(w, x, which)
        torch.set_num_threads(2)
        two = gemv.gemv(w, x, which)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert rel_err(two, torch.stack([w[1] @ x[0], w[0] @ x[1], w[1] @ x[2]])) < 1e-6


def test_strided_stacks_and_vecmat_equal_mlas_bmm(kernel):
    """W_UK and W_UV are row-contiguous views of kv_b_proj's weight at a head stride of (nope + v) * r."""
    torch.manual_seed(0)
    H, nope, v, r = 4, 24, 40, 64
    kvb = torch.randn(H * (nope + v), r)
    w_uk, w_uv = kvb.view(H, nope + v, r)[:, :nope], kvb.view(H, nope + v, r)[:, nope:]
    q, o = torch.randn(H, nope), torch.randn(H, r)
    heads = torch.arange(H)
    assert rel_err(gemv.vecmat(w_uk, q, heads), torch.bmm(q[:, None], w_uk)[:, 0]) < 1e-6
    assert rel_err(gemv.gemv(w_uv, o, heads), torch.bmm(w_uv, o[..., None])[..., 0]) < 1e-6
    assert rel_err(gemv.vecmat(w_uk, q, heads.flip(0)), torch.bmm(q[:, None], w_uk)[:, 0]) > 0.1


def test_bad_operands_are_refused(kernel):
    w = torch.randn(2, 8, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        gemv.gemv(w, torch.randn(1, 16), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="disagree"):
        gemv.gemv(w, torch.randn(1, 15), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="row by row"):
        gemv.gemv(w.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(1, 16), torch.tensor([0]))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_takes_the_kernel_for_one_or_two_rows_only(small_min, calls, bias):
    torch.manual_seed(0)
    lin = Linear(48, 160, bias=bias).eval()
    one, two, five = torch.randn(1, 1, 48), torch.randn(2, 1, 48), torch.randn(5, 48)
    with torch.inference_mode():
        y1, y2, y5 = lin(one), lin(two), lin(five)
        assert lin(torch.randn(0, 48)).shape == (0, 160)
    assert calls["linear_rows"] == 2                             # the one row and the two, not the five
    for x, y in ((one, y1), (two, y2), (five, y5)):
        assert y.shape == (*x.shape[:-1], 160) and rel_err(y, F.linear(x, lin.weight, lin.bias)) < 1e-6
    lin(one).sum().backward()                                    # training: nn.Linear's product and gradient
    assert calls["linear_rows"] == 2 and lin.weight.grad is not None


# short rows (two far-apart streams, an odd count of rows), long rows (four neighbouring rows, a remainder)
@pytest.mark.parametrize("out_f,in_f", [(7, 40), (9, 4100)])
@pytest.mark.parametrize("rows", [1, 2])
def test_linear_rows_equals_the_matrix_product(kernel, out_f, in_f, rows):
    torch.manual_seed(0)
    w, x = torch.randn(out_f, in_f), torch.randn(rows, in_f)
    ref = (x.double() @ w.double().T).float()
    assert rel_err(gemv.linear_rows(w, x), ref) < 2e-6
    assert rel_err(gemv.linear_rows(w.roll(1, dims=0).contiguous(), x), ref) > 0.1   # negative control: rows shifted


def test_decode_layout_keeps_the_layout_when_the_kernel_is_built(small_min, monkeypatch):
    lin = Linear(48, 160)
    assert decode_layout(lin) == 0 and lin.weight.is_contiguous()
    monkeypatch.setattr(gemv, "_state", {"error": "no compiler"})     # without it: (in, out) for MKL's product
    assert decode_layout(lin) == 1 and lin.weight.stride() == (1, 160)


def test_decode_layout_of_a_small_model_neither_builds_nor_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setattr(gemv, "load", lambda *a, **k: pytest.fail("a model without a weight of MIN_WEIGHT built it"))
    lin = Linear(48, 160)
    assert decode_layout(lin) == 1 and lin.weight.stride() == (1, 160)


def test_without_a_compiler_load_says_so_once_and_the_library_product_stays(monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    def fail(*a, **k):
        raise RuntimeError("Error building extension 'nanoseek_gemv': g++: not found")

    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setattr(ext, "load_inline", fail)
    monkeypatch.setattr(gemv, "MIN_WEIGHT", 1)
    assert gemv.load() is False and gemv.load() is False
    err = capsys.readouterr().err
    assert err.count("one-row product kernel not built") == 1 and "g++: not found" in err
    lin = Linear(16, 32).eval()
    x = torch.randn(1, 16)
    with torch.inference_mode():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_the_built_kernel_is_kept_apart_per_kind_of_cpu(monkeypatch, tmp_path):
    # -march=native code built on one CPU may use instructions another lacks: a home folder shared by machines of
    # different kinds must not hand one's build to the other
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = gemv.kernel_dir()
    assert here == gemv.kernel_dir() and here.startswith(str(tmp_path / "nanoseek" / "kernels"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO_AVX")   # another CPU
    assert gemv.kernel_dir() != here


def tiny_model(preset: str):
    model = ns.Transformer(ns.ModelConfig.preset(preset)).eval()
    randomize_(model, 0, scale=0.3)
    return model


def greedy(model, compile: bool):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 19)]
    sp = ns.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True)
    eng = ns.Engine(model, max_batch=1, mtp=False, compile=compile)
    return [eng.generate([p], sp)[0] for p in prompts]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5


def test_batch_one_decode_through_the_kernels_equals_the_library_products(kernel, monkeypatch):
    """MLA + MoE at batch 1: projections, the token's experts and both absorptions run the kernels; the greedy
    tokens and logprobs equal those of the library products, eager and in the compiled decode step."""
    model = tiny_model("tiny")
    monkeypatch.setattr(gemv, "_state", {"error": "off"})
    ref = greedy(model, compile=False)
    monkeypatch.undo()
    monkeypatch.setattr(gemv, "MIN_WEIGHT", 1)
    spy = Calls(gemv._state["lib"])
    monkeypatch.setitem(gemv._state, "lib", spy)
    assert_same(greedy(model, compile=False), ref)
    assert min(spy.n.values()) > 0
    eager_calls = dict(spy.n)
    assert_same(greedy(model, compile=True), ref)
    assert all(spy.n[k] > eager_calls[k] for k in spy.n)
    # negative control: the query absorption reading the wrong head's W_UK changes the logprobs
    lib = spy.lib
    monkeypatch.setitem(gemv._state, "lib", type("Wrong", (), {
        "gemv": staticmethod(lib.gemv), "linear_rows": staticmethod(lib.linear_rows),
        "vecmat": staticmethod(lambda w, x, which: lib.vecmat(w, x, which.roll(1)))})())
    with pytest.raises(AssertionError):
        assert_same(greedy(model, compile=False), ref)


def test_one_token_experts_equal_the_routed_forward(small_min, calls):
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny")
    from nanoseek.model.moe import Experts
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    x = torch.randn(1, cfg.hidden_size)
    k = cfg.num_experts_per_tok
    idx, w = torch.randperm(cfg.n_routed_experts)[:k][None], torch.rand(1, k)
    with torch.no_grad():
        y = ex(x, w, idx)
        ref = ex.gathered_forward(x, w, idx)
    assert calls["gemv"] == 2 and rel_err(y, ref) < 1e-6
    with torch.no_grad():
        assert rel_err(ex(x, w, idx.roll(1, dims=1)), ref) > 0.01   # negative control: weights to other experts
