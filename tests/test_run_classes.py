"""classes.json: the classes a run records, and the learner built from them without the dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from carecl.compat import import_reference
from carecl.compat.reference_layout import ReferenceCheckpointError
from carecl.data import DatasetError, build_dataset
from carecl.predict import Predictor
from carecl.engine import Experiment, run_experiment
from carecl.preprocessing import evaluation_transform
from carecl.engine.checkpointing import grow_and_load
from carecl.runs.directory import CLASSES_FILE, RunClasses, RunDirectory, RunDirectoryError

from helpers import N_CLASSES, TASK_SIZES, TINY, release_care_config, release_checkpoint, save, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("data", [{"dataset": "synthetic"}, {"dataset": "digits"}, {"dataset": "glyphs"}])
def test_the_transform_without_data_is_the_datasets(data):
    config = tiny_config(data=data)
    built = build_dataset(config.data)
    assert evaluation_transform(config) is built.test_transform  # the module-level identity


def test_a_dataset_without_transforms_cannot_be_predicted_without_data():
    config = tiny_config(data={"dataset": "imagenett"})
    with pytest.raises(DatasetError, match="data.dataset: unknown dataset 'imagenett'"):
        Experiment.for_inference(config, RunClasses(6))


def test_a_trained_run_records_its_datasets_classes(tmp_path):
    config = tiny_config(data={"synthetic_classes": 4})
    run_experiment(config, tmp_path / "run")
    names = build_dataset(config.data).class_names
    assert json.loads((tmp_path / "run" / CLASSES_FILE).read_text()) == {"n_classes": 4, "names": names}
    assert RunDirectory(tmp_path / "run").classes() == RunClasses(4, tuple(names))


def test_a_learner_for_inference_has_the_trained_scenario_and_outputs(tmp_path):
    config = tiny_config(data={"synthetic_classes": 4})
    run_experiment(config, tmp_path / "run")
    run = RunDirectory.open(tmp_path / "run")
    with_data = Predictor.load(run.path)
    without = Experiment.for_inference(run.config_for_loading(), run.classes())
    np.testing.assert_array_equal(without.scenario.order, with_data.scenario.order)
    assert without.scenario.sizes == with_data.scenario.sizes and without.data is None
    # Loaded from the checkpoint, it computes what the learner with data computes.
    grow_and_load(without, *run.load_state(), run.path)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with_data.method.eval()
    without.method.eval()
    with torch.no_grad():
        assert torch.equal(without.method.predict(x), with_data.method.predict(x))


def test_recorded_classes_validate_and_name_unknown_classes_by_id(tmp_path):
    assert RunClasses(3).names_by_id() == ["class 0", "class 1", "class 2"]
    assert RunClasses(2, ("a", "b")).difference(["a", "b"]) is None
    assert RunClasses(2).difference(["x", "y"]) is None
    assert RunClasses(2).difference(["x"]) == "2 classes recorded, 1 in the dataset"
    with pytest.raises(RunDirectoryError, match="3 class names given for 2 classes"):
        RunClasses(2, ("a", "b", "c"))
    run = RunDirectory.create(tmp_path / "run", tiny_config(), n_classes=5)
    assert run.classes() == RunClasses(5, None)
    for damaged in ("[1, 2]", '{"n_classes": 0, "names": null}', '{"n_classes": 2, "names": ["a", 3]}', "{"):
        (run.path / CLASSES_FILE).write_text(damaged)
        with pytest.raises(RunDirectoryError, match=str(run.path / CLASSES_FILE)):
            run.classes()
    assert RunDirectory(tmp_path / "elsewhere").classes() is None


# ---- imported release checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(release_checkpoint(TINY, TASK_SIZES, N_CLASSES), tmp_path_factory.mktemp("release") / "care.pth")


def imported_without_data(checkpoint, output, **kwargs):
    """An import whose dataset (an ImageFolder benchmark under a missing root) is not at hand."""
    config = release_care_config(dataset="imagenet-r", root=str(output.parent / "no-data"))
    import_reference(checkpoint, config, output, **kwargs)
    return Predictor.load(output)


def test_an_import_records_the_class_count_and_given_names(checkpoint, tmp_path):
    names = [f"species {i}" for i in range(N_CLASSES)]
    unnamed = imported_without_data(checkpoint, tmp_path / "unnamed")
    named = imported_without_data(checkpoint, tmp_path / "named", class_names=names)
    assert json.loads((tmp_path / "unnamed" / CLASSES_FILE).read_text()) == {"n_classes": N_CLASSES, "names": None}
    assert unnamed.data is None and named.data is None
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # tensors: already transformed
    by_id, by_name = unnamed.predict(x, topk=3), named.predict(x, topk=3)
    for a, b in zip(by_id, by_name, strict=True):
        assert [c.class_id for c in a.classes] == [c.class_id for c in b.classes]
        assert [c.name for c in a.classes] == [f"class {c.class_id}" for c in a.classes]
        assert [c.name for c in b.classes] == [names[c.class_id] for c in b.classes]
        np.testing.assert_allclose([c.probability for c in a.classes], [c.probability for c in b.classes], rtol=1e-6)
    with pytest.raises(ReferenceCheckpointError, match=f"2 class names given, but the model's dataset has {N_CLASSES}"):
        import_reference(checkpoint, release_care_config(), tmp_path / "bad", class_names=["a", "b"])
    assert not (tmp_path / "bad").exists()
