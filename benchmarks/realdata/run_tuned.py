"""The real-data table under a fair protocol: every method with the settings `tune.py` chose on validation images
(tuned/<method>.yaml), run through `carecl train`; the main methods over three seeds (other class orders), mean ± std.

    python benchmarks/realdata/run_tuned.py                   # every tuned method (hours on 2 CPU cores)
    python benchmarks/realdata/run_tuned.py --only care mos   # some rows, keeping the others
    python benchmarks/realdata/run_tuned.py --reuse-finished  # keep finished runs and groups, resume interrupted ones
    python benchmarks/realdata/run_tuned.py --reuse-published # a one-seed row whose tune chose the published values
                                                              # takes run.py's finished run of that very config
    python benchmarks/realdata/run_tuned.py --threads 1 --only fecam acil &   # two at a time on 2 cores: each
    python benchmarks/realdata/run_tuned.py --threads 1 --only ranpac &       # row is merged into the latest file

SimpleCIL has nothing to tune (class means of frozen features) and runs its own YAML. Seeds 1993, 1994 and 1995 for
SEEDED and the best-tuned of L2P, DualPrompt and CODA-Prompt (by the validation value its tune chose); 1993 for the
others. Results go to results/realdata_tuned.json (rewritten after every row), `carecl report` figures to
results/realdata_tuned/, and BENCHMARKS.md is regenerated.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = RESULTS / "realdata_tuned"
RESULTS_FILE = RESULTS / "realdata_tuned.json"
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
from run import finished, machine, resume, train, write_report  # noqa: E402
from tune import METHODS, TUNED  # noqa: E402

from carecl.config import config_to_dict, load_config  # noqa: E402

SEEDS = (1993, 1994, 1995)
SEEDED = ("simplecil", "care", "ranpac", "fecam", "acil", "mos", "hide_prompt", "norga", "moal")
PROMPTS = ("l2p", "dualprompt", "coda_prompt")
ORDER = ("simplecil", *METHODS)
# How many cores a run used and whether it drew a bar, not what it learned; `tune` is read by `carecl tune` alone.
NOT_TRAINING = (("tune",), ("train", "progress"), ("train", "threads"))


def saved_rows() -> dict:
    """The rows in the results file as it is now (read again before each write: another runner may have added one)."""
    previous = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else {}
    return {entry["name"]: entry for entry in previous.get("rows", [])}


def best_prompt() -> str | None:
    """The prompt learner (of PROMPTS) whose tune found the highest validation value."""
    values = {}
    for name in PROMPTS:
        path = TUNED / f"{name}.csv"
        if path.is_file():
            with open(path, newline="") as stream:
                done = [float(row["value"]) for row in csv.DictReader(stream) if row["value"]]
            values[name] = max(done, default=float("-inf"))
    return max(values, key=values.get) if values else None


def config_of(name: str) -> Path:
    return HERE / "simplecil.yaml" if name == "simplecil" else TUNED / f"{name}.yaml"


def finished_group(output: Path, seeds: tuple[int, ...]) -> bool:
    if len(seeds) == 1:
        return finished(output)
    group = output / "group.json"
    return group.is_file() and sorted(json.loads(group.read_text()).get("finished", [])) == sorted(seeds)


def training_settings(config_path: Path, overrides: list[str] = ()) -> dict:
    settings = config_to_dict(load_config(config_path, overrides))
    for section, *key in NOT_TRAINING:
        settings[section] = {k: v for k, v in settings[section].items() if k not in key} if key else None
    return settings


def published_twin(name: str, seeds: tuple[int, ...], cache: Path, weights: Path, data_root: Path) -> Path | None:
    """run.py's finished published-settings run of `name` when it trained exactly what the tuned config would (the
    tune chose the published values): running it again would repeat it."""
    ran = cache / "runs" / name
    if len(seeds) != 1 or name == "simplecil" or not finished(ran):
        return None
    overrides = [*assets.data_overrides(config_of(name), cache, weights, data_root), f"seed={seeds[0]}"]
    return ran if training_settings(config_of(name), overrides) == training_settings(ran / "config.yaml") else None


def run(name: str, seeds: tuple[int, ...], cache: Path, weights: Path, data_root: Path, reuse: bool,
        threads: int | None, reuse_published: bool = False) -> dict:
    twin = published_twin(name, seeds, cache, weights, data_root) if reuse_published else None
    if twin is not None:
        print(f"[realdata-tuned] {name}: its tuned config trains what {twin} trained; that run is the row",
              file=sys.stderr, flush=True)
        return {**row(name, seeds, twin, None), "published_run": True}
    output = cache / "runs_tuned" / name
    wall = None
    if not (reuse and finished_group(output, seeds)):
        if reuse and (output / "config.yaml").is_file():
            resume(output, threads, "realdata-tuned")  # an interrupted run or group: its finished tasks and seeds stay
        else:
            wall = start(name, seeds, output, cache, weights, data_root, threads)
    return row(name, seeds, output, wall)


def start(name: str, seeds: tuple[int, ...], output: Path, cache: Path, weights: Path, data_root: Path,
          threads: int | None) -> float:
    """A fresh run (one seed) or seed group of the method's tuned config; returns its wall time."""
    config = config_of(name)
    overrides = assets.data_overrides(config, cache, weights, data_root)
    if len(seeds) > 1:
        return train(config, output, overrides, ("--seeds", ",".join(map(str, seeds))), threads, "realdata-tuned")
    return train(config, output, [*overrides, f"seed={seeds[0]}"], threads=threads, tag="realdata-tuned")


def row(name: str, seeds: tuple[int, ...], output: Path, wall: float | None) -> dict:
    """`wall` None: a reused run, whose start-up time is unknown (its tasks' own times are summed)."""
    runs = [output / f"seed-{seed}" for seed in seeds] if len(seeds) > 1 else [output]
    per_seed = []
    for seed, path in zip(seeds, runs):
        metrics = json.loads((path / "metrics.json").read_text())
        summary = metrics["summary"]
        per_seed.append({"seed": seed, "a_last": summary["a_last"], "average_accuracy": summary["average_accuracy"],
                         "forgetting": summary["forgetting"], "top1_curve": summary["top1_curve"],
                         "wall_time_s": sum(metrics["wall_time_s"])})
    return {"name": name, "config": str(config_of(name).relative_to(ROOT)), "seeds": list(seeds),
            "run_dirs": [str(path) for path in runs], "per_seed": per_seed,
            "wall_time_s": sum(entry["wall_time_s"] for entry in per_seed) if wall is None else wall,
            "tasks_only": wall is None,
            **{key: mean_std([entry[key] for entry in per_seed]) for key in ("a_last", "average_accuracy", "forgetting")}}


def mean_std(values: list) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None}
    mean = sum(finite) / len(finite)
    std = (sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) ** 0.5 if len(finite) > 1 else None
    return {"mean": mean, "std": std}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=assets.default_cache())
    parser.add_argument("--only", nargs="+", choices=ORDER)
    parser.add_argument("--reuse-finished", action="store_true")
    parser.add_argument("--reuse-published", action="store_true",
                        help="a one-seed row whose tuned config trains exactly what run.py's finished run trained "
                             "takes that run")
    parser.add_argument("--threads", type=int, help="train.threads of each run (1 when two runners share 2 cores)")
    args = parser.parse_args()
    weights, data_root = assets.build(args.cache)
    prompt = best_prompt()
    seeded = {*SEEDED, *([prompt] if prompt else [])}
    for name in args.only or ORDER:
        if not config_of(name).is_file():
            print(f"[realdata-tuned] {name}: no {config_of(name).relative_to(ROOT)} yet (run tune.py); skipped",
                  file=sys.stderr)
            continue
        entry = run(name, SEEDS if name in seeded else SEEDS[:1], args.cache, weights, data_root,
                    args.reuse_finished, args.threads, args.reuse_published)
        rows = {**saved_rows(), name: entry}
        document = {"machine": machine(), "protocol": "tuned on validation (tune.py), seeds as listed",
                    "rows": [rows[n] for n in ORDER if n in rows]}
        RESULTS_FILE.write_text(json.dumps(document, indent=1))
    write_report([entry["run_dirs"][0] for entry in saved_rows().values()], FIGURES)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    print(f"updated: {report.write().relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
