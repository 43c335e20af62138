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


@dataclasses.dataclass
class ExitTerm:
    """One exit's part of the loss: its hidden state and the weights of its mean cross-entropy against the labels
    and of its mean KL(teacher || exit) over the labelled positions."""

    hidden: torch.Tensor
    ce_weight: float
    kl_weight: float = 0.0


def exit_losses(head: Head, exits: list[ExitTerm], labels: torch.Tensor, *, chunk_rows: int = 0,
                teacher: tuple[Head, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of every exit's losses, and detached [exits, 3]: each exit's mean cross-entropy, mean KL
    and top-1 agreement with the teacher (the share of positions where both pick the same token: what greedy
    self-speculation's acceptance tracks), the last two NaN without a teacher; all through one shared head.

    The logits go through ExitLosses chunk by chunk (`chunk_rows`; 0: one chunk), so no float32 [positions,
    vocabulary] tensor outlives its chunk (with a 49k-token vocabulary those logits are larger than a small
    model), and the teacher's distribution of a chunk is computed once for all exits.
    """
    labels = labels.flatten()
    xs = [head.norm(term.hidden).flatten(0, -2) for term in exits]
    teacher_x = teacher_weight = None
    if teacher is not None and any(term.kl_weight for term in exits):
        with torch.no_grad():
            teacher_x = teacher[0].norm(teacher[1]).flatten(0, -2)
        teacher_weight = teacher[0].weight
    weights = [(term.ce_weight, term.kl_weight if teacher_x is not None else 0.0) for term in exits]
    loss, sums = ExitLosses.apply(head.weight, labels, chunk_rows or labels.shape[0], teacher_x, teacher_weight,
                                  weights, torch.is_grad_enabled(), *xs)
    means = sums / (labels != IGNORE_INDEX).sum().clamp(min=1)
    if teacher_x is None:
        means[:, 1:] = float("nan")
    return loss, means


class ExitLosses(torch.autograd.Function):
    """sum_i (w_ce_i CE_i + w_kl_i KL_i) over exits i, with CE_i = mean CE(x_i W^T, labels) and KL_i = mean
    KL(p_teacher || softmax(x_i W^T)) over labelled rows; also the per-exit sums of CE, KL and top-1 agreement
    with the teacher, as metrics (no gradient).

    Rows are processed in chunks, and since the loss ends the graph, each chunk's gradients with respect to
    every x_i and W are formed right away, from d loss / d logits_i = (w_ce_i + w_kl_i) softmax - w_ce_i onehot
    - w_kl_i p_teacher (over the labelled count), in one matmul per exit; the chunk's logits are then dropped.
    Memory stays at one chunk's logits per exit and the teacher's, and unlike activation checkpointing nothing is
    recomputed in backward. The price: a trainable W's gradient, [vocabulary, hidden] in float32, is held from
    forward to backward.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int, teacher_x: torch.Tensor | None,
                teacher_weight: torch.Tensor | None, weights: list[tuple[float, float]], with_grads: bool,
                *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = weight.device
        want_w = with_grads and ctx.needs_input_grad[0]
        want_x = [with_grads and needed for needed in ctx.needs_input_grad[7:]]
        ctx.dtypes = (weight.dtype, [x.dtype for x in xs])
        count = (labels != IGNORE_INDEX).sum().clamp(min=1).item()
        sums = torch.zeros(len(xs), 3, dtype=torch.float32, device=device)
        grad_x = [torch.zeros(x.shape, dtype=torch.float32, device=device) if want else None
                  for x, want in zip(xs, want_x)]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_w else None
        # Cast the heads once, not at every matmul: autocast caches casts of trainable weights only.
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        weight = weight.to(dtype)
        teacher_weight = None if teacher_weight is None else teacher_weight.to(dtype)
        for start in range(0, labels.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            labelled = labels[rows] != IGNORE_INDEX
            target = labels[rows].clamp(min=0)[:, None]
            teacher_probs = teacher_log_probs = teacher_top = None
            if teacher_x is not None:
                teacher_log_probs = F.log_softmax(F.linear(teacher_x[rows].to(dtype), teacher_weight).float(), dim=-1)
                teacher_probs = teacher_log_probs.exp()
                teacher_top = teacher_log_probs.argmax(-1)
            for index, (x, (ce_weight, kl_weight)) in enumerate(zip(xs, weights)):
                chunk = x[rows].to(dtype)
                log_probs = F.log_softmax(F.linear(chunk, weight).float(), dim=-1)
                sums[index, 0] -= (log_probs.gather(1, target).squeeze(1) * labelled).sum()
                if teacher_log_probs is not None:
                    sums[index, 1] += ((teacher_probs * (teacher_log_probs - log_probs)).sum(-1) * labelled).sum()
                    sums[index, 2] += ((log_probs.argmax(-1) == teacher_top) & labelled).sum()
                if grad_x[index] is None and grad_w is None:
                    continue
                grad_logits = log_probs.exp_().mul_((ce_weight + kl_weight) / count)
                grad_logits.scatter_add_(1, target, torch.full(target.shape, -ce_weight / count, device=device))
                if kl_weight and teacher_probs is not None:
                    grad_logits.sub_(teacher_probs, alpha=kl_weight / count)
                if not labelled.all():
                    grad_logits.mul_(labelled[:, None])
                grad_logits = grad_logits.to(dtype)
                if grad_x[index] is not None:
                    grad_x[index][rows] = grad_logits @ weight
                if grad_w is not None:
                    grad_w += grad_logits.t() @ chunk
        loss = (torch.tensor(weights, dtype=torch.float32, device=device) * sums[:, :2]).sum()
        ctx.save_for_backward(grad_w, *grad_x)
        ctx.mark_non_differentiable(sums)
        return loss / count, sums

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_w, *grad_x = ctx.saved_tensors
        weight_dtype, x_dtypes = ctx.dtypes
        return (None if grad_w is None else (grad_loss * grad_w).to(weight_dtype), None, None, None, None, None, None,
                *(None if g is None else (grad_loss * g).to(dtype) for g, dtype in zip(grad_x, x_dtypes)))
