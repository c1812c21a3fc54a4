"""carecl learn and carecl.ContinualLearner: a finished run learns new classes later, exactly as if they had been the
last task of its stream; refusals change nothing on disk; a killed learn resumes to the same numbers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carecl.cli.main import main
from carecl.config import config_to_dict
from carecl.engine import resume_experiment, run_experiment

from helpers import DEMO_BACKBONE, Interrupted, assert_same_outcome, interrupt_at, outcome, tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIRST, LATER = ["apple", "bread", "cheese", "dates"], ["figs", "grapes"]


def write_classes(root: Path, classes: list[str], train: int = 8, test: int = 3, size: int = 16, test_split=True) -> Path:
    """Tiny PNGs whose colour and stripe depend on the class (learnable), noise on top."""
    rng = np.random.RandomState(sum(map(ord, "".join(classes))))
    for split, count in (("train", train), ("test", test)) if test_split else (("train", train),):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            key = sum(map(ord, name))
            for i in range(count):
                pixels = rng.randint(0, 60, (size, size, 3)).astype(np.uint8)
                pixels[:, :, key % 3] += np.uint8(100 + key % 90)
                pixels[key % size:, :, (key + 1) % 3] += 80
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    return {"first": write_classes(base / "first", FIRST), "later": write_classes(base / "later", LATER),
            "again": write_classes(base / "again", ["apple", "kiwi"]),
            "bigger": write_classes(base / "bigger", ["kiwi"], size=24)}


def stream_config(folders, method: dict, **sections):
    data = {"dataset": "imagefolder", "root": str(folders["first"]), "image_size": 16, "init_cls": 2, "increment": 2,
            "num_workers": 0, **sections.pop("data", {})}
    return tiny_config(method=method, data=data, backbone=DEMO_BACKBONE, **sections)


def with_additions(config, folders):
    document = config_to_dict(config)
    document["data"]["additions"] = [{"root": str(folders["later"].resolve()), "classes": LATER}]
    from carecl.config import config_from_dict

    return config_from_dict(document)


EQUIVALENT = {
    "care": {"name": "care", "brmoe": {"adapter_dim": 4, "expert_dim": 4}, "alignment": {"epochs": 1, "samples_per_class": 4}},
    "simplecil": {"name": "simplecil"},  # frozen features
    "ease": {"name": "ease", "adapter": {"bottleneck": 4}},  # an adapter set added per task
    "l2p": {"name": "l2p", "pool_size": 4, "top_k": 2, "prompt_length": 2},  # prompts
    "min": {"name": "min", "noise": {"hidden": 8}, "buffer_size": 32, "fit_batch_size": 16, "later_epochs": 1},  # analytic
    "tuna": {"name": "tuna", "adapter": {"bottleneck": 4}, "alignment": {"epochs": 1, "samples_per_class": 4}},  # task sets
}


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_learning_later_equals_a_stream_that_had_the_new_task_at_the_end(name, folders, tmp_path):
    # No weight decay: a head over every class of the stream decays the rows of classes not yet learned otherwise.
    config = stream_config(folders, EQUIVALENT[name], train={"epochs": 2, "weight_decay": 0.0})
    torch.use_deterministic_algorithms(True)
    try:
        run_experiment(config, tmp_path / "later")
        from carecl.engine.learn import learn

        learn(tmp_path / "later", folders["later"])
        run_experiment(with_additions(config, folders), tmp_path / "whole")
    finally:
        torch.use_deterministic_algorithms(False)
    later, whole = outcome(tmp_path / "later"), outcome(tmp_path / "whole")
    assert later[0] == whole[0]
    assert later[1].keys() == whole[1].keys()
    for key, value in whole[1].items():
        assert torch.equal(later[1][key], value), key
    classes = json.loads((tmp_path / "later" / "classes.json").read_text())
    assert classes["names"] == [*FIRST, *LATER] and classes["n_classes"] == 6


def directory_state(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "log.txt"}


@pytest.fixture(scope="module")
def finished_run(folders, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "care"
    run_experiment(stream_config(folders, EQUIVALENT["care"]), run)
    return run


def test_refusals_change_nothing_on_disk(finished_run, folders, tmp_path, capsys):
    before = directory_state(finished_run)
    cases = [
        ([str(folders["again"])], "already knows class(es) 'apple'"),
        ([str(folders["later"]), "--set", "method.scale=10"], "carecl learn may change only"),
        ([str(tmp_path / "nowhere")], "does not exist"),
        ([str(folders["later"]), "--test-fraction", "0.3"], "drop --test-fraction"),
    ]
    for arguments, words in cases:
        assert main(["learn", "--run", str(finished_run), *arguments]) == 2
        assert words in capsys.readouterr().err
        assert directory_state(finished_run) == before


def test_a_run_whose_data_moved_is_refused_until_told_where(finished_run, folders, tmp_path, capsys):
    moved = tmp_path / "moved"
    run = tmp_path / "run"
    import shutil

    shutil.copytree(finished_run, run)
    shutil.copytree(folders["first"], moved)
    config = (run / "config.yaml").read_text().replace(str(folders["first"]), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(config)
    assert main(["learn", "--run", str(run), str(folders["later"])]) == 2
    assert "gone does not exist" in capsys.readouterr().err
    assert main(["learn", "--run", str(run), str(folders["later"]), "--data-root", str(moved)]) == 0
    assert json.loads((run / "metrics.json").read_text())["task_sizes"] == [2, 2, 2]


def test_an_unfinished_or_running_run_is_refused(folders, tmp_path, capsys, monkeypatch):
    config = stream_config(folders, EQUIVALENT["simplecil"])
    interrupt_at(monkeypatch, "checkpoint/learned-0001/switched")
    with pytest.raises(Interrupted):
        run_experiment(config, tmp_path / "run")
    monkeypatch.undo()
    assert main(["learn", "--run", str(tmp_path / "run"), str(folders["later"])]) == 2
    assert "has not finished its first task: finish it first" in capsys.readouterr().err
    resume_experiment(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
                               str(tmp_path / "run" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["learn", "--run", str(tmp_path / "run"), str(folders["later"])]) == 2
        assert "in use by another carecl process" in capsys.readouterr().err
    finally:
        holder.kill()


def test_images_the_run_cannot_take_are_refused(folders, tmp_path, capsys):
    # Transforms that do not resize (in-memory recipes): 24-pixel images do not fit a 16-pixel ViT.
    config = stream_config(folders, EQUIVALENT["simplecil"], data={"transforms": "in_memory"})
    run_experiment(config, tmp_path / "run")
    before = directory_state(tmp_path / "run")
    assert main(["learn", "--run", str(tmp_path / "run"), str(folders["bigger"])]) == 2
    assert "the backbone takes (3, 16, 16) images" in capsys.readouterr().err
    assert directory_state(tmp_path / "run") == before


def test_a_killed_learn_resumes_to_the_same_numbers(folders, tmp_path, monkeypatch):
    from carecl.engine.learn import learn

    config = stream_config(folders, EQUIVALENT["care"], train={"epochs": 2, "checkpoint_every_epochs": 1})
    torch.use_deterministic_algorithms(True)
    try:
        for name in ("reference", "killed"):
            run_experiment(config, tmp_path / name)
        learn(tmp_path / "reference", folders["later"])
        interrupt_at(monkeypatch, "task2/first-half/epoch0/batch0")
        with pytest.raises(Interrupted):
            learn(tmp_path / "killed", folders["later"])
        monkeypatch.undo()
        assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same_outcome(tmp_path / "killed", outcome(tmp_path / "reference"))


def test_predict_after_learning_names_the_new_classes(finished_run, folders, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["learn", "--run", str(run), str(folders["later"]), "--set", "train.epochs=2"]) == 0
    config = (run / "config.yaml").read_text()
    assert "train.epochs=2" in config and "epochs: 2" in config  # recorded with the addition, applied from then on
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(folders["later"] / "test"), "--format", "jsonl", "--topk", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    named = {entry["top"][0]["name"] for entry in lines}
    assert {c["name"] for c in lines[0]["top"]} == {*FIRST, *LATER}
    assert named & set(LATER), "the new classes are predicted"


def test_the_python_example_runs(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "examples" / "learn_over_time.py"), str(tmp_path)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "learned 6 classes" in completed.stdout and "saved to" in completed.stdout


def test_the_python_api_learns_folders_pairs_and_datasets(folders, tmp_path):
    import carecl

    learner = carecl.ContinualLearner.from_config(stream_config(folders, EQUIVALENT["simplecil"]), tmp_path / "learner")
    learner.learn(folders["first"] / "train", test_data=folders["first"] / "test", increment=2)
    assert learner.classes == FIRST
    pairs = [(Image.open(path).copy(), path.parent.name)
             for path in sorted((folders["later"] / "train").rglob("*.png"))]
    learner.learn(pairs)
    assert learner.classes == [*FIRST, *LATER]
    images = sorted((folders["later"] / "test").rglob("*.png"))
    predictions = learner.predict([str(p) for p in images])
    assert all(p.class_name in learner.classes and 0 < p.probability <= 1 for p in predictions)
    scores = learner.evaluate(folders["first"] / "test")
    assert scores["n_images"] == 12 and 0 <= scores["top1"] <= 100
    copy = learner.save(tmp_path / "copy")
    assert main(["eval", "--run", str(copy)]) == 0  # an ordinary run directory, data inside it included
    again = carecl.ContinualLearner.load(copy)
    assert [p.class_name for p in again.predict([str(p) for p in images])] == [p.class_name for p in predictions]
