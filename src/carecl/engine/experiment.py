"""An Experiment: the config, data, scenario, method and device of one run, built and checked before any
training, plus the loaders the loop reads from."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from carecl.backbones import backbone_preprocessing, create_backbone
from carecl.config import ConfigError, ExperimentConfig
from carecl.data import BenchmarkData, build_dataset
from carecl.data.base import SkippedImages, SkippingDataLoader, TaskDataset, Transform, single_class_batches
from carecl.data.validation import evaluate_on_validation, hold_out_validation
from carecl.distributed import Distributed, DistributedError, ShardSampler
from carecl.distributed import current as current_distributed
from carecl.engine.incremental_eval import IncrementalEvaluator
from carecl.methods.base import build_method
from carecl.methods.base import Method, TaskContext
from carecl.preprocessing import evaluation_transform, input_size
from carecl.runs.directory import RunClasses
from carecl.scenario import Scenario, Task, addition_task_sizes


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device, checked to exist; under torchrun each process gets GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            raise ConfigError(f"train.device is {name!r} but this machine has "
                              f"{'no CUDA GPU' if count == 0 else f'{count} CUDA GPU(s)'}; use train.device=cpu or auto")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("train.device is 'mps' but no Apple GPU is available; use train.device=cpu or auto")
    distributed = current_distributed()
    if device.type == "cuda" and device.index is None and distributed.enabled:
        return torch.device("cuda", distributed.local_rank)
    return device


# Parameters above which a CPU run gets every core by default (below, one thread avoids contention).
SMALL_MODEL_PARAMETERS = 5_000_000


def configure_threads(threads: int | None, device: torch.device, backbone: torch.nn.Module,
                      distributed: Distributed) -> int:
    """`train.threads`, or auto: on CPU one thread for small models, else the cores per process."""
    if threads is None:
        if device.type != "cpu":
            return torch.get_num_threads()
        small = sum(p.numel() for p in backbone.parameters()) < SMALL_MODEL_PARAMETERS
        threads = 1 if small else max(1, (os.cpu_count() or 1) // distributed.world_size)
    torch.set_num_threads(threads)
    return threads


def default_workers(samples: object, distributed: Distributed) -> int:
    """Auto `data.num_workers`: in-memory images need none; files get min(8, CPUs per process)."""
    if not isinstance(samples, list):
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // distributed.world_size))


def per_process_batch(batch_size: int, distributed: Distributed) -> int:
    """`train.batch_size` is the global batch: split evenly over the processes."""
    if batch_size % distributed.world_size:
        raise DistributedError(f"train.batch_size {batch_size} is the global batch and must divide evenly over "
                               f"{distributed.world_size} processes")
    return batch_size // distributed.world_size


def keeps_workers(config: ExperimentConfig, workers: int) -> bool:
    """Persistent DataLoader workers, unless mid-task checkpoints are written: a kept worker's augmentation RNG
    runs on across epochs and phases, which a resumed run (fresh workers seeded from the checkpointed loader
    generator) could not repeat; workers started per epoch make every epoch's crops follow from that state."""
    return config.data.persistent_workers and workers > 0 and config.train.checkpoint_every_epochs == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluation_splits(config: ExperimentConfig, data: BenchmarkData) -> BenchmarkData:
    """`data` with its validation split held out (data.validation_fraction), and evaluating it instead of the test
    split when eval.test_set is false. Already split data (an experiment rebuilt from its own data) stay as they are."""
    if config.data.validation_fraction is None or data.validation is not None or data.evaluated_split != "test":
        return data
    data = hold_out_validation(data, config.data.validation_fraction, config.seed)
    return data if config.eval.test_set else evaluate_on_validation(data)


@dataclass
class Experiment:
    """Everything a run needs, built (and validated) before any training starts."""

    config: ExperimentConfig
    # None for an experiment built for prediction from its run's recorded classes (see for_inference): no loaders.
    data: BenchmarkData | None
    scenario: Scenario
    method: Method
    device: torch.device
    # Unreadable images met by this experiment's loaders during the current task.
    skipped_images: SkippedImages = field(default_factory=SkippedImages)
    # This process's rank under torchrun (single process otherwise).
    distributed: Distributed = field(default_factory=current_distributed)
    # An experiment without data: the classes its run recorded in classes.json.
    recorded_classes: RunClasses | None = None
    # Stored test features and top-k for methods with fixed class scores (engine/incremental_eval.py).
    incremental_evaluator: IncrementalEvaluator = field(default_factory=IncrementalEvaluator)

    @classmethod
    def build(cls, config: ExperimentConfig, data: BenchmarkData | None = None,
              distributed: Distributed | None = None) -> "Experiment":
        """The experiment of `config` with its dataset (`data`: that dataset, if already built)."""
        per_process_batch(config.train.batch_size, distributed or current_distributed())
        resolve_device(config.train.device)  # a missing GPU fails before the data are scanned
        data = data if data is not None else build_dataset(config.data, backbone_preprocessing(config.backbone))
        data = evaluation_splits(config, data)
        return cls._assemble(config, data.n_classes, data=data, class_names=data.class_names,
                             members=(data.task_sizes, data.task_names or (), data.task_templates or ()),
                             appended=data.appended_sizes or ())

    @classmethod
    def for_inference(cls, config: ExperimentConfig, classes: RunClasses) -> "Experiment":
        """An experiment without its dataset, for prediction: the scenario from the recorded class count (the order
        from the config, as in training), the test transform from `data.dataset`; it has no loaders."""
        evaluation_transform(config)  # an unknown dataset fails here, not at the first image
        domains = config.data.domains or []
        appended = [size for addition in config.data.additions or []
                    for size in addition_task_sizes(len(addition.classes or []), addition.increment)]
        return cls._assemble(config, classes.n_classes, recorded_classes=classes, class_names=classes.names or (),
                             members=(classes.task_sizes, [d.name for d in domains], [d.templates for d in domains]),
                             appended=appended)

    @classmethod
    def _assemble(cls, config: ExperimentConfig, n_classes: int, data: BenchmarkData | None = None,
                  recorded_classes: RunClasses | None = None, class_names=(), members=(None, (), ()),
                  appended=()) -> "Experiment":
        """`members`: a multi-domain stream's (class counts, names, templates), one task each; `appended`: the tasks
        of classes learned after the stream (data.additions)."""
        if isinstance(config.seed, list):
            raise ConfigError(f"seed is a list {config.seed}: a run group, one run per seed (carecl train); an "
                              "experiment has one seed")
        sizes, names, templates = members
        scenario = Scenario.build(
            n_classes, config.data.first_task_size(n_classes - sum(appended)), config.data.increment,
            seed=config.seed, shuffle=config.data.shuffle, explicit_order=config.data.class_order,
            class_names=class_names, member_sizes=sizes, task_names=names, task_templates=templates,
            appended_sizes=appended,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # random-init backbones are reproducible from the config
            backbone = create_backbone(config.backbone, input_size(config))
        device = resolve_device(config.train.device)
        configure_threads(config.train.threads, device, backbone, current_distributed())
        method = build_method(config, backbone, scenario).to(device)
        if config.eval.unseen_tasks and not method.scores_unseen_tasks:
            raise ConfigError(f"eval.unseen_tasks: {config.method.name} cannot score classes it has not learned "
                              "(only methods with a text head, such as moe_adapters, can)")
        return cls(config, data, scenario, method, device, recorded_classes=recorded_classes)

    @property
    def class_names(self) -> list[str]:
        """Names by original class id: the dataset's, else the recorded ones, else `class <id>`."""
        if self.data is not None:
            return list(self.data.class_names)
        return (self.recorded_classes or RunClasses(self.scenario.n_classes)).names_by_id()

    @property
    def test_transform(self) -> Transform:
        """What evaluation passes test images through (the same transform when the experiment has no dataset)."""
        return self.data.test_transform if self.data is not None else evaluation_transform(self.config)

    # ---- loaders ---------------------------------------------------------------------
    def _loader(self, split: str, low: int, high: int, train: bool, seed: int = 0, class_batch: int | None = None,
                batch_size: int | None = None) -> DataLoader:
        """Training: a seeded shuffle per epoch (set_epoch), whose global batches are the same for
        any number of processes; otherwise in order, each rank reading its own shard, or with
        `class_batch` (one process), class by class in batches of at most that many images."""
        source = getattr(self.data, split)
        transform = self.data.train_transform if train else self.data.test_transform
        dataset = TaskDataset(source, self.scenario.label_map, low, high, transform, skip_unreadable=not self.config.data.strict)
        distributed, stream = self.distributed, self.config.seed * 1000 + seed
        if train:
            batch = per_process_batch(batch_size or self.config.train.batch_size, distributed)
            # Rank r takes every world_size-th index of one permutation: together, a single process's batch.
            sampler = DistributedSampler(dataset, distributed.world_size, distributed.rank, shuffle=True, seed=stream)
        else:
            batch, sampler = self.config.eval.batch_size, ShardSampler(len(dataset), distributed)
        batching = {"batch_size": batch, "sampler": sampler}
        if class_batch is not None:
            batching = {"batch_sampler": single_class_batches(dataset.labels, class_batch)}
        data = self.config.data
        workers = data.num_workers if data.num_workers is not None else default_workers(source.samples, distributed)
        pin = data.pin_memory if data.pin_memory is not None else self.device.type == "cuda"
        # A loader of its own: iterating never draws from the global RNG (dropout's), so evaluating
        # more or less often cannot change training; it seeds the workers.
        generator = torch.Generator().manual_seed(stream)
        return SkippingDataLoader(
            dataset, self.skipped_images, **batching, generator=generator, num_workers=workers,
            pin_memory=pin, persistent_workers=keeps_workers(self.config, workers),
        )

    def train_loader(self, task: Task) -> DataLoader:
        return self._loader("train", task.low, task.high, train=True, seed=task.index)

    def statistics_loader(self, task: Task) -> DataLoader:
        return self._loader("train", task.low, task.high, train=False)

    def class_batch_loader(self, task: Task, batch_size: int) -> DataLoader:
        return self._loader("train", task.low, task.high, train=False, class_batch=batch_size)

    def augmented_loader(self, task: Task, batch_size: int, seed: int) -> DataLoader:
        """The task's training images with training transforms, shuffled by `seed`, in batches of `batch_size`."""
        return self._loader("train", task.low, task.high, train=True, seed=seed, batch_size=batch_size)

    def test_loader(self, n_seen: int, split: str = "test") -> DataLoader:
        """The evaluation images of the first `n_seen` classes: the test split, or `split="validation"`."""
        return self._loader(split, 0, n_seen, train=False)

    def task_test_loader(self, task: Task, split: str = "test") -> DataLoader:
        """The evaluation images of one task's classes (task-incremental evaluation: one task per batch)."""
        return self._loader(split, task.low, task.high, train=False)

    def context(self, task: Task) -> TaskContext:
        return TaskContext(task, self.scenario, self.device, lambda: self.statistics_loader(task),
                           self.config.train.progress and self.distributed.is_main, self.distributed,
                           lambda batch_size: self.class_batch_loader(task, batch_size),
                           lambda batch_size, number: self.augmented_loader(task, batch_size, 10_000 * (number + 1) + task.index))
