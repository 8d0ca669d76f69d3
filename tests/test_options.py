"""options.py: a command's flags, help and --config come from its config dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import pytest

from nanoseek.errors import UsageError
from nanoseek.options import add_options, make_config, read_toml, write_config


@dataclass
class Demo:
    model: str = ""                   # model folder
    steps: int = 10                   # optimizer steps
    lr: float = 1e-3
    resume: bool = False              # continue the run
    data: list[str] | None = None     # input files
    bias_update_speed: float = 0.0    # V3's gamma
    REQUIRED: ClassVar[tuple] = ("model",)
    ALIASES: ClassVar[dict] = {"bias_gamma": "bias_update_speed"}
    POSITIONAL: ClassVar[tuple] = ("model",)


def parse(argv):
    return make_config(Demo, add_options(argparse.ArgumentParser(), Demo).parse_args(argv))


def test_flags_types_bools_lists_aliases_and_positional():
    cfg = parse(["m", "--steps", "3", "--resume", "--data", "a.txt", "b.txt", "--bias-gamma", "0.5"])
    assert (cfg.model, cfg.steps, cfg.resume, cfg.data, cfg.bias_update_speed) == ("m", 3, True, ["a.txt", "b.txt"], 0.5)
    assert parse(["--model", "m", "--resume", "false"]).resume is False
    assert parse(["--model", "m", "--no-resume"]).resume is False
    with pytest.raises(UsageError, match="--model is required"):
        parse([])
    with pytest.raises(UsageError, match="given twice"):
        parse(["a", "--model", "b"])


def test_help_comes_from_field_comments():
    text = add_options(argparse.ArgumentParser(), Demo).format_help()
    assert "optimizer steps (default 10)" in text and "V3's gamma" in text and "--bias-gamma" in text


def test_toml_below_flags_aliases_resolved_unknown_keys_listed(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('model = "x"\nsteps = 7\nbias-gamma = 0.25\n')
    cfg = parse(["--config", str(f), "--steps", "9"])
    assert (cfg.model, cfg.steps, cfg.bias_update_speed) == ("x", 9, 0.25)
    f.write_text("stepz = 1\n")
    with pytest.raises(UsageError, match=r"unknown key\(s\) stepz; valid keys: model, steps"):
        read_toml(f, Demo)


def test_written_config_reads_back_as_the_same_config(tmp_path):
    cfg = Demo(model="m", steps=3, data=["a", "b"], resume=True)
    path = write_config(cfg, tmp_path / "config.toml")
    assert make_config(Demo, argparse.Namespace(config=str(path))) == cfg


def test_thread_default_is_one_for_small_models_and_all_cores_for_large(monkeypatch):
    import os

    import torch

    from nanoseek.options import default_threads, set_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_threads(1_300_000) == 1          # the demo model: 4.4 s -> 0.21 s per chat answer with one thread
    assert default_threads(7_000_000_000) == 8
    before = torch.get_num_threads()
    try:
        assert set_threads(0, 1_300_000) == 1 and torch.get_num_threads() == 1
        assert set_threads(2, 1_300_000) == 2 and torch.get_num_threads() == 2   # --threads N wins
    finally:
        torch.set_num_threads(before)
