"""`layerskip serve` under torchrun: rank 0 serves HTTP and schedules; every other rank replays its engine's calls.

Under tensor parallelism every pass is a collective of all ranks, so every rank must run the same rounds of the
same sequences. Rank 0's scheduler announces each call it makes on its BatchEngine before making it: a sequence
joins (its prompt ids and resolved GenerationConfig), one leaves (its slot), a round, a fresh engine after a
failed round, the end. A follower makes the same calls on an engine of its own, built with the same settings, the
strategies, samplers and stop conditions made from the same configs by the same functions, so its slots, rounds
and passes pair with rank 0's. The followers wait for requests inside the broadcast: the process group is made
with a long timeout (`serve_process_group`).
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist

from layerskip import api
from layerskip.distributed import start_distributed
from layerskip.generation import BatchEngine
from layerskip.generation.engine import SequenceState
from layerskip.loading import LoadedModel, resolve_device

log = logging.getLogger(__name__)
# A server's ranks may wait for a request for days; the default (30 minutes) would end an idle server.
IDLE_TIMEOUT = datetime.timedelta(days=365)


def serve_process_group(device: str) -> None:
    """Start the process group before the model loads (layerskip.load then joins it), with a server's timeout."""
    start_distributed(resolve_device(device), timeout=IDLE_TIMEOUT)


def announce(*call: Any) -> None:
    """Rank 0: one engine call, to every other rank."""
    dist.broadcast_object_list([call], src=0)


def receive() -> tuple:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.inference_mode()
def follow(loaded: LoadedModel, engine_settings: dict[str, Any]) -> None:
    """A rank above 0: replay rank 0's engine calls until it announces the end."""
    engine = BatchEngine(loaded.model, **engine_settings)
    by_slot: dict[int, SequenceState] = {}
    while True:
        kind, *args = receive()
        if kind == "stop":
            return
        try:
            if kind == "add":
                prompt_ids, config = args
                sequence = engine.add(prompt_ids, api.strategy_for(loaded, config), config.sampler(loaded.device),
                                      **api.stop_settings(loaded, config))
                by_slot[sequence.slot] = sequence
            elif kind == "remove":
                engine.remove(by_slot.pop(args[0]))
            elif kind == "step":
                for sequence in engine.step():
                    del by_slot[sequence.slot]
            elif kind == "reset":
                engine, by_slot = None, {}
                engine = BatchEngine(loaded.model, **engine_settings)
        except Exception:  # what failed here failed on rank 0 too, which announces what it does next
            log.exception("a replayed engine call failed (rank 0's failed alike)")
