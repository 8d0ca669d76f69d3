"""SFT and GRPO under torchrun: 2 gloo processes compute what 1 process computes.

Each process takes its share of the global batch (SFT rows, GRPO prompts); token counts, group and batch reward
statistics and the dapo / grpo denominators are reduced over processes, and GRPO's sampling seeds depend on a
completion's global index, so the per-step losses of 2 processes equal those of 1 to float32 summation order
(1e-4; a lost all-reduce or a rank-dependent seed moves them by 1e-2 or more). DDP and FSDP2 both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model folder with a 300-token tokenizer (what sft / grpo --model read)."""
    import nanoseek as ns
    from nanoseek.data.tasks import corpus_documents
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(list(corpus_documents(200)), 300, progress=False)
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    d = tmp_path_factory.mktemp("model")
    ns.save(model, d, tokenizer=tok)
    return d


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(args: list[str], timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def assert_same_steps(got: list[dict], want: list[dict], keys: tuple[str, ...], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3], what
    for a, b in zip(got, want):
        for k in keys:
            assert abs(a[k] - b[k]) < 1e-4, (what, a["step"], k, a[k], b[k])


def test_two_process_sft_matches_one_process(tmp_path, model_dir):
    from nanoseek.train.sft import SFTConfig, sft

    flags = dict(model=str(model_dir), task="arithmetic", steps=3, batch_size=4, seq_len=256, lr=3e-3, warmup=0,
                 bias_update_speed=0.01, progress=False, device="cpu")
    sft(SFTConfig(out=str(tmp_path / "one"), **flags))
    want = rows(tmp_path / "one")
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        torchrun(["-m", "nanoseek.cli", "sft", *argv, "--out", str(tmp_path / name), *extra])
        got = rows(tmp_path / name)
        assert_same_steps(got, want, ("loss", "mtp_loss", "grad_norm"), name)
        assert [r["trained_tokens"] for r in got] == [r["trained_tokens"] for r in want]   # global counts
        assert (tmp_path / name / "final" / "model.safetensors").exists()


GRPO_WORKER = '''
import sys
from nanoseek.train.grpo import GRPOConfig, grpo

def digit_reward(problems, texts, task):
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]

out, fsdp = sys.argv[1], sys.argv[2] == "fsdp"
grpo(GRPOConfig(**{**CFG, "out": out, "fsdp": fsdp}), reward_funcs=[digit_reward])
'''


def test_two_process_grpo_matches_one_process(tmp_path, model_dir):
    # batch-scaled advantages and the grpo loss (global std and sequence count), the KL to a reference model, two
    # optimizer steps per rollout, and micro-batches of 3 so that the processes run different numbers of rows
    cfg = dict(model=str(model_dir), task="arithmetic", steps=3, prompts_per_step=4, group_size=4, max_tokens=8,
               lr=3e-2, beta=0.04, num_iterations=2, loss_type="grpo", scale_rewards="batch", mask_truncated=False,
               micro_batch=3, progress=False, save_every=100, device="cpu")
    worker = tmp_path / "worker.py"
    worker.write_text(f"CFG = {cfg!r}\n" + GRPO_WORKER)
    env_run = [sys.executable, str(worker), str(tmp_path / "one"), "ddp"]
    res = subprocess.run(env_run, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    want = rows(tmp_path / "one")
    assert any(r["loss"] != 0 for r in want)      # the comparison has something to compare
    for name in ("ddp", "fsdp"):
        torchrun([str(worker), str(tmp_path / name), name])
        assert_same_steps(rows(tmp_path / name), want, ("reward_mean", "loss", "kl", "entropy", "grad_norm"), name)
