"""5-datasets from tiny archives in each member's own format: every member read, classes offset by the
order, tasks = members, images of mixed sizes and channels made RGB by the transforms."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from carecl.config import DataConfig
from carecl.data import build_dataset
from carecl.data.base import DatasetError

PER_CLASS = 2


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_archives(root, rng) -> None:
    labels = np.repeat(np.arange(10), PER_CLASS)
    for folder in ("MNIST", "FashionMNIST"):
        raw = root / folder / "raw"
        raw.mkdir(parents=True)
        for prefix in ("train", "t10k"):
            write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (len(labels), 28, 28)))
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8), "labels": labels.tolist()}
        (cifar / name).write_bytes(pickle.dumps(batch))
    (cifar / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    for split in ("train", "test"):  # SVHN: (32, 32, 3, N) and labels 1..10 (10 = digit 0)
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 255, (32, 32, 3, len(labels)), dtype=np.uint8),
                                              "y": (labels.reshape(-1, 1) + 9) % 10 + 1})
    with zipfile.ZipFile(root / "notMNIST.zip", "w") as bundle:
        for split in ("Train", "Test"):
            for label in range(10):
                for i in range(PER_CLASS):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
                    bundle.writestr(f"notMNIST/{split}/{chr(65 + label)}/{i}.png", buffer.getvalue())


def test_five_datasets_reads_every_member_and_offsets_classes_by_the_order(tmp_path):
    fake_archives(tmp_path, np.random.default_rng(0))
    order = ["notmnist", "mnist", "cifar10", "fashion_mnist", "svhn"]  # NoRGa's seed-42 order
    data = build_dataset(DataConfig(dataset="5-datasets", root=str(tmp_path), init_cls=10, increment=10,
                                    shuffle=False, dataset_order=order))
    assert data.n_classes == 50 and len(data.test) == 5 * 10 * PER_CLASS
    assert data.class_names[0] == "notmnist:A" and data.class_names[49] == "svhn:9" and data.class_names[20] == "cifar10:c0"
    per_class = np.full(50, PER_CLASS)
    per_class[20:30] *= 5  # the fake CIFAR-10 has five training batches
    np.testing.assert_array_equal(np.bincount(data.train.targets), per_class)
    # SVHN's label 10 is the digit 0: class 40 (svhn:0) holds the images the .mat labelled 10.
    svhn = data.train.targets[data.train.targets >= 40]
    assert sorted(set(svhn.tolist())) == list(range(40, 50))
    dataset = data.task_dataset("test", np.arange(50), 0, 50)
    shapes = {tuple(dataset[i][0].shape) for i in range(0, len(dataset), PER_CLASS * 10)}
    assert shapes == {(3, 224, 224)}  # gray 28 px and colour 32 px alike
    assert {int(dataset[i][1]) // 10 for i in range(len(dataset))} == set(range(5))


def test_five_datasets_names_the_missing_archive(tmp_path):
    fake_archives(tmp_path, np.random.default_rng(1))
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        build_dataset(DataConfig(dataset="five_datasets", root=str(tmp_path), init_cls=10, increment=10))
    with pytest.raises(DatasetError, match="dataset_order"):
        build_dataset(DataConfig(dataset="five_datasets", root=str(tmp_path), init_cls=10, increment=10,
                                 dataset_order=["mnist", "mnist"]))
