"""Classify new images with a trained run: `Predictor` (and `carecl predict`, in cli/predict.py).

    predictor = Predictor.load("runs/demo")
    for prediction in predictor.predict(["a.png", "b.png"], topk=3):
        print(prediction.source, prediction.best.name, prediction.best.probability)

Images (paths, PIL images) are converted to RGB and passed through the run's test transform;
tensors are taken as already transformed model inputs. Probabilities are over every class seen
by the run (see `class_probabilities`); class ids and names are the dataset's (ImageFolder
folder names, digits' "0".."9"), not positions in the class order. The dataset itself is not
needed: the run records its class names (classes.json) and the test transform follows from the
config (see `Predictor.load`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from carecl.errors import CareclError

if TYPE_CHECKING:
    from carecl.data.base import Transform
    from carecl.engine.experiment import Experiment

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


# --------------------------------------------------------------------------- the trained model


class Predictor:
    """A finished run, ready to classify images: `Predictor.load(run_dir).predict(images)`.

    `experiment` is the rebuilt Experiment (its `method` is the trained learner, in eval mode).
    """

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        experiment.method.eval()

    @classmethod
    def load(cls, run_dir: str | Path, data_root: str | Path | None = None) -> "Predictor":
        """The run as after its last finished task: with its dataset when that can be built (`data_root`
        replaces data.root) and has the recorded classes, else from the run's classes.json alone."""
        from carecl.engine.checkpointing import load_experiment
        from carecl.runs.directory import RunDirectory

        overrides = [f"data.root={data_root}"] if data_root is not None else []
        return cls(load_experiment(RunDirectory.open(run_dir), need_data=False, data_overrides=overrides))

    @property
    def method(self):
        """The trained learner (a carecl.methods.base.Method)."""
        return self.experiment.method

    @property
    def scenario(self):
        """Class order and task split the run was trained with."""
        return self.experiment.scenario

    @property
    def config(self):
        return self.experiment.config

    @property
    def data(self):
        """The run's dataset, or None when the prediction works from classes.json alone."""
        return self.experiment.data

    @property
    def class_names(self) -> list[str]:
        """Names by original class id (the dataset's, or those the run recorded)."""
        return self.experiment.class_names

    @property
    def test_transform(self):
        """What an image file goes through before the model (the run's test transform)."""
        return self.experiment.test_transform

    def predict(self, images: ImageInput | Sequence[ImageInput], topk: int = 5,
                batch_size: int | None = None) -> list[ImagePrediction]:
        """Top-k classes of paths / PIL images / image tensors: one ImagePrediction per input."""
        return predict_images(self.experiment, images, topk, batch_size)

    def class_probabilities(self, inputs: Tensor) -> Tensor:
        """(B, n_seen_classes) probabilities of model inputs, columns in class-order positions."""
        return class_probabilities(self.experiment.method, inputs.to(self.experiment.device)).cpu()


@torch.no_grad()
def class_probabilities(method, images: Tensor) -> Tensor:
    """The method's (B, n_seen_classes) probabilities over class-order positions, rows summing to 1."""
    return method.class_probabilities(images).float()


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


def iter_predictions(experiment: Experiment, images: ImageInput | Sequence[ImageInput], topk: int = 5,
                     batch_size: int | None = None) -> Iterator[ImagePrediction]:
    """Predictions in input order, computed `batch_size` inputs at a time (default: eval.batch_size)."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise PredictionError(f"topk must be a positive integer, got {topk!r}")
    batch_size = batch_size if batch_size is not None else experiment.config.eval.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictionError(f"batch size must be a positive integer, got {batch_size!r}")
    method = experiment.method
    if method.n_learned_tasks == 0:
        raise PredictionError("the learner has learned no task yet: nothing to predict with")
    items = as_input_list(images)
    was_training = method.training
    method.eval()
    try:
        for start in range(0, len(items), batch_size):
            yield from _predict_batch(experiment, items[start : start + batch_size], start, topk)
    finally:
        method.train(was_training)


def predict_images(experiment: Experiment, images: ImageInput | Sequence[ImageInput], topk: int = 5,
                   batch_size: int | None = None) -> list[ImagePrediction]:
    """`iter_predictions` as a list: one ImagePrediction per input (unreadable ones carry `error`)."""
    return list(iter_predictions(experiment, images, topk, batch_size))


def _predict_batch(experiment: Experiment, items: list[ImageInput], start: int, topk: int) -> list[ImagePrediction]:
    from carecl.preprocessing import input_size

    names, order = experiment.class_names, experiment.scenario.order
    transform, image_size = experiment.test_transform, input_size(experiment.config)
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
    from carecl.engine.precision import forward_precision

    with forward_precision(experiment.config.train.precision, experiment.device):
        probabilities = class_probabilities(experiment.method, torch.stack(inputs).to(experiment.device)).cpu()
    values, positions = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
    readable = iter(zip(values.tolist(), positions.tolist()))
    for prediction in predictions:
        if prediction.ok:
            row_values, row_positions = next(readable)
            prediction.classes = [ClassProbability(int(order[p]), names[int(order[p])], float(v))
                                  for v, p in zip(row_values, row_positions)]
    return predictions
