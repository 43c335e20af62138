"""What bounds CPU decoding: weight-streaming bandwidth of the matrix products one decoding step runs.

For the embedded default's shapes (30 layers; hidden 576, MLP 1536, 9 query / 3 KV heads of 64), this times
one pass over all layer weights with M activation rows (M = 1: a decoding step; M = k + 1: a verification)
through MKL's default `F.linear`, through oneDNN-prepacked weights, and through prepacked weights with
q/k/v and gate/up fused (what the engine uses), next to a plain streaming read of the same bytes.
A second table gives the time of a pass against M for the fused float32 path and for bfloat16 (AMX on
CPUs that have it): what a verification of M - 1 drafts costs relative to a decoding step.
Kernels are interleaved and each cell is the median of several passes.

    python benchmarks/bench_gemv.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

LAYERS = 30
SEPARATE = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
FUSED = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,3,5,8,13,16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1)  # noqa: E731
    packed_mm = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    separate = [[torch.randn(*shape) for shape in SEPARATE] for _ in range(LAYERS)]
    fused = [[torch.cat([w[0], w[1], w[2]]), w[3], torch.cat([w[4], w[5]]), w[6]] for w in separate]
    separate_packed = [[pack(w) for w in layer] for layer in separate]
    fused_packed = [[pack(w) for w in layer] for layer in fused]
    total_bytes = sum(w.numel() * 4 for layer in separate for w in layer)
    flat = torch.randn(total_bytes // 4)

    fused_bf16 = [[w.bfloat16() for w in layer] for layer in fused]
    pass_ms: dict[int, tuple[float, float]] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {total_bytes / 1e6:.0f} MB of float32 "
          "layer weights per pass; GB/s = weight bytes / time")
    print()
    print("| rows M | streaming read | MKL F.linear | oneDNN packed | oneDNN packed, fused qkv / gate-up | packed fused vs MKL |")
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(1, rows, 576)
        wide = torch.randn(1, rows, 1536)
        pick = lambda w: wide if w.shape[-1] == 1536 else x  # noqa: E731
        x_bf16, wide_bf16 = x.bfloat16(), wide.bfloat16()
        pick_bf16 = lambda w: wide_bf16 if w.shape[-1] == 1536 else x_bf16  # noqa: E731
        kernels = {
            "mkl": lambda: [F.linear(pick(w), w) for layer in separate for w in layer],
            "packed": lambda: [packed_mm(pick(w0), w) for layer, raw in zip(separate_packed, separate)
                               for w, w0 in zip(layer, raw)],
            "fused": lambda: [packed_mm(pick(w0), w) for layer, raw in zip(fused_packed, fused)
                              for w, w0 in zip(layer, raw)],
            "read": lambda: flat.sum(),
            "bf16": lambda: [F.linear(pick_bf16(w), w) for layer in fused_bf16 for w in layer],
        }
        times = {name: [] for name in kernels}
        for _ in range(args.repeats):
            for name, fn in kernels.items():
                times[name].append(median_seconds(fn, 1))
        best = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        gbps = {name: total_bytes / seconds / 1e9 for name, seconds in best.items()}
        print(f"| {rows} | {gbps['read']:.1f} | {gbps['mkl']:.1f} | {gbps['packed']:.1f} | {gbps['fused']:.1f} | "
              f"{best['mkl'] / best['fused']:.2f}x |")
        pass_ms[rows] = (best["fused"] * 1e3, best["bf16"] * 1e3)
    first = next(iter(pass_ms.values()))
    print()
    print("| rows M | float32 packed fused, ms | vs its M = first | bfloat16 fused, ms | vs its M = first |")
    print("|---|---|---|---|---|")
    for rows, (fp32, bf16) in pass_ms.items():
        print(f"| {rows} | {fp32:.1f} | {fp32 / first[0]:.2f}x | {bf16:.1f} | {bf16 / first[1]:.2f}x |")


if __name__ == "__main__":
    main()
