"""Classify new images with a trained run: `carecl predict` and `Learner.predict`.

    learner = Learner.load("runs/demo")
    for prediction in learner.predict(["a.png", "b.png"], topk=3):
        print(prediction.source, prediction.best.name, prediction.best.probability)

Images (paths, PIL images) are converted to RGB and passed through the run's test transform;
tensors are taken as already transformed model inputs. Probabilities are over every class seen
by the run (see `class_probabilities`); class ids and names are the dataset's (ImageFolder
folder names, digits' "0".."9"), not positions in the class order. The dataset itself is not
needed: the run records its class names (classes.json) and the test transform follows from the
config (see `Learner.load`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from carecl.errors import CareclError
from carecl.registry import Registry

if TYPE_CHECKING:
    from carecl.data.base import Transform
    from carecl.engine.experiment import Learner
    from carecl.methods.base import Method

# carecl.data and carecl.engine.experiment are imported where used: they import timm, slow to load, and
# `carecl --help` needs none of it.

ImageInput = str | os.PathLike | Image.Image | Tensor
# Errors that make one input unusable without stopping the others.
UNREADABLE_IMAGE_ERRORS = (CareclError, OSError, ValueError, Image.DecompressionBombError)


class PredictionError(CareclError, ValueError):
    """Prediction cannot run (bad arguments, no readable image, inputs of mismatched shapes)."""


@dataclass(frozen=True)
class ClassProbability:
    class_id: int  # the dataset's class id: index into its class names
    name: str
    probability: float


@dataclass
class ImagePrediction:
    """The top-k classes of one input, most probable first; `error` (and no classes) when unreadable."""

    source: str
    classes: list[ClassProbability] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def best(self) -> ClassProbability | None:
        return self.classes[0] if self.classes else None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.source, "error": self.error}
        return {"image": self.source, "top": [dataclasses.asdict(c) for c in self.classes]}


# --------------------------------------------------------------------------- probabilities

# Method name -> fn(method, images) -> (B, n_seen_classes) probabilities; others get softmax(predict).
PROBABILITIES: Registry[Callable[[Method, Tensor], Tensor]] = Registry("probability rule")


@PROBABILITIES.register("care")
def care_probabilities(method: Method, images: Tensor) -> Tensor:
    """softmax(τ · cosine logits) in the single pass; the iterative prediction's sum of two softmaxes, halved."""
    options = method.options
    if method.uses_iterative_prediction():
        return method.iterative_scores(images) / 2
    return (options.scale * method.logits(images)).float().softmax(dim=1)


@torch.no_grad()
def class_probabilities(method: Method, images: Tensor) -> Tensor:
    """(B, n_seen_classes) probabilities over the classes in class-order positions, rows summing to 1.

    Methods without a registered rule get softmax of their scores: for cosine-similarity methods
    (SimpleCIL) that is nearly flat; the ranking is meaningful, the values are not calibrated.
    """
    name = getattr(method.options, "name", "")
    rule = PROBABILITIES.get(name) if name in PROBABILITIES else None
    scores = rule(method, images) if rule is not None else method.predict(images).float().softmax(dim=1)
    return scores.float()


# --------------------------------------------------------------------------- inputs


def model_input(image: Image.Image, transform: Transform, image_size: int) -> Tensor:
    """An RGB image through the run's test transform, as a (3, H, W) float tensor."""
    from torchvision.transforms.functional import to_tensor

    output = transform(image.convert("RGB"))
    if isinstance(output, Image.Image):
        # In-memory datasets (digits, synthetic) store final tensors and transform nothing: make one.
        output = to_tensor(output.resize((image_size, image_size), Image.BILINEAR))
    return output.to(torch.float32)


def as_input_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One path / PIL image / (3, H, W) tensor, a (B, 3, H, W) tensor, or a sequence of those -> a list."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise PredictionError(f"an image tensor must be (3, H, W) or (B, 3, H, W), got shape {tuple(images.shape)}")
    return list(images)


def _describe(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"<{'tensor' if isinstance(item, Tensor) else 'image'} {index}>"


def _load(item: ImageInput, transform: Transform, image_size: int) -> Tensor:
    from carecl.data import load_rgb_image

    if isinstance(item, Tensor):
        return item.to(torch.float32)
    if isinstance(item, Image.Image):
        return model_input(item, transform, image_size)
    if isinstance(item, (str, os.PathLike)):
        return model_input(load_rgb_image(os.fspath(item)), transform, image_size)
    raise PredictionError(f"cannot predict a {type(item).__name__}: give paths, PIL images or image tensors")


# --------------------------------------------------------------------------- prediction


def iter_predictions(learner: Learner, images: ImageInput | Sequence[ImageInput], topk: int = 5,
                     batch_size: int | None = None) -> Iterator[ImagePrediction]:
    """Predictions in input order, computed `batch_size` inputs at a time (default: eval.batch_size)."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise PredictionError(f"topk must be a positive integer, got {topk!r}")
    batch_size = batch_size if batch_size is not None else learner.config.eval.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictionError(f"batch size must be a positive integer, got {batch_size!r}")
    method = learner.method
    if method.n_learned_tasks == 0:
        raise PredictionError("the learner has learned no task yet: nothing to predict with")
    items = as_input_list(images)
    was_training = method.training
    method.eval()
    try:
        for start in range(0, len(items), batch_size):
            yield from _predict_batch(learner, items[start : start + batch_size], start, topk)
    finally:
        method.train(was_training)


def predict_images(learner: Learner, images: ImageInput | Sequence[ImageInput], topk: int = 5,
                   batch_size: int | None = None) -> list[ImagePrediction]:
    """`iter_predictions` as a list: one ImagePrediction per input (unreadable ones carry `error`)."""
    return list(iter_predictions(learner, images, topk, batch_size))


def _predict_batch(learner: Learner, items: list[ImageInput], start: int, topk: int) -> list[ImagePrediction]:
    from carecl.engine.experiment import input_size

    names, order = learner.class_names, learner.scenario.order
    transform, image_size = learner.test_transform, input_size(learner.config)
    predictions, inputs = [], []
    for index, item in enumerate(items, start):
        prediction = ImagePrediction(_describe(item, index))
        try:
            inputs.append(_load(item, transform, image_size))
        except PredictionError:
            raise
        except UNREADABLE_IMAGE_ERRORS as error:
            prediction.error = str(error)
        predictions.append(prediction)
    if not inputs:
        return predictions
    shapes = sorted({tuple(t.shape) for t in inputs})
    if len(shapes) > 1:
        raise PredictionError(f"image tensors of different shapes cannot share a batch: {shapes}")
    probabilities = class_probabilities(learner.method, torch.stack(inputs).to(learner.device)).cpu()
    values, positions = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
    readable = iter(zip(values.tolist(), positions.tolist()))
    for prediction in predictions:
        if prediction.ok:
            row_values, row_positions = next(readable)
            prediction.classes = [ClassProbability(int(order[p]), names[int(order[p])], float(v))
                                  for v, p in zip(row_values, row_positions)]
    return predictions


# --------------------------------------------------------------------------- command line


def expand_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Paths as given, directories replaced by their image files (recursively, sorted); plus problems."""
    from carecl.data.imagefolder import is_image_file

    files: list[Path] = []
    problems: list[str] = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)  # a missing or unreadable file becomes that image's error record
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            problems.append(f"no image files in directory {path}")
        files.extend(found)
    return files, problems


def format_table_rows(prediction: ImagePrediction, width: int) -> list[str]:
    """Table lines of one prediction: one per rank, the image named on the first."""
    return [f"{prediction.source if rank == 1 else '':<{width}}  {rank:>4}  {c.name:<20}  {c.probability:>11.4f}"
            for rank, c in enumerate(prediction.classes, 1)]


def add_command(subparsers: Any) -> None:
    """Register `carecl predict --run RUN_DIR IMAGE_OR_DIR ...`."""
    parser = subparsers.add_parser(
        "predict", help="top-k classes of image files with a trained run",
        description="Classify images with a finished run: each image is converted to RGB, passed through the "
                    "run's test transform, and its top-k classes are printed with probabilities. Directories "
                    "are searched recursively for image files. Unreadable images are reported on stderr (and "
                    "as error records in jsonl output) without stopping the others.")
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="run directory written by carecl train/demo")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--format", choices=("table", "jsonl"), default="table", help="table (default) or one JSON object per line")
    parser.add_argument("--batch-size", type=int, help="images per forward (default: the run's eval.batch_size)")
    parser.add_argument("--data-root", type=Path, metavar="DIR",
                        help="the dataset's folder, if it moved since training (only runs without classes.json need it)")
    parser.set_defaults(handler=command_predict)


def command_predict(args: argparse.Namespace) -> int:
    files, problems = expand_inputs(args.inputs)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not files:
        raise PredictionError(f"no image files to classify in {', '.join(args.inputs)}")
    from carecl.engine.experiment import Learner

    learner = Learner.load(args.run, data_root=args.data_root)
    width = max(len("image"), *(len(str(f)) for f in files))
    if args.format == "table":
        print(f"{'image':<{width}}  {'rank':>4}  {'class':<20}  {'probability':>11}")
    n_classified = 0
    for prediction in iter_predictions(learner, files, args.topk, args.batch_size):
        if not prediction.ok:
            print(f"error: {prediction.error}", file=sys.stderr)
        n_classified += prediction.ok
        if args.format == "jsonl":
            print(json.dumps(prediction.to_dict()), flush=True)
        elif prediction.ok:
            print("\n".join(format_table_rows(prediction, width)), flush=True)
    if n_classified == 0:
        raise PredictionError(f"none of the {len(files)} images could be classified (errors above)")
    return 0
