"""Generated stroke glyphs: the image family the demo's shipped tiny ViT was pre-trained on.

Each class is a random glyph of three strokes; samples jitter it (rotation, scale, shift,
noise). Classes drawn with `GLYPHS_SEED` differ from the pre-training ones (seed 0), so a
frozen glyph backbone sees new classes of a familiar domain: the situation CaRE is built for.
"""

from __future__ import annotations

import numpy as np
import torch

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, ImageSplit, require_positive

GLYPHS_SEED = 7
STROKES_PER_GLYPH = 3


def random_strokes(rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """(C, strokes, 2 end points, xy) in the unit square, away from the border."""
    return rng.uniform(0.15, 0.85, (n_classes, STROKES_PER_GLYPH, 2, 2))


def render_glyphs(rng: np.random.Generator, strokes: np.ndarray, per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Render every class's strokes with random affine jitter and noise: (N, 3, size, size), (N,)."""
    n_classes = len(strokes)
    labels = np.repeat(np.arange(n_classes), per_class)
    points = strokes[labels]  # (N, S, 2, 2)
    angle = rng.uniform(-0.3, 0.3, len(labels))
    scale = rng.uniform(0.8, 1.15, len(labels))
    shift = rng.uniform(-0.12, 0.12, (len(labels), 2))
    rotation = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], 1).reshape(-1, 1, 1, 2, 2)
    points = (rotation @ (points[..., None] - 0.5))[..., 0] * scale[:, None, None, None] + 0.5 + shift[:, None, None, :]
    grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="xy"), -1) + 0.5) / size  # (H, W, 2)
    a, b = points[:, :, None, None, 0, :], points[:, :, None, None, 1, :]  # (N, S, 1, 1, 2)
    ab = b - a
    t = np.clip(((grid - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, 1)
    distance = np.linalg.norm(grid - (a + t[..., None] * ab), axis=-1)  # (N, S, H, W)
    ink = np.clip(1.5 - distance.min(1) * size, 0, 1)
    images = ink + rng.normal(0, 0.05, ink.shape)
    images = np.repeat(np.clip(images, 0, 1)[:, None], 3, axis=1).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(labels)


@DATASETS.register("glyphs")
def build_glyphs(cfg: DataConfig, image_size: int) -> BenchmarkData:
    for key in ("synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class"):
        require_positive(getattr(cfg, key), f"data.{key}")
    rng = np.random.default_rng(GLYPHS_SEED)
    strokes = random_strokes(rng, cfg.synthetic_classes)
    train_x, train_y = render_glyphs(rng, strokes, cfg.synthetic_train_per_class, image_size)
    test_x, test_y = render_glyphs(rng, strokes, cfg.synthetic_test_per_class, image_size)
    width = len(str(cfg.synthetic_classes - 1))
    return BenchmarkData(
        name="glyphs",
        class_names=[f"glyph{c:0{width}d}" for c in range(cfg.synthetic_classes)],
        train=ImageSplit(train_x, train_y.numpy()),
        test=ImageSplit(test_x, test_y.numpy()),
    )
