"""The engine, its compiled decode step, the FlashMLA kernel and the pretraining step on a GPU (bench/gpu.sh part a).

Every test here runs on NANOSEEK_TEST_DEVICE (default "cuda") and is skipped where torch sees no GPU, so `make test`
on a CPU machine skips them all. `bench/gpu.sh --dry-run` sets NANOSEEK_TEST_DEVICE=cpu to run the same checks on
the CPU (the tests' own logic, not the GPU's). tests/test_flash_mla.py holds the kernel's own CUDA checks.

Tolerances: float32 on the device against float32 on the CPU: the same maths in another summation order (cuBLAS,
the kernel's online softmax; no TF32, which torch leaves off for float32 matmuls), ~1e-6 relative on the logits, so
logprobs agree to 1e-4 absolute and greedy tokens are equal on these random weights (no near-ties: drawn with std
0.3). Compiled against eager on the same device: the acceptance bound of tests/test_compiled.py, 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import randomize_

import nanoseek as ns
from nanoseek.infer import compiled as compiled_mod
from nanoseek.model import flash_mla

DEVICE = torch.device(os.environ.get("NANOSEEK_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (NANOSEEK_TEST_DEVICE=cpu runs these checks on the CPU)")

PROMPT_LENS, MAX_TOKENS = (5, 17, 30, 9, 12), (12, 12, 12, 5, 7)


def tiny(preset: str = "tiny", device=DEVICE, dtype=torch.float32):
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset(preset)).eval()
    randomize_(model, 0, scale=0.3)
    return model.to(device, dtype)


def generate(engine):
    """Greedy completions of five requests on four rows (one leaves, one joins), with logprobs."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, engine.cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = [ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=True) for n in MAX_TOKENS]
    return engine.generate(prompts, params)


def assert_same(a, b, tol: float):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < tol


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-v3.2"])
def test_engine_on_the_device_equals_the_cpu_engine(preset, monkeypatch):
    """Every cache layout (MLA latent + MoE, GQA K/V, DSA indexer keys); on CUDA the MLA presets go through the
    FlashMLA kernel (its default there), on the CPU through the torch path."""
    calls, real = [], flash_mla.flash_mla
    monkeypatch.setattr(flash_mla, "flash_mla", lambda *a: calls.append(1) or real(*a))
    on_device = generate(ns.Engine(tiny(preset), max_batch=4, mtp=False, compile=False))
    kernel_calls = len(calls)
    on_cpu = generate(ns.Engine(tiny(preset, "cpu"), max_batch=4, mtp=False, compile=False))
    assert_same(on_device, on_cpu, 1e-4)
    mla = ns.ModelConfig.preset(preset).attention != "gqa"
    assert (kernel_calls > 0) == (DEVICE.type == "cuda" and flash_mla.available() and mla)


def test_compiled_decode_on_the_device_equals_eager():
    """Engine(compile=True): CUDA graphs (mode reduce-overhead) on a GPU, inductor's C++ on the CPU; every decode
    step goes through one compiled graph (batch bucket 4) and gives the eager engine's tokens and logprobs."""
    why = compiled_mod.unavailable(DEVICE)
    if why:
        pytest.skip(f"no compiled decode here: {why}")
    model = tiny()
    eager = generate(ns.Engine(model, max_batch=4, mtp=False, compile=False))
    engine = ns.Engine(model, max_batch=4, mtp=False, compile=True)
    graphs = compiled_mod._graphs()
    fast = generate(engine)
    assert_same(eager, fast, 1e-5)
    assert compiled_mod._graphs() - graphs == 1 and engine._compiled.compile_seconds > 0


def test_bfloat16_engine_on_the_device_generates():
    """The serving dtype of a GPU: bfloat16 weights and cache (FlashMLA in bfloat16 on CUDA). Greedy tokens may
    part from float32's at near-ties, so this checks what must hold: the cache is bfloat16, every request gets its
    tokens, and their logprobs are finite log-probabilities."""
    engine = ns.Engine(tiny(dtype=torch.bfloat16), max_batch=4, mtp=False, compile=False)
    assert engine.dtype == torch.bfloat16
    out = generate(engine)
    assert [len(c.token_ids) for c in out] == list(MAX_TOKENS)
    assert all(-1e9 < p <= 1e-3 for c in out for p in c.logprobs)


def test_pretrain_step_on_the_device():
    """nanoseek pretrain's step (bf16 autocast on a GPU, float32 on the CPU): the first loss equals the CPU's
    float32 loss within bfloat16's rounding (CPU autocast to bfloat16 moves it 1.6e-4 relative on these weights;
    bound 1e-2), and five steps on one batch lower it (the optimizer, clipping and bias update run on the device)."""
    from nanoseek.train import optim
    from nanoseek.train.pretrain import train_step
    from nanoseek.train.runtime import Runtime, TrainModule

    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 512, (4, 33), generator=g)
    x, y = rows[:, :-1], rows[:, 1:]
    losses = {}
    for dev in (torch.device("cpu"), DEVICE):
        model = tiny(device=dev).train()
        rt, module = Runtime(device=dev), TrainModule(model)
        opt = optim.adamw(module, lr=1e-2, weight_decay=0.0)
        optim.add_bias_update(opt, optim.ExpertLoads(model, rt), 0.001)
        losses[dev.type] = [train_step(module, opt, [(x.to(dev), y.to(dev))], mtp_lambda=0.3, grad_clip=1.0,
                                       rt=rt)["loss"] for _ in range(6)]
    first_cpu, got = losses["cpu"][0], losses[DEVICE.type]
    assert abs(got[0] - first_cpu) / first_cpu < 1e-2
    assert got[-1] < got[0] - 0.1
