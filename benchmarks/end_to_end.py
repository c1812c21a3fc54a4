"""Wall time per task of a small CaRE run, split into train / statistics / alignment / evaluation.

    python benchmarks/end_to_end.py                   # configs/demo.yaml (the `carecl demo` run)
    python benchmarks/end_to_end.py --config FILE --set key=value ...

The run goes through `carecl.engine.run_experiment` unchanged; the split comes from timing
CaRE's hooks (wrapped on the class for the duration of the run): training = from the end of
`begin_phase` to the start of `end_phase` (the engine's epochs), statistics = `update_statistics`,
alignment = `align`, evaluation = the engine's wall time of the task minus the time from
`begin_task` to the end of `end_task`. The run's accuracies are reported too.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import common
from carecl.config import load_config
from carecl.engine import run_experiment
from carecl.methods.care import CaRE


def arguments():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(common.ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


class HookClock:
    """Seconds spent per task in each part, from wrappers around CaRE's hooks."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.task = 0
        self.phase_started = 0.0
        self.task_started = 0.0

    @contextmanager
    def installed(self):
        originals = {name: getattr(CaRE, name) for name in
                     ("begin_task", "begin_phase", "end_phase", "end_task", "update_statistics", "align")}
        clock = self

        def timed(name, before=None, after=None, part=None):
            original = originals[name]

            @wraps(original)
            def wrapper(method, *args, **kwargs):
                if before:
                    before(method, *args)
                started = time.perf_counter()
                result = original(method, *args, **kwargs)
                ended = time.perf_counter()
                if part:
                    clock.parts[clock.task][part] += ended - started
                if after:
                    after(ended)
                return result
            return wrapper

        def start_task(method, task):
            clock.task, clock.task_started = task.index, time.perf_counter()

        def end_training(method, *args):
            clock.parts[clock.task]["train"] += time.perf_counter() - clock.phase_started

        def phase_started(ended):
            clock.phase_started = ended

        def task_learned(ended):
            clock.parts[clock.task]["learn"] = ended - clock.task_started

        CaRE.begin_task = timed("begin_task", before=start_task)
        CaRE.begin_phase = timed("begin_phase", after=phase_started)
        CaRE.end_phase = timed("end_phase", before=end_training)
        CaRE.end_task = timed("end_task", after=task_learned)
        CaRE.update_statistics = timed("update_statistics", part="statistics")
        CaRE.align = timed("align", part="alignment")
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(CaRE, name, original)


def task_breakdown(clock: HookClock, wall: list[float]) -> list[dict]:
    """Per task: the engine's wall time split into train / statistics / alignment / evaluation / other."""
    tasks = []
    for index, task_wall in enumerate(wall):
        parts = clock.parts[index]
        tasks.append({"task": index, "wall": task_wall, "train": parts["train"], "statistics": parts["statistics"],
                      "alignment": parts["alignment"], "evaluation": task_wall - parts["learn"],
                      "other": parts["learn"] - parts["train"] - parts["statistics"] - parts["alignment"]})
    return tasks


def measure(device: str, args) -> dict:
    overrides = [*args.set, f"train.device={device}", "train.progress=false"]
    if args.quick:
        overrides += ["train.epochs=2", "method.alignment.epochs=1"]
    config = load_config(args.config, overrides)
    if config.method.name != "care":
        raise SystemExit(f"{args.config}: end_to_end times CaRE's hooks; method.name is {config.method.name!r}")
    with tempfile.TemporaryDirectory() as output, HookClock().installed() as clock:
        started = time.perf_counter()
        summary = run_experiment(config, output)
        total = time.perf_counter() - started
        # The engine's own wall time per task: learning plus evaluation (saving excluded).
        wall = json.loads((Path(output) / "metrics.json").read_text())["wall_time_s"]
    tasks = task_breakdown(clock, wall)
    return {"machine": common.machine(device), "config": str(Path(args.config).resolve().relative_to(common.ROOT))
            if Path(args.config).resolve().is_relative_to(common.ROOT) else str(args.config),
            "overrides": overrides, "total_seconds": total, "a_last": summary.a_last,
            "average_accuracy": summary.average_accuracy, "tasks": tasks}


def main() -> None:
    args = arguments()
    common.set_threads(args.threads)
    runs = [measure(device, args) for device in common.devices(args.device)]
    common.finish("end_to_end", {"runs": runs}, args)


if __name__ == "__main__":
    sys.exit(main())
