"""Core dataset types: splits, benchmarks, the per-task view, and the dataset registry.

A split holds its samples in one of three kinds, chosen by the loader that built it:
- ``list[str]``: image file paths, opened lazily with PIL and converted to RGB;
- ``np.ndarray`` uint8 ``(N, H, W, 3)``: in-memory pixels (CIFAR), turned into PIL per item
  so the benchmark's PIL transforms apply unchanged;
- ``torch.Tensor`` float ``(N, 3, H, W)`` in [0, 1]: ready-made images (digits, synthetic),
  whose transform receives the ``(3, H, W)`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from carecl.config import DataConfig
from carecl.errors import CareclError
from carecl.registry import Registry

Samples = Union[list[str], np.ndarray, torch.Tensor]
Transform = Callable[[object], object]


class DatasetError(CareclError, ValueError):
    """A dataset is missing or malformed; the message names the path (or config key) at fault."""


@dataclass
class ImageSplit:
    samples: Samples
    # Original class ids (sorted-folder numbering for ImageFolder benchmarks).
    targets: np.ndarray

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if self.targets.ndim != 1 or len(self.samples) != len(self.targets):
            raise ValueError(
                f"an ImageSplit needs one target per sample, got {len(self.samples)} samples "
                f"and targets of shape {self.targets.shape}"
            )

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class BenchmarkData:
    name: str
    # Index = original class id.
    class_names: list[str]
    train: ImageSplit
    test: ImageSplit
    # Applied to a PIL image (files, uint8 arrays) or to a (3, H, W) tensor (float tensors).
    train_transform: Transform
    test_transform: Transform

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def task_dataset(
        self,
        split: str,
        label_map: np.ndarray,
        low: int,
        high: int,
        transform: Transform | None = None,
    ) -> "TaskDataset":
        """The `split` ("train"/"test") samples whose mapped labels lie in [low, high).

        `transform` defaults to the split's own; pass `test_transform` to read training
        images without augmentation (e.g. for class prototypes).
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        default = self.train_transform if split == "train" else self.test_transform
        return TaskDataset(getattr(self, split), label_map, low, high, transform if transform is not None else default)


def load_rgb_image(path: str) -> Image.Image:
    """Open an image file as RGB (grayscale, RGBA, CMYK and palette images included)."""
    try:
        with Image.open(path) as image:
            # Palette images with transparency warn unless they pass through RGBA first.
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB")
    except OSError as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None


class TaskDataset(Dataset):
    """Samples of one split whose *mapped* labels (positions in the class order) are in [low, high).

    `label_map[original_id]` is the class's position in the class order; items are
    ``(image (3, H, W) float32, mapped_label int)``.
    """

    def __init__(
        self,
        split: ImageSplit,
        label_map: np.ndarray,
        low: int,
        high: int,
        transform: Transform | None,
    ) -> None:
        label_map = np.asarray(label_map, dtype=np.int64)
        if len(split) and split.targets.max() >= len(label_map):
            raise ValueError(
                f"label_map covers {len(label_map)} classes but the split has class id "
                f"{int(split.targets.max())}"
            )
        self.split = split
        self.transform = transform
        mapped = label_map[split.targets]
        self.indices = np.flatnonzero((mapped >= low) & (mapped < high))
        self.labels = mapped[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[position])
        image = self._raw_image(index)
        if self.transform is not None:
            image = self.transform(image)
        if isinstance(image, Image.Image):
            image = to_tensor(image)
        return image.to(torch.float32), int(self.labels[position])

    def _raw_image(self, index: int) -> Image.Image | torch.Tensor:
        samples = self.split.samples
        if isinstance(samples, torch.Tensor):
            return samples[index]
        if isinstance(samples, np.ndarray):
            return Image.fromarray(samples[index]).convert("RGB")
        return load_rgb_image(samples[index])


# Dataset name -> builder(cfg: DataConfig) -> BenchmarkData; filled by the sibling modules.
DATASETS: Registry[Callable[[DataConfig], BenchmarkData]] = Registry("dataset")


def build_dataset(cfg: DataConfig) -> BenchmarkData:
    """Load (or scan) the configured dataset and check it fits the config, before any training."""
    try:
        builder = DATASETS.get(cfg.dataset)
    except KeyError as error:
        raise DatasetError(f"data.dataset: {error.args[0]}") from None
    data = builder(cfg)
    check_config_fits(cfg, data)
    return data


def check_config_fits(cfg: DataConfig, data: BenchmarkData) -> None:
    """Fail early on settings that cannot work with this dataset's classes."""
    if cfg.init_cls > data.n_classes:
        raise DatasetError(
            f"data.init_cls = {cfg.init_cls} but dataset {data.name!r} has only {data.n_classes} classes"
        )
    if cfg.class_order is not None:
        outside = sorted({c for c in cfg.class_order if not 0 <= c < data.n_classes})
        if outside:
            raise DatasetError(
                f"data.class_order: class ids {outside} are outside [0, {data.n_classes}) "
                f"for dataset {data.name!r}"
            )
        if len(set(cfg.class_order)) != len(cfg.class_order):
            raise DatasetError("data.class_order: contains repeated class ids")


def require_positive(value: int, key: str) -> None:
    if value <= 0:
        raise DatasetError(f"{key} must be positive, got {value}")
