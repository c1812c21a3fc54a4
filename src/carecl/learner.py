"""The learner: data, scenario and method of one experiment, built and validated before training."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from carecl.backbones import create_backbone
from carecl.config import ExperimentConfig
from carecl.data import BenchmarkData, build_dataset
from carecl.data.base import SkippedImages, SkippingDataLoader, TaskDataset
from carecl.methods import build_method
from carecl.methods.base import Method, TaskContext
from carecl.rundir import RunDirectory
from carecl.scenario import Scenario, Task


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        from carecl.run_state import load_learner

        return load_learner(RunDirectory.open(path))

    def predict(self, images, topk: int = 5, batch_size: int | None = None) -> list:
        """Top-k classes of paths / PIL images / image tensors: a list of carecl.predict.ImagePrediction."""
        from carecl.predict import predict_images

        return predict_images(self, images, topk=topk, batch_size=batch_size)
