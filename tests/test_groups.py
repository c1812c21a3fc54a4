"""Seed groups: `seed: [..]` (or --seeds) runs one run per seed under a group directory with mean ± std in
group.json; the class order follows each seed; an interrupted group resumes; `carecl report GROUP` adds the
mean ± std table and band figure; a list of seeds is refused where one run is meant."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from carecl.cli.main import main
from carecl.config import ConfigError
from carecl.engine import Experiment, run_experiment
from carecl.engine.groups import resume_group, run_group
from carecl.runs.directory import RunDirectoryError
from carecl.runs.group import read_group

from helpers import tiny_config

SEEDS = [3, 4, 5]


def group_config(**sections):
    config = tiny_config(**sections)
    config.seed = list(SEEDS)
    return config


def test_a_group_runs_one_run_per_seed_and_summarises_them(tmp_path):
    summaries = run_group(group_config(), tmp_path / "group")
    document = read_group(tmp_path / "group")
    assert document["seeds"] == SEEDS and document["finished"] == SEEDS
    a_last = [summaries[seed].a_last for seed in SEEDS]
    assert document["summary"]["a_last"]["mean"] == pytest.approx(np.mean(a_last))
    assert document["summary"]["a_last"]["std"] == pytest.approx(np.std(a_last, ddof=1))
    orders = {tuple(Experiment.build(tiny_config(seed=seed)).scenario.order.tolist()) for seed in SEEDS}
    assert len(orders) == 3  # the class order changes with the seed, as PILOT's
    for seed in SEEDS:
        assert (tmp_path / "group" / f"seed-{seed}" / "config.yaml").read_text().startswith(f"seed: {seed}\n")


def test_an_interrupted_group_resumes_the_missing_seeds(tmp_path):
    run_group(group_config(), tmp_path / "group")
    before = json.loads((tmp_path / "group" / "seed-5" / "metrics.json").read_text())["summary"]
    shutil.rmtree(tmp_path / "group" / "seed-5")
    summaries = resume_group(tmp_path / "group")
    assert sorted(summaries) == SEEDS
    assert summaries[5].a_last == pytest.approx(before["a_last"])  # the same run again


def test_cli_seeds_report_and_refusals(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("data: {dataset: synthetic, synthetic_classes: 4, synthetic_train_per_class: 6, "
                      "synthetic_test_per_class: 3, image_size: 16, init_cls: 2, increment: 2}\n"
                      "backbone: {name: vit_tiny_patch16_224, pretrained: false, model_kwargs: {img_size: 16, "
                      "patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}}\n"
                      "train: {device: cpu, epochs: 0, progress: false}\nmethod: {name: simplecil}\n")
    assert main(["train", "--config", str(config), "--seeds", "7,8", "--output", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "seed 7:" in out and "seed 8:" in out and "mean ± std over 2 seeds" in out
    assert main(["report", str(tmp_path / "g"), "--output", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Seed groups: mean ± std over seeds" in report and "7, 8" in report
    assert (tmp_path / "report" / "accuracy_curves_groups.png").is_file()
    assert main(["train", "--config", str(config), "--seeds", "7,x", "--output", str(tmp_path / "h")]) == 2
    with pytest.raises(ConfigError, match="lists a seed twice"):
        tiny_config(seed=[1, 1])
    with pytest.raises(RunDirectoryError, match="a run group"):
        run_experiment(group_config(), tmp_path / "single")
    with pytest.raises(ConfigError, match="a run group"):
        Experiment.build(group_config())


def test_the_demo_as_a_seed_group(tmp_path, capsys):
    assert main(["demo", "--seeds", "1,2", "--set", "method.name=simplecil", "--set", "train.progress=false",
                 "--output", str(tmp_path / "demo")]) == 0
    assert "mean ± std over 2 seeds" in capsys.readouterr().out
    assert read_group(tmp_path / "demo")["finished"] == [1, 2]
