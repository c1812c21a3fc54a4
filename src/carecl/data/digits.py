"""scikit-learn's 8x8 handwritten digits (ships with the package): a real 10-class set, no download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, ImageSplit

TEST_FRACTION = 0.3
# A fixed seed local to the split, so the split never depends on (or moves) the global RNG.
SPLIT_SEED = 0
MAX_PIXEL = 16.0


def digits_to_images(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, 8, 8) values in [0, 16] -> (N, 3, image_size, image_size) float32 in [0, 1]."""
    images = torch.from_numpy(pixels.astype(np.float32) / MAX_PIXEL).unsqueeze(1)
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


@DATASETS.register("digits")
def build_digits(cfg: DataConfig, image_size: int) -> BenchmarkData:
    # Imported here: scikit-learn takes ~1 s to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    return BenchmarkData(
        name="digits",
        class_names=[str(c) for c in range(10)],
        train=ImageSplit(digits_to_images(train_x, image_size), train_y),
        test=ImageSplit(digits_to_images(test_x, image_size), test_y),
    )
