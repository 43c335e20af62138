"""Processes under torchrun: this process's rank and device, and the process group (NCCL on CUDA, gloo on CPU).

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op on a single process, so training (FSDP2) and
decoding (tensor parallelism, model/parallel.py) each have one code path.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from layerskip.errors import LayerSkipError


def world_size() -> int:
    """How many processes torchrun started (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))


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


def start_distributed(torch_device: torch.device, timeout: datetime.timedelta | None = None) -> DistributedContext:
    """This process's rank and device (under torchrun, cuda:LOCAL_RANK on a GPU); starts the process group (its
    collectives fail after `timeout`, torch's default when None), or joins the one already started."""
    if world_size() == 1:
        return DistributedContext(0, 1, torch_device, owns_process_group=False)
    if torch_device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise LayerSkipError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo", timeout=timeout)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), torch_device, owns_process_group=owns)
