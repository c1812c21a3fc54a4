"""Re-run committed real-data rows with the current code and compare them with the committed numbers.

    python benchmarks/realdata/recheck.py fecam acil ranpac moal

For a change that must not move results (issue 31's closed-form heads): each named config runs again through
`carecl train` into <cache>/runs_recheck/<name>; its accuracy curve is compared task by task with the row in
results/realdata.json. Results: results/realdata_recheck.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
from run import CONFIGS, RESULTS, machine, run_config  # noqa: E402


def compare(committed: dict, rerun: dict) -> dict:
    differences = [abs(a - b) for a, b in zip(committed["top1_curve"], rerun["top1_curve"], strict=True)]
    return {"name": committed["name"], "committed_a_last": committed["a_last"], "rerun_a_last": rerun["a_last"],
            "committed_curve": committed["top1_curve"], "rerun_curve": rerun["top1_curve"],
            "max_curve_difference": max(differences),
            # The table prints two decimals: the same printed row is what "unchanged" means.
            "same_as_printed": all(f"{a:.2f}" == f"{b:.2f}" for a, b in
                                   zip(committed["top1_curve"], rerun["top1_curve"], strict=True)),
            "committed_wall_time_s": committed["wall_time_s"], "rerun_wall_time_s": rerun["wall_time_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--cache", type=Path, default=assets.default_cache())
    parser.add_argument("--threads", type=int, help="torch threads per run (default: carecl's choice, the cores)")
    parser.add_argument("--note", help="what else the machine ran meanwhile, kept with these configs' rows")
    args = parser.parse_args()
    weights, data_root = assets.build(args.cache)
    committed = {row["name"]: row for row in json.loads((RESULTS / "realdata.json").read_text())["rows"]}
    path = RESULTS / "realdata_recheck.json"
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    for name in args.names:
        rerun = run_config(name, args.cache, weights, data_root, runs="runs_recheck", threads=args.threads)
        rows[name] = {**compare(committed[name], rerun), **({"note": args.note} if args.note else {})}
        print(f"[recheck] {name}: A_last {rows[name]['committed_a_last']:.2f} -> {rows[name]['rerun_a_last']:.2f}, "
              f"largest curve difference {rows[name]['max_curve_difference']:.4f}", file=sys.stderr, flush=True)
        path.write_text(json.dumps({"machine": machine(), "threads": args.threads, "rows": [rows[n] for n in sorted(rows)]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
