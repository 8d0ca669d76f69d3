"""Evaluation: held-out problems never seen in training, the pass@k estimator, and bad input at the CLI."""

import json
import math
import random
from itertools import combinations

import pytest

import nanoseek as ns
from nanoseek.cli import main as cli
from nanoseek.data.tasks import get_task, list_tasks
from nanoseek.eval import draw_problems, eval_rng, pass_at_k, split_of, train_rng


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
