"""Datasets: a name registry of benchmark builders, their transforms, and the per-task view.

    data = build_dataset(cfg.data)              # scans/loads and validates up front
    task = data.task_dataset("train", label_map, low, high)
"""

from carecl.data.base import (
    DATASETS,
    BenchmarkData,
    DatasetError,
    ImageSplit,
    TaskDataset,
    build_dataset,
    load_rgb_image,
)

# Imported for their side effect: each registers its datasets in DATASETS.
from carecl.data import cifar, digits, glyphs, imagefolder, synthetic  # noqa: E402,F401  isort: skip
from carecl.data.transforms import TRANSFORMS_BY_DATASET, TransformPair, transforms_for  # noqa: E402

__all__ = [
    "DATASETS",
    "BenchmarkData",
    "DatasetError",
    "ImageSplit",
    "TaskDataset",
    "TRANSFORMS_BY_DATASET",
    "TransformPair",
    "build_dataset",
    "load_rgb_image",
    "transforms_for",
]
