"""Layer dropout: each sample skips layer l at step t with probability p(l, t) = S(t) * D(l) * p_max.

The keep/skip decisions for a whole optimizer step are one [L, global batch] matrix drawn from a
generator seeded by (seed, step) alone. Every data-parallel rank draws the same matrix and takes its
own columns, so
  - each sample of the global batch gets its own decisions, whatever the world size or accumulation;
  - every rank knows when a layer is skipped by all samples of a micro-batch on all ranks, which a
    sharded model needs: its layers' collectives must be entered by every rank or by none;
  - there is no generator state to checkpoint: a resumed run redraws exactly the same masks.
"""

from __future__ import annotations

import math

import torch

# A 64-bit odd constant (the golden ratio's fraction) to spread (seed, step) pairs over seed space.
_MIX = 0x9E3779B97F4A7C15


def layer_shape(shape: str, num_layers: int) -> torch.Tensor:
    """D(l) for l in 0..L-1, rising from D(0) = 0 to D(L-1) = 1 (`uniform`: 1 everywhere)."""
    if shape == "uniform" or num_layers == 1:
        return torch.ones(num_layers, dtype=torch.float64)
    fraction = torch.arange(num_layers, dtype=torch.float64) / (num_layers - 1)
    if shape == "exp":
        return torch.exp(fraction * math.log(2)) - 1
    if shape == "linear":
        return fraction
    raise ValueError(f"unknown layer dropout shape '{shape}'")


def step_scale(shape: str, step: int, total_steps: int) -> float:
    """S(t): 1 throughout (`constant`), or rising from 0 at t = 0 to 1 at t = T-1 (`exp`, pretraining from scratch)."""
    if shape == "constant" or total_steps <= 1:
        return 1.0
    if shape == "exp":
        return math.exp(step * math.log(2) / (total_steps - 1)) - 1
    raise ValueError(f"unknown layer dropout step shape '{shape}'")


class LayerDropout:
    def __init__(self, num_layers: int, p_max: float, *, layer_shape_name: str = "exp",
                 step_shape_name: str = "constant", total_steps: int = 1, seed: int = 0):
        self.p_max = p_max
        self.step_shape = step_shape_name
        self.total_steps = total_steps
        self.seed = seed
        self.shape = layer_shape(layer_shape_name, num_layers)

    def rates(self, step: int) -> torch.Tensor:
        """p(l, step) for every layer, float64 [L]."""
        return step_scale(self.step_shape, step, self.total_steps) * self.shape * self.p_max

    def keep_masks(self, step: int, global_batch: int) -> torch.Tensor:
        """Bool [L, global_batch]: True where a sample runs the layer. The same on every rank for a given step."""
        generator = torch.Generator().manual_seed((self.seed * _MIX + step) % 2**63)
        draws = torch.rand(len(self.shape), global_batch, generator=generator, dtype=torch.float64)
        return draws >= self.rates(step)[:, None]
