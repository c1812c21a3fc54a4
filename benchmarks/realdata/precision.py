"""CaRE's real-data row in bf16 and in fp32, side by side: accuracy and wall time (train.precision covers every
forward: training, class statistics, evaluation).

    python benchmarks/realdata/precision.py
    python benchmarks/realdata/precision.py --reuse-finished   # after an interruption: keep a finished run
    python benchmarks/realdata/precision.py --only bf16        # one precision again, the other's row kept

The config is tuned/care.yaml (the settings chosen on validation images); seed 1993. Results go to
results/realdata_precision.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
from run import finished, machine, train  # noqa: E402

CONFIG = HERE / "tuned" / "care.yaml"
RESULT = ROOT / "benchmarks" / "results" / "realdata_precision.json"
PRECISIONS = ("fp32", "bf16")


def run_precision(precision: str, cache: Path, overrides: list[str], threads: int | None, reuse: bool) -> dict:
    output = cache / "runs_precision" / precision
    if reuse and finished(output):  # an interrupted batch: its tasks' own times are the honest lower bound
        wall, tasks_only = None, True
    else:
        wall = train(CONFIG, output, [*overrides, f"train.precision={precision}"], threads=threads, tag="precision")
        tasks_only = False
    metrics = json.loads((output / "metrics.json").read_text())
    return {"precision": precision, "a_last": metrics["summary"]["a_last"],
            "wall_time_s": sum(metrics["wall_time_s"]) if wall is None else wall,
            "average_accuracy": metrics["summary"]["average_accuracy"], "task_wall_time_s": metrics["wall_time_s"],
            **phase_times(metrics), "tasks_only": tasks_only}


def phase_times(metrics: dict) -> dict:
    """Per task: seconds in the method's training phases, and the task-end evaluation's cost per test image."""
    return {"train_phase_s": [sum(cost["phase_seconds"].values()) for cost in metrics["costs"]],
            "inference_ms_per_image": [cost["inference_ms_per_image"] for cost in metrics["costs"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: carecl's choice, the cores)")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="keep a precision's run if it already finished in <cache>/runs_precision")
    parser.add_argument("--note", help="what else the machine ran meanwhile, printed beside the table")
    parser.add_argument("--only", choices=PRECISIONS, help="run this precision alone, keeping the other's row")
    args = parser.parse_args()
    cache = assets.default_cache()
    weights, data_root = assets.build(cache)
    overrides = assets.data_overrides(CONFIG, cache, weights, data_root)
    previous = json.loads(RESULT.read_text()) if args.only and RESULT.is_file() else {}
    rows = {row["precision"]: row for row in previous.get("rows", [])}
    note = args.note or previous.get("note")
    for precision in [args.only] if args.only else PRECISIONS:
        rows[precision] = run_precision(precision, cache, overrides, args.threads, args.reuse_finished)
        print(f"[precision] {precision}: A_last {rows[precision]['a_last']:.2f}, "
              f"{rows[precision]['wall_time_s'] / 60:.1f} min", file=sys.stderr)
        document = {"machine": machine(), "threads": args.threads, "config": str(CONFIG.relative_to(ROOT)),
                    "rows": [rows[p] for p in PRECISIONS if p in rows], **({"note": note} if note else {})}
        RESULT.write_text(json.dumps(document, indent=1))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    print(f"updated: {report.write().relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
