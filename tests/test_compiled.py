"""The decode step as one compiled graph (nanoseek/infer/compiled.py) against the eager engine.

Each cache layout (MLA's latent with MoE, GQA's K/V, DSA's latent + indexer keys) runs one scenario through an eager
engine and a compiled one: five requests, max_batch 4, so the decode batch is 4, then 3 (a padding row, bucket 4)
when the shortest request leaves, then 4 again when the waiting one joins; the context grows from 2 to 3 blocks
(bucket 2 -> 4, one symbolic dimension on the CPU). Every decode batch is in bucket 4: one compile per model and
test session, ~2-4 s each from inductor's disk cache, ~20-40 s cold on the shared 2-core machine.

Tolerance: float32 throughout; inductor fuses and reorders reductions (RMSNorm, softmax, the matmuls' sums), which
moves logits by ~1e-6 relative, so logprobs agree to < 1e-5 absolute and the greedy tokens are identical.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nanoseek as ns
from nanoseek.errors import UsageError
from nanoseek.infer import compiled as compiled_mod
from nanoseek.infer import engine as engine_mod
from nanoseek.model import moe as moe_mod
from nanoseek.model.rope import apply_rope, rotate_pairs

PROMPT_LENS = (5, 17, 30, 9, 12)
MAX_TOKENS = (12, 12, 12, 5, 7)       # the 4th leaves after 4 decode steps; the 5th joins and ends with the first 3


def scenario(cfg, engine):
    """Greedy completions of the five requests (token ids and logprobs)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = [ns.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=True) for n in MAX_TOKENS]
    return engine.generate(prompts, params)


def build(preset: str, seed: int = 0):
    model = ns.Transformer(ns.ModelConfig.preset(preset)).eval()
    randomize_(model, seed, scale=0.3)
    return model


class Spy:
    """Counts the decode steps that went through CompiledDecode.logits."""

    def __init__(self):
        self.calls, self.batches = 0, []
        self.real = compiled_mod.CompiledDecode.logits

    def __call__(self, graph, tokens, *args):
        self.calls += 1
        self.batches.append(len(tokens))
        return self.real(graph, tokens, *args)


def run_both(preset: str, dense_max_macs: int | None = None):
    """(eager completions, compiled completions, spy, engine) for one model; the compiled engine compiles once."""
    model = build(preset)
    spy = Spy()
    mp = pytest.MonkeyPatch()
    mp.setattr(compiled_mod.CompiledDecode, "logits", lambda self, *a: spy(self, *a))
    if dense_max_macs is not None:
        mp.setattr(moe_mod, "DENSE_EXPERTS_MAX_MACS", dense_max_macs)
    try:
        eager = scenario(model.cfg, ns.Engine(model, max_batch=4, mtp=False, compile=False))
        eng = ns.Engine(model, max_batch=4, mtp=False, compile=True)
        graphs = compiled_mod._graphs()
        fast = scenario(model.cfg, eng)
        spy.graphs = compiled_mod._graphs() - graphs
    finally:
        mp.undo()
    return eager, fast, spy, eng


@pytest.fixture(scope="session")
def mla_runs():
    # routed experts above the dense threshold: eager takes the sorted route, the graph gathered_forward
    return run_both("tiny", dense_max_macs=0)


@pytest.fixture(scope="session")
def gqa_runs():
    return run_both("tiny-qwen2")


@pytest.fixture(scope="session")
def dsa_runs():
    return run_both("tiny-v3.2")


def assert_same(eager, fast):
    for a, b in zip(eager, fast):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def assert_compiled_ran(spy, eng):
    # every decode step went through the graph, with the batch changing (4 -> 3 -> 4), in one compiled graph
    assert spy.calls == eng.counters["decode_forwards"] and {3, 4} <= set(spy.batches)
    assert spy.graphs == 1 and eng._compiled.compile_seconds > 0


def test_compiled_decode_equals_eager_mla_moe(mla_runs):
    eager, fast, spy, eng = mla_runs
    assert_same(eager, fast)
    assert_compiled_ran(spy, eng)


def test_compiled_decode_equals_eager_gqa(gqa_runs):
    eager, fast, spy, eng = gqa_runs
    assert_same(eager, fast)
    assert_compiled_ran(spy, eng)


def test_compiled_decode_equals_eager_dsa(dsa_runs):
    eager, fast, spy, eng = dsa_runs
    # contexts of up to 41 tokens against index_topk 16: decoding selects (the sparse path), eager and compiled
    assert eng.cfg.index_topk < max(PROMPT_LENS) + max(MAX_TOKENS)
    assert_same(eager, fast)
    assert_compiled_ran(spy, eng)


def eager_graph(model, **kw):
    """An engine whose 'compiled' step is decode_step run eagerly: the same bucketing, padding and in-graph
    planning as the compiled graph, without a compile."""
    eng = ns.Engine(model, max_batch=4, mtp=False, compile=True, **kw)
    mp = pytest.MonkeyPatch()
    mp.setattr(engine_mod, "unavailable", lambda device: None)
    eng._graph([])
    mp.undo()
    eng._compiled.step = compiled_mod.decode_step
    return eng


def test_bucketed_step_equals_eager_and_a_wrong_padding_mask_changes_tokens():
    """The padded, bucketed step (run eagerly here) gives the eager engine's tokens; letting each row see the
    padded context positions (which read the scratch slot, written by padding tokens) changes them."""
    model = build("tiny")
    eager = scenario(model.cfg, ns.Engine(model, max_batch=4, mtp=False, compile=False))
    assert_same(eager, scenario(model.cfg, eager_graph(model)))
    wrong = eager_graph(model)
    set_step = wrong.cache.set_step
    wrong.cache.set_step = lambda write, read, mask: set_step(write, read, torch.ones_like(mask))
    assert [c.token_ids for c in scenario(model.cfg, wrong)] != [c.token_ids for c in eager]


def test_auto_stays_eager_for_short_work_and_says_so(capsys):
    model = build("tiny")
    eng = ns.Engine(model, max_batch=4, mtp=False)               # compile="auto" by default
    out = scenario(model.cfg, eng)
    assert eng._compiled is None and "decoding eager (compile='auto'" in capsys.readouterr().err
    assert [c.token_ids for c in out] == [c.token_ids for c in
                                          scenario(model.cfg, ns.Engine(model, max_batch=4, mtp=False, compile=False))]


def test_without_a_compiler_the_engine_decodes_eager_with_a_notice(capsys, monkeypatch):
    monkeypatch.setattr(engine_mod, "unavailable", lambda device: "no C++ compiler found (test)")
    monkeypatch.setattr(engine_mod, "AUTO_MIN_STEPS", {"cpu": 10})   # "auto" decides to compile: 12 steps in sight
    model = build("tiny")
    for mode in (True, "auto"):
        eng = ns.Engine(model, max_batch=4, mtp=False, compile=mode)
        scenario(model.cfg, eng)
        err = capsys.readouterr().err
        assert eng._compiled is None and eng.compile is False
        assert err.count("decoding eager: no C++ compiler found (test)") == 1


def test_compile_flag_is_checked():
    with pytest.raises(UsageError, match="compile="):
        ns.Engine(build("tiny"), compile="yes")


def test_static_shape_twins_equal_their_eager_paths():
    """rope.rotate_pairs = the complex multiply; Experts.gathered_forward = the sorted and the dense routes."""
    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    assert torch.allclose(rotate_pairs(x, cos[:, :, None], sin[:, :, None]), apply_rope(x, cos, sin, True), atol=1e-6)
    experts = build("tiny").layers[1].mlp.experts
    x = torch.randn(5, 64, generator=g)
    weights = torch.rand(5, 2, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)])
    with torch.no_grad():
        gathered = experts.gathered_forward(x, weights, idx)
        assert torch.allclose(gathered, experts.dense_forward(x, weights, idx), rtol=1e-5, atol=1e-4)
        moe_mod.DENSE_EXPERTS_MAX_MACS, old = 0, moe_mod.DENSE_EXPERTS_MAX_MACS
        try:
            assert torch.allclose(gathered, experts(x, weights, idx), rtol=1e-5, atol=1e-4)
        finally:
            moe_mod.DENSE_EXPERTS_MAX_MACS = old


def test_buckets():
    assert [compiled_mod.bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert compiled_mod.bucket(5, 6) == 6 and compiled_mod.bucket(7, 6) == 7
    assert compiled_mod.steps_in_sight([10, 3, 3], 2) == 10 and compiled_mod.steps_in_sight([5] * 8, 2) == 20


def test_compile_option_of_the_commands():
    """serve, eval and grpo take --compile true|false|auto; the engine reads the strings."""
    import argparse

    from nanoseek.eval import EvalConfig
    from nanoseek.options import add_options, make_config
    from nanoseek.serve.app import ServeConfig
    from nanoseek.train.grpo import GRPOConfig
    for cls in (ServeConfig, EvalConfig, GRPOConfig):
        ap = argparse.ArgumentParser()
        add_options(ap, cls)
        assert make_config(cls, ap.parse_args(["--compile", "false"]), required=()).compile == "false"
    assert [compiled_mod.compile_mode(v) for v in ("true", "false", "auto", True)] == [True, False, "auto", True]


def test_a_large_projection_keeps_its_onednn_product_inside_a_graph():
    """Linear above ONEDNN_MIN_WEIGHT runs oneDNN in eager inference; a graph calls the same product as the custom op
    nanoseek::onednn_linear (traced whole, no break) rather than inductor's own matmul."""
    from nanoseek.model.layers import _ONEDNN, ONEDNN_MIN_WEIGHT, Linear
    if _ONEDNN is None:
        pytest.skip("this torch build has no oneDNN")
    layer = Linear(1024, ONEDNN_MIN_WEIGHT // 1024).eval()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.code)
        return gm

    x = torch.randn(3, 1024)
    with torch.inference_mode():
        y = torch.compile(layer, backend=backend, fullgraph=True)(x)
        assert torch.equal(y, layer(x))
    assert len(graphs) == 1 and "onednn_linear" in graphs[0]


SECOND_START = """
import torch
import nanoseek as ns
from torch._dynamo.utils import counters
torch.set_num_threads(1)
model = ns.Transformer(ns.ModelConfig.preset("tiny-qwen2")).eval()
eng = ns.Engine(model, max_batch=1, compile=True)
eng.generate([[1, 2, 3]], ns.SamplingParams(temperature=0, max_tokens=3))
print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow   # two fresh processes, the first compiling cold: ~30-60 s on the shared 2-core machine
def test_a_second_start_reads_the_compiled_graph_from_disk(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", SECOND_START], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "hits 0 misses 1" in runs[0].stdout and "hits 1 misses 0" in runs[1].stdout
    assert "compiled the decode step for batch 1" in runs[1].stderr and str(tmp_path / "inductor") in runs[1].stderr


def test_a_servers_requests_count_for_auto_only_once_run(capsys, monkeypatch):
    """add_request/step (the server): a request's max_tokens is a bound, not a forecast, so "auto" counts its decode
    steps once they ran (compiling on the first long request would stall it); generate() knows its work ahead."""
    monkeypatch.setattr(engine_mod, "unavailable", lambda device: "stub: it would compile here")
    monkeypatch.setattr(engine_mod, "AUTO_MIN_STEPS", {"cpu": 10})
    eng = ns.Engine(build("tiny"), max_batch=4, mtp=False)
    eng.add_request([5, 6, 7], ns.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    for _ in range(5):
        eng.step()
    assert "it would compile here" not in capsys.readouterr().err     # 4 decode steps run, 95 more only possible
    for _ in range(10):
        eng.step()
    assert "it would compile here" in capsys.readouterr().err         # 10 run: from here it pays
