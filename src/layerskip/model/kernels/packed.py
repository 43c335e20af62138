"""oneDNN-prepacked float32 weights: torch's fastest few-row path on some CPUs (not row-invariant).

The packed path sums in another order than MKL's default one (logits differ by ~1e-4), and a row's result
depends on how many rows share the call. It is kept as a fallback where our native kernels cannot be built.
"""

from __future__ import annotations

import torch

PACKED_MAX_ROWS = 32  # beyond this (prompt prefill) MKL's GEMM is faster


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
