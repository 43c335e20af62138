"""Serving under load: N concurrent streaming clients against `layerskip serve` on loopback, autoregressive and
self-speculative (the model's stored settings), in one run.

The server runs as its own process (`layerskip serve --sample false --ignore_eos`, so every request decodes
--max_tokens tokens and the clients share no CPU time with its Python). For each strategy and each client count,
every client sends --requests chat requests one after another, streaming, each naming the strategy in its body.
Reported per point: aggregate generated tokens/s, p50/p99 time to first token (request sent to first text) and
inter-token latency (a request's time per token after its first), errors, and the server's RSS after the point;
the table gives each point's ratios to the fewest clients of the same strategy (1 by default). With --repeats N
every point runs N times, the strategies side by side for each client count, and the table takes each point's
median run. Writes
<output_dir>/points.csv, table.md and the server's log, server.log.

    python benchmarks/bench_serve.py --output_dir logs/bench_serve
    python benchmarks/bench_serve.py --clients 1,2 --requests 2 --max_tokens 8   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from layerskip.jsonl import read_objects

STRATEGIES = ("autoregressive", "self_speculative")
STARTUP_SECONDS = 600  # the first start builds the CPU kernels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded default")
    parser.add_argument("--quantize", default="none", help="none, bf16, int8 or int4, as `serve --quantize`")
    parser.add_argument("--prompts", default=str(Path(__file__).parent / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--clients", default="1,2,4,8,16", help="concurrent clients per point")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every point this many times against the same server: the table shows each "
                             "point's median run, and the server's RSS after each run shows whether memory grows")
    parser.add_argument("--output_dir", default="logs/bench_serve")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, batch: int, log: Any,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`layerskip serve` (and `extra` flags) with room for every client in the batch; returns once /health
    answers."""
    command = [sys.executable, "-m", "layerskip.cli", "serve", "--port", str(port), "--sample", "false",
               "--ignore_eos", "--max_batch_size", str(batch), "--quantize", args.quantize, *extra]
    server = subprocess.Popen(command + (["--model", args.model] if args.model else []), stdout=log, stderr=log)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}; its log: {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise SystemExit(f"the server did not start within {STARTUP_SECONDS} s; its log: {log.name}")
        time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, strategy: str, max_tokens: int
                      ) -> dict[str, Any]:
    """One streamed chat request: its time to first text, time per token after it, tokens, or its error."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "generation_strategy": strategy}
    sent, first, last, tokens = time.perf_counter(), None, None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    if first is None:
        return {"error": "no text"}
    return {"ttft": first - sent, "itl": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens}


async def run_point(url: str, prompts: list[str], strategy: str, clients: int, requests: int, max_tokens: int
                    ) -> tuple[list[dict[str, Any]], float]:
    """Every client's requests, all clients at once; the results and the wall time."""
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client(index: int) -> list[dict[str, Any]]:
            return [await one_request(client, url, prompts[(index * requests + number) % len(prompts)], strategy,
                                      max_tokens) for number in range(requests)]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(index) for index in range(clients)))
        return [result for results in per_client for result in results], time.perf_counter() - start


def summary(strategy: str, clients: int, results: list[dict[str, Any]], seconds: float, rss: int) -> dict[str, Any]:
    done = [result for result in results if "error" not in result]
    ttft = [result["ttft"] for result in done]
    itl = [result["itl"] for result in done if result["itl"] is not None]

    def percentile(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {"strategy": strategy, "clients": clients, "requests": len(results), "errors": len(results) - len(done),
            "tokens": sum(result["tokens"] for result in done), "seconds": seconds,
            "tokens_per_second": sum(result["tokens"] for result in done) / seconds,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99), "server_rss_mb": rss / 2 ** 20}


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f} ms"


def median_runs(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (strategy, clients), the run with the median tokens/s (every column from that one run)."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for point in points:
        runs.setdefault((point["strategy"], point["clients"]), []).append(point)
    chosen = [sorted(group, key=lambda point: point["tokens_per_second"])[len(group) // 2] for group in runs.values()]
    return sorted(chosen, key=lambda point: (STRATEGIES.index(point["strategy"]), point["clients"]))


def table(points: list[dict[str, Any]], args: argparse.Namespace, rss_start: int) -> str:
    fewest = min(point["clients"] for point in points)
    base_label = f"{fewest} client" + ("s" if fewest > 1 else "")
    lines = [f"Model {args.model or 'the embedded default'} (--quantize {args.quantize}), greedy, {args.max_tokens} "
             f"tokens a request, {args.requests} requests per client, streaming over loopback. Machine: "
             f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs. Server RSS "
             f"{rss_start / 2 ** 20:.0f} MB after start.", "",
             f"| strategy | clients | errors | tokens/s | vs {base_label} | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
             f"ITL p50 vs {base_label} | server RSS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for point in points:
        base = next(p for p in points if p["strategy"] == point["strategy"] and p["clients"] == fewest)
        speed = point["tokens_per_second"] / base["tokens_per_second"] if base["tokens_per_second"] else 0.0
        itl = f"{point['itl_p50'] / base['itl_p50']:.2f}x" if point["itl_p50"] and base["itl_p50"] else "-"
        lines.append(f"| {point['strategy']} | {point['clients']} | {point['errors']} | "
                     f"{point['tokens_per_second']:.1f} | **{speed:.2f}x** | {milliseconds(point['ttft_p50'])} | "
                     f"{milliseconds(point['ttft_p99'])} | {milliseconds(point['itl_p50'])} | "
                     f"{milliseconds(point['itl_p99'])} | {itl} | {point['server_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(count) for count in args.clients.split(",")]
    prompts = [record["prompt"] for _, record in read_objects(Path(args.prompts))]
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with open(out / "server.log", "w") as log:
        server = start_server(args, port, max(counts), log)
    try:
        process = psutil.Process(server.pid)
        for strategy in STRATEGIES:  # warm: first-call allocations of each strategy
            asyncio.run(run_point(url, prompts, strategy, 1, 1, 4))
        rss_start = process.memory_info().rss
        points, rss_after = [], []
        for repeat in range(args.repeats):
            for clients in counts:
                for strategy in STRATEGIES:  # side by side, so the machine's drift hits both alike
                    results, seconds = asyncio.run(run_point(url, prompts, strategy, clients, args.requests,
                                                             args.max_tokens))
                    points.append({"repeat": repeat, **summary(strategy, clients, results, seconds,
                                                               process.memory_info().rss)})
                    print(f"run {repeat + 1}, {strategy}, {clients} clients: "
                          f"{points[-1]['tokens_per_second']:.1f} tokens/s, {points[-1]['errors']} errors",
                          file=sys.stderr)
            rss_after.append(process.memory_info().rss)
    finally:
        server.terminate()
        server.wait(timeout=60)
    with open(out / "points.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    report = table(median_runs(points), args, rss_start)
    report += ("\n\nServer RSS after each run of all points: "
               + ", ".join(f"{rss / 2 ** 20:.0f} MB" for rss in rss_after)
               + f"; errors in all runs: {sum(point['errors'] for point in points)}.")
    print(report)
    (out / "table.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
