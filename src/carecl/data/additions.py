"""Classes learned after the stream (`data.additions`, written by `carecl learn`): each addition is an image folder
whose classes get the ids after the dataset's (and after earlier additions'), in the order the addition records.

An addition's folder is `DIR/train/<class>/` with an optional `DIR/test/<class>/`, or `DIR/<class>/` whose images
are split by `test_fraction` (a fixed split, as `imagefolder` does) or, without it, all used for training. A class
the run already knows is refused: a class-incremental learner cannot relearn a class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from carecl.config import AdditionConfig
from carecl.data.base import BenchmarkData, DatasetError, ImageSplit
from carecl.data.imagefolder import (MAX_LISTED_FOLDERS, held_out_split, list_class_folders, list_images,
                                     refuse_empty, refuse_loose_images)
from carecl.scenario import addition_task_sizes


@dataclass(frozen=True)
class AdditionImages:
    """One addition's images by class name, and whether it has test images."""

    train: dict[str, list[str]]
    test: dict[str, list[str]]

    @property
    def class_names(self) -> list[str]:
        return sorted(self.train)


def scan_addition(root: str | Path, test_fraction: float | None = None) -> AdditionImages:
    """The classes and images of an addition's folder (every layout check as for `imagefolder`)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist or is not a folder")
    if (root / "train").is_dir():
        if test_fraction is not None:
            raise DatasetError(f"--test-fraction is given but {root} already has a train/ folder (and test/ for "
                               "testing); drop --test-fraction")
        train = class_images(root / "train")
        test = class_images(root / "test") if (root / "test").is_dir() else {}
        if test and set(test) != set(train):
            only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
            raise DatasetError(f"train and test class folders differ under {root}: only in train/: {only_train}; "
                               f"only in test/: {only_test}")
        return AdditionImages(train, test)
    images = class_images(root)
    if test_fraction is None:
        return AdditionImages(images, {})
    small = [name for name, paths in images.items() if len(paths) < 2]
    if small:
        raise DatasetError(f"class folder(s) with a single image cannot be split into train and test: "
                           f"{', '.join(str(root / name) for name in small[:MAX_LISTED_FOLDERS])}")
    splits = {name: held_out_split(paths, test_fraction) for name, paths in images.items()}
    return AdditionImages({n: s[0] for n, s in splits.items()}, {n: s[1] for n, s in splits.items()})


def class_images(folder: Path) -> dict[str, list[str]]:
    refuse_loose_images(folder)
    folders = list_class_folders(folder)
    if not folders:
        raise DatasetError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
    images = {name: list_images(path) for name, path in sorted(folders.items())}
    refuse_empty([folders[name] for name, paths in images.items() if not paths])
    return images


def refuse_known_classes(new: list[str], known: list[str], root: str) -> None:
    """A class the run already learned cannot be learned again (its head and statistics exist; images of it
    belong to it already): name every one."""
    again = sorted(set(new) & set(known))
    if again:
        raise DatasetError(f"{root}: the run already knows class(es) {', '.join(map(repr, again))}; a class-incremental "
                           "learner learns each class once and cannot relearn it: leave those folders out, or rename "
                           "them if they are other classes")


def as_list(samples) -> list:
    """A split's samples as a list that image files can join (file paths, or in-memory uint8 images)."""
    if isinstance(samples, list):
        return list(samples)
    if isinstance(samples, torch.Tensor):
        raise DatasetError("this run's dataset holds ready-made tensors (digits, synthetic, glyphs), which image files "
                           "cannot join: learning new classes later needs a run on image files (e.g. imagefolder)")
    return list(np.asarray(samples))


def append_additions(data: BenchmarkData, additions: list[AdditionConfig]) -> BenchmarkData:
    """`data` with every addition's classes appended (ids after the dataset's), and their task sizes recorded."""
    sizes: list[int] = []
    for addition in additions:
        images = scan_addition(addition.root, addition.test_fraction)
        order = list(addition.classes) if addition.classes is not None else images.class_names
        if sorted(order) != images.class_names:
            raise DatasetError(f"{addition.root}: its class folders {images.class_names} are not the classes the run "
                               f"recorded for it ({order})")
        refuse_known_classes(order, data.class_names, addition.root)
        data = append_classes(data, order, images)
        sizes.extend(addition_task_sizes(len(order), addition.increment))
    return replace(data, appended_sizes=sizes)


def append_classes(data: BenchmarkData, order: list[str], images: AdditionImages) -> BenchmarkData:
    offset = len(data.class_names)
    splits = {}
    for split, by_class in (("train", images.train), ("test", images.test)):
        existing: ImageSplit = getattr(data, split)
        samples, targets = as_list(existing.samples), [existing.targets]
        for position, name in enumerate(order):
            paths = by_class.get(name, [])
            samples.extend(paths)
            targets.append(np.full(len(paths), offset + position, dtype=np.int64))
        splits[split] = ImageSplit(samples, np.concatenate(targets))
    return replace(data, class_names=[*data.class_names, *order], **splits)
