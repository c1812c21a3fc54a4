"""The images a run's model sees: its dataset's transforms and input side under its backbone's preprocessing,
known from the config alone (without building the dataset)."""

from __future__ import annotations

from carecl.backbones import backbone_preprocessing
from carecl.config import ExperimentConfig
from carecl.data import TransformPair, resolve_preprocessing, transforms_for
from carecl.data.base import Transform, canonical_dataset


def run_transforms(config: ExperimentConfig) -> TransformPair:
    """The (train, test) transforms the config's dataset is built with."""
    return transforms_for(canonical_dataset(config.data), config.data, backbone_preprocessing(config.backbone))


def evaluation_transform(config: ExperimentConfig) -> Transform:
    """The test transform (what evaluation applies)."""
    return run_transforms(config).test


def input_size(config: ExperimentConfig) -> int:
    """The side of the model's input images (the data's resolved image size)."""
    resolved = resolve_preprocessing(canonical_dataset(config.data), config.data, backbone_preprocessing(config.backbone))
    return resolved.image_size
