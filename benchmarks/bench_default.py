"""The embedded default as a user gets it: `layerskip generate` with the model's stored settings against
autoregressive decoding of the same model, on held-out code and prose chat prompts, greedy and sampled.

For each prompt the four runs (autoregressive and stored settings, greedy and sampled with the generate
defaults: temperature 0.6, top-p 0.9, seed 42) follow each other, so machine noise hits all alike. Every run
is appended to <output_dir>/runs.jsonl as it finishes; rerunning the same command resumes. The table gives
tokens/s, the speedup, the acceptance rate, tokens per round, and whether greedy output equals autoregressive.

    python benchmarks/bench_default.py --output_dir logs/bench_default
    python benchmarks/bench_default.py --model smollm2-135m --generation_strategy self_speculative \\
        --exit_layer 6 --num_speculations 4 --output_dir logs/bench_base    # the original model, same settings
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import layerskip
from layerskip.bench.costs import measure_step_costs
from layerskip.eval.records import open_records, read_records, write_record
from layerskip.jsonl import read_objects

MODES = {"greedy": dict(sample=False), "sampled": dict(sample=True)}  # sampled: generate's temperature/top_p/seed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded smollm2-135m-layerskip")
    parser.add_argument("--prompts", default=str(Path(__file__).parent / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--max_steps", type=int, default=128)
    parser.add_argument("--generation_strategy", default=None, help="default: the model's stored setting")
    parser.add_argument("--exit_layer", type=int, default=-1)
    parser.add_argument("--num_speculations", type=int, default=-1)
    parser.add_argument("--draft_vocab_size", type=int, default=-1)
    parser.add_argument("--draft_confidence", type=float, default=-1)
    parser.add_argument("--draft_candidates", type=int, default=-1)
    parser.add_argument("--dtype", default=None, help="float32 (the CPU default), bfloat16, float16")
    parser.add_argument("--quantize", default="none", help="none, bf16, int8 or int4, as `generate --quantize`")
    parser.add_argument("--draft_adapter", default=None, help="a draft adapter folder, or none (default: the model's)")
    parser.add_argument("--output_dir", default="logs/bench_default")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    loaded = layerskip.load(args.model, dtype=args.dtype, quantize=args.quantize, draft_adapter=args.draft_adapter)
    prompts = [record for _, record in read_objects(Path(args.prompts))]
    tested = dict(generation_strategy=args.generation_strategy, exit_layer=args.exit_layer,
                  num_speculations=args.num_speculations, draft_vocab_size=args.draft_vocab_size,
                  draft_confidence=args.draft_confidence, draft_candidates=args.draft_candidates)
    engines = {"autoregressive": dict(generation_strategy="autoregressive"), "stored settings": tested}
    settings = layerskip.strategy_for(loaded, layerskip.GenerationConfig.from_options(tested).resolved(
        loaded.config.num_hidden_layers, loaded.defaults)).describe()
    ids = [layerskip.encode_prompt(loaded, record["prompt"], chat=True) for record in prompts]

    def run(engine: str, mode: str, index: int) -> dict:
        result = layerskip.generate(loaded, prompt_ids=ids[index], max_steps=args.max_steps, **engines[engine],
                                    **MODES[mode])
        stats = result.stats
        return {"engine": engine, "mode": mode, "prompt": index, "kind": prompts[index].get("kind", "all"),
                "new_tokens": stats.new_tokens, "seconds": stats.seconds, "rounds": stats.rounds,
                "drafted": stats.drafted_tokens, "accepted": stats.accepted_drafts, "token_ids": result.token_ids}

    records_path = out / "runs.jsonl"
    records = read_records(records_path)
    done = {(r["engine"], r["mode"], r["prompt"]) for r in records}
    for engine in engines:  # warm-up: first calls pay for allocation and kernel selection
        for mode in MODES:
            layerskip.generate(loaded, prompt_ids=ids[0], max_steps=8, **engines[engine], **MODES[mode])
    jobs = [(i, mode, engine) for i in range(len(prompts)) for mode in MODES for engine in engines
            if (engine, mode, i) not in done]
    with open_records(records_path, records) as sink:
        for index, mode, engine in tqdm(jobs, desc="decoding", unit="run"):
            record = run(engine, mode, index)
            write_record(sink, record)
            records.append(record)

    costs = None
    if settings["generation_strategy"] == "self_speculative":
        costs = measure_step_costs(loaded.model, settings["exit_layer"], settings["num_speculations"],
                                   settings.get("draft_vocab_size", 0),
                                   draft_adapter=loaded.draft_adapter if "draft_adapter" in settings else None,
                                   candidates=settings.get("draft_candidates", 1))
    lines = render(records, loaded.name, settings, args, len(prompts), loaded.model.embed_tokens.weight.dtype, costs)
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


def render(records: list[dict], model: str, settings: dict, args: argparse.Namespace, prompts: int,
           model_dtype: torch.dtype, costs: tuple[float, float] | None) -> list[str]:
    """The table; with `costs` (c_d, c_v timed on the engine), the cost model's speedup from each row's measured
    tokens and drafts per round: tokens per round / (drafts per round x c_d + c_v)."""
    lines = [f"Model {model}; stored settings: {json.dumps(settings)}. Machine: "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{prompts} held-out chat prompts, up to {args.max_steps} new tokens, "
             f"{str(model_dtype).removeprefix('torch.')}.",
             "",
             *([f"Cost model, timed on the engine: c_d = {costs[0]:.3f}, c_v = {costs[1]:.3f} (k = "
                f"{settings['num_speculations']}, {settings.get('draft_candidates', 1)} candidate(s) at the last "
                "draft position)."] if costs else []),
             "",
             "| mode | prompts | AR tokens/s | stored settings tokens/s | speedup | cost model | acceptance | "
             "tokens/round | greedy output = AR |",
             "|---|---|---|---|---|---|---|---|---|"]
    reference = {r["prompt"]: r["token_ids"] for r in records if r["engine"] == "autoregressive" and r["mode"] == "greedy"}
    for mode in MODES:
        for kind in ("code", "prose", "all"):
            chosen = [r for r in records if r["mode"] == mode and kind in ("all", r["kind"])]
            ar = [r for r in chosen if r["engine"] == "autoregressive"]
            tested = [r for r in chosen if r["engine"] == "stored settings"]
            if not ar or not tested:
                continue
            ar_speed = sum(r["new_tokens"] for r in ar) / sum(r["seconds"] for r in ar)
            speed = sum(r["new_tokens"] for r in tested) / sum(r["seconds"] for r in tested)
            drafted = sum(r["drafted"] for r in tested)
            acceptance = f"{sum(r['accepted'] for r in tested) / drafted:.1%}" if drafted else "-"
            rounds = sum(r["rounds"] for r in tested)
            per_round = sum(r["new_tokens"] for r in tested) / rounds
            predicted = f"{per_round / (drafted / rounds * costs[0] + costs[1]):.2f}x" if costs else "-"
            same = "-" if mode != "greedy" else (
                "yes" if all(r["token_ids"] == reference.get(r["prompt"]) for r in tested) else "NO")
            lines.append(f"| {mode} | {kind} ({len(tested)}) | {ar_speed:.1f} | {speed:.1f} | **{speed / ar_speed:.2f}x** | "
                         f"{predicted} | {acceptance} | {per_round:.2f} | {same} |")
    return lines


if __name__ == "__main__":
    main()
