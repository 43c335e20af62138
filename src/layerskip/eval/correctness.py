"""Greedy self-speculative vs greedy autoregressive decoding on the same samples: they must be token-identical."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from layerskip.api import encode_prompt, generate_batch, generate_with_config
from layerskip.eval.datasets import Sample
from layerskip.eval.records import open_records, read_records, write_record
from layerskip.generation import GenerationConfig, GenerationResult
from layerskip.generation.config import check_batching
from layerskip.loading import LoadedModel


def first_difference(left: list[int], right: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a missing token counts), or None."""
    for index, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return index
    return None if len(left) == len(right) else min(len(left), len(right))


def compare(loaded: LoadedModel, samples: Iterable[Sample], speculative: GenerationConfig, *,
            chat: bool | None = None, records_path: Path | None = None, resume: bool = False,
            batch_size: int = 1) -> dict[str, Any]:
    """Per sample: identical or not, and where they part, both continuations from there. Self-speculative decoding
    runs `batch_size` samples together; the autoregressive reference decodes each alone.

    With `records_path`, each sample's record is appended there as it finishes; `resume` keeps the
    records already there and checks only the samples they lack.
    """
    check_batching(batch_size)
    speculative = dataclasses.replace(speculative, sample=False)
    autoregressive = dataclasses.replace(speculative, generation_strategy="autoregressive", exit_layer=-1,
                                         num_speculations=-1)
    samples = list(samples)
    kept = read_records(records_path) if records_path is not None and resume else []
    wanted = {sample.id for sample in samples}
    results = [record for record in kept if record["id"] in wanted]
    done = {record["id"] for record in results}
    sink = open_records(records_path, kept) if records_path is not None else None
    todo = [sample for sample in samples if sample.id not in done]
    progress = tqdm(total=len(todo), desc="correctness", unit="sample")
    try:
        for first in range(0, len(todo), batch_size):
            batch = todo[first:first + batch_size]
            ids = [encode_prompt(loaded, sample.prompt, chat=chat) for sample in batch]
            # Drafting in every round, whatever the batch's size: speculation is what this checks.
            actual = generate_batch(loaded, ids, speculative, batch_size=len(batch), max_speculative_batch=0)
            for sample, prompt_ids, result in zip(batch, ids, actual):
                record = check_sample(loaded, sample.id, generate_with_config(loaded, prompt_ids, autoregressive),
                                      result)
                if sink is not None:
                    write_record(sink, record)
                results.append(record)
            progress.update(len(batch))
            progress.set_postfix(errors=sum(not r["identical"] for r in results))
    finally:
        progress.close()
        if sink is not None:
            sink.close()
    order = {sample.id: index for index, sample in enumerate(samples)}
    results.sort(key=lambda record: order[record["id"]])
    errors = sum(not r["identical"] for r in results)
    return {"settings": {"exit_layer": speculative.exit_layer, "num_speculations": speculative.num_speculations,
                         "max_steps": speculative.max_steps, "batch_size": batch_size},
            "samples": len(results), "errors": errors,
            "error_percentage": 100.0 * errors / len(results) if results else 0.0, "results": results}


def check_sample(loaded: LoadedModel, sample_id: str, expected: GenerationResult,
                 actual: GenerationResult) -> dict[str, Any]:
    """A sample's record: whether the self-speculative tokens equal the autoregressive ones, and where not."""
    position = first_difference(expected.token_ids, actual.token_ids)
    record: dict[str, Any] = {"id": sample_id, "identical": position is None,
                              "acceptance_rate": actual.stats.acceptance_rate}
    if position is not None:
        decode = loaded.tokenizer.decode if loaded.tokenizer is not None else str
        record.update(first_difference=position,
                      autoregressive=decode(expected.token_ids[position:]),
                      self_speculative=decode(actual.token_ids[position:]))
    return record
