"""Verifiable tasks: deterministic generators, meaningful difficulty, and strict, safe graders."""

import random
import re
import time

import pytest

from nanoseek.data import tasks as T
from nanoseek.data.tasks import Problem, Task, corpus_documents, get_task, list_tasks, register_task
from nanoseek.errors import UsageError

BUILTIN = ["arithmetic", "countdown", "linear", "sort"]


def answer(a: str, think: str = "steps") -> str:
    """A completion as the model writes it after a prompt ending in <think>."""
    return f"{think}\n</think>\n<answer>{a}</answer>"


def arith(a, op, b):
    return get_task("arithmetic").make(a, op, b)


def countdown(numbers, target):
    return Problem("countdown", "q", "", "", {"numbers": numbers, "target": target})


def test_registry_lists_builtin_tasks_and_rejects_unknown_names():
    assert set(BUILTIN) <= set(list_tasks())
    with pytest.raises(UsageError) as e:
        get_task("chess")
    assert all(name in str(e.value) for name in BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_worked_solutions_grade_full_marks_at_every_level(name):
    task = get_task(name)
    for level in task.levels:
        for p in task.problems(60, seed=level, difficulty=level):
            ws = task.worked_solution(p)
            assert ws.startswith("<think>\n") and ws.endswith(f"</think>\n<answer>{p.answer}</answer>")
            assert task.grade(p, ws) == 1.0 and task.format_reward(ws) == 1.0 and task.reward(p, ws) == 1.0, ws
            # as the model continues the R1-Zero prompt (which ends with <think>)
            assert task.grade(p, task.completion_r1zero(p)) == 1.0
            assert task.prompt_r1zero(p).endswith(f"User: {p.question} Assistant: <think>")


@pytest.mark.parametrize("name", BUILTIN)
def test_generators_are_deterministic_per_seed_and_difficulty_changes_problems(name):
    task = get_task(name)
    a = task.problems(20, seed=3, difficulty=1)
    assert a == task.problems(20, seed=3, difficulty=1)
    assert a != task.problems(20, seed=4, difficulty=1)
    easy = [p.question for p in a]
    hard = [p.question for p in task.problems(20, seed=3, difficulty=max(task.levels))]
    assert not set(easy) & set(hard)
    # harder problems have longer questions or longer worked solutions (more digits, numbers or steps)
    def size(ps):
        return sum(len(p.question) + len(p.solution) for p in ps)
    assert size(task.problems(50, 1, max(task.levels))) > 1.5 * size(task.problems(50, 1, 1))
    with pytest.raises(UsageError, match="difficulty"):
        task.generate(random.Random(0), 99)


def test_level_one_is_small():
    # level 1 is sized for a ~1M-parameter model: short questions and at most a few reasoning lines
    for name in BUILTIN:
        for p in get_task(name).problems(100, seed=0, difficulty=1):
            assert len(p.solution.splitlines()) <= 5, p


def test_response_format():
    fr = T.format_reward
    assert fr("<think>a</think><answer>1</answer>") == 1.0
    assert fr("reasoning\n</think>\n\n<answer>1</answer>\n") == 1.0  # the prompt ended with <think>
    assert fr("<think>a</think>\n<answer>1</answer><｜end▁of▁sentence｜>") == 1.0
    for bad in ["", "1", "<answer>1</answer>", "<think>a</think>", "<think>a</think>1",
                "<think>a</think><answer></answer>", "<think>a</think><answer>1</answer> trailing",
                "<think>a</think><answer>1</answer><answer>2</answer>", "<think><think>a</think><answer>1</answer>",
                "<think>a<answer>1</answer></think>", "x <think>a</think><answer>1</answer>",
                "<think>a</think> text <answer>1</answer>", "<think>a</think><answer>1"]:
        assert fr(bad) == 0.0, bad
    assert T.extract_answer("x</think><answer> 42 </answer>") == "42"
    for bad in ["42", "<answer>1</answer><answer>2</answer>", "</answer>1<answer>", "<answer>1"]:
        assert T.extract_answer(bad) is None, bad


@pytest.mark.parametrize("text", ["1234", " 1234 ", "1,234", "1234.", "+1234", "1,234. ", "\n1234\n"])
def test_arithmetic_accepts_reasonable_forms(text):
    assert get_task("arithmetic").grade(arith(1000, "+", 234), answer(text)) == 1.0


@pytest.mark.parametrize("text", ["1235", "01234", "12,34", "1234.0", "1 234", "1234 apples", "x=1234", "",
                                  "1234!", "=1234", "1,2345", "--1234", "1e3"])
def test_arithmetic_rejects_wrong_or_odd_forms(text):
    assert get_task("arithmetic").grade(arith(1000, "+", 234), answer(text)) == 0.0


def test_arithmetic_negative_answers_and_tags():
    task = get_task("arithmetic")
    p = arith(15, "-", 84)
    assert p.answer == "-69"
    assert task.grade(p, answer("-69")) == task.grade(p, answer("\u221269")) == 1.0
    assert task.grade(p, answer("69")) == 0.0
    assert task.grade(p, "the answer is -69") == 0.0  # no tags
    assert task.grade(p, answer("-69") + "<answer>-69</answer>") == 0.0  # two answers
    assert task.reward(p, answer("5")) == 0.1 and task.reward(p, "-69") == 0.0


@pytest.mark.parametrize("expr", ["(7*3)+4", "7*3+4", " 4 + 3 * 7 ", "4+(3*7)", "7×3+4", "(7*3)+4=25",
                                  "((4))+7*3", "3*7+4 = 25", "7*4-3"])
def test_countdown_accepts_correct_expressions(expr):
    assert get_task("countdown").grade(countdown([7, 3, 4], 25), answer(expr)) == 1.0


@pytest.mark.parametrize("expr", ["7*3+4+4", "7*3+3", "7*3*1+4", "7*4", "(7+7)+3+4-7", "7*3+4+3-3"])
def test_countdown_rejects_reused_missing_or_extra_numbers(expr):
    assert get_task("countdown").grade(countdown([7, 3, 4], 25), answer(expr)) == 0.0


@pytest.mark.parametrize("expr", [
    "7*3", "7+3+4", "25", "(7*3)+4=24", "7*3+4=25=25", "-7*3+4+42", "7*3+04", "7**3+4", "7^3+4", "(7*3+4",
    "7*3)+4", "7*3+4)", "", "7 3 4", "7*3+4; import os", "__import__('os')", "7*3++4", "7/(3-3)+4",
    "9**9**9", "7.0*3+4", "2*(7*3+4)/2", "(7*3)+4+0",
])
def test_countdown_rejects_malformed_or_wrong_expressions(expr):
    assert get_task("countdown").grade(countdown([7, 3, 4], 25), answer(expr)) == 0.0


def test_countdown_division_uses_exact_fractions_and_zero_division_is_wrong():
    task = get_task("countdown")
    # 8 / (3 - 8/3) = 24: a classic that needs a non-integer intermediate
    assert task.grade(countdown([8, 3, 8, 3], 24), answer("8/(3-8/3)")) == 1.0
    assert task.grade(countdown([3, 3, 1], 0), answer("1/(3-3)")) == 0.0
    assert task.grade(countdown([6, 4], 1), answer("6/4")) == 0.0  # 1.5, not 1 (no integer division)


def test_grader_is_fast_on_hostile_input():
    task = get_task("countdown")
    p = countdown([7, 3, 4], 25)
    hostile = ["9**9**9", "(" * 10_000 + "1" + ")" * 10_000, "9" * 100_000, "1+" * 50_000 + "1",
               "(" * 30 + "7*3+4" + ")" * 30, "<answer>" * 1000]
    start = time.perf_counter()
    for h in hostile:
        assert task.grade(p, answer(h)) == 0.0
        assert get_task("arithmetic").grade(arith(1, "+", 1), answer(h)) == 0.0
    assert time.perf_counter() - start < 1.0  # bounded parser: each input is rejected in microseconds


def test_linear_and_sort_answers():
    lin = get_task("linear")
    p = lin.make(3, 5, 0, 20)
    assert p.question == "Solve for x: 3x+5=20" and p.answer == "5"
    for ok in ["5", "x=5", "x = 5", " 5. "]:
        assert lin.grade(p, answer(ok)) == 1.0, ok
    for bad in ["6", "y=5", "x=05", "5/1", "x=5=5"]:
        assert lin.grade(p, answer(bad)) == 0.0, bad
    with pytest.raises(UsageError):
        lin.make(2, 1, 0, 4)  # 2x+1=4 has no integer solution
    srt = get_task("sort")
    p = Problem("sort", "q", "1, 1, 9", "", {"numbers": [9, 1, 1]})
    for ok in ["1, 1, 9", "1 1 9", "1,1,9", "1, 1, 9."]:
        assert srt.grade(p, answer(ok)) == 1.0, ok
    for bad in ["1, 9", "9, 1, 1", "1, 1, 9, 9", "1, 1, 09", "[1, 1, 9]"]:
        assert srt.grade(p, answer(bad)) == 0.0, bad


def test_chat_messages_and_sft_messages_render_with_the_template():
    from nanoseek.tokenizer import render_chat
    task = get_task("arithmetic")
    p = arith(47, "+", 85)
    assert task.messages(p) == [{"role": "user", "content": "What is 47+85? " + T.ANSWER_HINT}]
    full = render_chat(task.sft_messages(p), add_generation_prompt=False)
    prompt = render_chat(task.messages(p), add_generation_prompt=True)
    completion = full[len(prompt):]
    assert full.startswith(prompt) and completion.endswith("<answer>132</answer><｜end▁of▁sentence｜>")
    assert task.grade(p, completion) == 1.0 and task.format_reward(completion) == 1.0
    assert "col1: 7+5+0=12, write 2 carry 1" in p.solution


def test_user_task_from_a_function_pair_and_a_class(tmp_path):
    def gen(rng, difficulty):
        n = rng.randint(1, 10 ** difficulty)
        return f"What is {n} doubled?", str(2 * n), f"{n}+{n}={2 * n}"

    task = register_task("double_test", generate=gen, check=lambda p, a: a == p.answer, levels=(1, 2))
    p = task.generate(random.Random(0), 2)
    assert get_task("double_test") is task and task.grade(p, task.worked_solution(p)) == 1.0
    assert task.grade(p, answer("nope")) == 0.0

    f = tmp_path / "my_tasks.py"
    f.write_text(
        "from nanoseek.data.tasks import Problem, Task, register_task\n"
        "@register_task\n"
        "class Reverse(Task):\n"
        "    name = 'reverse_test'\n"
        "    def generate(self, rng, difficulty=1):\n"
        "        w = ''.join(rng.choice('abc') for _ in range(3 * difficulty))\n"
        "        return Problem(self.name, f'Reverse {w}', w[::-1], 'backwards')\n")
    task = get_task(f"{f}:reverse_test")  # what `--task FILE.py:NAME` does on the command line
    p = task.generate(random.Random(0), 1)
    assert task.grade(p, task.worked_solution(p)) == 1.0 and "reverse_test" in list_tasks()
    with pytest.raises(UsageError):
        get_task(f"{tmp_path / 'missing.py'}:x")
    with pytest.raises(UsageError):
        register_task(Task)  # no name


def test_an_overridden_extract_answer_is_what_grade_uses():
    # a task whose answers come in a \boxed{} instead of <answer> tags: grade() (and so reward()) must use the
    # override, not the module's <answer> extractor
    class Boxed(Task):
        name = "boxed_test"

        def generate(self, rng, difficulty=1):
            return Problem(self.name, "What is 2+2?", "4")

        def extract_answer(self, text):
            m = re.search(r"\\boxed\{([^}]*)\}", text)
            return m.group(1) if m else None

    task, p = Boxed(), Problem("boxed_test", "What is 2+2?", "4")
    assert task.grade(p, "so \\boxed{4}") == 1.0 and task.reward(p, "so \\boxed{4}") == 1.0
    assert task.grade(p, "<answer>4</answer>") == 0.0     # the default extractor would have said 1.0
    assert task.grade(p, "so \\boxed{5}") == 0.0


def test_corpus_documents_hold_no_eval_split_problem():
    from nanoseek.data.split import split_of
    task = get_task("sort")
    questions = {p.question for p in task.problems(3000, seed=0, difficulty=1) if split_of(p) == "eval"}
    docs = list(corpus_documents(300, seed=0, tasks=["sort"], difficulty=1))
    assert questions and not [d for d in docs if any(q in d for q in questions)]


def test_corpus_documents_mix_styles_tasks_and_are_deterministic():
    docs = list(corpus_documents(200, seed=1))
    assert docs == list(corpus_documents(200, seed=1)) and docs != list(corpus_documents(200, seed=2))
    assert any(d.startswith("A conversation between User and Assistant") for d in docs)
    assert any(d.startswith("<｜User｜>") for d in docs) and any(d.startswith("Question:") for d in docs)
    for word in ["col1:", "target", "Solve for x", "smallest"]:
        assert any(word in d for d in docs), word
    only = list(corpus_documents(20, seed=0, tasks=["sort"], difficulty=1))
    assert all("Sort in ascending order" in d for d in only)


def test_readme_examples_of_user_tasks_work():
    import re
    from pathlib import Path
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text(encoding="utf-8").split("## Add your own task", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    for name in ("multiply", "double"):
        task = get_task(name)
        for p in task.problems(20, seed=0, difficulty=2):
            assert task.grade(p, task.worked_solution(p)) == 1.0
            assert task.grade(p, answer(p.answer + "1")) == 0.0
