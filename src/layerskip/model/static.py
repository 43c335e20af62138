"""Decoding passes whose shapes do not change with the position, compiled with torch.compile (`--compile`).

gpt-fast's recipe: a pass's positions are a tensor, each row's keys and values are written into the cache by
indexing, and attention reads the rows' whole capacity under a mask, so a draft step, a verification or a plain
step has the same graph at every position. Two graphs per layer range serve every pass: one row (a draft step, a
plain step), and any other row count up to `max_rows` (a verification of k + 1 rows, a batch), compiled once with
the row count symbolic. Its rows are padded up to a power of two (the padding sits past the row's own slots, where
later passes overwrite it before any query can see it), so that CUDA graphs, recorded per row count, stay few.
Prompts longer than `max_rows` run eagerly.

On CUDA the passes run as CUDA graphs (mode "reduce-overhead"): a step's hundreds of kernel launches become one
replay, which is what makes a small model's step cost its weights' bytes. The caches are then kept across calls
(`kv_cache`): a graph records the addresses it reads. On CPU inductor's graph competes with the eager path (our
native kernels where they run), and `enable_compiled_steps` keeps whichever is faster on the machine.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from layerskip.model.cache import KVCache
from layerskip.model.transformer import Transformer

MAX_ROWS = 16          # the longest pass that runs compiled: drafts, verifications of up to 15 drafts, batches
RECOMPILE_LIMIT = 64   # graphs per function: layer ranges x (one row, more) x batch sizes
CACHE_MIN = 256        # the smallest cache capacity of compiled passes


def power_of_two(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << (n - 1).bit_length()


def padded_rows(rows: int, first_slot: int, capacity: int) -> int:
    """A pass of `rows` rows runs as the next power of two, when the padding fits in the cache."""
    padded = power_of_two(rows)
    return padded if first_slot + padded <= capacity else rows


class CompiledSteps:
    """Transformer.forward_layers for short passes with a cache, as compiled static-shape graphs."""

    def __init__(self, model: Transformer, *, mode: str | None = None, max_rows: int = MAX_ROWS,
                 backend: str = "inductor"):
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        self.model, self.max_rows = model, max_rows
        self.cuda_graphs = mode == "reduce-overhead"
        weight = model.embed_tokens.weight
        self.cos, self.sin = model.rope(0, model.config.max_position_embeddings, weight.dtype)
        if self.cuda_graphs:
            for tensor in self.fixed_tensors():
                torch._dynamo.mark_static_address(tensor)
        self.graph = torch.compile(self.layers, mode=mode, backend=backend)
        self.caches: dict[tuple[int, int], KVCache] = {}

    def fixed_tensors(self) -> list[torch.Tensor]:
        """What the graphs read that is not a module's parameter: the RoPE tables and the prepared weights
        (torch_quant.py's int8/int4 copies). A CUDA graph copies any other input into its own buffer at every
        replay, which for weights would cost more than the step."""
        prepared = [value for module in self.model.prepared_modules() for linear in module.prepared.values()
                    for value in vars(linear).values() if isinstance(value, torch.Tensor)]
        return [self.cos, self.sin, *prepared]

    def layers(self, hidden: torch.Tensor, start_layer: int, end_layer: int, slots: torch.Tensor,
               positions: torch.Tensor, cache: KVCache, rows: torch.Tensor | None) -> torch.Tensor:
        """The traced graph: layers [start_layer, end_layer) with each row at its own slots [B, T]."""
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in self.model.layers[start_layer:end_layer]:
            hidden = layer(hidden, cos, sin, slots, cache, rows)
        return hidden

    def applies(self, hidden: torch.Tensor, cache: KVCache | None) -> bool:
        return cache is not None and hidden.shape[1] <= self.max_rows and not torch.is_grad_enabled()

    def __call__(self, hidden: torch.Tensor, start_layer: int, end_layer: int, start_pos: int | torch.Tensor,
                 cache: KVCache, positions: list[int] | torch.Tensor | None,
                 rows: torch.Tensor | None) -> torch.Tensor:
        batch, length, device = hidden.shape[0], hidden.shape[1], hidden.device
        per_row = isinstance(start_pos, torch.Tensor)  # the engine's placement: on the CPU, read without a sync
        width = padded_rows(length, int(start_pos.max()) if per_row else start_pos, cache.capacity)
        starts = start_pos.to(device) if per_row else torch.full((batch,), start_pos, dtype=torch.long, device=device)
        slots = starts[:, None] + torch.arange(width, device=device)
        if positions is None:
            rope = slots
        else:  # a row's own positions (tree drafts share one), the padding continuing them
            own = torch.as_tensor(positions, device=device).reshape(-1, length).expand(batch, length)
            rope = torch.cat([own, own[:, -1:] + torch.arange(1, width - length + 1, device=device)], 1)
        rows_in = hidden.new_zeros((batch, width, hidden.shape[2]))  # fresh strides: a graph is specialised to them
        rows_in[:, :length] = hidden
        if width > 1:  # one graph for every row count above one (dynamo specialises a size of 1 anyway)
            for tensor in (rows_in, slots, rope):
                torch._dynamo.mark_dynamic(tensor, 1)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.graph(rows_in, start_layer, end_layer, slots, rope, cache, rows)
        return out[:, :length].clone()  # a graph's output is overwritten by its next replay

    def kv_cache(self, capacity: int, batch_size: int) -> KVCache:
        """A cache kept for this shape: a CUDA graph reads the addresses it was recorded with, and attention reads
        the whole capacity, so it is rounded up to a power of two (at least CACHE_MIN) for calls of similar lengths
        to share their graphs. Every position is written before it is read: nothing of an earlier call shows."""
        capacity = min(max(CACHE_MIN, power_of_two(capacity)), self.model.config.max_position_embeddings)
        key = (capacity, batch_size)
        if key not in self.caches:
            weight = self.model.embed_tokens.weight
            cache = self.caches[key] = KVCache(self.model.config, capacity, batch_size=batch_size,
                                               dtype=weight.dtype, device=weight.device)
            if self.cuda_graphs:
                torch._dynamo.mark_static_address(cache.keys)
                torch._dynamo.mark_static_address(cache.values)
        cache = self.caches[key]
        cache.attendable = None
        return cache


@dataclasses.dataclass
class CompileReport:
    """What `--compile` did on this machine: whether the compiled passes were kept, and the times behind it."""

    kept: bool
    reason: str
    eager_ms: float | None = None      # a one-row step through every layer, and a five-row verification pass
    compiled_ms: float | None = None
    compile_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: kept or not, why, and the times."""
        line = f"{'kept' if self.kept else 'not kept'} ({self.reason})"
        if self.compiled_ms is not None:
            line += f": a step and a 5-row pass take {self.compiled_ms:.1f} ms compiled"
            line += f" against {self.eager_ms:.1f} ms eager" if self.eager_ms is not None else ""
            line += f", after {self.compile_seconds:.0f} s of compiling"
        return line


def time_passes(model: Transformer, cache: KVCache, repeats: int) -> float:
    """Milliseconds of a one-row pass and a five-row pass through every layer (median of `repeats`)."""
    hidden = {rows: torch.randn(1, rows, model.config.hidden_size, dtype=cache.keys.dtype, device=cache.keys.device)
              for rows in (1, 5)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for rows, x in hidden.items():
            model.forward_layers(x, 0, model.num_layers, 8, cache)
        if cache.keys.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def enable_compiled_steps(model: Transformer, *, repeats: int = 5, keep_slower: bool = False,
                          backend: str = "inductor") -> CompileReport:
    """Compile the model's short passes. On CUDA they are kept (CUDA graphs); on CPU they replace the eager path
    only if faster here (or `keep_slower`, to measure them), timed on the model's own weights. The CPU's native
    kernels multiply block-quantized weights that a traced graph cannot hold: those stay eager."""
    weight = model.embed_tokens.weight
    cuda = weight.device.type == "cuda"
    if not cuda and model.weight_format != str(weight.dtype).removeprefix("torch."):
        return CompileReport(False, f"{model.weight_format} weights run only through the native CPU kernels")
    eager_ms = time_passes(model, model.kv_cache(64), repeats) if not cuda else None
    stashed = stash_prepared(model) if not cuda else None
    steps = CompiledSteps(model, mode="reduce-overhead" if cuda and backend == "inductor" else None, backend=backend)
    model.compiled_steps = steps
    started = time.perf_counter()
    scratch = model.kv_cache(64)  # the compiled passes' own
    time_passes(model, scratch, 2)  # compiles the one-row and the five-row graphs
    compile_seconds = time.perf_counter() - started
    compiled_ms = time_passes(model, scratch, repeats)
    if cuda or compiled_ms < eager_ms or keep_slower:
        reason = "CUDA graphs" if cuda else "faster" if compiled_ms < eager_ms else "kept to be measured, though slower"
        return CompileReport(True, reason, eager_ms, compiled_ms, compile_seconds)
    model.compiled_steps = None
    restore_prepared(model, stashed)
    return CompileReport(False, "slower than the eager path here", eager_ms, compiled_ms, compile_seconds)


Stash = tuple[list[tuple[Any, dict]], Any, str, str]


def stash_prepared(model: Transformer) -> Stash:
    """The model's prepared weights set aside, so that the traced graph runs torch's own ops on the float weights
    (a graph cannot call into the native extension)."""
    modules = model.prepared_modules()
    stash = ([(module, module.prepared) for module in modules], model.fused_layers, model.kernel_path,
             model.weight_format)
    for module in modules:
        module.prepared = {}
    model.fused_layers, model.kernel_path = None, "compiled"
    model._draft_heads.clear()
    return stash


def restore_prepared(model: Transformer, stash: Stash) -> None:
    prepared, model.fused_layers, model.kernel_path, model.weight_format = stash
    for module, weights in prepared:
        module.prepared = weights
    model._draft_heads.clear()
