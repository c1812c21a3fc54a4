"""CIFAR-100 from the standard python-pickle archive (`<root>/cifar-100-python`), never downloaded.

Pixels stay in memory as uint8 `(N, 32, 32, 3)` arrays (184 MB; float32 would be 4x that);
TaskDataset turns one into a PIL image per item, so the PIL transforms apply unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR100

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit


def read_cifar100_split(root: Path, train: bool) -> tuple[ImageSplit, list[str]]:
    try:
        dataset = CIFAR100(str(root), train=train, download=False)
    except RuntimeError as error:
        archive = root / CIFAR100.base_folder
        raise DatasetError(f"CIFAR-100 archive at {archive} is incomplete or corrupted: {error}") from None
    pixels = np.ascontiguousarray(dataset.data, dtype=np.uint8)
    return ImageSplit(samples=pixels, targets=np.asarray(dataset.targets)), list(dataset.classes)


@DATASETS.register("cifar100", "cifar224")
def build_cifar100(cfg: DataConfig, image_size: int) -> BenchmarkData:
    """`image_size` is the transforms' business: the archive holds 32x32 pixels."""
    if not cfg.root:
        raise DatasetError(f"data.root must be set for cifar100 (the folder holding {CIFAR100.base_folder}/)")
    root = Path(cfg.root).expanduser()
    # Accept the extracted folder itself as well as its parent.
    if root.name == CIFAR100.base_folder:
        root = root.parent
    archive = root / CIFAR100.base_folder
    if not archive.is_dir():
        raise DatasetError(f"CIFAR-100 archive not found: expected the extracted folder {archive} (train, test, meta)")
    train, class_names = read_cifar100_split(root, train=True)
    test, _ = read_cifar100_split(root, train=False)
    return BenchmarkData(
        name="cifar100",
        class_names=class_names,
        train=train,
        test=test,
    )
