"""The house rules of the code base, checked: no import cycles (imports inside functions count), no function over
80 lines, train/ within its line budget, a light `import nanoseek` / `nanoseek --help`, and one command line built
from config dataclasses (every command takes --config and rejects unknown keys)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "nanoseek"
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 1600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_block(node) -> bool:
    t = node.test
    return isinstance(node, ast.If) and (getattr(t, "id", None) == "TYPE_CHECKING"
                                         or getattr(t, "attr", None) == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """nanoseek modules that `path` imports anywhere (top level or inside functions; not under TYPE_CHECKING).
    `from X import Y` points at the submodule X.Y when Y is one, else at X."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_block(child):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != me}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if state.get(v) is None:
                c = dfs(v)
                if c:
                    return c
        state[u] = 2
        stack.pop()
        return None

    for u in sorted(graph):
        if state.get(u) is None:
            c = dfs(u)
            if c:
                return c
    return None


def import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_no_import_cycle_between_nanoseek_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle_negative_control(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # an import inside a function counts; one under TYPE_CHECKING does not
    f = tmp_path / "nanoseek" / "x.py"
    f.parent.mkdir()
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import z\n"
                 "def g():\n    from .y import thing\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert imports_of(f, {"nanoseek.x", "nanoseek.y", "nanoseek.z"}) == {"nanoseek.y"}
    finally:
        ROOT = old


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append((node.name, n))
    return out


def test_no_function_over_80_lines():
    too_long = [f"{f.relative_to(ROOT)}:{name} ({n} lines)" for f in sorted(PKG.rglob("*.py"))
                for name, n in long_functions(f.read_text())]
    assert not too_long, "functions over 80 lines: " + ", ".join(too_long)


def test_long_function_finder_negative_control():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]
    assert long_functions("def f():\n    return 1\n") == []


def test_train_package_within_its_line_budget():
    n = sum(len(f.read_text().splitlines()) for f in (PKG / "train").glob("*.py"))
    assert n <= MAX_TRAIN_LINES, f"nanoseek/train/ has {n} lines (budget {MAX_TRAIN_LINES})"


def _fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120).stdout


def test_import_nanoseek_and_help_do_not_import_torch():
    out = _fresh_python("import sys, io, contextlib\nimport nanoseek\nfrom nanoseek import cli\n"
                        "buf = io.StringIO()\n"
                        "with contextlib.redirect_stdout(buf):\n"
                        "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
                        "print('torch' in sys.modules, 'pretrain' in buf.getvalue())")
    assert out.split() == ["False", "True"], out


COMMANDS = ["speedrun", "tokenizer", "pretrain", "sft", "grpo", "distill", "eval", "serve", "chat", "info",
            "export-gguf"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_config_and_rejects_unknown_keys(command, tmp_path, capsys):
    from nanoseek import cli
    from nanoseek.options import fields_of

    assert sorted(cli.COMMANDS) == sorted(COMMANDS)
    _, mod = cli.command_parser(command)
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("not_an_option = 1\n")
    assert cli.main([command, "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) not_an_option" in err
    some_field = next(iter(fields_of(mod.CONFIG)))
    assert "valid keys:" in err and some_field in err
