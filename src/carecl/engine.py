"""The one training loop: tasks, phases, epochs, evaluation, run directory and checkpoints.

Checkpoints (carecl.checkpoint, written by carecl.run_state) are written after every task and,
with `train.checkpoint_every_epochs: N`, every N epochs of a phase and after each phase;
`resume_experiment` continues a killed run exactly where its last checkpoint left it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from carecl import checkpoint as ckpt
from carecl.checkpoint import CheckpointError, load_optimizer_state
from carecl.config import ConfigError, ExperimentConfig, TrainConfig
from carecl.data.base import SkippedImages
from carecl.errors import CareclError
from carecl.evaluation import evaluate
from carecl.learner import Learner, seed_everything
from carecl.methods.base import Method, Phase, TaskContext
from carecl.metrics import RunSummary
from carecl.rundir import CONFIG_FILE, LOG_FILE, RunDirectory, RunDirectoryError
from carecl.run_state import (  # noqa: F401  (load_learner, save_learner: public through carecl.engine too)
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

log = logging.getLogger("carecl")

class TrainingError(CareclError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def build_optimizer(train: TrainConfig, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train.optimizer!r}")


# ---------------------------------------------------------------- where a run stands


# ---------------------------------------------------------------- the loop


def fit_phase(
    learner: Learner,
    phase: Phase,
    task: Task,
    loader: DataLoader,
    resume: TaskResume | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], None] | None = None,
) -> None:
    """Train the method's trainable parameters for one phase: fresh SGD, per-epoch cosine.

    With `resume` (mid-phase), optimiser and schedule continue from its state after `resume.epoch`
    epochs; `on_epoch_end(epochs_done, optimizer, scheduler)` runs after every epoch.
    """
    method, train = learner.method, learner.config.train
    optimizer = build_optimizer(train, method.trainable_parameters(), phase.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase.schedule_epochs, 1), eta_min=phase.min_lr)
    first_epoch = 0
    if resume is not None:
        load_optimizer_state(optimizer, resume.optimizer, resume.optimizer_tensors, "optimizer")
        scheduler.load_state_dict(resume.scheduler)
        first_epoch = resume.epoch
    label = f"task{task.index}/{phase.name.replace(' ', '-')}"
    epochs = tqdm(range(first_epoch, phase.epochs), desc=f"task {task.index} {phase.name}", leave=False,
                  initial=first_epoch, total=phase.epochs, disable=not train.progress)
    for epoch in epochs:
        method.train()
        total, count = 0.0, 0
        for batch, (images, targets) in enumerate(loader):
            ckpt.kill_point(f"{label}/epoch{epoch}/batch{batch}")
            images, targets = images.to(learner.device, non_blocking=True), targets.to(learner.device, non_blocking=True)
            step = method.training_loss(images, targets, task)
            if not torch.isfinite(step.loss):
                raise TrainingError(f"task {task.index} {phase.name}, epoch {epoch + 1}/{phase.epochs}, batch {batch}: "
                                    f"loss became {step.loss.item()}; stopping (try a lower train.lr)")
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
            total, count = total + step.loss.item() * len(targets), count + len(targets)
        scheduler.step()
        epochs.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        log.debug("task %d %s: loss %.4f", task.index, phase.name, total / max(count, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, optimizer, scheduler)
    optimizer.zero_grad(set_to_none=True)  # free gradient memory; nothing stale leaks into the next task


def learn_task(
    learner: Learner,
    task: Task,
    resume: TaskResume | None = None,
    save: Callable[[TrainerState], None] | None = None,
) -> None:
    """begin_task, the phases (begin_phase, fit_phase, end_phase), end_task.

    `resume` continues a task from a mid-task checkpoint (begin_task was replayed by the restore);
    `save` writes a mid-task checkpoint, called as `train.checkpoint_every_epochs` asks.
    """
    method = learner.method
    if resume is None:
        method.begin_task(task)
    method.to(learner.device)
    context = learner.context(task)
    phases = method.training_phases(task)
    loader = learner.train_loader(task) if phases else None
    if resume is not None and loader is not None and resume.loader_generator is not None:
        loader.generator.set_state(resume.loader_generator)
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

        def save_every(epochs_done: int, optimizer, scheduler, index=index, phase_start=phase_start) -> None:
            if epochs_done % every == 0:
                save(TrainerState(index, epochs_done, loader, optimizer, scheduler, phase_start))

        fit_phase(learner, phase, task, loader, phase_resume, save_every if every else None)
        try:
            method.end_phase(phase, context)
        except FloatingPointError as error:  # alignment's non-finite loss
            raise TrainingError(f"task {task.index} {phase.name}: {error}; stopping") from None
        if every:
            save(TrainerState(index + 1, 0, loader))
    method.end_task(context)
    method.n_learned_tasks = task.index + 1


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
    """Learn, evaluate and checkpoint every task after those in `record` (resuming one with `resume`)."""
    config, scenario = learner.config, learner.scenario
    record = record if record is not None else RunRecord()
    summary = RunSummary.from_evaluations(record.evaluations)
    remaining = scenario.tasks()[record.n_tasks:]
    for task in tqdm(remaining, desc="tasks", unit="task", initial=record.n_tasks, total=scenario.n_tasks,
                     disable=not config.train.progress):
        started = time.perf_counter() - (resume.elapsed if resume else 0.0)
        if resume is None:
            learner.skipped_images.reset()

        def save_in_task(state: TrainerState, started: float = started) -> None:
            save_checkpoint(run, learner, record, state, elapsed=time.perf_counter() - started)

        learn_task(learner, task, resume, save_in_task)
        resume = None
        evaluation = evaluate(learner.method, learner.test_loader(task.high), learner.device, task.index, config.eval.topk)
        record.wall_times.append(time.perf_counter() - started)
        record.evaluations.append(evaluation)
        record.skipped_images.append(learner.skipped_images.summary())
        log.info("task %d/%d  classes %d  top1 %.2f  top%d %.2f  old %s  new %.2f  (%.1fs)",
                 task.index + 1, scenario.n_tasks, task.high, evaluation.top1, evaluation.k, evaluation.topk,
                 "-" if task.index == 0 else f"{evaluation.old_accuracy:.2f}", evaluation.new_accuracy, record.wall_times[-1])
        log_skipped_images(task, learner.skipped_images)
        save_checkpoint(run, learner, record)
        summary = run.write_metrics(record.evaluations, record.metrics_extra(scenario))
    return summary


def log_skipped_images(task: Task, skipped: SkippedImages) -> None:
    if skipped.files:
        first, reason = next(iter(sorted(skipped.files.items())))
        log.warning("task %d: skipped %d unreadable image(s), listed in metrics.json (e.g. %s: %s)",
                    task.index + 1, len(skipped.files), first, reason)


# ---------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------- runs


def check_run_config(config: ExperimentConfig) -> None:
    if config.train.checkpoint_every_epochs < 0:
        raise ConfigError(f"train.checkpoint_every_epochs must be >= 0 (0 = only after each task), "
                          f"got {config.train.checkpoint_every_epochs}")


def run_experiment(config: ExperimentConfig, output: str | Path) -> RunSummary:
    """Build everything (failing early on bad input), then learn and evaluate task by task."""
    check_run_config(config)
    RunDirectory.check_available(output)
    seed_everything(config.seed)
    learner = Learner.build(config)
    run = RunDirectory.create(output, config)
    with training_session(run):
        scenario = learner.scenario
        log.info("%s on %s: %d classes in %d tasks %s, device %s", config.method.name, config.data.dataset,
                 scenario.n_classes, scenario.n_tasks, list(scenario.sizes)[:8], learner.device)
        return learn_all_tasks(learner, run)


def resume_experiment(output: str | Path, config: ExperimentConfig | None = None, overrides: Sequence[str] = ()) -> RunSummary:
    """Continue a run from its last complete checkpoint, to the same numbers as an uninterrupted run.

    The run's own config.yaml is the config; `config` (e.g. from --config) must equal it, and it or
    `overrides` may change only RESUME_OVERRIDABLE keys (data location, device, progress, ...).
    Everything is read and checked before anything in the run directory is touched.
    """
    run = RunDirectory(output)
    if not (run.path / CONFIG_FILE).is_file():
        raise RunDirectoryError(f"cannot resume {run.path}: {run.path / CONFIG_FILE} not found (not a carecl run directory)")
    config = resume_config(run, config, overrides)
    check_run_config(config)
    with training_session(run):
        checkpoint = run.resume_checkpoint()
        if checkpoint is None:  # killed before its first checkpoint: nothing to keep, start over
            log.info("resuming %s: no checkpoint yet, starting from the first task", run.path)
            seed_everything(config.seed)
            return learn_all_tasks(Learner.build(config), run)
        learner, record, resume = restore(run, checkpoint, config)
        log.info("resuming %s from checkpoint %s (%d of %d tasks done)", run.path, checkpoint.name,
                 record.n_tasks, learner.scenario.n_tasks)
        run.repair_mirror()
        if record.n_tasks and _recorded_tasks(run) < record.n_tasks:  # killed between checkpoint and metrics
            run.write_metrics(record.evaluations, record.metrics_extra(learner.scenario))
        return learn_all_tasks(learner, run, record, resume)


def _recorded_tasks(run: RunDirectory) -> int:
    try:
        return len(run.metrics()["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@contextlib.contextmanager
def training_session(run: RunDirectory) -> Iterator[None]:
    """Lock the run directory, log to its log.txt, and say where the run stands if it stops on an error."""
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
