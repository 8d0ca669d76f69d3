"""The speedrun recipe end to end on a minute-sized stage file: every stage runs through the same functions its
command runs, eval stages print their pass@1 as they finish, stages.json records load and threads, the report
lists every stage, and a re-run skips what is done."""

from __future__ import annotations

import json

from nanoseek import speedrun

MINI = """
[speedrun]
docs = 300
eval_n = 4
task = "linear"

[pretrain]
preset = "tiny"
steps = 6
batch_size = 4
seq_len = 64
progress = false

[sft]
steps = 2
batch_size = 2
seq_len = 128
progress = false

[grpo]
steps = 2
prompts_per_step = 2
group_size = 2
max_tokens = 12
progress = false
"""


def test_speedrun_recipe_runs_every_stage_and_a_rerun_skips_them(tmp_path, capsys):
    stages = tmp_path / "mini.toml"
    stages.write_text(MINI)
    out = tmp_path / "run"
    cfg = speedrun.SpeedrunConfig(preset="tiny", stages=str(stages), out=str(out), threads=1)
    assert speedrun.main(cfg) == 0
    printed = capsys.readouterr().out
    for stage in ("pretrain", "sft", "grpo"):
        assert f"after {stage}: held-out pass@1" in printed   # printed when that eval finishes, not only at the end
    done = json.loads((out / "stages.json").read_text())
    assert list(done) == ["corpus", "tokenizer", "pretrain", "eval-pretrain", "sft", "eval-sft", "grpo", "eval-grpo"]
    assert all(s["threads"] == 1 and "load_avg" in s for s in done.values())
    assert (out / "grpo" / "final" / "config.json").exists()
    report = (out / "report.md").read_text()
    assert "eval-sft" in report
    # the stage configs are the commands' own: what ran is written into each run folder
    assert "steps = 2" in (out / "sft" / "config.toml").read_text()

    assert speedrun.main(cfg) == 0
    assert capsys.readouterr().out.count("done already") == len(done)


def test_unknown_section_in_stage_file_is_a_usage_error(tmp_path):
    import pytest

    from nanoseek.errors import UsageError

    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrian]\nsteps = 1\n")
    with pytest.raises(UsageError, match="unknown section.*pretrian"):
        speedrun.stage_settings(speedrun.SpeedrunConfig(stages=str(bad)))
