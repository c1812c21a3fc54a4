"""One optimiser step of the loop: the method's loss as a module (so DDP and torch.compile can wrap
it), mixed precision, and the gradient scaler fp16 needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from carecl.config import TrainConfig
from carecl.distributed import Distributed
from carecl.methods.base import Method
from carecl.scenario import Task

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStep(nn.Module):
    """`method.training_loss` as a forward: DDP synchronises gradients only through a module's forward."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, targets: torch.Tensor, task: Task) -> tuple[torch.Tensor, dict[str, float]]:
        step = self.method.training_loss(images, targets, task)
        return step.loss, step.logs


def wrap_training_step(method: Method, distributed: Distributed, device: torch.device, train: TrainConfig) -> nn.Module:
    """The step module for one task: DDP-wrapped under torchrun, compiled on request.

    Built again for every task, because a task adds parameters and changes which ones train.
    """
    step: nn.Module = TrainingStep(method)
    if distributed.enabled:
        step = DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Top-K routing can leave the task's expert out of a batch's graph in some block.
            find_unused_parameters=True,
        )
    if train.compile:
        step = torch.compile(step, dynamic=True)
    return step


@dataclass
class Precision:
    """Autocast for the forwards (bf16/fp16) and, for fp16, the gradient scaler."""

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(cls, precision: str, device: torch.device) -> Precision:
        dtype = AUTOCAST_DTYPES[precision]
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        return cls(device.type, dtype, scaler)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Autocast for a training forward. bf16 on CPU also takes attention's math kernel: the fused CPU kernel's
        bf16 backward is several times slower than its fp32 one (torch 2.14; BENCHMARKS.md's bf16/fp32 section)."""
        kernels = sdpa_kernel([SDPBackend.MATH]) if self.slow_fused_backward else contextlib.nullcontext()
        with self.autocast(), kernels:
            yield

    @property
    def slow_fused_backward(self) -> bool:
        return self.device_type == "cpu" and self.dtype is torch.bfloat16

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          clip_grad_norm: float | None = None) -> None:
        """Backward, the gradients' total norm clipped to `clip_grad_norm` when set, then the step."""
        if self.scaler is None:
            loss.backward()
            clip_gradients(optimizer, clip_grad_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            clip_gradients(optimizer, clip_grad_norm)
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def state(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


@contextlib.contextmanager
def forward_precision(precision: str, device: torch.device) -> Iterator[None]:
    """`train.precision` for the forwards outside training steps (class statistics, evaluation, prediction): bf16 or
    fp16 autocast, or nothing for fp32. Sums stay fp32/fp64 (statistics convert), alignment trains in fp32."""
    with Precision.build(precision, device).autocast():
        yield


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
