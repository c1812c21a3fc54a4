import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from carecl.metrics import forgetting
from carecl.report import (
    ReportError,
    RunSettings,
    add_command,
    build_report,
    forgetting_per_group,
    load_run,
    with_unique_labels,
)
from carecl.rundir import RunDirectoryError

# Three tasks of 10 classes each: row i = after task i, column j = task j's classes.
THREE_TASK_MATRIX = [[90.0, None, None], [80.0, 85.0, None], [70.0, 78.0, 88.0]]
THREE_TASK_CURVE = [90.0, 82.5, 78.6]
THREE_TASK_WALL = [10.0, 20.5, 30.25]


def write_run(path: Path, method: str, dataset: str, init_cls: int, increment: int, curve, matrix, task_sizes,
              wall_time_s, state: dict | None = None, seed: int = 1993) -> Path:
    """A run directory as the engine writes it, with numbers chosen by hand."""
    path.mkdir(parents=True)
    config = {"seed": seed, "data": {"dataset": dataset, "init_cls": init_cls, "increment": increment},
              "method": {"name": method}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    tasks = [{"task": i, "top1": top1, "topk": 99.0, "k": 5, "group_accuracy": [v for v in row if v is not None],
              "old_accuracy": None if i == 0 else 50.0, "new_accuracy": row[i], "n_samples": 100}
             for i, (top1, row) in enumerate(zip(curve, matrix))]
    summary = {"top1_curve": curve, "a_last": curve[-1], "average_accuracy": sum(curve) / len(curve),
               "forgetting": None, "matrix": matrix}
    metrics = {"summary": summary, "tasks": tasks, "class_order": list(range(sum(task_sizes))),
               "task_sizes": task_sizes, "wall_time_s": wall_time_s}
    (path / "metrics.json").write_text(json.dumps(metrics))
    if state is not None:
        save_file(state, str(path / "learner.safetensors"))
    return path


def make_two_runs(root: Path) -> tuple[Path, Path]:
    """A three-task run with a saved state, and a single-task run (of three planned) without one."""
    three = write_run(root / "care_three", "care", "cifar100", 10, 10, THREE_TASK_CURVE, THREE_TASK_MATRIX,
                      [10, 10, 10], THREE_TASK_WALL,
                      state={"adapter": torch.zeros(4, 8), "head": torch.zeros(30, 6, dtype=torch.float16)})
    single = write_run(root / "simple_one", "simplecil", "imagenet-r", 20, 5, [64.0], [[64.0]], [20, 5, 5], [7.0])
    return three, single


@pytest.fixture
def two_runs(tmp_path):
    return make_two_runs(tmp_path)


@pytest.fixture(scope="module")
def two_run_report(tmp_path_factory) -> Path:
    """report.md of the two hand-made runs (rendered once: plotting is the slow part)."""
    root = tmp_path_factory.mktemp("runs")
    return build_report(list(make_two_runs(root)), root / "report")


def markdown_rows(report: Path) -> dict[str, dict[str, str]]:
    """The summary table of report.md, keyed by run label then column header."""
    lines = [line for line in report.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    header, rows = split[0], split[2:]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_labels_follow_the_b0_convention():
    assert RunSettings("care", "cifar100", 10, 10).label == "care · cifar100 B0 Inc10"
    assert RunSettings("care", "omnibenchmark1k", 100, 3).label == "care · omnibenchmark1k B100 Inc3"


def test_forgetting_per_group_by_hand():
    matrix = np.array([[90.0, np.nan, np.nan], [80.0, 85.0, np.nan], [70.0, 78.0, 88.0]])
    drops = forgetting_per_group(matrix)
    assert drops.tolist() == [90.0 - 70.0, 85.0 - 78.0]
    assert math.isclose(drops.mean(), forgetting(matrix))
    assert len(forgetting_per_group(np.array([[64.0]]))) == 0


def test_report_table_and_csv_hold_the_hand_numbers(two_run_report):
    rows = markdown_rows(two_run_report)
    a_last, average = 78.6, (90.0 + 82.5 + 78.6) / 3
    mean_forgetting = ((90.0 - 70.0) + (85.0 - 78.0)) / 2
    saved_elements = 4 * 8 + 30 * 6

    care = rows["care · cifar100 B0 Inc10"]
    assert care["tasks"] == "3" and care["classes"] == "30"
    assert float(care["A_last (%)"]) == pytest.approx(a_last, abs=0.005)
    assert float(care["Ā (%)"]) == pytest.approx(average, abs=0.005)
    assert float(care["forgetting (points)"]) == pytest.approx(mean_forgetting, abs=0.005)
    assert care["added parameters"].replace(",", "") == str(saved_elements)
    assert care["wall time"] == "1 min 00 s"  # 10 + 20.5 + 30.25 s

    simple = rows["simplecil · imagenet-r B20 Inc5"]
    assert simple["tasks"] == "1 of 3" and simple["classes"] == "20"
    assert float(simple["A_last (%)"]) == 64.0 and float(simple["Ā (%)"]) == 64.0
    assert simple["forgetting (points)"] == "n/a" and simple["added parameters"] == "n/a"

    with open(two_run_report.parent / "summary.csv", newline="", encoding="utf-8") as stream:
        by_label = {row["label"]: row for row in csv.DictReader(stream)}
    assert float(by_label["care · cifar100 B0 Inc10"]["average_accuracy"]) == pytest.approx(average, abs=1e-4)
    assert float(by_label["care · cifar100 B0 Inc10"]["forgetting"]) == pytest.approx(mean_forgetting, abs=1e-4)
    assert float(by_label["care · cifar100 B0 Inc10"]["wall_time_s"]) == pytest.approx(sum(THREE_TASK_WALL))
    assert by_label["care · cifar100 B0 Inc10"]["added_parameters"] == str(saved_elements)
    assert by_label["simplecil · imagenet-r B20 Inc5"]["forgetting"] == "n/a"


def test_report_writes_readable_images_and_embeds_them(two_run_report):
    output = two_run_report.parent
    text = two_run_report.read_text(encoding="utf-8")
    pngs = sorted(output.glob("*.png"))
    # Curves + two matrices + one forgetting chart (the single-task run has nothing to forget).
    assert len(pngs) == 4
    assert len(list(output.glob("forgetting_*.png"))) == 1
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.width > 400 and image.height > 300
            # A blank canvas would have a single colour.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(2)) > 10
        svg = png.with_suffix(".svg")
        assert svg.stat().st_size > 2000 and "<svg" in svg.read_text(encoding="utf-8")[:2000]
        assert f"]({png.name})" in text
    assert "nothing to forget" in text


def test_many_tasks_render(tmp_path):
    n = 25  # above the annotation limit (20): no cell numbers, thinned ticks
    matrix = [[80.0 - 0.2 * (i - j) if j <= i else None for j in range(n)] for i in range(n)]
    curve = [80.0 - 0.1 * i for i in range(n)]
    run = write_run(tmp_path / "long", "care", "omnibenchmark", 1, 1, curve, matrix, [1] * n, [1.0] * n)
    build_report([run], tmp_path / "report")
    with Image.open(next((tmp_path / "report").glob("matrix_*.png"))) as image:
        assert image.width > 400


def test_duplicate_labels_get_the_seed(tmp_path):
    runs = [write_run(tmp_path / f"seed{seed}", "care", "cifar100", 10, 10, [90.0], [[90.0]], [10], [1.0], seed=seed)
            for seed in (1, 2)]
    labels = [run.label for run in with_unique_labels([load_run(run) for run in runs])]
    assert labels == ["care · cifar100 B0 Inc10 · seed 1", "care · cifar100 B0 Inc10 · seed 2"]


def test_missing_metrics_names_the_path(tmp_path):
    run = tmp_path / "not_a_run"
    run.mkdir()
    with pytest.raises(ReportError, match=str(run / "metrics.json")):
        build_report([run], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_unreadable_metrics_names_the_path(two_runs, tmp_path):
    three, _ = two_runs
    (three / "metrics.json").write_text("{not json")
    with pytest.raises(RunDirectoryError, match=str(three / "metrics.json")):
        load_run(three)
    (three / "metrics.json").write_text(json.dumps({"summary": {"top1_curve": [1.0, 2.0], "matrix": [[1.0]]}}))
    with pytest.raises(ReportError, match=f"{three / 'metrics.json'}.*2 evaluated tasks"):
        load_run(three)


def test_argparse_registration(two_runs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="carecl")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "a", "b", "--output", "c"])
    assert args.command == "report" and args.runs == [Path("a"), Path("b")] and args.output == Path("c")
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--output", "c"])  # at least one run directory

    args = parser.parse_args(["report", str(two_runs[1]), "--output", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert (tmp_path / "out" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out
