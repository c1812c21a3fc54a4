"""Typed experiment configuration: dataclasses, YAML load/save, `key=value` overrides.

Every section is a dataclass; unknown keys are rejected with the closest valid key, values are
checked against the field's type (closed choices are `Literal`s), and every range and cross-field
rule lives in a section's `validate()`. Errors name the full dotted key, and the file or `--set`
the value came from. This module imports nothing of carecl but `errors` and `registry`; a
method's options class is found by name through `registry.METHODS`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from carecl.errors import CareclError
from carecl.registry import METHODS, TRANSFORMS


class ConfigError(CareclError, ValueError):
    """A configuration file, key or value is invalid; the message names the key (and file)."""


class FieldError(ConfigError):
    """A section's `validate()` found field `field` invalid; the builder prefixes the dotted path."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name} {message}")
        self.field, self.detail = field_name, message


def require(condition: bool, field_name: str, message: str) -> None:
    """In a `validate()`: raise a FieldError for `field_name` unless `condition` holds."""
    if not condition:
        raise FieldError(field_name, message)


@dataclass
class DomainConfig:
    """One member of a multi-domain stream (`data.dataset: domains`): an image folder learned as one task."""

    name: str = ""
    # DIR/train/<class>/ and DIR/test/<class>/, or DIR/<class>/ with test_fraction.
    root: str = ""
    test_fraction: float | None = None
    # Prompt templates for this domain's class names ("a photo of a {}, a type of aircraft."); null: the method's.
    templates: list[str] | None = None

    def validate(self) -> None:
        require(bool(self.name), "name", "must be set (it names the domain in reports)")
        require(bool(self.root), "root", "must be set (the domain's image folder)")
        require(self.test_fraction is None or 0.0 < self.test_fraction < 1.0, "test_fraction",
                f"must be in (0, 1), got {self.test_fraction}")
        for template in self.templates or []:
            require("{}" in template, "templates", f"each needs a {{}} for the class name, got {template!r}")


@dataclass
class AdditionConfig:
    """Classes learned after the stream (`carecl learn`, `ContinualLearner.learn`): an image folder whose classes
    follow the stream's, learned as one task or in tasks of `increment` classes."""

    # DIR/train/<class>/ (and optionally DIR/test/<class>/), or DIR/<class>/ (with test_fraction, or no test images).
    root: str = ""
    test_fraction: float | None = None
    # Classes per task; null: the folder's classes in one task.
    increment: int | None = None
    # The folder's classes in the order they are learned (their ids follow the stream's); null: sorted folder names.
    classes: list[str] | None = None
    # The --set changes made when these classes were learned (they apply from then on; recorded for the record).
    changes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(bool(self.root), "root", "must be set (the folder of the new classes)")
        require(self.test_fraction is None or 0.0 < self.test_fraction < 1.0, "test_fraction",
                f"must be in (0, 1), got {self.test_fraction}")
        require(self.increment is None or self.increment > 0, "increment", f"must be positive, got {self.increment}")
        if self.classes is not None:
            require(len(set(self.classes)) == len(self.classes), "classes", "names a class twice")


@dataclass
class DataConfig:
    dataset: str = "digits"
    # Folder holding <dataset folder>/train and /test (ImageFolder), or the CIFAR archive;
    # for `imagefolder`: DIR/train/<class>/ and DIR/test/<class>/, or DIR/<class>/ with test_fraction.
    root: str | None = None
    # imagefolder with one folder of classes: the fraction of each class's images held out for
    # testing (a fixed, seed-independent split of the sorted file list).
    test_fraction: float | None = None
    # Of each class's training images, the fraction held out as a validation split (seeded by `seed`; never taken
    # from the test images): validation accuracy is recorded beside test accuracy, and carecl tune scores on it.
    validation_fraction: float | None = None
    # Classes of the first task; null: data.increment's (all of a smaller dataset's classes).
    init_cls: int | None = 2
    increment: int = 2
    shuffle: bool = True
    # Explicit class order (original class ids); overrides `shuffle`.
    class_order: list[int] | None = None
    # five_datasets: the members' order (svhn, mnist, cifar10, notmnist, fashion_mnist); null = that order;
    # mtil: its members' order (order I: aircraft, caltech101, ..., sun397; see docs/datasets.md).
    dataset_order: list[str] | None = None
    # dataset `domains`: the members, each an image folder learned as one task in its own label space.
    domains: list[DomainConfig] | None = None
    # Image folders whose classes were learned after the stream, in the order they were (carecl learn writes them).
    additions: list[AdditionConfig] | None = None
    # Display names of the classes (text classifiers read them): a text file with one name per line in class-id
    # order, or a YAML/JSON mapping from folder name to name; null: the dataset's own (folder names).
    class_names_file: str | None = None
    # Input side in pixels; null = the dataset's default: 224 for the published benchmarks, the
    # backbone's pretrained input size for imagefolder, 32 for in-memory sets (digits, synthetic, glyphs).
    image_size: int | None = None
    # Normalisation; null = the dataset's default (the release's for the published benchmarks, the
    # backbone's pretrained mean/std for imagefolder). Set both, e.g. [0.485, 0.456, 0.406].
    mean: list[float] | None = None
    std: list[float] | None = None
    # Resize interpolation and centre-crop fraction at test time; null = the dataset's default
    # (imagefolder: the backbone's pretrained config).
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None
    crop_pct: float | None = None
    # Training augmentation; null = the dataset's default (crop_flip). none = train on test transforms.
    augment: Literal["crop_flip", "crop", "flip", "none"] | None = None
    # Transform recipe (a name in data/transforms.py's registry); null = the dataset's own (the CaRE release's for
    # published benchmarks). A method's published settings may name another: APER trains with pilot_wide_crop.
    transforms: str | None = None
    synthetic_classes: int = 10
    synthetic_train_per_class: int = 30
    synthetic_test_per_class: int = 10
    # DataLoader worker processes per training process; null = auto: 0 for in-memory datasets,
    # min(8, CPUs per process) for image files.
    num_workers: int | None = None
    # Page-locked batches for faster host-to-GPU copies; null = auto (on when training on CUDA).
    pin_memory: bool | None = None
    # Keep workers alive between the epochs of a task (loaders are rebuilt for every task).
    persistent_workers: bool = True
    # Unreadable image files: false = skip and count them (metrics.json), true = stop naming the file.
    strict: bool = False

    def first_task_size(self, n_classes: int) -> int:
        """init_cls, or (null) the increment, capped at the dataset's class count."""
        return self.init_cls if self.init_cls is not None else min(self.increment, n_classes)

    def validate(self) -> None:
        require(self.init_cls is None or self.init_cls > 0, "init_cls", f"must be positive or null, got {self.init_cls}")
        require(self.increment > 0, "increment", f"must be positive, got {self.increment}")
        require(self.image_size is None or self.image_size > 0, "image_size", f"must be positive, got {self.image_size}")
        require((self.mean is None) == (self.std is None), "mean", "and data.std must be set together (or both null)")
        if self.mean is not None:
            require(len(self.mean) == len(self.std) and len(self.mean) in (1, 3), "mean",
                    f"and data.std need 1 or 3 values each, got {self.mean} and {self.std}")
            require(all(value > 0 for value in self.std), "std", f"values must be positive, got {self.std}")
        require(self.crop_pct is None or 0.0 < self.crop_pct <= 1.0, "crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        require(self.test_fraction is None or 0.0 < self.test_fraction < 1.0, "test_fraction",
                f"must be in (0, 1), got {self.test_fraction}")
        require(self.validation_fraction is None or 0.0 < self.validation_fraction < 1.0, "validation_fraction",
                f"must be in (0, 1), got {self.validation_fraction}")
        for key in ("synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.num_workers is None or self.num_workers >= 0, "num_workers",
                f"must be >= 0 (or null for auto), got {self.num_workers}")
        if self.class_order is not None:
            require(len(set(self.class_order)) == len(self.class_order), "class_order", "contains repeated class ids")
        require(self.transforms is None or self.transforms in TRANSFORMS, "transforms",
                f"must be one of {', '.join(map(repr, TRANSFORMS.names()))} (or null), got {self.transforms!r}")
        if self.domains is not None:
            names = [domain.name for domain in self.domains]
            require(len(set(names)) == len(names), "domains", f"names must differ, got {names}")


@dataclass
class BackboneConfig:
    # timm: any timm ViT name (the release's legacy `vit_base_patch16_224_in21k` is accepted);
    # open_clip: an open_clip model name (ViT-B-16-quickgelu is OpenAI's ViT-B/16), or `custom` with the
    # architecture in model_kwargs (embed_dim, vision_cfg, text_cfg); needs `pip install "carecl[clip]"`.
    name: str = "vit_base_patch16_224.augreg_in21k"
    family: Literal["timm", "open_clip"] = "timm"
    pretrained: bool = True
    # open_clip: the pretrained tag downloaded when pretrained is true and no weights file is given.
    tag: str = "openai"
    # Local weights file (.safetensors, .pth/.pt/.bin, .npz; open_clip: also OpenAI's JIT archive such as
    # ViT-B-16.pt), or asset:NAME for one shipped with carecl; overrides the hub download.
    weights: str | None = None
    # Extra constructor arguments (timm: depth, embed_dim, img_size, ...; open_clip: create_model's keywords,
    # or the whole architecture for `custom`).
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# backbone.weights naming a file shipped inside the carecl package (carecl/assets/NAME).
ASSET_PREFIX = "asset:"
# torch device strings train.device accepts (availability is checked when the run starts).
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 48
    lr: float = 0.01
    min_lr: float = 0.0
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Clip the gradients' total norm to this before each step (HiDe-Prompt / NoRGa: 1.0); null: no clipping.
    clip_grad_norm: float | None = None
    # auto (CUDA when available), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    # CPU threads for torch; null = auto: 1 for small models on CPU (more threads only contend on
    # a shared machine), all cores otherwise.
    threads: int | None = None
    progress: bool = True
    # Also checkpoint inside a task, every N epochs of a phase and after each phase; 0 = only after each task.
    checkpoint_every_epochs: int = 0
    # Precision of every forward: training (backward too; fp16 with a gradient scaler), class statistics, evaluation
    # and prediction run under bf16 or fp16 autocast; statistics are summed in fp32/fp64, classifier alignment trains
    # in fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # torch.compile the training step (recompiles when a task adds parameters).
    compile: bool = False
    # Learn only the first N tasks (the learner is still built for the whole stream, so they are learned exactly as
    # in a full run); null: every task. carecl tune's first-task protocol stops its trials this way.
    max_tasks: int | None = None

    def validate(self) -> None:
        require(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, train.lr = {self.lr}], got {self.min_lr}")
        require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm",
                f"must be positive or null, got {self.clip_grad_norm}")
        require(bool(DEVICE_PATTERN.match(self.device)), "device",
                f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(self.threads is None or self.threads > 0, "threads", f"must be positive (or null for auto), got {self.threads}")
        require(self.max_tasks is None or self.max_tasks > 0, "max_tasks", f"must be positive (or null), got {self.max_tasks}")
        require(self.checkpoint_every_epochs >= 0, "checkpoint_every_epochs",
                f"must be >= 0 (0 = only after each task), got {self.checkpoint_every_epochs}")


@dataclass
class EvalConfig:
    batch_size: int = 128
    topk: int = 5
    # Evaluate after every n-th task (and always after the last); 0 = only after the last task.
    every_n_tasks: int = 1
    # class_incremental: one head over every seen class; task_incremental: each task's test images scored
    # within that task's own classes (multi-domain task-incremental learning, MTIL).
    protocol: Literal["class_incremental", "task_incremental"] = "class_incremental"
    # task_incremental: also evaluate the tasks not learned yet (zero-shot transfer; MTIL's Transfer metric);
    # needs a method that can score unseen classes (a CLIP text head).
    unseen_tasks: bool = False
    # Score only new classes on stored features when the method's class scores never change (SimpleCIL, APER,
    # FeCAM): the same numbers, far less work on long runs; false = every evaluation from the images.
    incremental: bool = True
    # false: the test set is never read; every evaluation scores the validation split instead (needs
    # data.validation_fraction). carecl tune's trials run this way.
    test_set: bool = True

    def validate(self) -> None:
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.topk > 0, "topk", f"must be positive, got {self.topk}")
        require(self.every_n_tasks >= 0, "every_n_tasks", f"must be >= 0 (0 = only after the last task), got {self.every_n_tasks}")
        require(not self.unseen_tasks or self.protocol == "task_incremental", "unseen_tasks",
                "needs eval.protocol: task_incremental")


@dataclass
class MethodConfig:
    """Base of every method's options; `name` selects the registered method (registry.METHODS).

    A tuner's options nest as one section (`adapter:`, `brmoe:`, ...), its own config dataclass. Options
    that moved keep working: `moved_keys` maps each old key (dotted, below `method.`) to its new place;
    a file or --set using the old key is rewritten at load with a one-line notice.
    """

    name: str = "simplecil"
    moved_keys: ClassVar[dict[str, str]] = {}


@dataclass
class LoggingConfig:
    # Losses, learning rate and per-task accuracy as TensorBoard scalars in RUN_DIR/tensorboard/
    # (needs the `tensorboard` package: pip install "carecl[tensorboard]").
    tensorboard: bool = False
    # Write the training scalars of every n-th optimiser step.
    every_n_steps: int = 1

    def validate(self) -> None:
        require(self.every_n_steps > 0, "every_n_steps", f"must be positive, got {self.every_n_steps}")


@dataclass
class TuneConfig:
    """How `carecl tune` searches (docs/tuning.md); a plain run ignores this section."""

    # first-task: each trial learns the first `tasks` tasks and is scored on their validation images; stream: the
    # whole stream, scored by validation `metric`, pruned on per-task validation accuracy; two-stream: trials run on
    # the tuning stream `stream`, then the chosen values run once on this config's stream, with its test set.
    protocol: Literal["first-task", "stream", "two-stream"] = "first-task"
    # Two: the fewest tasks in which a trial can already leave one behind (what outputs.weak_task_warning looks for).
    tasks: int = 2
    trials: int = 16
    metric: Literal["a_last", "average"] = "a_last"
    # tpe: Optuna's TPE sampler seeded by `seed`; grid: every combination of the space's choices (at most `trials`);
    # auto: grid when every key is a list of choices and their combinations fit in `trials`, else tpe.
    sampler: Literal["auto", "tpe", "grid"] = "auto"
    seed: int = 0
    # two-stream: the overrides (key=value, as --set takes them) that turn this config's stream into the tuning
    # stream, e.g. ["data.class_order=[...]"] or another dataset.
    stream: list[str] = field(default_factory=list)
    # The validation fraction trials use when data.validation_fraction is not set.
    validation_fraction: float = 0.2
    # stream protocol: stop a trial whose validation accuracy after a task falls below the median of earlier trials'.
    prune: bool = True
    # Trials scoring within this many points of the best count as tied with it (the tie goes to the values nearest
    # the config's own): on a small validation split, a difference of an image or two is noise.
    tolerance: float = 0.0

    def validate(self) -> None:
        require(self.tasks > 0, "tasks", f"must be positive, got {self.tasks}")
        require(self.trials > 0, "trials", f"must be positive, got {self.trials}")
        require(self.tolerance >= 0, "tolerance", f"must be >= 0 (accuracy points), got {self.tolerance}")
        require(0.0 < self.validation_fraction < 1.0, "validation_fraction",
                f"must be in (0, 1), got {self.validation_fraction}")
        require(self.protocol != "two-stream" or bool(self.stream), "stream",
                "must give the tuning stream's overrides for protocol two-stream (e.g. a class order or dataset)")
        for item in self.stream:
            require("=" in item, "stream", f"items look like key=value, got {item!r}")


@dataclass
class ExperimentConfig:
    # One seed, or a list: a run group (`carecl train` makes one run per seed; the class order follows each seed).
    seed: int | list[int] = 1993
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def validate(self) -> None:
        # NumPy's legacy seeding (the PILOT class order) takes 0 <= seed < 2**32.
        seeds = self.seed if isinstance(self.seed, list) else [self.seed]
        require(bool(seeds), "seed", "must list at least one seed")
        for seed in seeds:
            require(0 <= seed < 2**32, "seed", f"must be in [0, 2**32), got {seed}")
        require(len(set(seeds)) == len(seeds), "seed", f"lists a seed twice: {seeds}")
        require(self.eval.test_set or self.data.validation_fraction is not None, "eval.test_set",
                "false needs data.validation_fraction (the split evaluated instead of the test set)")


# ---------------------------------------------------------------- building from mappings


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Validate (and lightly coerce) `value` against a field annotation."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        return _check_union(value, typing.get_args(annotation), where)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_section(annotation, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _check_scalar(value, annotation, where)


def _check_union(value: Any, options: tuple, where: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _check_value(value, option, where)
        except ConfigError as error:
            errors.append(str(error))
    if value is None:
        raise ConfigError(f"{where} cannot be null")
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")


SCALAR_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _check_scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value}")
    accepted = annotation is not bool and isinstance(value, bool)
    if annotation in SCALAR_NAMES and (accepted or not isinstance(value, annotation)):
        raise ConfigError(f"{where}: expected {SCALAR_NAMES[annotation]}, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _over_default(spec: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a nested section overrides that section's default keys one by one (a method's
    options may default a nested section differently from the section's own class)."""
    if not isinstance(value, dict) or spec.default_factory is dataclasses.MISSING or spec.name == "method":
        return value
    default = spec.default_factory()
    return _merge_into(default, value) if dataclasses.is_dataclass(default) else value


def _merge_into(default: Any, given: dict[str, Any]) -> dict[str, Any]:
    """`given` over the fields of the dataclass instance `default`, section by section (deep)."""
    merged = dataclasses.asdict(default)
    for key, value in given.items():
        inner = getattr(default, key, None)
        merged[key] = _merge_into(inner, value) if isinstance(value, dict) and dataclasses.is_dataclass(inner) else value
    return merged


log = logging.getLogger("carecl")


def move_renamed_keys(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with each old key of `cls.moved_keys` moved to its new dotted place, with a notice per key."""
    moved = getattr(cls, "moved_keys", {})
    if not any(_dotted_get(data, old.split("."))[0] for old in moved):
        return data
    data = copy.deepcopy(data)
    for old, new in moved.items():
        found, value = _dotted_get(data, old.split("."))
        if not found:
            continue
        if _dotted_get(data, new.split("."))[0]:
            raise ConfigError(f"{where}.{old} and {where}.{new} are the same option ({old} was renamed): "
                              f"give only {where}.{new}")
        _dotted_pop(data, old.split("."))
        _dotted_set(data, new.split("."), value)
        log.warning("%s.%s is now %s.%s; the old key still works (scripts/migrate_configs.py rewrites a file)",
                    where, old, where, new)
    return data


def _dotted_get(data: Any, keys: list[str]) -> tuple[bool, Any]:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False, None
        data = data[key]
    return True, data


def _dotted_pop(data: dict[str, Any], keys: list[str]) -> None:
    parent = _dotted_get(data, keys[:-1])[1]
    parent.pop(keys[-1])


def _dotted_set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{'.'.join(keys[:-1])} must be a mapping, got {data!r}")
    data[keys[-1]] = value


def method_options_class(name: Any, where: str = "method") -> type:
    """The options dataclass of the method registered as `name`."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected a string, got {name!r}")
    try:
        return METHODS.get(name).options
    except KeyError as error:
        raise ConfigError(f"{where}.name: {error.args[0]}") from None


def build_section(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, then run its `validate()`."""
    if cls is MethodConfig or (isinstance(cls, type) and issubclass(cls, MethodConfig) and "name" in data):
        cls = method_options_class(data.get("name", MethodConfig.name), where)
    data = move_renamed_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, sorted(fields))}")
        kwargs[key] = _check_value(_over_default(fields[key], value), hints[key], dotted)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except FieldError as error:
            raise ConfigError(f"{where}.{error.field} {error.detail}" if where else str(error)) from None
    return instance


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at top level, got {type(data).__name__}")
    # The method section is always built so its registered dataclass is used (even by default).
    return build_section(ExperimentConfig, {**data, "method": data.get("method") or {}}, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------- YAML


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a number (YAML 1.1 wants 1.0e-4) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key]} and {line}): remove one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Any decimal float (1e-4, -2.5E3, .5, 1., inf, nan), not only the YAML 1.1 forms with a dot.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config and apply `key=value` overrides; errors name the file or the --set at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix.lower() == ".json":
        raise ConfigError(f"{path} is a release JSON experiment file: read it with "
                          "carecl.compat.release_json.load_experiment_file (carecl train --config takes both)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    data = parse_yaml(text, str(path)) or {}
    return config_from_sources(data, overrides, str(path))


def config_from_sources(data: Any, overrides: list[str] | tuple[str, ...], source: str) -> ExperimentConfig:
    """`data` (read from `source`) with `overrides` applied; an error is blamed on the --set that set the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping at top level, got {type(data).__name__}")
    merged = apply_overrides(data, overrides)
    try:
        return config_from_dict(merged)
    except ConfigError as error:
        raise ConfigError(f"{blame(str(error), overrides, source)}: {error}") from None


def blame(message: str, overrides: list[str] | tuple[str, ...], source: str) -> str:
    """Where a config error's key came from: the last --set naming it (or a section of it: `--set
    method.alignment.epochs=3` for an error about 'method.alignment'), else the file."""
    for depth in (0, 1):
        for item in reversed(list(overrides)):
            keys = item.split("=", 1)[0].strip().split(".")
            dotted = ".".join(keys[:len(keys) - depth]) if len(keys) - depth >= 2 else None
            if dotted and re.search(rf"(^|[ '\"(]){re.escape(dotted)}([ .'\"\[:)]|$)", message):
                return f"--set {item}"
    return source


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested mapping copy.

    Changing `method.name` to another method drops the file's options of the old method (each
    method has its own options); `--set method.<option>` given alongside still applies.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value (e.g. train.epochs=3)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        value = parse_yaml(raw, f"--set {item}") if raw.strip() else None
        if keys == ["method", "name"] and isinstance(data.get("method"), dict) and data["method"].get("name") != value:
            data["method"] = {}
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {key!r} is not a section")
        node[keys[-1]] = value
    return data


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
