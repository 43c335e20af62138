"""Per-sample result records kept as JSON lines, appended as each sample finishes, so a long run can resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, TextIO


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of an earlier run; reading stops at a line cut by an interruption (that sample runs again)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def open_records(path: Path, kept: Iterable[dict[str, Any]]) -> TextIO:
    """Start `path` afresh with the `kept` records; append new ones with `write_record`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = path.open("w")
    for record in kept:
        write_record(sink, record)
    return sink


def write_record(sink: TextIO, record: dict[str, Any]) -> None:
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()
