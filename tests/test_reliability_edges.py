"""The remaining edges, each through the CLI: no traceback where a clear exit-2 error belongs, messages that name the
real source of a value and commands that work, output other tools can parse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from carecl.cli.main import main
from carecl.config import config_to_dict

from helpers import tiny_config

CARE = {"name": "care", "brmoe": {"adapter_dim": 4, "expert_dim": 4}, "alignment": {"epochs": 1, "samples_per_class": 4}}


def write(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def image_tree(root: Path, classes: int = 3, train: int = 4, test: int = 2) -> Path:
    rng = np.random.RandomState(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def train(config: Path, output: Path, *arguments: str) -> int:
    return main(["train", "--config", str(config), "--output", str(output), *arguments])


def test_a_junk_or_cut_safetensors_weights_file_is_named(tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    good = tmp_path / "good.safetensors"
    save_file({"x": torch.zeros(1000)}, str(good))
    for name, payload in (("junk.safetensors", b"not a safetensors file at all"),
                          ("cut.safetensors", good.read_bytes()[:200])):
        weights = tmp_path / name
        weights.write_bytes(payload)
        config = write(tmp_path / "config.yaml", tiny_config(backbone={"name": "vit_tiny_patch16_224", "pretrained": False,
                                                                      "weights": str(weights),
                                                                      "model_kwargs": {"img_size": 16, "patch_size": 4,
                                                                                       "embed_dim": 32, "depth": 2,
                                                                                       "num_heads": 2}}))
        assert train(config, tmp_path / "run") == 2
        error = capsys.readouterr().err
        assert f"backbone.weights: cannot read {weights}: not a complete safetensors file" in error
        assert "Traceback" not in error and not (tmp_path / "run").exists()


def test_a_symbolic_link_loop_in_a_class_folder_is_named(tmp_path, capsys):
    root = image_tree(tmp_path / "images")
    (root / "train" / "class1" / "again").symlink_to(root / "train" / "class1", target_is_directory=True)
    config = write(tmp_path / "config.yaml", tiny_config(data={"dataset": "imagefolder", "root": str(root),
                                                               "init_cls": 3, "increment": 3}))
    assert train(config, tmp_path / "run") == 2
    error = capsys.readouterr().err
    assert "class1/again is a symbolic link back to a folder that contains it (a loop)" in error
    assert "Traceback" not in error


def test_out_of_memory_is_one_line_naming_the_phase_and_what_to_lower(tmp_path, capsys):
    method = {**CARE, "alignment": {"epochs": 1, "samples_per_class": 10**11}}  # far beyond any machine
    config = write(tmp_path / "config.yaml", tiny_config(method=method))
    assert train(config, tmp_path / "run") == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert len(error) == 1 and "during task 2, the end of phase 'first half'" in error[0]
    assert "method.alignment.samples_per_class" in error[0] and "Traceback" not in error[0]
    checkpoints = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert checkpoints["task_end"] == "learned-0001"  # the first task's checkpoint is intact
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "out of memory during task 2" in log


def test_strict_data_names_the_bad_file_in_one_line_and_leaves_no_run(tmp_path, capsys):
    root = image_tree(tmp_path / "images")
    (root / "train" / "class0" / "1.png").write_bytes(b"not a png")
    config = write(tmp_path / "config.yaml", tiny_config(data={"dataset": "imagefolder", "root": str(root),
                                                               "init_cls": 3, "increment": 3, "num_workers": 1}))
    assert train(config, tmp_path / "run", "--strict-data") == 2
    error = capsys.readouterr().err
    assert f"cannot read image {root / 'train' / 'class0' / '1.png'}" in error
    assert "Traceback" not in error and "DataLoader worker" not in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_for_every_float_key(tmp_path, capsys, value):
    config = write(tmp_path / "config.yaml", tiny_config(method=CARE))
    for key in ("train.lr", "train.weight_decay", "method.alignment.lr", "method.scale"):
        assert train(config, tmp_path / "run", "--set", f"{key}={value}") == 2
        assert f"--set {key}={value}: {key} must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_errors_name_the_set_that_gave_the_value(tmp_path, capsys):
    config = write(tmp_path / "config.yaml", tiny_config(method=CARE))
    cases = [(["--set", "data.image_size=20"], "--set data.image_size=20: "),
             (["--set", "method.name=simplecil", "--set", "method.alignment.epochs=3"],
              "--set method.alignment.epochs=3: unknown config key 'method.alignment'"),
             (["--seeds", "1,1"], "--seeds 1,1 lists 1 more than once")]
    if not __import__("torch").cuda.is_available():
        cases.append((["--set", "train.device=cuda"], "--set train.device=cuda: train.device is 'cuda'"))
    for arguments, words in cases:
        assert train(config, tmp_path / "run", *arguments) == 2
        assert words in capsys.readouterr().err


def test_report_defaults_its_output_to_the_run(tmp_path, capsys):
    config = write(tmp_path / "config.yaml", tiny_config())
    assert train(config, tmp_path / "run") == 0
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "report.md").is_file()


def test_a_checkpoint_error_is_printed_once(tmp_path, capsys):
    config = write(tmp_path / "config.yaml", tiny_config(train={"epochs": 1}))
    assert train(config, tmp_path / "run") == 0
    learner = next((tmp_path / "run" / "checkpoints").glob("learned-*/learner.safetensors"))
    learner.write_bytes(learner.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "eval.batch_size=32"]) == 2
    error = capsys.readouterr().err
    named = [line for line in error.splitlines() if "learner.safetensors" in line]
    assert len(named) == 1 and "does not match its SHA-256" in named[0], error


def test_group_json_is_valid_json_and_zero_epochs_warn(tmp_path, capsys):
    config = write(tmp_path / "config.yaml", tiny_config(data={"synthetic_classes": 2}, train={"epochs": 0},
                                                         method=CARE))
    assert train(config, tmp_path / "group", "--seeds", "1,2") == 0
    assert "train.epochs is 0: no task is trained" in capsys.readouterr().err
    text = (tmp_path / "group" / "group.json").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    document = json.loads(text, parse_constant=refuse)  # NaN / Infinity are not JSON
    assert document["summary"]["forgetting"]["mean"] is None  # one task: no forgetting


def test_data_verify_checks_a_users_own_tree(tmp_path, capsys):
    root = image_tree(tmp_path / "mine")
    (root / "test" / "class2" / "dup.png").write_bytes((root / "train" / "class0" / "0.png").read_bytes())
    (root / "train" / "class1" / "3.png").write_bytes(b"broken")
    assert main(["data", "verify", str(root)]) == 2
    out = capsys.readouterr().out
    assert "train per class: class0 4, class1 4, class2 4" in out
    assert "1 unreadable image(s): train/class1/3.png" in out and "in both train/ and test/" in out


def test_a_folder_of_any_class_count_runs_with_init_cls_null(tmp_path):
    root = image_tree(tmp_path / "images", classes=6)
    for increment, sizes in ((10, [6]), (4, [4, 2])):
        config = write(tmp_path / "config.yaml", tiny_config(data={"dataset": "imagefolder", "root": str(root),
                                                                   "init_cls": None, "increment": increment}))
        assert train(config, tmp_path / f"run{increment}") == 0
        assert json.loads((tmp_path / f"run{increment}" / "metrics.json").read_text())["task_sizes"] == sizes
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "imagefolder.yaml").read_text())
    assert shipped["data"]["init_cls"] is None


def test_every_file_a_user_names_fails_clearly(tmp_path, capsys):
    (tmp_path / "names.txt").write_bytes(b"\x00\xff\xfe")
    (tmp_path / "weights.npz").write_text("junk")
    (tmp_path / "weights.pth").write_text("junk")
    (tmp_path / "folder.safetensors").mkdir()
    config = write(tmp_path / "config.yaml", tiny_config())
    cases = [(f"data.class_names_file={tmp_path / 'names.txt'}", "cannot read"),
             (f"backbone.weights={tmp_path / 'weights.npz'}", "as a NumPy .npz archive"),
             (f"backbone.weights={tmp_path / 'weights.pth'}", "as a torch checkpoint of tensors"),
             (f"backbone.weights={tmp_path / 'folder.safetensors'}", "a folder, not a file")]
    for setting, words in cases:
        assert train(config, tmp_path / "run", "--set", setting) == 2
        error = capsys.readouterr().err
        assert words in error and "Traceback" not in error, error
        assert not (tmp_path / "run").exists()
