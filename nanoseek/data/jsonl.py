"""JSON Lines, the one reader: our own logs (metrics.jsonl, samples.jsonl) and users' data files (corpus, chats).

    for n, row in iter_jsonl(path):           # strict: a malformed line is a UsageError naming file:line
    rows = read_jsonl(path, tolerant=True)    # our logs: stop at a half-written last line of a killed run
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UsageError


def iter_jsonl(path: str | os.PathLike, tolerant: bool = False,
               bad_lines: list[int] | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line. tolerant=False: a line that is not JSON is a UsageError
    (`file:line: not valid JSON`); tolerant=True: reading stops there (a log cut by a kill ends in half a line).
    bad_lines=[]: a line that is not JSON is appended there (its number) and reading goes on, so a caller can name
    every bad line of a user's file in one error."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if bad_lines is not None:
                    bad_lines.append(n)
                    continue
                if tolerant:
                    return
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            yield n, row


def read_jsonl(path: str | os.PathLike, tolerant: bool = True) -> list:
    """Every row of a JSONL file ([] when it does not exist, for logs of a run that has not started)."""
    if not Path(path).exists():
        return []
    return [row for _, row in iter_jsonl(path, tolerant=tolerant)]


def write_jsonl(path: str | os.PathLike, rows, append: bool = False) -> Path:
    """Rows as JSON Lines; append=False replaces the file atomically (a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
