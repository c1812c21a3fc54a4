"""The one training loop: tasks, phases, epochs, evaluation, run directory and checkpoints.

Checkpoints (carecl.runs.checkpoints, written by carecl.runs.state) are written after every task and,
with `train.checkpoint_every_epochs: N`, every N epochs of a phase and after each phase;
`resume_experiment` continues a killed run exactly where its last checkpoint left it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from carecl.runs import checkpoints as ckpt
from carecl.runs.checkpoints import CheckpointError, load_optimizer_state
from carecl.config import ConfigError, ExperimentConfig, TrainConfig
from carecl.data.base import SkippedImages
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.distributed import setup as setup_distributed
from carecl.errors import CareclError
from carecl.engine.evaluation import evaluate
from carecl.engine.experiment import Learner, per_process_batch, seed_everything
from carecl.engine.loggers import RunLogger, build_logger, step_scalars
from carecl.methods.base import Method, Phase, StepOutput, TaskContext
from carecl.metrics import RunSummary, TaskEvaluation
from carecl.runs.directory import CONFIG_FILE, LOG_FILE, RunDirectory, RunDirectoryError
from carecl.runs.state import (  # noqa: F401  (load_learner, save_learner: public through carecl.engine.loop too)
    RunRecord,
    TaskResume,
    TrainerState,
    load_learner,
    restore,
    resume_config,
    save_checkpoint,
    save_learner,
)
from carecl.scenario import Task
from carecl.engine.precision import Precision, wrap_training_step

log = logging.getLogger("carecl")

# DistributedSampler epochs: phase p, epoch e -> p * limit + e (a fresh order in every phase).
EPOCHS_PER_PHASE_LIMIT = 100_000


class TrainingError(CareclError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def build_optimizer(train: TrainConfig, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train.optimizer!r}")


# ---------------------------------------------------------------- the loop


@dataclass
class TaskTraining:
    """What the phases of one task share: the step module (DDP-wrapped under torchrun), the loader,
    and where steps are counted and logged."""

    learner: Learner
    task: Task
    loader: DataLoader
    step: nn.Module
    record: RunRecord | None = None
    logger: RunLogger = field(default_factory=RunLogger)


def fit_phase(
    training: TaskTraining,
    phase: Phase,
    phase_index: int = 0,
    resume: TaskResume | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Precision], None] | None = None,
) -> None:
    """Train the method's trainable parameters for one phase: fresh SGD, per-epoch cosine.

    With `resume` (mid-phase), optimiser, schedule and gradient scaler continue from their state
    after `resume.epoch` epochs; `on_epoch_end(epochs_done, optimizer, scheduler, precision)` runs
    after every epoch.
    """
    learner, task, loader = training.learner, training.task, training.loader
    method, train = learner.method, learner.config.train
    optimizer = build_optimizer(train, method.trainable_parameters(), phase.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase.schedule_epochs, 1), eta_min=phase.min_lr)
    precision = Precision.build(train.precision, learner.device)
    first_epoch = 0
    if resume is not None:
        load_optimizer_state(optimizer, resume.optimizer, resume.optimizer_tensors, "optimizer")
        scheduler.load_state_dict(resume.scheduler)
        precision.load_state(resume.scaler)
        first_epoch = resume.epoch
    label = f"task{task.index}/{phase.name.replace(' ', '-')}"
    epochs = tqdm(range(first_epoch, phase.epochs), desc=f"task {task.index} {phase.name}", leave=False,
                  initial=first_epoch, total=phase.epochs, disable=not shows_progress(learner))
    for epoch in epochs:
        method.train()
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(phase_index * EPOCHS_PER_PHASE_LIMIT + epoch)  # a new order per epoch and phase
        total, count = 0.0, 0
        for batch, (images, targets) in enumerate(loader):
            ckpt.kill_point(f"{label}/epoch{epoch}/batch{batch}")
            images, targets = images.to(learner.device, non_blocking=True), targets.to(learner.device, non_blocking=True)
            with precision.autocast():
                loss, logs = training.step(images, targets, task)
            if not torch.isfinite(loss):
                raise TrainingError(f"task {task.index} {phase.name}, epoch {epoch + 1}/{phase.epochs}, batch {batch}: "
                                    f"loss became {loss.item()}; stopping (try a lower train.lr)")
            optimizer.zero_grad(set_to_none=True)
            precision.backward_and_step(loss, optimizer)
            total, count = total + loss.item() * len(targets), count + len(targets)
            if training.record is not None:
                training.record.global_step += 1
                training.logger.log_step(training.record.global_step,
                                         step_scalars(StepOutput(loss, logs), optimizer.param_groups[0]["lr"]))
        scheduler.step()
        epochs.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        log.debug("task %d %s: loss %.4f", task.index, phase.name, total / max(count, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, optimizer, scheduler, precision)
    optimizer.zero_grad(set_to_none=True)  # free gradient memory; nothing stale leaks into the next task


def shows_progress(learner: Learner) -> bool:
    return learner.config.train.progress and learner.distributed.is_main


def learn_task(
    learner: Learner,
    task: Task,
    resume: TaskResume | None = None,
    save: Callable[[TrainerState], None] | None = None,
    record: RunRecord | None = None,
    logger: RunLogger | None = None,
) -> None:
    """begin_task, the phases (begin_phase, fit_phase, end_phase), end_task.

    `resume` continues a task from a mid-task checkpoint (begin_task was replayed by the restore);
    `save` writes a mid-task checkpoint, called as `train.checkpoint_every_epochs` asks;
    `record` counts optimiser steps for `logger`.
    """
    method = learner.method
    if resume is None:
        method.begin_task(task)
    method.to(learner.device)
    context = learner.context(task)
    phases = method.training_phases(task)
    training = None
    if phases:
        loader = learner.train_loader(task)
        if resume is not None and resume.loader_generator is not None and loader.generator is not None:
            loader.generator.set_state(resume.loader_generator)
        step = wrap_training_step(method, learner.distributed, learner.device, learner.config.train)
        training = TaskTraining(learner, task, loader, step, record, logger or RunLogger())
    every = learner.config.train.checkpoint_every_epochs if save is not None else 0
    for index in range(resume.phase if resume else 0, len(phases)):
        phase = phases[index]
        phase_resume = resume if resume is not None and resume.phase == index and resume.mid_phase else None
        if phase_resume is not None:
            phase_start = phase_resume.phase_start
            begin_phase_as_at_start(method, phase, context, phase_start)
        else:
            phase_start = trainable_state(method) if every else None
            method.begin_phase(phase, context)

        def save_every(epochs_done: int, optimizer, scheduler, precision, index=index, phase_start=phase_start) -> None:
            if epochs_done % every == 0:
                save(TrainerState(index, epochs_done, training.loader, optimizer, scheduler, phase_start, precision.state()))

        fit_phase(training, phase, index, phase_resume, save_every if every else None)
        try:
            method.end_phase(phase, context)
        except FloatingPointError as error:  # alignment's non-finite loss
            raise TrainingError(f"task {task.index} {phase.name}: {error}; stopping") from None
        # Every rank aligned from the same reduced statistics; rank 0's result is made the only one.
        broadcast_parameters(method.trainable_parameters(), learner.distributed)
        if every:
            save(TrainerState(index + 1, 0, training.loader))
    method.end_task(context)
    method.n_learned_tasks = task.index + 1


def broadcast_parameters(parameters: list[nn.Parameter], distributed: Distributed) -> None:
    """Rank 0's values on every rank, written with copy_ so the parameters' versions (BR-MoE caches) change."""
    if not distributed.enabled:
        return
    with torch.no_grad():
        for parameter in parameters:
            value = parameter.detach().clone()
            distributed.broadcast_tensors_([value])
            parameter.copy_(value)


def trainable_parameters_by_name(method: Method) -> dict[str, torch.nn.Parameter]:
    trainable = {id(p) for p in method.trainable_parameters()}
    return {name: p for name, p in method.named_parameters() if id(p) in trainable}


def trainable_state(method: Method) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainable_parameters_by_name(method).items()}


def begin_phase_as_at_start(method: Method, phase: Phase, context: TaskContext, phase_start: dict[str, torch.Tensor]) -> None:
    """begin_phase on a mid-phase resume: with the trainable parameters set back to their values at
    the phase's start for the call (CaRE snapshots its anchor there), then restored."""
    parameters = trainable_parameters_by_name(method)
    if set(parameters) != set(phase_start):
        raise CheckpointError(f"checkpoint's phase-start state does not fit the learner's trainable parameters "
                              f"(missing {sorted(set(parameters) - set(phase_start))[:5]})")
    current = {name: p.detach().clone() for name, p in parameters.items()}
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(phase_start[name])
    method.begin_phase(phase, context)
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(current[name])


def learn_all_tasks(learner: Learner, run: RunDirectory, record: RunRecord | None = None,
                    resume: TaskResume | None = None) -> RunSummary:
    """Learn, evaluate (as `eval.every_n_tasks` asks) and checkpoint every task after those in `record`
    (resuming one with `resume`). Under torchrun only rank 0 writes the run directory."""
    config, scenario, distributed = learner.config, learner.scenario, learner.distributed
    record = record if record is not None else RunRecord()
    remaining = scenario.tasks()[record.n_tasks:]
    logger = build_logger(config.logging, run.path) if distributed.is_main else RunLogger()
    with logger:
        for task in tqdm(remaining, desc="tasks", unit="task", initial=record.n_tasks, total=scenario.n_tasks,
                         disable=not shows_progress(learner)):
            started = time.perf_counter() - (resume.elapsed if resume else 0.0)
            if resume is None:
                learner.skipped_images.reset()

            def save_in_task(state: TrainerState, started: float = started) -> None:
                if distributed.is_main:
                    save_checkpoint(run, learner, record, state, elapsed=time.perf_counter() - started)

            learn_task(learner, task, resume, save_in_task, record, logger)
            resume = None
            evaluation = None
            if should_evaluate(task, scenario.n_tasks, config.eval.every_n_tasks):
                evaluation = evaluate(learner.method, learner.test_loader(task.high), learner.device, task.index,
                                      config.eval.topk, distributed=distributed)
                record.evaluations.append(evaluation)
            record.wall_times.append(time.perf_counter() - started)
            record.skipped_images.append(skipped_on_all_ranks(learner.skipped_images, distributed))
            if evaluation is not None:
                logger.log_task(task.index, evaluation, record.wall_times[-1])
            log.info("%s", task_line(task, scenario.n_tasks, evaluation, record))
            log_skipped_images(task, record.skipped_images[-1])
            if distributed.is_main:
                save_checkpoint(run, learner, record)
                run.write_metrics(record.evaluations, record.metrics_extra(scenario))
    return RunSummary.from_evaluations(record.evaluations)


def should_evaluate(task: Task, n_tasks: int, every_n_tasks: int) -> bool:
    """After every n-th task and always after the last (0: only after the last)."""
    last = task.index == n_tasks - 1
    return last or (every_n_tasks > 0 and (task.index + 1) % every_n_tasks == 0)


def task_line(task: Task, n_tasks: int, evaluation: TaskEvaluation | None, record: RunRecord) -> str:
    """One progress line per task: accuracy (when evaluated), the task's time, elapsed and ETA for the run."""
    done, elapsed = record.n_tasks, sum(record.wall_times)
    eta = elapsed / done * (n_tasks - done)
    if evaluation is None:
        measured = "not evaluated (eval.every_n_tasks)"
    else:
        old = "-" if task.index == 0 else f"{evaluation.old_accuracy:.2f}"
        measured = (f"top1 {evaluation.top1:.2f}  top{evaluation.k} {evaluation.topk:.2f}  old {old}  "
                    f"new {evaluation.new_accuracy:.2f}")
    return (f"task {task.index + 1}/{n_tasks}  classes {task.high}  {measured}  ({record.wall_times[-1]:.1f}s; "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)})")


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def skipped_on_all_ranks(skipped: SkippedImages, distributed: Distributed) -> dict:
    """The task's unreadable images as metrics record them, merged over the ranks that met them."""
    if not distributed.enabled:
        return skipped.summary()
    merged = SkippedImages()
    for files in distributed.all_gather_objects(skipped.files):
        for path, reason in files.items():
            merged.files.setdefault(path, reason)
    return merged.summary()


def log_skipped_images(task: Task, skipped: dict) -> None:
    if skipped["count"]:
        first, reason = next(iter(skipped["files"].items()))
        log.warning("task %d: skipped %d unreadable image(s), listed in metrics.json (e.g. %s: %s)",
                    task.index + 1, skipped["count"], first, reason)


# ---------------------------------------------------------------- runs


def check_run_config(config: ExperimentConfig, distributed: Distributed) -> None:
    if config.train.checkpoint_every_epochs < 0:
        raise ConfigError(f"train.checkpoint_every_epochs must be >= 0 (0 = only after each task), "
                          f"got {config.train.checkpoint_every_epochs}")
    per_process_batch(config.train.batch_size, distributed)


def run_experiment(config: ExperimentConfig, output: str | Path) -> RunSummary:
    """Build everything (failing early on bad input), then learn and evaluate task by task.

    Under torchrun every process runs this; rank 0 alone creates and writes the run directory.
    """
    distributed = setup_distributed(config.train.device)
    check_run_config(config, distributed)
    RunDirectory.check_available(output)
    seed_everything(config.seed)
    learner = Learner.build(config)
    distributed.barrier()  # every rank has checked `output` before rank 0 creates it
    if distributed.is_main:
        run = RunDirectory.create(output, config, class_names=learner.data.class_names)
    else:
        run = RunDirectory(output)
    distributed.barrier()
    with training_session(run, distributed):
        scenario = learner.scenario
        log.info("%s on %s: %d classes in %d tasks %s, device %s%s", config.method.name, config.data.dataset,
                 scenario.n_classes, scenario.n_tasks, list(scenario.sizes)[:8], learner.device,
                 f", {distributed.world_size} processes" if distributed.enabled else "")
        return learn_all_tasks(learner, run)


def resume_experiment(output: str | Path, config: ExperimentConfig | None = None, overrides: Sequence[str] = ()) -> RunSummary:
    """Continue a run from its last complete checkpoint, to the same numbers as an uninterrupted run.

    The run's own config.yaml is the config; `config` (e.g. from --config) must equal it, and it or
    `overrides` may change only RESUME_OVERRIDABLE keys (data location, device, progress, ...).
    Everything is read and checked before anything in the run directory is touched. Under torchrun
    every rank restores the same checkpoint (the run directory must be on a shared file system).
    """
    run = RunDirectory(output)
    if not (run.path / CONFIG_FILE).is_file():
        raise RunDirectoryError(f"cannot resume {run.path}: {run.path / CONFIG_FILE} not found (not a carecl run directory)")
    config = resume_config(run, config, overrides)
    distributed = setup_distributed(config.train.device)
    check_run_config(config, distributed)
    with training_session(run, distributed):
        checkpoint = run.resume_checkpoint()
        if checkpoint is None:  # killed before its first checkpoint: nothing to keep, start over
            log.info("resuming %s: no checkpoint yet, starting from the first task", run.path)
            seed_everything(config.seed)
            return learn_all_tasks(Learner.build(config), run)
        learner, record, resume = restore(run, checkpoint, config)
        log.info("resuming %s from checkpoint %s (%d of %d tasks done)", run.path, checkpoint.name,
                 record.n_tasks, learner.scenario.n_tasks)
        if distributed.is_main:
            run.repair_mirror()
            if record.n_tasks and _recorded_tasks(run) < record.n_tasks:  # killed between checkpoint and metrics
                run.write_metrics(record.evaluations, record.metrics_extra(learner.scenario))
        return learn_all_tasks(learner, run, record, resume)


def _recorded_tasks(run: RunDirectory) -> int:
    """Tasks the metrics files already hold (one wall time per finished task)."""
    try:
        return len(run.metrics()["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@contextlib.contextmanager
def training_session(run: RunDirectory, distributed: Distributed = SINGLE_PROCESS) -> Iterator[None]:
    """Lock the run directory, log to its log.txt, and say where the run stands if it stops on an error.

    Only rank 0 does any of that: the other ranks log warnings and errors to their console only.
    """
    if not distributed.is_main:
        with quiet_logging():
            yield
        return
    with run.lock():
        handler = attach_log_file(run.path)
        try:
            with logging_redirect_tqdm():
                yield
        except CheckpointError:  # a damaged checkpoint: its own message says which file
            raise
        except CareclError:
            pointer = run.checkpoints.pointer() if run.checkpoints.exists() else None
            where = f"its last checkpoint {pointer['resume']} is intact" if pointer else "no checkpoint was written yet"
            log.error("stopped; %s: %s; continue with `carecl train --resume %s`", run.path, where, run.path)
            raise
        finally:
            log.removeHandler(handler)
            handler.close()


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def attach_log_file(directory: Path) -> logging.Handler:
    try:
        handler = logging.FileHandler(directory / LOG_FILE)
    except OSError as error:
        raise ckpt.write_error(directory / LOG_FILE, error) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler
