"""Core dataset types: splits, benchmarks, the per-task view, and the dataset registry.

A split holds its samples in one of three kinds, chosen by the loader that built it:
- ``list``: image file paths, opened lazily with PIL and converted to RGB (a multi-domain stream's list
  may also hold uint8 arrays, or items with a ``load()`` returning a PIL image);
- ``np.ndarray`` uint8 ``(N, H, W, 3)``: in-memory pixels (CIFAR), turned into PIL per item
  so the benchmark's PIL transforms apply unchanged;
- ``torch.Tensor`` float ``(N, 3, H, W)`` in [0, 1]: ready-made images (digits, synthetic),
  whose transform receives the ``(3, H, W)`` tensor.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms.functional import to_tensor

from carecl.config import DataConfig
from carecl.errors import CareclError
from carecl.registry import Registry

# Unreadable files listed by name in the metrics (the count is always complete).
MAX_LISTED_FILES = 20

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
    # Applied to a PIL image (files, uint8 arrays) or to a (3, H, W) tensor (float tensors);
    # set by `carecl.data.build_dataset` from the dataset's transform recipe.
    train_transform: Transform | None = None
    test_transform: Transform | None = None
    # A multi-domain stream's members, each learned as one task: class counts (ids are consecutive, member by
    # member), names and prompt templates (None: the method's). None: tasks follow data.init_cls / increment.
    task_sizes: list[int] | None = None
    task_names: list[str] | None = None
    task_templates: list[list[str] | None] | None = None
    # Training images held out for choosing settings (data.validation_fraction; data/validation.py), read with
    # the test transform; None without.
    validation: ImageSplit | None = None
    # What `test` holds: the test split, or (eval.test_set: false, as in carecl tune) the validation split.
    evaluated_split: str = "test"
    # Tasks of the classes learned after the stream (data.additions), whose ids follow the dataset's own.
    appended_sizes: list[int] | None = None

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
        """The `split` ("train"/"test"/"validation") samples whose mapped labels lie in [low, high).

        `transform` defaults to the split's own; pass `test_transform` to read training
        images without augmentation (e.g. for class prototypes).
        """
        if split not in ("train", "test", "validation") or getattr(self, split) is None:
            raise ValueError(f"split must be 'train', 'test' or (when held out) 'validation', got {split!r}")
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
    except Exception as error:  # noqa: BLE001 - a corrupt file can raise OSError, ValueError, SyntaxError, ...
        raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from None


class UnreadableImageError(DatasetError):
    """An image file cannot be opened or decoded (missing, empty, truncated, not an image)."""

    def __init__(self, path: str, reason: str = "") -> None:
        if not reason:  # a DataLoader worker's re-raise passes its whole traceback: keep the original message
            original = re.findall(r"UnreadableImageError: (cannot read image (.*?): (.*))$", path, flags=re.M)
            if original:
                message, path, reason = original[-1]
                super().__init__(message)
                self.path, self.reason = path, reason
                return
        super().__init__(f"cannot read image {path}: {reason}" if reason else path)
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class UnreadableImage:
    """What TaskDataset returns, instead of raising, for an image file it cannot read."""

    path: str
    label: int
    reason: str


class TaskDataset(Dataset):
    """Samples of one split whose *mapped* labels (positions in the class order) are in [low, high).

    `label_map[original_id]` is the class's position in the class order; items are
    ``(image (3, H, W) float32, mapped_label int)``. An unreadable image file raises DatasetError,
    or with `skip_unreadable` comes back as an `UnreadableImage` (see `collate_readable`).
    """

    def __init__(
        self,
        split: ImageSplit,
        label_map: np.ndarray,
        low: int,
        high: int,
        transform: Transform | None,
        skip_unreadable: bool = False,
    ) -> None:
        label_map = np.asarray(label_map, dtype=np.int64)
        if len(split) and split.targets.max() >= len(label_map):
            raise ValueError(
                f"label_map covers {len(label_map)} classes but the split has class id "
                f"{int(split.targets.max())}"
            )
        self.split = split
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._class_sizes: np.ndarray | None = None
        mapped = label_map[split.targets]
        self.indices = np.flatnonzero((mapped >= low) & (mapped < high))
        self.labels = mapped[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int] | UnreadableImage:
        index = int(self.indices[position])
        try:
            image = self._raw_image(index)
        except UnreadableImageError as error:
            if not self.skip_unreadable:
                raise
            return UnreadableImage(error.path, int(self.labels[position]), error.reason)
        if self.transform is not None:
            image = self.transform(image)
        if isinstance(image, Image.Image):
            image = to_tensor(image)
        return image.to(torch.float32), int(self.labels[position])

    def class_size(self, label: int) -> int:
        """Samples of mapped class `label` in this view."""
        if self._class_sizes is None:
            self._class_sizes = np.bincount(self.labels) if len(self.labels) else np.zeros(0, dtype=np.int64)
        return int(self._class_sizes[label]) if 0 <= label < len(self._class_sizes) else 0

    def _raw_image(self, index: int) -> Image.Image | torch.Tensor:
        samples = self.split.samples
        if isinstance(samples, torch.Tensor):
            return samples[index]
        if isinstance(samples, np.ndarray):
            return Image.fromarray(samples[index]).convert("RGB")
        item = samples[index]
        if isinstance(item, str):
            return load_rgb_image(item)
        if isinstance(item, np.ndarray):  # a multi-domain stream mixing in-memory members with files
            return Image.fromarray(item).convert("RGB")
        return item.load()  # an image of another library's dataset (carecl.data.mtil.DatasetItem)


def collate_readable(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[UnreadableImage]]:
    """default_collate over the readable items; unreadable ones are passed on apart (a batch may hold none)."""
    readable = [item for item in items if not isinstance(item, UnreadableImage)]
    unreadable = [item for item in items if isinstance(item, UnreadableImage)]
    if not readable:
        return None, None, unreadable
    images, labels = default_collate(readable)
    return images, labels, unreadable


class SkippedImages:
    """Unreadable images met while learning one task: skipped, counted once per file, summarised.

    A class whose every image in a view turns out unreadable is an error (nothing could be learned
    or measured for it), naming its folder.
    """

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self._by_class: dict[tuple[int, int], set[str]] = {}

    def record(self, dataset: "TaskDataset", item: UnreadableImage) -> None:
        self.files.setdefault(item.path, item.reason)
        skipped = self._by_class.setdefault((id(dataset.split), item.label), set())
        skipped.add(item.path)
        if len(skipped) == dataset.class_size(item.label):
            raise DatasetError(
                f"every image of class folder {os.path.dirname(item.path)} is unreadable "
                f"({len(skipped)} files; e.g. {item.reason})"
            )

    def summary(self) -> dict[str, object]:
        """{"count": n, "files": {path: reason, ... first 20}} for the metrics."""
        shown = dict(sorted(self.files.items())[:MAX_LISTED_FILES])
        return {"count": len(self.files), "files": shown}

    def reset(self, files: dict[str, str] | None = None) -> None:
        self.files = dict(files or {})
        self._by_class = {}


def single_class_batches(labels: np.ndarray, batch_size: int) -> list[list[int]]:
    """Dataset positions class by class (ascending label, dataset order within a class), cut into batches
    of at most `batch_size` that never mix classes: PILOT's per-class feature loops, as one loader."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    labels = np.asarray(labels)
    batches = []
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label).tolist()
        batches += [positions[start: start + batch_size] for start in range(0, len(positions), batch_size)]
    return batches


class SkippingDataLoader(DataLoader):
    """A DataLoader yielding ``(images, labels)`` whose unreadable images are dropped and recorded.

    A batch with no readable image is not yielded at all. Needs a TaskDataset built with
    `skip_unreadable=True`; `skipped` is shared by the loaders of a learner.
    """

    def __init__(self, dataset: "TaskDataset", skipped: SkippedImages, **kwargs) -> None:
        super().__init__(dataset, collate_fn=collate_readable, **kwargs)
        self.skipped = skipped

    def __iter__(self):
        # DataLoader's iterator is made here, not lazily: it draws its seed at iter() time, as a plain one does.
        return self._readable_batches(super().__iter__())

    def _readable_batches(self, batches):
        for images, labels, unreadable in batches:
            for item in unreadable:
                self.skipped.record(self.dataset, item)
            if images is not None:
                yield images, labels


# Dataset name -> builder(cfg: DataConfig, image_size: int) -> BenchmarkData (without transforms);
# filled by the sibling modules. `image_size` matters to datasets generated in memory only.
DATASETS: Registry[Callable[[DataConfig, int], BenchmarkData]] = Registry("dataset")


def canonical_dataset(cfg: DataConfig) -> str:
    try:
        return DATASETS.canonical(cfg.dataset)
    except KeyError as error:
        raise DatasetError(f"data.dataset: {error.args[0]}") from None


def check_config_fits(cfg: DataConfig, data: BenchmarkData) -> None:
    """Fail early on settings that cannot work with this dataset's classes."""
    if cfg.first_task_size(data.n_classes) > data.n_classes:
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
