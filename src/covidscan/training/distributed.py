"""Distributed data parallel (DDP) plumbing for runs launched with ``torchrun``.

The trainer is the same program on every rank: it reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
from the environment ``torchrun`` sets, joins the process group (NCCL on GPU, gloo on CPU), and
only rank 0 writes files, logs and shows progress. Without those variables everything here is a
no-op, so single-process training takes exactly the same code path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from covidscan.runtime import process_rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_context() -> DistContext:
    """The ranks ``torchrun`` put in the environment (a single process when absent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    return DistContext(process_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(context: DistContext, device: torch.device) -> torch.device:
    """Each process drives the GPU of its local rank."""
    if context.enabled and device.type == "cuda":
        torch.cuda.set_device(context.local_rank)
        return torch.device("cuda", context.local_rank)
    return device


def init_distributed(context: DistContext, device: torch.device) -> bool:
    """Join the process group unless already joined; True when this call created it."""
    if not context.enabled or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=context.rank, world_size=context.world_size)
    logger.info("joined process group: rank %d of %d (%s)", context.rank, context.world_size, backend)
    return True


def shutdown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (identity for one process)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every rank's ``value`` in rank order (``[value]`` for one process)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the run directory it created)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
