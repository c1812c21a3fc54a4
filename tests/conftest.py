"""Shared fixtures: tiny configs that run in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from carecl.config import config_from_dict

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_config(method: dict | None = None, **sections) -> "ExperimentConfig":  # noqa: F821
    data = {"dataset": "synthetic", "synthetic_classes": 6, "synthetic_train_per_class": 12,
            "synthetic_test_per_class": 6, "image_size": 16, "init_cls": 2, "increment": 2}
    data.update(sections.pop("data", {}))
    train = {"epochs": 1, "batch_size": 16, "lr": 0.05, "device": "cpu", "progress": False}
    train.update(sections.pop("train", {}))
    raw = {
        "seed": 1993,
        "data": data,
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": dict(TINY_VIT)},
        "train": train,
        "eval": {"batch_size": 64, "topk": 2},
        "method": method or {"name": "simplecil"},
        **sections,
    }
    return config_from_dict(raw)


@pytest.fixture(autouse=True)
def single_thread():
    """Every test: tiny tensors, where intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config():
    return tiny_config
