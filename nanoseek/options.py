"""Command-line options made from config dataclasses: one definition per knob.

Every command's configuration is a dataclass whose fields carry their default and, in a trailing comment, their
help text:

    @dataclass
    class EvalConfig:
        model: str = ""                 # model folder (with tokenizer.json)
        n: int = 100                    # problems
        REQUIRED: ClassVar = ("model",)
        ALIASES: ClassVar = {"samples": "n"}    # old flag / TOML names that keep working
        POSITIONAL: ClassVar = ()               # fields also accepted as a positional argument

`add_options(parser, EvalConfig)` turns that into `--model`, `--n`, `--config FILE.toml` (and `--samples` as an
alias; a list field takes several values, and a repeated flag adds to them); `make_config(EvalConfig, args)` builds
the config from defaults < the TOML file < flags given on the command line < keyword overrides. TOML keys are the
field names, with `-` or `_`; an unknown key is an error that lists the valid ones. Booleans accept `--x`,
`--x true|false` and `--no-x`.

This module imports nothing heavy (no torch): `nanoseek --help` builds every command's parser from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from pathlib import Path

from .errors import UsageError


def parse_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"expected a boolean (true/false), got {v!r}")


def _bool_arg(v: str) -> bool:
    try:
        return parse_bool(v)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def field_docs(cls) -> dict[str, str]:
    """Field name -> the trailing `# comment` of its line in the class body (its help text)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M):
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _base_type(tp):
    """int | None -> (int, optional=True); bool -> (bool, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def fields_of(cls) -> dict[str, tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, _base_type(hints[f.name])[0]) for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """One `--field-name` flag per field of `cls` (defaults stay None so a TOML value is only overridden by a flag
    actually given), `--config FILE.toml`, and the class's ALIASES as extra flag names."""
    docs = field_docs(cls)
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    required = set(getattr(cls, "REQUIRED", ()))
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys are these options' names "
                                                              "(command-line flags win)")
    for name, (f, tp) in fields_of(cls).items():
        flags = [f"--{name.replace('_', '-')}"] + [f"--{a.replace('_', '-')}" for a, to in aliases.items()
                                                   if to == name]
        default = _default(f)
        help_ = docs.get(name, "")
        if name in required:
            help_ = (help_ + " (required)").strip()
        elif default not in (None, "", False, [], ()):
            help_ = f"{help_} (default {default})".strip()
        help_ = help_.replace("%", "%%")
        if tp is bool:
            parser.add_argument(*flags, dest=name, nargs="?", const=True, default=None, type=_bool_arg,
                                metavar="BOOL", help=help_)
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_const", const=False,
                                help=argparse.SUPPRESS)
        elif typing.get_origin(tp) is list:      # --data a.txt b.txt; a repeated flag adds (--api-key a --api-key b)
            (item,) = typing.get_args(tp) or (str,)
            parser.add_argument(*flags, dest=name, nargs="+", action="extend", type=item, default=None,
                                metavar=name.upper(), help=help_)
        else:
            conv = tp if tp in (int, float) else str
            parser.add_argument(*flags, dest=name, type=conv, default=None, metavar=name.upper(), help=help_)
    for name in getattr(cls, "POSITIONAL", ()):   # `nanoseek info v3` = `nanoseek info --what v3`
        parser.add_argument(f"_pos_{name}", nargs="?", default=None, metavar=name.upper(),
                            help=f"same as --{name.replace('_', '-')}")
    return parser


def read_toml(path: str | os.PathLike, cls) -> dict:
    """A --config file -> {field: value}, keys normalised and aliases resolved; unknown keys are a UsageError."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    names = fields_of(cls)
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    values, unknown = {}, []
    for key, v in doc.items():
        k = key.replace("-", "_")
        k = aliases.get(k, k)
        if k in names:
            values[k] = v
        else:
            unknown.append(key)
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: "
                         f"{', '.join(names)}")
    return values


def make_config(cls, args=None, required: tuple[str, ...] | None = None, **overrides):
    """`cls` from its defaults < a --config TOML file < explicit command-line values < overrides; each field in
    `required` (default: cls.REQUIRED) must end up set (else "--name is required")."""
    names = fields_of(cls)
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    values: dict = {}
    path = getattr(args, "config", None) if args is not None else None
    if path:
        values.update(read_toml(path, cls))
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
        for name in getattr(cls, "POSITIONAL", ()):
            pos = getattr(args, f"_pos_{name}", None)
            if pos is not None and getattr(args, name, None) not in (None, pos):
                raise UsageError(f"{name} given twice ({pos!r} and --{name.replace('_', '-')} "
                                 f"{getattr(args, name)!r}); give one")
            if pos is not None:
                values[name] = pos
    values.update({aliases.get(k, k): v for k, v in overrides.items()})
    for k, (_, tp) in names.items():
        if k in values and tp is bool and values[k] is not None:
            values[k] = parse_bool(values[k])
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise UsageError(f"bad configuration: {e}") from None
    for name in (getattr(cls, "REQUIRED", ()) if required is None else required):
        if getattr(cfg, name) in (None, ""):
            raise UsageError(f"--{name.replace('_', '-')} is required")
    return cfg


def config_from_dict(cls, d: dict | None):
    """A config from a plain dict (TOML section, or a run folder's saved config), aliases resolved; unknown keys
    are a UsageError listing the valid ones."""
    d = dict(d or {})
    names = fields_of(cls)
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    values = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in d.items()}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    return cls(**values)


def write_config(cfg, path: str | os.PathLike) -> Path:
    """The effective config as TOML (what `--config` reads back): OUT/config.toml of every run."""
    path = Path(path)
    lines = [f"# effective {type(cfg).__name__}: `--config {path.name}` repeats this run"]
    for k, v in dataclasses.asdict(cfg).items():
        if v is None:
            lines.append(f"# {k} = (unset)")
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not (isinstance(v, float) and v != v) else '"nan"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string


# ------------------------------------------------------------------------------------------- CPU threads
def default_threads(num_params: int) -> int:
    """torch CPU threads for a model of `num_params`: one for small models (their matmuls are too small to gain from
    a second thread, and spinning OpenMP threads on a shared CPU slow every step down many times: a demo-model
    chat answer took 4.4 s with torch's default threads vs 0.21 s with one), all cores from ~50M parameters."""
    if num_params < 50_000_000:
        return 1
    return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None, num_params: int) -> int:
    """Apply `--threads` (0 or None: default_threads); returns the count set."""
    import torch

    n = threads if threads and threads > 0 else default_threads(num_params)
    torch.set_num_threads(n)
    return n
