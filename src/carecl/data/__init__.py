"""Datasets: a name registry of builders, each dataset's transform recipe, and the per-task view.

    data = build_dataset(cfg.data, backbone_preprocessing)   # scans/loads and validates up front
    task = data.task_dataset("train", label_map, low, high)
"""

from dataclasses import replace

from carecl.config import DataConfig
from carecl.data.class_names import read_class_names
from carecl.data.base import (
    DATASETS,
    BenchmarkData,
    DatasetError,
    ImageSplit,
    TaskDataset,
    canonical_dataset,
    check_config_fits,
    load_rgb_image,
)

# Imported for their side effect: each registers its datasets in DATASETS.
from carecl.data import cifar, digits, domains, five_datasets, glyphs, imagefolder, mtil, synthetic, tinyimagenet  # noqa: E402,F401,E501  isort: skip
from carecl.data.transforms import (  # noqa: E402
    DEFAULT_BACKBONE_PREPROCESSING,
    TRANSFORMS,
    Preprocessing,
    TransformPair,
    resolve_preprocessing,
    transforms_for,
)


def build_dataset(cfg: DataConfig, backbone: Preprocessing = DEFAULT_BACKBONE_PREPROCESSING) -> BenchmarkData:
    """Load (or scan) the configured dataset with its transforms, checked against the config, before any training.

    `backbone` is the backbone's pretrained preprocessing (`carecl.backbones.backbone_preprocessing`):
    datasets without their own conventions (imagefolder) follow it.
    """
    name = canonical_dataset(cfg)
    preprocessing = resolve_preprocessing(name, cfg, backbone)
    data = DATASETS.get(name)(cfg, preprocessing.image_size)
    if cfg.class_names_file is not None:
        data = replace(data, class_names=read_class_names(cfg.class_names_file, data.class_names))
    check_config_fits(cfg, data)
    if cfg.additions:
        from carecl.data.additions import append_additions

        data = append_additions(data, cfg.additions)
    pair = transforms_for(name, cfg, backbone)
    return replace(data, train_transform=pair.train, test_transform=pair.test)


__all__ = [
    "DATASETS",
    "BenchmarkData",
    "DatasetError",
    "ImageSplit",
    "Preprocessing",
    "TaskDataset",
    "TRANSFORMS",
    "TransformPair",
    "build_dataset",
    "load_rgb_image",
    "resolve_preprocessing",
    "transforms_for",
]
