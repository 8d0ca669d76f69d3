"""FlashMLA (model/flash_mla.py), the Triton kernel of absorbed MLA over the paged latent cache, against its reference:
the torch path (MLA.latent_attention over PagedLatentCache.update's gathered latents), which the engine runs
without the kernel.

The kernel runs here under Triton's interpreter (TRITON_INTERPRET=1: the kernel's Python executed with numpy on the
CPU, each program in turn), so the shapes are tiny. Tolerance: float32 sums of 64 + 16 products, softmaxed online
block by block instead of at once, differ from the torch path by a few units of roundoff (~1e-7 relative); 1e-5
leaves a wide margin while a wrong block, position or length moves the output by 1e-2 or more (the negative
controls check exactly that). In float16 the torch path rounds its scores and probabilities to float16 (unit
roundoff 4.9e-4) where the kernel keeps them in float32: up to 1.4e-3 relative apart here, bounded by 5e-3.
bfloat16, the GPU's usual dtype, cannot be checked here: the interpreter's tl.dot misreads bfloat16 operands
(a 16 x 16 product off by 1e10 in triton 3.9), so that check belongs to a GPU run (kernel vs torch path on CUDA).
"""

from __future__ import annotations

import pytest
import torch
from conftest import YARN, randomize_, rel_err

import nanoseek as ns
from nanoseek.infer.cache import LatentCache, PagedLatentCache
from nanoseek.model import flash_mla
from nanoseek.model.mla import MLA
from nanoseek.model.rope import RotaryEmbedding

pytest.importorskip("triton", reason="triton not installed (pip install triton, or the dev extras): the kernel's "
                                     "language; its interpreter runs the kernel on the CPU")

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
BLOCK_SIZE = 16
# per row: (block table, tokens in the cache once this step's are written); non-contiguous, out-of-order blocks;
# 37 = 2 full blocks + 5, 5 = one partial block, 16 = exactly one block, 50 = 3 full blocks + 2
TABLES = [[5, 3, 9], [7], [2], [11, 4, 6, 1]]
TOTALS = [37, 5, 16, 50]
# name: tokens this step per row (T = the most; rows with fewer are padding-extended, as the engine does)
STEPS = {"decode": [1, 1, 1, 1], "mtp": [2, 2, 1, 2], "prefill-chunk": [7, 3, 1, 7]}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def tiny_mla(dtype=torch.float32, **overrides):
    """One MLA layer of the test shape: 5 heads (not a power of two: the kernel masks the heads it pads),
    kv_lora_rank 64, rope 16; YaRN so that the softmax scale carries its mscale."""
    cfg = ns.ModelConfig.preset("tiny", num_attention_heads=5, kv_lora_rank=64, qk_rope_head_dim=16,
                                rope_scaling=dict(YARN, type="yarn"), **overrides)
    mla = MLA(cfg).eval()
    randomize_(mla, seed=1)
    return cfg, mla.to(dtype)


def paged_step(cfg, lens, tables=TABLES, totals=TOTALS, seed=0, dtype=torch.float32):
    """A paged cache whose blocks hold random latents, planned for one step that writes lens[b] tokens ending at
    totals[b] in each row; and that step's inputs (B, T, ...)."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedLatentCache(cfg, 1, num_blocks=12, block_size=BLOCK_SIZE, dtype=dtype, device="cpu")
    for pool in (cache.c_kv[0], cache.k_pe[0]):
        pool.normal_(generator=g)
    positions = cache.plan(tables, [n - k for n, k in zip(totals, lens)], lens)    # (B, T)
    B, T, H = len(lens), max(lens), cfg.num_attention_heads
    step = dict(c_kv=torch.randn(B, T, cfg.kv_lora_rank, generator=g),
                k_pe=torch.randn(B, T, cfg.qk_rope_head_dim, generator=g),
                q_nope=torch.randn(B, T, H, cfg.qk_nope_head_dim, generator=g),
                q_pe=torch.randn(B, T, H, cfg.qk_rope_head_dim, generator=g),
                x=torch.randn(B, T, cfg.hidden_size, generator=g))
    return cache, positions, {k: v.to(dtype) for k, v in step.items()}


def torch_path(mla, cache, s):
    """The reference: the gathered latents, the torch attention, in latent space (B, T, H, kv_lora_rank)."""
    return mla.latent_attention(s["q_nope"], s["q_pe"], *cache.update(0, s["c_kv"], s["k_pe"]))


def kernel(mla, cache, s, table=None, kv_len=None):
    c_kv, k_pe, t, n = cache.update_paged(0, s["c_kv"], s["k_pe"])
    return flash_mla.flash_mla(mla.absorb(s["q_nope"]), s["q_pe"], c_kv, k_pe, t if table is None else table,
                               n if kv_len is None else kv_len, mla.softmax_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("step", STEPS)
def test_flash_mla_equals_the_torch_path(step, dtype):
    """Ragged rows, multi-block sequences, partial last blocks, padded query rows; T = 1, 2 (MTP's token and
    draft) and 7 (a chunk of a prefill: causal within the chunk)."""
    cfg, mla = tiny_mla(dtype)
    cache, _, s = paged_step(cfg, STEPS[step], dtype=dtype)
    with torch.no_grad():
        ref, got = torch_path(mla, cache, s), kernel(mla, cache, s)
    assert got.shape == ref.shape == (4, max(STEPS[step]), 5, 64) and got.dtype == dtype
    assert rel_err(got, ref) < TOL[dtype]


def test_flash_mla_equals_the_torch_path_when_every_row_sees_everything():
    """One token per row and equal lengths: plan() leaves the mask out (None), every position is visible."""
    cfg, mla = tiny_mla()
    cache, _, s = paged_step(cfg, [1, 1, 1], tables=[[5, 3, 9], [7, 1, 2], [11, 4, 6]], totals=[40, 40, 40])
    assert cache._mask is None
    with torch.no_grad():
        assert rel_err(kernel(mla, cache, s), torch_path(mla, cache, s)) < TOL[torch.float32]


def test_comparison_can_fail_negative_controls():
    """A wrong block table entry, or one position too few or too many, moves the output far beyond TOL."""
    cfg, mla = tiny_mla()
    cache, _, s = paged_step(cfg, STEPS["mtp"])
    _, _, table, kv_len = cache.update_paged(0, s["c_kv"], s["k_pe"])
    with torch.no_grad():
        ref = torch_path(mla, cache, s)
        wrong_block = table.clone()
        wrong_block[0, 1] = 8                                      # a block no row owns, full of other latents
        assert rel_err(kernel(mla, cache, s, table=wrong_block), ref) > 1e-2
        assert rel_err(kernel(mla, cache, s, kv_len=kv_len - 1), ref) > 1e-2
        assert rel_err(kernel(mla, cache, s, kv_len=kv_len + 1), ref) > 1e-2
        assert rel_err(kernel(mla, cache, s), ref) < TOL[torch.float32]  # and the same call, unbroken, passes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("page", [16, 64])
def test_compiled_kernel_on_cuda_equals_the_torch_path(dtype, page, monkeypatch):
    """On a GPU, the compiled kernel at V3's latent widths (kv_lora_rank 512, rope 64; 16 heads) over sequences of
    up to a few hundred blocks, against the torch path in float32 from the same inputs. bfloat16: the kernel
    rounds its unnormalised probabilities and its output to bfloat16 (unit roundoff 3.9e-3), ~4e-3 relative apart
    in a CPU emulation at these sizes; bound 1.5e-2. float32: both sides IEEE (no TF32), bound 1e-5."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(flash_mla, "_KERNELS", {})
    torch.manual_seed(0)
    B, T, H, r, rope, dev = 3, 2, 16, 512, 64, "cuda"
    totals = [1000, 37, 300]
    tables = torch.randperm(400)[:len(totals) * 64].view(len(totals), 64) + 1          # distinct blocks
    n_blocks = [-(-n // page) for n in totals]
    c_kv, k_pe = torch.randn(401, page, r, device=dev), torch.randn(401, page, rope, device=dev)
    q_lat, q_pe = torch.randn(B, T, H, r, device=dev) * 0.05, torch.randn(B, T, H, rope, device=dev) * 0.05
    kv_len = torch.tensor([[n - 1, n] for n in totals], device=dev, dtype=torch.int32)   # MTP: token and draft
    table = torch.stack([torch.where(torch.arange(64) < k, t, 0) for t, k in zip(tables, n_blocks)]).int().to(dev)
    args = [x.to(dtype) for x in (q_lat, q_pe, c_kv, k_pe)]
    got = flash_mla.flash_mla(*args, table, kv_len, r ** -0.5).float()
    q_lat, q_pe, c_kv, k_pe = (x.float() for x in args)
    for b in range(B):                                    # the torch path's maths, row by row, gathered in float32
        slots = (table[b, :, None] * page + torch.arange(page, device=dev)).flatten()[: totals[b]]
        c, kp = c_kv.view(-1, r)[slots], k_pe.view(-1, rope)[slots]
        for t in range(T):
            n = kv_len[b, t]
            s = (q_lat[b, t] @ c[:n].T + q_pe[b, t] @ kp[:n].T) * r ** -0.5
            ref = torch.softmax(s, -1) @ c[:n]                                           # (H, r)
            assert rel_err(got[b, t], ref) < (1e-5 if dtype == torch.float32 else 1.5e-2)


def test_cpu_tensors_without_the_interpreter_are_refused_with_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(flash_mla, "_KERNELS", {})
    cfg, mla = tiny_mla()
    cache, _, s = paged_step(cfg, STEPS["decode"])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*NANOSEEK_FLASH_MLA=0"):
        kernel(mla, cache, s)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_kernel_compiles_for_a_gpu_at_v3_sizes(dtype, monkeypatch):
    """The interpreter runs Python, not the compiler: compile for an H100/H200 (sm_90, no GPU needed) at V3's
    widths (128 heads, kv_lora_rank 512, rope 64, 16-token pages) with the tiles the launcher picks, and check the
    shared memory fits a block (227 KB on sm_90)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    monkeypatch.setenv("TRITON_INTERPRET", "0")                # triton.jit below wraps for the compiler
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")        # triton 3.9's default, stated (else it warns)
    pointers = dict.fromkeys(["q_lat", "q_pe", "c_kv", "k_pe", "out"], f"*{dtype}")
    signature = {**pointers, "table": "*i32", "kv_len": "*i32", "softmax_scale": "fp32",
                 **dict.fromkeys(["T", "n_heads", "rank", "rope", "max_blocks"], "i32")}
    tiles = flash_mla.tile_sizes(128, 512, 64, 2 if dtype == "bf16" else 4)
    constexprs = {"PAGE": 16, **tiles}
    src = ASTSource(triton.jit(flash_mla._flash_mla_kernel), {**signature, **dict.fromkeys(constexprs, "constexpr")},
                    constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "ptx" in compiled.asm and compiled.metadata.shared <= 227 * 1024


def test_mla_dispatch_runs_the_kernel_only_where_chosen(monkeypatch):
    """MLA.forward through a paged cache: NANOSEEK_FLASH_MLA=1 (MODE "1") runs the kernel and gives the torch
    path's output; "0" and "auto" on the CPU run the torch path; a contiguous LatentCache never uses the kernel."""
    cfg, mla = tiny_mla()
    cache, positions, s = paged_step(cfg, STEPS["mtp"])
    cos, sin = RotaryEmbedding(cfg)(positions)
    calls = []
    real = flash_mla.flash_mla
    monkeypatch.setattr(flash_mla, "flash_mla", lambda *a: calls.append(1) or real(*a))
    out = {}
    with torch.no_grad():
        for mode in ("0", "auto", "1"):
            monkeypatch.setattr(flash_mla, "MODE", mode)
            out[mode] = mla(s["x"], cos, sin, cache=cache)
            assert len(calls) == (mode == "1")
    assert rel_err(out["1"], out["0"]) < TOL[torch.float32] and torch.equal(out["auto"], out["0"])
    assert not flash_mla.use_kernel(LatentCache(cfg, batch=1, max_len=4), torch.device("cuda"))


@pytest.mark.parametrize("preset", ["tiny", "tiny-v3.2"])
def test_engine_greedy_tokens_equal_with_the_kernel(preset, monkeypatch):
    """The engine end to end (plan, every layer's update_paged, the MTP layer, prefix blocks): the same greedy
    tokens and logprobs with the kernel as without it. With DSA (tiny-v3.2) the kernel serves the rows that still
    have at most index_topk tokens, where every token is selected."""
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset(preset, initializer_range=0.3)).eval()
    prompts = [[5, 9, 13, 2, 7, 11, 3, 8, 21], [4, 6]]
    params = ns.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)
    runs, calls, real = {}, [], flash_mla.flash_mla
    monkeypatch.setattr(flash_mla, "flash_mla", lambda *a: calls.append(1) or real(*a))
    for mode in ("0", "1"):
        monkeypatch.setattr(flash_mla, "MODE", mode)
        runs[mode] = ns.Engine(model, block_size=4).generate(prompts, params)
        assert (len(calls) > 0) == (mode == "1")
    for a, b in zip(runs["0"], runs["1"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
