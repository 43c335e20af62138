"""A long prompt joining a busy server: how long the requests already decoding stall, with and without chunked
prefill (`layerskip serve --prefill_chunk`), in one run.

For each --prefill_chunk value a fresh server starts; one client streams a greedy chat reply of --short_tokens
tokens, and once it is decoding another sends a prompt of about --long_tokens tokens. Reported per value: the
streaming request's longest and p99 gap between two text chunks, its median gap, and the long request's time to
first text. Writes <output_dir>/table.md.

    python benchmarks/bench_prefill.py --output_dir logs/bench_prefill
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import httpx
import numpy as np

from bench_serve import free_port, start_server

SENTENCE = "The quick brown fox jumps over the lazy dog. "  # 10 tokens a repeat for SmolLM2's tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded default")
    parser.add_argument("--quantize", default="none", help="none, bf16, int8 or int4, as `serve --quantize`")
    parser.add_argument("--prefill_chunks", default="0,256,64", help="--prefill_chunk values, 0: a prompt in one pass")
    parser.add_argument("--long_tokens", type=int, default=1500, help="about this many tokens in the long prompt")
    parser.add_argument("--short_tokens", type=int, default=160)
    parser.add_argument("--output_dir", default="logs/bench_prefill")
    return parser.parse_args()


async def text_times(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float]]:
    """When the request was sent, and when each chunk with text arrived."""
    sent, times = time.perf_counter(), []
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line.removeprefix("data: "))["choices"]
                if choices and choices[0]["delta"].get("content"):
                    times.append(time.perf_counter())
    return sent, times


async def interference(url: str, args: argparse.Namespace) -> dict[str, float]:
    short = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": args.short_tokens,
             "generation_strategy": "autoregressive"}
    long = {"messages": [{"role": "user", "content": SENTENCE * (args.long_tokens // 10)}], "max_tokens": 8,
            "generation_strategy": "autoregressive"}
    async with httpx.AsyncClient(timeout=None) as client:
        streaming = asyncio.create_task(text_times(client, url, short))
        await asyncio.sleep(0.5)  # the short request is decoding
        sent, long_times = await text_times(client, url, long)
        _, times = await streaming
    gaps = np.diff(times)
    return {"max_gap": float(gaps.max()), "p99_gap": float(np.percentile(gaps, 99)),
            "median_gap": float(np.median(gaps)), "long_ttft": long_times[0] - sent}


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for chunk in [int(value) for value in args.prefill_chunks.split(",")]:
        port = free_port()
        with open(out / f"server_{chunk}.log", "w") as log:
            server = start_server(args, port, 4, log, ("--prefill_chunk", str(chunk)))
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            asyncio.run(interference(url, argparse.Namespace(**{**vars(args), "long_tokens": 20})))  # warm
            rows.append((chunk, asyncio.run(interference(url, args))))
        finally:
            server.terminate()
            server.wait(timeout=60)
    lines = [f"Model {args.model or 'the embedded default'} (--quantize {args.quantize}), greedy; a {args.short_tokens}-"
             f"token streamed reply while a prompt of about {args.long_tokens} tokens joins. Machine: "
             f"{platform.processor() or platform.machine()}.", "",
             "| --prefill_chunk | streaming request's longest gap | p99 gap | median gap | long prompt's time to first "
             "text |", "|---|---|---|---|---|"]
    for chunk, row in rows:
        lines.append(f"| {chunk or 'off (0)'} | {1000 * row['max_gap']:.0f} ms | {1000 * row['p99_gap']:.0f} ms | "
                     f"{1000 * row['median_gap']:.0f} ms | {1000 * row['long_ttft']:.0f} ms |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
