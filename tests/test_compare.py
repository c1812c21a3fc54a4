"""`carecl compare`: a run whose protocol matches a published row sits next to it with the differences; a run
that differs (split, backbone, seed) is flagged; a method and dataset without a published row says so; a seed
group compares its mean ± std; the published table parses the CaRE paper's rows."""

from __future__ import annotations

import pytest

from carecl.cli.main import main
from carecl.config import BackboneConfig, DataConfig, ExperimentConfig, MethodConfig
from carecl.metrics import TaskEvaluation
from carecl.published import PublishedRow, published_rows
from carecl.report.compare import compare
from carecl.runs.directory import RunDirectory
from carecl.runs.group import write_group

ROW = PublishedRow("care", "CaRE", "imagenet-r", 20, 20, "vit_base_patch16_224.augreg_in21k", 1993, 82.0, 77.0,
                   "CaRE paper, Table 3")


def fake_run(path, seed=1993, init_cls=20, backbone="vit_base_patch16_224.augreg_in21k", method="care", accuracy=80.0):
    """A finished 2-task run directory with top-1 `accuracy` after the last task (and 90 after the first)."""
    config = ExperimentConfig(seed=seed, data=DataConfig(dataset="imagenet-r", init_cls=init_cls, increment=20),
                              backbone=BackboneConfig(name=backbone), method=MethodConfig(name=method))
    run = RunDirectory.create(path, config)
    evaluations = [TaskEvaluation(t, a, 99.0, 5, [a] * (t + 1), a, a, 100) for t, a in enumerate((90.0, accuracy))]
    run.write_metrics(evaluations, {"class_order": list(range(40)), "task_sizes": [init_cls, 40 - init_cls],
                                    "wall_time_s": [1.0, 1.0], "skipped_images": []})
    return path


def test_a_matching_run_sits_next_to_its_published_row(tmp_path):
    [item] = compare([fake_run(tmp_path / "run")], rows=[ROW])
    assert item.row == ROW and item.flags == ()
    cells = item.cells()
    assert cells[1] == "85.00" and cells[2] == "80.00" and cells[4] == "+3.00" and cells[5] == "+3.00"
    assert cells[-1] == "matches"


def test_protocol_differences_are_flagged(tmp_path):
    run = fake_run(tmp_path / "run", seed=7, init_cls=10, backbone="vit_base_patch16_224.augreg_in1k")
    [item] = compare([run], rows=[ROW])
    assert item.flags == ("split B10 Inc20 ≠ B0 Inc20", "backbone vit_base_patch16_224.augreg_in1k ≠ "
                          "vit_base_patch16_224.augreg_in21k", "seed 7 ≠ 1993")
    [missing] = compare([fake_run(tmp_path / "other", method="simplecil")], rows=[ROW])
    assert missing.row is None and "no published row for simplecil on imagenet-r" in missing.cells()[-1]


def test_a_seed_group_compares_its_mean_and_std(tmp_path):
    group = tmp_path / "group"
    group.mkdir()
    for seed, accuracy in ((1993, 80.0), (1994, 76.0)):
        fake_run(group / f"seed-{seed}", seed=seed, accuracy=accuracy)
    write_group(group, [1993, 1994], {})
    [item] = compare([group], rows=[ROW])
    assert item.a_last.mean == pytest.approx(78.0) and item.a_last.n == 2
    assert item.cells()[2] == "78.00 ± 2.83" and item.flags == ("seed 1993, 1994 ≠ 1993",)


def test_the_published_table_and_the_cli(tmp_path, capsys):
    rows = published_rows()
    care = [row for row in rows if row.method == "care" and row.dataset == "imagenet-r" and row.increment == 4]
    assert [(row.average_accuracy, row.a_last) for row in care] == [(82.92, 76.98)]  # Table 2, 50 tasks
    assert {"CaRE paper, Table 1", "CaRE paper, Table 2", "CaRE paper, Table 3"} <= {row.source for row in rows}
    mos = [row for row in rows if row.method == "mos" and row.dataset == "imagenet-r" and row.source.startswith("MOS")]
    assert {(row.backbone, row.a_last) for row in mos} == {("vit_base_patch16_224.augreg_in21k", 77.83),
                                                            ("vit_base_patch16_224.augreg_in21k_ft_in1k", 78.50)}
    assert main(["compare", str(fake_run(tmp_path / "run")), "--output", str(tmp_path / "out")]) == 0
    assert "CaRE paper, Table 3" in capsys.readouterr().out
    assert (tmp_path / "out" / "compare.csv").read_text().count("\n") == 2
    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "report")]) == 0
    assert "## Compared with published numbers" in (tmp_path / "report" / "report.md").read_text()
