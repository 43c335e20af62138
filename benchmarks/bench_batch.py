"""Batched decoding through the engine: aggregate tokens/s and per-sequence latency at batch sizes 1 to 16,
autoregressive and self-speculative (the model's stored settings), in one run.

Three points per batch size: autoregressive; self-speculative as shipped (greedy sequences draft only while at most
the model's stored max_speculative_batch decode together); and self-speculative drafting at every batch size. For
the last, the cost model extended to batches: speedup over autoregressive decoding at batch B = tokens per round /
(k c_d(B) + c_v(B)), with c_d and c_v timed as passes of B sequences, in units of a plain step of the B (with one
candidate a sequence in a batch, as the engine drafts there).

Each repetition runs every (point, batch size) in turn over the same prompts (greedy, EOS ignored, so every
sequence decodes --max_steps tokens), so machine noise hits all points alike; the table gives the best
repetition of each point and its ratio to autoregressive decoding at batch 1. Every measurement is appended to
<output_dir>/runs.jsonl as it finishes; rerunning the same command resumes. `--save_defaults FOLDER` stores the
largest batch size at which drafting beat plain decoding as max_speculative_batch in FOLDER/layerskip.json.

    python benchmarks/bench_batch.py --output_dir logs/bench_batch
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import layerskip
from layerskip.bench.costs import measure_step_costs
from layerskip.eval.records import open_records, read_records, write_record
from layerskip.jsonl import read_objects
from layerskip.loading.hf_folder import update_generation_defaults

# point name: (strategy, max_speculative_batch: None for the model's stored one, 0 for drafting at any batch size)
POINTS = {"autoregressive": ("autoregressive", None), "self_speculative": ("self_speculative", None),
          "self_speculative, drafting at any batch": ("self_speculative", 0)}
ALWAYS = "self_speculative, drafting at any batch"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded default")
    parser.add_argument("--prompts", default=str(Path(__file__).parent / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--batch_sizes", default="1,2,4,8,16")
    parser.add_argument("--max_steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quantize", default="none", help="none, bf16, int8 or int4, as `generate --quantize`")
    parser.add_argument("--save_defaults", default=None, metavar="FOLDER",
                        help="store max_speculative_batch (the largest batch size where drafting won) in "
                             "FOLDER/layerskip.json: the model's or its draft adapter's folder")
    parser.add_argument("--output_dir", default="logs/bench_batch")
    return parser.parse_args()


def measure(loaded, prompts: list[list[int]], config, size: int, limit: int | None) -> dict:
    results = layerskip.api.generate_batch(loaded, prompts[:size], config, batch_size=size,
                                           max_speculative_batch=limit)
    stats = [result.stats for result in results]
    drafted = sum(s.drafted_tokens for s in stats)
    return {"tokens": sum(s.new_tokens for s in stats), "seconds": max(s.seconds for s in stats),
            "latency": sum(s.seconds for s in stats) / len(stats), "rounds": sum(s.rounds for s in stats),
            "acceptance": sum(s.accepted_drafts for s in stats) / drafted if drafted else None}


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = layerskip.load(args.model, quantize=args.quantize)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    records = [record for _, record in read_objects(Path(args.prompts))]
    if len(records) < max(sizes):
        raise SystemExit(f"{args.prompts} holds {len(records)} prompts, fewer than the largest batch, {max(sizes)}")
    prompts = [layerskip.encode_prompt(loaded, record["prompt"], chat=True) for record in records][:max(sizes)]
    configs = {name: layerskip.GenerationConfig(generation_strategy=name, sample=False, ignore_eos=True,
                                                max_steps=args.max_steps).resolved(loaded.config.num_hidden_layers,
                                                                                   loaded.defaults)
               for name in ("autoregressive", "self_speculative")}
    speculative = configs["self_speculative"]
    layerskip.api.generate_batch(loaded, prompts[:2], speculative, batch_size=2)  # warm
    runs_path = out / "runs.jsonl"
    stored_limit = layerskip.api.speculative_batch_limit(loaded, None)
    limits = {name: stored_limit if limit is None else limit for name, (_, limit) in POINTS.items()}
    # A resumed run keeps only what was measured with the same tokens and limits (--save_defaults changes one).
    done = [r for r in read_records(runs_path) if r.get("max_steps") == args.max_steps
            and r.get("max_speculative_batch") == limits.get(r.get("point"))]
    measured = {(r["point"], r["batch_size"], r["repeat"]) for r in done}
    jobs = [(repeat, name, size) for repeat in range(args.repeats) for name in POINTS for size in sizes
            if (name, size, repeat) not in measured]
    with open_records(runs_path, done) as sink:
        for repeat, name, size in tqdm(jobs, desc="batches", unit="point"):
            strategy, _ = POINTS[name]
            record = {"point": name, "batch_size": size, "repeat": repeat, "max_steps": args.max_steps,
                      "max_speculative_batch": limits[name],
                      **measure(loaded, prompts, configs[strategy], size, limits[name])}
            write_record(sink, record)
            done.append(record)
    best = {}
    for record in done:
        key = (record.get("point"), record["batch_size"])
        if key not in best or record["tokens"] / record["seconds"] > best[key]["tokens"] / best[key]["seconds"]:
            best[key] = record
    # In a batch a greedy sequence's tree drafts carry one candidate (BatchEngine), so its rounds are timed so.
    costs = {size: measure_step_costs(loaded.model, speculative.exit_layer, speculative.num_speculations,
                                      speculative.draft_vocab_size, draft_adapter=loaded.draft_adapter,
                                      candidates=speculative.draft_candidates if size == 1 else 1, batch=size)
             for size in tqdm(sizes, desc="step costs", unit="batch")}
    speed = {key: record["tokens"] / record["seconds"] for key, record in best.items()}
    base_speed = speed[("autoregressive", sizes[0])]
    settings = layerskip.strategy_for(loaded, speculative).describe()
    lines = [f"Model {loaded.name}, {loaded.model.weight_format} weights; self-speculative settings {settings}, "
             f"stored max_speculative_batch {stored_limit}. Machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.max_steps} greedy tokens a "
             f"sequence, prefill included, best of {args.repeats}.", "",
             "| point | batch | aggregate tokens/s | vs autoregressive at batch 1 | vs autoregressive at this batch | "
             "cost model | c_d, c_v | mean latency per sequence | acceptance |", "|---|---|---|---|---|---|---|---|---|"]
    for name in POINTS:
        for size in sizes:
            record = best[(name, size)]
            acceptance = "-" if record["acceptance"] is None else f"{record['acceptance']:.1%}"
            model, step_costs = "-", "-"
            if name == ALWAYS:
                c_d, c_v = costs[size]
                model = f"{record['tokens'] / record['rounds'] / (speculative.num_speculations * c_d + c_v):.2f}x"
                step_costs = f"{c_d:.2f}, {c_v:.2f}"
            lines.append(f"| {name} | {size} | {speed[(name, size)]:.1f} | **{speed[(name, size)] / base_speed:.2f}x** "
                         f"| {speed[(name, size)] / speed[('autoregressive', size)]:.2f}x | {model} | {step_costs} "
                         f"| {record['latency']:.2f} s | {acceptance} |")
    winning = [size for size in sizes if speed[(ALWAYS, size)] > speed[("autoregressive", size)]]
    largest = max(winning, default=0)
    verdict = f"Drafting beat plain decoding up to batch {largest}." if winning else \
        "Drafting beat plain decoding at no batch size."
    if args.save_defaults:
        # Every batch size up to the largest that won drafts; none won: never draft in a batch (limit 1).
        update_generation_defaults(Path(args.save_defaults), {"max_speculative_batch": max(largest, 1)})
        verdict += f" Stored max_speculative_batch {max(largest, 1)} in {args.save_defaults}/layerskip.json."
    lines += ["", verdict]
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
