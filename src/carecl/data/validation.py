"""A validation split held out of the training images, so that settings can be chosen without the test set.

Per class, a fixed fraction of the training images (at least one, and never all of them) is moved to a
validation split; which images is decided by the seed alone (a private NumPy stream), so a run and its
resume, or two trials of a tune with the same seed, hold out the same images. The test split is untouched.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from carecl.data.base import BenchmarkData, DatasetError, ImageSplit


def take(split: ImageSplit, indices: np.ndarray) -> ImageSplit:
    """The samples of `split` at `indices` (file lists, arrays and tensors alike)."""
    samples = split.samples
    if isinstance(samples, list):
        chosen = [samples[i] for i in indices.tolist()]
    else:
        chosen = samples[indices]
    return ImageSplit(chosen, split.targets[indices])


def validation_indices(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the held-out images: per class (in class-id order), round(fraction x n) of its n images,
    at least 1 and at most n - 1, drawn by a RandomState seeded with `seed`."""
    stream = np.random.RandomState(seed)
    held = []
    for class_id in np.unique(targets):
        members = np.flatnonzero(targets == class_id)
        if len(members) < 2:
            raise DatasetError(f"data.validation_fraction: class {int(class_id)} has {len(members)} training image; "
                               "holding one out for validation needs at least 2")
        count = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        held.append(np.sort(stream.permutation(members)[:count]))
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def hold_out_validation(data: BenchmarkData, fraction: float, seed: int) -> BenchmarkData:
    """`data` with a validation split taken out of its training images (see the module docstring)."""
    held = validation_indices(data.train.targets, fraction, seed)
    kept = np.setdiff1d(np.arange(len(data.train)), held)
    return replace(data, train=take(data.train, kept), validation=take(data.train, held))


def evaluate_on_validation(data: BenchmarkData) -> BenchmarkData:
    """`data` whose evaluation split is its validation split: the test split is dropped, never to be read."""
    if data.validation is None:
        raise DatasetError("evaluating on the validation split needs data.validation_fraction")
    return replace(data, test=data.validation, validation=None, evaluated_split="validation")
