"""Weights prepared for one kernel path: one matrix per group of linears that read the same input.

Decoding runs every weight matrix over a few rows (1 per step, k+1 per verification), so the layout and the
kernel decide its speed. A group (q/k/v, gate/up, or a single linear) becomes one prepared matrix whose
outputs are the group's outputs concatenated. Three paths:
- native: our C++ kernels (native.py): float32, bfloat16, or GGUF blocks (Q8_0, Q4_0, Q4_1), read once per call
  whatever the number of rows, and row-invariant, at any row count;
- packed: oneDNN-prepacked float32 for passes of up to 32 rows (longer ones take torch's GEMM);
- plain: torch's F.linear (no prepared copy at all).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from layerskip.model.kernels import packed as onednn

BLOCK = 32  # elements per GGUF block of the quantized formats
BLOCK_FORMATS = ("q8_0", "q4_0", "q4_1")
WEIGHT_FORMATS = ("float32", "bfloat16", *BLOCK_FORMATS)
KERNEL_NAMES = {"float32": "f32", "bfloat16": "bf16"}  # the extension's names for the float formats
BITS_PER_WEIGHT = {"float32": 32.0, "bfloat16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}
PANEL = 16  # output features per panel of the native layouts
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
BLOCK_HEADS = {"q8_0": 2, "q4_0": 2, "q4_1": 4}  # bytes of fp16 scale (and Q4_1's min) before a block's data


class KernelError(ValueError):
    """A kernel path or weight format that this model or machine cannot run."""


def ggml_type(weight_format: str):
    import gguf

    return gguf.GGMLQuantizationType[weight_format.upper()]


def quantize_blocks(weight: torch.Tensor, weight_format: str) -> torch.Tensor:
    """A float matrix [N, K] as GGUF blocks, uint8 [N, K/32 * bytes per block], quantized by the gguf package."""
    from gguf.quants import quantize

    values = weight.detach().float().cpu().numpy()
    return torch.from_numpy(np.ascontiguousarray(quantize(values, ggml_type(weight_format))))


def dequantize_blocks(blocks: torch.Tensor, weight_format: str) -> torch.Tensor:
    """The float32 matrix that GGUF blocks stand for (the gguf package's own dequantization)."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(blocks.numpy(), ggml_type(weight_format)), np.float32))


def float_panels(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float matrix [N, K] as the native kernels' panels of 16 output features, the last one padded with zero
    features (fewrow.cpp: PanelRun): float32 [ceil(N/16), K, 16], each k's 16 weights adjacent; bfloat16
    [ceil(N/16), ceil(K/2), 32], the weights of k and k + 1 interleaved per feature (K padded with a zero)."""
    out_features, in_features = weight.shape
    pairs = dtype == torch.bfloat16
    depth = in_features + (in_features % 2 if pairs else 0)
    padded = torch.zeros(-(-out_features // PANEL) * PANEL, depth, dtype=dtype)
    padded[:out_features, :in_features] = weight.detach()
    panels = padded.view(-1, PANEL, depth).transpose(1, 2)  # [P, K, 16]
    if pairs:
        panels = panels.reshape(panels.shape[0], depth // 2, 2, PANEL).transpose(2, 3)  # [P, K/2, 16, 2]
    return panels.reshape(panels.shape[0], -1, 2 * PANEL if pairs else PANEL).contiguous()


def block_panels(blocks: torch.Tensor, weight_format: str) -> torch.Tensor:
    """GGUF blocks [N, K/32 * bytes] as the native kernels' panels of 16 features, uint8 [ceil(N/16), K/32 * 16 *
    bytes] (fewrow.cpp: PanelQRun): per block, the 16 features' fp16 scales (and Q4_1's 16 mins), then 4 bytes
    of each feature's data in turn (Q8_0's weights + 128, as unsigned bytes; Q4's nibble bytes as they are)."""
    count, row_bytes = blocks.shape
    size, heads = BLOCK_BYTES[weight_format], BLOCK_HEADS[weight_format]
    padded = torch.zeros(-(-count // PANEL) * PANEL, row_bytes, dtype=torch.uint8)
    padded[:count] = blocks
    grid = padded.view(-1, PANEL, row_bytes // size, size)  # [P, 16 features, blocks, bytes]
    scales = grid[..., :heads].reshape(*grid.shape[:3], heads // 2, 2).permute(0, 2, 3, 1, 4)  # [P, b, field, f, 2]
    data = grid[..., heads:].reshape(*grid.shape[:3], -1, 4).permute(0, 2, 3, 1, 4)  # [P, b, j, f, 4 bytes]
    if weight_format == "q8_0":
        data = data ^ 0x80
    parts = [scales.reshape(*scales.shape[:2], -1), data.reshape(*data.shape[:2], -1)]
    return torch.cat(parts, -1).reshape(grid.shape[0], -1).contiguous()


def unpanel_blocks(panels: torch.Tensor, weight_format: str, out_features: int) -> torch.Tensor:
    """The GGUF blocks [N, K/32 * bytes] that block_panels laid out."""
    size, heads = BLOCK_BYTES[weight_format], BLOCK_HEADS[weight_format]
    grid = panels.view(panels.shape[0], -1, PANEL * size)  # [P, blocks, 16 * bytes]
    scales = grid[..., :PANEL * heads].reshape(*grid.shape[:2], heads // 2, PANEL, 2).permute(0, 3, 1, 2, 4)
    data = grid[..., PANEL * heads:].reshape(*grid.shape[:2], -1, PANEL, 4).permute(0, 3, 1, 2, 4)
    if weight_format == "q8_0":
        data = data ^ 0x80
    blocks = torch.cat([scales.reshape(*scales.shape[:3], -1), data.reshape(*data.shape[:3], -1)], -1)
    return blocks.reshape(panels.shape[0] * PANEL, -1)[:out_features].contiguous()


def unpanel(panels: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The matrix [N, K] that float_panels laid out."""
    count = panels.shape[0]
    if panels.dtype == torch.bfloat16:
        panels = panels.view(count, -1, PANEL, 2).transpose(2, 3).reshape(count, -1, PANEL)
    return panels.transpose(1, 2).reshape(count * PANEL, -1)[:out_features, :in_features]


class PreparedLinear:
    """y = x W^T + b for the rows a kernel path serves; `applies` says whether this pass is one of them."""

    path = "plain"
    row_invariant = False

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        self.out_features = out_features
        self.bias = bias

    def applies(self, x: torch.Tensor) -> bool:
        return not torch.is_grad_enabled()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, weight: torch.Tensor) -> PreparedLinear:
        """The same path for the output rows `ids` only (`weight`: those rows in float), e.g. a draft head slice."""
        raise NotImplementedError


class PackedLinear(PreparedLinear):
    path = "packed"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[0], bias)
        self.packed = onednn.pack_weight(weight)

    def applies(self, x: torch.Tensor) -> bool:
        return super().applies(x) and x.numel() <= onednn.PACKED_MAX_ROWS * x.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return onednn.packed_linear(x, self.packed, self.bias)

    def rows(self, ids: torch.Tensor, weight: torch.Tensor) -> PackedLinear:
        return PackedLinear(weight, None if self.bias is None else self.bias[ids])


class NativeLinear(PreparedLinear):
    """Our kernels: every pass without autograd, whatever its length, so a row never depends on its neighbours.

    Made from the weights in their natural form (`weights`: a float matrix [N, K], or GGUF blocks uint8
    [N, K/32 * bytes per block]), which it lays out for the kernels as panels of 16 output features."""

    path = "native"
    row_invariant = True

    def __init__(self, extension, weight_format: str, weights: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__(out_features, None if bias is None else bias.float())
        self.extension = extension
        self.weight_format = weight_format
        self.in_features = in_features
        self.kernel = getattr(extension, f"linear_{KERNEL_NAMES.get(weight_format, weight_format)}")
        if weight_format in BLOCK_FORMATS:
            self.data = block_panels(weights, weight_format)
        else:
            self.data = float_panels(weights, torch.float32 if weight_format == "float32" else torch.bfloat16)

    @classmethod
    def from_float(cls, extension, weight: torch.Tensor, bias: torch.Tensor | None,
                   weight_format: str) -> NativeLinear:
        out_features, in_features = weight.shape
        if weight_format in BLOCK_FORMATS:
            if in_features % BLOCK:
                raise KernelError(f"{weight_format} weights need an input size that is a multiple of {BLOCK}, "
                                  f"not {in_features}")
            weight = quantize_blocks(weight, weight_format)
        return cls(extension, weight_format, weight, in_features, out_features, bias)

    def weights(self) -> torch.Tensor:
        """The weights in their natural form: GGUF blocks [N, K/32 * bytes] or the float matrix [N, K]."""
        if self.weight_format in BLOCK_FORMATS:
            return unpanel_blocks(self.data, self.weight_format, self.out_features)
        return unpanel(self.data, self.out_features, self.in_features)

    def rows(self, ids: torch.Tensor, weight: torch.Tensor) -> NativeLinear:
        return NativeLinear(self.extension, self.weight_format, self.weights()[ids.cpu()], self.in_features, len(ids),
                            None if self.bias is None else self.bias[ids])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def dequantized(self) -> torch.Tensor:
        """The float32 weights this kernel multiplies by."""
        if self.weight_format in BLOCK_FORMATS:
            return dequantize_blocks(self.weights(), self.weight_format).reshape(self.out_features, self.in_features)
        return self.weights().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        rows = rows.float().contiguous() if rows.dtype != torch.float32 or not rows.is_contiguous() else rows
        out = self.kernel(rows, self.data, self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def fused_weight(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of linears that read one input, stacked (outputs concatenated), and their biases if all have one."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    return weight, bias
