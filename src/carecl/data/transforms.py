"""Image transforms: each dataset's recipe, sized and normalised by one resolved `Preprocessing`.

- The published benchmarks keep the CaRE release's transforms (research-settings "Inputs"):
  224 px, their own normalisation (mean = std = 0.5, or none at all) and augmentation.
- `imagefolder` (a user's own images) follows the backbone's timm pretrained config: its input
  size, mean/std, interpolation and crop fraction.
- The in-memory toy datasets (digits, synthetic, glyphs) hold final tensors already.

Any `data.image_size`, `data.mean`/`data.std`, `data.interpolation`, `data.crop_pct` or
`data.augment` in the config overrides the recipe's default for that one setting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from carecl.config import DataConfig
from carecl.data.base import Transform
from carecl.registry import TRANSFORMS

INPUT_SIZE = 224
# The release resizes to 256 before its 224 centre crop.
RELEASE_CROP_PCT = INPUT_SIZE / 256
HALF = (0.5, 0.5, 0.5)
# CIFAR-100's channel statistics, as HiDe-Prompt's code normalises CIFAR whatever the backbone.
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
# Side of the generated / in-memory images when `data.image_size` is not set.
IN_MEMORY_SIZE = 32


class TransformPair(NamedTuple):
    train: Transform
    test: Transform


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input. mean/std None: pixels stay in [0, 1]."""

    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str = "bicubic"
    crop_pct: float = RELEASE_CROP_PCT
    # Training augmentation: crop_flip (random resized crop + horizontal flip), crop, flip or none.
    augment: str = "crop_flip"

    @property
    def resize_size(self) -> int:
        return int(round(self.image_size / self.crop_pct))


# Unknown backbones (or none given): ImageNet-21K ViT conventions.
DEFAULT_BACKBONE_PREPROCESSING = Preprocessing(INPUT_SIZE, HALF, HALF, "bicubic", 0.9)


def identity(image):
    """Deterministic no-op (a module-level function, so DataLoader workers can pickle it)."""
    return image


def _normalise(preprocessing: Preprocessing) -> list:
    if preprocessing.mean is None:
        return []
    return [T.Normalize(preprocessing.mean, preprocessing.std)]


def _to_tensor(preprocessing: Preprocessing) -> list:
    return [T.ToTensor(), *_normalise(preprocessing)]


def _resize_center_crop(preprocessing: Preprocessing) -> list:
    interpolation = INTERPOLATIONS[preprocessing.interpolation]
    return [T.Resize(preprocessing.resize_size, interpolation=interpolation), T.CenterCrop(preprocessing.image_size)]


def test_transform(preprocessing: Preprocessing) -> Transform:
    return T.Compose(_resize_center_crop(preprocessing) + _to_tensor(preprocessing))


# ---------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TransformRecipe:
    """A dataset's transforms: its default preprocessing (None: the backbone's) and how to build them."""

    build: Callable[[Preprocessing], TransformPair]
    defaults: Preprocessing | None

    def resolve(self, data: DataConfig, backbone: Preprocessing) -> Preprocessing:
        """The recipe's defaults (or the backbone's), with every setting the config names replaced."""
        base = self.defaults if self.defaults is not None else backbone
        overrides = {key: getattr(data, key) for key in ("image_size", "interpolation", "crop_pct", "augment")
                     if getattr(data, key) is not None}
        if data.mean is not None:
            overrides["mean"], overrides["std"] = tuple(data.mean), tuple(data.std)
        return replace(base, **overrides)

    def transforms(self, data: DataConfig, backbone: Preprocessing) -> TransformPair:
        preprocessing = self.resolve(data, backbone)
        pair = self.build(preprocessing)
        # augment: none trains on exactly what evaluation sees, whatever the recipe's augmentation.
        return TransformPair(pair.test, pair.test) if preprocessing.augment == "none" else pair


def release_cifar(p: Preprocessing) -> TransformPair:
    # Release quirk: RandomResizedCrop to the resize size, then a centre crop.
    train = [T.RandomResizedCrop(p.resize_size, interpolation=INTERPOLATIONS[p.interpolation]),
             T.CenterCrop(p.image_size), *_flip(p), T.ColorJitter(brightness=0.25)]
    return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))


def release_random_interpolation(color_jitter: bool) -> Callable[[Preprocessing], TransformPair]:
    """ImageNet-A (and VTAB with colour jitter): timm's crop with a random interpolation per image."""

    def build(p: Preprocessing) -> TransformPair:
        train = [RandomResizedCropAndInterpolation(p.image_size, interpolation="random"), *_flip(p)]
        if color_jitter:
            train.append(T.ColorJitter(brightness=0.25))
        return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))

    return build


def release_wide_crop(p: Preprocessing) -> TransformPair:
    """ImageNet-R / ObjectNet / OmniBenchmark(-1K) / CUB: crops down to 5 % of the image."""
    train = [T.RandomResizedCrop(p.image_size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)), *_flip(p)]
    return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))


def min_crop(scale_low: float, color_jitter: bool) -> Callable[[Preprocessing], TransformPair]:
    """MIN's transforms (MiN/data_process/data.py): a random resized crop to the resize size (scale from `scale_low`,
    bilinear), a centre crop, flip, brightness jitter 63/255 (not for Food-101)."""

    def build(p: Preprocessing) -> TransformPair:
        train = [T.RandomResizedCrop(p.resize_size, scale=(scale_low, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
                 T.CenterCrop(p.image_size), *_flip(p)]
        if color_jitter:
            train.append(T.ColorJitter(brightness=63 / 255))
        return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))

    return build


def coda_crop(p: Preprocessing) -> TransformPair:
    """LAMDA-PILOT's CODA-Prompt transforms: timm-default random resized crop + flip; the test resize
    (CIFAR: straight to 224, `crop_pct` 1; ImageNet-R: 256 then a 224 centre crop, `crop_pct` 0.875)."""
    interpolation = INTERPOLATIONS[p.interpolation]
    train = [T.RandomResizedCrop(p.image_size, interpolation=interpolation), *_flip(p)]
    return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))


def hide_cifar(p: Preprocessing) -> TransformPair:
    """HiDe-Prompt's / NoRGa's CIFAR transforms: timm-default random resized crop (bicubic), flip, brightness
    jitter 63/255, CIFAR's mean and std; test resize 256 and crop 224 (the recipe's defaults)."""
    train = [T.RandomResizedCrop(p.image_size, interpolation=INTERPOLATIONS[p.interpolation]), *_flip(p),
             T.ColorJitter(brightness=63 / 255)]
    return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))


def clip_crop(p: Preprocessing) -> TransformPair:
    """CLIP's fine-tuning transforms (open_clip / OpenAI `clip.load`): random resized crop over 90-100 % of the
    image (bicubic), no flip; test: resize and centre crop (the backbone's preprocessing, crop_pct 1)."""
    train = [T.RandomResizedCrop(p.image_size, scale=(0.9, 1.0), interpolation=INTERPOLATIONS[p.interpolation])]
    return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))


def clip_crop_at_test(p: Preprocessing) -> TransformPair:
    """MoE-Adapters4CL's CIL evaluation quirk: test images go through the training random crop too."""
    train = clip_crop(p).train
    return TransformPair(train, train)


def backbone_style(p: Preprocessing) -> TransformPair:
    """A user's images: random resized crop (timm's default scale) and flip for training, as `augment` says."""
    interpolation = INTERPOLATIONS[p.interpolation]
    if p.augment in ("crop_flip", "crop"):
        train = [T.RandomResizedCrop(p.image_size, scale=(0.08, 1.0), interpolation=interpolation), *_flip(p)]
    else:
        train = [*_resize_center_crop(p), *_flip(p)]
    return TransformPair(T.Compose(train + _to_tensor(p)), test_transform(p))


def _flip(p: Preprocessing) -> list:
    return [T.RandomHorizontalFlip()] if p.augment in ("crop_flip", "flip") else []


class TensorNormalise:
    """In-memory tensors in [0, 1]: normalised when mean/std are set, else passed through."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def in_memory(p: Preprocessing) -> TransformPair:
    transform = identity if p.mean is None else TensorNormalise(p.mean, p.std)
    return TransformPair(transform, transform)


def _release(build: Callable[[Preprocessing], TransformPair], normalised: bool) -> TransformRecipe:
    mean = HALF if normalised else None
    return TransformRecipe(build, Preprocessing(INPUT_SIZE, mean, mean, "bicubic", RELEASE_CROP_PCT))


# Named recipes, selectable with `data.transforms` (the release's are LAMDA-PILOT's).
for _name, _recipe in {
    "pilot_cifar": _release(release_cifar, normalised=True),
    "pilot_random_interpolation": _release(release_random_interpolation(color_jitter=False), normalised=True),
    "pilot_random_interpolation_jitter": _release(release_random_interpolation(color_jitter=True), normalised=True),
    "pilot_wide_crop": _release(release_wide_crop, normalised=False),
    "min_crop": _release(min_crop(0.08, color_jitter=True), normalised=True),
    "min_crop_no_jitter": _release(min_crop(0.08, color_jitter=False), normalised=True),
    "min_wide_crop": _release(min_crop(0.05, color_jitter=True), normalised=True),
    "pilot_coda": TransformRecipe(coda_crop, Preprocessing(INPUT_SIZE, None, None, "bilinear", 1.0)),
    "hide_cifar": TransformRecipe(hide_cifar, Preprocessing(INPUT_SIZE, CIFAR_MEAN, CIFAR_STD, "bicubic", RELEASE_CROP_PCT)),
    "backbone": TransformRecipe(backbone_style, None),
    "clip": TransformRecipe(clip_crop, None),
    "clip_crop_at_test": TransformRecipe(clip_crop_at_test, None),
    "in_memory": TransformRecipe(in_memory, Preprocessing(IN_MEMORY_SIZE, None, None)),
}.items():
    TRANSFORMS.register(_name)(_recipe)

# Canonical dataset name -> the recipe it uses unless `data.transforms` names another; every registered
# dataset has one (a test checks). The published benchmarks: the CaRE release's choices.
DATASET_RECIPES: dict[str, str] = {
    "cifar100": "pilot_cifar",
    "imagenet-a": "pilot_random_interpolation",
    "vtab": "pilot_random_interpolation_jitter",
    "imagenet-r": "pilot_wide_crop",
    "objectnet": "pilot_wide_crop",
    "omnibenchmark": "pilot_wide_crop",
    "omnibenchmark1k": "pilot_wide_crop",
    "cub": "pilot_wide_crop",
    "food101": "pilot_wide_crop",
    "five_datasets": "pilot_wide_crop",
    "imagefolder": "backbone",
    "domains": "backbone",
    "mtil": "clip",
    "tinyimagenet": "backbone",
    "digits": "in_memory",
    "synthetic": "in_memory",
    "glyphs": "in_memory",
}


def recipe_for(dataset: str, data: DataConfig | None = None) -> TransformRecipe:
    """`data.transforms` when set, else the dataset's own recipe."""
    name = data.transforms if data is not None and data.transforms is not None else DATASET_RECIPES.get(dataset)
    if name is None:
        raise KeyError(f"no transforms defined for dataset {dataset!r} (known: {', '.join(sorted(DATASET_RECIPES))})")
    return TRANSFORMS.get(name)


def resolve_preprocessing(dataset: str, data: DataConfig, backbone: Preprocessing = DEFAULT_BACKBONE_PREPROCESSING
                          ) -> Preprocessing:
    """The preprocessing a canonical dataset name uses under `data` (and the backbone's defaults)."""
    return recipe_for(dataset, data).resolve(data, backbone)


def transforms_for(dataset: str, data: DataConfig | None = None,
                   backbone: Preprocessing = DEFAULT_BACKBONE_PREPROCESSING) -> TransformPair:
    """The (train, test) transforms of a canonical dataset name (its defaults when `data` is None)."""
    return recipe_for(dataset, data).transforms(data if data is not None else DataConfig(dataset=dataset), backbone)
