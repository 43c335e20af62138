"""Data-parallel training under torchrun: one process per device, FSDP2 (`fully_shard`) on CUDA and on CPU (gloo).

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op on a single process, so the trainer
has one code path.
"""

from __future__ import annotations

import torch
from torch import nn

from layerskip.distributed import DistributedContext, start_distributed
from layerskip.loading import resolve_device


def setup_distributed(device: str) -> DistributedContext:
    """This process's rank and device; starts the process group under torchrun (NCCL on CUDA, gloo on CPU)."""
    return start_distributed(resolve_device(device))


def shard(module: nn.Module, layers: nn.ModuleList) -> None:
    """FSDP2: each decoder layer its own shard group, the rest (embedding, final norm, head) in the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(module)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on the CPU; for a sharded (DTensor) one, a collective every rank must enter."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()
