"""Where the time of a real-data CaRE task goes: training, class statistics, alignment, evaluation,
and inside training how much is data loading (decode + transforms) versus the model.

    python benchmarks/realdata/profile_task.py [--config benchmarks/realdata/care.yaml]

Runs the config on the first two tasks' classes of the real-data stream (a 4-class view of the
cached image tree, linked, not copied) through `carecl.engine.run_experiment`, timing CaRE's hooks
as benchmarks/end_to_end.py does; then times one pass of the training loader alone. Writes
benchmarks/results/realdata_profile.json and the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benchmarks"))

import assets  # noqa: E402
import common  # noqa: E402
from end_to_end import HookClock, task_breakdown  # noqa: E402

from carecl.config import load_config  # noqa: E402
from carecl.engine import Experiment, run_experiment  # noqa: E402


def first_tasks_view(data_root: Path, config, n_tasks: int, into: Path) -> Path:
    """A tree holding only the classes of the config's first `n_tasks` tasks (symbolic links)."""
    from carecl.scenario import Scenario

    classes = sorted(p.name for p in (data_root / "train").iterdir())
    scenario = Scenario.build(len(classes), config.data.init_cls, config.data.increment, seed=config.seed,
                              shuffle=config.data.shuffle, explicit_order=config.data.class_order)
    kept = [classes[c] for c in scenario.order[: scenario.boundaries[n_tasks]]]
    for split in ("train", "test"):
        (into / split).mkdir(parents=True)
        for name in kept:
            (into / split / name).symlink_to(data_root / split / name)
    return into


def loader_pass_seconds(config) -> float:
    """One epoch of the first task's training loader, no model: decode + transforms + collation."""
    experiment = Experiment.build(config)
    loader = experiment.train_loader(experiment.scenario.task(0))
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "care.yaml")
    parser.add_argument("--cache", type=Path, default=assets.default_cache())
    args = parser.parse_args()
    weights, data_root = assets.build(args.cache)
    base = load_config(args.config, [f"backbone.weights={weights}", f"data.root={data_root}"])
    with tempfile.TemporaryDirectory() as scratch:
        view = first_tasks_view(data_root, base, 2, Path(scratch) / "view")
        config = load_config(args.config, [f"backbone.weights={weights}", f"data.root={view}", "train.progress=false"])
        with HookClock().installed() as clock:
            started = time.perf_counter()
            summary = run_experiment(config, Path(scratch) / "run")
            total = time.perf_counter() - started
        wall = json.loads((Path(scratch) / "run" / "metrics.json").read_text())["wall_time_s"]
        loading = loader_pass_seconds(config)
        n_train = len(Experiment.build(config).train_loader(Experiment.build(config).scenario.task(0)).dataset)
    tasks = task_breakdown(clock, wall)
    epochs = [config.train.epochs, 2 * (config.train.epochs // 2)]
    document = {"machine": common.machine("cpu"), "config": str(args.config.resolve().relative_to(ROOT)),
                "total_seconds": total, "top1_curve": summary.top1_curve, "tasks": tasks,
                "loader_epoch_seconds": loading, "train_images_per_task": n_train, "epochs_per_task": epochs,
                "loader_share_of_training": [loading * e / t["train"] if t["train"] else float("nan")
                                             for e, t in zip(epochs, tasks)]}
    (common.RESULTS / "realdata_profile.json").write_text(json.dumps(document, indent=1, default=float))
    import report

    print(f"updated: {report.write().relative_to(ROOT)}", file=sys.stderr)
    print(json.dumps({k: v for k, v in document.items() if k != "machine"}, indent=1, default=float))
    return 0 if np.isfinite(total) else 1


if __name__ == "__main__":
    sys.exit(main())
