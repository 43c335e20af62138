"""Weight-only int8 and int4 linears through torch's own kernels, for decoding on CUDA.

A decoding step multiplies every weight matrix by one row (k+1 rows when verifying a draft), so on a GPU it is
bound by the bytes of weights read, not by arithmetic: weights stored in 8 or 4 bits instead of bfloat16 cut
those bytes by 2x or ~3.5x. Our C++ kernels (native.py) are CPU-only, so these use torch's: on CUDA gpt-fast's
int8 formulation (which torch.compile fuses into one memory-bound kernel) and the tinygemm int4 kernel
(`_weight_int4pack_mm`); on CPU the same code runs through the CPU variants of the same ops, so that tests check
the quantization, the packing and the products without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerskip.model.kernels.linear import KernelError, PreparedLinear, fused_weight

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the quantization groups (along K) the int4 kernels are built for
INT4_ROW_MULTIPLE = 16  # N is padded to this: the CPU op needs N % 16, CUDA's N % 8 (N % 16 on ROCm)


class TorchInt8Linear(PreparedLinear):
    """Symmetric int8 per output row: w ~ q * scale, q in [-127, 127], scale = max|w_row| / 127 (float32).

    y = F.linear(x, q.to(x.dtype)) * scale: under torch.compile the cast fuses into the product and the weight
    is read once as int8. In eager mode the cast writes a copy of the weight in x's dtype on every call (more
    traffic than bfloat16 weights), so the saving on CUDA needs a compiled decoding step.
    """

    path = "torch"
    weight_format = "int8"

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[0], None if bias is None else bias.float())
        self.weight = weight    # int8 [N, K]
        self.scales = scales    # float32 [N]

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> TorchInt8Linear:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1) / 127
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
        quantized = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # half to even
        return cls(quantized.contiguous(), scales, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    def rows(self, ids: torch.Tensor, weight: torch.Tensor) -> TorchInt8Linear:
        """The stored rows themselves: per-row quantization makes them what quantizing `weight` would give."""
        ids = ids.to(self.weight.device)
        return TorchInt8Linear(self.weight[ids].contiguous(), self.scales[ids],
                               None if self.bias is None else self.bias[ids])

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def dequantized(self) -> torch.Tensor:
        """The float32 weights [N, K] this linear multiplies by."""
        return self.weight.float() * self.scales[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4 bits per group of `group_size` weights along K, in the tinygemm kernels' convention:
    w ~ (q - 8) * scale + zero, q in [0, 15]; scale = (max - min) / 15 and zero = min + 8 * scale, both rounded
    to bfloat16 first, and q rounded (half to even) against the rounded values the kernels will use.
    Returns q (int32 [N, K]) and scales_and_zeros (bfloat16 [K / group_size, N, 2]: [..., 0] scale, [..., 1] zero).
    """
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp_(min=1e-6).to(torch.bfloat16)  # a constant group keeps a usable step
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    steps = (groups - zeros.float()[..., None]) / scales.float()[..., None]
    quantized = (torch.round(steps) + 8).clamp_(0, 15).to(torch.int32).reshape(n, k)
    return quantized, torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def check_int4_shape(in_features: int, group_size: int, device: torch.device) -> None:
    """The int4 kernels' requirements, as a KernelError at construction rather than a failed check mid-decoding."""
    if device.type not in ("cpu", "cuda"):
        raise KernelError(f"torch's int4 kernels run on cpu and cuda here, not on {device.type}")
    if group_size not in INT4_GROUP_SIZES:
        raise KernelError(f"int4 groups of {group_size} weights: torch's int4 kernels take groups of "
                          f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        raise KernelError(f"int4 weights in groups of {group_size} need an input size that is a multiple of "
                          f"{group_size}, not {in_features}")
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        raise KernelError("torch's int4 CUDA kernel needs a GPU of compute capability 8.0 or newer (bfloat16 "
                          f"tensor cores), not {torch.cuda.get_device_capability(device)}")


class TorchInt4Linear(PreparedLinear):
    """4-bit groupwise weights (see quantize_int4) through torch's int4 kernels: on CUDA `_weight_int4pack_mm`
    (bfloat16 only: x is cast to bfloat16 and the output back), on CPU `_weight_int4pack_mm_for_cpu` in x's dtype.
    N is padded with zero rows to a multiple of 16 and the output sliced, so any output size runs (a draft head's
    slice of the vocabulary included)."""

    path = "torch"
    weight_format = "int4"

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None):
        super().__init__(out_features, None if bias is None else bias.float())
        self.packed = packed                      # the op's own layout (CUDA: int32 tiles; CPU: uint8 [N, K/2])
        self.scales_and_zeros = scales_and_zeros  # bfloat16 [K / group_size, padded N, 2]
        self.group_size = group_size
        self.in_features = in_features
        self.on_cuda = packed.device.type == "cuda"

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32) -> TorchInt4Linear:
        out_features, in_features = weight.shape
        check_int4_shape(in_features, group_size, weight.device)
        padded = -out_features % INT4_ROW_MULTIPLE
        quantized, scales_and_zeros = quantize_int4(F.pad(weight.detach().float(), (0, 0, 0, padded)), group_size)
        if weight.device.type == "cuda":
            # [N, K/2] bytes, the even k in the high nibble; inner k-tiles: the widest load that K allows.
            inner_k_tiles = next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)
            pairs = (quantized[:, ::2] << 4 | quantized[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        else:  # the CPU op takes q itself (int32 [N, K]); its inner k-tiles argument is not used
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized.contiguous(), 2)
        return cls(packed, scales_and_zeros, group_size, in_features, out_features, bias)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, K] -> [M, padded N] through the device's op, in bfloat16 on CUDA and rows' dtype on CPU."""
        if self.on_cuda:
            return torch.ops.aten._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), self.packed,
                                                      self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, self.group_size,
                                                          self.scales_and_zeros.to(rows.dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features))[:, :self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, weight: torch.Tensor) -> TorchInt4Linear:
        """`weight` quantized again: per-row groups make it the same quantization as these rows (the packed
        layout is the op's own, so rows are not sliced out of it)."""
        bias = None if self.bias is None else self.bias[ids.to(self.bias.device)]
        return TorchInt4Linear.from_float(weight, bias, self.group_size)

    @property
    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size()
                + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size())

    def dequantized(self) -> torch.Tensor:
        """The float32 weights [N, K] the kernel multiplies by, read back through the kernel itself (the identity
        matrix, 1024 rows at a time): on CUDA the kernel's own bfloat16 dequantization, on CPU float32's."""
        dtype = torch.bfloat16 if self.on_cuda else torch.float32
        columns = torch.arange(self.in_features, device=self.packed.device)
        parts = [self.matmul((columns[start:start + 1024, None] == columns).to(dtype))
                 for start in range(0, self.in_features, 1024)]
        return torch.cat(parts)[:, :self.out_features].t().float().contiguous()


PREPARED_FORMATS: dict[str, type[TorchInt8Linear] | type[TorchInt4Linear]] = {
    "int8": TorchInt8Linear, "int4": TorchInt4Linear}


def prepare_torch_quantized(model: torch.nn.Module, weight_format: str) -> None:
    """Every group of linears of `model` (a Transformer) in `weight_format` ("int8" or "int4", int4 in groups of
    32) through torch's kernels. Layers that the native kernels run in one call (model.fused_layers) are left to
    the caller: unprepare the model first."""
    if weight_format not in PREPARED_FORMATS:
        raise KernelError(f"torch's quantized kernels take {' or '.join(PREPARED_FORMATS)}, not {weight_format}")
    prepared_class = PREPARED_FORMATS[weight_format]
    for module in model.prepared_modules():
        module.prepared = {group: prepared_class.from_float(*fused_weight(linears))
                           for group, linears in module.linear_groups().items()}
    model.kernel_path, model.weight_format = "torch", weight_format
