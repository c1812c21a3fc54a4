import json

import numpy as np
import pytest
import torch

from carecl.cli import main
from carecl.engine import Learner, load_learner, run_experiment
from carecl.evaluation import evaluate
from carecl.rundir import RunDirectory, RunDirectoryError

from conftest import tiny_config


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
    learner = load_learner(RunDirectory.open(run))
    again = evaluate(learner.method, learner.test_loader(6), learner.device, 2, 2)
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
    a, b = Learner.build(config), Learner.build(config)
    for (name, p), q in zip(a.method.backbone.named_parameters(), b.method.backbone.parameters()):
        assert torch.equal(p, q), name
