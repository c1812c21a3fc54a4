"""`carecl.ContinualLearner`: a continual learner for a stream that arrives over time, kept in a run directory.

    learner = carecl.ContinualLearner.from_config("configs/imagefolder.yaml", "runs/shop")   # nothing learned yet
    learner.learn("photos/week1")                       # a folder of class folders (or train/ + test/)
    learner.learn([(image, "mug"), ...], test_data=...)  # or (image, class name) pairs, or a torch Dataset
    learner.predict(["a.jpg"])                          # -> [Prediction(class_name, probability, ...)]
    learner.evaluate("photos/check")                    # accuracy on labelled images of classes it knows
    learner.save("runs/shop-copy")                      # an ordinary run directory: carecl eval/predict/report read it
    learner = carecl.ContinualLearner.load("runs/shop")

The first `learn` makes the run's stream (its config's method, backbone and training settings; the data given);
each later one is `carecl learn`: the new classes are learned as the stream's next task(s), with the same checks
and errors. Images given as pairs or a dataset are written as PNG files into the run directory (`data/`), so the
run stays complete when it is copied or moved.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from carecl.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict

DATA_DIR = "data"


@dataclass(frozen=True)
class Prediction:
    """One image's most probable class and its probability, with the top-k (name, probability) pairs."""

    class_name: str
    probability: float
    top: tuple[tuple[str, float], ...]


class ContinualLearner:
    def __init__(self, run_dir: str | Path, pending_config: ExperimentConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        # The config of a learner that has not learned anything yet (its run directory is made by the first learn).
        self._pending = pending_config
        self._predictor = None

    # ---- making and opening --------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | Path | dict | ExperimentConfig, run_dir: str | Path | None = None,
                    overrides: Sequence[str] = ()) -> "ContinualLearner":
        """A learner with `config`'s method, backbone and training settings, to keep in `run_dir` (a new folder; by
        default a temporary one, kept until `save`). Its data section is replaced by what `learn` is given."""
        from carecl.compat.release_json import load_experiment_file
        from carecl.runs.directory import RunDirectory

        if isinstance(config, (str, Path)):
            config = load_experiment_file(config, overrides)[0]
        elif isinstance(config, dict):
            config = config_from_dict(apply_overrides(config, list(overrides)))
        elif overrides:
            config = config_from_dict(apply_overrides(config_to_dict(config), list(overrides)))
        if isinstance(config.seed, list):
            raise ConfigError(f"seed is a list {config.seed}: a learner has one seed")
        run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="carecl-learner-")) / "run"
        RunDirectory.check_available(run_dir)
        return cls(run_dir, config)

    @classmethod
    def load(cls, run_dir: str | Path) -> "ContinualLearner":
        """The learner of a run directory (made by a learner, `carecl train` or `carecl learn`)."""
        from carecl.runs.directory import RunDirectory

        RunDirectory.open(run_dir)
        return cls(run_dir)

    @property
    def classes(self) -> list[str]:
        """The names of the classes learned so far, in the order they were learned."""
        if self._pending is not None:
            return []
        predictor = self.predictor()
        order = predictor.scenario.order[: predictor.method.n_seen_classes]
        return [predictor.class_names[int(i)] for i in order]

    # ---- learning ------------------------------------------------------------------------
    def learn(self, train_data: Any, test_data: Any = None, increment: int | None = None,
              test_fraction: float | None = None):
        """Learn the classes of `train_data` (a folder; (image, class name) pairs; a torch Dataset whose targets are
        class ids of its `classes`, or names) as one new task, or tasks of `increment` classes. `test_data` (the same
        kinds) are their test images; `test_fraction` holds out part of a folder `DIR/<class>/` instead. Returns
        the run's summary (accuracy after each task, A_last, forgetting), as `carecl train` prints it."""
        from carecl.engine.learn import learn
        from carecl.engine.run import run_experiment

        folder = self._folder(train_data, test_data)
        self._predictor = None
        if self._pending is None:
            return learn(self.run_dir, folder, increment, test_fraction)
        config = self._first_stream(folder, increment, test_fraction)
        summary = run_experiment(config, self.run_dir)
        self._pending = None
        return summary

    def _first_stream(self, folder: Path, increment: int | None, test_fraction: float | None) -> ExperimentConfig:
        from carecl.data.additions import scan_addition

        names = scan_addition(self._resolved(folder), test_fraction).class_names
        step = increment or len(names)
        document = config_to_dict(self._pending)
        document["data"] = {**document["data"], "dataset": "imagefolder", "root": str(folder), "init_cls": step,
                            "increment": step, "shuffle": False, "class_order": None, "test_fraction": test_fraction,
                            "additions": None, "domains": None, "dataset_order": None}
        return config_from_dict(document)

    def _resolved(self, folder: Path | str) -> Path:
        text = str(folder)
        return self.run_dir / text[len("run:"):] if text.startswith("run:") else Path(text)

    def _folder(self, train_data: Any, test_data: Any) -> Path | str:
        """A folder the run can read: the user's own (as is), or one written into the run directory."""
        if isinstance(train_data, (str, Path)) and test_data is None:
            return Path(train_data).expanduser().resolve()
        target = self._next_data_folder()
        link_or_write(train_data, target / "train")
        if test_data is not None:
            link_or_write(test_data, target / "test")
        return f"run:{target.relative_to(self.run_dir).as_posix()}"

    def _next_data_folder(self) -> Path:
        base = self.run_dir / DATA_DIR
        index = 0
        while (base / f"{index:03d}").exists():
            index += 1
        return base / f"{index:03d}"

    # ---- using ---------------------------------------------------------------------------
    def predictor(self):
        from carecl.predict import Predictor

        if self._pending is not None:
            raise ConfigError("this learner has not learned anything yet: call learn() first")
        if self._predictor is None:
            self._predictor = Predictor.load(self.run_dir)
        return self._predictor

    def predict(self, images: Any, topk: int = 3) -> list[Prediction]:
        """The most probable class of each image (files, PIL images or a (B, 3, H, W) tensor), with the top `topk`."""
        results = []
        for prediction in self.predictor().predict(images, topk=topk):
            if prediction.error:
                raise ConfigError(f"cannot classify {prediction.source}: {prediction.error}")
            top = tuple((c.name, c.probability) for c in prediction.classes)
            results.append(Prediction(top[0][0], top[0][1], top))
        return results

    def evaluate(self, data: Any) -> dict[str, Any]:
        """Top-1 accuracy on labelled images (a folder of class folders, pairs or a dataset) of known classes."""
        images, names = labelled_images(data)
        known = set(self.classes)
        unknown = sorted(set(names) - known)
        if unknown:
            raise ConfigError(f"the learner has not learned class(es) {unknown}; it knows {sorted(known)}")
        predicted = [p.class_name for p in self.predict(images, topk=1)]
        correct = [p == n for p, n in zip(predicted, names)]
        per_class = {name: 100.0 * sum(c for c, n in zip(correct, names) if n == name) / names.count(name)
                     for name in sorted(set(names))}
        return {"top1": 100.0 * sum(correct) / max(len(correct), 1), "n_images": len(correct), "per_class": per_class}

    def save(self, run_dir: str | Path) -> Path:
        """Copy the learner's run directory to `run_dir` (a new folder) and keep working there."""
        target = Path(run_dir)
        if self._pending is not None:
            raise ConfigError("this learner has not learned anything yet: there is nothing to save")
        if target.resolve() != self.run_dir.resolve():
            if target.exists():
                raise ConfigError(f"{target} exists: save() writes a new run directory")
            shutil.copytree(self.run_dir, target, ignore=shutil.ignore_patterns("*.lock"))
            self.run_dir, self._predictor = target, None
        return target


def labelled_images(data: Any) -> tuple[list, list[str]]:
    """(images, class names) from a folder of class folders, (image, name) pairs, or a dataset."""
    if isinstance(data, (str, Path)):
        from carecl.data.additions import class_images

        by_class = class_images(Path(data).expanduser())
        pairs = [(path, name) for name, paths in by_class.items() for path in paths]
    else:
        pairs = list(pairs_of(data))
    return [image for image, _ in pairs], [name for _, name in pairs]


def pairs_of(data: Any) -> Iterable[tuple[Any, str]]:
    """(image, class name) pairs of a list of pairs or of a torch Dataset (targets named by its `classes`)."""
    names = getattr(data, "classes", None)
    for item in data:
        image, target = item[0], item[1]
        if isinstance(target, str):
            yield image, target
        elif names is not None:
            yield image, str(names[int(target)])
        else:
            yield image, str(int(target))


def link_or_write(data: Any, folder: Path) -> None:
    """`folder` made from `data`: a link to a folder of class folders, or PNG files per class from pairs/a dataset."""
    if isinstance(data, (str, Path)):
        source = Path(data).expanduser().resolve()
        if not source.is_dir():
            raise ConfigError(f"{source} is not a folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(source, target_is_directory=True)
        return
    counts: dict[str, int] = {}
    for image, name in pairs_of(data):
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"class name {name!r} cannot name a folder")
        index = counts.get(name, 0)
        counts[name] = index + 1
        (folder / name).mkdir(parents=True, exist_ok=True)
        as_pil(image).save(folder / name / f"{index:06d}.png")
    if not counts:
        raise ConfigError("no images were given")


def as_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        from carecl.data.base import load_rgb_image

        return load_rgb_image(str(image))
    import numpy as np
    import torch

    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image.detach().cpu().clamp(0, 1))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ConfigError(f"an image array must be uint8 (H, W[, 3]), got {array.dtype}")
    return Image.fromarray(array).convert("RGB")
