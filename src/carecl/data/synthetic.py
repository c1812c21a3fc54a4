"""Generated classes for tests and demos: fast, deterministic, and learnable by a tiny ViT.

Each class is a smooth random colour pattern (random low-resolution grid, upsampled);
each sample is its class pattern circularly shifted by a few pixels plus Gaussian noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, ImageSplit, require_positive

# A local Generator seed: the data never depends on (or moves) the global RNGs.
SYNTHETIC_SEED = 20240613
PATTERN_GRID = 4
NOISE_STD = 0.08
# Largest shift as a fraction of the side: small enough to keep classes apart.
MAX_SHIFT_FRACTION = 0.125


def class_patterns(rng: np.random.Generator, n_classes: int, image_size: int) -> np.ndarray:
    """(C, 3, S, S) smooth patterns in [0, 1], one per class."""
    grid = rng.random((n_classes, 3, PATTERN_GRID, PATTERN_GRID), dtype=np.float32)
    smooth = F.interpolate(torch.from_numpy(grid), size=(image_size, image_size), mode="bilinear", align_corners=False)
    return smooth.numpy()


def sample_images(rng: np.random.Generator, patterns: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` shifted, noisy copies of every pattern -> (N, 3, S, S) images, (N,) labels."""
    n_classes, _, size, _ = patterns.shape
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    max_shift = max(1, int(size * MAX_SHIFT_FRACTION))
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(labels), 2))
    # Gather rows/columns with per-sample offsets: a vectorised circular shift.
    rows = (np.arange(size)[None, :] + shifts[:, :1]) % size
    cols = (np.arange(size)[None, :] + shifts[:, 1:]) % size
    images = patterns[
        labels[:, None, None, None],
        np.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    images += rng.normal(0.0, NOISE_STD, size=images.shape).astype(np.float32)
    return np.clip(images, 0.0, 1.0, out=images), labels


@DATASETS.register("synthetic")
def build_synthetic(cfg: DataConfig, image_size: int) -> BenchmarkData:
    require_positive(cfg.synthetic_classes, "data.synthetic_classes")
    require_positive(cfg.synthetic_train_per_class, "data.synthetic_train_per_class")
    require_positive(cfg.synthetic_test_per_class, "data.synthetic_test_per_class")
    rng = np.random.default_rng(SYNTHETIC_SEED)
    patterns = class_patterns(rng, cfg.synthetic_classes, image_size)
    train_x, train_y = sample_images(rng, patterns, cfg.synthetic_train_per_class)
    test_x, test_y = sample_images(rng, patterns, cfg.synthetic_test_per_class)
    width = len(str(cfg.synthetic_classes - 1))
    return BenchmarkData(
        name="synthetic",
        class_names=[f"class{c:0{width}d}" for c in range(cfg.synthetic_classes)],
        train=ImageSplit(torch.from_numpy(train_x), train_y),
        test=ImageSplit(torch.from_numpy(test_x), test_y),
    )
