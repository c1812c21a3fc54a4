"""What a finished search writes: best.yaml (the config with the chosen values, re-runnable with `carecl train`),
trials.csv, Optuna's plots (optimisation history, one panel per parameter, importances) and tune.md."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import yaml

from carecl.config import config_to_dict
from carecl.runs.files import atomic_write_bytes
from carecl.tune.choice import best_trial, completed
from carecl.tune.overrides import chosen_config
from carecl.tune.space import format_value
from carecl.tune.study import PER_TASK_ATTR, REPEAT_ATTR, RUN_DIR_ATTR, STOPPED_ATTR, TuneSetup, TuneError, budget

log = logging.getLogger("carecl")

BEST_FILE = "best.yaml"
TRIALS_CSV = "trials.csv"
SUMMARY_FILE = "tune.md"
PLOTS_DIR = "plots"
FINAL_DIR = "final"
# A chosen trial with a task below this on validation already loses it: on the real-data stream the chosen trials of
# five methods that collapse had their weakest task at 30-54 % after two tasks, every other method's at 76 % or more.
WEAK_TASK = 70.0

PROTOCOLS = {
    "first-task": "each trial learned the first {tasks} task(s) and was scored by its validation accuracy on them",
    "stream": "each trial learned the whole stream and was scored by its validation {metric}",
    "two-stream": "each trial learned the tuning stream ({stream}) and was scored by its validation {metric}; the "
                  "chosen values then ran once on the evaluation stream with its test set",
}


def write_outputs(setup: TuneSetup, directory: Path, study, final: dict[str, Any] | None = None) -> Path:
    """best.yaml, trials.csv, plots and tune.md for the study's best trial; returns best.yaml's path."""
    best = chosen_trial(setup, study)
    config = chosen_config(setup.config, best.params)
    header = (f"# carecl tune {directory}: the best of {len(completed(study))} trial(s), trial {best.number}, "
              f"{metric_name(setup)} {best.value:.2f}\n# chosen: "
              + ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items()) + "\n")
    atomic_write_bytes(directory / BEST_FILE, (header + yaml.safe_dump(config_to_dict(config), sort_keys=False)).encode())
    atomic_write_bytes(directory / TRIALS_CSV, trials_csv(study, setup).encode())
    plots = write_plots(study, directory / PLOTS_DIR, setup.search_space().keys)
    atomic_write_bytes(directory / SUMMARY_FILE, summary(setup, directory, study, best, plots, final).encode())
    for warning in chosen_warnings(setup, best):
        log.warning("tune: %s", warning)
    return directory / BEST_FILE


def weak_task_warning(trial) -> str | None:
    """Said when the chosen trial learned two tasks or more and already scores one below WEAK_TASK on validation."""
    per_task = trial.user_attrs.get(PER_TASK_ATTR) or []
    if len(per_task) < 2 or min(per_task) >= WEAK_TASK:
        return None
    weakest = min(range(len(per_task)), key=per_task.__getitem__)
    return (f"the chosen trial scores {per_task[weakest]:.2f} % on task {weakest + 1}'s validation images after "
            f"learning {len(per_task)} tasks (below {WEAK_TASK:g} %): the best values of this space already leave a "
            "task behind, and over a longer stream the method is likely to leave more (docs/tuning.md)")


def chosen_warnings(setup: TuneSetup, trial) -> list[str]:
    """What the console and tune.md say about the chosen trial before the long run."""
    return [warning for warning in (weak_task_warning(trial), edge_warning(setup, trial)) if warning]


def edge_warning(setup: TuneSetup, trial) -> str | None:
    """Said when a chosen value is the end of its space: values beyond it were never tried."""
    ends = setup.search_space().ends_reached(trial.params)
    if not ends:
        return None
    return (f"the chosen {'; '.join(ends)}: values beyond {'it' if len(ends) == 1 else 'them'} were not tried, and a "
            "space reaching further may do better (docs/tuning.md)")


def metric_name(setup: TuneSetup) -> str:
    tune = setup.tune
    if tune.protocol == "first-task":
        return f"validation accuracy after {tune.tasks} task{'s' if tune.tasks > 1 else ''}"
    return f"validation {'A_last' if tune.metric == 'a_last' else 'Ā'}"


def chosen_trial(setup: TuneSetup, study):
    """The trial the tune chooses (choice.py's rule, with the config's values and `tune.tolerance`)."""
    trial = best_trial(study, setup.config, setup.tune.tolerance)
    if trial is None:
        raise TuneError("no trial finished: nothing to choose (see the trials' log.txt under trials/)")
    return trial


def trials_csv(study, setup: TuneSetup) -> str:
    keys = setup.search_space().keys
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "value", *keys, "per_task", "seconds", "stopped", REPEAT_ATTR, RUN_DIR_ATTR])
    for trial in study.get_trials(deepcopy=False):
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else ""
        writer.writerow([trial.number, trial.state.name.lower(), "" if trial.value is None else f"{trial.value:.4f}",
                         *(trial.params.get(k, "") for k in keys), per_task_text(trial),
                         f"{seconds:.1f}" if seconds != "" else "",
                         trial.user_attrs.get(STOPPED_ATTR, ""), trial.user_attrs.get(REPEAT_ATTR, ""),
                         trial.user_attrs.get(RUN_DIR_ATTR, "")])
    return buffer.getvalue()


def per_task_text(trial) -> str:
    return " ".join(f"{value:.2f}" for value in trial.user_attrs.get(PER_TASK_ATTR) or [])


def write_plots(study, folder: Path, keys: list[str]) -> list[Path]:
    """Optuna's matplotlib figures as PNG; one that cannot be drawn (too few trials) is left out with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    figures = {"history": lambda: plots.plot_optimization_history(study),
               "parameters": lambda: plots.plot_slice(study, params=keys)}
    if len(keys) > 1:
        figures["importances"] = lambda: plots.plot_param_importances(study)
    written = []
    for name, draw in figures.items():
        try:
            axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            log.info("tune: no %s plot (%s)", name, error)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(max(6.4, 4.0 * len(keys)) if name == "parameters" else 6.4, 4.2)
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def summary(setup: TuneSetup, directory: Path, study, best, plots: list[Path], final: dict[str, Any] | None) -> str:
    tune = setup.tune
    protocol = PROTOCOLS[tune.protocol].format(tasks=tune.tasks, metric=tune.metric, stream=", ".join(tune.stream))
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    lines = [f"# Tune: {setup.config.get('method', {}).get('name', '?')} on {setup.config.get('data', {}).get('dataset', '?')}",
             "",
             f"- protocol `{tune.protocol}`: {protocol}.",
             f"- {len(finished)} of {budget(setup)} trials finished ({tune.sampler} sampler, seed {tune.seed}); the test set "
             "was never read by a trial (`eval.test_set: false`).",
             f"- best: trial {best.number}, {metric_name(setup)} **{best.value:.2f}** with "
             + ", ".join(f"`{k}` = {format_value(v)}" for k, v in best.params.items()) + f" → [{BEST_FILE}]({BEST_FILE})"
             + (f" (trials within {tune.tolerance:g} points of the top value counted as tied)" if tune.tolerance else ""),
             *chosen_trial_lines(setup, best), ""]
    if final is not None:
        lines += [f"Evaluation stream, chosen values, test set ([{FINAL_DIR}/]({FINAL_DIR})): A_last "
                  f"{final['a_last']:.2f}, Ā {final['average_accuracy']:.2f}.", ""]
    keys = setup.search_space().keys
    lines += ["| trial | state | value | " + " | ".join(f"`{k}`" for k in keys) + " | per task |",
              "|---:|---|---:|" + "---|" * len(keys) + "---|"]
    for trial in study.get_trials(deepcopy=False):
        value = "" if trial.value is None else f"{trial.value:.2f}"
        note = "".join(f" ({text})" for text in trial_notes(trial))
        values = " | ".join(format_value(trial.params.get(k, "")) for k in keys)
        state = f"{trial.state.name.lower()}{note}"
        lines.append(f"| {trial.number} | {state} | {value} | {values} | {per_task_text(trial)} |")
    if any(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False)):
        lines += ["", "A `fail` trial did not finish (killed, then queued again with its values; or started beyond the "
                  "budget): it is not counted."]
    lines += ["", *(f"![{path.stem}]({path.relative_to(directory).as_posix()})" for path in plots),
              "", f"Trials: [{TRIALS_CSV}]({TRIALS_CSV}); each trial's run directory is listed there."]
    return "\n".join(lines) + "\n"


def trial_notes(trial) -> list[str]:
    attrs = trial.user_attrs
    return ([f"repeats trial {attrs[REPEAT_ATTR]}: not trained again"] if REPEAT_ATTR in attrs else []) + (
        [attrs[STOPPED_ATTR]] if STOPPED_ATTR in attrs else [])


def chosen_trial_lines(setup: TuneSetup, best) -> list[str]:
    per_task = per_task_text(best)
    return ([f"- its validation accuracy per task at the end: {per_task}"] if per_task else []) + [
        f"- **warning**: {warning}." for warning in chosen_warnings(setup, best)]


def run_final(setup: TuneSetup, directory: Path, study) -> dict[str, Any]:
    """two-stream: the chosen values run once on the evaluation stream (this config's, with its test set)."""
    from carecl.engine import resume_experiment, run_experiment

    config = chosen_config(setup.config, chosen_trial(setup, study).params)
    final = directory / FINAL_DIR
    summary_ = resume_experiment(final) if (final / "config.yaml").is_file() else run_experiment(config, final)
    return {"a_last": summary_.a_last, "average_accuracy": summary_.average_accuracy}
