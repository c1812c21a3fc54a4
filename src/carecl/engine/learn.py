"""Learning new classes after a finished run (`carecl learn`, `ContinualLearner.learn`).

The new classes become an addition of the run's config (`data.additions`): an image folder whose classes follow
the stream's, learned as one task (or tasks of `increment` classes) exactly as the next tasks of the stream would
be. Everything is checked before anything on disk changes: the run is finished and no process holds it, the new
classes are new, their images pass through the run's transforms to the backbone's input, the method can take
more tasks than its stream had, and the whole extended experiment builds. Then classes.json grows, config.yaml
records the addition (the commit point), and the run resumes from its last checkpoint: the learner grows (heads,
experts, prompts, statistics) and learns the new tasks, checkpointed as any task, evaluated on every test image
the run knows. Killed midway, `carecl train --resume DIR` (or the same `carecl learn`) finishes that step.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from carecl.config import (AdditionConfig, ConfigError, ExperimentConfig, apply_overrides, config_from_dict,
                           config_to_dict, save_config)
from carecl.data.additions import AdditionImages, refuse_known_classes, scan_addition
from carecl.data.base import DatasetError, load_rgb_image
from carecl.engine.experiment import Experiment
from carecl.engine.run import resume_experiment
from carecl.errors import CareclError
from carecl.metrics import RunSummary
from carecl.preprocessing import input_size
from carecl.registry import METHODS
from carecl.runs.directory import (CONFIG_FILE, RUN_PREFIX, RunClasses, RunDirectory, RunDirectoryError,
                                   resolve_run_paths)
from carecl.runs.state import RESUME_OVERRIDABLE
from carecl.scenario import addition_task_sizes

log = logging.getLogger("carecl")

# What a learn may change for the tasks still to come: how they train and are evaluated, and where data live;
# never what the finished tasks computed (the method, its backbone, the stream, the seed).
LEARN_OVERRIDABLE_SECTIONS = ("train.", "eval.", "logging.")
LEARN_OVERRIDABLE_DATA = ("data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.strict")


class LearnError(CareclError):
    """New classes cannot be learned by this run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Plan:
    """What a learn will do, worked out and checked before anything is written."""

    config: ExperimentConfig
    addition: AdditionConfig
    classes: RunClasses
    continuing: bool  # this addition is already recorded (a learn that was stopped): finish it
    new_tasks: range  # the addition's tasks, numbered from 1 in the extended stream


def plan(run: RunDirectory, new_data: str | Path, increment: int | None = None, test_fraction: float | None = None,
         overrides: Sequence[str] = ()) -> Plan:
    """Check everything a learn needs and return the extended config; nothing on disk changes."""
    if not (run.path / CONFIG_FILE).is_file():
        raise RunDirectoryError(f"{run.path} is not a carecl run directory ({CONFIG_FILE} not found)")
    stored = run.config()
    root, folder = addition_root(new_data, run.path)
    pending = unfinished_addition(stored, folder, run.path)
    if pending is not None and finished(run, stored):
        pending = None  # learned already: its classes are known, and refused below
    if pending is None:
        require_finished(run, stored)
    recorded = run.classes()
    known = recorded.names_by_id() if recorded is not None else []
    images = scan_addition(folder, test_fraction if pending is None else pending.test_fraction)
    if pending is None:
        refuse_known_classes(images.class_names, known, str(folder))
    if not images.test:
        log.warning("%s has no test images: the new classes are learned but not measured (evaluation covers the "
                    "test images of the classes learned before)", folder)
    refuse_unsupported_method(stored)
    addition = pending or AdditionConfig(root=root, test_fraction=test_fraction, increment=increment,
                                         classes=images.class_names, changes=list(overrides))
    config = extended_config(stored, addition, overrides, already_recorded=pending is not None)
    experiment = Experiment.build(resolve_run_paths(config, run.path))
    check_images_fit(experiment, images)
    names = experiment.class_names
    sizes = recorded.task_sizes if recorded is not None else None
    total = experiment.scenario.n_tasks
    new_tasks = range(total - len(addition_task_sizes(len(addition.classes), addition.increment)) + 1, total + 1)
    return Plan(config, addition, RunClasses(len(names), tuple(names), sizes), pending is not None, new_tasks)


def addition_root(new_data: str | Path, run_path: Path) -> tuple[str, Path]:
    """(what config.yaml records, the folder): a `run:` folder inside the run stays run-relative."""
    text = str(new_data)
    if text.startswith(RUN_PREFIX):
        return text, (run_path / text[len(RUN_PREFIX):]).resolve()
    folder = Path(text).expanduser().resolve()
    return str(folder), folder


def unfinished_addition(config: ExperimentConfig, folder: Path, run_path: Path) -> AdditionConfig | None:
    """The addition of `folder` if the run's config already records it (a learn that was stopped), else None."""
    for addition in config.data.additions or []:
        if addition_root(addition.root, run_path)[1] == folder:
            return addition
    return None


def progress_of(run: RunDirectory, config: ExperimentConfig) -> tuple[int, int, int]:
    """(tasks learned, tasks the run learns, tasks of its stream) as its metrics record them."""
    try:
        metrics = run.metrics() or {}
    except (OSError, ValueError):
        metrics = {}
    sizes = metrics.get("task_sizes") or []
    limit = config.train.max_tasks
    return len(metrics.get("wall_time_s") or []), len(sizes) if limit is None else min(limit, len(sizes)), len(sizes)


def finished(run: RunDirectory, config: ExperimentConfig) -> bool:
    done, expected, _ = progress_of(run, config)
    return expected > 0 and done >= expected


def require_finished(run: RunDirectory, config: ExperimentConfig) -> None:
    """A run still learning its own tasks cannot take new ones: they would not follow what it learned."""
    done, expected, sizes = progress_of(run, config)
    if not expected or done < expected:
        learned = f"has learned {done} of its {expected} tasks" if expected else "has not finished its first task"
        raise LearnError(f"{run.path} {learned}: finish it first (`carecl train --resume {run.path}`), then learn "
                         "new classes")
    if expected < sizes:
        raise LearnError(f"{run.path} stopped after {expected} of its stream's {sizes} tasks (train.max_tasks): "
                         "new classes would follow the rest of the stream, which it has not learned")


def refuse_unsupported_method(config: ExperimentConfig) -> None:
    method = METHODS.get(config.method.name).method
    reason = getattr(method, "cannot_learn_beyond_its_stream", None)
    if reason:
        raise LearnError(f"{config.method.name} cannot learn classes beyond its configured stream: {reason}")


def extended_config(stored: ExperimentConfig, addition: AdditionConfig, overrides: Sequence[str],
                    already_recorded: bool) -> ExperimentConfig:
    refused = [item for item in overrides if not allowed_override(item.split("=", 1)[0].strip())]
    if refused:
        raise ConfigError(f"carecl learn may change only how the new tasks train and are evaluated (train.*, eval.*, "
                          f"logging.*) and where data live ({', '.join(LEARN_OVERRIDABLE_DATA)}); refused: "
                          f"{', '.join(refused)}")
    document = copy.deepcopy(config_to_dict(stored))
    document["train"]["max_tasks"] = None  # every task of the stream is learned (require_finished); the new ones follow
    if not already_recorded:
        document["data"]["additions"] = [*(document["data"].get("additions") or []), config_to_dict(addition)]
    try:
        return config_from_dict(apply_overrides(document, list(overrides)))
    except ConfigError as error:
        raise ConfigError(f"--set: {error}") from None


def allowed_override(key: str) -> bool:
    return key.startswith(LEARN_OVERRIDABLE_SECTIONS) or key in LEARN_OVERRIDABLE_DATA


def check_images_fit(experiment: Experiment, images: AdditionImages) -> None:
    """One image of each new class through the run's training and test transforms must come out as the backbone's
    input (3 channels at its size): names the file that does not."""
    side = input_size(experiment.config)
    data = experiment.data
    for name, paths in images.train.items():
        path = paths[0]
        try:
            image = load_rgb_image(path)
        except DatasetError as error:
            raise LearnError(f"class {name!r}: {error}") from None
        for transform in (data.train_transform, data.test_transform):
            shape = tuple(as_tensor(transform(image) if transform is not None else image).shape)
            if shape != (3, side, side):
                raise LearnError(f"{path}: the run's transforms make it {shape}, but the backbone takes (3, {side}, "
                                 f"{side}) images: this run cannot learn from these images")


def as_tensor(image):
    from torchvision.transforms.functional import to_tensor

    return image if hasattr(image, "shape") else to_tensor(image)


def learn(run_dir: str | Path, new_data: str | Path, increment: int | None = None, test_fraction: float | None = None,
          overrides: Sequence[str] = ()) -> RunSummary:
    """Learn the classes of `new_data` on top of the finished run in `run_dir` (see the module docstring)."""
    run = RunDirectory(run_dir)
    with run.lock():  # refused at once when another process trains or learns in this run
        planned = plan(run, new_data, increment, test_fraction, overrides)
        if not planned.continuing:
            run.write_classes(planned.classes)
            save_config(planned.config, run.path / CONFIG_FILE)  # the commit point: from here a resume learns them
            tasks = planned.new_tasks
            log.info("%s: learning %d new class(es) from %s as task%s %s: %s", run.path, len(planned.addition.classes),
                     planned.addition.root, "s" if len(tasks) > 1 else "",
                     f"{tasks[0]}-{tasks[-1]}" if len(tasks) > 1 else tasks[0], ", ".join(planned.addition.classes))
    # A stopped learn continues as any resume, where the data may have moved (data.root) meanwhile.
    kept = [item for item in overrides if planned.continuing and item.split("=", 1)[0].strip() in RESUME_OVERRIDABLE]
    return resume_experiment(run.path, overrides=kept)


__all__ = ["LearnError", "Plan", "learn", "plan"]
