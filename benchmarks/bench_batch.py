"""Batched decoding through the engine: aggregate tokens/s and per-sequence latency at batch sizes 1 to 16,
autoregressive and self-speculative (the model's stored settings), in one run.

Each repetition runs every (strategy, batch size) point in turn over the same prompts (greedy, EOS ignored, so
every sequence decodes --max_steps tokens), so machine noise hits all points alike; the table gives the best
repetition of each point and its ratio to autoregressive decoding at batch 1. Every measurement is appended to
<output_dir>/runs.jsonl as it finishes; rerunning the same command resumes.

    python benchmarks/bench_batch.py --output_dir logs/bench_batch
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import layerskip
from layerskip.eval.records import open_records, read_records, write_record
from layerskip.jsonl import read_objects

STRATEGIES = ("autoregressive", "self_speculative")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded default")
    parser.add_argument("--prompts", default=str(Path(__file__).parent / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--batch_sizes", default="1,2,4,8,16")
    parser.add_argument("--max_steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quantize", default="none", help="none, bf16, int8 or int4, as `generate --quantize`")
    parser.add_argument("--output_dir", default="logs/bench_batch")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = layerskip.load(args.model, quantize=args.quantize)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    records = [record for _, record in read_objects(Path(args.prompts))]
    prompts = [layerskip.encode_prompt(loaded, record["prompt"], chat=True) for record in records][:max(sizes)]
    configs = {name: layerskip.GenerationConfig(generation_strategy=name, sample=False, ignore_eos=True,
                                                max_steps=args.max_steps).resolved(loaded.config.num_hidden_layers,
                                                                                   loaded.defaults)
               for name in STRATEGIES}
    layerskip.api.generate_batch(loaded, prompts[:2], configs["self_speculative"], batch_size=2)  # warm
    runs_path = out / "runs.jsonl"
    done = read_records(runs_path)
    measured = {(r["strategy"], r["batch_size"], r["repeat"]) for r in done}
    jobs = [(repeat, name, size) for repeat in range(args.repeats) for name in STRATEGIES for size in sizes
            if (name, size, repeat) not in measured]
    with open_records(runs_path, done) as sink:
        for repeat, name, size in tqdm(jobs, desc="batches", unit="point"):
            results = layerskip.api.generate_batch(loaded, prompts[:size], configs[name], batch_size=size)
            seconds = max(result.stats.seconds for result in results)
            tokens = sum(result.stats.new_tokens for result in results)
            drafted = sum(result.stats.drafted_tokens for result in results)
            record = {"strategy": name, "batch_size": size, "repeat": repeat, "tokens": tokens, "seconds": seconds,
                      "latency": sum(result.stats.seconds for result in results) / len(results),
                      "acceptance": sum(r.stats.accepted_drafts for r in results) / drafted if drafted else None}
            write_record(sink, record)
            done.append(record)
    best = {}
    for record in done:
        key = (record["strategy"], record["batch_size"])
        if key not in best or record["tokens"] / record["seconds"] > best[key]["tokens"] / best[key]["seconds"]:
            best[key] = record
    base = best[("autoregressive", sizes[0])]
    base_speed = base["tokens"] / base["seconds"]
    settings = layerskip.strategy_for(loaded, configs["self_speculative"]).describe()
    lines = [f"Model {loaded.name}, {loaded.model.weight_format} weights; self-speculative settings {settings}. "
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; {args.max_steps} greedy tokens a sequence, best of {args.repeats}.", "",
             "| strategy | batch | aggregate tokens/s | vs autoregressive at batch 1 | mean latency per sequence | "
             "acceptance |", "|---|---|---|---|---|---|"]
    for name in STRATEGIES:
        for size in sizes:
            record = best[(name, size)]
            speed = record["tokens"] / record["seconds"]
            acceptance = "-" if record["acceptance"] is None else f"{record['acceptance']:.1%}"
            lines.append(f"| {name} | {size} | {speed:.1f} | **{speed / base_speed:.2f}x** | {record['latency']:.2f} s "
                         f"| {acceptance} |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
