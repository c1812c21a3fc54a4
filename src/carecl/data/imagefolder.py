"""ImageFolder benchmarks: `<root>/<name>/{train,test}/<class>/<image>`, classes numbered by sorted name.

The whole tree is scanned (with os.scandir, fast enough for OmniBenchmark-1K's 188k files)
and checked when the dataset is built, so a broken layout fails before any training.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit
from carecl.data.transforms import transforms_for

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

# Problem folders named in one error message (the count is always complete).
MAX_LISTED_FOLDERS = 10

# Canonical name (also the folder name under root) -> aliases used by the release configs.
IMAGE_FOLDER_BENCHMARKS: dict[str, tuple[str, ...]] = {
    "imagenet-r": ("imagenetr",),
    "imagenet-a": ("imageneta",),
    "objectnet": (),
    "omnibenchmark": (),
    "omnibenchmark1k": (),
    "vtab": (),
    "cub": (),
}


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_class_folders(split_dir: Path) -> dict[str, str]:
    """Class name -> folder path for every visible sub-folder of a split folder."""
    with os.scandir(split_dir) as entries:
        return {e.name: e.path for e in entries if not e.name.startswith(".") and e.is_dir()}


def list_images(class_dir: str) -> list[str]:
    """Sorted image paths directly inside one class folder (sorted, so runs are reproducible)."""
    with os.scandir(class_dir) as entries:
        return sorted(e.path for e in entries if is_image_file(e.name) and e.is_file())


def resolve_dataset_dir(root: str | None, folder_name: str) -> Path:
    """`root/<folder_name>`, or `root` itself when it already holds train/ and test/."""
    if not root:
        raise DatasetError(f"data.root must be set for dataset {folder_name!r} (expects <root>/{folder_name}/train)")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"data.root {root_path} does not exist or is not a folder")
    dataset_dir = root_path / folder_name
    if dataset_dir.is_dir():
        return dataset_dir
    if (root_path / "train").is_dir() and (root_path / "test").is_dir():
        return root_path
    raise DatasetError(f"dataset folder {dataset_dir} not found (expected {dataset_dir}/train and {dataset_dir}/test)")


def split_class_folders(dataset_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Class folders of train/ and test/, which must name exactly the same classes."""
    folders = []
    for split in ("train", "test"):
        split_dir = dataset_dir / split
        if not split_dir.is_dir():
            raise DatasetError(f"missing split folder {split_dir}")
        classes = list_class_folders(split_dir)
        if not classes:
            raise DatasetError(f"split folder {split_dir} has no class folders")
        folders.append(classes)
    train, test = folders
    only_train, only_test = sorted(train.keys() - test.keys()), sorted(test.keys() - train.keys())
    if only_train or only_test:
        problems = []
        if only_train:
            problems.append(f"only in {dataset_dir / 'train'}: {', '.join(only_train)}")
        if only_test:
            problems.append(f"only in {dataset_dir / 'test'}: {', '.join(only_test)}")
        raise DatasetError(f"train and test class folders differ under {dataset_dir}: {'; '.join(problems)}")
    return train, test


def scan_split(class_folders: dict[str, str], class_names: list[str]) -> tuple[ImageSplit, list[str]]:
    """Every class folder's images, and the class folders that hold none."""
    paths: list[str] = []
    targets: list[np.ndarray] = []
    empty: list[str] = []
    for class_id, name in enumerate(class_names):
        images = list_images(class_folders[name])
        if not images:
            empty.append(class_folders[name])
        paths.extend(images)
        targets.append(np.full(len(images), class_id, dtype=np.int64))
    return ImageSplit(samples=paths, targets=np.concatenate(targets)), empty


def load_image_folder(dataset_dir: Path, name: str) -> BenchmarkData:
    """Scan and check one ImageFolder benchmark; transforms are those of `name`."""
    train_folders, test_folders = split_class_folders(dataset_dir)
    class_names = sorted(train_folders)
    train, empty_train = scan_split(train_folders, class_names)
    test, empty_test = scan_split(test_folders, class_names)
    empty = empty_train + empty_test
    if empty:
        more = f" and {len(empty) - MAX_LISTED_FOLDERS} more" if len(empty) > MAX_LISTED_FOLDERS else ""
        raise DatasetError(f"{len(empty)} class folder(s) contain no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                           f"{', '.join(empty[:MAX_LISTED_FOLDERS])}{more}")
    transforms = transforms_for(name)
    return BenchmarkData(
        name=name,
        class_names=class_names,
        train=train,
        test=test,
        train_transform=transforms.train,
        test_transform=transforms.test,
    )


def build_image_folder_benchmark(cfg: DataConfig, folder_name: str) -> BenchmarkData:
    return load_image_folder(resolve_dataset_dir(cfg.root, folder_name), folder_name)


for _name, _aliases in IMAGE_FOLDER_BENCHMARKS.items():
    DATASETS.register(_name, *_aliases)(partial(build_image_folder_benchmark, folder_name=_name))
