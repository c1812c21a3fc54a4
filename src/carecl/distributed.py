"""Multi-process training with torchrun: process group, shards and the collectives the loop needs.

`torchrun --nproc_per_node=N -m carecl train ...` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK in their environment; `setup()` turns that into a process group (nccl on CUDA, gloo
on CPU). Without those variables everything here is a no-op on a single process, so the loop is
written once: it shards, reduces and gathers through a `Distributed` and never asks whether it is
distributed.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from carecl.errors import CareclError

log = logging.getLogger("carecl")

# A collective waits this long for a stalled rank before the run fails (alignment and
# statistics of a large first task can keep ranks apart for minutes).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


class DistributedError(CareclError, RuntimeError):
    """The torchrun environment or the process group is unusable."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank among world_size processes (1 = no distribution)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run directory, logs and shows progress."""
        return self.rank == 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place (CPU tensors travel through the GPU under nccl)."""
        if not self.enabled:
            return tensor
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            return tensor.copy_(on_gpu)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_tensors_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` on every rank with rank 0's values."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE_PROCESS = Distributed()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Distributed:
    """The process group of a torchrun launch (created once), or SINGLE_PROCESS without one.

    On CUDA each process uses GPU LOCAL_RANK; `device` is the config's `train.device`.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                                   "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"cannot create the torchrun process group: {error}") from None
    context = current()
    log.debug("rank %d of %d (local %d), backend %s", context.rank, context.world_size, context.local_rank, dist.get_backend())
    return context


def current() -> Distributed:
    """This process's Distributed (SINGLE_PROCESS unless a process group exists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... of a dataset, in order and without padding.

    For evaluation and class statistics: each sample is seen by exactly one rank, so per-rank
    sums add up to the single-process ones (DistributedSampler pads with repeats instead).
    """

    def __init__(self, n_samples: int, distributed: Distributed) -> None:
        self.indices = range(distributed.rank, n_samples, distributed.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
