"""Tensor parallelism on this machine: one process against two ranks under torchrun, side by side.

    python benchmarks/bench_parallel.py [--repeats 2] [--max_steps 64] [--output_dir logs/bench_parallel]

The embedded default decodes the same chat prompts greedily (EOS ignored), plainly and with its stored
self-speculative settings, in one process with every core, then as two gloo ranks (torchrun) with the cores
shared among them, alternately `--repeats` times; the table gives tokens/s (the best run of each), the ratio of
two ranks to one process, and whether the tokens are the same. On a CPU the ranks share one memory bus, so this
measures the collectives' cost (two all-reduces a layer, a gather a head call) more than a gain: tensor
parallelism pays across devices, each with its own memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["Write a Python function that checks whether a number is prime.",
           "Explain in two sentences why the sky is blue.",
           "List three tips for writing clear commit messages.",
           "What is the difference between a list and a tuple in Python?"]
STRATEGIES = {"autoregressive": {"generation_strategy": "autoregressive"}, "stored": {}}


def worker(output: Path, max_steps: int) -> None:
    """One run (a process, or every rank of a torchrun): each strategy over every prompt, rank 0 writes."""
    import torch

    import layerskip

    loaded = layerskip.load()
    ids = [layerskip.encode_prompt(loaded, prompt) for prompt in PROMPTS]
    results = {}
    for name, options in STRATEGIES.items():
        layerskip.generate(loaded, prompt_ids=ids[0], max_steps=8, sample=False, **options)  # warm-up
        tokens, seconds = [], 0.0
        for prompt in ids:
            result = layerskip.generate(loaded, prompt_ids=prompt, max_steps=max_steps, sample=False,
                                        ignore_eos=True, **options)
            tokens.append(result.token_ids)
            seconds += result.stats.seconds
        results[name] = {"tokens": tokens, "tokens_per_second": sum(map(len, tokens)) / seconds}
    if int(os.environ.get("RANK", "0")) == 0:
        output.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}))


def launch(ranks: int, output: Path, max_steps: int) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", str(output), "--max_steps", str(max_steps)]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, *script] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=64)
    parser.add_argument("--output_dir", default="logs/bench_parallel")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.max_steps)
        return
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for ranks in runs:
            print(f"run {repeat + 1}/{args.repeats}: {ranks} rank(s)", file=sys.stderr, flush=True)
            runs[ranks].append(launch(ranks, folder / f"run{repeat}_ranks{ranks}.json", args.max_steps))
    print(f"Machine: {os.cpu_count()} cores; {args.max_steps} new tokens x {len(PROMPTS)} chat prompts, greedy, "
          f"EOS ignored; best of {args.repeats}; {time.strftime('%Y-%m-%d')}\n")
    print("| strategy | one process (threads) | two ranks (threads each) | two ranks vs one | same tokens |")
    print("|---|---|---|---|---|")
    for name in STRATEGIES:
        best = {ranks: max(run["results"][name]["tokens_per_second"] for run in done) for ranks, done in runs.items()}
        same = all(run["results"][name]["tokens"] == runs[1][0]["results"][name]["tokens"]
                   for done in runs.values() for run in done)
        print(f"| {name} | {best[1]:.1f} tok/s ({runs[1][0]['threads']}) | {best[2]:.1f} tok/s "
              f"({runs[2][0]['threads']}) | {best[2] / best[1]:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
