"""carecl tune: the search space, the three protocols, the outputs, resume after a kill, parallel workers on one
SQLite study, and no test image read by any trial."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from carecl.cli.main import main
from carecl.config import ConfigError, config_to_dict, load_config
from carecl.engine import Experiment, learn_task
from carecl.engine.experiment import seed_everything
from carecl.engine.loop import evaluate_task
from carecl.tune.overrides import trial_config
from carecl.tune.space import SearchSpace

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
LRS = [0.003, 0.01, 0.03, 0.1]


def write(path: Path, document) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def tiny_files(tmp_path: Path, method: dict | None = None, **sections) -> tuple[Path, Path]:
    config = write(tmp_path / "config.yaml", config_to_dict(tiny_config(method=method, **sections)))
    space = write(tmp_path / "space.yaml", {"train.lr": LRS})
    return config, space


def rows(directory: Path) -> list[dict]:
    with open(directory / "trials.csv", newline="") as stream:
        return list(csv.DictReader(stream))


# ---------------------------------------------------------------- the search space

def test_a_space_reads_choices_and_ranges_and_names_the_key_at_fault(tmp_path):
    space = SearchSpace.from_mapping({"train.lr": {"low": 1e-4, "high": 0.1, "log": True}, "train.epochs": [1, 2],
                                      "method.alignment.epochs": {"low": 5, "high": 30, "step": 5}}, "space.yaml")
    assert space.keys == ["train.lr", "train.epochs", "method.alignment.epochs"]
    assert [p.is_int for p in space.parameters] == [False, False, True]
    config = config_to_dict(tiny_config(method={"name": "care"}))
    space.check_against(config)
    with pytest.raises(ConfigError, match=r"space.yaml: train.lrr = 0.1: unknown config key 'train.lrr'"):
        SearchSpace.from_mapping({"train.lrr": [0.1]}, "space.yaml").check_against(config)
    with pytest.raises(ConfigError, match=r"space.yaml: train.lr = -1: train.lr must be positive"):
        SearchSpace.from_mapping({"train.lr": [-1, 0.1]}, "space.yaml").check_against(config)
    with pytest.raises(ConfigError, match="the grid sampler needs a list of choices for every key; train.lr is a range"):
        SearchSpace.from_mapping({"train.lr": {"low": 0.1, "high": 1.0}}, "s").grid()
    for bad, words in (({"train.lr": []}, "is empty"), ({"train.lr": {"low": 1}}, "give a list of choices or a range"),
                       ({"train.lr": {"low": 0, "high": 1, "log": True}}, "a log range needs low > 0"),
                       ({"lr": [1]}, "dotted config keys")):
        with pytest.raises(ConfigError, match=words):
            SearchSpace.from_mapping(bad, "s")


def test_the_auto_sampler_is_a_grid_only_for_choices_that_fit_in_the_trials():
    space = SearchSpace.from_mapping({"train.lr": LRS, "train.epochs": [1, 2, 3, 4, 5]}, "space.yaml")
    assert space.sampler_for(20) == "grid" and space.sampler_for(19) == "tpe"
    assert SearchSpace.from_mapping({"train.lr": {"low": 1e-3, "high": 0.1}}, "s").sampler_for(100) == "tpe"


def test_a_tune_on_a_list_of_choices_runs_each_once_by_default(tmp_path):
    config, space = tiny_files(tmp_path)  # 4 choices, tune.trials 16: TPE would draw them again and again
    output = tmp_path / "tune"
    assert main(["tune", "--config", str(config), "--space", str(space), "--output", str(output)]) == 0
    assert sorted(float(t["train.lr"]) for t in rows(output) if t["state"] == "complete") == sorted(LRS)
    assert "(grid sampler, seed 0)" in (output / "tune.md").read_text()
    assert load_config(output / "best.yaml").tune.sampler == "grid"


def test_a_tpe_trial_that_draws_finished_values_again_takes_their_score_without_training(tmp_path):
    config, space = tiny_files(tmp_path)
    write(space, {"train.lr": [0.01, 0.03]})  # 4 TPE trials on 2 choices: repeats are certain
    output = tmp_path / "tune"
    assert main(["tune", "--config", str(config), "--space", str(space), "--sampler", "tpe", "--trials", "4",
                 "--output", str(output)]) == 0
    trials = [t for t in rows(output) if t["state"] == "complete"]
    firsts = {t["train.lr"]: t for t in trials if not t["repeat_of"]}
    repeats = [t for t in trials if t["repeat_of"]]
    assert len(trials) == 4 and len(firsts) == len({t["train.lr"] for t in trials}) and repeats
    for t in repeats:
        first = firsts[t["train.lr"]]
        assert t["repeat_of"] == first["trial"] and (t["value"], t["run_dir"]) == (first["value"], first["run_dir"])
    assert sorted(path.name for path in (output / "trials").iterdir()) == sorted(
        Path(t["run_dir"]).name for t in firsts.values())  # nothing trained twice
    assert f"repeats trial {repeats[0]['repeat_of']}: not trained again" in (output / "tune.md").read_text()


def test_a_trial_evaluates_validation_images_only_and_best_yaml_is_the_plain_config():
    base = config_to_dict(tiny_config())
    config = trial_config(base, {"train.lr": 0.01}, max_tasks=1)
    assert (config.eval.test_set, config.data.validation_fraction, config.train.max_tasks) == (False, 0.2, 1)
    assert config.train.lr == 0.01


# ---------------------------------------------------------------- first-task on the demo

def validation_accuracy_of_first_task(config_path: Path, lr: float) -> float:
    """The first task learned at `lr` and scored on its validation images, directly (no tune)."""
    base = config_to_dict(load_config(config_path, ["train.epochs=2"]))
    config = trial_config(base, {"train.lr": lr}, max_tasks=1)
    seed_everything(config.seed)  # as every run starts
    experiment = Experiment.build(config)
    first = experiment.scenario.task(0)
    learn_task(experiment, first)
    return evaluate_task(experiment, first).top1


def test_a_first_task_tune_on_the_demo_picks_the_lr_a_direct_evaluation_finds_best(tmp_path, capsys):
    demo, space = ROOT / "configs" / "demo.yaml", write(tmp_path / "space.yaml", {"train.lr": LRS})
    output = tmp_path / "tune"
    assert main(["tune", "--config", str(demo), "--space", str(space), "--sampler", "grid", "--set", "train.epochs=2",
                 "--set", "tune.tasks=1", "--output", str(output)]) == 0
    direct = {lr: validation_accuracy_of_first_task(demo, lr) for lr in LRS}
    assert len(set(direct.values())) > 1, "the learning rates should give different accuracies on the demo"
    best_lr = max(LRS, key=lambda lr: (direct[lr], -LRS.index(lr)))
    chosen = load_config(output / "best.yaml")
    assert chosen.train.lr == best_lr
    recorded = {float(row["train.lr"]): float(row["value"]) for row in rows(output)}
    assert recorded == pytest.approx(direct)  # each trial's score is exactly the direct evaluation
    # best.yaml is the demo's own config with the chosen lr: the whole stream, its test set.
    assert chosen.eval.test_set and chosen.train.max_tasks is None and chosen.data.validation_fraction is None
    assert (output / "tune.md").read_text().count("| complete |") == 4
    assert (output / "plots" / "history.png").is_file() and (output / "plots" / "parameters.png").is_file()
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if line.startswith("trial ")]) == 4


# ---------------------------------------------------------------- stream, two-stream

def test_a_stream_tune_scores_the_whole_stream_on_validation_and_prunes(tmp_path):
    config, space = tiny_files(tmp_path)
    output = tmp_path / "tune"
    assert main(["tune", "--config", str(config), "--space", str(space), "--protocol", "stream", "--trials", "3",
                 "--set", "tune.metric=average", "--output", str(output)]) == 0
    trials = rows(output)
    assert len([t for t in trials if t["state"] in ("complete", "pruned")]) == 3
    for trial in trials:
        metrics = json.loads((Path(trial["run_dir"]) / "metrics.json").read_text())
        assert metrics["evaluated_on"] == "validation"
        if trial["state"] == "complete":
            assert float(trial["value"]) == pytest.approx(metrics["summary"]["average_accuracy"])
            assert len(metrics["tasks"]) == 3
            per_task = [float(v) for v in trial["per_task"].split()]
            assert per_task == pytest.approx(metrics["tasks"][-1]["group_accuracy"], abs=0.005)


def test_a_two_stream_tune_searches_one_stream_then_runs_the_choice_on_the_other(tmp_path):
    config, space = tiny_files(tmp_path, tune={"protocol": "two-stream", "trials": 2, "sampler": "grid",
                                               "stream": ["data.class_order=[5, 4, 3, 2, 1, 0]"]})
    output = tmp_path / "tune"
    assert main(["tune", "--config", str(config), "--space", str(space), "--output", str(output)]) == 0
    trial = json.loads((Path(rows(output)[0]["run_dir"]) / "metrics.json").read_text())
    assert trial["class_order"] == [5, 4, 3, 2, 1, 0] and trial["evaluated_on"] == "validation"
    final = json.loads((output / "final" / "metrics.json").read_text())
    assert final["evaluated_on"] == "test" and final["class_order"] != [5, 4, 3, 2, 1, 0]
    assert "Evaluation stream, chosen values, test set" in (output / "tune.md").read_text()


# ---------------------------------------------------------------- no test image

def write_image_folder(root: Path) -> None:
    rng = np.random.RandomState(0)
    for split, count in (("train", 10), ("test", 3)):
        for name in ("a", "b", "c", "d"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_no_trial_reads_a_test_image(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images")
    config, space = tiny_files(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "images"),
                                               "num_workers": 0, "image_size": 16, "init_cls": 2, "increment": 2})
    opened = []
    import carecl.data.base as base

    original = base.load_rgb_image
    monkeypatch.setattr(base, "load_rgb_image", lambda path: (opened.append(str(path)), original(path))[1])
    assert main(["tune", "--config", str(config), "--space", str(space), "--protocol", "stream", "--trials", "2",
                 "--output", str(tmp_path / "tune")]) == 0
    assert any("/train/" in path for path in opened)
    assert [path for path in opened if "/test/" in path] == []


# ---------------------------------------------------------------- resume, parallel workers

KILLING_DRIVER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from carecl.tune import study
original = study.Objective.run
calls = [0]
def run(config, run_dir, report):
    calls[0] += 1
    if calls[0] == 2:  # the second trial is stopped after its first task, its checkpoint written
        def report_then_die(progress):
            os.kill(os.getpid(), getattr(signal, os.environ["KILL_WITH"]))
        return original(config, run_dir, report_then_die)
    return original(config, run_dir, report)
study.Objective.run = staticmethod(run)
from carecl.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


# SIGKILL leaves the trial marked running; Ctrl-C lets Optuna mark it failed, which a grid counts as visited.
@pytest.mark.parametrize("signal_name, exit_code", [("SIGKILL", -9), ("SIGINT", 130)])
def test_a_killed_tune_resumes_without_redoing_finished_trials(tmp_path, monkeypatch, signal_name, exit_code):
    config, space = tiny_files(tmp_path)
    output = tmp_path / "tune"
    killed = subprocess.run([sys.executable, "-c", KILLING_DRIVER, "tune", "--config", str(config), "--space", str(space),
                             "--protocol", "stream", "--sampler", "grid", "--output", str(output)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_WITH": signal_name})
    assert killed.returncode == exit_code, killed.stderr[-2000:]
    from carecl.tune import study

    started = []
    original = study.Objective.run
    monkeypatch.setattr(study.Objective, "run",
                        staticmethod(lambda config, run_dir, report: (started.append(Path(run_dir).name),
                                                                      original(config, run_dir, report))[1]))
    assert main(["tune", "--resume", str(output)]) == 0
    trials = rows(output)
    finished = [t for t in trials if t["state"] == "complete"]
    assert len(finished) == 4 and sorted(float(t["train.lr"]) for t in finished) == sorted(LRS)
    # The first trial finished before the kill and is not redone; the killed one resumes its own run directory.
    assert started[0] == "trial-0001" and "trial-0000" not in started and len(started) == 3
    log = (output / "trials" / "trial-0001" / "log.txt").read_text()
    assert "resuming" in log


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    config, space = tiny_files(tmp_path)
    output = tmp_path / "tune"
    completed = subprocess.run([sys.executable, "-m", "carecl", "tune", "--config", str(config), "--space", str(space),
                                "--sampler", "grid", "--jobs", "2", "--output", str(output)],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    trials = [t for t in rows(output) if t["state"] == "complete"]
    assert sorted(float(t["train.lr"]) for t in trials) == sorted(LRS)  # each grid point once, over both processes
    assert len({t["run_dir"] for t in trials}) == 4


def scored_study(scores: dict[float, float]):
    """A study whose finished trials scored `scores` (lr → value), in that order."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(direction="maximize")
    lrs = CategoricalDistribution(LRS)
    for lr, value in scores.items():
        study.add_trial(optuna.trial.create_trial(params={"train.lr": lr}, distributions={"train.lr": lrs}, value=value))
    return study


def test_a_tie_goes_to_the_values_nearest_the_configs_own():
    from carecl.tune.choice import best_trial

    study = scored_study({0.003: 100.0, 0.1: 100.0, 0.03: 100.0, 0.01: 90.0})
    assert best_trial(study, {"train": {"lr": 0.05}}).params == {"train.lr": 0.03}
    assert best_trial(study, {"train": {"lr": 0.002}}).params == {"train.lr": 0.003}


def test_a_tolerance_widens_the_tie_towards_the_configs_own_values():
    from carecl.tune.choice import best_trial

    study = scored_study({0.1: 93.75, 0.01: 93.12, 0.003: 91.0})
    config = {"train": {"lr": 0.004}}
    assert best_trial(study, config).params == {"train.lr": 0.1}
    assert best_trial(study, config, tolerance=1.0).params == {"train.lr": 0.01}
    assert best_trial(study, config, tolerance=3.0).params == {"train.lr": 0.003}
    with pytest.raises(ConfigError, match=r"tune.tolerance must be >= 0"):
        tiny_config(tune={"tolerance": -1})


def test_a_chosen_trial_that_already_loses_a_task_is_warned_about():
    import optuna
    from optuna.distributions import CategoricalDistribution

    from carecl.tune.outputs import summary, weak_task_warning
    from carecl.tune.study import PER_TASK_ATTR, TuneSetup

    def trial(per_task):
        lrs = {"train.lr": CategoricalDistribution(LRS)}
        return optuna.trial.create_trial(params={"train.lr": 0.01}, distributions=lrs,
                                         value=sum(per_task) / len(per_task), user_attrs={PER_TASK_ATTR: per_task})

    assert weak_task_warning(trial([94.0, 98.75])) is None
    assert weak_task_warning(trial([64.0])) is None  # one task: nothing left behind yet
    warning = weak_task_warning(trial([65.0, 38.75]))
    assert "38.75 % on task 2's validation images after learning 2 tasks" in warning
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial([65.0, 38.75]))
    setup = TuneSetup(config=config_to_dict(tiny_config()), space={"train.lr": LRS}, space_source="space.yaml",
                      storage="", study_name="s")
    text = summary(setup, Path("."), study, study.trials[0], [], None)
    assert "per task at the end: 65.00 38.75" in text and f"**warning**: {warning}" in text


def test_a_chosen_value_at_the_end_of_its_space_is_warned_about():
    from carecl.tune.outputs import summary
    from carecl.tune.study import TuneSetup

    space = SearchSpace.from_mapping({"train.lr": LRS, "train.epochs": [1, 2],
                                      "method.alignment.lr": {"low": 1e-4, "high": 0.1, "log": True}}, "s")
    assert space.ends_reached({"train.lr": 0.003, "train.epochs": 1, "method.alignment.lr": 0.095}) == [
        "train.lr = 0.003 is the lowest of its choices", "method.alignment.lr = 0.095 is at the high end of its range"]
    assert space.ends_reached({"train.lr": 0.1, "train.epochs": 2, "method.alignment.lr": 0.0001}) == [
        "train.lr = 0.1 is the highest of its choices", "method.alignment.lr = 0.0001 is at the low end of its range"]
    # Inside the space (two choices have no inside; 0.003 is mid-range on the log scale): nothing to say.
    assert space.ends_reached({"train.lr": 0.01, "train.epochs": 2, "method.alignment.lr": 0.003}) == []
    setup = TuneSetup(config=config_to_dict(tiny_config()), space={"train.lr": LRS}, space_source="space.yaml",
                      storage="", study_name="s")
    for lr, warned in ((0.003, True), (0.03, False)):
        study = scored_study({lr: 90.0})
        text = summary(setup, Path("."), study, study.trials[0], [], None)
        assert (f"**warning**: the chosen train.lr = {lr} is the lowest of its choices: values beyond it were not "
                "tried" in text) == warned, text


def test_the_progress_line_names_the_trial_best_yaml_would_take(caplog):
    from carecl.tune.study import ProgressLine, TuneSetup

    study = scored_study({0.1: 93.75, 0.01: 93.12})
    config = config_to_dict(tiny_config(train={"lr": 0.004}, tune={"tolerance": 1.0}))
    setup = TuneSetup(config=config, space={"train.lr": LRS}, space_source="space.yaml", storage="", study_name="s")
    with caplog.at_level("INFO", logger="carecl"):
        ProgressLine(setup)(study, study.trials[-1])
    assert "best 93.12 (trial 1)" in caplog.text  # Optuna's own best is trial 0 (93.75)
