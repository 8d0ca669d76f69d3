"""Verifiable tasks: seeded problem generators with difficulty levels, worked solutions, and strict graders.

    task = get_task("countdown")                    # arithmetic | countdown | linear | sort | your own
    p = task.generate(random.Random(0), difficulty=1)
    task.prompt_r1zero(p)       # R1-Zero template, ends "Assistant: <think>"
    task.messages(p)            # chat form: [{"role": "user", "content": ...}]
    task.worked_solution(p)     # "<think>\\n...steps...\\n</think>\\n<answer>X</answer>" (SFT and the corpus)
    task.grade(p, completion)   # accuracy 1.0 / 0.0;  task.format_reward(completion) 1.0 / 0.0
    task.reward(p, completion)  # TinyZero's score: 1.0 right, 0.1 well formed but wrong, 0.0 otherwise

The response format is R1-Zero's (DeepSeek-R1, Table 1): reasoning inside <think> </think>, then the answer inside
<answer> </answer>. A completion may omit the opening <think> (the prompt already ends with it, in both the R1-Zero
and the chat form).

Grading rules (strict, so that RL cannot hack a loose grader):
- exactly one <answer>...</answer> block, else wrong (no answer, two answers, unbalanced tags);
- integers: optional sign, optional thousands commas in correct groups ("1,234"), surrounding spaces and one
  trailing period are accepted; leading zeros ("0123"), decimals ("5.0"), words and units are rejected, because
  none is how the number is written;
- Countdown: the expression may use non-negative integer literals, + - * / (also × ÷ −) and parentheses, and an
  optional "= target" at the end; no unary minus, no exponent, no other symbols. It is parsed by a small
  recursive-descent parser (never eval()) and computed with exact fractions; division by zero is wrong. The
  rule is the classic one (TinyZero): each given number used exactly once, every one of them.

Worked solutions are written for a ~1M-parameter model: every step is one short, regular line (column addition
digit by digit with carries, one equation transformation, one Countdown combination), so SFT can learn them and
GRPO has a reasoning trace to improve.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from ..chat_template import BOS, render_chat
from ..errors import UsageError
from .split import split_of

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question} Assistant: <think>"
)
ANSWER_HINT = "Put the final answer in <answer> </answer>."
_EOS_STRINGS = ("<｜end▁of▁sentence｜>",)


@dataclass
class Problem:
    """One problem. `solution` is the worked reasoning (the <think> content); `answer` the canonical answer."""
    task: str
    question: str
    answer: str
    solution: str = ""
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- response format
def _strip_response(text: str) -> str:
    t = text.strip()
    for eos in _EOS_STRINGS:
        while t.endswith(eos):
            t = t[: -len(eos)].rstrip()
    return t


def extract_answer(text: str) -> str | None:
    """The text inside the one <answer>...</answer> block (stripped); None if there is none, or more than one."""
    if not isinstance(text, str) or text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    start, end = text.index("<answer>"), text.index("</answer>")
    if end < start:
        return None
    return text[start + len("<answer>"): end].strip()


def format_reward(text: str) -> float:
    """1.0 when the completion is `[<think>] reasoning </think> <answer> answer </answer>` and nothing else.

    The opening <think> may be missing (the prompt ends with it); one of each tag, in order, a non-empty answer,
    nothing after </answer> but whitespace (or the end-of-sentence token)."""
    if not isinstance(text, str):
        return 0.0
    t = _strip_response(text)
    if not t.startswith("<think>"):
        t = "<think>" + t
    if any(t.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    m = re.fullmatch(r"<think>(.*)</think>\s*<answer>(.*)</answer>", t, flags=re.DOTALL)
    return 1.0 if m and m.group(2).strip() else 0.0


_INT = re.compile(r"[+-]?(?:0|[1-9]\d{0,2}(?:,\d{3})+|[1-9]\d*)")


def parse_int(s: str) -> int | None:
    """A strictly written integer ("-1,234", " 56. ") -> int; anything else (leading zeros, "5.0", "5 apples") -> None."""
    if not isinstance(s, str) or len(s) > 100:
        return None
    s = s.strip().replace("\u2212", "-")  # U+2212 MINUS SIGN, as typeset maths writes it
    if s.endswith("."):
        s = s[:-1].rstrip()
    if not _INT.fullmatch(s):
        return None
    return int(s.replace(",", ""))


# ---------------------------------------------------------------------------------------------------- tasks
class Task:
    """A verifiable task. Subclass, set `name`, implement `generate(rng, difficulty)` and `check(problem, answer)`
    (the answer is the text inside the <answer> tags), and decorate with @register_task."""

    name: str = ""
    description: str = ""
    levels: tuple[int, ...] = (1, 2, 3, 4, 5)
    default_difficulty: int = 1

    def generate(self, rng: random.Random, difficulty: int = 1) -> Problem:
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> bool:
        """Is `answer` (inside the tags, stripped) right? Default: equal to problem.answer, spaces ignored."""
        return " ".join(answer.split()) == " ".join(problem.answer.split())

    # --- rewards
    def extract_answer(self, text: str) -> str | None:
        return extract_answer(text)

    def format_reward(self, text: str) -> float:
        return format_reward(text)

    def grade(self, problem: Problem, text: str) -> float:
        """Accuracy: 1.0 when the completion has exactly one answer block and the answer is right, else 0.0."""
        answer = self.extract_answer(text)
        if answer is None:
            return 0.0
        try:
            return 1.0 if self.check(problem, answer) else 0.0
        except (ValueError, ArithmeticError, RecursionError):
            return 0.0

    def reward(self, problem: Problem, text: str) -> float:
        """TinyZero's score: 1.0 right, 0.1 well formed but wrong, 0.0 malformed."""
        if self.grade(problem, text) == 1.0:
            return 1.0
        return 0.1 if self.format_reward(text) == 1.0 else 0.0

    # --- prompts and targets
    def prompt_r1zero(self, problem: Problem) -> str:
        return R1_ZERO_TEMPLATE.format(question=problem.question)

    def messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": f"{problem.question} {ANSWER_HINT}"}]

    def worked_solution(self, problem: Problem) -> str:
        return f"<think>\n{problem.solution}\n</think>\n<answer>{problem.answer}</answer>"

    def completion_r1zero(self, problem: Problem) -> str:
        """What follows prompt_r1zero (which already ends with <think>)."""
        return self.worked_solution(problem)[len("<think>"):]

    def sft_messages(self, problem: Problem) -> list[dict]:
        """The chat prompt plus the worked solution as the assistant's turn (reasoning_content + answer)."""
        return self.messages(problem) + [{"role": "assistant", "reasoning_content": problem.solution,
                                          "content": f"<answer>{problem.answer}</answer>"}]

    # --- helpers
    def check_level(self, difficulty: int) -> int:
        if difficulty not in self.levels:
            raise UsageError(f"task {self.name!r} has difficulty levels {list(self.levels)}, got {difficulty!r}")
        return difficulty

    def problems(self, n: int, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
        """n problems from a fixed seed (deterministic)."""
        rng = random.Random(f"{self.name}:{seed}")
        level = self.default_difficulty if difficulty is None else difficulty
        return [self.generate(rng, level) for _ in range(n)]

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.description}>"


def prompt_ids(tok, task: Task, problem: Problem) -> list[int]:
    """The chat-template prompt (generation prompt included) for a problem, as the engine receives it. Thinking on,
    whatever the template's default (V3.1's is off): GRPO and eval grade `<think>` reasoning + `<answer>`."""
    return tok.apply_chat_template(task.messages(problem), add_generation_prompt=True, tokenize=True, thinking=True)


_REGISTRY: dict[str, Task] = {}


class FunctionTask(Task):
    """A task from a function pair: generate(rng, difficulty) -> Problem | (question, answer[, solution]) and
    check(problem, answer) -> bool."""

    def __init__(self, name: str, generate: Callable, check: Callable, levels=(1, 2, 3, 4, 5), description=""):
        self.name, self._generate, self._check = name, generate, check
        self.levels, self.description = tuple(levels), description
        self.default_difficulty = self.levels[0]

    def generate(self, rng: random.Random, difficulty: int = 1) -> Problem:
        out = self._generate(rng, self.check_level(difficulty))
        if isinstance(out, Problem):
            return out
        question, answer, *rest = out
        return Problem(self.name, str(question), str(answer), str(rest[0]) if rest else "",
                       {"difficulty": difficulty})

    def check(self, problem: Problem, answer: str) -> bool:
        return bool(self._check(problem, answer))


def register_task(task=None, *, generate: Callable | None = None, check: Callable | None = None, **kwargs):
    """Add a task to the registry. Three forms:

        @register_task                       # a Task subclass (registered under cls.name)
        class Mine(Task): ...
        register_task(Mine())                # an instance
        register_task("mine", generate=gen, check=chk)   # a generator + checker function pair
    """
    if isinstance(task, str):
        if generate is None or check is None:
            raise UsageError(f"register_task({task!r}, ...) needs generate= and check= functions")
        instance = FunctionTask(task, generate, check, **kwargs)
    elif isinstance(task, type) and issubclass(task, Task):
        instance = task()
    elif isinstance(task, Task):
        instance = task
    else:
        raise UsageError(f"register_task expects a Task subclass, a Task, or a name with generate=/check=; "
                         f"got {task!r}")
    if not instance.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", instance.name):
        raise UsageError(f"a task needs a simple name (letters, digits, _ . -), got {instance.name!r}")
    _REGISTRY[instance.name] = instance
    return task if isinstance(task, type) else instance


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """The registered task `name`. "path/to/file.py:NAME" or "package.module:NAME" imports that file or module
    first (it registers its tasks), so a user's own task works from the command line."""
    if isinstance(name, Task):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and ":" in name:
        source, _, task_name = name.rpartition(":")
        _import_source(source)
        if task_name in _REGISTRY:
            return _REGISTRY[task_name]
        raise UsageError(f"{source} does not register a task named {task_name!r}; known tasks: "
                         f"{', '.join(list_tasks())}")
    raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())} "
                     "(or FILE.py:NAME for your own, see README 'Add your own task')")


def _import_source(source: str) -> None:
    path = Path(source)
    if source.endswith(".py"):
        if not path.is_file():
            raise UsageError(f"task file {source} does not exist")
        mod_name = f"nanoseek_user_tasks_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(source)
        except ImportError as e:
            raise UsageError(f"cannot import task module {source!r}: {e}") from e


# ---------------------------------------------------------------------------------------------------- arithmetic
def _digits(n: int) -> list[int]:
    """Least significant first."""
    return [int(c) for c in reversed(str(n))]


def column_add(a: int, b: int) -> list[str]:
    """Column addition, one line per column: `col2: 4+8+1=13, write 3 carry 1`."""
    da, db = _digits(a), _digits(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        lines.append(f"col{i + 1}: {x}+{y}+{carry}={s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"col{len(lines) + 1}: carry {carry}, write {carry}")
    return lines


def column_sub(a: int, b: int) -> list[str]:
    """Column subtraction a - b (a >= b), one line per column with the borrow."""
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        d = x - y - borrow
        if d < 0:
            lines.append(f"col{i + 1}: {x}-{y}-{borrow}<0, {x + 10}-{y}-{borrow}={d + 10}, write {d + 10} borrow 1")
            borrow = 1
        else:
            lines.append(f"col{i + 1}: {x}-{y}-{borrow}={d}, write {d} borrow 0")
            borrow = 0
    return lines


def column_mul(a: int, d: int) -> list[str]:
    """Short multiplication a * d (d one digit), one line per column with the carry."""
    lines, carry = [], 0
    for i, x in enumerate(_digits(a)):
        s = x * d + carry
        lines.append(f"col{i + 1}: {x}*{d}+{carry}={s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"col{len(lines) + 1}: carry {carry}, write {carry}")
    return lines


def _fixed_width(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


@register_task
class Arithmetic(Task):
    """a + b, a - b, a * b with multi-digit integers, solved column by column."""

    name = "arithmetic"
    description = "multi-digit + - * worked column by column"
    # level: (operations, digits of a and b for + and -, (digits of a, digits of b) for *). Level 1 is 2-digit
    # addition only: one line format and 200 one-digit sums with carry to learn; subtraction's borrow branch and
    # negative results come at level 2 (measured on the cpu preset: docs/benchmarks.md, "Task level 1").
    LEVELS = {1: ("+", 2, None), 2: ("+-", 3, None), 3: ("+-*", 3, (2, 1)), 4: ("+-*", 4, (3, 1)),
              5: ("+-*", 5, (3, 2))}

    def generate(self, rng: random.Random, difficulty: int = 1) -> Problem:
        ops, add_digits, mul = self.LEVELS[self.check_level(difficulty)]
        op = rng.choice(ops)
        # Operands have exactly the level's digit count: every problem of a level has the same layout, so a small
        # model finds "the tens digit of a" at a fixed offset (retrieval is what tiny models learn last).
        if op == "*":
            a, b = _fixed_width(rng, mul[0]), _fixed_width(rng, mul[1])
            if b < 2:
                b = rng.randrange(2, 10)
        else:
            a, b = _fixed_width(rng, add_digits), _fixed_width(rng, add_digits)
        return self.make(a, op, b, difficulty)

    def make(self, a: int, op: str, b: int, difficulty: int = 1) -> Problem:
        if op == "+":
            value, steps = a + b, column_add(a, b)
        elif op == "-":
            value = a - b
            steps = column_sub(a, b) if a >= b else [f"{a}<{b}, so {a}-{b}=-({b}-{a})"] + column_sub(b, a)
        elif op == "*":
            value = a * b
            if b < 10:
                steps = column_mul(a, b)
            else:  # long multiplication: one partial product per digit of b, then a running sum
                steps, total = [], 0
                for i, d in enumerate(_digits(b)):
                    part = a * d * 10 ** i
                    steps.append(f"{a}*{d}={a * d}" + (f", shift {i}: {part}" if i else ""))
                    if i:
                        steps.append(f"{total}+{part}={total + part}")
                    total += part
        else:
            raise UsageError(f"arithmetic supports + - *, got {op!r}")
        steps.append(f"result: {value}")
        return Problem(self.name, f"What is {a}{op}{b}?", str(value), "\n".join(steps),
                       {"a": a, "b": b, "op": op, "difficulty": difficulty})

    def check(self, problem: Problem, answer: str) -> bool:
        value = parse_int(answer)
        return value is not None and value == int(problem.answer)


# ---------------------------------------------------------------------------------------------------- countdown
class ExpressionError(ValueError):
    """A Countdown answer that is not a well-formed arithmetic expression."""


_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}


def evaluate_expression(text: str, max_len: int = 200, max_depth: int = 20) -> tuple[Fraction, list[int]]:
    """Parse and compute `text` exactly -> (value, the integer literals used, in order).

    Grammar (no unary minus, no exponent, nothing else):
        expr   := term (("+" | "-") term)*
        term   := factor (("*" | "/") factor)*
        factor := INTEGER | "(" expr ")"
    Raises ExpressionError for anything else, ZeroDivisionError for a division by zero. Bounded: at most
    `max_len` characters and `max_depth` nested parentheses, so no input can make it slow."""
    text = text.translate(str.maketrans({"×": "*", "÷": "/", "−": "-", "\u00b7": "*"}))
    if len(text) > max_len:
        raise ExpressionError(f"expression longer than {max_len} characters")
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                break
            raise ExpressionError(f"unexpected {text[pos:pos + 10]!r}")
        if m.group(1) is not None:
            if len(m.group(1)) > 1 and m.group(1)[0] == "0":
                raise ExpressionError(f"number with a leading zero: {m.group(1)}")
            tokens.append(int(m.group(1)))
        else:
            tokens.append(m.group(2))
        pos = m.end()
    numbers: list[int] = []
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def expr(depth):
        nonlocal i
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[i]
            i += 1
            value = _OPS[op](value, term(depth))
        return value

    def term(depth):
        nonlocal i
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[i]
            i += 1
            value = _OPS[op](value, factor(depth))
        return value

    def factor(depth):
        nonlocal i
        tok = peek()
        if isinstance(tok, int):
            i += 1
            numbers.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= max_depth:
                raise ExpressionError("parentheses nested too deeply")
            i += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise ExpressionError("unbalanced parentheses")
            i += 1
            return value
        raise ExpressionError(f"expected a number or '(' but found {tok!r}")

    if not tokens:
        raise ExpressionError("empty expression")
    value = expr(0)
    if i != len(tokens):
        raise ExpressionError(f"unexpected {tokens[i]!r}")
    return value, numbers


@register_task
class Countdown(Task):
    """Reach the target with + - * / and parentheses, using each given number exactly once (TinyZero's rule)."""

    name = "countdown"
    description = "combine the numbers (each exactly once) with + - * / to reach the target"
    # level: (how many numbers, largest number, largest target). Level 1 (two one-digit numbers) has only ~220
    # distinct problems (~25 in eval's held-out eighth): easy to learn, too small to measure held-out gains on;
    # level 2 has ~9,000.
    LEVELS = {1: (2, 9, 81), 2: (3, 9, 100), 3: (3, 20, 200), 4: (4, 25, 200), 5: (4, 99, 999)}

    def generate(self, rng: random.Random, difficulty: int = 1) -> Problem:
        count, top, max_target = self.LEVELS[self.check_level(difficulty)]
        while True:
            numbers = [rng.randint(1, top) for _ in range(count)]
            # Build the target by combining the numbers in a random order with valid operations (positive integer
            # intermediates, exact division), keeping each step's line for the worked solution.
            pool = [(n, str(n)) for n in numbers]
            rng.shuffle(pool)
            steps = []
            while len(pool) > 1:
                (x, ex), (y, ey) = pool[0], pool[1]
                if x < y:
                    (x, ex), (y, ey) = (y, ey), (x, ex)
                choices = ["+", "*"] + (["-"] if x > y else []) + (["/"] if y > 1 and x % y == 0 else [])
                op = rng.choice(choices)
                value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
                pool = [(value, f"{_wrap(ex)}{op}{_wrap(ey)}")] + pool[2:]
                steps.append((x, op, y, value, ex, ey, [v for v, _ in pool]))
            target = pool[0][0]
            if 1 <= target <= max_target and target not in numbers:
                break
        return self._with_solution(numbers, target, steps, difficulty)

    def _with_solution(self, numbers, target, steps, difficulty) -> Problem:
        # All steps but the last are the chosen combinations ("7*3=21, left 21 4"); the last step searches the
        # four operations in a fixed order until one hits the target: that search is learnable and checkable.
        lines = [f"target {target}, numbers {' '.join(map(str, numbers))}"]
        for x, op, y, value, _, _, left in steps[:-1]:
            lines.append(f"{x}{op}{y}={value}, left {' '.join(map(str, left))}")
        x, _, y, _, ex, ey, _ = steps[-1]
        for op in ("+", "-", "*", "/"):
            if op == "/" and (y == 0 or x % y):
                continue
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
            if value == target:
                lines.append(f"{x}{op}{y}={value} yes")
                answer = f"{_wrap(ex)}{op}{_wrap(ey)}"
                break
            lines.append(f"{x}{op}{y}={value} no")
        question = (f"Using the numbers {' '.join(map(str, numbers))}, each exactly once, with + - * / and "
                    f"parentheses, make {target}.")
        return Problem(self.name, question, answer, "\n".join(lines),
                       {"numbers": list(numbers), "target": target, "difficulty": difficulty})

    def check(self, problem: Problem, answer: str) -> bool:
        expr, eq, rhs = answer.partition("=")
        if eq:  # "(7*3)+4 = 25" is fine, if the right side is the target
            if "=" in rhs or parse_int(rhs) != problem.meta["target"]:
                return False
        try:
            value, used = evaluate_expression(expr)
        except (ExpressionError, ZeroDivisionError, RecursionError):
            return False
        return sorted(used) == sorted(problem.meta["numbers"]) and value == problem.meta["target"]


def _wrap(expr: str) -> str:
    return expr if expr.isdigit() else f"({expr})"


# ---------------------------------------------------------------------------------------------------- linear
def _term(coef: int, first: bool = False) -> str:
    """3 -> '3x', 1 -> 'x', -1 -> '-x', and a '+' in front when not first."""
    body = "x" if abs(coef) == 1 else f"{abs(coef)}x"
    sign = "-" if coef < 0 else ("" if first else "+")
    return sign + body


def _const(c: int, first: bool = False) -> str:
    return str(c) if first or c < 0 else f"+{c}"


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


@register_task
class Linear(Task):
    """Solve a linear equation in x with an integer solution, one transformation per line."""

    name = "linear"
    description = "solve a*x+b = c*x+d for the integer x"
    # level: (largest |coefficient|, largest |x|, largest |constant|, x on both sides, negatives allowed)
    LEVELS = {1: (9, 9, 9, False, False), 2: (9, 9, 20, False, True), 3: (9, 12, 30, True, True),
              4: (20, 50, 99, True, True), 5: (99, 99, 999, True, True)}

    def generate(self, rng: random.Random, difficulty: int = 1) -> Problem:
        top_a, top_x, top_b, both, neg = self.LEVELS[self.check_level(difficulty)]
        coefs = [k for k in range(-top_a, top_a + 1) if k != 0] if neg else list(range(2, top_a + 1))
        x = rng.randint(-top_x if neg else 0, top_x)
        b = rng.randint(-top_b if neg else 1, top_b)
        a = rng.choice(coefs)
        c = rng.choice([k for k in coefs if k != a]) if both else 0
        d = a * x + b - c * x
        return self.make(a, b, c, d, difficulty)

    def make(self, a: int, b: int, c: int, d: int, difficulty: int = 1) -> Problem:
        """The equation a*x + b = c*x + d (c = 0: x on the left only); a != c and (d - b) / (a - c) an integer."""
        k, rhs = a - c, d - b
        if k == 0 or rhs % k:
            raise UsageError(f"{a}x+{b}={c}x+{d} has no single integer solution")
        x = rhs // k
        left = _term(a, True) + (_const(b) if b else "")
        right = _term(c, True) + (_const(d) if d else "") if c else str(d)
        steps = [f"{left}={right}"]
        if c:  # move the x terms left and the constants right, then collect
            steps += [f"{_term(a, True)}{_term(-c)}={d}-{_paren(b)}", f"{_term(k, True)}={rhs}"]
        elif b:
            steps.append(f"{_term(a, True)}={d}-{_paren(b)}={rhs}")
        steps.append(f"x={rhs}/{_paren(k)}={x}")
        return Problem(self.name, f"Solve for x: {left}={right}", str(x), "\n".join(steps),
                       {"a": a, "b": b, "c": c, "d": d, "difficulty": difficulty})

    def check(self, problem: Problem, answer: str) -> bool:
        m = re.fullmatch(r"\s*(?:x\s*=\s*)?(.*)", answer, flags=re.DOTALL)
        value = parse_int(m.group(1)) if m else None
        return value is not None and value == int(problem.answer)


# ---------------------------------------------------------------------------------------------------- sort
@register_task
class Sort(Task):
    """Sort a list of integers ascending, picking the smallest remaining one per line (selection sort)."""

    name = "sort"
    description = "sort integers in ascending order"
    LEVELS = {1: (3, 9), 2: (4, 99), 3: (5, 99), 4: (6, 999), 5: (8, 999)}  # (how many, largest)

    def generate(self, rng: random.Random, difficulty: int = 1) -> Problem:
        count, top = self.LEVELS[self.check_level(difficulty)]
        numbers = [rng.randint(0, top) for _ in range(count)]
        left, steps = list(numbers), []
        while left:
            m = min(left)
            left.remove(m)
            steps.append(f"smallest {m}, left {' '.join(map(str, left))}".rstrip())
        answer = ", ".join(map(str, sorted(numbers)))
        return Problem(self.name, f"Sort in ascending order: {', '.join(map(str, numbers))}.", answer,
                       "\n".join(steps), {"numbers": numbers, "difficulty": difficulty})

    def check(self, problem: Problem, answer: str) -> bool:
        parts = [p for p in re.split(r"[,\s]+", answer.strip().rstrip(".")) if p]
        values = [parse_int(p) for p in parts]
        return None not in values and values == sorted(problem.meta["numbers"])


# ---------------------------------------------------------------------------------------------------- corpus
def corpus_documents(n: int, seed: int = 0, tasks: list[str] | None = None,
                     difficulty: int | list[int] | None = None) -> Iterator[str]:
    """The embedded pretraining corpus: n documents, each a problem with its worked solution, in mixed styles
    (R1-Zero prompt + completion, the chat template without bos, and a plain Question/Answer form).

    tasks: names (default: every built-in task); difficulty: a level, a list of levels, or None for levels 1-3
    weighted 1 : 1/2 : 1/3 (the levels a small model can learn; higher levels have long traces)."""
    names = tasks or [t for t in ("arithmetic", "countdown", "linear", "sort") if t in _REGISTRY]
    chosen = [get_task(t) for t in names]
    rng = random.Random(f"corpus:{seed}")
    for _ in range(n):
        task = rng.choice(chosen)
        if difficulty is None:  # levels 1-3, weighted 1/level: most of the corpus is what SFT and GRPO train on
            levels = [lv for lv in task.levels if lv <= 3] or list(task.levels)
            level = rng.choices(levels, weights=[1 / lv for lv in levels])[0]
        else:
            level = difficulty if isinstance(difficulty, int) else rng.choice(list(difficulty))
        p = task.generate(rng, level)
        while split_of(p) == "eval":  # held-out eval problems never enter training data (nanoseek.data.split)
            p = task.generate(rng, level)
        style = rng.random()
        if style < 0.4:
            yield task.prompt_r1zero(p) + task.completion_r1zero(p)
        elif style < 0.8:
            text = render_chat(task.sft_messages(p), add_generation_prompt=False)
            yield text[len(BOS):] if text.startswith(BOS) else text
        else:
            yield f"Question: {p.question}\nAnswer: {task.worked_solution(p)}"
