"""Import an experiment JSON of the CaRE release (LAMDA-PILOT style) as a typed ExperimentConfig.

The release keeps its settings as one flat JSON object read through a dict in many places.
Here every key goes through RELEASE_KEYS: it is either mapped onto a dotted carecl key (with
a converter that checks the value) or reported as ignored with the reason. Keys not in the
table are reported as "unknown, ignored"; none is dropped silently. Values that ask for
behaviour carecl cannot express (a cosface margin, exemplar memory, AMP) become warnings.

    config, report = load_release_json("exps/imagenet_r/care_inr_inc10.json")
    print(report.format())
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from carecl.config import (ConfigError, ExperimentConfig, config_from_dict, config_from_sources, config_to_dict,
                           load_config, method_options_class)

logger = logging.getLogger(__name__)


class ReleaseValueError(ValueError):
    """A release value is impossible; the loader adds the file and key to the message."""


# ---------------------------------------------------------------- converters
# Each takes the raw JSON value and returns the carecl value, or raises ReleaseValueError.

Converter = Callable[[Any], Any]
# Returns a warning line when the value asks for behaviour carecl does not reproduce.
Check = Callable[[Any], "str | None"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ReleaseValueError(f"expected a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReleaseValueError(f"expected an integer >= 0, got {value!r}")
    return value


def positive_float(value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise ReleaseValueError(f"expected a positive number, got {value!r}")
    return float(value)


def non_negative_float(value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise ReleaseValueError(f"expected a number >= 0, got {value!r}")
    return float(value)


def fraction(value: Any) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise ReleaseValueError(f"expected a number in [0, 1), got {value!r}")
    return float(value)


def boolean(value: Any) -> bool:
    # The release tests these with `if args[key]`, so 0/1 behave like false/true there.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ReleaseValueError(f"expected true/false, got {value!r}")


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReleaseValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def choice(*allowed: str) -> Converter:
    def convert(value: Any) -> str:
        name = text(value).lower()
        if name not in allowed:
            raise ReleaseValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return name

    return convert


def first_seed(value: Any) -> int:
    """The release runs once per seed of a list; carecl runs one seed, the first."""
    seeds = value if isinstance(value, list) else [value]
    if not seeds:
        raise ReleaseValueError("expected a seed or a non-empty list of seeds, got []")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ReleaseValueError(f"expected integer seeds, got {value!r}")
    return seeds[0]


def extra_seeds_warning(value: Any) -> str | None:
    if isinstance(value, list) and len(value) > 1:
        return (
            f"seed: the release runs every seed of {value}; carecl uses only the first "
            f"({value[0]}); run again with --set seed=N for the others"
        )
    return None


# Release dataset keys (PILOT's utils/data.py) -> carecl dataset names.
RELEASE_DATASETS: dict[str, str] = {
    "cifar224": "cifar100",
    "cifar100": "cifar100",
    "imagenetr": "imagenet-r",
    "imageneta": "imagenet-a",
    "objectnet": "objectnet",
    "omnibenchmark": "omnibenchmark",
    "omnibenchmark1k": "omnibenchmark1k",
    "vtab": "vtab",
    "cub": "cub",
}


def dataset_name(value: Any) -> str:
    name = text(value).lower()
    if name in RELEASE_DATASETS:
        return RELEASE_DATASETS[name]
    from carecl.data import DATASETS  # a carecl dataset name (e.g. digits) is accepted as is

    try:
        return DATASETS.canonical(name)
    except KeyError:
        known = ", ".join(sorted(RELEASE_DATASETS))
        raise ReleaseValueError(f"unknown dataset {value!r} (release datasets: {known})") from None


# The CaRE release builds its BR-MoE ViT from a timm name plus this suffix.
BRMOE_SUFFIX = "_brmoe"


def backbone_name(value: Any) -> str:
    """Drop the release's `_brmoe` suffix; the legacy timm name is kept (backbones.py maps it)."""
    name = text(value)
    return name[: -len(BRMOE_SUFFIX)] if name.endswith(BRMOE_SUFFIX) else name


def method_name(value: Any) -> str:
    return text(value).lower()


# ---------------------------------------------------------------- checks


def warn_if_positive(what: str) -> Check:
    return lambda value: (
        f"{what}={value!r}: carecl's CaRE keeps no exemplars, so this memory is not reproduced"
        if _is_number(value) and value > 0
        else None
    )


def warn_if_true(message: str) -> Check:
    return lambda value: message.format(value=value) if value is True or value == 1 else None


def warn_unless_cosine(value: Any) -> str | None:
    if isinstance(value, str) and value.lower() == "cosine":
        return None
    return f"scheduler={value!r}: carecl always uses a cosine schedule; this schedule is not reproduced"


def warn_if_margin(value: Any) -> str | None:
    if _is_number(value) and value == 0:
        return None
    return (
        f"margin m={value!r}: carecl's loss is cross-entropy on scale*cos (a cosface margin of 0); "
        "a non-zero margin is not reproduced"
    )


def warn_if_not_pretrained(value: Any) -> str | None:
    if value is False or value == 0:
        return (
            "pretrained=false: the CaRE release loads pre-trained weights whatever this key says; "
            "carecl honours it and starts from random weights"
        )
    return None


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class MapTo:
    """The release key sets one or more carecl keys (dotted), through `convert`."""

    targets: tuple[str, ...]
    convert: Converter
    check: Check | None = None


@dataclass(frozen=True)
class Ignore:
    """carecl does not need the key; `reason` says why, `check` flags values it cannot reproduce."""

    reason: str
    check: Check | None = None


Rule = typing.Union[MapTo, Ignore]


def to(*targets: str, convert: Converter, check: Check | None = None) -> MapTo:
    return MapTo(targets, convert, check)


_EXEMPLARS = "exemplar memory; CaRE is rehearsal-free and carecl keeps no exemplars"
_OTHER_METHOD = "option of another PILOT method (TUNA/MOS/APER); the CaRE learner never reads it"
_PROMPTS = "prompt option of PILOT's prompt methods (L2P/DualPrompt/CODA/VPT); CaRE adds no prompts"
# The release's AMP is torch.cuda.amp.autocast (fp16 by default) with a gradient scaler.
_AMP = to("train.precision", convert=lambda value: "fp16" if boolean(value) else "fp32")
_MARGIN = Ignore("cosface margin; carecl's loss is CE on scale*cos, i.e. margin 0", warn_if_margin)
_STEPLR = Ignore("only read by the release's 'steplr' scheduler; carecl uses cosine")

RELEASE_KEYS: dict[str, Rule] = {
    # protocol and data
    "dataset": to("data.dataset", convert=dataset_name),
    "shuffle": to("data.shuffle", convert=boolean),
    "init_cls": to("data.init_cls", convert=positive_int),
    "increment": to("data.increment", convert=positive_int),
    "seed": to("seed", convert=first_seed, check=extra_seeds_warning),
    "num_workers": to("data.num_workers", convert=non_negative_int),
    "memory_size": Ignore(_EXEMPLARS, warn_if_positive("memory_size")),
    "memory_per_class": Ignore(_EXEMPLARS, warn_if_positive("memory_per_class")),
    "fixed_memory": Ignore(_EXEMPLARS, warn_if_true("fixed_memory={value!r}: exemplar memory is not reproduced")),
    # method and backbone
    "model_name": to("method.name", convert=method_name),
    "backbone_type": to("backbone.name", convert=backbone_name),
    "convnet_type": to("backbone.name", convert=backbone_name),  # older PILOT name of backbone_type
    "pretrained": to("backbone.pretrained", convert=boolean, check=warn_if_not_pretrained),
    "drop_path": to("backbone.model_kwargs.drop_path_rate", convert=fraction),
    "drop": Ignore("the CaRE release passes only drop_path to its ViT; this dropout is never applied"),
    # training
    "tuned_epoch": to("train.epochs", convert=non_negative_int),
    "init_lr": to("train.lr", convert=positive_float),
    # Alignment then samples 5 x batch_size features per class (samples_per_class left null).
    "batch_size": to("train.batch_size", convert=positive_int),
    # The release's alignment optimiser takes its weight decay from this key too.
    "weight_decay": to("train.weight_decay", "method.alignment.weight_decay", convert=non_negative_float),
    "min_lr": to("train.min_lr", convert=non_negative_float),
    "optimizer": to("train.optimizer", convert=choice("sgd", "adam", "adamw")),
    "scheduler": Ignore("learning-rate schedule; carecl's engine always anneals with cosine", warn_unless_cosine),
    "reinit_optimizer": Ignore("not read by the CaRE learner (it builds a fresh optimiser for every phase)"),
    "init_milestones": _STEPLR,
    "init_lr_decay": _STEPLR,
    "amp": _AMP,
    "use_amp": _AMP,
    # CaRE / BR-MoE
    "adapter_dim": to("method.brmoe.adapter_dim", convert=positive_int),
    "expert_dim": to("method.brmoe.expert_dim", convert=positive_int),
    "topk_experts": to("method.brmoe.topk_experts", convert=positive_int),
    "topk_routers": to("method.brmoe.topk_routers", convert=positive_int),
    "scale": to("method.scale", convert=positive_float),
    "m": _MARGIN,
    "margin": _MARGIN,
    "aux_cos_loss": to("method.aux_cos_loss", convert=boolean),
    "self_dist_loss": to("method.self_dist_loss", convert=boolean),
    "iter_pred": to("method.iter_pred", convert=boolean),
    # classifier alignment
    "crct_epochs": to("method.alignment.epochs", convert=non_negative_int),
    "ca_lr": to("method.alignment.lr", convert=positive_float),
    "ca_storage_efficient_method": to("method.alignment.storage", convert=choice("covariance", "variance")),
    "decay": to("method.alignment.decay", convert=boolean),
    "ca_storage_efficient_method_choices": Ignore("list of allowed storage values; documentation, not a setting"),
    "n_centroids": Ignore("only for 'multi-centroid' storage, which the CaRE release does not implement"),
    # bookkeeping of the release's runner
    "prefix": Ignore("log-file name prefix of the release; carecl names its run directories itself"),
    "model_postfix": Ignore("log-file name suffix of the release"),
    "device": Ignore("GPU ids of the release's machine; carecl uses train.device (auto) or torchrun"),
    "config": Ignore("path of the JSON file itself, added to the arguments by the release's main.py"),
    "nb_classes": Ignore("computed from the dataset at run time"),
    "nb_tasks": Ignore("computed from init_cls, increment and the dataset at run time"),
    "print_forget": Ignore("carecl always reports forgetting"),
    # options of other PILOT methods, present in configs copied from them
    "ffn_num": Ignore("AdaptFormer bottleneck of other PILOT methods; the CaRE backbone reads adapter_dim/expert_dim"),
    "ffn_adapt": Ignore(_OTHER_METHOD),
    "ffn_option": Ignore(_OTHER_METHOD),
    "reg": Ignore(_OTHER_METHOD),
    "use_orth": Ignore(_OTHER_METHOD),
    "r": Ignore(_OTHER_METHOD),
    "adapter_momentum": Ignore(_OTHER_METHOD),
    "ensemble": Ignore(_OTHER_METHOD),
    "vpt_type": Ignore(_PROMPTS),
    "prompt_token_num": Ignore(_PROMPTS),
    "prompt_pool": Ignore(_PROMPTS),
    "prompt_key": Ignore(_PROMPTS),
    "prompt_key_init": Ignore(_PROMPTS),
    "size": Ignore(_PROMPTS),
    "length": Ignore(_PROMPTS),
    "top_k": Ignore(_PROMPTS),
    "initializer": Ignore(_PROMPTS),
    "use_prompt_mask": Ignore(_PROMPTS),
    "shared_prompt_pool": Ignore(_PROMPTS),
    "shared_prompt_key": Ignore(_PROMPTS),
    "batchwise_prompt": Ignore(_PROMPTS),
    "embedding_key": Ignore(_PROMPTS),
    "predefined_key": Ignore(_PROMPTS),
    "pull_constraint": Ignore(_PROMPTS),
    "pull_constraint_coeff": Ignore(_PROMPTS),
    "global_pool": Ignore("ViT pooling option of the prompt methods; carecl classifies the final-norm CLS token"),
    "head_type": Ignore("ViT head option of the prompt methods; carecl's backbone has no head"),
    "freeze": Ignore("list of frozen ViT parts; carecl freezes the whole backbone"),
    "get_original_convnet": Ignore(_PROMPTS),
}

UNKNOWN_REASON = "unknown, ignored"
# Keys the CaRE release reads with args[key] (no default): a file without them cannot have run.
REQUIRED_KEYS = ("dataset", "init_cls", "increment", "model_name")
REQUIRED_FOR_CARE = ("tuned_epoch", "init_lr", "batch_size", "crct_epochs", "ca_lr", "decay")


# ---------------------------------------------------------------- the report


@dataclass
class ReleaseImportReport:
    """What became of every key of one release JSON."""

    source: str
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def release_keys(self) -> set[str]:
        return {key for key, _, _ in self.mapped} | {key for key, _ in self.ignored}

    def format(self) -> str:
        lines = [f"release config {self.source}"]
        lines += _table("mapped", ("release key", "carecl key", "value"), [(k, t, repr(v)) for k, t, v in self.mapped])
        lines += _table("ignored", ("release key", "reason"), self.ignored)
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  WARNING {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        return "  " + "  ".join([*cells, str(row[-1])])

    return [f"{title} ({len(rows)}):", line(header), *(line(row) for row in rows)]


# ---------------------------------------------------------------- loading


def load_release_json(path: str | Path) -> tuple[ExperimentConfig, ReleaseImportReport]:
    """Read a release experiment JSON; every key is mapped or reported (see RELEASE_KEYS)."""
    path = Path(path)
    duplicates: list[str] = []
    settings = _read_json_object(path, duplicates)
    # Like the release, the last of two equal keys wins; a typo hides there, so say so.
    notes = [f"key {key!r} appears more than once; the last value is used, as in the release" for key in duplicates]
    return release_to_config(settings, source=str(path), notes=notes)


def release_to_config(
    settings: dict[str, Any], source: str = "<release>", notes: list[str] | None = None
) -> tuple[ExperimentConfig, ReleaseImportReport]:
    """Map a flat release settings dict; errors name `source` and the release key at fault."""
    _require(settings, REQUIRED_KEYS, source)
    report = ReleaseImportReport(source=source, warnings=list(notes or []))
    nested: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for key, raw in settings.items():
        rule = RELEASE_KEYS.get(key)
        if rule is None:
            report.ignored.append((key, UNKNOWN_REASON))
            report.warnings.append(f"unknown release key {key!r} ignored{_suggest(key)}")
            continue
        warning = rule.check(raw) if rule.check else None
        if warning:
            report.warnings.append(warning)
        if isinstance(rule, Ignore):
            report.ignored.append((key, rule.reason))
            continue
        value = _convert(rule, key, raw, source)
        for target in rule.targets:
            _claim(target, key, value, nested, set_by, source)
            report.mapped.append((key, target, value))
    method = nested.get("method", {}).get("name")
    if method == "care":
        _require(settings, REQUIRED_FOR_CARE, source)
    _drop_options_the_method_lacks(nested, report, method, source)
    for warning in report.warnings:
        logger.warning("%s: %s", source, warning)
    return _build(nested, set_by, source), report


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(RELEASE_KEYS), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_json_object(path: Path, duplicates: list[str]) -> dict[str, Any]:
    """The top-level JSON object of `path`; keys given twice are appended to `duplicates`."""
    if not path.is_file():
        raise ConfigError(f"release config not found: {path}")

    def note_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        duplicates.extend(sorted({key for key in keys if keys.count(key) > 1}))
        return dict(pairs)

    try:
        settings = json.loads(path.read_text(), object_pairs_hook=note_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: a release config is a JSON object, got {type(settings).__name__}")
    return settings


def _require(settings: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [key for key in keys if key not in settings]
    if missing:
        raise ConfigError(f"{source}: missing release key(s) {', '.join(missing)}")


def _convert(rule: MapTo, key: str, raw: Any, source: str) -> Any:
    try:
        return rule.convert(raw)
    except ReleaseValueError as error:
        raise ConfigError(f"{source}: release key {key!r}: {error}") from None


def _claim(target: str, key: str, value: Any, nested: dict, set_by: dict[str, str], source: str) -> None:
    """Set a dotted key once; two release keys giving it different values is an error."""
    *sections, leaf = target.split(".")
    node = nested
    for section in sections:
        node = node.setdefault(section, {})
    if leaf in node and node[leaf] != value:
        raise ConfigError(
            f"{source}: release keys {set_by[target]!r} and {key!r} both set {target} "
            f"but disagree ({node[leaf]!r} vs {value!r})"
        )
    node[leaf] = value
    set_by[target] = key


def _drop_options_the_method_lacks(nested: dict, report: ReleaseImportReport, method: str | None, source: str) -> None:
    """CaRE options in a JSON of another method are reported ignored, not passed on."""
    options = nested.get("method")
    if not options or method is None:
        return
    try:
        method_class = method_options_class(method)
    except ConfigError as error:
        raise ConfigError(f"{source}: release key 'model_name': {error}") from None
    for target in [t for _, t, _ in report.mapped if t.startswith("method.") and t != "method.name"]:
        if not _has_field(method_class, target.split(".")[1:]):
            key = next(k for k, t, _ in report.mapped if t == target)
            report.mapped = [row for row in report.mapped if row[1] != target]
            report.ignored.append((key, f"option of CaRE; method {method!r} has no setting {target}"))
            _delete(options, target.split(".")[1:])


def _has_field(cls: Any, path: list[str]) -> bool:
    for name in path:
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if name not in hints:
            return False
        cls = hints[name]
    return True


def _delete(node: dict, path: list[str]) -> None:
    """Remove a nested key, and the sections it leaves empty."""
    head, *rest = path
    if rest:
        _delete(node[head], rest)
        if node[head]:
            return
    node.pop(head, None)


def _build(nested: dict[str, Any], set_by: dict[str, str], source: str) -> ExperimentConfig:
    try:
        return config_from_dict(nested)
    except ConfigError as error:
        message = str(error)
        named = [target for target in set_by if target in message]
        origin = f" (from release key {set_by[max(named, key=len)]!r})" if named else ""
        raise ConfigError(f"{source}: {message}{origin}") from None


def load_experiment_file(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, ReleaseImportReport | None]:
    """A carecl YAML file, or a release JSON experiment file (then also its import report), `key=value`
    overrides applied on top."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return load_config(path, overrides), None
    config, report = load_release_json(path)
    if overrides:
        config = config_from_sources(config_to_dict(config), overrides, str(path))
    return config, report
