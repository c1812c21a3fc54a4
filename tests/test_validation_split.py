"""The validation split: held out of the training images per class, seeded, disjoint from train and test, recorded
beside test accuracy, stable across a resume; with eval.test_set false the test images are never read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from carecl.config import ConfigError, config_from_dict
from carecl.data.base import DatasetError
from carecl.data.validation import validation_indices
from carecl.engine import Experiment, run_experiment

from helpers import check_interrupted_run_resumes_identically, tiny_config

VALIDATION = {"validation_fraction": 0.25}


def sample_keys(split) -> set:
    """Each sample of a split as hashable bytes (tensor images) or its path."""
    if isinstance(split.samples, list):
        return set(split.samples)
    return {bytes(np.ascontiguousarray(np.asarray(sample)).data) for sample in split.samples}


def test_the_split_is_per_class_seeded_and_disjoint_from_train_and_test():
    experiment = Experiment.build(tiny_config(data=VALIDATION))
    data = experiment.data
    train, validation, test = sample_keys(data.train), sample_keys(data.validation), sample_keys(data.test)
    assert not train & validation and not validation & test and not train & test
    assert len(data.train) + len(data.validation) == 6 * 12  # every training image kept somewhere
    counts = np.bincount(data.validation.targets, minlength=6)
    assert counts.tolist() == [3] * 6  # a quarter of each class's 12
    again = Experiment.build(tiny_config(data=VALIDATION)).data.validation
    assert np.array_equal(again.targets, data.validation.targets)
    assert sample_keys(again) == validation
    other = Experiment.build(tiny_config(data=VALIDATION, seed=7)).data.validation
    assert sample_keys(other) != validation  # another seed holds out other images


def test_small_classes_keep_a_training_image_and_refuse_a_lone_image():
    targets = np.array([0, 0, 1, 1, 1, 1])
    held = validation_indices(targets, 0.9, seed=0)
    assert np.bincount(targets[held]).tolist() == [1, 3]
    with pytest.raises(DatasetError, match="class 2 has 1 training image"):
        validation_indices(np.array([0, 0, 2]), 0.5, seed=0)


def test_validation_accuracy_is_recorded_beside_test_accuracy(tmp_path):
    run_experiment(tiny_config(data=VALIDATION), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert [t["task"] for t in metrics["validation"]["tasks"]] == [0, 1, 2]
    assert [t["n_samples"] for t in metrics["validation"]["tasks"]] == [6, 12, 18]  # 3 per seen class
    assert [t["n_samples"] for t in metrics["tasks"]] == [12, 24, 36]  # the test set: 6 per seen class
    assert 0 <= metrics["validation"]["summary"]["a_last"] <= 100


def test_a_resumed_run_holds_out_the_same_images_and_reaches_the_same_validation_numbers(tmp_path, monkeypatch):
    config = tiny_config(data=VALIDATION, train={"epochs": 2, "checkpoint_every_epochs": 1},
                         method={"name": "care", "brmoe": {"adapter_dim": 4}, "alignment": {"epochs": 1}})
    check_interrupted_run_resumes_identically(config, "task1/first-half/epoch0/batch0", tmp_path, monkeypatch)


def test_without_the_test_set_only_validation_images_are_read(tmp_path, monkeypatch):
    root = tmp_path / "images"
    rng = np.random.RandomState(0)
    for split, count in (("train", 8), ("test", 3)):
        for name in ("circles", "squares", "lines", "dots"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    opened = []
    import carecl.data.base as base

    original = base.load_rgb_image
    monkeypatch.setattr(base, "load_rgb_image", lambda path: (opened.append(str(path)), original(path))[1])
    config = tiny_config(data={"dataset": "imagefolder", "root": str(root), "num_workers": 0, "image_size": 16,
                               "validation_fraction": 0.25, "init_cls": 2, "increment": 2},
                         eval={"batch_size": 64, "topk": 2, "test_set": False})
    run_experiment(config, tmp_path / "run")
    assert opened, "the run read its images through load_rgb_image"
    assert not [path for path in opened if f"{root}/test/" in path], "a test image was read"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "validation" and "validation" not in metrics
    assert [t["n_samples"] for t in metrics["tasks"]] == [4, 8]  # 2 of each class's 8 training images


def test_the_settings_that_need_a_validation_split_say_so():
    with pytest.raises(ConfigError, match="eval.test_set false needs data.validation_fraction"):
        config_from_dict({"eval": {"test_set": False}})
    with pytest.raises(ConfigError, match=r"data.validation_fraction must be in \(0, 1\)"):
        config_from_dict({"data": {"validation_fraction": 1.0}})


def test_max_tasks_learns_the_first_tasks_of_the_whole_stream(tmp_path):
    run_experiment(tiny_config(train={"max_tasks": 2}), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [t["task"] for t in metrics["tasks"]] == [0, 1]
    assert metrics["task_sizes"] == [2, 2, 2]  # the scenario is still the whole stream
