"""Data-parallel training under torchrun: one process per device, FSDP2 (`fully_shard`) on CUDA and on CPU (gloo).

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op on a single process, so the trainer
has one code path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerskip.errors import LayerSkipError
from layerskip.loading import resolve_device


@dataclasses.dataclass
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool  # we started it, so we end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        if not self.sharded:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str) -> DistributedContext:
    """This process's rank and device; starts the process group under torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch_device = resolve_device(device)
    if world_size == 1:
        return DistributedContext(0, 1, torch_device, owns_process_group=False)
    if torch_device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise LayerSkipError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), torch_device, owns_process_group=owns)


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
