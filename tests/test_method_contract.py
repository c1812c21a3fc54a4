"""The contract every registered method keeps, checked for each name in the method registry (as PEFT's common
tester and timm's list_models() tests do): a new method that misses a piece fails here.

- it has an entry in helpers.TINY_METHODS (tiny options and a setting its options refuse);
- it learns two tasks; its saved state, loaded into a fresh build through the engine's own path, gives
  identical predictions and class probabilities; scores are (batch, seen classes), probabilities sum to 1;
- a setting it refuses ends `carecl train` with exit status 2 naming the key, and nothing on disk;
- it builds with its DEFAULT options on the shipped 4-block demo ViT (CLIP methods: the tiny CLIP).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from carecl.cli.main import main
from carecl.config import config_to_dict
from carecl.engine import Experiment, learn_task
from carecl.engine.checkpointing import grow_and_load, learner_info
from carecl.registry import METHODS

from helpers import DEMO_BACKBONE, GLYPHS, TINY_METHODS, clip_config, tiny_config, tiny_method_config

NAMES = METHODS.names()


def test_every_registered_method_has_tiny_options():
    missing = sorted(set(NAMES) - set(TINY_METHODS))
    assert not missing, f"add these registered methods to helpers.TINY_METHODS: {missing}"
    assert not sorted(set(TINY_METHODS) - set(NAMES)), "TINY_METHODS names a method that is not registered"


def test_images(experiment: Experiment, n: int = 10) -> torch.Tensor:
    images, _ = next(iter(experiment.test_loader(experiment.method.n_seen_classes)))
    return images[:n].to(experiment.device)


test_images.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("name", NAMES)
def test_learns_two_tasks_and_its_saved_state_predicts_identically(name):
    torch.manual_seed(0)
    experiment = Experiment.build(tiny_method_config(name))
    first, second = experiment.scenario.tasks()[:2]
    for task in (first, second):
        learn_task(experiment, task)
    method = experiment.method.eval()
    images = test_images(experiment)
    scores, probabilities = method.predict(images), method.class_probabilities(images)
    assert scores.shape == probabilities.shape == (len(images), second.high)
    assert torch.isfinite(scores).all()
    assert (probabilities >= 0).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(images)), atol=1e-5, rtol=0)

    saved = load_safetensors(save_safetensors({k: v.detach().cpu().contiguous()
                                               for k, v in method.state_tensors().items()}))
    fresh = Experiment.build(tiny_method_config(name))
    grow_and_load(fresh, saved, learner_info(experiment), "the saved state")
    fresh.method.eval()
    assert fresh.method.n_seen_classes == method.n_seen_classes
    assert torch.equal(fresh.method.predict(images), scores), "predictions differ after a save and load"
    assert torch.equal(fresh.method.class_probabilities(images), probabilities)


@pytest.mark.parametrize("name", NAMES)
def test_a_setting_the_method_refuses_exits_2_through_the_cli(name, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_method_config(name))))
    setting = TINY_METHODS[name].invalid
    output = tmp_path / "run"
    assert main(["train", "--config", str(config), "--set", setting, "--output", str(output)]) == 2
    key = setting.split("=")[0].removeprefix("method.").split(".")[-1]
    assert key in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_its_default_options_on_the_demo_vit(name):
    if TINY_METHODS[name].clip:
        config = clip_config({"name": name})
    else:
        config = tiny_config(method={"name": name}, backbone=DEMO_BACKBONE, data=GLYPHS)
    experiment = Experiment.build(config)
    experiment.method.begin_task(experiment.scenario.tasks()[0])
