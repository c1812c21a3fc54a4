"""The one training loop: tasks, phases, epochs, evaluation, run directory and checkpoints.

Checkpoints (carecl.checkpoint) are written after every task and, with
`train.checkpoint_every_epochs: N`, every N epochs of a phase and after each phase. Each holds
the learner and everything else the loop's future depends on (RNG states, the training loader's
generator, optimiser and scheduler, metrics so far), so `resume_experiment` continues a killed
run exactly where its last checkpoint left it: the same numbers as a run never interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from carecl import checkpoint as ckpt
from carecl.backbones import create_backbone
from carecl.checkpoint import (
    LEARNER_INFO,
    LEARNER_TENSORS,
    TRAINER_INFO,
    TRAINER_TENSORS,
    Checkpoint,
    CheckpointError,
    capture_rng,
    load_optimizer_state,
    optimizer_state,
    restore_rng,
)
from carecl.config import ConfigError, ExperimentConfig, TrainConfig, config_from_dict, config_to_dict
from carecl.data import BenchmarkData, build_dataset
from carecl.data.base import SkippedImages, SkippingDataLoader, TaskDataset
from carecl.errors import CareclError
from carecl.evaluation import evaluate
from carecl.methods import build_method
from carecl.methods.base import Method, Phase, TaskContext
from carecl.metrics import RunSummary, TaskEvaluation
from carecl.rundir import CONFIG_FILE, LOG_FILE, RunDirectory, RunDirectoryError
from carecl.scenario import Scenario, Task

log = logging.getLogger("carecl")

# Keys a resumed run may change: where the data lives and how the loop runs, never what it computes.
RESUME_OVERRIDABLE = frozenset({
    "data.root", "data.num_workers", "data.strict",
    "train.device", "train.progress", "train.checkpoint_every_epochs",
})


class TrainingError(CareclError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(train: TrainConfig, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train.optimizer!r}")


@dataclass
class Learner:
    """Everything a run needs, built (and validated) before any training starts."""

    config: ExperimentConfig
    data: BenchmarkData
    scenario: Scenario
    method: Method
    device: torch.device
    # Unreadable images met by this learner's loaders during the current task.
    skipped_images: SkippedImages = field(default_factory=SkippedImages)

    @classmethod
    def build(cls, config: ExperimentConfig) -> "Learner":
        data = build_dataset(config.data)
        scenario = Scenario.build(
            data.n_classes, config.data.init_cls, config.data.increment,
            seed=config.seed, shuffle=config.data.shuffle, explicit_order=config.data.class_order,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # random-init backbones are reproducible from the config
            backbone = create_backbone(config.backbone)
        device = resolve_device(config.train.device)
        method = build_method(config, backbone, scenario).to(device)
        return cls(config, data, scenario, method, device)

    # ---- loaders ---------------------------------------------------------------------
    def _loader(self, split: str, low: int, high: int, train: bool, seed: int = 0) -> DataLoader:
        source = self.data.train if split == "train" else self.data.test
        transform = self.data.train_transform if train else self.data.test_transform
        dataset = TaskDataset(source, self.scenario.label_map, low, high, transform, skip_unreadable=not self.config.data.strict)
        batch = self.config.train.batch_size if train else self.config.eval.batch_size
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + seed) if train else None
        return SkippingDataLoader(
            dataset, self.skipped_images, batch_size=batch, shuffle=train, generator=generator,
            num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
        )

    def train_loader(self, task: Task) -> DataLoader:
        return self._loader("train", task.low, task.high, train=True, seed=task.index)

    def statistics_loader(self, task: Task) -> DataLoader:
        return self._loader("train", task.low, task.high, train=False)

    def test_loader(self, n_seen: int) -> DataLoader:
        return self._loader("test", 0, n_seen, train=False)

    def context(self, task: Task) -> TaskContext:
        return TaskContext(task, self.scenario, self.device, lambda: self.statistics_loader(task), self.config.train.progress)

    # ---- a finished run's learner (carecl.predict) ------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Learner":
        """The learner of a run directory, as after its last finished task (its dataset must be at hand)."""
        return load_learner(RunDirectory.open(path))

    def predict(self, images, topk: int = 5, batch_size: int | None = None) -> list:
        """Top-k classes of paths / PIL images / image tensors: a list of carecl.predict.ImagePrediction."""
        from carecl.predict import predict_images

        return predict_images(self, images, topk=topk, batch_size=batch_size)


# ---------------------------------------------------------------- where a run stands


@dataclass
class RunRecord:
    """What the finished tasks measured: the metrics so far, kept in every checkpoint."""

    evaluations: list[TaskEvaluation] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)
    skipped_images: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_tasks(self) -> int:
        return len(self.evaluations)

    def metrics_extra(self, scenario: Scenario) -> dict[str, Any]:
        return {"class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes),
                "wall_time_s": self.wall_times, "skipped_images": self.skipped_images}

    def to_json(self) -> dict[str, Any]:
        return {"evaluations": [e.__dict__ for e in self.evaluations], "wall_time_s": self.wall_times,
                "skipped_images": self.skipped_images}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "RunRecord":
        return cls([_evaluation_from_json(e) for e in document["evaluations"]],
                   list(document["wall_time_s"]), list(document["skipped_images"]))


def _evaluation_from_json(document: dict[str, Any]) -> TaskEvaluation:
    """JSON has null for NaN (old accuracy of the first task, empty groups)."""
    nan = float("nan")
    values = {k: (nan if v is None and k != "group_accuracy" else v) for k, v in document.items()}
    values["group_accuracy"] = [nan if a is None else a for a in document["group_accuracy"]]
    return TaskEvaluation(**values)


@dataclass
class TrainerState:
    """The loop's state inside a task, as a mid-task checkpoint records it.

    `phase` phases are done (end_phase included) and `epoch` epochs of the next one; optimiser,
    scheduler and the phase-start values of the trainable parameters exist only mid-phase.
    """

    phase: int
    epoch: int
    loader: DataLoader | None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    phase_start: dict[str, torch.Tensor] | None = None


@dataclass
class TaskResume:
    """A task interrupted after a mid-task checkpoint: where to go on, and the loop state to restore."""

    phase: int
    epoch: int
    loader_generator: torch.Tensor | None
    optimizer: dict[str, Any] | None
    optimizer_tensors: dict[str, torch.Tensor]
    scheduler: dict[str, Any] | None
    phase_start: dict[str, torch.Tensor]
    elapsed: float

    @property
    def mid_phase(self) -> bool:
        return self.optimizer is not None


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


def save_learner(run: RunDirectory, learner: Learner) -> None:
    """The learner alone, as after its last finished task (no trainer state: it cannot be resumed)."""
    scenario = learner.scenario
    info = {"n_learned_tasks": learner.method.n_learned_tasks, "class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes)}
    run.save_state(learner.method.state_tensors(), info)


def save_checkpoint(run: RunDirectory, learner: Learner, record: RunRecord, state: TrainerState | None = None,
                    elapsed: float = 0.0) -> str:
    """A resumable checkpoint: after the last task in `record`, or inside the next one (`state`)."""
    method, scenario = learner.method, learner.scenario
    in_task = state is not None
    info = {
        "n_learned_tasks": method.n_learned_tasks,
        "grown_tasks": method.n_learned_tasks + int(in_task),
        "class_order": scenario.order.tolist(),
        "task_sizes": list(scenario.sizes),
        "position": {"phase": state.phase, "epoch": state.epoch} if in_task else None,
    }
    rng, tensors = capture_rng()
    document: dict[str, Any] = {
        "format": ckpt.FORMAT_VERSION,
        "config": config_to_dict(learner.config),
        "record": record.to_json(),
        "rng": rng,
        "skipped_in_task": learner.skipped_images.files if in_task else {},
        "task_elapsed_s": elapsed,
        "data": data_fingerprint(learner.data),
    }
    if in_task:
        if state.loader is not None:
            tensors["loader.generator"] = state.loader.generator.get_state()
        if state.optimizer is not None:
            document["optimizer"], optimizer_tensors = optimizer_state(state.optimizer, "optimizer")
            tensors.update(optimizer_tensors)
            document["scheduler"] = state.scheduler.state_dict()
            tensors.update({f"phase_start.{k}": v for k, v in state.phase_start.items()})
    name = run.save_state(method.state_tensors(), info, trainer_tensors=tensors, trainer_info=document)
    log.debug("checkpoint %s written", name)
    return name


def data_fingerprint(data: BenchmarkData) -> dict[str, Any]:
    """Enough of the dataset to notice that a resume would see different data."""
    return {"name": data.name, "classes": data.class_names, "train": len(data.train), "test": len(data.test)}


def grow_and_load(learner: Learner, checkpoint_tensors: dict[str, torch.Tensor], info: dict[str, Any], source: Path) -> None:
    """Replay begin_task for every task the saved learner had grown, then load its tensors."""
    scenario, method = learner.scenario, learner.method
    if info["class_order"] != scenario.order.tolist():
        raise CheckpointError(f"{source}: saved class order differs from the one the run's config produces")
    for task in scenario.tasks()[: info.get("grown_tasks", info["n_learned_tasks"])]:
        method.begin_task(task)
    method.n_learned_tasks = info["n_learned_tasks"]
    try:
        method.load_state_tensors(checkpoint_tensors)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{source}: the saved learner does not fit the run's config: {error}") from None
    method.to(learner.device)


def load_learner(run: RunDirectory) -> Learner:
    """Rebuild a run's learner from its config and the last finished task's checkpoint."""
    config = run.config_for_loading()
    learner = Learner.build(config)
    tensors, info = run.load_state()
    grow_and_load(learner, tensors, info, run.path)
    return learner


def restore(run: RunDirectory, checkpoint: Checkpoint, config: ExperimentConfig) -> tuple[Learner, RunRecord, TaskResume | None]:
    """A learner exactly as when `checkpoint` was written, RNG states included (restored last)."""
    if not checkpoint.has(TRAINER_INFO):
        raise CheckpointError(f"checkpoint {checkpoint.path} holds no training state (it was written by save_state, "
                              "e.g. an imported model): it can be evaluated but not resumed")
    document = checkpoint.document(TRAINER_INFO)
    trainer = checkpoint.tensors(TRAINER_TENSORS)
    saved_config = config_from_dict(document["config"])
    differing = [key for key in config_differences(saved_config, run.config()) if key not in RESUME_OVERRIDABLE]
    if differing:
        raise CheckpointError(f"{run.path / CONFIG_FILE} differs from the config checkpoint {checkpoint.path} was "
                              f"written with, at {', '.join(differing)}; restore the file to resume")
    info = checkpoint.document(LEARNER_INFO)
    seed_everything(config.seed)
    learner = Learner.build(config)
    saved_data, data_now = document.get("data"), data_fingerprint(learner.data)
    if saved_data is not None and saved_data != data_now:
        changed = ", ".join(f"{k} {saved_data.get(k) if k != 'classes' else len(saved_data[k])} -> "
                            f"{data_now[k] if k != 'classes' else len(data_now[k])}"
                            for k in data_now if saved_data.get(k) != data_now[k])
        raise CheckpointError(f"the data differ from those checkpoint {checkpoint.path} was trained on ({changed}); "
                              "resuming would not continue the same run")
    grow_and_load(learner, checkpoint.tensors(LEARNER_TENSORS), info, checkpoint.path)
    record = RunRecord.from_json(document["record"])
    resume = None
    if info.get("position") is not None:
        position = info["position"]
        resume = TaskResume(
            phase=position["phase"], epoch=position["epoch"],
            loader_generator=trainer.get("loader.generator"),
            optimizer=document.get("optimizer"),
            optimizer_tensors={k: v for k, v in trainer.items() if k.startswith("optimizer.")},
            scheduler=document.get("scheduler"),
            phase_start={k[len("phase_start."):]: v for k, v in trainer.items() if k.startswith("phase_start.")},
            elapsed=float(document.get("task_elapsed_s", 0.0)),
        )
        learner.skipped_images.reset(document.get("skipped_in_task"))
    restore_rng(document["rng"], trainer)
    return learner, record, resume


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


def resume_config(run: RunDirectory, given: ExperimentConfig | None, overrides: Sequence[str]) -> ExperimentConfig:
    """The config to resume `run` with: its own, where `given`/`overrides` may change only RESUME_OVERRIDABLE keys."""
    from carecl.config import load_config

    stored = run.config()
    wanted = given if given is not None else load_config(run.path / CONFIG_FILE, overrides)
    differing = [key for key in config_differences(stored, wanted) if key not in RESUME_OVERRIDABLE]
    if differing:
        raise ConfigError(
            f"cannot resume {run.path} with a different config: {', '.join(differing)} differ from "
            f"{run.path / CONFIG_FILE} (a resumed run keeps its config; only {', '.join(sorted(RESUME_OVERRIDABLE))} may change)"
        )
    return wanted


def config_differences(first: ExperimentConfig, second: ExperimentConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    def flatten(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    a, b = flatten(config_to_dict(first), ""), flatten(config_to_dict(second), "")
    return sorted(key for key in a.keys() | b.keys() if not _same(a.get(key), b.get(key)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


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
