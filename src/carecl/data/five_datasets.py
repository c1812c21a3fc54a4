"""5-datasets (SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST), the multi-dataset benchmark of HiDe-Prompt and
NoRGa: each member is one task of its 10 classes, class ids offset by the member's position in the order.

Read from local archives under `data.root`, never downloaded:
- MNIST / Fashion-MNIST: `MNIST/raw/` and `FashionMNIST/raw/` idx files (plain or .gz), torchvision's layout;
- CIFAR-10: `cifar-10-batches-py/` (the python pickles);
- SVHN: `train_32x32.mat` and `test_32x32.mat` (label 10 is the digit 0);
- notMNIST: `notMNIST/Train|Test/<A..J>/*.png`, or the `notMNIST.zip` holding that tree (read in place).

`data.dataset_order` names the members' order (default: their list, SVHN first); NoRGa shuffles it with
Python's `random` right after seeding, e.g. seed 42 gives notmnist, mnist, cifar10, fashion_mnist, svhn.
Images keep their own sizes (28 or 32 px, gray or colour) until the transforms make them RGB at 224.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit

Member = tuple[list[np.ndarray], np.ndarray, list[str]]  # images, labels 0-9, class names
DIGITS = [str(d) for d in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            data = candidate.read_bytes()
            return gzip.decompress(data) if candidate.suffix == ".gz" else data
    raise DatasetError(f"5-datasets: missing {path} (or {path.name}.gz)")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format): magic, dimension sizes, then uint8 values."""
    data = _open_maybe_gz(path)
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def mnist_like(folder: str, class_names: list[str]) -> Callable[[Path, bool], Member]:
    def read(root: Path, train: bool) -> Member:
        prefix = "train" if train else "t10k"
        raw = root / folder / "raw"
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte").astype(np.int64)
        return list(images), labels, class_names
    return read


def read_cifar10(root: Path, train: bool) -> Member:
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"5-datasets: missing {path}")
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch["labels"])
    meta = folder / "batches.meta"
    class_names = pickle.loads(meta.read_bytes(), encoding="latin1")["label_names"] if meta.is_file() else DIGITS
    return list(np.concatenate(images)), np.asarray(labels, dtype=np.int64), list(class_names)


def read_svhn(root: Path, train: bool) -> Member:
    from scipy.io import loadmat

    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        raise DatasetError(f"5-datasets: missing {path}")
    mat = loadmat(str(path))
    labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN writes the digit 0 as 10
    return list(np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))), labels, DIGITS


def read_notmnist(root: Path, train: bool) -> Member:
    split = "Train" if train else "Test"
    folder, archive = root / "notMNIST" / split, root / "notMNIST.zip"
    files: list[tuple[str, bytes]] = []
    if folder.is_dir():
        files = [(path.parent.name, path.read_bytes()) for path in sorted(folder.glob("*/*")) if path.is_file()]
    elif archive.is_file():
        with zipfile.ZipFile(archive) as bundle:
            files = [(Path(name).parent.name, bundle.read(name)) for name in sorted(bundle.namelist())
                     if name.startswith(f"notMNIST/{split}/") and not name.endswith("/")]
    else:
        raise DatasetError(f"5-datasets: notMNIST not found: expected {folder} or {archive}")
    images, labels = [], []
    for letter, content in files:
        try:
            images.append(np.asarray(Image.open(io.BytesIO(content)).convert("RGB")))
        except OSError:
            continue  # their loader skips the archive's few broken files too
        labels.append(ord(letter) - ord("A"))
    return images, np.asarray(labels, dtype=np.int64), [chr(ord("A") + i) for i in range(10)]


MEMBERS: dict[str, Callable[[Path, bool], Member]] = {
    "svhn": read_svhn,
    "mnist": mnist_like("MNIST", DIGITS),
    "cifar10": read_cifar10,
    "notmnist": read_notmnist,
    "fashion_mnist": mnist_like("FashionMNIST", FASHION),
}
DEFAULT_ORDER = ["svhn", "mnist", "cifar10", "notmnist", "fashion_mnist"]


def as_object_array(images: list[np.ndarray]) -> np.ndarray:
    """One uint8 image per entry, each of its own shape (TaskDataset makes a PIL RGB image of it)."""
    array = np.empty(len(images), dtype=object)
    array[:] = images
    return array


@DATASETS.register("five_datasets", "5-datasets")
def build_five_datasets(cfg: DataConfig, image_size: int) -> BenchmarkData:
    if not cfg.root:
        raise DatasetError("data.root must be set for five_datasets (the folder holding the five archives)")
    root = Path(cfg.root).expanduser()
    order = list(cfg.dataset_order or DEFAULT_ORDER)
    unknown = sorted(set(order) - set(MEMBERS))
    if unknown or len(set(order)) != len(order):
        raise DatasetError(f"data.dataset_order must name each of {sorted(MEMBERS)} at most once, got {order}")
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    class_names: list[str] = []
    for position, member in enumerate(order):
        for split in ("train", "test"):
            images, labels, names = MEMBERS[member](root, split == "train")
            splits[split][0].extend(images)
            splits[split][1].append(labels + 10 * position)
        class_names += [f"{member}:{name}" for name in names]
    train, test = (ImageSplit(as_object_array(splits[s][0]), np.concatenate(splits[s][1])) for s in ("train", "test"))
    return BenchmarkData(name="five_datasets", class_names=class_names, train=train, test=test)
