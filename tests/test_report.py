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

from carecl.config import DataConfig, EvalConfig, ExperimentConfig, MethodConfig
from carecl.metrics import TaskEvaluation, forgetting
from carecl.cli.report import add_command
from carecl.metrics import forgetting_per_group
from carecl.report.build import build_report
from carecl.report.figures import curve_x
from carecl.report.runs import ReportError, RunSettings, load_run, with_unique_labels
from carecl.runs.directory import RunDirectory, RunDirectoryError

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
    """The summary table of report.md (its first table), keyed by run label then column header."""
    text = report.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("|"))
    lines = []
    for line in text[start:]:
        if not line.startswith("|"):
            break
        lines.append(line)
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


# --------------------------------------------------------------------------- runs evaluated every k tasks

SPARSE_TASKS = 7  # tasks of 10 classes; evaluated every 3 tasks: after tasks 3, 6 and 7 (the last)


def hand_group_accuracy(task: int, group: int) -> float:
    """Accuracy on `group`'s classes after `task` (0-based): 95 - group when learned, 4 points lost per later task."""
    return 95.0 - group - 4.0 * (task - group)


def hand_evaluation(task: int) -> TaskEvaluation:
    groups = [hand_group_accuracy(task, group) for group in range(task + 1)]
    return TaskEvaluation(task=task, top1=float(np.mean(groups)), topk=99.0, k=5, group_accuracy=groups,
                          old_accuracy=float(np.mean(groups[:-1])) if task else float("nan"),
                          new_accuracy=groups[-1], n_samples=10 * (task + 1))


def write_engine_run(path: Path, method: str, seed: int, every_n_tasks: int, evaluated: list[int],
                     n_finished: int) -> Path:
    """A run directory written by the engine's own writer (RunDirectory.write_metrics) from hand-made evaluations."""
    config = ExperimentConfig(seed=seed, data=DataConfig(dataset="cifar100", init_cls=10, increment=10),
                              eval=EvalConfig(every_n_tasks=every_n_tasks), method=MethodConfig(name=method))
    run = RunDirectory.create(path, config)
    run.write_metrics([hand_evaluation(task) for task in evaluated],
                      {"class_order": list(range(10 * SPARSE_TASKS)), "task_sizes": [10] * SPARSE_TASKS,
                       "wall_time_s": [2.0] * n_finished, "skipped_images": []})
    return path


def make_sparse_runs(root: Path) -> tuple[Path, Path, Path]:
    """Every task evaluated; every third (and the last); and a run killed after 5 tasks, evaluated once (task 3)."""
    return (write_engine_run(root / "dense", "simplecil", 1, 1, list(range(SPARSE_TASKS)), SPARSE_TASKS),
            write_engine_run(root / "sparse", "care", 2, 3, [2, 5, 6], SPARSE_TASKS),
            write_engine_run(root / "partial", "care", 3, 3, [2], 5))


@pytest.fixture(scope="module")
def sparse_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sparse_runs")
    return build_report(list(make_sparse_runs(root)), root / "report")


def test_sparse_run_positions_matrix_and_numbers(tmp_path):
    dense_dir, sparse_dir, _ = make_sparse_runs(tmp_path)
    sparse, dense = load_run(sparse_dir), load_run(dense_dir)

    assert sparse.evaluated_task_numbers.tolist() == [3, 6, 7] and sparse.n_tasks == 7 and sparse.is_sparse
    assert curve_x(sparse, by_classes=False).tolist() == [3, 6, 7]
    assert curve_x(sparse, by_classes=True).tolist() == [30, 60, 70]
    assert curve_x(dense, by_classes=True).tolist() == [10, 20, 30, 40, 50, 60, 70] and not dense.is_sparse

    # Rows = the three evaluations, columns = the 7 task groups; nan where a group was not learned yet.
    assert sparse.matrix.shape == (3, 7) and dense.matrix.shape == (7, 7)
    for row, task in enumerate([2, 5, 6]):
        assert sparse.matrix[row, : task + 1].tolist() == [hand_group_accuracy(task, j) for j in range(task + 1)]
        assert np.isnan(sparse.matrix[row, task + 1 :]).all()

    curve = [np.mean([hand_group_accuracy(task, j) for j in range(task + 1)]) for task in (2, 5, 6)]
    assert sparse.top1_curve.tolist() == pytest.approx(curve)
    assert sparse.a_last == pytest.approx(curve[-1]) and sparse.average_accuracy == pytest.approx(np.mean(curve))
    # Groups 1-3 were last measured before the end at task 3 (4 tasks earlier: 16 points lost), groups 4-6
    # at task 6 (4 points); group 7 only at the end. The dense run loses 4 points per task after each group's.
    assert sparse.forgetting_per_group.tolist() == [16.0, 16.0, 16.0, 4.0, 4.0, 4.0]
    assert sparse.forgetting == pytest.approx(10.0)
    assert dense.forgetting == pytest.approx(np.mean([4.0 * (6 - j) for j in range(6)]))
    # The same definitions metrics.json was written with.
    summary = json.loads((sparse_dir / "metrics.json").read_text())["summary"]
    assert sparse.forgetting == pytest.approx(summary["forgetting"])
    assert sparse.average_accuracy == pytest.approx(summary["average_accuracy"])


def test_forgetting_per_group_skips_groups_never_measured_before_the_end():
    # Evaluated after task 2 and task 4: group 3 appears at the last evaluation only.
    matrix = np.array([[90.0, 86.0, np.nan, np.nan], [70.0, 80.0, 84.0, 88.0]])
    drops = forgetting_per_group(matrix)
    assert drops[:2].tolist() == [20.0, 6.0] and np.isnan(drops[2])
    assert math.isclose(np.nanmean(drops), forgetting(matrix))


def test_sparse_report_table_note_and_csv(sparse_report):
    rows = markdown_rows(sparse_report)
    dense, sparse, partial = (rows[f"{method} · cifar100 B0 Inc10{suffix}"] for method, suffix in
                              (("simplecil", ""), ("care", " · seed 2"), ("care", " · seed 3")))
    assert "†" not in dense["Ā (%)"] and sparse["Ā (%)"].endswith("†") and partial["Ā (%)"].endswith("†")
    curve = [np.mean([hand_group_accuracy(task, j) for j in range(task + 1)]) for task in (2, 5, 6)]
    assert float(sparse["Ā (%)"].rstrip(" †")) == pytest.approx(np.mean(curve), abs=0.005)
    assert float(sparse["A_last (%)"]) == pytest.approx(curve[-1], abs=0.005)
    assert float(sparse["forgetting (points)"]) == pytest.approx(10.0, abs=0.005)
    assert sparse["tasks"] == "7" and sparse["classes"] == "70" and sparse["wall time"] == "14.0 s"
    assert partial["tasks"] == "5 of 7" and partial["classes"] == "50" and partial["wall time"] == "10.0 s"
    assert float(partial["A_last (%)"]) == pytest.approx(curve[0], abs=0.005) and partial["forgetting (points)"] == "n/a"

    text = sparse_report.read_text(encoding="utf-8")
    assert "not the paper's Ā" in text
    assert "care · cifar100 B0 Inc10 · seed 2: evaluated after tasks 3, 6, 7 (3 of 7 learned)" in text
    assert "care · cifar100 B0 Inc10 · seed 3: evaluated after task 3 (1 of 5 learned); A_last is after task 3" in text
    assert "Evaluated only once (after task 3)" in text

    with open(sparse_report.parent / "summary.csv", newline="", encoding="utf-8") as stream:
        by_label = {row["label"]: row for row in csv.DictReader(stream)}
    assert by_label["care · cifar100 B0 Inc10 · seed 2"]["evaluations"] == "3"
    assert by_label["care · cifar100 B0 Inc10 · seed 3"]["last_evaluated_task"] == "3"
    assert by_label["simplecil · cifar100 B0 Inc10"]["evaluations"] == "7"


def test_sparse_report_writes_readable_images(sparse_report):
    output = sparse_report.parent
    # Curves, three matrices, forgetting for the dense and the sparse run (the partial one has one evaluation).
    assert len(list(output.glob("matrix_*.png"))) == 3 and len(list(output.glob("forgetting_*.png"))) == 2
    for png in output.glob("*.png"):
        with Image.open(png) as image:
            assert image.width > 400 and image.height > 300
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(2)) > 10
    # The sparse heatmap has 3 rows for 7 columns: its cells are stretched, so the figure is wider than tall.
    with Image.open(next(output.glob("matrix_*-sparse.png"))) as image:
        assert image.width > image.height


def edit_summary(run: Path, change) -> None:
    path = run / "metrics.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["summary"].update(evaluated_tasks=[2, 5]),
     r"summary\.evaluated_tasks has 2 entries for the 3 evaluations"),
    (lambda d: d["summary"].update(evaluated_tasks=[2, 6, 5]), r"summary\.evaluated_tasks\[2\] is 5"),
    (lambda d: d["summary"].update(evaluated_tasks="2 5 6"), r"summary\.evaluated_tasks has a str"),
    (lambda d: d["summary"]["matrix"][0].append(50.0),
     r"row 0 has 8 columns, more than the 7 task groups.*after task 7 by summary\.evaluated_tasks"),
    (lambda d: d["summary"]["matrix"].pop(), r"2 rows for 3 evaluated tasks"),
    (lambda d: (d["summary"].pop("evaluated_tasks"), d["tasks"][1].update(task="six")),
     r"tasks\[\]\.task\[1\] is 'six'"),
])
def test_malformed_sparse_record_names_the_file(tmp_path, change, message):
    run = write_engine_run(tmp_path / "sparse", "care", 2, 3, [2, 5, 6], SPARSE_TASKS)
    edit_summary(run, change)
    with pytest.raises(ReportError, match=f"{run / 'metrics.json'}: .*{message}"):
        load_run(run)


def test_sparse_run_without_an_evaluation_yet(tmp_path):
    run = write_engine_run(tmp_path / "early", "care", 2, 3, [], 2)
    with pytest.raises(ReportError, match=r"2 task\(s\) finished but none evaluated yet"):
        load_run(run)


def test_evaluated_tasks_fall_back_to_task_records_then_to_every_task(tmp_path):
    sparse = write_engine_run(tmp_path / "sparse", "care", 2, 3, [2, 5, 6], SPARSE_TASKS)
    edit_summary(sparse, lambda d: d["summary"].pop("evaluated_tasks"))
    assert load_run(sparse).evaluated_task_numbers.tolist() == [3, 6, 7]
    # With neither record, every task counts as evaluated: 3 rows cannot hold 7 task groups.
    edit_summary(sparse, lambda d: d.pop("tasks"))
    with pytest.raises(ReportError, match="row 0 has 7 columns, more than the 3 task groups.*no evaluated_tasks"):
        load_run(sparse)
    # Metrics written before evaluated_tasks existed (every task evaluated) read as tasks 1..n.
    dense = write_engine_run(tmp_path / "dense", "care", 2, 1, [0, 1, 2], 3)
    edit_summary(dense, lambda d: (d["summary"].pop("evaluated_tasks"), d.pop("tasks")))
    record = load_run(dense)
    assert record.evaluated_task_numbers.tolist() == [1, 2, 3] and record.matrix.shape == (3, 3)
    assert not record.is_sparse and record.forgetting == pytest.approx(np.mean([8.0, 4.0]))
