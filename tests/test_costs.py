"""Cost accounting: every task records its trainable parameters, the parameters the learner saves, its seconds per
phase (within its wall time) and its peak memory; every evaluation its inference time per image; the record
survives a resume; `carecl report` prints the cost table."""

from __future__ import annotations

import json

import pytest

from carecl.engine import run_experiment
from carecl.report.build import build_report
from carecl.report.runs import count_saved_elements
from carecl.runs.state import RunProgress

from helpers import tiny_config

ADAPTER = {"name": "ssiat", "adapter": {"bottleneck": 4}, "later_epochs": 1, "alignment": {"epochs": 0}}


def test_each_task_records_its_costs_and_the_report_shows_them(tmp_path):
    run_experiment(tiny_config(method=ADAPTER), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    costs = metrics["costs"]
    assert len(costs) == len(metrics["wall_time_s"]) == 3
    # SSIAT trains its shared adapters (2 blocks x (32x4 + 4 + 4x32 + 32)) and each task's cosine head (2 x 32).
    adapters = 2 * (32 * 4 + 4 + 4 * 32 + 32)
    assert [cost["trainable_parameters"] for cost in costs] == [adapters + 2 * 32] * 3
    assert costs[-1]["added_parameters"] == count_saved_elements(tmp_path / "run")
    for cost, wall in zip(costs, metrics["wall_time_s"]):
        assert 0 < sum(cost["phase_seconds"].values()) <= wall
        assert cost["peak_memory_bytes"] > 0
    assert all(cost["inference_ms_per_image"] > 0 and 0 < cost["evaluation_seconds"] for cost in costs)
    report = build_report([tmp_path / "run"], tmp_path / "report").read_text()
    assert "## Cost" in report and f"{costs[-1]['added_parameters']:,}" in report


def test_costs_travel_with_the_checkpointed_progress():
    progress = RunProgress(costs=[{"trainable_parameters": 3, "added_parameters": 5, "phase_seconds": {"train": 1.0},
                                   "peak_memory_bytes": 7, "memory_kind": "cpu_max_rss"}])
    assert RunProgress.from_json(json.loads(json.dumps(progress.to_json()))).costs == progress.costs
    legacy = progress.to_json()
    legacy.pop("costs")
    assert RunProgress.from_json(legacy).costs == []  # checkpoints written before costs existed still load


@pytest.mark.parametrize("method", [{"name": "simplecil"}])
def test_a_method_without_training_records_zero_trainable_parameters(tmp_path, method):
    run_experiment(tiny_config(method=method), tmp_path / "run")
    costs = json.loads((tmp_path / "run" / "metrics.json").read_text())["costs"]
    assert [cost["trainable_parameters"] for cost in costs] == [0, 0, 0]
    assert costs[0]["added_parameters"] < costs[-1]["added_parameters"]  # prototypes added task by task
