"""What a new user meets in the first hour, through the CLI: each bad value refused before any work (exit 2,
a message naming the key or file, nothing left on disk), and the faults of a running job handled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from carecl.cli.main import RESUME_HELP, main
from carecl.runs.checkpoints import CheckpointStore
from carecl.runs.directory import RunDirectory
from carecl.runs.state import RESUME_OVERRIDABLE

from helpers import tiny_config

CARE = {"name": "care", "brmoe": {"adapter_dim": 8, "expert_dim": 4}, "alignment": {"epochs": 1, "samples_per_class": 4}}


def write_config(path: Path, edit=None, method=None) -> Path:
    document = yaml.safe_load(yaml.safe_dump(_as_dict(tiny_config(method=method or CARE))))
    if edit is not None:
        edit(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _as_dict(config):
    from carecl.config import config_to_dict

    return config_to_dict(config)


def section(name, key, value):
    def edit(document):
        document[name][key] = value
    return edit


# Each case: how the config file is edited (or raw text replaced), extra CLI arguments, and words the error
# must contain. Every one must stop with exit 2 before the output directory exists.
REFUSED = {
    "negative-lr": (section("train", "lr", -1.0), [], "train.lr must be positive, got -1.0"),
    "unknown-optimizer": (section("train", "optimizer", "adamm"), [],
                          "train.optimizer must be one of 'sgd', 'adam', 'adamw', got 'adamm'"),
    "negative-workers": (section("data", "num_workers", -1), [], "data.num_workers must be >= 0"),
    "zero-eval-batch": (section("eval", "batch_size", 0), [], "eval.batch_size must be positive"),
    "negative-seed": (lambda d: d.update(seed=-1), [], "seed must be in [0, 2**32)"),
    "cuda-without-gpu": (section("train", "device", "cuda"), [], "train.device is 'cuda' but this machine has no CUDA GPU"),
    "bad-device-name": (section("train", "device", "gpu"), [], "train.device must be auto, cpu, cuda, cuda:N or mps"),
    "bad-precision": (section("train", "precision", "fp8"), [], "train.precision must be one of 'fp32', 'bf16', 'fp16'"),
    "image-size-mismatch": (section("data", "image_size", 20), [], "img_size 16 does not fit the data's 20 px images"),
    "set-blamed-on-set": (None, ["--set", "train.lr=-1"], "--set train.lr=-1: train.lr must be positive"),
    "bad-set-syntax": (None, ["--set", "train.lr"], "--set 'train.lr' must look like key=value"),
    "imagefolder-without-root": (section("data", "dataset", "imagefolder"), [], "data.root must be set for dataset 'imagefolder'"),
    "alignment-storage": (lambda d: d["method"]["alignment"].update(storage="full"), [],
                          "method.alignment.storage must be one of 'covariance', 'variance'"),
    "backbone-of-parallel-blocks": (section("backbone", "name", "vit_small_patch16_18x2_224"), [],
                                    "backbone.name: BRMoEViT supports timm's standard Block"),
    "vit-without-cls-token": (lambda d: d["backbone"]["model_kwargs"].update(class_token=False, global_pool="avg"), [],
                              "the ViT must have one (backbone.model_kwargs.class_token: true)"),
    "old-key-beside-new": (None, ["--set", "method.adapter_dim=4"], "method.adapter_dim and method.brmoe.adapter_dim"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_values_are_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    if case == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr("carecl.engine.run.learn_all_tasks", lambda *a, **k: pytest.fail("training started"))
    edit, arguments, words = REFUSED[case]
    config = write_config(tmp_path / "config.yaml", edit)
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "run"), *arguments])
    error = capsys.readouterr().err
    assert code == 2
    assert words in error, error
    assert "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_in_any_float_form_and_duplicate_keys(tmp_path, capsys):
    text = write_config(tmp_path / "config.yaml").read_text()
    (tmp_path / "floats.yaml").write_text(text.replace("lr: 0.05", "lr: 1e-4").replace("min_lr: 0.0", "min_lr: 1E-6"))
    from carecl.config import load_config

    loaded = load_config(tmp_path / "floats.yaml")
    assert (loaded.train.lr, loaded.train.min_lr) == (1e-4, 1e-6)
    (tmp_path / "twice.yaml").write_text(text + "seed: 7\n")
    assert main(["train", "--config", str(tmp_path / "twice.yaml"), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "duplicate key 'seed'" in error and "line" in error and str(tmp_path / "twice.yaml") in error
    assert not (tmp_path / "run").exists()


def test_adam_and_a_method_switch_by_set_run(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", section("train", "optimizer", "adam"))
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "adam")]) == 0
    # The file's CaRE options are dropped when --set switches the method.
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "simple"),
                 "--set", "method.name=simplecil"]) == 0
    assert yaml.safe_load((tmp_path / "simple" / "config.yaml").read_text())["method"] == {
        "name": "simplecil", "cache_features": True}


def test_resume_help_lists_every_key_a_resume_may_change():
    for key in RESUME_OVERRIDABLE:
        assert key.split(".")[0] in RESUME_HELP
        assert key in RESUME_HELP or key.startswith("logging."), key


def test_disk_full_names_the_path_and_leaves_no_staging(tmp_path, monkeypatch):
    import safetensors.torch

    from carecl.runs.checkpoints import CheckpointWriteError

    class SafetensorError(Exception):
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    run = RunDirectory.create(tmp_path / "run", tiny_config())
    monkeypatch.setattr("carecl.runs.files.save_file", full)
    for _ in range(2):  # a retry must not leave a second staging folder
        with pytest.raises(CheckpointWriteError, match=r"cannot write .*learner\.safetensors.*No space left"):
            run.save_state({"x": torch.zeros(1)}, {"n_learned_tasks": 1, "class_order": [], "task_sizes": []})
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    assert safetensors.torch.save_file is not full


def test_stale_staging_folders_are_removed_on_resume(tmp_path):
    run_experiment_cli(tmp_path, epochs=1)
    stale = tmp_path / "run" / "checkpoints" / ".tmp-learned-0009-123"
    stale.mkdir()
    (stale / "learner.safetensors").write_bytes(b"half")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert not stale.exists()


def run_experiment_cli(tmp_path: Path, epochs: int = 1, **train) -> Path:
    config = write_config(tmp_path / "config.yaml", lambda d: d["train"].update(epochs=epochs, **train))
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    return tmp_path / "run"


def test_lost_pointer_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys):
    run = run_experiment_cli(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    pointer = run / "checkpoints" / "latest.json"
    pointer.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    error = capsys.readouterr().err
    assert "latest.json is missing; using the newest complete checkpoint, learned-0003" in error
    assert "no checkpoint yet" not in error
    assert json.loads((run / "metrics.json").read_text())["summary"] == metrics["summary"]
    assert RunDirectory.open(run).load_state()[1]["n_learned_tasks"] == 3


def test_diverged_loss_suggests_a_lower_lr_that_resume_accepts(tmp_path, capsys, monkeypatch):
    from carecl.methods.base import StepOutput
    from carecl.methods.care import CaRE

    original = CaRE.training_loss

    def nan_in_task_2(self, images, targets, task):
        step = original(self, images, targets, task)
        return StepOutput(step.loss * float("nan")) if task.index == 1 else step

    monkeypatch.setattr(CaRE, "training_loss", nan_in_task_2)
    config = write_config(tmp_path / "config.yaml", section("train", "epochs", 2))
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    suggestion = f"carecl train --resume {tmp_path / 'run'} --set train.lr=0.005"
    assert "task 2 first half, epoch 1/1, batch 1: the loss became nan" in error and suggestion in error
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "stopped: task 2" in log and suggestion in log
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.lr=0.005"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.005
    assert "train.lr changed" in (tmp_path / "run" / "log.txt").read_text()


def test_ctrl_c_stops_with_one_line_and_resumes(tmp_path):
    # A low lr: at the tiny config's 0.05 the loss turns NaN near epoch 100, and on a loaded machine the
    # Ctrl-C can come after that (exit 2, not 130).
    config = write_config(tmp_path / "config.yaml",
                          lambda d: d["train"].update(epochs=400, checkpoint_every_epochs=1, lr=0.001))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: an ignored SIGINT is inherited across exec, and Python then
    # installs no KeyboardInterrupt handler (in full-suite CI runs the child ran on to the end).
    process = subprocess.Popen([sys.executable, "-m", "carecl", "train", "--config", str(config), "--output",
                                str(tmp_path / "run")], stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    store = CheckpointStore(tmp_path / "run")
    deadline = 120
    import time

    started = time.time()
    while time.time() - started < deadline and not (store.pointer_path.is_file()):
        time.sleep(0.2)
    if not store.pointer_path.is_file():  # Ctrl-C during start-up (imports) is not what this test is about
        process.kill()
        pytest.fail(f"no checkpoint within {deadline} s: the machine is too loaded for this test")
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error  # the stderr says what stopped it otherwise
    assert "Traceback" not in error
    said = [line for line in error.splitlines() if "interrupt" in line.lower()]
    assert len(said) == 1 and f"continue with `carecl train --resume {tmp_path / 'run'}`" in said[0], error
    assert "interrupted (Ctrl-C)" in (tmp_path / "run" / "log.txt").read_text()
    assert store.open("resume") is not None  # what was saved stays resumable


def test_each_log_line_is_printed_once_on_stderr_and_never_on_stdout(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", method={"name": "simplecil"})
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("task 1/3  classes 2") == 1
    assert "task 1/3" not in captured.out and "A_last" in captured.out
