"""train.precision covers every forward: training steps, class statistics, evaluation and prediction run under
autocast; classifier alignment trains in fp32; fp32 (the default) autocasts nothing."""

from __future__ import annotations

import pytest
import torch

from carecl.engine import run_experiment
from carecl.methods import base
from carecl.methods.care import CaRE
from carecl.predict import Predictor

from helpers import tiny_config

CARE = {"name": "care", "brmoe": {"adapter_dim": 4, "expert_dim": 4}, "alignment": {"epochs": 1, "samples_per_class": 4}}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_one_precision_setting_covers_every_forward(precision, tmp_path, monkeypatch):
    seen: dict[str, set] = {}

    def record(name, original):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(CaRE, "training_loss", record("training", CaRE.training_loss))
    monkeypatch.setattr(CaRE, "update_statistics", record("statistics", CaRE.update_statistics))
    monkeypatch.setattr(CaRE, "predict", record("evaluation", CaRE.predict))
    monkeypatch.setattr(base, "align_classifier", record("alignment", base.align_classifier))
    config = tiny_config(method=CARE, data={"synthetic_classes": 4}, train={"precision": precision})
    run_experiment(config, tmp_path / "run")
    monkeypatch.setattr(CaRE, "class_probabilities", record("prediction", CaRE.class_probabilities))
    Predictor.load(tmp_path / "run").predict(torch.rand(2, 3, 16, 16))
    low = precision != "fp32"
    assert seen["training"] == seen["statistics"] == seen["evaluation"] == seen["prediction"] == {low}
    assert seen["alignment"] == {False}
