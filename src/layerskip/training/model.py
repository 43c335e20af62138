"""The decoder as trained: per-sample layer dropout and losses at the enabled exits, through the shared head.

The inference model is used as is: its embedding, its `layers` (each called as `layer(x, cos, sin, 0, None)`),
its final norm and LM head. This module's forward is the one entry point of a training step, which is what
FSDP2 needs (the root's parameters, the embedding, final norm and head, are gathered around the root's forward).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerskip.model import Transformer
from layerskip.training.early_exit_loss import ExitTerm, Head, exit_losses
from layerskip.training.lora import lora_disabled


@dataclasses.dataclass
class Teacher:
    """The frozen original model for distillation, kept outside the module tree (never trained, sharded or saved).

    With LoRA it is the trained model itself with its adapters switched off: no second copy.
    """

    model: Transformer

    def final_hidden(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), lora_disabled(self.model):
            return self.model.forward_layers(self.model.embed(token_ids), 0, self.model.num_layers)


class TrainingModel(nn.Module):
    """Wraps a Transformer for training; the wrapped model is unchanged and still decodes as before."""

    def __init__(self, model: Transformer, *, loss_chunk_rows: int = 0, activation_checkpointing: bool = False,
                 teacher: Teacher | None = None, distill_weight: float = 0.0, exit_distill: float = 0.0):
        super().__init__()
        self.model = model
        self.loss_chunk_rows = loss_chunk_rows
        self.activation_checkpointing = activation_checkpointing
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.exit_distill = exit_distill

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, keep: Sequence[Sequence[bool]],
                exit_weights: Sequence[float], must_run: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to minimise, and detached [2 L + 1]: each exit's cross-entropy, then each exit's top-1 agreement
        with the original final layer (NaN where not computed, or without a teacher), then the final layer's KL.

        keep: [L][B], False where a sample skips a layer. exit_weights: [L], e~(t, l).
        must_run: [L], layers that this rank must call even when none of its samples keeps them
        (a sharded model: another rank runs them, and every rank must join the layer's collectives).
        Plain Python values, not tensors: they steer control flow, and FSDP would move tensors to the GPU.
        """
        model = self.model
        num_layers = model.num_layers
        use_teacher = self.teacher is not None and (self.distill_weight > 0 or self.exit_distill > 0)
        teacher_hidden = self.teacher.final_hidden(input_ids) if use_teacher else None
        hidden = model.embed(input_ids)
        cos, sin = model.rope(0, input_ids.shape[1], hidden.dtype)
        exits: list[ExitTerm] = []
        indices: list[int] = []
        for index in range(num_layers):
            hidden = self._run_layer(index, hidden, cos, sin, keep[index], must_run is not None and must_run[index])
            weight = exit_weights[index]
            if weight > 0:
                # The original final layer's distribution is the target of the last exit's KL (protecting plain
                # decoding) and, with exit_distill, of the early exits (what verification will ask of their drafts).
                if index == num_layers - 1:
                    exits.append(ExitTerm(hidden, weight, self.distill_weight))
                else:
                    exits.append(ExitTerm(hidden, weight * (1 - self.exit_distill), weight * self.exit_distill))
                indices.append(index)
        teacher = (Head.of(self.teacher.model), teacher_hidden) if teacher_hidden is not None else None
        loss, means = exit_losses(Head.of(model), exits, labels, chunk_rows=self.loss_chunk_rows, teacher=teacher)
        metrics = torch.full((2 * num_layers + 1,), float("nan"), device=hidden.device)
        metrics[indices] = means[:, 0]
        metrics[[num_layers + index for index in indices]] = means[:, 2]
        if indices and indices[-1] == num_layers - 1:
            metrics[-1] = means[-1, 1]
        return loss, metrics

    def _run_layer(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   keep: Sequence[bool], must_run: bool) -> torch.Tensor:
        """Layer `index` on the samples that keep it; the others pass through unchanged."""
        layer = self.model.layers[index]

        def call(x: torch.Tensor) -> torch.Tensor:
            if self.activation_checkpointing:
                return checkpoint(layer, x, cos, sin, 0, None, use_reentrant=False)
            return layer(x, cos, sin, 0, None)

        if all(keep):
            return call(hidden)
        if any(keep):
            rows = torch.tensor([row for row, kept in enumerate(keep) if kept], device=hidden.device)
            return hidden.index_copy(0, rows, call(hidden.index_select(0, rows)))
        if must_run:  # all local samples skip it, but its collectives must run: zero gradient through it
            return torch.where(torch.zeros((), dtype=torch.bool, device=hidden.device), call(hidden), hidden)
        return hidden
