"""JSON Lines input (datasets, text sets, training data): one object per line, errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from layerskip.errors import LayerSkipError


def read_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is a LayerSkipError."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise LayerSkipError(f"{path}:{number} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise LayerSkipError(f"{path}:{number} is not a JSON object")
            yield number, record
