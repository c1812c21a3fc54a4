"""Every registered method on the digits demo with its default options: does it finish, and how long does it take?

    python benchmarks/demo_defaults.py             # every method (minutes each on 2 CPU cores)
    python benchmarks/demo_defaults.py --only moal ranpac
    python benchmarks/demo_defaults.py --note "a training run shared the cores"   # conditions, beside the table

Each run is `carecl train --config configs/demo.yaml --set method.name=NAME` (the demo's data, backbone and training
settings, the method's own defaults), in a fresh process, timed from start to exit. A method that cannot run on
the demo says why in one line before anything runs (exit status 2); that line is recorded. Results:
results/demo_defaults.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

DEMO = common.ROOT / "configs" / "demo.yaml"


def names() -> list[str]:
    from carecl.registry import METHODS

    return METHODS.names()


def run(name: str, work: Path) -> dict:
    output = work / name
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "carecl", "train", "--config", str(DEMO), "--set",
                                f"method.name={name}", "--set", "train.progress=false", "--output", str(output)],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(common.ROOT / "src")})
    seconds = time.perf_counter() - started
    row = {"method": name, "exit": completed.returncode, "seconds": seconds}
    if completed.returncode == 0:
        summary = json.loads((output / "metrics.json").read_text())["summary"]
        row.update(a_last=summary["a_last"], average_accuracy=summary["average_accuracy"])
    else:
        lines = [line for line in completed.stderr.splitlines() if line.startswith(("error:", "stopped:"))]
        row["message"] = lines[-1] if lines else completed.stderr.strip().splitlines()[-1:]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--note", help="what else the machine ran meanwhile, printed beside the table (an --only "
                                       "re-run keeps the previous note unless given a new one)")
    args = parser.parse_args()
    path = common.RESULTS / "demo_defaults.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    previous = {row["method"]: row for row in old.get("rows", [])}
    note = args.note or (old.get("note") if args.only else None)
    with tempfile.TemporaryDirectory(prefix="carecl-demo-defaults-") as work:
        for name in args.only or names():
            previous[name] = run(name, Path(work))
            row = previous[name]
            result = (f"A_last {row['a_last']:.2f}" if row["exit"] == 0 else row.get("message"))
            print(f"[demo-defaults] {name:18s} {row['seconds']:7.1f} s  {result}", file=sys.stderr, flush=True)
            document = {"machine": common.machine("cpu"), "rows": [previous[n] for n in sorted(previous)],
                        **({"note": note} if note else {})}
            common.save("demo_defaults", document)
    if not args.no_report:
        import report

        print(f"updated: {report.write().relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
