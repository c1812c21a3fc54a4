"""The real-data benchmark's settings, chosen without its test set: one `carecl tune` per method, the same budget each.

    python benchmarks/realdata/tune.py                      # every method below, in this order (resumes finished ones)
    python benchmarks/realdata/tune.py --only care mos      # some of them
    python benchmarks/realdata/tune.py --jobs 2             # two trials at a time, one thread each

Protocol, identical for every method: `first-task` over the first TASKS tasks of the stream (seed 1993), scored on
a validation split of 20 % of each class's training images, grid sampler, TRIALS trials. The space of each method
(configs/spaces/<method>.yaml): the learning rate on a log grid spanning its published value (8 values), or 4 such values
crossed with 2 values of the one method key that acts within those tasks; a method that does not train by gradient
descent spends its trials on its own key. Each tune starts from the method's published settings
(<method>.yaml here, or care_release.yaml for CaRE) and writes:

    tuned/<method>.yaml    best.yaml: the published settings with the chosen values (run by run.py --tuned)
    tuned/<method>.md      the tune's summary (tune.md): every trial, its validation score, the choice
    tuned/<method>.csv     trials.csv

Tune directories live in <cache>/tune/<method> (resumable: an interrupted tune continues where it stopped).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUNED = HERE / "tuned"
SPACES = HERE.parents[1] / "configs" / "spaces"
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

TASKS, TRIALS = 2, 8
# Method -> the config its published settings are in (the CaRE release's settings for CaRE).
METHODS = {
    "care": "care_release", "ranpac": "ranpac", "fecam": "fecam", "acil": "acil", "mos": "mos",
    "hide_prompt": "hide_prompt", "norga": "norga", "moal": "moal", "l2p": "l2p", "dualprompt": "dualprompt",
    "coda_prompt": "coda_prompt", "sema": "sema", "slca": "slca", "ease": "ease", "ssiat": "ssiat",
    "aper_adapter": "aper_adapter", "aper_ssf": "aper_ssf", "aper_vpt_shallow": "aper_vpt_shallow",
    "aper_vpt_deep": "aper_vpt_deep", "moe_adapters": "moe_adapters", "tuna": "tuna", "min": "min",
}


def copy_outputs(method: str, directory: Path, cache: Path, data_root: Path) -> None:
    """best.yaml, tune.md, trials.csv and the plots into tuned/, with portable asset paths and links."""
    TUNED.mkdir(exist_ok=True)
    best = (directory / "best.yaml").read_text()
    # The machine's asset paths go back to the cache's default spelling, as in the other configs here.
    for absolute, portable in ((str(data_root), "~/.cache/carecl-realdata/fmnist-mnist"),
                               (str(cache), "~/.cache/carecl-realdata")):
        best = best.replace(absolute, portable)
    (TUNED / f"{method}.yaml").write_text(best)
    summary = (directory / "tune.md").read_text().replace("(best.yaml)", f"({method}.yaml)")
    summary = summary.replace("(trials.csv)", f"({method}.csv)").replace("(plots/", f"(plots/{method}_")
    (TUNED / f"{method}.md").write_text(summary)
    shutil.copyfile(directory / "trials.csv", TUNED / f"{method}.csv")
    (TUNED / "plots").mkdir(exist_ok=True)
    for plot in (directory / "plots").glob("*.png"):
        shutil.copyfile(plot, TUNED / "plots" / f"{method}_{plot.name}")


def refresh(method: str, cache: Path, data_root: Path) -> None:
    """Write a finished tune's outputs again from its study (after a change to how they are written)."""
    from carecl.tune import outputs, study

    directory = cache / "tune" / method
    setup = study.TuneSetup.read(directory)
    outputs.write_outputs(setup, directory, study.open_study(setup, create=False))
    copy_outputs(method, directory, cache, data_root)


def tune(method: str, cache: Path, weights: Path, data_root: Path, jobs: int) -> None:
    config = HERE / f"{METHODS[method]}.yaml"
    directory = cache / "tune" / method
    if (directory / "tune.json").is_file():
        command = ["--resume", str(directory), "--jobs", str(jobs)]
    else:
        if directory.exists():
            shutil.rmtree(directory)
        sets = [*assets.data_overrides(config, cache, weights, data_root), "tune.protocol=first-task", f"tune.tasks={TASKS}",
                f"tune.trials={TRIALS}", "tune.sampler=grid", "tune.validation_fraction=0.2", "train.progress=false"]
        command = ["--config", str(config), "--space", str(SPACES / f"{method}.yaml"), "--output", str(directory),
                   "--jobs", str(jobs), *[item for entry in sets for item in ("--set", entry)]]
    print(f"[tune] {method}: carecl tune {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "carecl", "tune", *command], check=True)
    copy_outputs(method, directory, cache, data_root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=assets.default_cache())
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--skip-tuned", action="store_true", help="leave methods that already have tuned/<method>.yaml")
    parser.add_argument("--refresh", action="store_true", help="only write the finished tunes' outputs again")
    args = parser.parse_args()
    weights, data_root = assets.build(args.cache)
    if args.refresh:
        for method in args.only or [m for m in METHODS if (TUNED / f"{m}.yaml").is_file()]:
            refresh(method, args.cache, data_root)
        return 0
    for method in args.only or list(METHODS):
        if args.skip_tuned and (TUNED / f"{method}.yaml").is_file():
            continue
        tune(method, args.cache, weights, data_root, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
