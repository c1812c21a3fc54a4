"""Typed experiment configuration: dataclasses, YAML load/save, `key=value` overrides.

Every section is a dataclass; unknown keys are rejected with the closest valid key, and
values are checked against the field's type, naming the full dotted key at fault.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from carecl.errors import CareclError
from carecl.registry import Registry


class ConfigError(CareclError, ValueError):
    """A configuration file, key or value is invalid; the message names the key (and file)."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    # Folder holding <dataset folder>/train and /test (ImageFolder), or the CIFAR archive;
    # for `imagefolder`: DIR/train/<class>/ and DIR/test/<class>/, or DIR/<class>/ with test_fraction.
    root: str | None = None
    # imagefolder with one folder of classes: the fraction of each class's images held out for
    # testing (a fixed, seed-independent split of the sorted file list).
    test_fraction: float | None = None
    init_cls: int = 2
    increment: int = 2
    shuffle: bool = True
    # Explicit class order (original class ids); overrides `shuffle`.
    class_order: list[int] | None = None
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

    def validate(self) -> None:
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"data.image_size must be positive, got {self.image_size}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("data.mean and data.std must be set together (or both left null)")
        if self.mean is not None and (len(self.mean) != len(self.std) or len(self.mean) not in (1, 3)):
            raise ConfigError(f"data.mean and data.std need 1 or 3 values each, got {self.mean} and {self.std}")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ConfigError(f"data.std values must be positive, got {self.std}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class BackboneConfig:
    # Any timm ViT name; the release's legacy `vit_base_patch16_224_in21k` is accepted.
    name: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    # Local weights file (.safetensors, .pth/.pt/.bin, .npz); overrides hub download.
    weights: str | None = None
    # Extra timm constructor arguments (tiny test models: depth, embed_dim, img_size, ...).
    model_kwargs: dict[str, Any] = field(default_factory=dict)


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 48
    lr: float = 0.01
    min_lr: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "auto" picks CUDA when available.
    device: str = "auto"
    progress: bool = True
    # Also checkpoint inside a task, every N epochs of a phase and after each phase; 0 = only after each task.
    checkpoint_every_epochs: int = 0
    # Training forward/backward precision: fp32, bf16 or fp16 (fp16 with a gradient scaler);
    # evaluation and class statistics always run in fp32.
    precision: str = "fp32"
    # torch.compile the training step (recompiles when a task adds parameters).
    compile: bool = False

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class EvalConfig:
    batch_size: int = 128
    topk: int = 5
    # Evaluate after every n-th task (and always after the last); 0 = only after the last task.
    every_n_tasks: int = 1

    def validate(self) -> None:
        if self.every_n_tasks < 0:
            raise ConfigError(f"eval.every_n_tasks must be >= 0 (0 = only after the last task), got {self.every_n_tasks}")


@dataclass
class MethodConfig:
    """Base of every method's options; `name` selects the registered method."""

    name: str = "simplecil"


@dataclass
class LoggingConfig:
    # Losses, learning rate and per-task accuracy as TensorBoard scalars in RUN_DIR/tensorboard/
    # (needs the `tensorboard` package: pip install "carecl[tensorboard]").
    tensorboard: bool = False
    # Write the training scalars of every n-th optimiser step.
    every_n_steps: int = 1

    def validate(self) -> None:
        if self.every_n_steps <= 0:
            raise ConfigError(f"logging.every_n_steps must be positive, got {self.every_n_steps}")


# Method name -> its config dataclass (a MethodConfig subclass); filled by carecl.methods.
METHOD_CONFIGS: Registry[type] = Registry("method")


@dataclass
class ExperimentConfig:
    seed: int = 1993
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------- parsing


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Validate (and lightly coerce) `value` against a field annotation."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
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
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(annotation, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    if cls is MethodConfig or (isinstance(cls, type) and issubclass(cls, MethodConfig) and "name" in data):
        cls = method_config_class(data.get("name", MethodConfig.name), where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, sorted(fields))}")
        kwargs[key] = _check_value(value, hints[key], dotted)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def method_config_class(name: str, where: str = "method") -> type:
    import carecl.methods  # noqa: F401  (registers every method's config)

    try:
        return METHOD_CONFIGS.get(name)
    except KeyError as error:
        raise ConfigError(f"{where}.name: {error.args[0]}") from None


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at top level, got {type(data).__name__}")
    # The method section is always built so its registered dataclass is used (even by default).
    config = _build(ExperimentConfig, {**data, "method": data.get("method") or {}}, "")
    validate_experiment(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (or a release JSON experiment file) and apply `key=value` overrides."""
    return load_config_with_report(path, overrides)[0]


def load_config_with_report(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[ExperimentConfig, Any]:
    """As `load_config`, also returning the release-JSON import report (None for YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    report = None
    if path.suffix == ".json":
        from carecl.compat.release_json import load_release_json

        config, report = load_release_json(path)
        data = config_to_dict(config)
    else:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        return config_from_dict(apply_overrides(data, overrides)), report
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested mapping copy."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def validate_experiment(config: ExperimentConfig) -> None:
    """Cross-field checks that need no data: impossible splits fail before any work."""
    data = config.data
    if data.init_cls <= 0:
        raise ConfigError(f"data.init_cls must be positive, got {data.init_cls}")
    if data.increment <= 0:
        raise ConfigError(f"data.increment must be positive, got {data.increment}")
    if config.train.epochs < 0:
        raise ConfigError(f"train.epochs must be >= 0, got {config.train.epochs}")
    if config.train.batch_size <= 0:
        raise ConfigError(f"train.batch_size must be positive, got {config.train.batch_size}")
    if config.eval.topk <= 0:
        raise ConfigError(f"eval.topk must be positive, got {config.eval.topk}")
