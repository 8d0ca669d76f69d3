"""The run report: readable byte labels, smoothed curves with named legends, and a stage table that shows every
stage (evals included) with the threads it ran with and the machine's load."""

import random

import pytest

from nanoseek.config import ModelConfig
from nanoseek.data.jsonl import write_jsonl
from nanoseek.report import byte_unit, format_bytes, plot_curves, stage_table, write_report


@pytest.mark.parametrize("n, text", [(0, "0 B"), (640, "640 B"), (1023, "1,023 B"), (1024, "1 KiB"),
                                     (2560, "2.5 KiB"), (70_272, "68.6 KiB"), (4_997_120, "4.8 MiB"),
                                     (3 * 2**30, "3 GiB"), (5 * 2**40, "5,120 GiB")])
def test_byte_labels_keep_what_rounding_to_whole_units_lost(n, text):
    # the old labels said "2 KiB" for 2,560 B (the MHA cache of the cpu preset) and "5 MiB" for 4.77 MiB
    assert format_bytes(n) == text


def test_a_byte_axis_is_drawn_in_one_unit_without_an_offset():
    assert byte_unit(2560) == ("KiB", 1024)        # 0..2.5 KiB, not 0..2560 with a scale factor
    assert byte_unit(4_997_120) == ("MiB", 2**20)  # DeepSeek-V3's MHA cache: 4.8 MiB, no "1e6" offset
    assert byte_unit(1500) == ("B", 1)


def test_curves_plot_with_readable_names_outside_the_axes(tmp_path, monkeypatch):
    import matplotlib.axes

    rng = random.Random(0)
    rows = [{"step": s, "loss": 7 / s + rng.random() / 10, "mtp_loss": 7 / s + rng.random() / 10}
            for s in range(1, 101)]
    seen = {}
    real_legend = matplotlib.axes.Axes.legend

    def legend(ax, *a, **kw):
        seen["labels"] = [h.get_label() for h in ax.get_legend_handles_labels()[0]]
        seen["ylabel"], seen["anchor"] = ax.get_ylabel(), kw.get("bbox_to_anchor")
        return real_legend(ax, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    path = plot_curves(rows, ["loss", "mtp_loss"], tmp_path / "l.png", "pretraining loss", "cross-entropy")
    assert path.exists() and path.stat().st_size > 1000
    assert seen["labels"] == ["next-token loss", "MTP loss"]                 # not the raw metrics.jsonl keys
    assert seen["ylabel"] == "cross-entropy" and seen["anchor"][0] > 1.0   # right of the axes, not over the curves
    assert plot_curves(rows, ["load_imbalance"], tmp_path / "none.png", "t", "y") is None   # nothing logged


def _stages():
    return {"pretrain": {"wall_s": 294.0, "dir": "runs/x/pretrain", "threads": 1, "load_avg": 7.93},
            "eval-pretrain": {"wall_s": 5.2, "dir": "runs/x/pretrain/final", "threads": 1, "load_avg": 8.4,
                              "result": {"pass@1": 0.135, "format_rate": 1.0}},
            "sft": {"wall_s": 20.0, "dir": "runs/x/sft"},          # an old stages.json: no threads / load
            "eval-sft": {"wall_s": 4.0, "dir": "runs/x/sft/final", "threads": 2, "load_avg": 1.25,
                         "result": {"pass@1": 0.145}}}


def test_stage_table_has_eval_stages_threads_and_load():
    lines = stage_table(_stages())
    assert "torch threads" in lines[0] and "machine load" in lines[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["pretrain", "eval-pretrain", "sft", "eval-sft"]
    assert rows["pretrain"][:3] == ["4.9 min", "1", "7.9"]
    assert rows["eval-pretrain"][1:4] == ["1", "8.4", "pass@1 13.5%"]
    assert rows["eval-sft"][1:4] == ["2", "1.2", "pass@1 14.5%"]
    assert rows["sft"][1:3] == ["-", "-"]


def test_report_writes_the_stage_table_machine_line_and_plots(tmp_path):
    rng = random.Random(1)
    write_jsonl(tmp_path / "grpo" / "metrics.jsonl",
                [{"step": s, "reward_mean": rng.random(), "accuracy": rng.random(), "format_rate": 1.0}
                 for s in range(1, 60)])
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.\n')
    evals = {"pretrain": {"pass@1": 0.135, "format_rate": 1.0}, "sft": {"pass@1": 0.145, "format_rate": 0.99}}
    report = write_report(tmp_path, ModelConfig.preset("cpu"), _stages(), evals, "linear", 1000, 400.0)
    text = report.read_text()
    assert "| eval-sft | 4.0 s | 2 | 1.2 | pass@1 14.5% |" in text
    assert "Machine: " in text and "load average" in text
    for png in ("kv_cache.png", "accuracy.png", "grpo_reward.png", "pretrain_loss.png"):
        assert (tmp_path / png).exists() and f"({png})" in text, png
    assert not (tmp_path / "expert_imbalance.png").exists()   # no load_imbalance logged: no empty plot


def test_kv_cache_plot_names_the_cache_the_model_has(tmp_path, monkeypatch):
    """A dense student's cache is GQA's grouped K/V, not an MLA latent: the bar says so and the ratio is its own."""
    import matplotlib.axes

    from nanoseek.config import ModelConfig
    from nanoseek.report import plot_kv_cache

    labels, titles = [], []
    real_bar, real_title = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda ax, x, *a, **k: labels.append(list(x)) or
                        real_bar(ax, x, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: titles.append(t) or
                        real_title(ax, t, *a, **k))
    plot_kv_cache(ModelConfig.preset("qwen-7b"), tmp_path / "kv.png")
    assert labels[0] == ["GQA K/V (4 kv heads)", "MHA, same heads"] and labels[1][0] == "MLA latent"
    assert "(7x)" in titles[0]          # 28 heads / 4 kv heads
