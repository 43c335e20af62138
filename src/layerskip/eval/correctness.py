"""Greedy self-speculative vs greedy autoregressive decoding on the same samples: they must be token-identical."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from tqdm import tqdm

from layerskip.api import encode_prompt, generate_with_config
from layerskip.eval.datasets import Sample
from layerskip.generation import GenerationConfig
from layerskip.loading import LoadedModel


def first_difference(left: list[int], right: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a missing token counts), or None."""
    for index, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return index
    return None if len(left) == len(right) else min(len(left), len(right))


def compare(loaded: LoadedModel, samples: Iterable[Sample], speculative: GenerationConfig, *,
            chat: bool | None = None) -> dict[str, Any]:
    """Per sample: identical or not, and where they part, both continuations from there."""
    speculative = dataclasses.replace(speculative, sample=False)
    autoregressive = dataclasses.replace(speculative, generation_strategy="autoregressive", exit_layer=-1,
                                         num_speculations=-1)
    results = []
    progress = tqdm(list(samples), desc="correctness", unit="sample")
    for sample in progress:
        ids = encode_prompt(loaded, sample.prompt, chat=chat)
        expected = generate_with_config(loaded, ids, autoregressive)
        actual = generate_with_config(loaded, ids, speculative)
        position = first_difference(expected.token_ids, actual.token_ids)
        record: dict[str, Any] = {"id": sample.id, "identical": position is None,
                                  "acceptance_rate": actual.stats.acceptance_rate}
        if position is not None:
            decode = loaded.tokenizer.decode if loaded.tokenizer is not None else str
            record.update(first_difference=position,
                          autoregressive=decode(expected.token_ids[position:]),
                          self_speculative=decode(actual.token_ids[position:]))
        results.append(record)
        progress.set_postfix(errors=sum(not r["identical"] for r in results))
    errors = sum(not r["identical"] for r in results)
    return {"settings": {"exit_layer": speculative.exit_layer, "num_speculations": speculative.num_speculations,
                         "max_steps": speculative.max_steps},
            "samples": len(results), "errors": errors,
            "error_percentage": 100.0 * errors / len(results) if results else 0.0, "results": results}
