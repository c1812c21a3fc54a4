import json

import numpy as np
import pytest
import torch

from carecl.runs import checkpoints as checkpoint
from carecl.cli.main import main
from carecl.engine import Experiment, load_experiment, run_experiment
from carecl.engine.evaluation import evaluate
from carecl.runs.directory import RunDirectory, RunDirectoryError

from helpers import tiny_config


def test_simplecil_end_to_end_writes_run_directory(tmp_path):
    config = tiny_config()
    summary = run_experiment(config, tmp_path / "run")
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 3 and len(summary.top1_curve) == 3
    assert metrics["summary"]["a_last"] == pytest.approx(summary.a_last)
    assert metrics["class_order"] == np.random.RandomState(1993).permutation(6).tolist()
    assert (run / "metrics.csv").read_text().count("\n") == 4
    assert (run / "config.yaml").is_file() and (run / "learner.safetensors").is_file()
    # Prototypes of synthetic classes separate them far better than chance (1/6).
    assert summary.a_last > 60.0
    # A finished run re-evaluates to exactly its recorded final accuracy.
    experiment = load_experiment(RunDirectory.open(run))
    again = evaluate(experiment.method, experiment.test_loader(6), experiment.device, 2, 2)
    assert again.top1 == pytest.approx(summary.a_last)


def test_output_directory_holding_a_run_is_refused(tmp_path):
    config = tiny_config(data={"synthetic_classes": 2})
    run_experiment(config, tmp_path / "run")
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run_experiment(config, tmp_path / "run")


def test_cli_eval_reports_recorded_accuracy(tmp_path, capsys):
    run_experiment(tiny_config(data={"synthetic_classes": 4}), tmp_path / "run")
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    recorded = float(out.split("recorded ")[1].split(")")[0])
    current = float(out.split("top1 ")[1].split(" ")[0])
    assert current == recorded


def test_cli_data_error_before_training(tmp_path, capsys):
    root = tmp_path / "data" / "imagenet-r"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "test" / "cat").mkdir(parents=True)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{dataset: imagenet-r, root: {tmp_path / 'data'}}}\nbackbone: {{pretrained: false}}\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(root / "train" / "cat") in err
    assert not (tmp_path / "out").exists()


def test_learner_builds_same_backbone_from_config():
    config = tiny_config()
    a, b = Experiment.build(config), Experiment.build(config)
    for (name, p), q in zip(a.method.backbone.named_parameters(), b.method.backbone.parameters()):
        assert torch.equal(p, q), name


class _Stop(BaseException):
    pass


def test_load_learner_reads_the_last_finished_task_even_after_a_mid_task_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(method={"name": "care", "brmoe": {"adapter_dim": 4}, "alignment": {"epochs": 1}},
                         train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1})

    def stop_in_task_2(label):
        if label == "task2/second-half/epoch0/batch0":
            raise _Stop

    monkeypatch.setattr(checkpoint, "kill_point", stop_in_task_2)
    with pytest.raises(_Stop):
        run_experiment(config, tmp_path / "run")
    run = RunDirectory.open(tmp_path / "run")
    pointer = run.checkpoints.pointer()
    assert pointer["resume"] == "learned-0002-phase-1-epoch-0000" and pointer["task_end"] == "learned-0002"
    experiment = load_experiment(run)
    assert experiment.method.n_learned_tasks == 2
    again = evaluate(experiment.method, experiment.test_loader(4), experiment.device, 1, 2)
    assert again.top1 == pytest.approx(run.metrics()["tasks"][1]["top1"])
