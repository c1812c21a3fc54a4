"""Kill a run anywhere, resume it, and get exactly the numbers of a run never interrupted.

In-process interruptions (an exception at a kill point) cover many points cheaply; real
subprocesses killed with SIGKILL (at a batch, during class statistics, during alignment, during a
checkpoint write, and at a random moment) check what an exception cannot: nothing is cleaned up.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carecl import alignment
from carecl.statistics import GaussianClassStatistics
from carecl.runs import checkpoints as ckpt
from carecl.runs.checkpoints import CheckpointStore
from carecl.cli.main import main
from carecl.config import save_config
from carecl.engine import resume_experiment, run_experiment

from helpers import Interrupted, assert_same_outcome, interrupt_at, outcome, tiny_config

# Run by the killed subprocesses: the CLI, single-threaded and deterministic like the in-process
# reference, optionally SIGKILLing itself on the N-th call of a statistics or alignment step.
DRIVER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
spec = os.environ.get("KILL_DURING")
if spec:
    what, n = spec.split(":")
    calls = [0]
    def killing(original):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapped
    import carecl.alignment as alignment
    import carecl.statistics as statistics
    if what == "statistics":
        statistics.GaussianClassStatistics.add_from_sums = killing(statistics.GaussianClassStatistics.add_from_sums)
    else:
        alignment._align_epoch = killing(alignment._align_epoch)
from carecl.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def care_config(every: int = 1):
    """CaRE, 3 tasks of 2 synthetic classes; tasks 1-2 have two 2-epoch phases, each ending with
    class statistics and alignment, and train with the shared-adapter anchor taken at each phase's start."""
    return tiny_config(method={"name": "care", "brmoe": {"adapter_dim": 4}, "alignment": {"epochs": 2}},
                       train={"epochs": 4, "batch_size": 8, "checkpoint_every_epochs": every})


@pytest.fixture(scope="module")
def deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, deterministic):
    references = {}
    for every in (0, 1):
        run = tmp_path_factory.mktemp("reference") / "run"
        run_experiment(care_config(every), run)
        references[every] = outcome(run)
    # Mid-task checkpoints never change the numbers.
    assert references[0][0] == references[1][0]
    run = tmp_path_factory.mktemp("reference") / "run"
    run_experiment(tiny_config(), run)
    references["simplecil"] = outcome(run)
    return references


@pytest.mark.parametrize(
    "every, label",
    [
        (1, "task0/train/epoch2/batch2"),
        (1, "task1/first-half/epoch0/batch1"),
        (1, "task1/first-half/epoch1/batch1"),
        (1, "task1/second-half/epoch1/batch0"),
        (1, "task2/first-half/epoch1/batch2"),
        (1, "checkpoint/learned-0001-phase-1-epoch-0000/written"),
        (1, "checkpoint/learned-0002/renamed"),
        (1, "checkpoint/learned-0002-phase-0-epoch-0001/switched"),
        (1, "checkpoint/learned-0003/partial"),
        (0, "task2/second-half/epoch1/batch1"),
    ],
)
def test_interrupted_anywhere_resumes_to_identical_results(tmp_path, monkeypatch, reference, every, label):
    interrupt_at(monkeypatch, label)
    with pytest.raises(Interrupted):
        run_experiment(care_config(every), tmp_path / "run")
    monkeypatch.setattr(ckpt, "kill_point", lambda current: None)
    resume_experiment(tmp_path / "run")
    assert_same_outcome(tmp_path / "run", reference[every])


@pytest.mark.parametrize("label", ["checkpoint/learned-0001/written", "checkpoint/learned-0002/switched"])
def test_interrupted_simplecil_resumes_to_identical_results(tmp_path, monkeypatch, reference, label):
    interrupt_at(monkeypatch, label)
    with pytest.raises(Interrupted):
        run_experiment(tiny_config(), tmp_path / "run")
    monkeypatch.setattr(ckpt, "kill_point", lambda current: None)
    resume_experiment(tmp_path / "run")
    assert_same_outcome(tmp_path / "run", reference["simplecil"])


@pytest.mark.parametrize("what", ["statistics", "alignment"])
def test_interrupted_inside_end_phase_resumes_to_identical_results(tmp_path, monkeypatch, reference, what):
    calls = []

    def interrupt_on_fourth_call(original):
        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                raise Interrupted(what)
            return original(*args, **kwargs)
        return wrapped

    if what == "statistics":
        statistics = GaussianClassStatistics
        monkeypatch.setattr(statistics, "add_from_sums", interrupt_on_fourth_call(statistics.add_from_sums))
    else:
        monkeypatch.setattr(alignment, "_align_epoch", interrupt_on_fourth_call(alignment._align_epoch))
    with pytest.raises(Interrupted):
        run_experiment(care_config(1), tmp_path / "run")
    monkeypatch.undo()
    resume_experiment(tmp_path / "run")
    assert_same_outcome(tmp_path / "run", reference[1])


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, **env}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=cwd, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen, timeout: float = 120) -> int:
    process.wait(timeout=timeout)
    return process.returncode


def test_sigkilled_processes_resume_to_identical_results(tmp_path, reference):
    config_file, run = tmp_path / "config.yaml", tmp_path / "run"
    save_config(care_config(1), config_file)
    killed = -signal.SIGKILL
    # 1. Killed in the middle of an epoch of task 1: resumes from the end of task 0.
    assert finished(run_cli(["train", "--config", str(config_file), "--output", str(run)], tmp_path,
                            CARECL_TEST_KILL_AT="task1/first-half/epoch0/batch1")) == killed
    assert CheckpointStore(run).pointer()["resume"] == "learned-0001"
    # 2. Killed while computing task 1's class statistics (second class of the first half).
    assert finished(run_cli(["train", "--resume", str(run)], tmp_path, KILL_DURING="statistics:2")) == killed
    assert CheckpointStore(run).pointer()["resume"] == "learned-0001-phase-0-epoch-0002"
    # 3. Killed during task 1's first alignment epoch.
    assert finished(run_cli(["train", "--resume", str(run)], tmp_path, KILL_DURING="alignment:1")) == killed
    # 4. Killed between writing task 1's checkpoint folder and switching the pointer to it.
    assert finished(run_cli(["train", "--resume", str(run)], tmp_path,
                            CARECL_TEST_KILL_AT="checkpoint/learned-0002/renamed")) == killed
    store = CheckpointStore(run)
    assert (store.root / "learned-0002").is_dir() and store.pointer()["resume"] == "learned-0001-phase-2-epoch-0000"
    store.open("resume")  # the pointer's checkpoint verifies
    # 5. The rest in this process: identical to the uninterrupted run; no leftovers.
    resume_experiment(run)
    assert_same_outcome(run, reference[1])
    assert sorted(p.name for p in store.root.iterdir()) == ["latest.json", "learned-0003"]


def test_sigkill_at_a_random_moment_resumes_to_identical_results(tmp_path, reference):
    config_file, run = tmp_path / "config.yaml", tmp_path / "run"
    save_config(care_config(1), config_file)
    delay = random.Random().uniform(0.0, 1.0)
    process = run_cli(["train", "--config", str(config_file), "--output", str(run)], tmp_path)
    deadline = time.monotonic() + 120
    while not ((run / "log.txt").is_file() and "care on synthetic" in (run / "log.txt").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    code = finished(process)
    print(f"killed {delay:.3f} s into training (exit {code}); pointer {CheckpointStore(run).pointer()}")
    resume_experiment(run)
    assert_same_outcome(run, reference[1])


def test_resuming_a_finished_run_changes_nothing(tmp_path, reference, capsys):
    run = tmp_path / "run"
    run_experiment(care_config(0), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert main(["train", "--resume", str(run)]) == 0
    assert "A_last" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"} == before
    assert_same_outcome(run, reference[0])
