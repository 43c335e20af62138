"""The early-exit loss: cross-entropy at several layers' exits through the one shared head, weighted by e(l).

    J(t) = sum_l  e~(t, l) * CE(head(x_{l+1}), Y),    e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i)

e(l) = e_scale * f(l) for l < L-1 and e(L-1) = (L-1) + e_scale * f(L-2), with f one of
    sum_l:   f(l) = 0 + 1 + ... + l     (the paper: deeper exits weigh more, quadratically)
    l:       f(l) = l                   (linearly)
    inv_l:   f(l) = 1 / (l + 1)         (shallow exits weigh more)
    uniform: f(l) = 1                   (every early exit alike)
The last exit keeps the paper's rule for every shape: the previous exit's weight plus an unscaled L-1,
so the final layer stays the heaviest term at small e_scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from layerskip.model import Transformer

IGNORE_INDEX = -100


def exit_scales(num_layers: int, shape: str, e_scale: float) -> torch.Tensor:
    """e(l) for l in 0..L-1, float64 [L]."""
    if num_layers == 1:
        return torch.ones(1, dtype=torch.float64)
    layers = torch.arange(num_layers, dtype=torch.float64)
    shapes = {"sum_l": layers * (layers + 1) / 2, "l": layers, "inv_l": 1 / (layers + 1),
              "uniform": torch.ones_like(layers)}
    if shape not in shapes:
        raise ValueError(f"unknown early-exit scale '{shape}'")
    f = shapes[shape]
    scales = e_scale * f
    scales[-1] = (num_layers - 1) + e_scale * f[-2]
    return scales


def exit_weights(scales: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    """e~(t, l): the scales of the enabled exits, normalised to sum to 1 (zero elsewhere)."""
    masked = scales * enabled
    return masked / masked.sum()


@dataclasses.dataclass
class Head:
    """An exit head as the loss sees it: the final norm, then logits = x W^T (Llama-family heads have no bias)."""

    norm: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor

    @classmethod
    def of(cls, model: Transformer) -> "Head":
        return cls(model.norm, model.lm_head.weight)


def head_losses(head: Head, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_rows: int = 0,
                teacher: tuple[Head, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of head(hidden) against labels and, given (teacher head, teacher hidden), the mean
    KL(teacher || student) over the labelled positions.

    The logits go through LinearCrossEntropy chunk by chunk (`chunk_rows`; 0: one chunk), so no float32
    [positions, vocabulary] tensor outlives its chunk: with a 49k-token vocabulary those logits are
    larger than a small model.
    """
    labels = labels.flatten()
    x = head.norm(hidden).flatten(0, -2)
    teacher_x = teacher_weight = None
    if teacher is not None:
        with torch.no_grad():
            teacher_x = teacher[0].norm(teacher[1]).flatten(0, -2)
        teacher_weight = teacher[0].weight
    sums = LinearCrossEntropy.apply(x, head.weight, labels, chunk_rows or x.shape[0], teacher_x, teacher_weight,
                                    torch.is_grad_enabled())
    means = sums / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return means[0], (means[1] if teacher is not None else None)


class LinearCrossEntropy(torch.autograd.Function):
    """[sum of CE(x W^T, labels)] or [that, sum of KL(p_teacher || softmax(x W^T))] over labelled rows.

    Rows are processed in chunks, and since these sums end the graph, each chunk's gradients with respect
    to x and W are formed right away (d CE / d logits = softmax - onehot, d KL / d logits = softmax -
    p_teacher) and the chunk's logits dropped: memory stays at one chunk's logits, and unlike activation
    checkpointing nothing is recomputed in backward. The price: a trainable W's gradient, [vocabulary,
    hidden] in float32 per loss, is held from forward to backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int,
                teacher_x: torch.Tensor | None, teacher_weight: torch.Tensor | None, with_grads: bool) -> torch.Tensor:
        count = 1 if teacher_x is None else 2
        want_x, want_w = with_grads and ctx.needs_input_grad[0], with_grads and ctx.needs_input_grad[1]
        ctx.count, ctx.want_x, ctx.want_w, ctx.dtypes = count, want_x, want_w, (x.dtype, weight.dtype)
        sums = torch.zeros(count, dtype=torch.float32, device=x.device)
        grad_x = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for _ in range(count)] if want_x else []
        grad_w = [torch.zeros(weight.shape, dtype=torch.float32, device=x.device) for _ in range(count)] if want_w else []
        # Cast the head once, not at every matmul: autocast caches casts of trainable weights only.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        weight = weight.to(dtype)
        teacher_weight = None if teacher_weight is None else teacher_weight.to(dtype)
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk, labelled = x[rows].to(dtype), labels[rows] != IGNORE_INDEX
            target = labels[rows].clamp(min=0)[:, None]
            accumulate = functools.partial(_accumulate, rows=rows, chunk=chunk, labelled=labelled, weight=weight,
                                           grad_x=grad_x, grad_w=grad_w)
            log_probs = F.log_softmax(F.linear(chunk, weight).float(), dim=-1)
            sums[0] -= (log_probs.gather(1, target).squeeze(1) * labelled).sum()
            probs = log_probs.exp()
            if teacher_x is not None:
                teacher_log_probs = F.log_softmax(F.linear(teacher_x[rows].to(dtype), teacher_weight).float(), dim=-1)
                teacher_probs = teacher_log_probs.exp()
                sums[1] += ((teacher_probs * (teacher_log_probs - log_probs)).sum(-1) * labelled).sum()
                accumulate(1, probs - teacher_probs)  # before the cross-entropy's gradient overwrites probs
            accumulate(0, probs.scatter_add_(1, target, torch.full(target.shape, -1.0, device=x.device)))
        ctx.save_for_backward(*grad_x, *grad_w)
        return sums

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        def combine(per_loss: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
            return sum(g * grad for g, grad in zip(grad_sums, per_loss, strict=True)).to(dtype)

        saved = ctx.saved_tensors
        grad_x = combine(saved[:ctx.count], ctx.dtypes[0]) if ctx.want_x else None
        grad_w = combine(saved[-ctx.count:], ctx.dtypes[1]) if ctx.want_w else None
        return grad_x, grad_w, None, None, None, None, None


def _accumulate(index: int, grad_logits: torch.Tensor, *, rows: slice, chunk: torch.Tensor, labelled: torch.Tensor,
                weight: torch.Tensor, grad_x: list[torch.Tensor], grad_w: list[torch.Tensor]) -> None:
    """Add one chunk's d loss / d logits, pushed through logits = chunk W^T, to loss `index`'s gradients."""
    if not labelled.all():
        grad_logits = grad_logits * labelled[:, None]
    grad_logits = grad_logits.to(chunk.dtype)
    if grad_x:
        grad_x[index][rows] = grad_logits @ weight
    if grad_w:
        grad_w[index] += grad_logits.t() @ chunk
