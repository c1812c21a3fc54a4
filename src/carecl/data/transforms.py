"""Per-benchmark image transforms, as the CaRE release uses them (research-settings "Inputs").

Benchmark transforms take a PIL image and return a (3, 224, 224) float tensor; the
in-memory toy datasets (digits, synthetic) already hold final tensors and use `identity`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from carecl.data.base import Transform

INPUT_SIZE = 224
RESIZE_SIZE = 256
HALF = (0.5, 0.5, 0.5)


class TransformPair(NamedTuple):
    train: Transform
    test: Transform


def identity(image):
    """Deterministic no-op (a module-level function, so DataLoader workers can pickle it)."""
    return image


def _resize_center_crop() -> list:
    return [
        T.Resize(RESIZE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(INPUT_SIZE),
    ]


def _to_tensor(normalise: bool) -> list:
    return [T.ToTensor(), T.Normalize(HALF, HALF)] if normalise else [T.ToTensor()]


def cifar_transforms() -> TransformPair:
    train = [
        T.RandomResizedCrop(RESIZE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(INPUT_SIZE),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.25),
    ]
    return TransformPair(
        T.Compose(train + _to_tensor(True)),
        T.Compose(_resize_center_crop() + _to_tensor(True)),
    )


def _random_interpolation_transforms(color_jitter: bool) -> TransformPair:
    train = [
        RandomResizedCropAndInterpolation(INPUT_SIZE, interpolation="random"),
        T.RandomHorizontalFlip(),
    ]
    if color_jitter:
        train.append(T.ColorJitter(brightness=0.25))
    return TransformPair(
        T.Compose(train + _to_tensor(True)),
        T.Compose(_resize_center_crop() + _to_tensor(True)),
    )


def imagenet_a_transforms() -> TransformPair:
    return _random_interpolation_transforms(color_jitter=False)


def vtab_transforms() -> TransformPair:
    return _random_interpolation_transforms(color_jitter=True)


def unnormalised_transforms() -> TransformPair:
    """ImageNet-R / ObjectNet / OmniBenchmark(-1K) / CUB: pixels stay in [0, 1]."""
    train = [
        T.RandomResizedCrop(INPUT_SIZE, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
        T.RandomHorizontalFlip(),
    ]
    return TransformPair(
        T.Compose(train + _to_tensor(False)),
        T.Compose(_resize_center_crop() + _to_tensor(False)),
    )


def identity_transforms() -> TransformPair:
    return TransformPair(identity, identity)


# Canonical dataset name -> builder of its (train, test) transforms.
TRANSFORMS_BY_DATASET: dict[str, Callable[[], TransformPair]] = {
    "cifar100": cifar_transforms,
    "imagenet-a": imagenet_a_transforms,
    "vtab": vtab_transforms,
    "imagenet-r": unnormalised_transforms,
    "objectnet": unnormalised_transforms,
    "omnibenchmark": unnormalised_transforms,
    "omnibenchmark1k": unnormalised_transforms,
    "cub": unnormalised_transforms,
    "digits": identity_transforms,
    "synthetic": identity_transforms,
    "glyphs": identity_transforms,
}


def transforms_for(dataset: str) -> TransformPair:
    """The (train, test) transforms of a canonical dataset name."""
    try:
        return TRANSFORMS_BY_DATASET[dataset]()
    except KeyError:
        known = ", ".join(sorted(TRANSFORMS_BY_DATASET))
        raise KeyError(f"no transforms defined for dataset {dataset!r} (known: {known})") from None
