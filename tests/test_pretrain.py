"""`nanoseek pretrain` and the shared loop pieces: exact resume, crash-safe checkpoints, Ctrl-C, V3 bias balancing,
data parallelism (DDP / FSDP2 over gloo), learning, and bad input -> one error line and exit code 2.

Every run uses the `tiny` preset on a few hundred tokens per step, with one intra-op thread: on a 2-core machine
shared with other jobs, two OpenMP threads spin against each other and make a tiny step ~15x slower.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import metrics_rows

from nanoseek.train import optim
from nanoseek.train.pretrain import PretrainConfig, pretrain, train_step
from nanoseek.train.run import check_checkpoint, find_resume_checkpoint, list_checkpoints
from nanoseek.train.runtime import Runtime, TrainModule

ROOT = Path(__file__).resolve().parents[1]
# device="cpu" everywhere: bit-exact comparisons are fp32 CPU claims, even on a machine with a GPU
FAST = dict(preset="tiny", seq_len=32, batch_size=8, lr=2e-2, corpus_docs=400, progress=False, device="cpu")


@pytest.fixture(scope="module")
def tok_dir(corpus_tokenizer_dir) -> str:
    return corpus_tokenizer_dir


rows = metrics_rows


def cli(args: list[str], env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# --------------------------------------------------------------------------------------------- learning + resume
@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tok_dir):
    """An unbroken 60-step run on the embedded corpus (shared by the learning and the resume tests)."""
    out = tmp_path_factory.mktemp("run") / "unbroken"
    pretrain(PretrainConfig(out=str(out), steps=60, tokenizer=tok_dir, **FAST))
    return out


def test_tiny_loss_on_embedded_corpus_falls_by_half(unbroken):
    r = rows(unbroken)
    assert [x["step"] for x in r] == list(range(1, 61))
    first, last10 = r[0]["loss"], sum(x["loss"] for x in r[-10:]) / 10
    assert first > 5.5  # ~ln(496): a fresh model is uniform over the vocabulary
    assert last10 <= 0.5 * first, (first, last10)
    assert r[-1]["mtp_loss"] < 0.6 * r[0]["mtp_loss"]  # the MTP head (token after next) learns too
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "load_imbalance",
                "expert_load", "tokens_seen"):
        assert key in r[-1], key
    assert len(r[-1]["expert_load"]) == 1 and sum(r[-1]["expert_load"][0]) == 8 * 32 * 2  # tokens x top-2
    for f in ("loss.png", "experts.png", "final/config.json", "final/model.safetensors", "final/tokenizer.json"):
        assert (unbroken / f).exists(), f
    import nanoseek as ns

    model = ns.load(unbroken / "final")
    assert model.cfg.num_nextn_predict_layers == 1  # the MTP module is saved with the model


def test_effective_config_is_written_into_the_run_folder(unbroken, tok_dir):
    # OUT/config.toml repeats the run: read back through --config it gives the very config the run used
    cfg = parse(["--config", str(unbroken / "config.toml")])
    assert cfg == PretrainConfig(out=str(unbroken), steps=60, tokenizer=tok_dir, **FAST)


def test_bias_update_hook_moves_every_noaux_tc_bias_mtp_included(unbroken):
    import nanoseek as ns
    from nanoseek.model import MoE

    model = ns.load(unbroken / "final")
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    assert len(gates) == 2 and all(g.topk_method == "noaux_tc" for g in gates)   # main MoE layer + the MTP block
    assert all(g.e_score_correction_bias.abs().sum() > 0 for g in gates)


def test_bias_update_hook_is_registered_for_noaux_tc_gates_only():
    from nanoseek import ModelConfig, Transformer

    for method, scoring, expect in (("noaux_tc", "sigmoid", True), ("greedy", "softmax", False)):
        model = Transformer(ModelConfig.preset("tiny", topk_method=method, scoring_func=scoring))
        opt = optim.adamw(model, 1e-3, 0.0)
        handle = optim.add_bias_update(opt, optim.ExpertLoads(model, Runtime()), 0.01)
        assert (handle is not None) == expect and len(opt._optimizer_step_post_hooks) == expect, method
        assert optim.add_bias_update(opt, optim.ExpertLoads(model, Runtime()), 0.0) is None   # speed 0: off


def test_stop_at_10_and_resume_to_20_is_bit_identical(unbroken, tmp_path, tok_dir):
    out = tmp_path / "broken"
    kw = dict(out=str(out), steps=60, tokenizer=tok_dir, **FAST)
    pretrain(PretrainConfig(stop_after=10, **kw))
    assert [p.name for p in list_checkpoints(out)] == ["step-10"]
    pretrain(PretrainConfig(stop_after=20, resume=True, **kw))
    got, want = rows(out), rows(unbroken)[:20]
    assert [x["step"] for x in got] == list(range(1, 21))
    # bit-identical: fp32 on CPU, same weights, optimizer moments, routing biases, data position and lr
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "expert_load"):
        assert [x[key] for x in got] == [x[key] for x in want], key


# --------------------------------------------------------------------------------------------- crash safety
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, tok_dir):
    import nanoseek as ns

    out = tmp_path / "killed"
    args = ["--tokenizer", tok_dir, "--corpus-docs", "100", "--steps", "4", "--save-every", "2", "--seq-len", "32",
            "--batch-size", "4", "--out", str(out), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_TEST_CKPT_SLEEP": "4:120"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "ckpt" / ".tmp-step-4" / "model.safetensors"
    try:
        deadline = time.time() + 120
        while not partial.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert partial.exists(), "the writer never reached the test hook"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "ckpt" / "step-4").exists()          # the half-written one never got its name
    prev = out / "ckpt" / "step-2"
    assert check_checkpoint(prev) is None
    assert find_resume_checkpoint(out, log=lambda m: None) == prev
    ns.load(prev)
    # and the run continues from it
    pretrain(PretrainConfig(out=str(out), steps=4, resume=True, tokenizer=tok_dir, corpus_docs=100, seq_len=32,
                            batch_size=4, progress=False, device="cpu"))
    assert [x["step"] for x in rows(out)] == [1, 2, 3, 4]
    assert check_checkpoint(out / "ckpt" / "step-4") is None


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tok_dir):
    out = tmp_path / "interrupted"
    args = ["--tokenizer", tok_dir, "--corpus-docs", "100", "--steps", "500", "--seq-len", "32", "--batch-size", "4",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1 and check_checkpoint(ckpts[0]) is None
    step = int(ckpts[0].name.split("-")[1])
    assert 2 <= step < 500 and rows(out)[-1]["step"] == step
    assert (out / "loss.png").exists() and not (out / "final").exists()


# --------------------------------------------------------------------------------------------- V3 balancing
def _skewed_imbalance(gamma: float, steps: int = 12) -> list[float]:
    """Train the tiny model whose gates favour expert 0 for every token (a shared embedding direction that
    gate row 0 reads strongly) and return the load imbalance (max/mean) after each step."""
    from nanoseek import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", aux_loss_alpha=0.0)).train()  # no balance loss: bias only
    loads = optim.ExpertLoads(model, Runtime())
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = 1.0
        for moe in loads.moes:
            moe.gate.weight.normal_(0.0, 0.3)   # spread the scores so routing differs from token to token
            moe.gate.weight[0, 0] = 0.5         # ... but expert 0 wins for all of them (logit ~ +4)
    module = TrainModule(model)
    opt = torch.optim.AdamW(optim.param_groups(module, 0.1), lr=1e-3)
    optim.add_bias_update(opt, loads, gamma)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randint(0, 512, (2, 33), generator=g)
        train_step(module, opt, [(x[:, :-1], x[:, 1:])], mtp_lambda=0.3, grad_clip=1.0, rt=Runtime())
        out.append(optim.load_imbalance([t.tolist() for t in loads.collect()[:1]]))   # the main MoE layer
    return out


def test_bias_update_balances_skewed_routing_and_gamma_zero_does_not():
    # tiny: top-2 of 8 experts, so "every token on expert 0" is max/mean = 8 / 2 = 4
    off = _skewed_imbalance(0.0)
    on = _skewed_imbalance(0.05)
    assert off[0] == on[0] == 4.0
    assert min(off) >= 3.9, off                      # no bias update: the skew stays (gate lr is small)
    assert sum(on[4:]) / len(on[4:]) < 3.2, on        # bias update: load moves off expert 0 within a few steps


# --------------------------------------------------------------------------------------------- data parallel
def test_two_process_gloo_runs_match_one_process(tmp_path, tok_dir):
    """torchrun --nproc_per_node=2 (DDP, then FSDP2) with batch 2 per process = one process with batch 2 and 2
    accumulation steps: the same 4 sequences per step. Losses agree to 1e-4 relative (fp32; only the order of
    the gradient sums differs)."""
    common = dict(tokenizer=tok_dir, corpus_docs=100, seq_len=32, batch_size=2, steps=3, progress=False,
                  bias_update_speed=0.01, device="cpu")
    pretrain(PretrainConfig(out=str(tmp_path / "one"), grad_accum=2, **common))
    ref = rows(tmp_path / "one")
    args = ["--tokenizer", tok_dir, "--corpus-docs", "100", "--seq-len", "32", "--batch-size", "2", "--steps", "3",
            "--bias-update-speed", "0.01", "--no-progress", "--device", "cpu"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "nanoseek.cli", "pretrain", *args, "--out", str(tmp_path / name), *extra]
        res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        got = rows(tmp_path / name)
        assert len(got) == 3
        for a, b in zip(got, ref):
            for key in ("loss", "mtp_loss"):
                assert math.isclose(a[key], b[key], rel_tol=1e-4), (name, key, a[key], b[key])
            assert a["expert_load"] == b["expert_load"], name   # loads are all-reduced over both processes
        assert check_checkpoint(tmp_path / name / "ckpt" / "step-3") is None  # rank 0 wrote a checkpoint


# --------------------------------------------------------------------------------------------- loop pieces
def test_lr_schedules_warm_up_then_cosine_or_wsd():
    lr = lambda s, sched: optim.lr_at(s, total=100, lr=1.0, warmup=10, schedule=sched, min_lr_ratio=0.1,
                                     decay_frac=0.2)
    assert lr(0, "cosine") == pytest.approx(0.1) and lr(9, "cosine") == pytest.approx(1.0)
    assert lr(10, "cosine") == pytest.approx(1.0) and lr(99, "cosine") == pytest.approx(0.1, abs=1e-3)
    assert lr(55, "cosine") == pytest.approx(0.55)   # halfway through the cosine: (1 + 0.1) / 2
    assert lr(79, "wsd") == 1.0 and lr(89, "wsd") == pytest.approx(0.55) and lr(99, "wsd") == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from nanoseek import ModelConfig, Transformer

    model = Transformer(ModelConfig.preset("tiny"))
    decay, no_decay = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed_tokens.weight", "norm.weight"}
    assert all(p.dim() >= 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)].endswith("experts.gate_up_proj") for p in decay["params"])


def parse(argv: list[str]) -> PretrainConfig:
    import argparse

    from nanoseek.options import add_options, make_config

    return make_config(PretrainConfig, add_options(argparse.ArgumentParser(), PretrainConfig).parse_args(argv))


def test_toml_config_is_overridden_by_flags(tmp_path):
    (tmp_path / "c.toml").write_text('preset = "cpu"\nsteps = 7\nbias-update-speed = 0.002\n')
    cfg = parse(["--config", str(tmp_path / "c.toml"), "--steps", "9"])
    assert (cfg.preset, cfg.steps, cfg.bias_update_speed, cfg.lr) == ("cpu", 9, 0.002, PretrainConfig.lr)


def test_old_name_bias_gamma_still_works_as_flag_and_toml_key(tmp_path):
    assert parse(["--bias-gamma", "0.004"]).bias_update_speed == 0.004
    (tmp_path / "old.toml").write_text("bias_gamma = 0.003\n")
    assert parse(["--config", str(tmp_path / "old.toml")]).bias_update_speed == 0.003


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tok_dir) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("small") / "run"
    pretrain(PretrainConfig(out=str(out), steps=2, save_every=1, tokenizer=tok_dir, corpus_docs=100, seq_len=32,
                            batch_size=2, progress=False, device="cpu"))
    return out


def run_main(argv, capsys) -> tuple[int, str]:
    from nanoseek.cli import main

    rc = main(["pretrain", "--no-progress", "--device", "cpu", *argv])
    return rc, capsys.readouterr().err


def test_missing_data_file_is_one_error_line_exit_2(tmp_path):
    res = cli(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"), "--steps", "2", "--device", "cpu"])
    assert res.returncode == 2
    assert "nope.jsonl" in one_error_line(res.stderr)
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_on_resume_is_an_error_and_nothing_is_overwritten(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    shutil.rmtree(run / "ckpt" / "step-1")
    f = run / "ckpt" / "step-2" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])     # truncated
    before = snapshot(run)
    res = cli(["--resume", "--out", str(run), "--steps", "4", "--device", "cpu"])
    assert res.returncode == 2
    assert "step-2" in one_error_line(res.stderr)
    assert snapshot(run) == before


def test_an_old_run_folder_with_old_config_names_still_resumes(small_run, tmp_path):
    # a run folder as the trainers wrote it before this layout: the config inside trainer_state.json says
    # bias_gamma, there is no config.toml; resumed with the old flag name
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "config.toml").unlink()
    for ck in list_checkpoints(run):
        doc = json.loads((ck / "trainer_state.json").read_text())
        conf = doc["state"]["config"]
        conf["bias_gamma"] = conf.pop("bias_update_speed")
        (ck / "trainer_state.json").write_text(json.dumps(doc))
    res = cli(["--resume", "--out", str(run), "--steps", "3", "--bias-gamma", "0.002", "--corpus-docs", "100",
               "--seq-len", "32", "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [1, 2, 3]
    assert rows(run)[:2] == rows(small_run)
    assert "bias_update_speed = 0.002" in (run / "config.toml").read_text()


def test_partial_newest_checkpoint_is_skipped_for_an_older_complete_one(small_run, tmp_path, tok_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "ckpt" / "step-2" / "trainer_state.json").unlink()    # as if copied half-way
    assert check_checkpoint(run / "ckpt" / "step-2") is not None
    pretrain(PretrainConfig(out=str(run), steps=2, resume=True, tokenizer=tok_dir, corpus_docs=100, seq_len=32,
                            batch_size=2, progress=False, device="cpu"))
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "resumed from" in out and "step-1" in out
    assert rows(run)[-1]["step"] == 2 and rows(run)[-1]["loss"] == rows(small_run)[-1]["loss"]
    assert check_checkpoint(run / "ckpt" / "step-2") is None
    assert list((run / "ckpt").glob("step-2.damaged-*"))          # the damaged folder is kept aside, not deleted


@pytest.mark.parametrize("case", ["empty", "short", "vocab", "preset", "config_key", "existing_out",
                                  "resume_other_data"])
def test_bad_input_is_one_error_line_exit_2_and_nothing_overwritten(case, tmp_path, tok_dir, small_run, capsys):
    out = tmp_path / "out"
    argv = ["--tokenizer", tok_dir, "--out", str(out), "--steps", "2", "--seq-len", "32"]
    expect = {"empty": "empty", "short": "fewer than one training sequence", "vocab": "--vocab-size",
              "preset": "valid presets: tiny", "config_key": "valid keys:", "existing_out": "--resume",
              "resume_other_data": "resume with the same --data"}[case]
    if case == "empty":
        (tmp_path / "e.txt").write_text("")
        argv += ["--data", str(tmp_path / "e.txt")]
    elif case == "short":
        (tmp_path / "s.txt").write_text("1 + 1 = 2")
        argv += ["--data", str(tmp_path / "s.txt")]
    elif case == "vocab":
        argv += ["--vocab-size", "300", "--corpus-docs", "10"]      # the tokenizer has 496 tokens
    elif case == "preset":
        argv += ["--preset", "huge"]
    elif case == "config_key":
        (tmp_path / "c.toml").write_text("steps = 3\nlearning_rate = 0.1\n")
        argv += ["--config", str(tmp_path / "c.toml")]
    elif case == "existing_out":
        out = tmp_path / "run"
        shutil.copytree(small_run, out)
        argv += ["--out", str(out), "--corpus-docs", "10"]
    elif case == "resume_other_data":
        out = tmp_path / "run"
        shutil.copytree(small_run, out)
        (tmp_path / "other.txt").write_text("other text " * 100)
        argv += ["--out", str(out), "--resume", "--data", str(tmp_path / "other.txt")]
    before = snapshot(out) if out.exists() else None
    rc, err = run_main(argv, capsys)
    assert rc == 2
    assert expect in one_error_line(err)
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before


def unfuse_trainer_state(ck: Path) -> int:
    """Rewrite a checkpoint's optimizer state as runs wrote it before the projections were fused (gate_proj and
    up_proj apart, ...): each fused tensor split into its parts' rows, under their names. Returns how many split."""
    from safetensors.torch import load_file, save_file

    from nanoseek.config import ModelConfig
    from nanoseek.model.weights import FUSED, part_sizes
    cfg = ModelConfig.from_hf(json.loads((ck / "config.json").read_text()))
    tensors, doc = load_file(ck / "trainer_state.safetensors"), json.loads((ck / "trainer_state.json").read_text())
    parts_of = {}
    for key in list(tensors):
        if not key.startswith("optim/"):
            continue
        fqn, k = key[len("optim/"):].rsplit("/", 1)
        path, _, last = fqn.rpartition(".")
        module = path.rpartition(".")[2]
        if module not in FUSED:
            continue
        t = tensors.pop(key)
        olds = [f"{path.rpartition('.')[0]}.{p}.{last}" for p in FUSED[module]]
        dim = -2 if t.dim() >= 2 else 0
        pieces = torch.split(t, part_sizes(fqn, t.shape[dim], cfg), dim=dim) if t.dim() else [t] * len(olds)
        for old, piece in zip(olds, pieces):
            tensors[f"optim/{old}/{k}"] = piece.clone()
        parts_of[fqn] = olds
    scalars = doc["optimizer"]["scalars"]
    for fqn, olds in parts_of.items():
        sc = scalars.pop(fqn, None)
        for old in olds:
            if sc is not None:
                scalars[old] = dict(sc)
    for g in doc["optimizer"]["param_groups"]:
        g["params"] = [old for p in g["params"] for old in parts_of.get(p, [p])]
    save_file(tensors, ck / "trainer_state.safetensors")
    doc["files"]["trainer_state.safetensors"] = (ck / "trainer_state.safetensors").stat().st_size
    (ck / "trainer_state.json").write_text(json.dumps(doc))
    return len(parts_of)


def test_a_run_saved_before_the_projections_were_fused_resumes_with_its_optimizer_state(small_run, tmp_path):
    """The AdamW moments of gate_up_proj (and the other fused weights) come back from a checkpoint that keeps them
    per part, as older runs wrote them: resuming it continues exactly as resuming the same checkpoint as written now."""
    runs = {}
    for name in ("now", "old"):
        run = runs[name] = tmp_path / name
        shutil.copytree(small_run, run)
        shutil.rmtree(run / "ckpt" / "step-2")
        if name == "old":
            assert unfuse_trainer_state(run / "ckpt" / "step-1") > 0
        res = cli(["--resume", "--out", str(run), "--steps", "3", "--corpus-docs", "100", "--seq-len", "32",
                   "--batch-size", "2", "--no-progress", "--device", "cpu"])
        assert res.returncode == 0, res.stderr[-2000:]
    assert [r["loss"] for r in rows(runs["old"])] == [r["loss"] for r in rows(runs["now"])]
    assert len(rows(runs["now"])) == 3


def test_unfused_optimizer_state_fuses_back_exactly():
    from nanoseek.model.weights import fuse_param_state
    g, u = torch.randn(4, 3), torch.randn(2, 3)
    state = {"layers.0.mlp.gate_proj.weight": {"exp_avg": g, "step": torch.tensor(5.0)},
             "layers.0.mlp.up_proj.weight": {"exp_avg": u, "step": torch.tensor(5.0)},
             "layers.0.self_attn.q_proj.weight": {"exp_avg": g}}          # MLA without q_lora: stays apart
    groups = [{"params": ["layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                          "layers.0.self_attn.q_proj.weight"], "lr": 1.0}]
    fused, fgroups = fuse_param_state(dict(state), groups)
    assert torch.equal(fused["layers.0.mlp.gate_up_proj.weight"]["exp_avg"], torch.cat([g, u]))
    assert fused["layers.0.mlp.gate_up_proj.weight"]["step"].item() == 5.0
    assert "layers.0.self_attn.q_proj.weight" in fused and "layers.0.mlp.gate_proj.weight" not in fused
    assert fgroups[0]["params"] == ["layers.0.mlp.gate_up_proj.weight", "layers.0.self_attn.q_proj.weight"]
