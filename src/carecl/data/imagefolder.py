"""Image folders: the published benchmarks (`<root>/<name>/{train,test}/<class>/...`) and `imagefolder`,
a user's own tree (`<root>/{train,test}/<class>/...`, or `<root>/<class>/...` split by `data.test_fraction`).

Classes are numbered by sorted folder name; a class folder's images may sit in sub-folders (as
torchvision's ImageFolder reads them). The whole tree is scanned (os.scandir, fast enough for
OmniBenchmark-1K's 188k files) and checked when the dataset is built, so a broken layout fails
before any training, listing every folder or file at fault.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit

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
    "food101": ("ifood101",),
}


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_class_folders(split_dir: Path) -> dict[str, str]:
    """Class name -> folder path for every visible sub-folder of a split folder."""
    try:
        with os.scandir(split_dir) as entries:
            return {e.name: e.path for e in entries if not e.name.startswith(".") and e.is_dir()}
    except OSError as error:
        raise DatasetError(f"cannot read the folder {split_dir}: {error.strerror or error}") from None


def list_images(class_dir: str) -> list[str]:
    """Sorted image paths inside one class folder and its visible sub-folders (sorted: runs are reproducible).
    A folder that cannot be read, or a symbolic link back to a folder above it (a loop), is a DatasetError."""
    found: list[str] = []
    walk_images(class_dir, found, set())
    return sorted(found)


def walk_images(folder: str, found: list[str], above: set[tuple[int, int]]) -> None:
    try:
        identity = os.stat(folder)
        key = (identity.st_dev, identity.st_ino)
        if key in above:
            raise DatasetError(f"{folder} is a symbolic link back to a folder that contains it (a loop): remove it")
        above = above | {key}
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    walk_images(entry.path, found, above)
                elif is_image_file(entry.name) and entry.is_file():
                    found.append(entry.path)
    except OSError as error:
        raise DatasetError(f"cannot read the image folder {folder}: {error.strerror or error}") from None


def loose_images(folder: Path) -> list[str]:
    """Image files directly inside a folder that should hold only class folders."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries if is_image_file(e.name) and e.is_file())
    except OSError as error:
        raise DatasetError(f"cannot read the folder {folder}: {error.strerror or error}") from None


def refuse_loose_images(folder: Path) -> None:
    loose = loose_images(folder)
    if loose:
        more = f" and {len(loose) - MAX_LISTED_FOLDERS} more" if len(loose) > MAX_LISTED_FOLDERS else ""
        raise DatasetError(f"{len(loose)} image file(s) in {folder} belong to no class (move each into a class "
                           f"folder {folder}/<class>/): {', '.join(loose[:MAX_LISTED_FOLDERS])}{more}")


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
        refuse_loose_images(split_dir)
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


def refuse_empty(empty: list[str]) -> None:
    if empty:
        more = f" and {len(empty) - MAX_LISTED_FOLDERS} more" if len(empty) > MAX_LISTED_FOLDERS else ""
        raise DatasetError(f"{len(empty)} class folder(s) contain no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                           f"{', '.join(empty[:MAX_LISTED_FOLDERS])}{more}")


def load_image_folder(dataset_dir: Path, name: str) -> BenchmarkData:
    """Scan and check a `train/` + `test/` tree of class folders."""
    train_folders, test_folders = split_class_folders(dataset_dir)
    class_names = sorted(train_folders)
    train, empty_train = scan_split(train_folders, class_names)
    test, empty_test = scan_split(test_folders, class_names)
    refuse_empty(empty_train + empty_test)
    return BenchmarkData(name=name, class_names=class_names, train=train, test=test)


def build_image_folder_benchmark(cfg: DataConfig, image_size: int, folder_name: str) -> BenchmarkData:
    return load_image_folder(resolve_dataset_dir(cfg.root, folder_name), folder_name)



# ---------------------------------------------------------------- a user's own images

# The held-out split of a single folder never depends on the run's seed: every run tests on the same images.
SPLIT_SEED = 0


def held_out_split(paths: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """(train, test) paths of one class: a fixed shuffle of the sorted list, at least one image on each side."""
    order = np.random.RandomState(SPLIT_SEED).permutation(len(paths))
    n_test = min(max(1, int(round(test_fraction * len(paths)))), len(paths) - 1)
    test = sorted(paths[i] for i in order[:n_test])
    train = sorted(paths[i] for i in order[n_test:])
    return train, test


def load_single_folder(root: Path, test_fraction: float) -> BenchmarkData:
    """`root/<class>/...` with each class's images split `test_fraction` held out for testing."""
    refuse_loose_images(root)
    folders = list_class_folders(root)
    if not folders:
        raise DatasetError(f"data.root {root} holds no class folders (expected {root}/<class>/<image>)")
    class_names = sorted(folders)
    splits: dict[str, list] = {"train": [], "test": []}
    targets: dict[str, list] = {"train": [], "test": []}
    empty, too_small = [], []
    for class_id, name in enumerate(class_names):
        images = list_images(folders[name])
        if len(images) < 2:
            (empty if not images else too_small).append(folders[name])
            continue
        for split, paths in zip(("train", "test"), held_out_split(images, test_fraction)):
            splits[split].extend(paths)
            targets[split].extend([class_id] * len(paths))
    refuse_empty(empty)
    if too_small:
        raise DatasetError(f"{len(too_small)} class folder(s) hold a single image, too few to split into train and "
                           f"test: {', '.join(too_small[:MAX_LISTED_FOLDERS])}")
    train, test = (ImageSplit(samples=splits[s], targets=np.asarray(targets[s], dtype=np.int64)) for s in ("train", "test"))
    return BenchmarkData(name="imagefolder", class_names=class_names, train=train, test=test)


@DATASETS.register("imagefolder", "image_folder")
def build_user_image_folder(cfg: DataConfig, image_size: int) -> BenchmarkData:
    """A user's own images: `root/train` + `root/test`, or one folder of classes with `data.test_fraction`."""
    if not cfg.root:
        raise DatasetError("data.root must be set for dataset 'imagefolder' (DIR/train/<class>/ and DIR/test/<class>/, "
                           "or DIR/<class>/ with data.test_fraction)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root {root} does not exist or is not a folder")
    has_splits = (root / "train").is_dir() or (root / "test").is_dir()
    if has_splits:
        if cfg.test_fraction is not None:
            raise DatasetError(f"data.test_fraction is set but {root} already has train/ and test/ folders; "
                               "remove data.test_fraction to use them")
        return load_image_folder(root, "imagefolder")
    if cfg.test_fraction is None:
        raise DatasetError(f"{root} has no train/ and test/ folders: either create {root}/train/<class>/ and "
                           f"{root}/test/<class>/, or set data.test_fraction (e.g. 0.2) to hold out part of each "
                           f"class folder {root}/<class>/ for testing")
    return load_single_folder(root, cfg.test_fraction)


for _name, _aliases in IMAGE_FOLDER_BENCHMARKS.items():
    DATASETS.register(_name, *_aliases)(partial(build_image_folder_benchmark, folder_name=_name))
