"""Preparing a model's weights for a CPU kernel path, and choosing the path.

"auto" takes our native kernels when they build (row-invariant, one pass over the weights for every row
count, quantized formats); where they cannot, it times oneDNN-prepacked against plain weights on the model's
own matrices and keeps the faster (which one wins depends on the CPU).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from layerskip.model.kernels import native
from layerskip.model.kernels import packed as onednn
from layerskip.model.kernels.torch_quant import prepare_torch_quantized
from layerskip.model.kernels.linear import (BITS_PER_WEIGHT, BLOCK_FORMATS, KernelError, NativeLinear, PackedLinear,
                                            PreparedLinear, fused_weight)
from layerskip.model.cache import KVCache
from layerskip.model.config import ModelConfig
from layerskip.model.draft_adapter import DraftAdapter
from layerskip.model.transformer import DecoderLayer, FusedLayers, Transformer

CPU_KERNELS = ("auto", "native", "packed", "plain")
TORCH_FORMATS = {"q8_0": "int8", "q4_1": "int4"}  # what --quantize int8 / int4 run as through torch's kernels (GPU)
# --quantize values and the weight format each one runs in ("int4" is Q4_1: a scale and a minimum per 32 weights).
QUANTIZE = {"none": "float32", "bf16": "bfloat16", "int8": "q8_0", "int4": "q4_1"}

Blocks = dict[str, tuple[str, torch.Tensor]]  # parameter name -> (GGUF block format, uint8 blocks [N, bytes])


def unprepare(model: Transformer) -> None:
    """Drop every prepared copy (for example before the weights change)."""
    for module in model.prepared_modules():
        module.prepared = {}
    model.fused_layers = None
    model._draft_heads.clear()
    model.kernel_path, model.weight_format = "plain", "float32"


def group_blocks(names: list[str], blocks: Blocks, weight_format: str) -> tuple[str, torch.Tensor] | None:
    """A fused group's stored blocks, stacked by rows, when its members are stored in one block format with at
    least `weight_format`'s bits (a file's Q8_0 head stays Q8_0 under int4: requantizing would round twice)."""
    formats = {blocks[name][0] if name in blocks else None for name in names}
    stored = formats.pop() if len(formats) == 1 else None
    if stored is None or BITS_PER_WEIGHT[stored] < BITS_PER_WEIGHT[weight_format]:
        return None
    return stored, torch.cat([blocks[name][1] for name in names])


def prepare_native(model: Transformer, weight_format: str, blocks: Blocks | None = None) -> None:
    """Native kernels for every group. Asked for a block format, a group takes a GGUF file's own blocks as they are
    (see group_blocks: a Q4_1 file runs from its Q4_1 blocks), else the float weights are quantized."""
    extension = native.load_native()
    if extension is None:
        raise KernelError("the native kernels are not available on this machine (see the warning above)")
    names = {module: prefix for prefix, module in model.named_modules()}
    for module in model.prepared_modules():
        prepared: dict[str, PreparedLinear] = {}
        for group, linears in module.linear_groups().items():
            weight, bias = fused_weight(linears)
            stored = None
            if blocks and weight_format in BLOCK_FORMATS:
                stored = group_blocks([f"{names[linear]}.weight" for linear in linears], blocks, weight_format)
            if stored is not None:
                prepared[group] = NativeLinear(extension, *stored, weight.shape[1], weight.shape[0], bias)
            else:
                prepared[group] = NativeLinear.from_float(extension, weight, bias, weight_format)
        module.prepared = prepared
    if model.embed_tokens.weight.dtype == torch.float32:  # the layer kernels keep a float32 KV cache
        model.fused_layers = fused_layers(extension, list(model.layers), model.config,
                                          model.parallel.all_reduce if model.parallel is not None else None)
    model.kernel_path, model.weight_format = "native", weight_format


def fused_layers(extension, layers: list[DecoderLayer], config: ModelConfig,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FusedLayers:
    """forward_layers over these decoder layers in one call of the native kernels (layers.cpp), over their
    prepared weights (a model's layers, or a draft adapter's one layer); `reduce`: the all-reduce of a
    tensor-parallel rank's partial sums."""

    def weight(prepared: NativeLinear):
        return extension.PreparedWeight(extension.FORMATS[prepared.weight_format], prepared.data, prepared.out_features,
                                        prepared.bias)

    stack = extension.LayerStack([
        extension.LayerWeights(*(weight(module.prepared[group]) for module, group in (
            (layer.self_attn, "qkv"), (layer.self_attn, "o"), (layer.mlp, "gate_up"), (layer.mlp, "down"))),
            layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
        for layer in layers])
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rms_norm_eps)

    def run(hidden: torch.Tensor, start_layer: int, end_layer: int, start_pos: int | torch.Tensor,
            cache: KVCache | None, cos: torch.Tensor, sin: torch.Tensor,
            rows: torch.Tensor | None = None) -> torch.Tensor:
        keys, values, attendable = (cache.keys, cache.values, cache.attendable) if cache is not None \
            else (None, None, None)
        starts = start_pos if isinstance(start_pos, torch.Tensor) else None
        return extension.forward_layers(hidden, stack, start_layer, end_layer, 0 if starts is not None else start_pos,
                                        keys, values, attendable, cos, sin, *shape, starts, rows, reduce)

    return run


def packed_groups(module: torch.nn.Module) -> dict[str, PreparedLinear]:
    return {group: PackedLinear(*fused_weight(linears)) for group, linears in module.linear_groups().items()}


def prepare_packed(model: Transformer) -> None:
    for module in model.prepared_modules():
        module.prepared = packed_groups(module)
    model.kernel_path = "packed"


def prepare_adapter(adapter: DraftAdapter, model: Transformer) -> None:
    """Prepare a draft adapter for the kernel path and weight format `model` was prepared for (its decoder layer
    in one native call too, where the model's layers run that way)."""
    extension = native.load_native() if model.kernel_path == "native" else None
    for module in adapter.prepared_modules():
        if extension is not None:
            module.prepared = {group: NativeLinear.from_float(extension, *fused_weight(linears), model.weight_format)
                               for group, linears in module.linear_groups().items()}
        elif model.kernel_path == "packed":
            module.prepared = packed_groups(module)
    if model.fused_layers is not None and adapter.layer is not None:
        adapter.fused_layer = fused_layers(extension, [adapter.layer], adapter.layer_config)


def packing_pays(model: Transformer, rows: tuple[int, ...] = (1, 5), repeats: int = 2) -> bool:
    """Whether the packed weights (already made) run a decoding step and a verification pass faster than the
    plain ones here: every layer's products timed both ways, interleaved, medians. About 0.5 s for a 135M
    model: the weights stream from memory as in real decoding."""
    work = [(linears, module.prepared[group]) for module in model.prepared_modules()[:-1]
            for group, linears in module.linear_groups().items()]

    def plain_pass(m: int) -> None:
        for linears, _ in work:
            for linear in linears:
                linear(inputs[m, linears[0].in_features])

    def packed_pass(m: int) -> None:
        for linears, prepared in work:
            prepared(inputs[m, linears[0].in_features])

    seconds: dict = {plain_pass: [], packed_pass: []}
    with torch.inference_mode():
        widths = {linears[0].in_features for linears, _ in work}
        inputs = {(m, width): torch.randn(1, m, width) for m in rows for width in widths}
        for _ in range(repeats + 1):  # the first round warms up (allocation, kernel selection)
            for run, times in seconds.items():
                start = time.perf_counter()
                for m in rows:
                    run(m)
                times.append(time.perf_counter() - start)
    median = {run: sorted(times[1:])[repeats // 2] for run, times in seconds.items()}
    return median[packed_pass] < median[plain_pass]


def prepare_off_cpu(model: Transformer, weight_format: str) -> str:
    """A GPU's weights: the model's dtype as it is (bfloat16: --dtype bfloat16, the CUDA default), or torch's
    int8 and int4 kernels for the quantized formats."""
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    if weight_format in ("float32", "bfloat16"):
        if weight_format == "bfloat16" and dtype != "bfloat16":
            raise KernelError(f"on {model.embed_tokens.weight.device.type} bfloat16 weights are --dtype bfloat16 "
                              f"(the default there), not {dtype} weights")
        model.weight_format = dtype
        return model.kernel_path
    prepare_torch_quantized(model, TORCH_FORMATS[weight_format])
    return model.kernel_path


def prepare(model: Transformer, cpu_kernels: str = "auto", weight_format: str = "float32",
            blocks: Blocks | None = None) -> str:
    """Prepare the model's weights for decoding on its device; returns the kernel path used.

    Call after the weights are final (after loading and merging adapters): prepared copies do not follow later
    changes. Off the CPU the weights keep the model's dtype (bfloat16 by default on CUDA) and run through torch's
    ops, the int8 and int4 formats through torch's quantized kernels (torch_quant.py); on the CPU only the
    native path runs formats other than float32.
    """
    unprepare(model)
    weight = model.embed_tokens.weight
    if weight.device.type != "cpu":
        return prepare_off_cpu(model, weight_format)
    if weight_format != "float32" and cpu_kernels in ("packed", "plain"):
        raise KernelError(f"{weight_format} weights need the native CPU kernels, which the {cpu_kernels} CPU "
                          "kernels does not use")
    if cpu_kernels == "plain":
        return model.kernel_path
    if cpu_kernels == "native" or weight_format != "float32" or (cpu_kernels == "auto" and native.load_native()):
        if weight.dtype == torch.bfloat16 and weight_format == "float32":
            weight_format = "bfloat16"  # a bfloat16 model keeps its weights' bytes
        prepare_native(model, weight_format, blocks)
        return model.kernel_path
    if weight.dtype != torch.float32 or not onednn.available():  # oneDNN packing is for float32 only: plain
        return model.kernel_path
    prepare_packed(model)
    if cpu_kernels == "auto" and not packing_pays(model):
        unprepare(model)
    return model.kernel_path
