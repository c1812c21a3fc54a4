"""Dataset package: ImageFolder scanning and checks, TaskDataset views, digits, synthetic, CIFAR, transforms."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carecl.config import DataConfig
from carecl.data import DATASETS, BenchmarkData, DatasetError, ImageSplit, TaskDataset, build_dataset
from carecl.data.transforms import DATASET_RECIPES, TRANSFORMS, transforms_for

# Deliberately unsorted, with an upper-case name that sorts first.
CLASS_FOLDERS = ["zebra", "apple", "Mango"]


def save_image(path: Path, mode: str = "RGB", value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = {"L": value, "RGB": (value, 0, 255 - value), "RGBA": (value, value, value, 50), "CMYK": (0, 0, 0, 0)}[mode]
    Image.new(mode, (8, 8), fill).save(path)


def make_tree(root: Path, name: str = "imagenet-r", per_class: int = 2) -> Path:
    """root/name/{train,test}/<class>/<i>.png with one distinct grey level per class."""
    for split in ("train", "test"):
        for class_index, class_name in enumerate(CLASS_FOLDERS):
            for i in range(per_class):
                save_image(root / name / split / class_name / f"{i}.png", "RGB", 40 * class_index + i)
    return root / name


def folder_cfg(root: Path, dataset: str = "imagenet-r", **kwargs) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), init_cls=1, increment=1, **kwargs)


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_numbers_classes_by_sorted_folder_name(tmp_path):
    make_tree(tmp_path, per_class=2)
    data = build_dataset(folder_cfg(tmp_path))
    assert data.class_names == sorted(CLASS_FOLDERS) == ["Mango", "apple", "zebra"]
    assert data.n_classes == 3
    for split in (data.train, data.test):
        assert len(split.samples) == 6 and split.targets.dtype == np.int64
        for path, target in zip(split.samples, split.targets):
            assert Path(path).parent.name == data.class_names[target]


def test_imagefolder_extensions_case_insensitive_and_other_files_ignored(tmp_path):
    dataset_dir = make_tree(tmp_path, per_class=1)
    save_image(dataset_dir / "train" / "apple" / "upper.PNG")
    save_image(dataset_dir / "train" / "apple" / "photo.JPeG")
    (dataset_dir / "train" / "apple" / "notes.txt").write_text("not an image")
    (dataset_dir / "train" / ".cache").mkdir()
    data = build_dataset(folder_cfg(tmp_path))
    apple = data.class_names.index("apple")
    names = sorted(Path(p).name for p, t in zip(data.train.samples, data.train.targets) if t == apple)
    assert names == ["0.png", "photo.JPeG", "upper.PNG"]
    assert data.n_classes == 3


def test_imagefolder_alias_and_root_pointing_at_dataset_folder(tmp_path):
    dataset_dir = make_tree(tmp_path, name="imagenet-a", per_class=1)
    by_alias = build_dataset(folder_cfg(tmp_path, dataset="imageneta"))
    direct = build_dataset(folder_cfg(dataset_dir, dataset="imagenet-a"))
    assert by_alias.name == direct.name == "imagenet-a"
    assert by_alias.train.samples == direct.train.samples


def test_files_are_converted_to_rgb(tmp_path):
    files = {"gray.png": "L", "alpha.png": "RGBA", "cmyk.jpg": "CMYK", "rgb.png": "RGB"}
    for name, mode in files.items():
        save_image(tmp_path / name, mode, value=200)
    palette = Image.new("RGB", (8, 8), (10, 20, 30)).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    paths = [str(tmp_path / name) for name in [*files, "palette.png"]]
    split = ImageSplit(paths, np.zeros(len(paths), dtype=np.int64))
    dataset = TaskDataset(split, np.array([0]), 0, 1, transform=None)
    images = [dataset[i][0] for i in range(len(dataset))]
    for image in images:
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    gray = images[0]
    assert torch.allclose(gray, torch.full_like(gray, 200 / 255))
    assert torch.allclose(images[2], torch.ones_like(images[2]), atol=0.02)  # CMYK (0,0,0,0) is white


def test_unreadable_image_names_its_path(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    dataset = TaskDataset(ImageSplit([str(broken)], np.array([0])), np.array([0]), 0, 1, None)
    with pytest.raises(DatasetError, match=re.escape(str(broken))):
        dataset[0]


@pytest.mark.parametrize(
    "break_tree, expected_path, expected_words",
    [
        (lambda d: __import__("shutil").rmtree(d / "test"), "test", "missing split folder"),
        (lambda d: __import__("shutil").rmtree(d / "test" / "zebra"), "train", "zebra"),
        (lambda d: save_image(d / "test" / "kiwi" / "0.png"), "test", "kiwi"),
        (lambda d: [p.unlink() for p in (d / "train" / "apple").iterdir()], "train/apple", "no images"),
    ],
    ids=["missing-test", "class-only-in-train", "class-only-in-test", "empty-class"],
)
def test_broken_tree_fails_at_build_naming_the_path(tmp_path, break_tree, expected_path, expected_words):
    dataset_dir = make_tree(tmp_path, per_class=1)
    break_tree(dataset_dir)
    with pytest.raises(DatasetError) as error:
        build_dataset(folder_cfg(tmp_path))
    message = str(error.value)
    assert str(dataset_dir / expected_path) in message
    assert expected_words in message


def test_every_empty_class_folder_is_listed_in_one_error(tmp_path):
    dataset_dir = make_tree(tmp_path, per_class=1)
    for split, name in (("train", "apple"), ("train", "zebra"), ("test", "Mango")):
        for image in (dataset_dir / split / name).iterdir():
            image.unlink()
    (dataset_dir / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"3 class folder\(s\) contain no images") as error:
        build_dataset(folder_cfg(tmp_path))
    for folder in ("train/apple", "train/zebra", "test/Mango"):
        assert str(dataset_dir / folder) in str(error.value)


def test_skipping_view_returns_unreadable_files_instead_of_raising(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    save_image(tmp_path / "fine.png", "RGB")
    split = ImageSplit([str(broken), str(tmp_path / "fine.png")], np.array([0, 0]))
    dataset = TaskDataset(split, np.array([0]), 0, 1, None, skip_unreadable=True)
    skipped = dataset[0]
    assert skipped.path == str(broken) and skipped.label == 0 and "cannot identify image" in skipped.reason
    assert dataset[1][0].shape == (3, 8, 8) and dataset.class_size(0) == 2


def test_missing_root_and_dataset_folder_are_named(tmp_path):
    with pytest.raises(DatasetError, match="data.root"):
        build_dataset(DataConfig(dataset="objectnet", root=None))
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        build_dataset(folder_cfg(missing, dataset="objectnet"))
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "objectnet"))):
        build_dataset(folder_cfg(tmp_path, dataset="objectnet"))


def test_build_checks_config_against_the_classes(tmp_path):
    make_tree(tmp_path, per_class=1)
    with pytest.raises(DatasetError, match="data.init_cls"):
        build_dataset(DataConfig(dataset="imagenet-r", root=str(tmp_path), init_cls=4))
    with pytest.raises(DatasetError, match=r"data.class_order.*\[3\]"):
        build_dataset(folder_cfg(tmp_path, class_order=[0, 3, 1]))
    with pytest.raises(DatasetError, match="data.class_order.*repeated"):
        build_dataset(folder_cfg(tmp_path, class_order=[0, 0, 1]))


# ---------------------------------------------------------------- TaskDataset


def test_task_dataset_selects_and_maps_labels_by_class_order():
    targets = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    images = torch.arange(len(targets), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
    class_order = np.array([2, 0, 3, 1])
    label_map = np.argsort(class_order)  # label_map[original] = position in the order
    dataset = TaskDataset(ImageSplit(images, targets), label_map, 1, 3, transform=None)
    # Positions 1 and 2 hold original classes 0 and 3.
    assert len(dataset) == 4
    seen = sorted((int(image[0, 0, 0]), label) for image, label in (dataset[i] for i in range(len(dataset))))
    assert seen == [(0, 1), (3, 2), (4, 1), (7, 2)]
    assert set(dataset.labels.tolist()) == {1, 2}


def test_task_dataset_rejects_short_label_map():
    split = ImageSplit(torch.zeros(2, 3, 2, 2), np.array([0, 5]))
    with pytest.raises(ValueError, match="label_map"):
        TaskDataset(split, np.arange(3), 0, 3, None)


def test_task_dataset_reads_uint8_arrays_through_pil_transforms():
    pixels = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    pixels[1] = 255
    split = ImageSplit(pixels, np.array([0, 1, 1]))
    dataset = TaskDataset(split, np.array([0, 1]), 1, 2, transforms_for("cifar100").test)
    image, label = dataset[0]
    assert len(dataset) == 2 and label == 1
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert torch.allclose(image, torch.ones_like(image))  # white, normalised with mean = std = 0.5


def test_benchmark_task_dataset_uses_split_transforms(tmp_path):
    make_tree(tmp_path, per_class=1)
    data = build_dataset(folder_cfg(tmp_path))
    label_map = np.arange(data.n_classes)
    test_view = data.task_dataset("test", label_map, 0, 2)
    assert test_view.transform is data.test_transform and len(test_view) == 2
    image, label = test_view[0]
    assert image.shape == (3, 224, 224) and label == 0
    train_view = data.task_dataset("train", label_map, 2, 3, transform=data.test_transform)
    assert train_view.transform is data.test_transform and train_view.labels.tolist() == [2]
    with pytest.raises(ValueError, match="split"):
        data.task_dataset("val", label_map, 0, 1)


# ---------------------------------------------------------------- digits, synthetic


def test_digits_split_is_deterministic_stratified_and_leaves_global_rng_alone():
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    first = build_dataset(DataConfig(dataset="digits", image_size=16))
    second = build_dataset(DataConfig(dataset="digits", image_size=16))
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and torch.equal(torch.get_rng_state(), torch_state)
    assert first.class_names == [str(c) for c in range(10)]
    assert torch.equal(first.train.samples, second.train.samples)
    assert np.array_equal(first.test.targets, second.test.targets)
    assert len(first.train) + len(first.test) == 1797
    assert first.train.samples.shape[1:] == (3, 16, 16)
    assert 0.0 <= float(first.train.samples.min()) and float(first.train.samples.max()) <= 1.0
    test_share = np.bincount(first.test.targets, minlength=10) / np.bincount(
        np.concatenate([first.train.targets, first.test.targets]), minlength=10
    )
    assert np.all(np.abs(test_share - 0.3) < 0.02)
    assert torch.equal(first.train_transform(first.train.samples[0]), first.train.samples[0])


def test_synthetic_shapes_determinism_and_global_rng():
    cfg = DataConfig(
        dataset="synthetic", image_size=12, synthetic_classes=7, synthetic_train_per_class=3, synthetic_test_per_class=2
    )
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    first, second = build_dataset(cfg), build_dataset(cfg)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and torch.equal(torch.get_rng_state(), torch_state)
    assert first.n_classes == 7 and len(set(first.class_names)) == 7
    assert first.train.samples.shape == (21, 3, 12, 12) and first.test.samples.shape == (14, 3, 12, 12)
    assert first.train.samples.dtype == torch.float32
    assert np.bincount(first.train.targets).tolist() == [3] * 7
    assert torch.equal(first.train.samples, second.train.samples)
    assert float(first.train.samples.min()) >= 0.0 and float(first.train.samples.max()) <= 1.0


def test_synthetic_classes_are_separable_by_nearest_mean():
    data = build_dataset(DataConfig(dataset="synthetic", image_size=16, synthetic_classes=50, init_cls=10))
    train, test = data.train.samples.flatten(1), data.test.samples.flatten(1)
    labels = torch.from_numpy(data.train.targets)
    means = torch.zeros(50, train.shape[1]).index_add_(0, labels, train) / torch.bincount(labels).unsqueeze(1)
    predicted = torch.cdist(test, means).argmin(1).numpy()
    assert (predicted == data.test.targets).mean() > 0.8


def test_synthetic_invalid_size_names_the_key():
    with pytest.raises(DatasetError, match="data.synthetic_classes"):
        build_dataset(DataConfig(dataset="synthetic", synthetic_classes=0))


# ---------------------------------------------------------------- CIFAR-100


def write_fake_cifar(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        entry = {"data": pixels, "fine_labels": [i % 3 for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bee", "cup"]}))


def test_cifar_missing_archive_names_the_expected_path(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "cifar-100-python"))):
        build_dataset(DataConfig(dataset="cifar224", root=str(tmp_path)))


def test_cifar_reads_archive_into_uint8_memory(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    # The fake archive cannot match torchvision's checksums of the real one.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    data = build_dataset(DataConfig(dataset="cifar224", root=str(tmp_path), init_cls=2))
    assert data.name == "cifar100" and data.class_names == ["apple", "bee", "cup"]
    assert data.train.samples.dtype == np.uint8 and data.train.samples.shape == (6, 32, 32, 3)
    assert data.test.targets.tolist() == [0, 1, 2, 0]
    image, label = data.task_dataset("train", np.arange(3), 0, 3)[1]
    assert image.shape == (3, 224, 224) and label == 1
    assert float(image.min()) < 0.0  # normalised with mean = std = 0.5


# ---------------------------------------------------------------- registry, transforms


def test_registry_aliases_and_unknown_name_suggestion():
    assert DATASETS.canonical("imagenetr") == "imagenet-r"
    assert DATASETS.canonical("imageneta") == "imagenet-a"
    assert DATASETS.canonical("cifar224") == "cifar100"
    expected = {"imagenet-r", "imagenet-a", "objectnet", "omnibenchmark", "omnibenchmark1k", "vtab", "cub", "food101"}
    assert expected | {"cifar100", "digits", "synthetic"} <= set(DATASETS.names())
    assert set(DATASETS.names()) <= set(DATASET_RECIPES)
    assert set(DATASET_RECIPES.values()) <= set(TRANSFORMS.names())
    with pytest.raises(DatasetError, match=r"data.dataset.*did you mean 'imagenet-r'"):
        build_dataset(DataConfig(dataset="imagenet-rr"))


def test_transform_spot_checks():
    image = Image.new("RGB", (40, 30), (0, 128, 255))
    plain = transforms_for("imagenet-r")
    out = plain.test(image)
    assert out.shape == (3, 224, 224) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.allclose(out[0], torch.zeros_like(out[0])) and torch.allclose(out[2], torch.ones_like(out[2]))
    for name in ("imagenet-r", "imagenet-a", "vtab", "cifar100", "cub"):
        assert transforms_for(name).train(image).shape == (3, 224, 224)
    normalised = transforms_for("vtab").test(image)
    assert float(normalised.min()) == pytest.approx(-1.0) and float(normalised.max()) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no transforms defined for dataset 'mnist'"):
        transforms_for("mnist")


def test_batches_through_a_dataloader():
    data = build_dataset(DataConfig(dataset="synthetic", image_size=8, synthetic_classes=4))
    loader = torch.utils.data.DataLoader(data.task_dataset("train", np.arange(4), 0, 2), batch_size=16)
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 8, 8) and set(labels.tolist()) <= {0, 1}
    assert isinstance(data, BenchmarkData)


def test_glyphs_are_generated_deterministically_with_named_classes():
    from carecl.config import DataConfig
    from carecl.data import build_dataset

    config = DataConfig(dataset="glyphs", synthetic_classes=3, synthetic_train_per_class=4, synthetic_test_per_class=2, image_size=16)
    first, second = build_dataset(config), build_dataset(config)
    assert first.class_names == ["glyph0", "glyph1", "glyph2"]
    assert first.train.samples.shape == (12, 3, 16, 16) and first.test.samples.shape == (6, 3, 16, 16)
    assert torch.equal(first.train.samples, second.train.samples)
    assert first.train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Classes differ: the mean images of two glyphs are far apart compared with the noise.
    means = first.train.samples.view(3, 4, -1).mean(1)
    assert (means[0] - means[1]).abs().mean() > 0.05
