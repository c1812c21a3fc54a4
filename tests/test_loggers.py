"""Run loggers: the TensorBoard event files hold the scalars logged, the default logs nothing."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from carecl.config import ConfigError, LoggingConfig
from carecl.engine.loggers import TENSORBOARD_DIR, RunLogger, TensorBoardLogger, build_logger, step_scalars, task_scalars
from carecl.methods.base import StepOutput
from carecl.metrics import TaskEvaluation

from helpers import read_scalars, tiny_config


def evaluation(task: int, top1: float, old: float) -> TaskEvaluation:
    return TaskEvaluation(task=task, top1=top1, topk=top1 + 5, k=2, group_accuracy=[top1] * (task + 1),
                          old_accuracy=old, new_accuracy=top1 - 1, n_samples=10)


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    logger = build_logger(LoggingConfig(tensorboard=True), tmp_path)
    assert isinstance(logger, TensorBoardLogger)
    losses = [2.5, 1.75, 1.125]
    for step, loss in enumerate(losses):
        output = StepOutput(torch.tensor(loss), {"main": loss - 0.5, "aux": 0.5})
        logger.log_step(step, step_scalars(output, lr=0.1 / (step + 1)))
    logger.log_task(0, evaluation(0, 90.0, math.nan), wall_time_s=12.0)
    logger.log_task(1, evaluation(1, 80.0, 75.0), wall_time_s=13.5)
    logger.close()
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["train/loss"] == [(i, loss) for i, loss in enumerate(losses)]
    assert scalars["train/main"] == [(i, loss - 0.5) for i, loss in enumerate(losses)]
    assert [step for step, _ in scalars["train/aux"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], [0.1, 0.05, 0.1 / 3], rtol=1e-6)
    # Tasks are numbered from 1; the first task has no old classes, so no eval/old point.
    assert scalars["eval/top1"] == [(1, 90.0), (2, 80.0)]
    assert scalars["eval/top2"] == [(1, 95.0), (2, 85.0)]
    assert scalars["eval/old"] == [(2, 75.0)]
    assert scalars["eval/new"] == [(1, 89.0), (2, 79.0)]
    assert scalars["time/task_s"] == [(1, 12.0), (2, 13.5)]


def test_every_n_steps_thins_the_training_scalars(tmp_path):
    with TensorBoardLogger(tmp_path, every_n_steps=3) as logger:
        for step in range(7):
            logger.log_step(step, {"loss": float(step)})
    assert [step for step, _ in read_scalars(tmp_path)["train/loss"]] == [0, 3, 6]


def test_default_logger_writes_nothing(tmp_path):
    logger = build_logger(LoggingConfig(), tmp_path)
    assert type(logger) is RunLogger
    logger.log_step(0, {"loss": 1.0})
    logger.log_task(0, evaluation(0, 50.0, math.nan))
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_task_scalars_leave_out_nan():
    assert task_scalars(evaluation(0, 60.0, math.nan)) == {"eval/top1": 60.0, "eval/top2": 65.0, "eval/new": 59.0}


def test_logging_section_in_config():
    config = tiny_config(logging={"tensorboard": True, "every_n_steps": 10})
    assert config.logging == LoggingConfig(tensorboard=True, every_n_steps=10)
    assert tiny_config().logging.tensorboard is False
    with pytest.raises(ConfigError, match="logging.every_n_steps"):
        tiny_config(logging={"every_n_steps": 0})
    with pytest.raises(ConfigError, match="tensorbord"):
        tiny_config(logging={"tensorbord": True})


def test_missing_tensorboard_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ConfigError, match="carecl\\[tensorboard\\]"):
        build_logger(LoggingConfig(tensorboard=True), tmp_path)


@pytest.mark.parametrize("sizes, shown", [
    ([2] * 10, "2 classes each"),
    ([50] + [5] * 10, "50 then 5 classes each"),
    ([7], "7 classes"),
    (list(range(1, 11)), "sizes 1, 2, 3, 4, 5, 6, 7, 8, ..."),
    ([4, 4, 2], "sizes 4, 4, 2"),
])
def test_start_line_describes_task_sizes_without_silently_cutting_them(sizes, shown):
    from carecl.engine.run import describe_task_sizes

    assert describe_task_sizes(sizes) == shown
