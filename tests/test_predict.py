"""Prediction with a trained run: Predictor.load / Predictor.predict and `carecl predict`."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from carecl.cli.main import main
from carecl.data import DatasetError
from carecl.predict import Predictor
from carecl.engine import load_experiment, run_experiment
from carecl.cli.predict import expand_inputs
from carecl.predict import PredictionError
from carecl.runs.directory import CLASSES_FILE, RunDirectory, RunDirectoryError

from helpers import TINY_VIT, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

CARE = {"name": "care", "brmoe": {"adapter_dim": 8, "expert_dim": 4}, "alignment": {"epochs": 2, "samples_per_class": 8}}


@pytest.fixture(scope="module")
def care_run(tmp_path_factory):
    """A three-task CaRE run on synthetic classes (trained once for the module)."""
    run = tmp_path_factory.mktemp("predict") / "run"
    run_experiment(tiny_config(method=CARE), run)
    return run


@pytest.fixture(scope="module")
def experiment(care_run):
    return Predictor.load(care_run)


@pytest.fixture(scope="module")
def randomised_learner(care_run):
    """The run's learner with random BR-MoE weights: briefly trained adapters barely move the features,
    so its task-known and task-free forwards (iterative vs single-pass prediction) would agree."""
    experiment = Predictor.load(care_run)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in experiment.method.model.layers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    experiment.method.model.invalidate_caches()
    return experiment


@pytest.fixture(scope="module")
def test_pixels(experiment):
    """Five test images quantised to 8 bits, so that PNG files hold exactly the same pixels."""
    images = torch.stack([experiment.data.test.samples[i] for i in range(5)])
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


def expected_probabilities(experiment, pixels: torch.Tensor) -> torch.Tensor:
    """What evaluation computes: CaRE's iterative scores (a sum of two softmaxes) or scaled cosine logits."""
    method = experiment.method
    method.eval()
    with torch.no_grad():
        scores = method.predict(pixels)
    if method.options.iter_pred:
        return scores / 2
    return (method.options.scale * scores).softmax(dim=1)


def expected_probabilities_other_branch(experiment, pixels: torch.Tensor, iterative: bool) -> torch.Tensor:
    experiment.method.options.iter_pred = not iterative
    try:
        return expected_probabilities(experiment, pixels)
    finally:
        experiment.method.options.iter_pred = True


@pytest.mark.parametrize("iterative", [True, False])
def test_files_get_the_evaluation_scores_as_probabilities(randomised_learner, test_pixels, tmp_path, iterative):
    experiment = randomised_learner
    experiment.method.options.iter_pred = iterative
    try:
        paths = write_pngs(test_pixels, tmp_path / "images")
        predictions = experiment.predict([str(p) for p in paths], topk=3)
        expected = expected_probabilities(experiment, test_pixels)
    finally:
        experiment.method.options.iter_pred = True
    order, names = experiment.scenario.order, experiment.data.class_names
    # The two predictions really differ here, so each branch is checked against its own formula.
    assert not torch.allclose(expected, expected_probabilities_other_branch(experiment, test_pixels, iterative), atol=2e-4)
    assert [p.source for p in predictions] == [str(p) for p in paths]
    for prediction, row in zip(predictions, expected):
        values, positions = row.topk(3)
        assert [c.class_id for c in prediction.classes] == [int(order[p]) for p in positions]
        assert [c.name for c in prediction.classes] == [names[int(order[p])] for p in positions]
        np.testing.assert_allclose([c.probability for c in prediction.classes], values.numpy(), rtol=1e-5)
    assert expected.sum(dim=1).allclose(torch.ones(5), atol=1e-5)


def test_paths_pil_images_and_tensors_agree(experiment, test_pixels, tmp_path):
    paths = write_pngs(test_pixels, tmp_path / "images")
    from_paths = experiment.predict(paths, topk=6, batch_size=2)
    from_pil = experiment.predict([Image.open(p) for p in paths], topk=6)
    from_tensor = experiment.predict(test_pixels, topk=6)
    for a, b, c in zip(from_paths, from_pil, from_tensor):
        assert [x.class_id for x in a.classes] == [x.class_id for x in b.classes] == [x.class_id for x in c.classes]
        np.testing.assert_allclose([x.probability for x in a.classes], [x.probability for x in c.classes], rtol=1e-5)
        # topk = all seen classes: the probabilities are a distribution.
        assert sum(x.probability for x in a.classes) == pytest.approx(1.0, abs=1e-5)
    assert from_tensor[0].source == "<tensor 0>" and from_pil[1].source == "<image 1>"


def test_unreadable_inputs_become_error_records(experiment, test_pixels, tmp_path):
    paths = write_pngs(test_pixels[:2], tmp_path / "images")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    predictions = experiment.predict([paths[0], broken, tmp_path / "missing.png", paths[1]], topk=2)
    assert [p.ok for p in predictions] == [True, False, False, True]
    assert "broken.png" in predictions[1].error and predictions[1].classes == []
    assert predictions[1].to_dict() == {"image": str(broken), "error": predictions[1].error}
    alone = experiment.predict([paths[1]], topk=2)[0]
    assert [c.class_id for c in predictions[3].classes] == [c.class_id for c in alone.classes]


def test_bad_arguments_are_errors(experiment):
    with pytest.raises(PredictionError, match="topk"):
        experiment.predict(torch.rand(1, 3, 16, 16), topk=0)
    with pytest.raises(PredictionError, match="shape"):
        experiment.predict(torch.rand(16, 16))


def test_directories_expand_to_sorted_image_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b/z.png", "a.JPG", "b/c.jpeg", "notes.txt", ".hidden/x.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    files, problems = expand_inputs([tmp_path, tmp_path / "empty", tmp_path / "given.txt"])
    assert files == [tmp_path / "a.JPG", tmp_path / "b" / "c.jpeg", tmp_path / "b" / "z.png", tmp_path / "given.txt"]
    assert problems == [f"no image files in directory {tmp_path / 'empty'}"]


def test_cli_jsonl_with_a_directory_and_a_broken_file(care_run, experiment, test_pixels, tmp_path, capsys):
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
    reference = experiment.predict(paths, topk=2)
    for record, prediction in zip(records[1:], reference):
        assert [c["class_id"] for c in record["top"]] == [c.class_id for c in prediction.classes]
        assert [c["name"] for c in record["top"]] == [c.name for c in prediction.classes]
        assert record["top"][0]["probability"] == pytest.approx(prediction.classes[0].probability, rel=1e-5)


def test_cli_table(care_run, experiment, test_pixels, tmp_path, capsys):
    (path,) = write_pngs(test_pixels[:1], tmp_path)
    assert main(["predict", "--run", str(care_run), str(path), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "rank", "class", "probability"]
    best = experiment.predict([path], topk=3)[0].classes
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

CLASS_NAMES = ["cat", "dog", "fox", "owl"]


def write_image_folder(root, classes=CLASS_NAMES) -> None:
    generator = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for index, name in enumerate(classes):
            folder = root / "imagenet-r" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(generator.normal(60 * index, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A two-task SimpleCIL run on a 4-class ImageFolder tree (benchmark transforms, 224-pixel tiny ViT)."""
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root / "data")
    backbone = {"name": "vit_tiny_patch16_224", "pretrained": False,
                "model_kwargs": {**TINY_VIT, "img_size": 224, "patch_size": 16}}
    data = {"dataset": "imagenet-r", "root": str(root / "data"), "image_size": None}
    run_experiment(tiny_config(data=data, backbone=backbone), root / "run")
    images = sorted((root / "data" / "imagenet-r" / "test").rglob("*.png"))
    # Copies outside the dataset, so they stay readable while the dataset is moved away.
    shutil.copytree(root / "data" / "imagenet-r" / "test", root / "inputs")
    return root, [root / "inputs" / path.relative_to(root / "data" / "imagenet-r" / "test") for path in images]


@contextlib.contextmanager
def dataset_moved(root):
    (root / "data").rename(root / "moved")
    try:
        yield root / "moved"
    finally:
        (root / "moved").rename(root / "data")


def assert_same_predictions(actual, expected):
    for a, b in zip(actual, expected, strict=True):
        assert [(c.class_id, c.name) for c in a.classes] == [(c.class_id, c.name) for c in b.classes]
        np.testing.assert_allclose([c.probability for c in a.classes], [c.probability for c in b.classes], rtol=1e-6)


def test_prediction_without_the_dataset_uses_the_recorded_class_names(folder_run, capsys):
    root, inputs = folder_run
    recorded = json.loads((root / "run" / CLASSES_FILE).read_text())
    assert recorded == {"n_classes": 4, "names": CLASS_NAMES}
    with_data = Predictor.load(root / "run")
    expected = with_data.predict(inputs, topk=4)
    assert {c.name for p in expected for c in p.classes} == set(CLASS_NAMES)

    with dataset_moved(root):
        experiment = Predictor.load(root / "run")
        assert experiment.data is None and experiment.class_names == CLASS_NAMES
        # The transform evaluation used, rebuilt from the config alone.
        assert repr(experiment.test_transform) == repr(with_data.data.test_transform)
        without = experiment.predict(inputs, topk=4)
        assert main(["predict", "--run", str(root / "run"), str(inputs[0]), "--format", "jsonl"]) == 0
        captured = capsys.readouterr()
        # Evaluation needs the test set: it still fails, naming the missing data.
        assert main(["eval", "--run", str(root / "run")]) == 2
        assert str(root / "data") in capsys.readouterr().err
    assert_same_predictions(without, expected)
    assert captured.err == ""
    record = json.loads(captured.out)
    assert [c["name"] for c in record["top"]] == [c.name for c in expected[0].classes]
    assert [c["probability"] for c in record["top"]] == pytest.approx([c.probability for c in expected[0].classes], rel=1e-6)


def old_run_copy(root, tmp_path):
    """The run as written before classes.json existed."""
    old = tmp_path / "old-run"
    shutil.copytree(root / "run", old)
    (old / CLASSES_FILE).unlink()
    return old


def test_an_old_run_without_classes_json_loads_from_its_dataset(folder_run, tmp_path):
    root, inputs = folder_run
    old = old_run_copy(root, tmp_path)
    experiment = Predictor.load(old)
    assert experiment.data is not None and experiment.class_names == CLASS_NAMES
    assert_same_predictions(experiment.predict(inputs, topk=3), Predictor.load(root / "run").predict(inputs, topk=3))
    assert load_experiment(RunDirectory.open(old)).class_names == CLASS_NAMES


def test_an_old_run_without_its_dataset_is_a_clear_error(folder_run, tmp_path, capsys):
    root, inputs = folder_run
    old = old_run_copy(root, tmp_path)
    with dataset_moved(root) as moved:
        with pytest.raises(RunDirectoryError, match=CLASSES_FILE) as error:
            Predictor.load(old)
        assert str(old / CLASSES_FILE) in str(error.value) and str(root / "data") in str(error.value)
        assert main(["predict", "--run", str(old), str(inputs[0])]) == 2
        assert f"{old / CLASSES_FILE} not found" in capsys.readouterr().err
        # The dataset's new place makes it work again.
        assert main(["predict", "--run", str(old), str(inputs[0]), "--data-root", str(moved), "--format", "jsonl"]) == 0
        record = json.loads(capsys.readouterr().out)
    assert record["top"][0]["name"] in CLASS_NAMES


def test_a_dataset_with_other_classes_fails_evaluation_but_not_prediction(folder_run, tmp_path):
    root, inputs = folder_run
    changed = tmp_path / "changed"
    write_image_folder(changed, classes=["ant", "bee", "cat", "dog"])
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    with pytest.raises(DatasetError, match=f"{CLASSES_FILE}.*class 0 is 'cat' in the record, 'ant' in the dataset"):
        load_experiment(RunDirectory.open(run), need_data=True, data_overrides=[f"data.root={changed}"])
    experiment = Predictor.load(run, data_root=changed)
    assert experiment.data is None and experiment.class_names == CLASS_NAMES
    assert_same_predictions(experiment.predict(inputs, topk=2), Predictor.load(root / "run").predict(inputs, topk=2))


def test_a_damaged_classes_json_is_named(folder_run, tmp_path):
    root, _ = folder_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / CLASSES_FILE).write_text(json.dumps({"n_classes": 4, "names": ["cat", "dog"]}))
    with pytest.raises(RunDirectoryError, match=f"{run / CLASSES_FILE}: expected n_classes"):
        Predictor.load(run)
