"""Run loggers: training scalars per optimiser step and accuracy per task, to TensorBoard or nowhere.

Where the engine calls a logger (`logger = build_logger(config.logging, run.path)` once per run,
`logger.close()` in the run's `finally`):

- `fit_phase`, after each `optimizer.step()`, with a global step counter kept across phases and
  tasks (and restored on resume):
  `logger.log_step(global_step, step_scalars(step, optimizer.param_groups[0]["lr"]))`
  -> `train/loss`, `train/<name>` for each of `StepOutput.logs` (CaRE: main, aux), `train/lr`;
- `learn_all_tasks`, after each task's evaluation:
  `logger.log_task(task.index, evaluation, wall_times[-1])`
  -> `eval/top1`, `eval/top<k>`, `eval/old` (from the second task on), `eval/new`, `time/task_s`,
  with the task number (1-based, as in the log and the tables) as the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from carecl.config import ConfigError, LoggingConfig
from carecl.metrics import TaskEvaluation

if TYPE_CHECKING:
    from carecl.methods.base import StepOutput

TENSORBOARD_DIR = "tensorboard"


class RunLogger:
    """The logger interface; this base class logs nothing (the default)."""

    def log_step(self, global_step: int, scalars: Mapping[str, float]) -> None:
        """Training scalars of one optimiser step (names without prefix: loss, main, aux, lr, ...)."""

    def log_task(self, task_index: int, evaluation: TaskEvaluation, wall_time_s: float | None = None) -> None:
        """Accuracy after learning task `task_index` (0-based) and the task's wall time."""

    def close(self) -> None:
        """Flush and release whatever the logger holds."""

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def step_scalars(step: StepOutput, lr: float) -> dict[str, float]:
    """What `log_step` expects of a training step: its loss, the loss parts it reports, the lr."""
    return {"loss": float(step.loss.detach()), **{name: float(value) for name, value in step.logs.items()}, "lr": float(lr)}


def task_scalars(evaluation: TaskEvaluation, wall_time_s: float | None = None) -> dict[str, float]:
    """The per-task numbers as TensorBoard tags; NaN ones (old accuracy after the first task) left out."""
    scalars = {
        "eval/top1": evaluation.top1,
        f"eval/top{evaluation.k}": evaluation.topk,
        "eval/old": evaluation.old_accuracy,
        "eval/new": evaluation.new_accuracy,
    }
    if wall_time_s is not None:
        scalars["time/task_s"] = wall_time_s
    return {tag: float(value) for tag, value in scalars.items() if not math.isnan(value)}


class TensorBoardLogger(RunLogger):
    """Scalars for TensorBoard in `log_dir` (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, log_dir: str | Path, every_n_steps: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise ConfigError('logging.tensorboard: true needs the tensorboard package: pip install "carecl[tensorboard]"') from None
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_step(self, global_step: int, scalars: Mapping[str, float]) -> None:
        if global_step % self.every_n_steps:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", float(value), global_step)

    def log_task(self, task_index: int, evaluation: TaskEvaluation, wall_time_s: float | None = None) -> None:
        for tag, value in task_scalars(evaluation, wall_time_s).items():
            self.writer.add_scalar(tag, value, task_index + 1)
        self.writer.flush()  # tasks are minutes apart: make each visible at once

    def close(self) -> None:
        self.writer.close()


def build_logger(config: LoggingConfig, run_dir: str | Path) -> RunLogger:
    """The run's logger from the `logging` config section: TensorBoard into RUN_DIR/tensorboard/, or none."""
    if config.tensorboard:
        return TensorBoardLogger(Path(run_dir) / TENSORBOARD_DIR, config.every_n_steps)
    return RunLogger()
