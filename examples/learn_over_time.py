"""A practitioner's stream with carecl.ContinualLearner: four classes today, two more later, predictions in between.

    python examples/learn_over_time.py [WORK_DIR]

The images are generated (tiny coloured patterns), and the model is carecl's shipped demo ViT, so this runs
offline in under a minute on a laptop CPU. With your own data, give `learn` your folders (`DIR/<class>/...`, or
`DIR/train/<class>/` + `DIR/test/<class>/`) and the config of the method you want (e.g. configs/imagefolder.yaml).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import carecl

CONFIG = {
    "seed": 1993,
    "data": {"image_size": 16},
    "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "weights": "asset:tiny_vit_glyphs.safetensors",
                 "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.003, "device": "cpu", "progress": False},
    "method": {"name": "care", "alignment": {"epochs": 2}},
}


def pattern(name: str, rng: np.random.RandomState) -> Image.Image:
    """A 16-pixel image whose colour and stripe depend on the class name, with noise."""
    key = sum(map(ord, name))
    pixels = rng.randint(0, 60, (16, 16, 3)).astype(np.uint8)
    pixels[:, :, key % 3] += np.uint8(100 + key % 90)
    pixels[key % 16:, :, (key + 1) % 3] += 80
    return Image.fromarray(pixels)


def write_folder(root: Path, classes: list[str], per_class: int, rng: np.random.RandomState) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern(name, rng).save(root / name / f"{i}.png")
    return root


def main(work: Path) -> None:
    rng = np.random.RandomState(0)
    today = write_folder(work / "today", ["apple", "bread", "cheese", "dates"], 12, rng)
    learner = carecl.ContinualLearner.from_config(CONFIG, work / "learner")
    learner.learn(today, test_fraction=0.25)  # one task of four classes, a quarter of each held out for testing
    print(f"learned {len(learner.classes)} classes: {', '.join(learner.classes)}")

    # Later: two new classes arrive as (image, class name) pairs, with a few test images of their own.
    later = [(pattern(name, rng), name) for name in ("figs", "grapes") for _ in range(9)]
    tests = [(pattern(name, rng), name) for name in ("figs", "grapes") for _ in range(3)]
    summary = learner.learn(later, test_data=tests)
    print(f"learned {len(learner.classes)} classes; accuracy after each task: "
          + ", ".join(f"{a:.1f}" for a in summary.top1_curve))

    mixed = [pattern("grapes", rng), pattern("apple", rng)]
    for prediction in learner.predict(mixed, topk=2):
        print(f"predicted {prediction.class_name} ({prediction.probability:.2f})")
    print(f"saved to {learner.save(work / 'saved')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="carecl-example-")))
