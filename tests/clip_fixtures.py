"""Tiny CLIPs (random open_clip weights) and tiny multi-domain image folders for the CLIP tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from carecl.config import config_from_dict

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_BACKBONE = {"family": "open_clip", "name": "custom", "pretrained": False, "model_kwargs": TINY_CLIP}
# Three domains of 3, 2 and 3 classes: colour, stripe direction, texture.
DOMAINS = {"colours": ["red", "green", "blue"], "stripes": ["horizontal", "vertical"], "textures": ["fine", "coarse", "flat"]}


def domain_image(domain: str, class_index: int, rng: np.random.RandomState) -> np.ndarray:
    image = rng.randint(0, 60, (16, 16, 3)).astype(np.uint8)
    if domain == "colours":
        image[..., class_index] += 180
    elif domain == "stripes":
        if class_index == 0:
            image[::4] = 250
        else:
            image[:, ::4] = 250
    elif class_index < 2:
        side = 16 if class_index == 0 else 4
        small = (rng.rand(side, side, 3) * 255).astype(np.uint8)
        image = np.asarray(Image.fromarray(small).resize((16, 16), Image.NEAREST))
    else:
        image[:] = 128
    return image


def write_domains(root: Path, train: int = 8, test: int = 4) -> dict[str, Path]:
    """DOMAINS as image folders root/<domain>/{train,test}/<class>/*.png; their roots by name."""
    rng = np.random.RandomState(0)
    for domain, classes in DOMAINS.items():
        for class_index, name in enumerate(classes):
            for split, count in (("train", train), ("test", test)):
                folder = root / domain / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    Image.fromarray(domain_image(domain, class_index, rng)).save(folder / f"{index}.png")
    return {domain: root / domain for domain in DOMAINS}


def clip_config(method: dict, data: dict | None = None, train: dict | None = None, evaluation: dict | None = None):
    raw = {
        "seed": 0,
        "data": data or {"dataset": "synthetic", "synthetic_classes": 6, "synthetic_train_per_class": 8,
                         "synthetic_test_per_class": 4, "image_size": 16, "init_cls": 2, "increment": 2},
        "backbone": CLIP_BACKBONE,
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.0,
                  "device": "cpu", "progress": False, **(train or {})},
        "eval": {"batch_size": 32, "topk": 2, **(evaluation or {})},
        "method": method,
    }
    return config_from_dict(raw)


def domains_config(roots: dict[str, Path], method: dict, **sections):
    data = {"dataset": "domains", "image_size": 16,
            "domains": [{"name": name, "root": str(root)} for name, root in roots.items()]}
    evaluation = {"protocol": "task_incremental", "unseen_tasks": True, **sections.pop("evaluation", {})}
    return clip_config(method, data=data, evaluation=evaluation, **sections)
