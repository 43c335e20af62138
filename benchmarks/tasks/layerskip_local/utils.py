"""Data of the layerskip_local tasks: JSON lines next to this file, so the tasks run from any folder, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).parent


def load(name: str, **metadata: Any) -> datasets.DatasetDict:
    """Splits `test` (<name>.jsonl) and, where present, `train` (<name>_fewshot.jsonl: few-shot exemplars)."""
    files = {"test": HERE / f"{name}.jsonl", "train": HERE / f"{name}_fewshot.jsonl"}
    return datasets.DatasetDict({split: datasets.Dataset.from_list(
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        for split, path in files.items() if path.is_file()})
