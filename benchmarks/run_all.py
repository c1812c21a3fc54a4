"""Every benchmark, one fresh process each, then BENCHMARKS.md.

    python benchmarks/run_all.py            # the full set (~40 min with --threads 1 on a busy 2-core machine)
    python benchmarks/run_all.py --quick    # smoke run of every script; leaves BENCHMARKS.md alone

Options other than --quick (--device, --amp, --threads, --repeats) are passed to every script. On a
shared machine prefer --threads 1: with two threads every small op waits for a descheduled thread.
"""

from __future__ import annotations

import subprocess
import sys
import time

import common

SCRIPTS = ("inference.py", "training.py", "iterative.py", "alignment.py", "end_to_end.py")


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    passed = [f"--device={args.device}", f"--amp={args.amp}", "--no-report"]
    passed += [f"--threads={args.threads}"] if args.threads else []
    passed += [f"--repeats={args.repeats}"] if args.repeats else []
    passed += ["--quick"] if args.quick else []
    started = time.perf_counter()
    for script in SCRIPTS:
        began = time.perf_counter()
        common.progress(f"== {script}")
        completed = subprocess.run([sys.executable, str(common.ROOT / "benchmarks" / script), *passed], check=False)
        if completed.returncode != 0:
            common.progress(f"{script} failed with exit status {completed.returncode}")
            return completed.returncode
        common.progress(f"== {script}: {time.perf_counter() - began:.0f}s")
    if not args.quick and not args.no_report:
        import report
        common.progress(f"updated: {report.write().relative_to(common.ROOT)}")
    common.progress(f"all benchmarks: {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
