"""Where each weight format's few-row products turn compute-bound: a pass over all the embedded default's weight
matrices (30 layers and the head) through our native kernels, by the number of activation rows.

    python benchmarks/bench_rows.py [--rows 1,2,3,5,8,12,16] [--repeats 7]

A decoding step is one row, a verification of k drafts k + 1 rows, a batch of B sequences B rows. While a pass
streams its weights from memory, more rows are nearly free; once the rows' arithmetic takes longer than the weight
stream, each row adds its own cost. Per format: the one-row pass (ms, and GB/s of weights), every row count's time
as a multiple of it (c_v for k + 1 rows, less the head's share), the multiply-adds per second at the most rows,
and the first row count that costs over 1.15 one-row passes. Formats interleaved, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import layerskip

FORMATS = ("none", "bf16", "int8", "int4")
COMPUTE_BOUND = 1.15  # the issue's c_v target: above it, the rows' arithmetic shows


def prepared_linears(quantize: str) -> list:
    model = layerskip.load(quantize=quantize, cpu_kernels="native").model
    return [module.prepared[group] for module in model.prepared_modules() for group in module.prepared]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,5,8,12,16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    linears = {fmt: prepared_linears(fmt) for fmt in FORMATS}
    widths = {linear.in_features for group in linears.values() for linear in group}
    inputs = {(r, k): torch.randn(r, k) for r in rows for k in widths}
    seconds: dict[tuple[str, int], list[float]] = {(fmt, r): [] for fmt in FORMATS for r in rows}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms up
            for r in rows:
                for fmt, group in linears.items():
                    start = time.perf_counter()
                    for linear in group:
                        linear(inputs[(r, linear.in_features)])
                    seconds[(fmt, r)].append(time.perf_counter() - start)
    median = {key: statistics.median(values[1:]) for key, values in seconds.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; a pass over every weight matrix of the "
          f"embedded default (30 layers + head), median of {args.repeats}\n")
    print("| format | MB | 1 row, ms | GB/s | " + " | ".join(f"{r} rows" for r in rows[1:])
          + f" | G multiply-adds/s at {rows[-1]} rows | over {COMPUTE_BOUND}x from |")
    print("|---|---|---|---|" + "---|" * (len(rows) - 1) + "---|---|")
    for fmt, group in linears.items():
        megabytes = sum(linear.nbytes for linear in group) / 1e6
        weights = sum(linear.in_features * linear.out_features for linear in group)
        one = median[(fmt, rows[0])]
        ratios = [median[(fmt, r)] / one for r in rows[1:]]
        bound_from = next((r for r, ratio in zip(rows[1:], ratios) if ratio > COMPUTE_BOUND), None)
        rate = rows[-1] * weights / median[(fmt, rows[-1])] / 1e9
        print(f"| {fmt} | {megabytes:.0f} | {one * 1e3:.1f} | {megabytes / 1e3 / one:.0f} | "
              + " | ".join(f"{ratio:.2f}" for ratio in ratios)
              + f" | {rate:.0f} | {bound_from or '-'} |")


if __name__ == "__main__":
    main()
