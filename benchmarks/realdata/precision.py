"""CaRE's real-data row in bf16 and in fp32, side by side: accuracy and wall time (train.precision covers every
forward: training, class statistics, evaluation).

    python benchmarks/realdata/precision.py

The config is tuned/care.yaml (the settings chosen on validation images); seed 1993. Results go to
results/realdata_precision.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
from run import machine, thread_overrides  # noqa: E402
from tune import data_overrides  # noqa: E402

CONFIG = HERE / "tuned" / "care.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: carecl's choice, the cores)")
    args = parser.parse_args()
    cache = assets.default_cache()
    weights, data_root = assets.build(cache)
    rows = []
    for precision in ("fp32", "bf16"):
        output = cache / "runs_precision" / precision
        if output.exists():
            subprocess.run(["rm", "-rf", str(output)], check=True)
        sets = [item for entry in data_overrides(CONFIG, cache, weights, data_root) for item in ("--set", entry)]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "carecl", "train", "--config", str(CONFIG), *sets, "--set",
                        f"train.precision={precision}", "--set", "train.progress=false", *thread_overrides(args.threads), "--output", str(output)],
                       check=True)
        wall = time.perf_counter() - started
        metrics = json.loads((output / "metrics.json").read_text())
        rows.append({"precision": precision, "a_last": metrics["summary"]["a_last"], "wall_time_s": wall,
                     "average_accuracy": metrics["summary"]["average_accuracy"],
                     "task_wall_time_s": metrics["wall_time_s"]})
        print(f"[precision] {precision}: A_last {rows[-1]['a_last']:.2f}, {wall / 60:.1f} min", file=sys.stderr)
    document = {"machine": machine(), "threads": args.threads, "config": str(CONFIG.relative_to(ROOT)), "rows": rows}
    (ROOT / "benchmarks" / "results" / "realdata_precision.json").write_text(json.dumps(document, indent=1))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    print(f"updated: {report.write().relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
