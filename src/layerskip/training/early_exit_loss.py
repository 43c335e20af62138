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

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
Head = Callable[[torch.Tensor], torch.Tensor]


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


def head_losses(head: Head, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_rows: int = 0,
                teacher_head: Head | None = None, teacher_hidden: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of head(hidden) against labels and, with a teacher, mean KL(teacher || student).

    With `chunk_rows`, positions go through the head in chunks whose logits are recomputed in backward
    instead of kept: a 49k-token vocabulary makes the float32 logits of one exit larger than the model.
    """
    hidden = hidden.flatten(0, -2)
    labels = labels.flatten()
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.flatten(0, -2)
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    rows = hidden.shape[0]
    if chunk_rows <= 0 or rows <= chunk_rows or not torch.is_grad_enabled():
        sums = _loss_sums(head, teacher_head, hidden, labels, teacher_hidden)
    else:
        sums = sum(checkpoint(_loss_sums, head, teacher_head, hidden[start:start + chunk_rows],
                              labels[start:start + chunk_rows],
                              None if teacher_hidden is None else teacher_hidden[start:start + chunk_rows],
                              use_reentrant=False)
                   for start in range(0, rows, chunk_rows))
    means = sums / count
    return means[0], (means[1] if teacher_hidden is not None else None)


def _loss_sums(head: Head, teacher_head: Head | None, hidden: torch.Tensor, labels: torch.Tensor,
               teacher_hidden: torch.Tensor | None) -> torch.Tensor:
    """[CE sum] or [CE sum, KL sum] over the rows that have a label."""
    logits = head(hidden).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if teacher_hidden is None or teacher_head is None:
        return ce[None]
    with torch.no_grad():
        target = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    kl = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="none").sum(-1)
    return torch.stack([ce, (kl * (labels != IGNORE_INDEX)).sum()])
