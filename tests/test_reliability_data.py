"""Bad input: unreadable images skipped and counted (or an error with --strict-data), odd image modes,
non-finite losses, and every config/output mistake stopped before any work starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carecl.runs.checkpoints import CheckpointError, CheckpointStore
from carecl.cli.main import main
from carecl.config import save_config
from carecl.data.base import DatasetError, ImageSplit, SkippedImages, SkippingDataLoader, TaskDataset
from carecl.engine import TrainingError, resume_experiment, run_experiment
from carecl.methods.base import StepOutput
from carecl.methods.care import CaRE

from helpers import TINY_VIT, tiny_config

CLASSES = ["c0", "c1", "c2"]
MODES = {"c0": "L", "c1": "RGBA", "c2": "CMYK"}


def save_image(path: Path, mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fills = {"RGB": (value, 255 - value, 60), "L": value, "RGBA": (value, value, 0, 128), "CMYK": (value, 0, 0, 0)}
    Image.new(mode, (12, 12), fills[mode]).save(path)


def write_bad_files(dataset_dir: Path) -> dict[str, list[str]]:
    """Corrupt, empty and truncated files among good ones; returns the bad paths per split/class."""
    good = dataset_dir / "train" / "c0" / "0.png"
    bad = {
        "train/c0": [dataset_dir / "train" / "c0" / "garbage.png"],
        "train/c1": [dataset_dir / "train" / "c1" / "empty.jpg", dataset_dir / "train" / "c1" / "truncated.png"],
        "test/c2": [dataset_dir / "test" / "c2" / "garbage.png"],
    }
    bad["train/c0"][0].write_bytes(b"this is not an image")
    bad["train/c1"][0].write_bytes(b"")
    bad["train/c1"][1].write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    bad["test/c2"][0].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return {key: [str(p) for p in paths] for key, paths in bad.items()}


def make_tree(root: Path, per_class: int = 3) -> Path:
    """imagenet-r/{train,test}/c{0,1,2}/: RGB images plus one grayscale/RGBA/CMYK and a palette image per class."""
    dataset_dir = root / "imagenet-r"
    for split in ("train", "test"):
        for index, name in enumerate(CLASSES):
            for i in range(per_class):
                save_image(dataset_dir / split / name / f"{i}.png", "RGB", 70 * index + 10 * i)
            odd = dataset_dir / split / name / f"odd.{'jpg' if MODES[name] == 'CMYK' else 'png'}"
            save_image(odd, MODES[name], 70 * index)
            Image.new("RGB", (12, 12), (70 * index, 20, 20)).convert("P").save(dataset_dir / split / name / "palette.png")
    return dataset_dir


def folder_config(root: Path, **data):
    vit = dict(TINY_VIT, img_size=224, patch_size=32)
    config = tiny_config(data={"dataset": "imagenet-r", "root": str(root), "init_cls": 1, "increment": 1,
                               "image_size": None, **data},
                         train={"batch_size": 2}, eval={"batch_size": 1, "topk": 1})
    config.backbone.model_kwargs = vit
    return config


def test_unreadable_images_are_skipped_counted_per_task_and_listed(tmp_path, caplog):
    dataset_dir = make_tree(tmp_path / "data")
    bad = write_bad_files(dataset_dir)
    config = folder_config(tmp_path / "data")
    config.eval.incremental = False  # every evaluation reads every seen test image (incremental: each once)
    summary = run_experiment(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(summary.top1_curve) == 3 and all(math.isfinite(a) for a in summary.top1_curve)
    order = metrics["class_order"]  # original class ids = sorted folder names c0, c1, c2
    for task, report in enumerate(metrics["skipped_images"]):
        learned = CLASSES[order[task]]
        seen = {CLASSES[c] for c in order[: task + 1]}
        expected = set(bad.get(f"train/{learned}", [])) | {p for c in seen for p in bad.get(f"test/{c}", [])}
        assert report["count"] == len(expected), (task, report)
        assert set(report["files"]) == expected
    # Evaluated: the 5 readable test images per class; the unreadable one in test/c2 is not counted.
    assert metrics["tasks"][-1]["n_samples"] == 5 * len(CLASSES)
    assert "unreadable image" in caplog.text


def test_strict_data_stops_naming_the_file(tmp_path, capsys):
    dataset_dir = make_tree(tmp_path / "data")
    bad = write_bad_files(dataset_dir)
    config_file = tmp_path / "config.yaml"
    save_config(folder_config(tmp_path / "data"), config_file)
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "run"), "--strict-data"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err
    assert any(path in err for paths in bad.values() for path in paths)


def test_a_batch_of_only_unreadable_images_is_dropped(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"junk")
    save_image(tmp_path / "c.png", "RGB", 1)
    save_image(tmp_path / "d.png", "L", 2)
    paths = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png", "d.png")]
    dataset = TaskDataset(ImageSplit(paths, np.array([0, 1, 0, 1])), np.array([0, 1]), 0, 2, None, skip_unreadable=True)
    skipped = SkippedImages()
    batches = list(SkippingDataLoader(dataset, skipped, batch_size=2))
    assert len(batches) == 1
    images, labels = batches[0]
    assert images.shape == (2, 3, 12, 12) and labels.tolist() == [0, 1]
    assert sorted(skipped.files) == paths[:2] and skipped.summary()["count"] == 2
    assert "UnidentifiedImageError" in skipped.files[paths[0]]


def test_a_class_without_any_readable_image_is_an_error_naming_its_folder(tmp_path):
    dataset_dir = make_tree(tmp_path / "data", per_class=1)
    for image in (dataset_dir / "train" / "c1").iterdir():
        image.write_bytes(b"")
    with pytest.raises(DatasetError, match=f"every image of class folder {dataset_dir / 'train' / 'c1'} is unreadable"):
        run_experiment(folder_config(tmp_path / "data"), tmp_path / "run")


def care_config(**train):
    return tiny_config(method={"name": "care", "brmoe": {"adapter_dim": 4}, "alignment": {"epochs": 1}},
                       train={"epochs": 2, "batch_size": 8, **train})


def test_non_finite_loss_stops_with_the_last_checkpoint_intact_and_resumes(tmp_path, monkeypatch):
    original = CaRE.training_loss

    def nan_in_task_1(self, images, targets, task):
        step = original(self, images, targets, task)
        return StepOutput(step.loss * float("nan")) if task.index == 1 else step

    monkeypatch.setattr(CaRE, "training_loss", nan_in_task_1)
    with pytest.raises(TrainingError, match=r"task 2 first half, epoch 1/1, batch 1: the loss became nan"):
        run_experiment(care_config(), tmp_path / "run")
    store = CheckpointStore(tmp_path / "run")
    assert store.pointer()["resume"] == "learned-0001"
    assert store.open("resume").name == "learned-0001"  # verified against its manifest
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]) == 1
    monkeypatch.setattr(CaRE, "training_loss", original)
    assert len(resume_experiment(tmp_path / "run").top1_curve) == 3


def test_non_finite_alignment_loss_is_a_training_error(tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise FloatingPointError("classifier alignment loss is nan")

    monkeypatch.setattr("carecl.alignment._align_epoch", diverge)
    with pytest.raises(TrainingError, match="task 2 first half: classifier alignment loss is nan"):
        run_experiment(care_config(), tmp_path / "run")
    assert CheckpointStore(tmp_path / "run").open("task_end").name == "learned-0001"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; did you mean 'epochs'"),
        ("data.init_cls=7", "data.init_cls = 7 but dataset 'synthetic' has only 6 classes"),
        ("data.increment=0", "data.increment must be positive"),
        ("backbone.name=vit_nonexistent_patch16", "backbone.name: timm has no model 'vit_nonexistent_patch16'"),
        ("train.checkpoint_every_epochs=-1", "train.checkpoint_every_epochs must be >= 0"),
        ("data.strict=maybe", "data.strict: expected true/false"),
    ],
    ids=["unknown-key", "init-cls-too-large", "increment-zero", "no-such-backbone", "negative-checkpoint-every", "bad-bool"],
)
def test_config_mistakes_fail_before_any_work(tmp_path, capsys, monkeypatch, override, words):
    monkeypatch.setattr("carecl.engine.run.learn_all_tasks", lambda *a, **k: pytest.fail("training started"))
    config_file = tmp_path / "config.yaml"
    save_config(tiny_config(), config_file)
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "run"), "--set", override]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_output_directory_holding_a_run_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    config_file = tmp_path / "config.yaml"
    save_config(tiny_config(data={"synthetic_classes": 2}), config_file)
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "run")]) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    monkeypatch.setattr("carecl.engine.experiment.Experiment.build", lambda *a, **k: pytest.fail("work started"))
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"output directory {tmp_path / 'run'} already holds a run" in err and "--resume" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_train_needs_config_or_resume(capsys):
    assert main(["train"]) == 2
    assert "--config FILE" in capsys.readouterr().err


def test_image_modes_become_rgb(tmp_path):
    make_tree(tmp_path / "data", per_class=1)
    split_dir = tmp_path / "data" / "imagenet-r" / "train"
    paths = [str(split_dir / name / file) for name, file in
             (("c0", "odd.png"), ("c1", "odd.png"), ("c2", "odd.jpg"), ("c0", "palette.png"))]
    dataset = TaskDataset(ImageSplit(paths, np.zeros(4, dtype=np.int64)), np.array([0]), 0, 1, None)
    for index in range(4):
        image, _ = dataset[index]
        assert image.shape == (3, 12, 12) and image.dtype == torch.float32
    grey = dataset[0][0]
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])  # L replicated to 3 channels


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path):
    dataset_dir = make_tree(tmp_path / "data", per_class=1)
    run_experiment(folder_config(tmp_path / "data"), tmp_path / "run")
    save_image(dataset_dir / "train" / "c0" / "new.png", "RGB", 5)
    with pytest.raises(CheckpointError, match=r"the data differ .* \(train 9 -> 10\)"):
        resume_experiment(tmp_path / "run")
