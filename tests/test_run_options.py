"""The loop's run options: precision, eval.every_n_tasks, TensorBoard from a real run, progress
line, loader settings."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from carecl.runs.checkpoints import TRAINER_INFO, CheckpointStore
from carecl.config import ConfigError
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.engine import run_experiment
from carecl.engine.experiment import Experiment, default_workers
from carecl.engine.loggers import TENSORBOARD_DIR
from carecl.engine.precision import Precision

from helpers import read_scalars, tiny_config

CARE = {"name": "care", "alignment": {"epochs": 1}}


def care_config(**sections):
    train = {"epochs": 2, "batch_size": 8, "lr": 0.01, **sections.pop("train", {})}
    return tiny_config(method=CARE, train=train, **sections)


# ---------------------------------------------------------------- precision


def test_bf16_autocasts_the_training_forward_and_trains(tmp_path):
    precision = Precision.build("bf16", torch.device("cpu"))
    with precision.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu") and precision.scaler is None
    summary = run_experiment(care_config(train={"precision": "bf16"}), tmp_path / "run")
    assert all(0.0 <= a <= 100.0 for a in summary.top1_curve)


def attention_kernels(precision: Precision) -> set[str]:
    """The attention operators a training forward and backward under `precision` dispatch to."""
    query = torch.randn(1, 2, 16, 8, requires_grad=True)
    with torch.profiler.profile() as profile:
        with precision.training():
            output = torch.nn.functional.scaled_dot_product_attention(query, query, query)
        output.float().sum().backward()
    return {event.key for event in profile.key_averages() if "attention" in event.key}


def test_bf16_training_on_cpu_avoids_the_fused_attention_kernel():
    # Its bf16 backward is several times slower than fp32's on CPU; fp32 keeps the fused kernel.
    assert not any("flash" in name for name in attention_kernels(Precision.build("bf16", torch.device("cpu"))))
    assert any("flash" in name for name in attention_kernels(Precision.build("fp32", torch.device("cpu"))))


def test_fp16_scaler_skips_a_step_whose_gradients_overflowed():
    precision = Precision.build("fp16", torch.device("cpu"))
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scale = precision.scaler.get_scale()
    precision.backward_and_step((parameter * float("inf")).sum(), optimizer)
    assert torch.equal(parameter.detach(), torch.ones(3)) and precision.scaler.get_scale() < scale
    optimizer.zero_grad()
    precision.backward_and_step(parameter.sum(), optimizer)
    assert torch.allclose(parameter.detach(), torch.full((3,), 0.9))


def test_fp16_mid_phase_checkpoints_keep_the_scaler_state(tmp_path, monkeypatch):
    import carecl.engine.checkpointing as checkpointing
    import carecl.engine.run as engine_run

    written = []

    def save_and_read_back(run, experiment, progress, state=None):
        name = checkpointing.save_checkpoint(run, experiment, progress, state)
        if state is not None and state.optimizer is not None:
            written.append(CheckpointStore(run.path).open("resume").document(TRAINER_INFO)["scaler"])
        return name

    monkeypatch.setattr(engine_run, "save_checkpoint", save_and_read_back)
    run_experiment(care_config(train={"precision": "fp16", "checkpoint_every_epochs": 1}), tmp_path / "run")
    assert written and all(document["scale"] > 0 for document in written)
    # The scale falls from its initial 2**16 on the first steps' fp16 overflows, and that is recorded.
    assert min(document["scale"] for document in written) < 2.0**16


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="train.precision"):
        tiny_config(train={"precision": "fp8"})


# ---------------------------------------------------------------- evaluation cadence and progress


@pytest.mark.parametrize("every,evaluated", [(2, [1, 2]), (0, [2]), (1, [0, 1, 2])])
def test_eval_every_n_tasks_evaluates_those_tasks_and_the_last(tmp_path, every, evaluated):
    summary = run_experiment(tiny_config(eval={"every_n_tasks": every, "topk": 2}), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [t["task"] for t in metrics["tasks"]] == evaluated
    assert summary.evaluated_tasks == evaluated and metrics["summary"]["evaluated_tasks"] == evaluated
    assert len(metrics["wall_time_s"]) == 3  # every task timed, evaluated or not
    assert len(summary.matrix) == len(evaluated) and len(summary.matrix[-1]) == 3


def test_evaluating_less_often_does_not_change_what_is_learned(tmp_path):
    """Loaders never draw from the global RNG (dropout's), so the evaluation cadence cannot leak into training."""
    every = run_experiment(care_config(), tmp_path / "every")
    last_only = run_experiment(care_config(eval={"every_n_tasks": 0, "topk": 2}), tmp_path / "last")
    assert last_only.evaluated_tasks == [2] and every.evaluated_tasks == [0, 1, 2]
    assert last_only.matrix[-1] == every.matrix[-1]


def test_each_task_logs_a_progress_line_with_elapsed_time_and_eta(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="carecl"):
        run_experiment(tiny_config(eval={"every_n_tasks": 2, "topk": 2}), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task ")]
    assert len(lines) == 3 and all("elapsed" in line and "ETA" in line for line in lines)
    assert "not evaluated" in lines[0] and "top1" in lines[1] and lines[2].endswith("ETA 0:00:00)")


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_records_every_optimiser_step_and_each_evaluation(tmp_path):
    config = care_config(logging={"tensorboard": True}, eval={"every_n_tasks": 2, "topk": 2})
    run_experiment(config, tmp_path / "run")
    scalars = read_scalars(tmp_path / "run" / TENSORBOARD_DIR)
    experiment = Experiment.build(config)
    batches = [len(experiment.train_loader(task)) for task in experiment.scenario.tasks()]
    # Task 0 trains train.epochs epochs; CaRE's later tasks two halves of epochs // 2.
    expected_steps = batches[0] * 2 + sum(batches[1:]) * 2
    steps = [step for step, _ in scalars["train/loss"]]
    assert steps == list(range(1, expected_steps + 1))
    assert {"train/main", "train/aux", "train/lr"} <= set(scalars)
    assert [step for step, _ in scalars["eval/top1"]] == [2, 3]  # task numbers of the evaluations


# ---------------------------------------------------------------- loaders


def test_default_workers_read_files_in_parallel_and_memory_in_process():
    assert default_workers(torch.zeros(4, 3, 8, 8), SINGLE_PROCESS) == 0
    assert 1 <= default_workers(["a.png", "b.png"], SINGLE_PROCESS) <= 8
    assert default_workers(["a.png"], Distributed(0, 64)) == 1


def test_loader_options_reach_the_data_loaders():
    experiment = Experiment.build(tiny_config(data={"num_workers": 1, "pin_memory": False, "persistent_workers": False}))
    loader = experiment.train_loader(experiment.scenario.task(0))
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (1, False, False)
    experiment = Experiment.build(tiny_config(data={"num_workers": 2}))
    assert experiment.test_loader(2).persistent_workers is True


def test_global_batch_must_split_evenly_over_processes():
    from carecl.engine.experiment import per_process_batch
    from carecl.distributed import DistributedError

    assert per_process_batch(48, Distributed(1, 4)) == 12
    with pytest.raises(DistributedError, match="train.batch_size 10"):
        per_process_batch(10, Distributed(0, 4))
