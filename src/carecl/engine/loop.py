"""The one training loop: tasks, phases, epochs, evaluation and checkpoints (engine/run.py starts it).

Checkpoints are written after every task (before it is evaluated, so a failed evaluation never
loses the task's training) and, with `train.checkpoint_every_epochs: N`, every N epochs of a
phase and after each phase; a resume continues from a `MidTaskState` exactly where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from carecl.data.base import SkippedImages
from carecl.distributed import Distributed
from carecl.engine.costs import TaskCost, Stopwatch, added_parameters, peak_memory, start_memory_window
from carecl.engine.costs import trainable_parameter_ids
from carecl.engine.evaluation import evaluate, evaluate_in_tasks
from carecl.engine.experiment import Experiment
from carecl.engine.loggers import RunLogger, build_logger, step_scalars
from carecl.engine.optim import PER_STEP_SCHEDULES, build_optimizer, build_scheduler
from carecl.engine.precision import Precision, forward_precision, wrap_training_step
from carecl.errors import CareclError
from carecl.formatting import format_clock
from carecl.methods.base import ParameterGroup, Phase, StepOutput
from carecl.metrics import RunSummary, TaskEvaluation
from carecl.runs import checkpoints as ckpt
from carecl.runs.training_state import load_optimizer_state, optimizer_state
from carecl.runs.state import MidTaskState, RunProgress
from carecl.scenario import Task

log = logging.getLogger("carecl")

# DistributedSampler epochs: phase p, epoch e -> p * limit + e (a fresh order in every phase).
EPOCHS_PER_PHASE_LIMIT = 100_000

# fn(state) writes a mid-task checkpoint (the loop fills in the position, optimiser and loader).
SaveMidTask = Callable[[MidTaskState], None]


class TrainingError(CareclError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


@dataclass
class Activity:
    """What the loop is doing, so that an error stopping it (out of memory) can say where, and what to lower."""

    where: str = "building the run"
    lower: str = "train.batch_size"


ACTIVITY = Activity()
ALIGNMENT_MEMORY = ("train.batch_size (classifier alignment draws 5 x train.batch_size features per class) or "
                    "method.alignment.samples_per_class")


def doing(where: str, lower: str) -> None:
    ACTIVITY.where, ACTIVITY.lower = where, lower


@dataclass
class TaskTraining:
    """What the phases of one task share: the step module (DDP-wrapped under torchrun), the loader,
    and where steps are counted and logged."""

    experiment: Experiment
    task: Task
    loader: DataLoader
    step: nn.Module
    progress: RunProgress | None = None
    logger: RunLogger = field(default_factory=RunLogger)


def fit_phase(training: TaskTraining, phase: Phase, groups: list[ParameterGroup], phase_index: int = 0,
              resume: MidTaskState | None = None, save: SaveMidTask | None = None, every: int = 0) -> None:
    """Train the method's parameter `groups` for one phase: fresh optimiser, per-epoch cosine.

    With `resume` (mid-phase), optimiser, schedule and gradient scaler continue from their state
    after `resume.epoch` epochs; `save` writes a mid-task checkpoint every `every` epochs.
    """
    experiment, task, loader = training.experiment, training.task, training.loader
    method, train = experiment.method, experiment.config.train
    optimizer = build_optimizer(train, groups, phase.lr, phase.optimizer)
    scheduler = build_scheduler(optimizer, phase, len(loader))
    precision = Precision.build(train.precision, experiment.device)
    first_epoch = 0
    if resume is not None:
        starting_lrs = [group["lr"] for group in optimizer.param_groups]
        load_optimizer_state(optimizer, resume.optimizer, resume.optimizer_tensors, "optimizer")
        scheduler.load_state_dict(resume.scheduler)
        rescale_schedule(optimizer, scheduler, starting_lrs, phase.min_lr)
        precision.load_state(resume.scaler)
        first_epoch = resume.epoch
    n_epochs = 1 if phase.steps is not None else phase.epochs
    per_step = scheduler if phase.schedule in PER_STEP_SCHEDULES and not phase.milestones else None
    epochs = tqdm(range(first_epoch, n_epochs), desc=f"task {task.index + 1} {phase.name}", leave=False,
                  initial=first_epoch, total=n_epochs, disable=not shows_progress(experiment))
    for epoch in epochs:
        mean_loss = fit_epoch(training, phase, phase_index, epoch, optimizer, precision, per_step)
        if per_step is None:
            scheduler.step()
        method.after_epoch(phase, epoch)
        epochs.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        log.debug("task %d %s: loss %.4f", task.index + 1, phase.name, mean_loss)
        if save is not None and every and (epoch + 1) % every == 0:
            save(MidTaskState(phase_index, epoch + 1, loader_generator=generator_state(loader),
                              **optimiser_states(optimizer, scheduler, precision)))
    optimizer.zero_grad(set_to_none=True)  # free gradient memory; nothing stale leaks into the next task


def rescale_schedule(optimizer: torch.optim.Optimizer, scheduler, starting_lrs: list[float], min_lr: float) -> None:
    """After restoring a mid-phase optimiser: if train.lr changed on resume (a lower one after a diverged
    loss), continue the same schedule from the new starting lr, scaled at the point it had reached."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        for group, start in zip(optimizer.param_groups, starting_lrs):
            ratio = start / group["initial_lr"]
            group["lr"], group["initial_lr"] = group["lr"] * ratio, start
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        return
    for index, (group, start) in enumerate(zip(optimizer.param_groups, starting_lrs)):
        saved = scheduler.base_lrs[index]
        if saved == start:
            continue
        group["lr"] = min_lr + (group["lr"] - scheduler.eta_min) * (start - min_lr) / max(saved - scheduler.eta_min, 1e-30)
        group["initial_lr"] = scheduler.base_lrs[index] = start
    scheduler.eta_min = min_lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def fit_epoch(training: TaskTraining, phase: Phase, phase_index: int, epoch: int, optimizer: torch.optim.Optimizer,
              precision: Precision, per_step_scheduler=None) -> float:
    """One pass over the task's training loader (or a fixed-step phase's `phase.steps` batches); the mean loss.
    `per_step_scheduler` is stepped after every optimiser step."""
    experiment, task, loader = training.experiment, training.task, training.loader
    label = f"task{task.index}/{phase.name.replace(' ', '-')}"
    experiment.method.train()
    first_pass = phase_index * EPOCHS_PER_PHASE_LIMIT + epoch  # a new order per epoch and phase
    batches = cycled_batches(loader, phase.steps, first_pass) if phase.steps is not None else passes(loader, first_pass)
    total, count = 0.0, 0
    for batch, (images, targets) in enumerate(batches):
        ckpt.kill_point(f"{label}/epoch{epoch}/batch{batch}")
        images = images.to(experiment.device, non_blocking=True)
        targets = targets.to(experiment.device, non_blocking=True)
        with precision.training():
            loss, logs = training.step(images, targets, task)
        if not torch.isfinite(loss):
            raise TrainingError(f"task {task.index + 1} {phase.name}, epoch {epoch + 1}/{phase.epochs}, batch {batch + 1}: "
                                f"the loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(loss, optimizer, experiment.config.train.clip_grad_norm)
        experiment.method.after_optimizer_step(task)
        if per_step_scheduler is not None:
            per_step_scheduler.step()
        total, count = total + loss.item() * len(targets), count + len(targets)
        if training.progress is not None:
            training.progress.global_step += 1
            training.logger.log_step(training.progress.global_step,
                                     step_scalars(StepOutput(loss, logs), optimizer.param_groups[0]["lr"]))
    return total / max(count, 1)


def passes(loader: DataLoader, first_pass: int, n_passes: int = 1):
    """The loader's batches over `n_passes` passes, each a new order of the DistributedSampler."""
    for index in range(n_passes):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(first_pass + index)
        yield from loader


def cycled_batches(loader: DataLoader, steps: int, first_pass: int):
    """Exactly `steps` batches, restarting the loader (a new shuffle) whenever it runs out."""
    if len(loader) == 0:
        raise TrainingError("the task has no training batches")
    n_passes = -(-steps // len(loader))
    for index, batch in enumerate(passes(loader, first_pass, n_passes)):
        if index == steps:
            return
        yield batch


def generator_state(loader: DataLoader) -> torch.Tensor | None:
    # None for a DistributedSampler's seeded order, which needs no state.
    return loader.generator.get_state() if loader.generator is not None else None


def optimiser_states(optimizer: torch.optim.Optimizer, scheduler, precision: Precision) -> dict:
    document, tensors = optimizer_state(optimizer, "optimizer")
    return {"optimizer": document, "optimizer_tensors": tensors, "scheduler": scheduler.state_dict(),
            "scaler": precision.state()}


def shows_progress(experiment: Experiment) -> bool:
    return experiment.config.train.progress and experiment.distributed.is_main


def learn_task(experiment: Experiment, task: Task, resume: MidTaskState | None = None, save: SaveMidTask | None = None,
               progress: RunProgress | None = None, logger: RunLogger | None = None) -> TaskCost:
    """begin_task, the phases (begin_phase, fit_phase, end_phase), end_task.

    `resume` continues a task from a mid-task checkpoint (begin_task was replayed by the restore;
    begin_phase is not called for a phase already begun); `save` writes a mid-task checkpoint, as
    `train.checkpoint_every_epochs` asks; `progress` counts optimiser steps for `logger`.
    """
    method = experiment.method
    cost = TaskCost()
    start_memory_window(experiment.device)
    if resume is None:
        method.begin_task(task)
    method.to(experiment.device)
    context = experiment.context(task)
    phases = method.training_phases(task)
    trained: dict[int, int] = {}
    training = None
    if phases:
        loader = experiment.train_loader(task)
        if resume is not None and resume.loader_generator is not None and loader.generator is not None:
            loader.generator.set_state(resume.loader_generator)
        step = wrap_training_step(method, experiment.distributed, experiment.device, experiment.config.train)
        training = TaskTraining(experiment, task, loader, step, progress, logger or RunLogger())
    every = experiment.config.train.checkpoint_every_epochs if save is not None else 0
    for index in range(resume.phase if resume else 0, len(phases)):
        phase = phases[index]
        phase_resume = resume if resume is not None and resume.phase == index and resume.mid_phase else None
        with Stopwatch(experiment.device) as watch:
            if phase_resume is None:
                method.begin_phase(phase, context)
            groups = method.parameter_groups(phase)
            trained.update(trainable_parameter_ids(groups))
            doing(f"task {task.index + 1}, training phase '{phase.name}'", "train.batch_size")
            if any(group.parameters for group in groups):  # else nothing to train: skipped
                fit_phase(training, phase, groups, index, phase_resume, save, every)
            doing(f"task {task.index + 1}, the end of phase '{phase.name}' (class statistics, alignment)",
                  ALIGNMENT_MEMORY)
            try:
                with forward_precision(experiment.config.train.precision, experiment.device):
                    method.end_phase(phase, context)
            except FloatingPointError as error:  # alignment's non-finite loss
                raise TrainingError(f"task {task.index + 1} {phase.name}: {error}") from None
        cost.phase_seconds[phase.name] = cost.phase_seconds.get(phase.name, 0.0) + watch.seconds
        # Every rank aligned from the same reduced statistics; rank 0's result is made the only one.
        broadcast_parameters(method.trainable_parameters(), experiment.distributed)
        if every:
            save(MidTaskState(index + 1, 0, loader_generator=generator_state(training.loader)))
    doing(f"task {task.index + 1}, the end of the task (class statistics, heads)", ALIGNMENT_MEMORY)
    with Stopwatch(experiment.device) as watch, forward_precision(experiment.config.train.precision, experiment.device):
        method.finish_task(context)
    cost.phase_seconds["end of task"] = watch.seconds
    cost.trainable_parameters = int(sum(trained.values()))
    cost.added_parameters = added_parameters(method)
    cost.peak_memory_bytes, cost.memory_kind = peak_memory(experiment.device)
    return cost


def broadcast_parameters(parameters: list[nn.Parameter], distributed: Distributed) -> None:
    """Rank 0's values on every rank, written with copy_ so the parameters' versions (BR-MoE caches) change."""
    if not distributed.enabled:
        return
    with torch.no_grad():
        for parameter in parameters:
            value = parameter.detach().clone()
            distributed.broadcast_tensors_([value])
            parameter.copy_(value)


# ---------------------------------------------------------------- every task of a run


@dataclass
class TaskWriter:
    """Where the loop's results go: checkpoints and metrics (rank 0 of a run directory), or nowhere."""

    save_checkpoint: Callable[[RunProgress, MidTaskState | None], None] = lambda progress, state: None
    write_metrics: Callable[[RunProgress], None] = lambda progress: None
    # Called after each task's evaluation and metrics (carecl tune reports to its study, and may stop the run).
    after_task: Callable[[RunProgress], None] = lambda progress: None


def tasks_in_run(experiment: Experiment) -> int:
    """How many tasks the run learns: the stream's, or the first train.max_tasks of them."""
    n_tasks, limit = experiment.scenario.n_tasks, experiment.config.train.max_tasks
    return n_tasks if limit is None else min(limit, n_tasks)


def learn_all_tasks(experiment: Experiment, writer: TaskWriter, logger: RunLogger, progress: RunProgress | None = None,
                    resume: MidTaskState | None = None) -> RunSummary:
    """Learn, checkpoint and evaluate (as `eval.every_n_tasks` asks) every task after those in `progress`
    (resuming one with `resume`). A task is checkpointed before its evaluation: a run stopped in between
    resumes by evaluating it."""
    scenario, count = experiment.scenario, tasks_in_run(experiment)
    progress = progress if progress is not None else RunProgress()
    if progress.n_tasks and evaluation_missing(experiment, progress):
        finish_evaluation(experiment, scenario.task(progress.n_tasks - 1), writer, logger, progress)
    remaining = scenario.tasks()[progress.n_tasks:count]
    for task in tqdm(remaining, desc="tasks", unit="task", initial=progress.n_tasks, total=count,
                     disable=not shows_progress(experiment)):
        started = time.perf_counter() - (resume.elapsed if resume else 0.0)
        if resume is None:
            experiment.skipped_images.reset()

        def save_in_task(state: MidTaskState, started: float = started) -> None:
            state.elapsed, state.skipped_files = time.perf_counter() - started, dict(experiment.skipped_images.files)
            writer.save_checkpoint(progress, state)

        progress.costs.append(learn_task(experiment, task, resume, save_in_task, progress, logger).to_json())
        resume = None
        progress.wall_times.append(time.perf_counter() - started)
        progress.skipped_images.append(skipped_on_all_ranks(experiment.skipped_images, experiment.distributed))
        writer.save_checkpoint(progress, None)  # the task's training is safe before its evaluation runs
        finish_evaluation(experiment, task, writer, logger, progress, started)
    return RunSummary.from_evaluations(progress.evaluations)


def evaluation_missing(experiment: Experiment, progress: RunProgress) -> bool:
    """The last finished task is due an evaluation that was not recorded (stopped between checkpoint and evaluation)."""
    last = experiment.scenario.task(progress.n_tasks - 1)
    due = should_evaluate(last, tasks_in_run(experiment), experiment.config.eval.every_n_tasks)
    return due and not any(e.task == last.index for e in progress.evaluations)


def finish_evaluation(experiment: Experiment, task: Task, writer: TaskWriter, logger: RunLogger,
                      progress: RunProgress, started: float | None = None) -> None:
    """Evaluate a just-finished task when due, report it, and write the metrics files; the task's wall
    time (from `started`) then includes its evaluation."""
    config, count = experiment.config, tasks_in_run(experiment)
    evaluation = None
    if should_evaluate(task, count, config.eval.every_n_tasks):
        doing(f"the evaluation after task {task.index + 1}", "eval.batch_size")
        evaluation_started, watch = time.perf_counter(), Stopwatch(experiment.device)
        evaluation = evaluate_task(experiment, task, watch)
        if task.index < len(progress.costs):
            progress.costs[task.index].update(evaluation_seconds=time.perf_counter() - evaluation_started,
                                              inference_ms_per_image=watch.ms_per_item)
        progress.evaluations.append(evaluation)
        logger.log_task(task.index, evaluation, (time.perf_counter() - started) if started is not None
                        else progress.wall_times[task.index])
        if experiment.data.validation is not None:
            progress.validation.append(evaluate_task(experiment, task, split="validation"))
        # Unreadable test images met by the evaluation count towards this task too.
        progress.skipped_images[task.index] = skipped_on_all_ranks(experiment.skipped_images, experiment.distributed)
    if started is not None:
        progress.wall_times[task.index] = time.perf_counter() - started
    log.info("%s", task_line(task, count, evaluation, progress))
    log_skipped_images(task, progress.skipped_images[task.index])
    writer.write_metrics(progress)
    writer.after_task(progress)


def evaluate_task(experiment: Experiment, task: Task, watch: Stopwatch | None = None, split: str = "test") -> TaskEvaluation:
    """The evaluation after `task` under eval.protocol on the test (or `split="validation"`) images; `watch` times the
    predictions."""
    with forward_precision(experiment.config.train.precision, experiment.device):
        return evaluate_under_protocol(experiment, task, watch, split)


def evaluate_under_protocol(experiment: Experiment, task: Task, watch: Stopwatch | None, split: str) -> TaskEvaluation:
    config, method = experiment.config.eval, experiment.method
    if config.protocol == "class_incremental" and config.incremental and method.fixed_class_scores \
            and not experiment.distributed.enabled and split == "test":
        return experiment.incremental_evaluator.evaluate(experiment, task, watch)
    if config.protocol == "class_incremental":
        return evaluate(method, experiment.test_loader(task.high, split), experiment.device, task.index, config.topk,
                        distributed=experiment.distributed, watch=watch)
    evaluated = experiment.scenario.tasks() if config.unseen_tasks else experiment.scenario.tasks()[:task.index + 1]
    loaders = [(each, experiment.task_test_loader(each, split)) for each in evaluated]
    return evaluate_in_tasks(method, loaders, experiment.device, task.index, config.topk, experiment.distributed, watch)


def should_evaluate(task: Task, n_tasks: int, every_n_tasks: int) -> bool:
    """After every n-th task and always after the last (0: only after the last)."""
    last = task.index == n_tasks - 1
    return last or (every_n_tasks > 0 and (task.index + 1) % every_n_tasks == 0)


def task_line(task: Task, n_tasks: int, evaluation: TaskEvaluation | None, progress: RunProgress) -> str:
    """One progress line per task: accuracy (when evaluated), the task's time, elapsed and ETA for the run."""
    done, elapsed = progress.n_tasks, sum(progress.wall_times)
    eta = elapsed / done * (n_tasks - done)
    if evaluation is None:
        measured = "not evaluated (eval.every_n_tasks)"
    else:
        old = "-" if task.index == 0 else f"{evaluation.old_accuracy:.2f}"
        measured = (f"top1 {evaluation.top1:.2f}  top{evaluation.k} {evaluation.topk:.2f}  old {old}  "
                    f"new {evaluation.new_accuracy:.2f}")
    return (f"task {task.index + 1}/{n_tasks}  classes {task.high}  {measured}  ({progress.wall_times[-1]:.1f}s; "
            f"elapsed {format_clock(elapsed)}, ETA {format_clock(eta)})")


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


def build_run_logger(experiment: Experiment, run_path) -> RunLogger:
    return build_logger(experiment.config.logging, run_path) if experiment.distributed.is_main else RunLogger()
