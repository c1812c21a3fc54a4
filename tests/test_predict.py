"""Prediction with a trained run: Learner.load / Learner.predict and `carecl predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from carecl.cli import main
from carecl.engine import Learner, run_experiment
from carecl.predict import PredictionError, expand_inputs, load_for_prediction

from conftest import TINY_VIT, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

CARE = {"name": "care", "adapter_dim": 8, "expert_dim": 4, "alignment": {"epochs": 2, "samples_per_class": 8}}


@pytest.fixture(scope="module")
def care_run(tmp_path_factory):
    """A three-task CaRE run on synthetic classes (trained once for the module)."""
    run = tmp_path_factory.mktemp("predict") / "run"
    run_experiment(tiny_config(method=CARE), run)
    return run


@pytest.fixture(scope="module")
def learner(care_run):
    return Learner.load(care_run)


@pytest.fixture(scope="module")
def randomised_learner(care_run):
    """The run's learner with random BR-MoE weights: briefly trained adapters barely move the features,
    so its task-known and task-free forwards (iterative vs single-pass prediction) would agree."""
    learner = Learner.load(care_run)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in learner.method.model.layers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    learner.method.model.invalidate_caches()
    return learner


@pytest.fixture(scope="module")
def test_pixels(learner):
    """Five test images quantised to 8 bits, so that PNG files hold exactly the same pixels."""
    images = torch.stack([learner.data.test.samples[i] for i in range(5)])
    return torch.round(images * 255) / 255


def write_pngs(pixels: torch.Tensor, folder) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(pixels):
        path = folder / f"image{index}.png"
        array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def expected_probabilities(learner, pixels: torch.Tensor) -> torch.Tensor:
    """What evaluation computes: CaRE's iterative scores (a sum of two softmaxes) or scaled cosine logits."""
    method = learner.method
    method.eval()
    with torch.no_grad():
        scores = method.predict(pixels)
    if method.options.iter_pred:
        return scores / 2
    return (method.options.scale * scores).softmax(dim=1)


def expected_probabilities_other_branch(learner, pixels: torch.Tensor, iterative: bool) -> torch.Tensor:
    learner.method.options.iter_pred = not iterative
    try:
        return expected_probabilities(learner, pixels)
    finally:
        learner.method.options.iter_pred = True


@pytest.mark.parametrize("iterative", [True, False])
def test_files_get_the_evaluation_scores_as_probabilities(randomised_learner, test_pixels, tmp_path, iterative):
    learner = randomised_learner
    learner.method.options.iter_pred = iterative
    try:
        paths = write_pngs(test_pixels, tmp_path / "images")
        predictions = learner.predict([str(p) for p in paths], topk=3)
        expected = expected_probabilities(learner, test_pixels)
    finally:
        learner.method.options.iter_pred = True
    order, names = learner.scenario.order, learner.data.class_names
    # The two predictions really differ here, so each branch is checked against its own formula.
    assert not torch.allclose(expected, expected_probabilities_other_branch(learner, test_pixels, iterative), atol=2e-4)
    assert [p.source for p in predictions] == [str(p) for p in paths]
    for prediction, row in zip(predictions, expected):
        values, positions = row.topk(3)
        assert [c.class_id for c in prediction.classes] == [int(order[p]) for p in positions]
        assert [c.name for c in prediction.classes] == [names[int(order[p])] for p in positions]
        np.testing.assert_allclose([c.probability for c in prediction.classes], values.numpy(), rtol=1e-5)
    assert expected.sum(dim=1).allclose(torch.ones(5), atol=1e-5)


def test_paths_pil_images_and_tensors_agree(learner, test_pixels, tmp_path):
    paths = write_pngs(test_pixels, tmp_path / "images")
    from_paths = learner.predict(paths, topk=6, batch_size=2)
    from_pil = learner.predict([Image.open(p) for p in paths], topk=6)
    from_tensor = learner.predict(test_pixels, topk=6)
    for a, b, c in zip(from_paths, from_pil, from_tensor):
        assert [x.class_id for x in a.classes] == [x.class_id for x in b.classes] == [x.class_id for x in c.classes]
        np.testing.assert_allclose([x.probability for x in a.classes], [x.probability for x in c.classes], rtol=1e-5)
        # topk = all seen classes: the probabilities are a distribution.
        assert sum(x.probability for x in a.classes) == pytest.approx(1.0, abs=1e-5)
    assert from_tensor[0].source == "<tensor 0>" and from_pil[1].source == "<image 1>"


def test_unreadable_inputs_become_error_records(learner, test_pixels, tmp_path):
    paths = write_pngs(test_pixels[:2], tmp_path / "images")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    predictions = learner.predict([paths[0], broken, tmp_path / "missing.png", paths[1]], topk=2)
    assert [p.ok for p in predictions] == [True, False, False, True]
    assert "broken.png" in predictions[1].error and predictions[1].classes == []
    assert predictions[1].to_dict() == {"image": str(broken), "error": predictions[1].error}
    alone = learner.predict([paths[1]], topk=2)[0]
    assert [c.class_id for c in predictions[3].classes] == [c.class_id for c in alone.classes]


def test_bad_arguments_are_errors(learner):
    with pytest.raises(PredictionError, match="topk"):
        learner.predict(torch.rand(1, 3, 16, 16), topk=0)
    with pytest.raises(PredictionError, match="shape"):
        learner.predict(torch.rand(16, 16))


def test_directories_expand_to_sorted_image_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b/z.png", "a.JPG", "b/c.jpeg", "notes.txt", ".hidden/x.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    files, problems = expand_inputs([tmp_path, tmp_path / "empty", tmp_path / "given.txt"])
    assert files == [tmp_path / "a.JPG", tmp_path / "b" / "c.jpeg", tmp_path / "b" / "z.png", tmp_path / "given.txt"]
    assert problems == [f"no image files in directory {tmp_path / 'empty'}"]


def test_cli_jsonl_with_a_directory_and_a_broken_file(care_run, learner, test_pixels, tmp_path, capsys):
    paths = write_pngs(test_pixels[:3], tmp_path / "images" / "nested")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG truncated")
    code = main(["predict", "--run", str(care_run), str(tmp_path / "images"), "--topk", "2", "--format", "jsonl",
                 "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["image"] for r in records] == [str(tmp_path / "images" / "broken.png"), *map(str, paths)]
    assert "error" in records[0] and "top" not in records[0]
    assert "broken.png" in captured.err
    reference = learner.predict(paths, topk=2)
    for record, prediction in zip(records[1:], reference):
        assert [c["class_id"] for c in record["top"]] == [c.class_id for c in prediction.classes]
        assert [c["name"] for c in record["top"]] == [c.name for c in prediction.classes]
        assert record["top"][0]["probability"] == pytest.approx(prediction.classes[0].probability, rel=1e-5)


def test_cli_table(care_run, learner, test_pixels, tmp_path, capsys):
    (path,) = write_pngs(test_pixels[:1], tmp_path)
    assert main(["predict", "--run", str(care_run), str(path), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "rank", "class", "probability"]
    best = learner.predict([path], topk=3)[0].classes
    assert lines[1].split() == [str(path), "1", best[0].name, f"{best[0].probability:.4f}"]
    assert [line.split()[:2] for line in lines[2:]] == [["2", best[1].name], ["3", best[2].name]]


def test_cli_fails_when_nothing_could_be_classified(care_run, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    assert main(["predict", "--run", str(care_run), str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "none of the 1 images could be classified" in err
    assert main(["predict", "--run", str(care_run), str(tmp_path / "nothing-here")]) == 2


# ---- an ImageFolder run whose dataset has moved away


def write_image_folder(root, classes=("cat", "dog", "fox", "owl")) -> None:
    generator = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for index, name in enumerate(classes):
            folder = root / "imagenet-r" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(generator.normal(60 * index, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_prediction_without_the_dataset_names_classes_by_id(tmp_path, capsys):
    write_image_folder(tmp_path / "data")
    backbone = {"name": "vit_tiny_patch16_224", "pretrained": False,
                "model_kwargs": {**TINY_VIT, "img_size": 224, "patch_size": 16}}
    config = tiny_config(data={"dataset": "imagenet-r", "root": str(tmp_path / "data")}, backbone=backbone)
    run_experiment(config, tmp_path / "run")
    images = sorted((tmp_path / "data" / "imagenet-r" / "test").rglob("*.png"))
    with_data = Learner.load(tmp_path / "run").predict(images, topk=4)
    assert {c.name for p in with_data for c in p.classes} == {"cat", "dog", "fox", "owl"}

    (tmp_path / "data").rename(tmp_path / "moved")
    warnings = []
    learner = load_for_prediction(tmp_path / "run", warn=warnings.append)
    assert len(warnings) == 1 and str(tmp_path / "data") in warnings[0]
    moved = [tmp_path / "moved" / path.relative_to(tmp_path / "data") for path in images]
    without = learner.predict(moved, topk=4)
    for a, b in zip(with_data, without):
        assert [c.class_id for c in a.classes] == [c.class_id for c in b.classes]
        assert [c.name for c in b.classes] == [f"class {c.class_id}" for c in a.classes]
        np.testing.assert_allclose([c.probability for c in a.classes], [c.probability for c in b.classes], rtol=1e-5)

    assert main(["predict", "--run", str(tmp_path / "run"), str(moved[0]), "--format", "jsonl",
                 "--data-root", str(tmp_path / "moved")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    record = json.loads(captured.out)
    assert [c["name"] for c in record["top"][:1]] == [with_data[0].classes[0].name]
