"""Training DeepSeek Sparse Attention with `nanoseek pretrain --dsa` (DeepSeek-V3.2, arXiv 2512.02556 Section 2.1.1)
on tiny-v3.2 (index_topk 16) with 64-token rows, so that most queries see more tokens than they may keep.

The recipe, each stage one `pretrain` call that starts (--init) from an earlier stage's final/, same data and seed:
  base    60 steps --dsa dense from random weights: the dense model DSA starts from (its indexers stay random)
  warm    60 steps --dsa warmup from base: only the indexers learn, by their KL to the dense attention
  sparse  60 steps --dsa sparse from warm;  dense: the same 60 steps with --dsa dense (the baseline)
  nowarm  60 steps --dsa sparse from base: the negative control, no warm-up

Measured (CPU, float32, one thread; also in docs/benchmarks.md):
  warm-up: indexer KL 1.33 at step 1 -> 0.17 (mean of the last 5 steps), kept_mass 0.60 -> 0.94
  dense stage (nothing trains the indexer): KL 0.18 -> 0.38, it grows as the model's attention sharpens
  loss, mean of the last 10 steps: dense 1.575, sparse 1.588 (+0.8%), sparse without warm-up 1.698 (+7.8%)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.config import ModelConfig
from nanoseek.errors import UsageError
from nanoseek.model import Transformer
from nanoseek.options import add_options, make_config
from nanoseek.train.pretrain import PretrainConfig, pretrain, train_step
from nanoseek.train.runtime import Runtime, TrainModule

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(seq_len=64, batch_size=8, corpus_docs=400, progress=False, device="cpu", steps=60)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean(rs: list[dict], key: str) -> float:
    return sum(r[key] for r in rs) / len(rs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The recipe of the module docstring (~15 s on one thread)."""
    root = tmp_path_factory.mktemp("dsa")

    def stage(name, **kw):
        pretrain(PretrainConfig(out=str(root / name), **{**FAST, **kw}))

    stage("base", preset="tiny-v3.2", dsa="dense", lr=2e-2)
    stage("warm", init=str(root / "base" / "final"), dsa="warmup", lr=1e-2)
    for name, start, dsa in (("sparse", "warm", "sparse"), ("dense", "warm", "dense"), ("nowarm", "base", "sparse")):
        stage(name, init=str(root / start / "final"), dsa=dsa, lr=3e-3)
    return root


def test_warmup_lowers_the_indexer_kl_by_more_than_half(runs):
    r = rows(runs / "warm")
    first, last = r[0]["indexer_kl"], mean(r[-5:], "indexer_kl")
    assert first > 0.5 and last < 0.5 * first, (first, last)          # measured 1.33 -> 0.17
    assert mean(r[-5:], "kept_mass") > r[0]["kept_mass"] + 0.2         # 0.60 -> 0.94: selection keeps more


def test_without_indexer_training_the_kl_does_not_fall(runs):
    """The negative control of the warm-up: the same KL, measured while only the model trains (--dsa dense), does
    not halve; and sparse training without warm-up starts from a KL several times the warmed-up one."""
    r = rows(runs / "dense")
    assert mean(r[-5:], "indexer_kl") > 0.5 * r[0]["indexer_kl"]     # measured 0.18 -> 0.38
    assert rows(runs / "nowarm")[0]["indexer_kl"] > 3 * rows(runs / "sparse")[0]["indexer_kl"]   # 1.04 vs 0.16


def test_warmup_changes_only_the_indexers(runs):
    """Everything but the main layers' indexers is bit-identical after the warm-up (routing biases included), and
    the optimizer holds state for the indexers only."""
    before = load_file(runs / "base" / "final" / "model.safetensors")
    after = load_file(runs / "warm" / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # (the checkpoint names the MTP block model.layers.2, after tiny-v3.2's 2 layers: its indexer is not trained)
    indexers = {k for k in before if ".indexer." in k and k.split(".")[2] in ("0", "1")}
    assert indexers and changed == indexers, sorted(changed ^ indexers)[:5]
    state = load_file(runs / "warm" / "ckpt" / "step-60" / "trainer_state.safetensors")
    optim_keys = [k for k in state if k.startswith("optim/")]
    assert optim_keys and all(".indexer." in k for k in optim_keys)


def test_sparse_training_ends_within_2_percent_of_dense_and_not_without_warmup(runs):
    """Same steps, same batches, same start: the loss (mean of the last 10 steps) with DSA is within 2% of dense
    attention's. The comparison can fail: without the warm-up, sparse training ends ~8% above dense."""
    dense, sparse, nowarm = (mean(rows(runs / n)[-10:], "loss") for n in ("dense", "sparse", "nowarm"))
    assert sparse <= 1.02 * dense, (sparse, dense)                     # measured 1.588 vs 1.575
    assert nowarm > 1.02 * dense, (nowarm, dense)                      # 1.698


def test_metrics_log_indexer_kl_and_kept_mass(runs):
    """indexer_kl every step; kept_mass every step of the dense and warm-up stages, and in sparse training every
    --kept-mass-every (10) steps and the last, from a no-grad dense forward."""
    for name in ("base", "warm", "dense"):
        assert all(r["indexer_kl"] >= 0 and 0 < r["kept_mass"] <= 1 for r in rows(runs / name))
    r = rows(runs / "sparse")
    assert all(x["indexer_kl"] >= 0 for x in r)
    assert [x["step"] for x in r if "kept_mass" in x] == [1, 11, 21, 31, 41, 51, 60]
    assert all(0.5 < x["kept_mass"] < 1 for x in r if "kept_mass" in x)   # ~0.94: not the sparse forward's 1.0


def test_sparse_step_updates_the_model_as_its_loss_alone():
    """In a sparse step the indexer KL trains the indexers and nothing else, even with clipping active: the model's
    parameters move exactly as when the indexers are frozen (the KL's gradient never mixes with L's). Fails when
    train_step clips the two gradients together."""
    torch.manual_seed(0)
    start = Transformer(ModelConfig.preset("tiny-v3.2"))
    with torch.no_grad():   # a peaked indexer: its KL gradient (norm ~1.8) as large as the model's (~1.6)
        for name, p in start.named_parameters():
            p.mul_(20.0 if ".indexer." in name and p.dim() == 2 else 1.0)
    x = torch.randint(0, 500, (2, 41))                                  # 40 queries > index_topk 16
    both, model_only = copy.deepcopy(start), copy.deepcopy(start)
    for name, p in model_only.named_parameters():
        p.requires_grad_(".indexer." not in name)
    for m in (both, model_only):    # SGD: an update proportional to the clipped gradient (AdamW's first step is not)
        module = TrainModule(m)
        sgd = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        train_step(module, sgd, [(x[:, :-1], x[:, 1:])], mtp_lambda=0.3, grad_clip=0.05, rt=Runtime(), dsa="sparse")
    s0, s1, s2 = (dict(m.named_parameters()) for m in (start, both, model_only))
    rest = [n for n in s0 if ".indexer." not in n]
    assert all(torch.equal(s1[n], s2[n]) for n in rest)
    assert sum(not torch.equal(s0[n], s1[n]) for n in rest) > 0.9 * len(rest)          # (the model did move)
    indexers = [n for n in s0 if ".indexer." in n and n.startswith("layers.")]
    assert all(not torch.equal(s0[n], s1[n]) and torch.equal(s0[n], s2[n]) for n in indexers)


def test_warmup_resumes_exactly(tmp_path, runs):
    """A warm-up stopped after 3 steps and resumed ends with the weights and log of an unbroken 6-step warm-up."""
    kw = {**FAST, "init": str(runs / "base" / "final"), "dsa": "warmup", "lr": 1e-2, "steps": 6}
    pretrain(PretrainConfig(out=str(tmp_path / "a"), **kw))
    pretrain(PretrainConfig(out=str(tmp_path / "b"), stop_after=3, **kw))
    pretrain(PretrainConfig(out=str(tmp_path / "b"), resume=True, **kw))
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["indexer_kl"] for r in rows(tmp_path / "a")] == [r["indexer_kl"] for r in rows(tmp_path / "b")]


def test_dsa_options_parse_and_refuse_bad_input(tmp_path):
    parse = lambda argv: make_config(PretrainConfig, add_options(argparse.ArgumentParser(), PretrainConfig)
                                     .parse_args(argv))
    cfg = parse(["--dsa", "warmup", "--init", "runs/base/final", "--kept-mass-every", "5"])
    assert (cfg.dsa, cfg.init, cfg.kept_mass_every) == ("warmup", "runs/base/final", 5)
    (tmp_path / "c.toml").write_text('dsa = "sparse"\npreset = "tiny-v3.2"\n')
    assert parse(["--config", str(tmp_path / "c.toml")]).dsa == "sparse"
    bad = [(dict(preset="tiny", dsa="warmup"), "no lightning indexers"), (dict(preset="tiny-v3.2", dsa="on"),
           "--dsa takes warmup, sparse, dense"), (dict(init=str(tmp_path), vocab_size=600), "drop --vocab-size"),
           (dict(init=str(tmp_path / "nowhere")), "no config.json")]
    for kw, message in bad:
        with pytest.raises(UsageError, match=message):
            pretrain(PretrainConfig(out=str(tmp_path / "out"), **{**FAST, **kw}))
        assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--dsa", "sparse",
                           "--out", str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --dsa sparse: tiny has no lightning indexers")
