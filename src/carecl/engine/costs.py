"""What each task cost (paper Table 6's columns, for a user's own runs): trainable parameters (Pt), parameters added
to the pre-trained model (Pa: everything the learner saves), training seconds per phase, peak memory, and
(in each evaluation) the inference time per test image."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from carecl.methods.base import Method, ParameterGroup


@dataclass
class TaskCost:
    trainable_parameters: int = 0
    added_parameters: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # CUDA: max allocated in the task; CPU: the process's resident-set high-water mark so far.
    peak_memory_bytes: int = 0
    memory_kind: str = "cpu_max_rss"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "TaskCost":
        return cls(**{key: document[key] for key in cls.__dataclass_fields__ if key in document})


def trainable_parameter_ids(groups: list[ParameterGroup]) -> dict[int, int]:
    """id -> numel of every parameter a phase's optimiser trains (a frozen one handed to it is not trained)."""
    return {id(p): p.numel() for group in groups for p in group.parameters if p.requires_grad}


def added_parameters(method: Method) -> int:
    """Elements the learner saves (weights, buffers, statistics; never the frozen backbone)."""
    return int(sum(tensor.numel() for tensor in method.state_tensors().values()))


def start_memory_window(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_max_rss"


class Stopwatch:
    """Seconds of a block, the device synchronised at both ends so GPU work is counted where it ran."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.items = device, 0.0, 0

    def count(self, items: int) -> None:
        self.items += items

    @property
    def ms_per_item(self) -> float:
        return 1000.0 * self.seconds / self.items if self.items else float("nan")

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
