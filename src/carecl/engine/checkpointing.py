"""Experiments into checkpoints and back: what the loop writes after (and inside) a task, and how a
run directory becomes an Experiment again, for a resume or for evaluation and prediction.

A checkpoint holds the learner's `state_tensors()` and everything else the loop's future depends
on (RNG states, the optimiser, scheduler and gradient scaler mid-phase, the metrics so far), so a
restored run goes on to the same numbers as a run never interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from carecl.backbones import backbone_preprocessing
from carecl.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict, load_config
from carecl.data import BenchmarkData, DatasetError, build_dataset
from carecl.engine.experiment import Experiment, seed_everything
from carecl.runs import checkpoints as ckpt
from carecl.runs.checkpoints import (LEARNER_INFO, LEARNER_TENSORS, TRAINER_INFO, TRAINER_TENSORS, Checkpoint,
                                     CheckpointError)
from carecl.runs.directory import CLASSES_FILE, CONFIG_FILE, RunClasses, RunDirectory, RunDirectoryError
from carecl.runs.training_state import capture_rng, restore_rng
from carecl.runs.state import RESUME_OVERRIDABLE, MidTaskState, RunProgress, config_differences

log = logging.getLogger("carecl")


def learner_info(experiment: Experiment, grown_tasks: int | None = None) -> dict[str, Any]:
    method, scenario = experiment.method, experiment.scenario
    return {"n_learned_tasks": method.n_learned_tasks,
            "grown_tasks": method.n_learned_tasks if grown_tasks is None else grown_tasks,
            "class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes)}


def save_learner(run: RunDirectory, experiment: Experiment) -> None:
    """The learner alone, as after its last finished task (no trainer state: it cannot be resumed)."""
    run.save_state(experiment.method.state_tensors(), {**learner_info(experiment), "position": None})


def save_checkpoint(run: RunDirectory, experiment: Experiment, progress: RunProgress,
                    state: MidTaskState | None = None) -> str:
    """A resumable checkpoint: after the last task in `progress`, or inside the next one (`state`)."""
    in_task = state is not None
    info = {**learner_info(experiment, experiment.method.n_learned_tasks + int(in_task)),
            "position": state.position() if in_task else None}
    rng, tensors = capture_rng()
    document: dict[str, Any] = {
        "format": ckpt.FORMAT_VERSION,
        "config": config_to_dict(experiment.config),
        "record": progress.to_json(),
        "rng": rng,
        "data": data_fingerprint(experiment.data),
    }
    if in_task:
        document.update(state.document())
        tensors.update(state.tensors())
    name = run.save_state(experiment.method.state_tensors(), info, trainer_tensors=tensors, trainer_info=document)
    log.debug("checkpoint %s written", name)
    return name


def data_fingerprint(data: BenchmarkData) -> dict[str, Any]:
    """Enough of the dataset to notice that a resume would see different data."""
    return {"name": data.name, "classes": data.class_names, "train": len(data.train), "test": len(data.test)}


def grow_and_load(experiment: Experiment, checkpoint_tensors: dict[str, torch.Tensor], info: dict[str, Any],
                  source: Path) -> None:
    """Replay begin_task for every task the saved learner had grown, then load its tensors. A learner saved before
    classes were added after its stream (carecl learn) grows: what was sized to the old stream takes the saved values
    in its leading rows (Method.load_state_tensors with grow)."""
    scenario, method = experiment.scenario, experiment.method
    saved, order = info["class_order"], scenario.order.tolist()
    grown = len(saved) < len(order) and order[:len(saved)] == saved
    if saved != order and not grown:
        raise CheckpointError(f"{source}: saved class order differs from the one the run's config produces")
    method.regrow(info["grown_tasks"], info["n_learned_tasks"])
    try:
        method.load_state_tensors(checkpoint_tensors, grow=grown)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{source}: the saved learner does not fit the run's config: {error}") from None
    method.to(experiment.device)


def load_experiment(run: RunDirectory, *, need_data: bool = True, data_overrides: Sequence[str] = ()) -> Experiment:
    """Rebuild a run's experiment from its config and the last finished task's checkpoint.

    With its dataset, which must have the classes the run recorded (classes.json): evaluation and
    diagnosis need the test set. With `need_data=False` (prediction), a dataset that cannot be built
    or has other classes is done without: the experiment is built from the recorded classes instead
    (Experiment.for_inference), the same model and transform. `data_overrides` (`data.root=...`,
    any `data.*` key) apply on top of the run's config, e.g. after the dataset moved.
    """
    config = run.config_for_loading(data_overrides)
    recorded = run.classes()
    data = _dataset_of_run(run, config, recorded, need_data)
    experiment = Experiment.build(config, data) if data is not None else Experiment.for_inference(config, recorded)
    tensors, info = run.load_state()
    grow_and_load(experiment, tensors, info, run.path)
    return experiment


def _dataset_of_run(run: RunDirectory, config: ExperimentConfig, recorded: RunClasses | None,
                    need_data: bool) -> BenchmarkData | None:
    """The run's dataset, checked against its recorded classes; None where prediction can do without it."""
    try:
        data = build_dataset(config.data, backbone_preprocessing(config.backbone))
    except DatasetError as error:
        if need_data:
            raise
        if recorded is None:
            raise RunDirectoryError(f"{run.path / CLASSES_FILE} not found, so the run needs its dataset, which "
                                    f"cannot be built: {error}") from None
        log.debug("%s: loading without the dataset (%s), classes from %s", run.path, error, CLASSES_FILE)
        return None
    difference = recorded.difference(data.class_names) if recorded is not None else None
    if difference is None:
        return data
    if need_data:
        raise DatasetError(f"the dataset of {run.path} (data.root {config.data.root}) no longer has the classes "
                           f"recorded in {run.path / CLASSES_FILE} at training: {difference}")
    log.debug("%s: the dataset's classes differ from %s (%s); using the recorded ones", run.path, CLASSES_FILE, difference)
    return None


def restore(run: RunDirectory, checkpoint: Checkpoint, config: ExperimentConfig
            ) -> tuple[Experiment, RunProgress, MidTaskState | None]:
    """An experiment exactly as when `checkpoint` was written, RNG states included (restored last)."""
    if not checkpoint.has(TRAINER_INFO):
        raise CheckpointError(f"checkpoint {checkpoint.path} holds no training state (it was written by save_state, "
                              "e.g. an imported model): it can be evaluated but not resumed")
    document = checkpoint.document(TRAINER_INFO)
    trainer = checkpoint.tensors(TRAINER_TENSORS)
    saved_config = config_from_dict(document["config"])
    learned = learned_since(saved_config, run.config())
    differing = [key for key in config_differences(saved_config, run.config())
                 if key not in RESUME_OVERRIDABLE and key not in learned]
    if differing:
        raise CheckpointError(f"{run.path / CONFIG_FILE} differs from the config checkpoint {checkpoint.path} was "
                              f"written with, at {', '.join(differing)}; restore the file to resume")
    info = checkpoint.document(LEARNER_INFO)
    seed_everything(config.seed)
    experiment = Experiment.build(config)
    check_same_data(document.get("data"), data_fingerprint(experiment.data), checkpoint, grown=bool(learned))
    grow_and_load(experiment, checkpoint.tensors(LEARNER_TENSORS), info, checkpoint.path)
    progress = RunProgress.from_json(document["record"])
    state = None
    if info.get("position") is not None:
        state = MidTaskState.read(info["position"], document, trainer)
        experiment.skipped_images.reset(state.skipped_files)
    restore_rng(document["rng"], trainer)
    return experiment, progress, state


def learned_since(saved: ExperimentConfig, current: ExperimentConfig) -> set[str]:
    """The config keys `carecl learn` changed since a checkpoint was written (its additions, the --set changes they
    record): empty unless the current additions extend the checkpoint's."""
    before, after = saved.data.additions or [], current.data.additions or []
    if len(after) <= len(before) or after[:len(before)] != before:
        return set()
    return {"data.additions", "train.max_tasks",
            *(change.split("=", 1)[0].strip() for addition in after[len(before):] for change in addition.changes)}


def check_same_data(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Checkpoint, grown: bool = False) -> None:
    """The data a checkpoint was trained on are those of the run now (or, after `carecl learn`, they start them)."""
    if saved is None or saved == now:
        return
    if grown and saved.get("name") == now.get("name") and now["classes"][:len(saved["classes"])] == saved["classes"]:
        return
    changed = ", ".join(f"{k} {saved.get(k) if k != 'classes' else len(saved[k])} -> "
                        f"{now[k] if k != 'classes' else len(now[k])}" for k in now if saved.get(k) != now[k])
    raise CheckpointError(f"the data differ from those checkpoint {checkpoint.path} was trained on ({changed}); "
                          "resuming would not continue the same run")


def resume_config(run: RunDirectory, given: ExperimentConfig | None, overrides: Sequence[str]) -> ExperimentConfig:
    """The config to resume `run` with: its own, where `given`/`overrides` may change only RESUME_OVERRIDABLE keys."""
    stored = run.config()
    wanted = given if given is not None else load_config(run.path / CONFIG_FILE, overrides)
    differing = [key for key in config_differences(stored, wanted) if key not in RESUME_OVERRIDABLE]
    if differing:
        raise ConfigError(
            f"cannot resume {run.path} with a different config: {', '.join(differing)} differ from "
            f"{run.path / CONFIG_FILE} (a resumed run keeps its config; only {', '.join(sorted(RESUME_OVERRIDABLE))} may change)"
        )
    return wanted
