"""DeepSeek-V4 training: `nanoseek pretrain --preset v4-tiny` learns with its MTP module and the auxiliary-loss-free
bias update on the learned-routing layers, resumes bit-exactly, and runs with AdamW or Muon (one process, DDP and
FSDP2 over gloo). The MTP module's weights round-trip through a folder under their published names (mtp.0.*).

One intra-op thread everywhere (see tests/test_pretrain.py); the 200-step run takes ~20 s of it.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metrics_rows
from safetensors import safe_open

import nanoseek as ns
from nanoseek.model.v4 import V4MoE
from nanoseek.model.v4_mtp import V4MTP, main_streams
from nanoseek.train import optim
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(preset="v4-tiny", seq_len=32, batch_size=8, corpus_docs=400, progress=False, device="cpu")


@pytest.fixture(scope="module")
def tok_dir(corpus_tokenizer_dir) -> str:
    return corpus_tokenizer_dir


rows = metrics_rows


def mean(xs) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("v4") / "adamw"
    pretrain(PretrainConfig(out=str(out), steps=200, tokenizer=tok_dir, **FAST))
    return out


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("v4") / "muon"
    pretrain(PretrainConfig(out=str(out), steps=60, optimizer="muon", tokenizer=tok_dir, **FAST))
    return out


# --------------------------------------------------------------------------------------------- learning
def test_200_steps_of_v4_tiny_lower_the_loss_and_the_mtp_loss(adamw_run):
    r = rows(adamw_run)
    assert [x["step"] for x in r] == list(range(1, 201))
    first, last = mean([x["loss"] for x in r[:20]]), mean([x["loss"] for x in r[-20:]])
    assert first > 4.5 and last < 0.5 * first, (first, last)     # starts near ln(512) = 6.2
    mtp = [x["mtp_loss"] for x in r]
    assert all(math.isfinite(v) and v > 0 for v in mtp)          # present (not V3's 0 for "no MTP") and finite
    assert mean(mtp[-20:]) < 0.5 * mean(mtp[:20]), (mtp[:3], mtp[-3:])
    assert len(r[-1]["expert_load"]) == 4 and all(sum(lo) == 8 * 32 * 2 for lo in r[-1]["expert_load"])


def test_muon_run_learns_too(muon_run):
    r = rows(muon_run)
    assert len(r) == 60 and all(math.isfinite(x["loss"]) for x in r)
    assert mean([x["loss"] for x in r[-10:]]) < 0.7 * mean([x["loss"] for x in r[:10]])


# --------------------------------------------------------------------------------------------- bias update
def test_bias_update_moves_the_learned_routing_biases_only(adamw_run):
    model = ns.load(adamw_run / "final")
    assert len(model.mtp) == 1 and isinstance(model.mtp[0], V4MTP)
    moes = [m for m in model.modules() if isinstance(m, V4MoE)]                 # 4 layers + the MTP block
    kinds = model.cfg.mlp_layer_types + ["moe"]
    assert len(moes) == 5 and kinds.count("hash_moe") == 1
    for kind, m in zip(kinds, moes):
        if kind == "hash_moe":   # routed by the frozen token table: no bias to move
            assert not hasattr(m.gate, "e_score_correction_bias")
        else:                    # b_i += gamma * sign(mean load - load_i) after every step
            assert (m.gate.e_score_correction_bias != 0).any(), kind


def test_bias_update_hook_skips_hash_routed_gates():
    model = ns.Transformer(ns.ModelConfig.preset("v4-tiny"))
    hashed = model.layers[0].mlp.gate
    before = {id(m.gate): m.gate.e_score_correction_bias.clone() for m in model.modules()
              if isinstance(m, V4MoE) and not m.gate.hashed}
    table = hashed.tid2eid.clone()
    opt = optim.adamw(model, 1e-3, 0.0)
    assert optim.add_bias_update(opt, optim.ExpertLoads(model, Runtime()), 0.01) is not None
    x = torch.randint(0, 512, (2, 17))
    out = model.losses(x[:, :-1], x[:, 1:])
    (out["loss"] + out["mtp_loss"]).backward()
    opt.step()
    for m in model.modules():
        if isinstance(m, V4MoE) and not m.gate.hashed:   # each learned bias moved by +-gamma (or 0 where balanced)
            delta = m.gate.e_score_correction_bias - before[id(m.gate)]
            gamma = torch.tensor(0.01)
            assert delta.abs().max() == gamma and ((delta == 0) | (delta.abs() == gamma)).all()
    assert torch.equal(hashed.tid2eid, table)


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("which", ["adamw", "muon"])
def test_stopped_and_resumed_run_matches_the_unbroken_one_bit_for_bit(which, adamw_run, muon_run, tmp_path, tok_dir):
    unbroken, steps, stop, resume_to = {"adamw": (adamw_run, 200, 30, 40), "muon": (muon_run, 60, 20, 30)}[which]
    kw = dict(out=str(tmp_path / "broken"), steps=steps, optimizer=which, tokenizer=tok_dir, **FAST)
    pretrain(PretrainConfig(stop_after=stop, **kw))
    pretrain(PretrainConfig(stop_after=resume_to, resume=True, **kw))
    got, want = rows(tmp_path / "broken"), rows(unbroken)[:resume_to]
    assert [x["step"] for x in got] == list(range(1, resume_to + 1))
    # fp32 on CPU: the same weights (MTP included), optimizer state (Muon's momentum too), routing biases, data
    for key in ("loss", "mtp_loss", "grad_norm", "lr", "expert_load"):
        assert [x[key] for x in got] == [x[key] for x in want], key


# --------------------------------------------------------------------------------------------- optimizers
def _one_step(model, which: str, x) -> dict:
    model = copy.deepcopy(model)
    opt = optim.build(which, model, 1e-2, 0.1)
    out = model.losses(x[:, :-1], x[:, 1:])
    (out["loss"] + 0.3 * out["mtp_loss"]).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_muon_takes_the_2d_matrices_but_embedding_and_head_and_its_update_is_not_adamw():
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("v4-tiny"))
    muon, adamw = optim.build("muon", model, 1e-2, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_muon.isdisjoint(on_adamw) and on_muon | on_adamw == set(names.values())
    assert on_muon == {n for n, p in model.named_parameters() if p.dim() == 2} - {"embed_tokens.weight",
                                                                                  "lm_head.weight"}
    assert {"embed_tokens.weight", "lm_head.weight", "layers.1.mlp.experts.gate_up_proj"} <= on_adamw
    assert "mtp.0.e_proj.weight" in on_muon and "layers.1.attn_hc.fn" in on_muon

    x = torch.randint(0, 512, (4, 33))
    d_muon, d_adamw = _one_step(model, "muon", x), _one_step(model, "adamw", x)
    w = "layers.2.self_attn.q_a_proj.weight"   # (q_lora_rank, hidden) = (32, 64)
    assert not torch.allclose(d_muon[w], d_adamw[w], atol=1e-4)
    for n in ("embed_tokens.weight", "lm_head.weight", "layers.1.mlp.experts.gate_up_proj", "norm.weight"):
        assert torch.equal(d_muon[n], d_adamw[n]), n          # the same AdamW step for what Muon does not take
    # Muon's step is the orthogonalised momentum: Newton-Schulz leaves its singular values alike (~[0.7, 1.2] x
    # lr * 0.2 sqrt(64) = 1.6e-2 here: max / min ~1.7 over seeds 0-2); AdamW's first step, ~lr * sign(gradient),
    # spreads them (max / min 6.7-7.8)
    s_muon, s_adamw = (torch.linalg.svdvals(d[w]) for d in (d_muon, d_adamw))
    assert s_muon.max() / s_muon.min() < 3 < s_adamw.max() / s_adamw.min(), (s_muon, s_adamw)


def test_unknown_optimizer_is_a_usage_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--preset", "v4-tiny", "--optimizer", "sgd",
                          "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2 and "unknown optimizer 'sgd'; valid optimizers: adamw, muon" in res.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------- MTP weights
def test_mtp_weights_round_trip_through_a_folder_under_their_published_names(adamw_run, tmp_path):
    model = ns.load(adamw_run / "final")
    ns.save(model, tmp_path / "again")
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    published = ["e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn",
                 "hc_head_base", "hc_head_scale", "attn.wq_a.weight", "attn.kv_norm.weight", "attn.attn_sink",
                 "attn_norm.weight", "hc_attn_fn", "hc_ffn_scale", "ffn.gate.weight", "ffn.gate.bias",
                 "ffn.experts.7.w2.weight", "ffn.shared_experts.w1.weight"]
    assert {f"mtp.0.{n}" for n in published} <= names
    assert not any(n.startswith("mtp.0.attn.compressor") for n in names)   # the MTP block is a sliding-window one
    back = ns.load(tmp_path / "again")
    want, got = model.state_dict(), back.state_dict()
    assert set(got) == set(want) and any(k.startswith("mtp.0.") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.randint(0, 512, (2, 24))
    assert torch.equal(back.losses(x[:, :-1], x[:, 1:])["mtp_loss"], model.losses(x[:, :-1], x[:, 1:])["mtp_loss"])


def test_mtp_reads_the_main_models_streams_and_the_token_after_next():
    """MTP depth 0 at position i predicts t_{i+2} from the main model's hc streams at i and the embedding of t_{i+1}:
    changing t_{i+1} alone changes the MTP logits at i but not the main logits there (causal, the token is ahead)."""
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("v4-tiny")).eval()
    x = torch.randint(0, 512, (1, 20))
    y = x.clone()
    y[0, 10] = (x[0, 10] + 1) % 512
    with torch.no_grad():
        outs = []
        for ids in (x, y):
            with main_streams(model) as streams:
                main = model(ids)
            mtp, _ = model.mtp_forward(streams[0][:, :-1], ids[:, 1:])
            outs.append((main, mtp))
    (hx, mx), (hy, my) = outs
    # equal up to float32 summation order (the experts each see another set of tokens): 1e-5; changed: > 1e-2
    torch.testing.assert_close(hx[:, 9], hy[:, 9], rtol=0, atol=1e-5)   # the main model at 9 has not seen t_10
    assert (mx[:, 9] - my[:, 9]).abs().max() > 1e-2                       # the MTP module at 9 reads t_10
    torch.testing.assert_close(mx[:, :9], my[:, :9], rtol=0, atol=1e-5)  # and nothing earlier depends on it


# --------------------------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_muon_run_matches_one_process(mode, tmp_path, tok_dir):
    """torchrun --nproc_per_node=2 with batch 2 each = one process with batch 2 and 2 accumulation steps. FSDP2
    shards the Muon matrices; torch.optim.Muon's Newton-Schulz runs on their DTensors, which gather as the matmuls
    need (torch 2.13), so the sharded update is the full-matrix one. Losses agree to 1e-4 relative (fp32 weights;
    DDP's exactly, as its Newton-Schulz runs on the same full gradient; FSDP's bf16 matmuls sum in another order)."""
    common = ["--preset", "v4-tiny", "--tokenizer", tok_dir, "--corpus-docs", "100", "--seq-len", "32",
              "--batch-size", "2", "--steps", "3", "--bias-update-speed", "0.01", "--optimizer", "muon",
              "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launch, extra in ((tmp_path / "one", [], ["--grad-accum", "2"]),
                               (tmp_path / mode, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                                ["--fsdp"] if mode == "fsdp" else [])):
        cmd = [sys.executable, *launch, "-m", "nanoseek.cli", "pretrain", *common, "--out", str(out), *extra]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ref, got = rows(tmp_path / "one"), rows(tmp_path / mode)
    assert len(got) == 3
    for a, b in zip(got, ref):
        for key in ("loss", "mtp_loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (mode, key, a[key], b[key])
        if mode == "ddp" or a["step"] == 1:    # all-reduced loads of the same routing
            assert a["expert_load"] == b["expert_load"], (mode, a["step"])
        else:   # FSDP: Muon's bf16 Newton-Schulz sums in another order, and a near tie may route a token elsewhere
            diff = [abs(x - y) for la, lb in zip(a["expert_load"], b["expert_load"]) for x, y in zip(la, lb)]
            assert sum(diff) <= 8, (a["expert_load"], b["expert_load"])     # of 4 layers x 128 tokens x top-2


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-flash"])
def test_num_params_with_mtp_counts_the_module_we_build(preset):
    """config.num_params(include_mtp=True) counts the MTP module as published (e/h projections, three norms, a
    sliding-window block with a biased gate, its hc head); the module built here has exactly that many (on the meta
    device for V4-Flash's 284B)."""
    cfg = ns.ModelConfig.preset(preset)
    with torch.device("meta"):
        model = ns.Transformer(cfg)
    built = sum(p.numel() for p in model.parameters())
    built += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert cfg.num_params(include_mtp=True)["total"] == built
    assert sum(p.numel() for p in model.mtp.parameters()) > 0


def test_learned_routing_layers_give_v3s_sequence_wise_balance_loss():
    """V3 eq. 17-20 on each learned-routing layer (not the hash-routed ones), summed in losses()["balance_loss"]:
    alpha * sum_i f_i P_i per sequence, f_i = E / (K T) * tokens of the sequence choosing expert i, P_i the mean of
    the token's normalised score s_i / sum_j s_j; recomputed here from the gates' outputs, sequence by sequence.
    It has a gradient for the learned gates; it is 0 in eval mode and with alpha 0."""
    from nanoseek.train.pretrain import model_config
    assert model_config(PretrainConfig(preset="v4-tiny", balance_alpha=0.02)).aux_loss_alpha == 0.02
    torch.manual_seed(0)
    cfg = ns.ModelConfig.preset("tiny-v4", aux_loss_alpha=0.01)
    model = ns.Transformer(cfg).train()
    B, T, E, K = 3, 16, cfg.n_routed_experts, cfg.num_experts_per_tok
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    seen = {}
    for i, m in enumerate(model.moe_layers()):
        m.gate.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
    out = model.losses(ids, ids)
    hand = 0.0
    learned = [i for i, t in enumerate(cfg.mlp_layer_types) if t == "moe"]
    for i in learned:
        _, idx, scores = seen[i]
        for b in range(B):
            s, chosen = scores.view(B, T, E)[b].detach(), idx.view(B, T, K)[b]
            f = torch.bincount(chosen.flatten(), minlength=E).double() * E / (K * T)
            p = (s / s.sum(-1, keepdim=True)).double().mean(0)
            hand += 0.01 * float((f * p).sum()) / B
    assert len(learned) == 3 and "hash_moe" in cfg.mlp_layer_types
    assert abs(out["balance_loss"].item() - hand) < 1e-6 * hand
    assert all((m.balance_loss is None) == m.gate.hashed for m in model.moe_layers())
    out["balance_loss"].backward()           # it trains the learned gates (P_i carries the scores' gradient)
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in model.moe_layers() if not m.gate.hashed)
    assert model.eval().losses(ids, ids)["balance_loss"].item() == 0.0
    no_alpha = ns.Transformer(cfg.replace(aux_loss_alpha=0.0)).train()
    assert no_alpha.losses(ids, ids)["balance_loss"].item() == 0.0
