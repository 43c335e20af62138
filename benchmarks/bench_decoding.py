"""Decoding speed, side by side in one run: HF transformers greedy `generate`, our autoregressive decoding,
and our self-speculative decoding at several (exit_layer, num_speculations).

Engines are interleaved prompt by prompt and repetition by repetition, so machine noise hits all of them
alike. Every measurement is appended to <output_dir>/runs.jsonl as it finishes; rerunning the same command
resumes. The table checks each self-speculative point against the cost model of the LayerSkip notes: a round
yields T tokens and costs k c_d + c_v full steps, so speedup = T / (k c_d + c_v), with c_d and c_v timed
on this engine and T the measured mean tokens per round (acceptance is far from independent per
position, so T is used as measured rather than derived from the acceptance rate).

    python benchmarks/bench_decoding.py --output_dir logs/bench_decoding
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import layerskip
from layerskip.bench.costs import measure_step_costs

PROMPTS = [
    ("code", "Write a Python function that merges two sorted lists into one sorted list."),
    ("prose", "Explain in a short paragraph why the sky is blue."),
    ("chat", "Give me three tips for writing clear documentation."),
    ("code", "Write a JavaScript function that debounces another function."),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max_steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default="8:2,15:3,22:4,26:6",
                        help="exit_layer:num_speculations[:draft_vocab_size], comma-separated (a draft vocabulary "
                             "needs a model that stores one)")
    parser.add_argument("--output_dir", default="logs/bench_decoding")
    parser.add_argument("--no_hf", action="store_true", help="skip the transformers baseline")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    done = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            record = json.loads(line)
            done[(record["engine"], record["prompt"], record["repeat"])] = record

    loaded = layerskip.load(args.model)
    configs = [parse_config(item) for item in args.configs.split(",")]
    engines = (["hf_transformers"] if not args.no_hf else []) + ["layerskip_autoregressive"] + [
        f"layerskip_self_speculative_E{e}_k{k}" + (f"_v{v}" if v else "") for e, k, v in configs]
    prompt_ids = [layerskip.encode_prompt(loaded, text) for _, text in PROMPTS]

    hf_model = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(loaded.folder), dtype=torch.float32).eval()

    def run(engine: str, ids: list[int]) -> dict:
        if engine == "hf_transformers":
            inputs = torch.tensor([ids])
            start = time.perf_counter()
            with torch.inference_mode():
                output = hf_model.generate(inputs, max_new_tokens=args.max_steps, min_new_tokens=args.max_steps,
                                           do_sample=False, pad_token_id=loaded.eos_token_ids[0])
            seconds = time.perf_counter() - start
            return {"new_tokens": output.shape[1] - len(ids), "seconds": seconds, "acceptance_rate": None,
                    "token_ids": output[0, len(ids):].tolist()}
        options = dict(sample=False, max_steps=args.max_steps, ignore_eos=True)
        if "self_speculative" in engine:
            e, k, v = parse_engine(engine)
            options.update(generation_strategy="self_speculative", exit_layer=e, num_speculations=k,
                           draft_vocab_size=v, draft_confidence=0)
        result = layerskip.generate(loaded, prompt_ids=ids, **options)
        stats = result.stats
        return {"new_tokens": stats.new_tokens, "seconds": stats.seconds, "acceptance_rate": stats.acceptance_rate,
                "drafted": stats.drafted_tokens, "accepted": stats.accepted_drafts, "rounds": stats.rounds,
                "token_ids": result.token_ids}

    for engine in engines:  # warm-up: first calls pay for allocation and kernel selection
        run(engine, prompt_ids[0][:8])
    jobs = [(r, p, e) for r in range(args.repeats) for p in range(len(PROMPTS)) for e in engines]
    with runs_path.open("a") as sink:
        for repeat, prompt, engine in tqdm(jobs, desc="decoding", unit="run"):
            if (engine, prompt, repeat) in done:
                continue
            record = {"engine": engine, "prompt": prompt, "repeat": repeat, **run(engine, prompt_ids[prompt])}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[(engine, prompt, repeat)] = record

    with torch.inference_mode():
        costs = {config: measure_step_costs(loaded.model, *config) for config in configs}
    rows = summarize(engines, done, costs)
    lines = render(rows, args)
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


def parse_config(item: str) -> tuple[int, int, int]:
    """'E:k' or 'E:k:v' -> (exit_layer, num_speculations, draft_vocab_size; 0: the full head)."""
    numbers = [int(part) for part in item.split(":")]
    return numbers[0], numbers[1], numbers[2] if len(numbers) > 2 else 0


def parse_engine(engine: str) -> tuple[int, int, int]:
    """(exit_layer, num_speculations, draft_vocab_size) of a self-speculative engine's name."""
    e, rest = engine.rsplit("_E", 1)[1].split("_k")
    k, _, v = rest.partition("_v")
    return int(e), int(k), int(v or 0)


def summarize(engines: list[str], done: dict, costs: dict) -> list[dict]:
    reference = {}
    rows = []
    for engine in engines:
        records = [r for key, r in done.items() if key[0] == engine]
        tokens = sum(r["new_tokens"] for r in records)
        seconds = sum(r["seconds"] for r in records)
        drafted = sum(r.get("drafted", 0) for r in records)
        row = {"engine": engine, "tokens": tokens, "tokens_per_second": tokens / seconds,
               "acceptance": sum(r.get("accepted", 0) for r in records) / drafted if drafted else None}
        if engine == "layerskip_autoregressive":
            reference = {(r["prompt"], r["repeat"]): r["token_ids"] for r in records}
        if "_E" in engine:
            rounds = sum(r["rounds"] for r in records)
            row["tokens_per_round"] = tokens / rounds
            row["c_draft"], row["c_verify"] = costs[parse_engine(engine)]
            row["predicted"] = row["tokens_per_round"] / (drafted / rounds * row["c_draft"] + row["c_verify"])
            row["identical"] = all(r["token_ids"] == reference.get((r["prompt"], r["repeat"])) for r in records)
        rows.append(row)
    by_name = {row["engine"]: row for row in rows}
    for row in rows:
        row["vs_hf"] = (row["tokens_per_second"] / by_name["hf_transformers"]["tokens_per_second"]
                        if "hf_transformers" in by_name else None)
        row["vs_ar"] = row["tokens_per_second"] / by_name["layerskip_autoregressive"]["tokens_per_second"]
    return rows


def render(rows: list[dict], args: argparse.Namespace) -> list[str]:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; {args.max_steps} new tokens x {len(PROMPTS)} prompts x {args.repeats} repeats, "
             "greedy, float32",
             "",
             "| engine | tokens/s | ms/token | vs HF | vs our AR | acceptance | tokens/round | c_d | c_v | cost model vs AR | greedy output = AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['engine']} | {row['tokens_per_second']:.1f} | {1000 / row['tokens_per_second']:.1f} | "
            f"{fmt(row['vs_hf'], '.2f')}x | {row['vs_ar']:.2f}x | {fmt(row['acceptance'], '.1%')} | "
            f"{fmt(row.get('tokens_per_round'), '.2f')} | "
            f"{fmt(row.get('c_draft'), '.2f')} | {fmt(row.get('c_verify'), '.2f')} | "
            f"{fmt(row.get('predicted'), '.2f')}{'x' if row.get('predicted') else ''} | "
            f"{'-' if 'identical' not in row else ('yes' if row['identical'] else 'NO')} |")
    return lines


if __name__ == "__main__":
    main()
