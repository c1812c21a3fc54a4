"""Models trained with the CaRE release: load them, import them as carecl runs, export back.

    learner = load_reference("care_task4.pth", "exps/care_inr.json")
    with torch.no_grad():
        features = learner.features(images)           # task-free
        known = learner.features(images, task=2)      # task-known forward of task 2
        logits = learner.logits(images)               # cosine logits, all seen classes

The release's adapter computes s ⊙ (W_up·ReLU(W_down·LN(x) + b_down) + b_up) with a learnable
per-channel scale tensor `scale` (so it is in every checkpoint), exactly as carecl's Adapter:
parameters carry over unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from carecl.compat import reference_layout as layout
from carecl.compat.reference_layout import ReferenceCheckpointError
from carecl.compat.release_json import load_experiment_file
from carecl.config import ExperimentConfig, apply_overrides, config_from_dict, config_to_dict
from carecl.runs.files import atomic_write_bytes
from carecl.runs.directory import RunDirectory
from carecl.scenario import Scenario, ScenarioError, task_sizes

# Written into an imported run directory; its config's backbone.weights names it (run-relative).
BACKBONE_FILE = "backbone.safetensors"
IMPORT_NOTE_FILE = "reference_import.json"
STATISTICS_NOTE = (
    "no class statistics: the release keeps its class means/covariances in memory, not in the "
    "checkpoint, so classifier alignment after a further task has nothing to sample old classes from; "
    "evaluation and prediction do not need them"
)
_DATA_PARALLEL_PREFIX = "module."


# ---------------------------------------------------------------- reading


def read_reference_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The release's state dict, read with `weights_only=True` (no pickled object is ever executed)."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceCheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ReferenceCheckpointError(
            f"{path}: holds pickled objects other than tensors; refused without running them "
            f"({_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for damaged files
        raise ReferenceCheckpointError(
            f"{path}: not a readable torch.save file (truncated or damaged?): {type(error).__name__}: "
            f"{_first_line(error)}") from None
    if not isinstance(state, Mapping):
        raise ReferenceCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    bad = sorted(f"{key!r} ({type(value).__name__})" for key, value in state.items()
                 if not isinstance(key, str) or not isinstance(value, Tensor))
    if bad:
        raise ReferenceCheckpointError(f"{path}: not a state dict of tensors; non-tensor entries: {', '.join(bad)}")
    if state and all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state):
        # Saved while wrapped in nn.DataParallel: the same keys under `module.`.
        state = {key[len(_DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}
    return dict(state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def resolve_config(config: str | Path | ExperimentConfig, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """An ExperimentConfig from a release JSON / carecl YAML path or an ExperimentConfig, overrides applied."""
    if isinstance(config, ExperimentConfig):
        resolved = config_from_dict(apply_overrides(config_to_dict(config), overrides)) if overrides else config
    else:
        resolved, _ = load_experiment_file(config, list(overrides))
    if resolved.method.name != "care":
        where = "the config" if isinstance(config, ExperimentConfig) else str(config)
        raise ReferenceCheckpointError(
            f"{where}: method.name is {resolved.method.name!r}; release checkpoints hold CaRE models (care)")
    return resolved


# ---------------------------------------------------------------- building the learner


@dataclass
class ImportedReference:
    """A release checkpoint loaded into a CaRE learner, and what the import decided on the way."""

    config: ExperimentConfig
    scenario: Scenario
    method: torch.nn.Module  # carecl.methods.care.CaRE
    # The frozen ViT's weights with timm's names, taken from the checkpoint.
    backbone_state: dict[str, Tensor]
    task_sizes: list[int]
    ignored_keys: list[str]
    notes: list[str] = field(default_factory=list)


def build_from_reference(state: Mapping[str, Tensor], config: ExperimentConfig, source: str,
                         n_classes: int | None = None) -> ImportedReference:
    """Grow a CaRE learner to the checkpoint's tasks and load every tensor, after checking them all."""
    from carecl.backbones import create_backbone
    from carecl.methods.base import build_method

    notes: list[str] = []
    heads = layout.classifier_task_sizes(state, source)
    scenario = _scenario(heads, config, state, source, n_classes, notes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the random initial values are all overwritten; keep the caller's RNG
        backbone = create_backbone(dataclasses.replace(config.backbone, pretrained=False, weights=None))
        method = build_method(config, backbone, scenario)
        method.regrow(len(heads), len(heads))

    template = learner_state(method)
    links = layout.link_keys(template)
    layout.check_fits(state, layout.release_shapes(links, template), source, _hints(state, config, backbone))
    tensors = layout.from_release(state, links, template)
    backbone.load_state_dict({key[len("backbone."):]: value for key, value in tensors.items()
                              if key.startswith("backbone.")})
    learned = method.state_tensors()  # the fresh learner's (empty) class statistics included
    learned.update({key: value for key, value in tensors.items() if not key.startswith("backbone.")})
    method.load_state_tensors(learned)
    method.model.invalidate_caches()
    notes.append(STATISTICS_NOTE)
    ignored = sorted(key for key in state if layout.is_ignored(key) or key in layout.UNUSED_HEAD_KEYS)
    backbone_state = {key: value.detach() for key, value in backbone.state_dict().items()}
    return ImportedReference(config, scenario, method.eval(), backbone_state, heads, ignored, notes)


def learner_state(method: torch.nn.Module) -> dict[str, Tensor]:
    """A CaRE learner's tensors with carecl's names: `backbone.*` (timm), `model.layers.*`, `classifier.heads.*`."""
    vit = method.model.vit
    return {**{f"backbone.{key}": value for key, value in vit.state_dict().items()}, **method.module_state_tensors()}


def _scenario(heads: list[int], config: ExperimentConfig, state: Mapping[str, Tensor], source: str,
              n_classes: int | None, notes: list[str]) -> Scenario:
    """Class order and tasks; the dataset's class count comes from the release's unused timm head."""
    data = config.data
    from_head = layout.dataset_class_count(state)
    if n_classes is not None and from_head is not None and n_classes != from_head:
        raise ReferenceCheckpointError(
            f"{source}: backbone.head.weight has {from_head} rows (the dataset's classes) but n_classes={n_classes} was given")
    if n_classes is None and from_head is None:
        n_classes = sum(heads)
        notes.append(f"no backbone.head.weight: assumed the checkpoint has seen every class ({n_classes}); "
                     "give n_classes (--n-classes) if the run stopped earlier")
    n_classes = n_classes if n_classes is not None else from_head
    try:
        planned = task_sizes(n_classes, data.first_task_size(n_classes), data.increment)
    except ScenarioError as error:
        raise ReferenceCheckpointError(f"{source}: {error}") from None
    if planned[: len(heads)] != heads:
        raise ReferenceCheckpointError(
            f"{source}: the classifier heads fc.heads.0..{len(heads) - 1} have {heads} classes, but "
            f"init_cls={data.init_cls}, increment={data.increment} over {n_classes} classes give tasks of "
            f"{planned[: len(heads) + 1]}{' ...' if len(planned) > len(heads) + 1 else ''}; "
            "use the config the model was trained with")
    try:
        return Scenario.build(n_classes, data.first_task_size(n_classes), data.increment, seed=config.seed, shuffle=data.shuffle,
                              explicit_order=data.class_order)
    except ScenarioError as error:
        raise ReferenceCheckpointError(f"{source}: {error}") from None


def _hints(state: Mapping[str, Tensor], config: ExperimentConfig, backbone: torch.nn.Module) -> list[str]:
    """Say which config setting a mismatch most likely comes from."""
    found = layout.describe(state)
    hints = []
    brmoe = config.method.brmoe
    for key, configured in (("adapter_dim", brmoe.adapter_dim), ("expert_dim", brmoe.expert_dim)):
        if found[key] is not None and found[key] != configured:
            hints.append(f"the checkpoint's {key} is {found[key]}, the config's method.brmoe.{key} is {configured}")
    configured_vit = (len(backbone.blocks), backbone.embed_dim)
    if (found["blocks"], found["width"]) != configured_vit:
        hints.append(f"the checkpoint's ViT has {found['blocks']} blocks of width {found['width']}, the config's "
                     f"{configured_vit[0]} of width {configured_vit[1]}: check backbone.name "
                     f"({config.backbone.name}) and backbone.model_kwargs")
    return hints


# ---------------------------------------------------------------- the Python API


def load_reference(checkpoint: str | Path, config: str | Path | ExperimentConfig, *,
                   overrides: Sequence[str] = (), n_classes: int | None = None) -> torch.nn.Module:
    """A release checkpoint as a ready CaRE learner (`carecl.methods.care.CaRE`, eval mode, CPU).

    `config` is the release JSON the model was trained with (or a carecl YAML path, or an
    ExperimentConfig); `overrides` are `key=value` strings as for `--set`. The number of tasks
    and their class counts come from the checkpoint's `fc.heads.*`, checked against the
    config's init_cls / increment. The backbone's weights come from the checkpoint (nothing is
    downloaded) and no data is read. The class order (original class id -> position, needed
    only to compare predictions with dataset labels: `learner.scenario.label_map`) is the
    config's: seed and shuffle over the dataset's class count, read from the rows of the
    release's unused `backbone.head.weight`; without that key, `n_classes` or else the classes
    the heads have seen. Outputs: `features(images, task=None)` (final-norm CLS features,
    task-free, or task-known for task i) and `logits(images)` (unscaled cosine logits over all
    seen classes, task-free single pass); `predict` adds the release's iterative prediction.
    The learner holds no class statistics (the release does not save them).
    """
    source = str(checkpoint)
    return build_from_reference(read_reference_checkpoint(checkpoint), resolve_config(config, overrides), source,
                                n_classes).method


def write_reference_checkpoint(method: torch.nn.Module, output: str | Path,
                               n_dataset_classes: int | None = None) -> dict[str, Tensor]:
    """Save a CaRE learner in the release's layout (a `torch.save`d dict of tensors); returns that dict.

    `backbone.head.*` (the release ViT's timm head, never used by CaRE) is written as zeros, one
    row per dataset class (default: the learner's scenario), so that the release's strict
    `load_state_dict` accepts the file. Class statistics are not part of the release's layout.
    """
    if n_dataset_classes is None:
        n_dataset_classes = method.scenario.n_classes
    state = layout.to_release(learner_state(method))
    width = state["backbone.norm.weight"].shape[0]
    dtype = state["backbone.norm.weight"].dtype
    state[layout.UNUSED_HEAD_KEYS[0]] = torch.zeros(n_dataset_classes, width, dtype=dtype)
    state[layout.UNUSED_HEAD_KEYS[1]] = torch.zeros(n_dataset_classes, dtype=dtype)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(output), buffer.getvalue())
    return state


# ---------------------------------------------------------------- run directories


@dataclass
class ImportSummary:
    run: Path
    task_sizes: list[int]
    n_classes: int
    ignored_keys: list[str]
    notes: list[str]


def import_reference(checkpoint: str | Path, config: str | Path | ExperimentConfig, output: str | Path, *,
                     overrides: Sequence[str] = (), n_classes: int | None = None,
                     class_names: Sequence[str] | None = None) -> ImportSummary:
    """Write a carecl run directory holding the release checkpoint's model (see `load_reference`).

    The directory has config.yaml (backbone.weights -> the run's own backbone.safetensors,
    pretrained false), classes.json (the dataset's class count, and `class_names` by class id when
    given: prediction names classes `class <id>` without them), learner.safetensors / learner.json
    as after the checkpoint's last task (empty class statistics), backbone.safetensors and
    reference_import.json (source file, sha256, task sizes, ignored keys, notes); no metrics.json:
    nothing was evaluated.
    """
    from carecl.engine.experiment import Experiment
    from carecl.engine.checkpointing import save_learner

    checkpoint = Path(checkpoint)
    imported = build_from_reference(read_reference_checkpoint(checkpoint), resolve_config(config, overrides),
                                    str(checkpoint), n_classes)
    n_dataset_classes = imported.scenario.n_classes
    if class_names is not None and len(class_names) != n_dataset_classes:
        raise ReferenceCheckpointError(f"{checkpoint}: {len(class_names)} class names given, but the model's "
                                       f"dataset has {n_dataset_classes} classes")
    run_config = dataclasses.replace(
        imported.config, backbone=dataclasses.replace(imported.config.backbone, pretrained=False, weights=BACKBONE_FILE))
    run = RunDirectory.create(output, run_config, class_names=class_names, n_classes=n_dataset_classes)
    backbone = {key: value.contiguous() for key, value in imported.backbone_state.items()}
    atomic_write_bytes(run.path / BACKBONE_FILE, safetensors_bytes(backbone))
    save_learner(run, Experiment(run_config, None, imported.scenario, imported.method, torch.device("cpu")))
    note = {
        "checkpoint": str(checkpoint.resolve()),
        "sha256": _sha256(checkpoint),
        "config": str(config) if not isinstance(config, ExperimentConfig) else None,
        "task_sizes": imported.task_sizes,
        "n_classes": imported.scenario.n_classes,
        "ignored_keys": imported.ignored_keys,
        "notes": imported.notes,
    }
    atomic_write_bytes(run.path / IMPORT_NOTE_FILE, json.dumps(note, indent=2).encode())
    return ImportSummary(run.path, imported.task_sizes, imported.scenario.n_classes, imported.ignored_keys, imported.notes)


def export_reference(run_dir: str | Path, output: str | Path, data_overrides: Sequence[str] = ()) -> dict[str, Tensor]:
    """Write a carecl CaRE run's learner in the release's layout (needs the run's data, as `carecl eval`;
    `data_overrides` such as `data.root=DIR` when it moved)."""
    from carecl.engine.checkpointing import load_experiment
    from carecl.methods.care import CaRE

    experiment = load_experiment(RunDirectory.open(run_dir), data_overrides=data_overrides)
    if not isinstance(experiment.method, CaRE):
        raise ReferenceCheckpointError(
            f"{run_dir}: method {experiment.config.method.name!r}; only CaRE runs have a release layout")
    return write_reference_checkpoint(experiment.method, output)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["BACKBONE_FILE", "ImportSummary", "ImportedReference", "ReferenceCheckpointError", "build_from_reference",
           "export_reference", "import_reference", "learner_state", "load_reference",
           "read_reference_checkpoint", "resolve_config", "write_reference_checkpoint"]
