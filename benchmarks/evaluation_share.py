"""How much of a long run is evaluation, with and without incremental evaluation (engine/incremental_eval.py).

    python benchmarks/evaluation_share.py [--tasks 301]

A tiny ViT (2 blocks, width 32, 16 px) and SimpleCIL on generated images written as PNG files (an image
folder, as real benchmarks are read), 2 classes per task (6 training and 3 test images per class), evaluated
after every task as the paper does: once with `eval.incremental: true`
(each test image embedded once; later evaluations score the new classes on stored features) and once with
it off (every evaluation embeds every seen test image and scores every class). Both runs must give the same
accuracies. Writes benchmarks/results/evaluation_share.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from carecl.config import config_from_dict  # noqa: E402
from carecl.engine import run_experiment  # noqa: E402


def write_images(root: Path, classes: int) -> Path:
    """class folders of random 16 px PNGs, each class a colour of its own plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in range(classes):
        colour = rng.randint(0, 255, 3)
        for split, count in (("train", 6), ("test", 3)):
            folder = root / split / f"class{c:04d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colour + rng.randint(-120, 120, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def config(tasks: int, incremental: bool, images: Path):
    return config_from_dict({
        "seed": 0,
        "data": {"dataset": "imagefolder", "root": str(images), "image_size": 16, "init_cls": 2, "increment": 2,
                 "num_workers": 0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False,
                     "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "train": {"device": "cpu", "progress": False, "threads": 1},
        "eval": {"batch_size": 256, "incremental": incremental},
        "method": {"name": "simplecil"},
    })


def measure(tasks: int, incremental: bool, images: Path, folder: Path) -> dict:
    started = time.perf_counter()
    run_experiment(config(tasks, incremental, images), folder)
    wall = time.perf_counter() - started
    metrics = json.loads((folder / "metrics.json").read_text())
    evaluation = sum(cost.get("evaluation_seconds", 0.0) for cost in metrics["costs"])
    return {"wall_s": round(wall, 2), "evaluation_s": round(evaluation, 2), "evaluation_share": round(evaluation / wall, 3),
            "last_evaluation_s": round(metrics["costs"][-1]["evaluation_seconds"], 3),
            "a_last": metrics["summary"]["a_last"], "top1_curve": metrics["summary"]["top1_curve"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=301)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        images = write_images(Path(scratch) / "images", 2 * args.tasks)
        full = measure(args.tasks, False, images, Path(scratch) / "full")
        incremental = measure(args.tasks, True, images, Path(scratch) / "incremental")
    same = full.pop("top1_curve") == incremental.pop("top1_curve")
    document = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "torch": torch.__version__, "threads": 1},
                "run": f"SimpleCIL, tiny ViT, {args.tasks} tasks of 2 classes, evaluated after every task",
                "full": full, "incremental": incremental, "same_accuracies": same}
    (ROOT / "benchmarks" / "results" / "evaluation_share.json").write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
