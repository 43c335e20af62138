"""The cost model's step costs timed on the engine: c_d and c_v in units of one full decoding step."""

from __future__ import annotations

import time

import torch

from layerskip.generation.engine import synchronize
from layerskip.model.draft_adapter import DraftAdapter


def weight_bytes(model) -> tuple[int, int]:
    """Bytes of weights one decoding step reads, (every decoder layer's, the head's): the prepared copies where a
    kernel path made them (their own format), else the modules' own weights."""
    def group_bytes(module: torch.nn.Module) -> int:
        total = 0
        for group, linears in module.linear_groups().items():
            prepared = module.prepared.get(group)
            total += getattr(prepared, "nbytes", None) or sum(
                linear.weight.numel() * linear.weight.element_size() for linear in linears)
        return total

    modules = model.prepared_modules()
    return sum(group_bytes(module) for module in modules[:-1]), group_bytes(modules[-1])


def measure_step_costs(model, exit_layer: int, speculations: int, vocab_size: int = 0, context: int = 64,
                       repeats: int = 15, draft_adapter: DraftAdapter | None = None,
                       candidates: int = 1, batch: int = 1) -> tuple[float, float]:
    """(c_d, c_v): a draft step (through `draft_adapter`, when given) and a k-draft verification, in units of
    one full decoding step. With `candidates` m > 1 (tree drafts) the verification is a tree round's: the last
    position's m candidates through [0, E), then k + m rows through [E, L) and the head.

    With `batch` B, every pass runs B sequences at once and the unit is a plain decoding step of the B: the cost
    model for a batch, speedup = tokens per round / (k c_d + c_v), with the costs the batch's rows bring.
    """
    seconds = step_seconds(model, exit_layer, speculations, vocab_size, context, repeats, draft_adapter, candidates,
                           batch)
    return seconds["draft"] / seconds["full"], seconds["verify"] / seconds["full"]


@torch.inference_mode()
def step_seconds(model, exit_layer: int, speculations: int, vocab_size: int = 0, context: int = 64,
                 repeats: int = 15, draft_adapter: DraftAdapter | None = None, candidates: int = 1,
                 batch: int = 1) -> dict[str, float]:
    """Seconds of a full decoding step ("full"), a draft step ("draft") and a verification ("verify"), as
    measure_step_costs defines them: the three passes timed in turn, repeatedly, medians."""
    device = model.embed_tokens.weight.device
    cache = model.kv_cache(context + speculations + candidates + 1, batch)
    model(torch.arange(batch * context, device=device).view(batch, context) % model.config.vocab_size, cache=cache)
    one = model.embed(torch.full((batch, 1), 7, device=device))
    last = model.embed(torch.full((batch, candidates), 7, device=device))
    many = model.embed(torch.full((batch, speculations + candidates), 7, device=device))
    layers = model.num_layers
    adapter_cache = draft_adapter.kv_cache(context + 1, batch_size=batch) if draft_adapter is not None else None
    final = torch.zeros_like(one)

    def draft() -> torch.Tensor:
        hidden = model.forward_layers(one, 0, exit_layer, context, cache)
        if draft_adapter is not None:
            cos, sin = model.rope(context, 1, hidden.dtype)
            hidden = draft_adapter(hidden, final if draft_adapter.config.context else None, cos, sin, context,
                                   adapter_cache)
        hidden = hidden.reshape(batch, -1)
        return model.draft_head(hidden, vocab_size) if vocab_size else model.head(hidden)

    passes = {
        "full": lambda: model.head(model.forward_layers(one, 0, layers, context, cache).reshape(batch, -1)),
        "draft": draft,
        "verify": lambda: (model.forward_layers(last, 0, exit_layer, context, cache),
                           model.head(model.forward_layers(many, exit_layer, layers, context, cache).flatten(0, 1))),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run_pass in passes.items():
            synchronize(device)
            start = time.perf_counter()
            run_pass()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}
