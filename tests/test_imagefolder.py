"""`data.dataset: imagefolder`: a user's own image tree, split by folder or by fraction, preprocessed as the backbone was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from carecl.backbones import BackboneError, backbone_preprocessing, create_backbone
from carecl.config import BackboneConfig, ConfigError, DataConfig, config_from_dict
from carecl.data import DatasetError, build_dataset

DINO = BackboneConfig(name="vit_small_patch14_dinov2", pretrained=False)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_image(path: Path, value: int = 100, size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)


def user_cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), init_cls=1, increment=1, **kwargs)


def test_train_and_test_folders_with_nested_images(tmp_path):
    for split in ("train", "test"):
        save_image(tmp_path / split / "cat" / "a.png")
        save_image(tmp_path / split / "cat" / "indoor" / "b.jpg")  # a sub-folder of a class folder counts
        save_image(tmp_path / split / "ant" / "c.png")
    data = build_dataset(user_cfg(tmp_path))
    assert data.class_names == ["ant", "cat"]
    assert [Path(p).name for p in data.train.samples] == ["c.png", "a.png", "b.jpg"]
    assert data.train.targets.tolist() == [0, 1, 1]


def test_one_folder_is_split_by_fraction_the_same_way_every_time(tmp_path):
    for name, count in (("b", 10), ("a", 5), ("c", 2)):
        for i in range(count):
            save_image(tmp_path / name / f"{i:02d}.png", 10 * i)
    first = build_dataset(user_cfg(tmp_path, test_fraction=0.2))
    second = build_dataset(user_cfg(tmp_path, test_fraction=0.2, shuffle=False))
    assert first.class_names == ["a", "b", "c"]
    assert first.test.targets.tolist() == [0, 1, 1, 2]  # round(0.2*n), at least one each side
    assert first.train.targets.tolist() == [0] * 4 + [1] * 8 + [2]
    assert first.test.samples == second.test.samples
    assert not set(first.train.samples) & set(first.test.samples)
    assert len(first.train.samples) + len(first.test.samples) == 17


@pytest.mark.parametrize("layout, words", [
    ("classes only", "set data.test_fraction"),
    ("loose train image", "belong to no class"),
    ("single image class", "a single image"),
])
def test_layout_errors_say_what_to_do(tmp_path, layout, words):
    if layout == "classes only":
        save_image(tmp_path / "cat" / "a.png")
        config = user_cfg(tmp_path)
    elif layout == "loose train image":
        for split in ("train", "test"):
            save_image(tmp_path / split / "cat" / "a.png")
        save_image(tmp_path / "train" / "stray.png")
        config = user_cfg(tmp_path)
    else:
        save_image(tmp_path / "cat" / "a.png")
        save_image(tmp_path / "dog" / "a.png")
        save_image(tmp_path / "dog" / "b.png")
        config = user_cfg(tmp_path, test_fraction=0.5)
    with pytest.raises(DatasetError, match=words) as error:
        build_dataset(config)
    assert str(tmp_path) in str(error.value)


def test_preprocessing_follows_the_backbones_pretrained_config(tmp_path):
    for split in ("train", "test"):
        save_image(tmp_path / split / "cat" / "a.png", value=0, size=(30, 30))
    pre = backbone_preprocessing(DINO)
    assert (pre.image_size, pre.mean, pre.std, pre.interpolation, pre.crop_pct) == (518, IMAGENET_MEAN, IMAGENET_STD,
                                                                                      "bicubic", 1.0)
    data = build_dataset(user_cfg(tmp_path, image_size=28), pre)
    image = Image.open(data.test.samples[0]).convert("RGB")
    out = data.test_transform(image)
    assert out.shape == (3, 28, 28)
    # Red channel 0 -> (0 - mean) / std: the backbone's ImageNet normalisation, not the release's 0.5.
    assert float(out[0].mean()) == pytest.approx(-IMAGENET_MEAN[0] / IMAGENET_STD[0], abs=1e-4)
    assert data.train_transform(image).shape == (3, 28, 28)
    plain = build_dataset(user_cfg(tmp_path, image_size=28, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]), pre)
    assert float(plain.test_transform(image)[0].mean()) == pytest.approx(0.0, abs=1e-6)


def test_published_benchmarks_keep_the_release_transforms_whatever_the_backbone(tmp_path):
    for split in ("train", "test"):
        save_image(tmp_path / "imagenet-r" / split / "cat" / "a.png", value=0)
    data = build_dataset(DataConfig(dataset="imagenet-r", root=str(tmp_path), init_cls=1), backbone_preprocessing(DINO))
    out = data.test_transform(Image.open(data.test.samples[0]).convert("RGB"))
    assert out.shape == (3, 224, 224) and float(out.min()) >= 0.0  # no normalisation, 224 px
    smaller = build_dataset(DataConfig(dataset="imagenet-r", root=str(tmp_path), init_cls=1, image_size=112))
    assert smaller.test_transform(Image.open(data.test.samples[0]).convert("RGB")).shape == (3, 112, 112)


def test_backbone_is_built_for_the_datas_image_size():
    tiny = {"patch_size": 14, "embed_dim": 24, "depth": 1, "num_heads": 2}
    model = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", pretrained=False, model_kwargs=tiny), 28)
    assert model(torch.rand(1, 3, 28, 28)).shape == (1, 24)
    clash = BackboneConfig(name="vit_small_patch14_dinov2", pretrained=False, model_kwargs={**tiny, "img_size": 56})
    with pytest.raises(BackboneError, match="img_size 56 does not fit the data's 28 px"):
        create_backbone(clash, 28)


@pytest.mark.parametrize("data, words", [
    ({"mean": [0.5, 0.5, 0.5]}, "data.mean and data.std must be set together"),
    ({"crop_pct": 1.5}, "data.crop_pct"),
    ({"interpolation": "cubic"}, "data.interpolation must be one of 'bicubic'"),
    ({"augment": "strong"}, "data.augment must be one of"),
    ({"test_fraction": 1.0}, "data.test_fraction"),
])
def test_bad_preprocessing_values_are_config_errors(data, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict({"data": {"dataset": "imagefolder", **data}})


def test_a_method_setting_may_choose_another_transform_recipe(tmp_path):
    for split in ("train", "test"):
        save_image(tmp_path / "cifar-like" / split / "cat" / "a.png", value=0, size=(40, 30))
    config = DataConfig(dataset="imagenet-r", root=str(tmp_path / "cifar-like"), init_cls=1, transforms="pilot_cifar")
    data = build_dataset(config)
    out = data.test_transform(Image.open(data.test.samples[0]).convert("RGB"))
    assert out.shape == (3, 224, 224) and float(out.min()) == pytest.approx(-1.0)  # cifar's mean = std = 0.5
