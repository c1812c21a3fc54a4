"""Checkpoints: layout and manifest, truncated/tampered files, failed writes, safe loading, resume rules."""

from __future__ import annotations

import ast
import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from carecl.runs.checkpoints import CheckpointError, CheckpointStore, CheckpointWriteError
from carecl.runs.files import sha256_file
from carecl.runs.training_state import capture_rng, load_optimizer_state, optimizer_state, restore_rng
from carecl.cli.main import main
from carecl.config import ConfigError, save_config
from carecl.engine import Experiment, load_experiment, resume_experiment, run_experiment, save_learner
from carecl.engine.evaluation import evaluate
from carecl.runs.directory import RunDirectory, RunDirectoryError

from helpers import tiny_config

REPOSITORY = Path(__file__).resolve().parents[1]


def snapshot(run: Path) -> dict[Path, bytes]:
    """Every file's bytes (log.txt aside: a refused resume may still log why)."""
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "log.txt"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(tiny_config(), run)
    return run


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_layout_manifest_and_root_copy(finished_run):
    store = CheckpointStore(finished_run)
    pointer = store.pointer()
    assert pointer["resume"] == pointer["task_end"] == "learned-0003"
    folder = store.root / "learned-0003"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["learner.json", "learner.safetensors", "trainer.json", "trainer.safetensors"]
    for file, entry in manifest.items():
        assert entry["sha256"] == sha256_file(folder / file) and entry["bytes"] == (folder / file).stat().st_size
    assert sorted(p.name for p in store.root.iterdir()) == ["latest.json", "learned-0003"]  # older ones pruned
    # The root's learner files are the last finished task's, for tools that read them there.
    assert os.path.samefile(finished_run / "learner.safetensors", folder / "learner.safetensors")
    trainer = json.loads((folder / "trainer.json").read_text())
    assert trainer["record"]["evaluations"][-1]["top1"] == json.loads((finished_run / "metrics.json").read_text())["tasks"][-1]["top1"]
    assert set(load_file(str(folder / "trainer.safetensors"))) == {"rng.torch"}


@pytest.mark.parametrize("file", ["learner.safetensors", "trainer.json", "learner.json"])
@pytest.mark.parametrize("damage", ["truncate", "flip-byte"])
def test_damaged_checkpoint_is_an_error_naming_the_file_and_nothing_changes(finished_run, tmp_path, file, damage):
    run = copy_run(finished_run, tmp_path / "run")
    path = run / "checkpoints" / "learned-0003" / file
    payload = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(payload[: len(payload) // 2])
    else:
        payload[len(payload) // 2] ^= 0x01
        path.write_bytes(bytes(payload))
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} does not match its SHA-256"):
        resume_experiment(run)
    with pytest.raises(CheckpointError, match=str(path)):
        load_experiment(RunDirectory.open(run))
    assert main(["train", "--resume", str(run)]) == 2
    assert snapshot(run) == before


def test_damaged_pointer_and_missing_manifest_are_named(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "checkpoints" / "latest.json").write_text('{"resume": ')
    with pytest.raises(CheckpointError, match=str(run / "checkpoints" / "latest.json")):
        resume_experiment(run)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"resume": "learned-0003", "task_end": "learned-0003"}))
    (run / "checkpoints" / "learned-0003" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_experiment(RunDirectory.open(run))


def test_failed_checkpoint_write_stops_training_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_replace = os.replace

    def disk_full_for_task_2(source, target, *args, **kwargs):
        if Path(target).name == "learned-0002":
            raise OSError(errno.ENOSPC, "No space left on device", str(source))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_for_task_2)
    with pytest.raises(CheckpointWriteError, match="cannot write .*learned-0002.*: No space left on device") as error:
        run_experiment(tiny_config(), tmp_path / "run")
    assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
    store = CheckpointStore(tmp_path / "run")
    assert store.open("resume").name == "learned-0001"
    assert sorted(p.name for p in store.root.iterdir()) == ["latest.json", "learned-0001"]  # no half-written folder
    monkeypatch.setattr(os, "replace", real_replace)
    experiment = load_experiment(RunDirectory.open(tmp_path / "run"))
    assert experiment.method.n_learned_tasks == 1
    assert len(resume_experiment(tmp_path / "run").top1_curve) == 3


def test_permission_denied_checkpoint_write_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_experiment(tiny_config(data={"synthetic_classes": 4}), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    if os.geteuid() == 0:  # root ignores file modes: make the folder refuse new entries as a read-only one does
        real_mkdir = Path.mkdir

        def denied(self, *args, **kwargs):
            if self.parent == checkpoints:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", denied)
    else:
        os.chmod(checkpoints, 0o500)
    try:
        with pytest.raises(CheckpointWriteError, match=f"cannot write {checkpoints}/.*: Permission denied"):
            RunDirectory(tmp_path / "run").save_state({"x": torch.zeros(1)}, {"n_learned_tasks": 1, "class_order": [], "task_sizes": []})
    finally:
        os.chmod(checkpoints, 0o700)
    assert CheckpointStore(tmp_path / "run").open("resume").name == "learned-0002"


def test_read_only_output_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr("carecl.engine.experiment.Experiment.build", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(RunDirectoryError, match=f"output directory .*: {tmp_path / 'locked'} is not writable"):
        run_experiment(tiny_config(), tmp_path / "locked" / "run")


def test_resume_refuses_a_different_config_but_accepts_operational_overrides(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(ConfigError, match="train.momentum differ"):
        resume_experiment(run, overrides=["train.momentum=0.5"])
    other = tmp_path / "other.yaml"
    save_config(tiny_config(train={"epochs": 3}), other)
    assert main(["train", "--resume", str(run), "--config", str(other)]) == 2
    assert "train.epochs differ" in capsys.readouterr().err
    same = tmp_path / "same.yaml"
    save_config(tiny_config(), same)
    assert main(["train", "--resume", str(run), "--config", str(same), "--set", "train.progress=false", "--strict-data"]) == 0
    assert snapshot(run) == before
    # An edited config.yaml no longer matches the config the checkpoint was written with.
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("momentum: 0.9", "momentum: 0.5"))
    with pytest.raises(CheckpointError, match="differs from the config checkpoint .* was written with, at train.momentum"):
        resume_experiment(run, overrides=[])


def test_second_process_on_the_same_run_is_refused(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    with RunDirectory(run).lock():
        with pytest.raises(RunDirectoryError, match="in use by another carecl process"):
            resume_experiment(run)


def test_save_state_runs_evaluate_but_do_not_resume(tmp_path):
    """The path an imported model takes: RunDirectory.create + save_learner, no trainer state."""
    config = tiny_config(data={"synthetic_classes": 4})
    experiment = Experiment.build(config)
    from carecl.engine import learn_task

    learn_task(experiment, experiment.scenario.task(0))
    run = RunDirectory.create(tmp_path / "run", config)
    save_learner(run, experiment)
    loaded = load_experiment(RunDirectory.open(tmp_path / "run"))
    loader = loaded.test_loader(2)
    assert evaluate(loaded.method, loader, loaded.device, 0, 1).top1 == evaluate(experiment.method, loader, experiment.device, 0, 1).top1
    with pytest.raises(CheckpointError, match="holds no training state"):
        resume_experiment(tmp_path / "run")


def test_mid_task_only_run_cannot_be_opened_for_evaluation(tmp_path):
    run = RunDirectory.create(tmp_path / "run", tiny_config())
    run.save_state({"x": torch.zeros(1)}, {"n_learned_tasks": 0, "class_order": [], "task_sizes": [],
                                          "position": {"phase": 0, "epoch": 1}})
    with pytest.raises(RunDirectoryError, match="no finished task yet"):
        RunDirectory.open(tmp_path / "run")


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    document, tensors = capture_rng()
    (tmp_path / "rng.json").write_text(json.dumps(document))
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng(json.loads((tmp_path / "rng.json").read_text()), load_file(str(tmp_path / "rng.safetensors")))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_round_trips_without_pickle(tmp_path, kind):
    def make(parameters):
        if kind == "sgd":
            return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=1e-3)
        return torch.optim.AdamW(parameters, lr=0.1)

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    optimizer = make(weights)
    for _ in range(2):
        optimizer.zero_grad()
        (weights[0].sum() ** 2 + weights[1].prod()).backward()
        optimizer.step()
    document, tensors = optimizer_state(optimizer, "optimizer")
    save_file(tensors, str(tmp_path / "o.safetensors"))
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    restored = make(copies)
    load_optimizer_state(restored, json.loads(json.dumps(document)), load_file(str(tmp_path / "o.safetensors")), "optimizer")
    for optim, params in ((optimizer, weights), (restored, copies)):
        optim.zero_grad()
        (params[0].sum() ** 2 + params[1].prod()).backward()
        optim.step()
    for a, b in zip(weights, copies):
        assert torch.equal(a, b)


def torch_load_calls(source: str, name: str = "<string>") -> list[tuple[int, bool]]:
    """(line, has weights_only=True) for every torch.load(...) call in Python source."""
    calls = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_no_torch_load_without_weights_only_anywhere():
    assert torch_load_calls("torch.load(f)\ntorch.load(\n  f, weights_only=True)\ntorch.load(f, weights_only=False)") == \
        [(1, False), (2, True), (4, False)]
    files = [p for folder in ("src", "scripts", "tests", "benchmarks") for p in (REPOSITORY / folder).rglob("*.py")]
    calls = {p: torch_load_calls(p.read_text(), str(p)) for p in files}
    unsafe = [f"{path.relative_to(REPOSITORY)}:{line}" for path, found in calls.items() for line, safe in found if not safe]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    assert calls[REPOSITORY / "src" / "carecl" / "backbones.py"]  # the scan does see the real call sites
