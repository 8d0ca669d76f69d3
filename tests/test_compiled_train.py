"""The optional compiled training step (`nanoseek pretrain --compile`): in one process the whole loss as one inductor
graph, forward and backward (compiled.compile_losses); under torchrun every block its own graph
(compiled.compile_blocks). Either trains like the eager model, with the expert loads and the grouped experts inside
the graph."""

import pytest
import torch
from conftest import metrics_rows

from nanoseek.model.moe import compiled_grouped_mm
from nanoseek.train import optim
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.runtime import Runtime

FAST = dict(preset="tiny", seq_len=32, batch_size=8, lr=2e-2, corpus_docs=400, progress=False, device="cpu")
KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "load_imbalance")


def _run(tmp_path, tok_dir, name, **kw) -> list[dict]:
    out = tmp_path / name
    pretrain(PretrainConfig(out=str(out), steps=3, tokenizer=tok_dir, **{**FAST, **kw}))
    return metrics_rows(out)


def _gap(a: list[dict], b: list[dict]) -> float:
    """Largest difference of the logged losses, gradient norms and loads over the steps of two runs."""
    gaps = [abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in KEYS]
    gaps += [abs(x - y) for ra, rb in zip(a, b) for la, lb in zip(ra["expert_load"], rb["expert_load"])
             for x, y in zip(la, lb)]
    return max(gaps)


def test_compiled_pretraining_trains_like_eager_as_one_graph(tmp_path, corpus_tokenizer_dir):
    # tiny: a dense block, an MoE block (noaux_tc, bias update), the MTP block, the head and both losses; three steps
    # of pretrain each way
    eager = _run(tmp_path, corpus_tokenizer_dir, "eager")
    torch._dynamo.utils.counters.clear()
    compiled = _run(tmp_path, corpus_tokenizer_dir, "compiled", compile=True)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])      # hooks, loads, grouped experts: in graph
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])   # the whole loss, every step
    assert len(eager) == len(compiled) == 3
    assert _gap(eager, compiled) < 1e-5, (eager, compiled)
    # negative control: the same comparison sees a run whose learning rate differs by 1%
    assert _gap(eager, _run(tmp_path, corpus_tokenizer_dir, "other-lr", lr=2.02e-2)) > 1e-4


def test_without_a_compiler_training_stays_eager_and_says_why(monkeypatch):
    from nanoseek import ModelConfig, Transformer
    from nanoseek.infer import compiled

    monkeypatch.setattr(compiled, "unavailable", lambda device: "no C++ compiler found (g++)")
    model = Transformer(ModelConfig.preset("tiny"))
    for compile in (compiled.compile_blocks, compiled.compile_losses):
        note = compile(model, torch.device("cpu"))
        assert "no C++ compiler" in note and "eager" in note
    assert all(b._compiled_call_impl is None for b in [*model.layers, *model.mtp])
    assert "losses" not in vars(model)                                   # the class's own losses, not a compiled one


def test_deepseek_v4_compiles_block_by_block_where_a_whole_graph_would_break():
    # V4's MTP reads the residual streams through hooks registered in each forward: compile_losses compiles its
    # blocks instead (nothing compiles until the first step), and says so; a V3 model gets the whole loss
    from nanoseek import ModelConfig, Transformer
    from nanoseek.infer import compiled

    v4 = Transformer(ModelConfig.preset("v4-tiny"))
    assert "block by block" in compiled.compile_losses(v4, torch.device("cpu"))
    assert "losses" not in vars(v4) and all(b._compiled_call_impl is not None for b in v4.layers)
    v3 = Transformer(ModelConfig.preset("tiny"))
    assert "one graph" in compiled.compile_losses(v3, torch.device("cpu"))
    assert "losses" in vars(v3) and all(b._compiled_call_impl is None for b in v3.layers)


def test_compiled_grouped_mm_has_the_kernels_values_gradients_and_shape_function():
    g = torch.Generator().manual_seed(0)
    E, S, d_in, d_out = 3, 12, 8, 4
    x = torch.randn(S, d_in, generator=g, requires_grad=True)
    w = torch.randn(E, d_out, d_in, generator=g, requires_grad=True)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)          # expert 1 gets no rows
    y = compiled_grouped_mm(x, w, offs)
    ref = torch.cat([x[:4] @ w[0].t(), x[4:] @ w[2].t()])
    assert torch.allclose(y, ref, atol=1e-6)
    gy = torch.randn(S, d_out, generator=g)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    rx, rw = torch.autograd.grad(ref, (x, w), gy)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)
    assert gw[1].abs().max() == 0                                  # an expert without rows gets no gradient
    # negative control: rows assigned to the wrong experts give other values
    assert not torch.allclose(compiled_grouped_mm(x, w, torch.tensor([8, 8, 12], dtype=torch.int32)), ref, atol=1e-3)
    torch.library.opcheck(compiled_grouped_mm, (x.detach(), w.detach(), offs))   # fake kernel, autograd registration


def test_expert_loads_count_training_forwards_on_the_gates_once():
    from nanoseek import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).train()
    loads = optim.ExpertLoads(model, Runtime())
    optim.ExpertLoads(model, Runtime())                             # a second watcher adds no second count
    seen = []
    for m in loads.moes:
        m.gate.register_forward_hook(lambda mod, args, out: seen.append(out[1].flatten()))
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        model.losses(x[:, :-1], x[:, 1:])                           # no gradients: not a training forward
    assert not loads.fresh and loads.collect() == []
    seen.clear()
    model.losses(x[:, :-1], x[:, 1:])                               # main MoE layer, then the MTP block's
    assert loads.fresh
    got = loads.collect()
    want = [torch.bincount(idx, minlength=8).float() for idx in seen]
    assert len(got) == len(want) == len(loads.moes) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not loads.fresh and all(m.gate.routed_tokens.sum() == 0 for m in loads.moes)   # counting afresh
    assert not any("routed_tokens" in k for k in model.state_dict())                      # not saved with the model


@pytest.mark.slow   # one cold compile per family, 20-60 s each
@pytest.mark.parametrize("preset,how", [("tiny", "blocks"), ("v4-tiny", "blocks"), ("tiny-v3.2", "blocks"),
                                        ("tiny-qwen2", "blocks"), ("tiny-qwen2", "whole")])
def test_compiled_blocks_and_the_whole_loss_of_each_family_train_like_eager(preset, how):
    from nanoseek import ModelConfig, Transformer
    from nanoseek.infer import compiled
    from nanoseek.train.pretrain import train_step
    from nanoseek.train.runtime import TrainModule

    losses = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset(preset)).train()
        if compile and how == "blocks":
            assert "blocks compiled" in compiled.compile_blocks(model, torch.device("cpu"))
        elif compile:
            assert "one graph" in compiled.compile_losses(model, torch.device("cpu"))
        module = TrainModule(model)
        opt = optim.adamw(module, 1e-3, 0.1)
        optim.add_bias_update(opt, optim.ExpertLoads(model, Runtime()), 0.001)
        x = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
        losses[compile] = [train_step(module, opt, [(x[:, :-1], x[:, 1:])], mtp_lambda=0.3, grad_clip=1.0,
                                      rt=Runtime())["loss"] for _ in range(3)]
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) < 1e-5, losses
    assert losses[False][0] != losses[False][2]        # the weights moved: the comparison spans three updates


def test_compiled_mla_takes_explicit_attention_with_sdpas_values(monkeypatch):
    # while compiling on the CPU without model/cpu_attention.py's kernel (a CPU without AVX-512), MLA's full path
    # computes masked attention as two matmuls around a softmax (no zero columns for SDPA's kernel), up to
    # EXPLICIT_SCORES scores; the same values as SDPA under the mask
    import torch.nn.functional as F

    import nanoseek as ns
    from nanoseek.model import cpu_attention, mla

    monkeypatch.setattr(cpu_attention, "_state", {"error": "this CPU has no AVX-512"})

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 7, 3, 8, generator=g)
    v = torch.randn(2, 7, 3, 4, generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          scale=0.3).transpose(1, 2)
    assert torch.allclose(mla.explicit_attention(q, k, v, mask, 0.3), sdpa, atol=1e-6)
    assert not torch.allclose(mla.explicit_attention(q, k, v, mask, 0.31), sdpa, atol=1e-3)   # control

    calls = []
    real = mla.explicit_attention
    monkeypatch.setattr(mla, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    mask[6:, :6] = False                                                 # two documents per row
    eager = model(ids, mask=mask)
    assert not calls                                                     # eager: SDPA
    compiled = torch.compile(model, backend="eager", fullgraph=True)     # (dynamo's trace only: no inductor)
    assert torch.allclose(compiled(ids, mask=mask), eager, atol=1e-5) and calls
    calls.clear()
    compiled(ids)
    assert not calls                                                     # causal: SDPA's kernel skips masked blocks
    monkeypatch.setattr(mla, "EXPLICIT_SCORES", 0)       # above the bound: SDPA while compiling too (a new trace: dynamo
    compiled(ids, mask=mask)                             # guards on the bound's value)
    assert not calls


def test_a_compiled_training_graph_computes_the_rope_angles_once_as_one_op():
    # inside a training graph RotaryEmbedding's cos / sin are one opaque op (inlined, inductor would recompute them in
    # every kernel reading them); outside a graph, and in an inference graph (decode), the same plain arithmetic
    from nanoseek import ModelConfig
    from nanoseek.model.rope import RotaryEmbedding, cos_sin, rope_angles

    rotary = RotaryEmbedding(ModelConfig.preset("tiny"))
    positions = torch.arange(12).expand(2, 12)
    want = cos_sin(positions, rotary.inv_freq, rotary.attention_factor)
    assert torch.equal(rotary(positions)[0], want[0]) and torch.equal(rotary(positions)[1], want[1])
    got = rope_angles(positions, rotary.inv_freq, rotary.attention_factor)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.library.opcheck(rope_angles, (positions, rotary.inv_freq, rotary.attention_factor))

    def ops_traced(grad: bool) -> set:
        seen = set()

        def backend(gm, example_inputs):
            seen.update(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
            return gm

        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            got = torch.compile(rotary, backend=backend, fullgraph=True)(positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        return seen

    assert any("rope_angles" in t for t in ops_traced(True))
    inference = ops_traced(False)                      # negative control: the same trace with the op left out
    assert not any("rope_angles" in t for t in inference) and any("cos" in t for t in inference)
