"""Evaluation: held-out problems never seen in training (nanoseek.data.split), the pass@k estimator, and bad input
at the CLI."""

import json
import math
import random
from itertools import combinations

import pytest

import nanoseek as ns
from nanoseek.cli import main as cli
from nanoseek.data.split import draw_problems, eval_rng, split_of, train_rng
from nanoseek.data.tasks import get_task, list_tasks
from nanoseek.errors import UsageError
from nanoseek.eval import pass_at_k


def test_eval_problems_never_appear_in_training_streams():
    # the training side (SFT, GRPO, distill: train_rng streams, split="train") and the eval side (eval_rng,
    # split="eval") draw from disjoint halves of the problem space, whatever the seeds: a small task (2-digit
    # arithmetic has ~20k distinct questions) is where seeded streams alone would collide
    task = get_task("arithmetic")
    held_out = {p.question for s in range(3) for p in draw_problems(task, eval_rng(s), 1, 300, split="eval")}
    trained = {p.question for s in range(3) for step in range(20)
               for p in draw_problems(task, train_rng(s, "grpo", step), 1, 30, split="train")}
    assert held_out and trained and not held_out & trained
    # and the split is a fixed property of the question, the same in every process
    p = draw_problems(task, eval_rng(0), 1, 1, split="eval")[0]
    assert split_of(p) == "eval"


def test_split_holds_out_about_one_question_in_eight():
    task = get_task("arithmetic")
    rng = random.Random(0)
    ps = [task.generate(rng, 2) for _ in range(4000)]
    frac = sum(split_of(p) == "eval" for p in ps) / len(ps)
    assert 0.10 < frac < 0.15   # 1/8 = 0.125; 4000 draws: std ~0.005


def test_pass_at_k_matches_the_combinatorial_definition():
    # 1 - C(n-c, k) / C(n, k): probability that k of the n samples drawn without replacement include a correct one
    for n, c, k in [(5, 2, 1), (5, 2, 3), (10, 1, 5), (4, 0, 2), (4, 4, 4), (6, 3, 4)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert math.isclose(pass_at_k(10, 0, 3), 0.0)


# ---------------------------------------------------------------------------------------------- bad input
def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_task_lists_the_known_ones(tmp_path, capsys):
    for argv in (["eval", "--model", str(tmp_path), "--task", "nope"],
                 ["grpo", "--model", str(tmp_path), "--task", "nope", "--out", str(tmp_path / "o")],
                 ["sft", "--model", str(tmp_path), "--task", "nope", "--out", str(tmp_path / "o")]):
        assert cli(argv) == 2
        line = _one_error_line(capsys)
        assert "nope" in line and all(t in line for t in list_tasks())
    assert not (tmp_path / "o").exists()


def test_model_folder_without_tokenizer_is_a_usage_error(tmp_path, capsys):
    ns.save(ns.Transformer(ns.ModelConfig.preset("tiny")), tmp_path / "m")   # weights, no tokenizer
    for argv in (["sft", "--model", str(tmp_path / "m"), "--task", "arithmetic", "--out", str(tmp_path / "o")],
                 ["grpo", "--model", str(tmp_path / "m"), "--task", "arithmetic", "--out", str(tmp_path / "o2")],
                 ["eval", "--model", str(tmp_path / "m"), "--task", "arithmetic"]):
        assert cli(argv) == 2
        assert "tokenizer" in _one_error_line(capsys)


def test_sft_jsonl_with_malformed_lines_reports_line_numbers(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_text("\n".join([good, good, "{oops", good, "[1, 2]"]) + "\n")
    assert cli(["sft", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "line(s) 3, 5" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_eval_of_a_missing_model_folder_says_the_folder_does_not_exist(tmp_path, capsys):
    # a first run's typo: the error names the folder, not a missing tokenizer.json inside it
    assert cli(["eval", "--model", str(tmp_path / "runs" / "nope"), "--task", "arithmetic"]) == 2
    line = _one_error_line(capsys)
    assert "does not exist" in line and "nope" in line and "tokenizer.json" not in line


def test_eval_config_has_the_old_flags_and_a_thread_count():
    from dataclasses import fields

    from nanoseek.eval import CONFIG, EvalConfig, main
    from nanoseek.options import make_config
    assert CONFIG is EvalConfig and callable(main)
    names = {f.name for f in fields(EvalConfig)}
    assert {"model", "task", "n", "k", "samples", "difficulty", "temperature", "max_tokens", "seed", "json",
            "threads"} <= names
    assert EvalConfig().threads == 0                      # 0: pick by model size (one thread for small models)
    with pytest.raises(UsageError, match="--task is required"):
        make_config(EvalConfig, model="m")


def test_eval_sets_one_thread_for_a_small_model(tmp_path, monkeypatch, capsys):
    import torch

    from nanoseek import eval as ev
    from nanoseek.options import make_config
    from nanoseek.tokenizer import Tokenizer

    folder = tmp_path / "m"
    tok = Tokenizer.train(["What is 1+2? <answer>3</answer>"] * 20, vocab_size=300, progress=False)
    ns.save(ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=512)), folder, tokenizer=tok)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {"task": "arithmetic", "difficulty": 1, "n": 1,
                                                          "pass@1": 0.0, "format_rate": 0.0,
                                                          "mean_completion_tokens": 0.0})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ev.main(make_config(ev.EvalConfig, model=str(folder), task="arithmetic")) == 0
        assert torch.get_num_threads() == 1
        assert ev.main(make_config(ev.EvalConfig, model=str(folder), task="arithmetic", threads=2)) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "pass@1" in capsys.readouterr().out


def test_split_policy_names_stay_importable_from_eval():
    # TRANSITION: callers outside data/ imported these from nanoseek.eval; they are the same objects
    from nanoseek import eval as ev
    from nanoseek.data import split, tasks
    assert (ev.split_of, ev.train_rng, ev.eval_rng, ev.draw_problems) == \
        (split.split_of, split.train_rng, split.eval_rng, split.draw_problems)
    assert ev.prompt_ids is tasks.prompt_ids
