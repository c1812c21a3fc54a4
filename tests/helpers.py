"""What the tests share: tiny configs and models, shipped-data settings, checkpoints in the release's layout,
tiny CLIPs and domain folders, and the interrupted-run check. Test files import from here, never from each other."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from carecl.config import config_from_dict
from carecl.engine import resume_experiment, run_experiment
from carecl.runs import checkpoints as ckpt
from carecl.runs.checkpoints import CheckpointStore
from carecl.tuners.adapter import AdapterConfig
from carecl.tuners.adapter_bank import AdapterBankInjector

# ---------------------------------------------------------------- tiny configs: a 2-block ViT on synthetic classes

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_config(method: dict | None = None, **sections) -> "ExperimentConfig":  # noqa: F821
    data = {"dataset": "synthetic", "synthetic_classes": 6, "synthetic_train_per_class": 12,
            "synthetic_test_per_class": 6, "image_size": 16, "init_cls": 2, "increment": 2}
    data.update(sections.pop("data", {}))
    train = {"epochs": 1, "batch_size": 16, "lr": 0.05, "device": "cpu", "progress": False}
    train.update(sections.pop("train", {}))
    raw = {
        "seed": 1993,
        "data": data,
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": dict(TINY_VIT)},
        "train": train,
        "eval": {"batch_size": 64, "topk": 2},
        "method": method or {"name": "simplecil"},
        **sections,
    }
    return config_from_dict(raw)


# ---------------------------------------------------------------- the shipped demo backbone and its glyphs

# The shipped demo ViT (pre-trained on generated glyphs) and glyph classes it has not seen.
DEMO_BACKBONE = {"name": "vit_tiny_patch16_224", "pretrained": False, "weights": "asset:tiny_vit_glyphs.safetensors",
                 "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}}


GLYPHS = {"dataset": "glyphs", "synthetic_classes": 6, "synthetic_train_per_class": 20}


# ---------------------------------------------------------------- tiny models

def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()


# ---------------------------------------------------------------- adapter banks

def randomised_bank(config: AdapterConfig, n_sets: int) -> AdapterBankInjector:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()
    bank = AdapterBankInjector(vit, config)
    for _ in range(n_sets):
        for adapter in bank.add_set():
            for parameter in adapter.parameters():  # a fresh adapter adds nothing: make each set differ
                torch.nn.init.normal_(parameter, std=0.3)
    return bank.eval()


# ---------------------------------------------------------------- TensorBoard event files

def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------- interrupted runs: kill points, outcomes, the resume check

def outcome(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """metrics.json without wall times and costs (timings), and the final learner's tensors."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("wall_time_s")
    metrics.pop("costs", None)
    name = CheckpointStore(run).pointer()["task_end"]
    return metrics, load_file(str(run / "checkpoints" / name / "learner.safetensors"))


def assert_same_outcome(run: Path, reference: tuple[dict, dict[str, torch.Tensor]]) -> None:
    metrics, tensors = outcome(run)
    assert metrics == reference[0]
    assert tensors.keys() == reference[1].keys()
    for key, value in reference[1].items():
        assert torch.equal(tensors[key], value), key


class Interrupted(BaseException):
    """Stands in for SIGKILL in-process (a BaseException: nothing in carecl catches it)."""


def interrupt_at(monkeypatch, label: str) -> None:
    def kill_point(current: str) -> None:
        if current == label:
            raise Interrupted(label)

    monkeypatch.setattr(ckpt, "kill_point", kill_point)


def check_interrupted_run_resumes_identically(config, label: str, tmp_path: Path, monkeypatch) -> None:
    """`config` run through, then run again, interrupted at kill point `label` and resumed: the same
    metrics and learner tensors (deterministic algorithms on; for other methods' test files)."""
    torch.use_deterministic_algorithms(True)
    try:
        run_experiment(config, tmp_path / "reference")
        reference = outcome(tmp_path / "reference")
        interrupt_at(monkeypatch, label)
        with pytest.raises(Interrupted):
            run_experiment(config, tmp_path / "run")
        monkeypatch.undo()
        resume_experiment(tmp_path / "run")
        assert_same_outcome(tmp_path / "run", reference)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- a checkpoint in the CaRE release's layout

# A first task of another size (B3 Inc2), stopped after 4 of the 5 tasks of 11 classes.
TASK_SIZES = [3, 2, 2, 2]


N_CLASSES = 11


@dataclass(frozen=True)
class Shape:
    dim: int = 32
    depth: int = 2
    heads: int = 2
    patch: int = 4
    image: int = 16
    mlp: int = 128
    adapter_dim: int = 8
    expert_dim: int = 4

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


TINY = Shape()


def release_checkpoint(shape: Shape, task_sizes: list[int], n_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random non-zero tensors under the release's key names, written from spec §8 (scales included)."""
    generator = torch.Generator().manual_seed(seed)
    dim, state = shape.dim, {}

    def rand(*size: int, scale: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * scale

    def norm(prefix: str) -> None:
        state[prefix + "weight"] = 1 + rand(dim, scale=0.1)
        state[prefix + "bias"] = rand(dim, scale=0.1)

    def linear(prefix: str, out: int, inp: int, gain: float = 1.0) -> None:
        state[prefix + "weight"] = rand(out, inp, scale=gain / math.sqrt(inp))
        state[prefix + "bias"] = rand(out, scale=0.1)

    def adapter(prefix: str, rank: int) -> None:
        norm(prefix + "adapter_layer_norm_before.")
        linear(prefix + "down_proj.", rank, dim)
        linear(prefix + "up_proj.", dim, rank)
        state[prefix + "scale"] = rand(dim, scale=0.5)

    state["backbone.cls_token"] = rand(1, 1, dim, scale=0.5)
    state["backbone.pos_embed"] = rand(1, shape.tokens, dim, scale=0.5)
    state["backbone.patch_embed.proj.weight"] = rand(dim, 3, shape.patch, shape.patch, scale=1 / (shape.patch * 1.7))
    state["backbone.patch_embed.proj.bias"] = rand(dim, scale=0.1)
    for block in range(shape.depth):
        prefix = f"backbone.blocks.{block}."
        norm(prefix + "norm1.")
        for part in ("q_proj", "k_proj", "v_proj", "proj"):
            linear(prefix + f"attn.{part}.", dim, dim)
        norm(prefix + "norm2.")
        linear(prefix + "fc1.", shape.mlp, dim)
        linear(prefix + "fc2.", dim, shape.mlp)
        moe = f"backbone.adapter.adapter_layer{block}."
        adapter(moe + "shared_adapter.", shape.adapter_dim)
        for task, n_task in enumerate(task_sizes):
            adapter(moe + f"adapter.{task}.", shape.expert_dim)
            linear(moe + f"router.{task}.", task + 1, dim, gain=3.0)
            norm(moe + f"latent_head.{task}.0.")
            linear(moe + f"latent_head.{task}.1.", n_task, dim, gain=2.0)
    norm("backbone.norm.")
    linear("backbone.head.", n_classes, dim)  # the release ViT's unused timm head
    for task, n_task in enumerate(task_sizes):
        state[f"fc.heads.{task}.0.weight"] = rand(n_task, dim, scale=0.02)
    return state


def release_care_config(topk_experts: int = 2, topk_routers: int = 2, train: dict | None = None, **data):
    method = {"name": "care", "brmoe": {"adapter_dim": TINY.adapter_dim, "expert_dim": TINY.expert_dim,
                                        "topk_experts": topk_experts, "topk_routers": topk_routers}, "iter_pred": False}
    return tiny_config(method=method, data={"init_cls": 3, "increment": 2, "synthetic_classes": N_CLASSES, **data},
                       train=train or {})


def save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


# ---------------------------------------------------------------- tiny CLIPs (random open_clip weights) and multi-domain image folders

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


# ---------------------------------------------------------------- every registered method, tiny

@dataclass(frozen=True)
class TinyMethod:
    """A registered method's options that learn two tasks of `tiny_config` in seconds, and a `--set` its options
    (or its constructor) refuse; `clip`: it needs a CLIP backbone (the tiny random one)."""

    options: dict
    invalid: str
    clip: bool = False


PROMPT_TII = {"prompt_length": 2, "tii_epochs": 1, "alignment": {"epochs": 1, "samples_per_class": 4},
              "tii_alignment": {"epochs": 1, "samples_per_class": 4}}
TINY_METHODS: dict[str, TinyMethod] = {
    "acil": TinyMethod({"name": "acil", "buffer_size": 64}, "method.buffer_size=0"),
    "aper_adapter": TinyMethod({"name": "aper_adapter", "first_session": {"adapter": {"bottleneck": 4}}},
                               "method.first_session.tuner=none"),
    "aper_ssf": TinyMethod({"name": "aper_ssf"}, "method.first_session.ssf.init_std=-1"),
    "aper_vpt_deep": TinyMethod({"name": "aper_vpt_deep", "first_session": {"vpt": {"n_prompts": 2}}},
                                "method.first_session.vpt.n_prompts=0"),
    "aper_vpt_shallow": TinyMethod({"name": "aper_vpt_shallow", "first_session": {"vpt": {"n_prompts": 2}}},
                                   "method.first_session.vpt.deep=true"),
    "care": TinyMethod({"name": "care", "brmoe": {"adapter_dim": 4, "expert_dim": 4},
                        "alignment": {"epochs": 1, "samples_per_class": 4}}, "method.brmoe.topk_experts=0"),
    # 2 prompt components cannot give one to each of 3 tasks (refused by the learner, not the options).
    "coda_prompt": TinyMethod({"name": "coda_prompt", "pool_size": 6, "prompt_length": 2, "layers": [0, 1]},
                              "method.pool_size=2"),
    "dualprompt": TinyMethod({"name": "dualprompt", "g_layers": [0], "e_layers": [1], "pool_size": 4, "g_length": 2,
                              "e_length": 2}, "method.e_layers=[7]"),
    "ease": TinyMethod({"name": "ease", "adapter": {"bottleneck": 4}}, "method.adapter.bottleneck=0"),
    "fecam": TinyMethod({"name": "fecam"}, "method.alpha1=-1"),
    "hide_prompt": TinyMethod({"name": "hide_prompt", **PROMPT_TII}, "method.pool_size=2"),
    "l2p": TinyMethod({"name": "l2p", "pool_size": 4, "top_k": 2, "prompt_length": 2}, "method.top_k=9"),
    "linear_probe": TinyMethod({"name": "linear_probe"}, "method.C=0"),
    "moal": TinyMethod({"name": "moal", "adapter": {"bottleneck": 4}, "hidden": 48, "progressive_epochs": 1,
                        "calibration_epochs": 2}, "method.hidden=0"),
    "min": TinyMethod({"name": "min", "noise": {"hidden": 8}, "buffer_size": 64, "fit_epochs": 1, "fit_batch_size": 16,
                       "later_epochs": 1}, "method.buffer_size=0"),
    "moe_adapters": TinyMethod({"name": "moe_adapters"}, "method.moe.top_k=3", clip=True),
    "mos": TinyMethod({"name": "mos", "adapter": {"bottleneck": 4},
                       "alignment": {"epochs": 1, "scheduler_t_max": 1, "samples_per_class": 4}}, "method.refine_hops=-1"),
    "norga": TinyMethod({"name": "norga", **PROMPT_TII}, "method.pool_size=2"),
    "ranpac": TinyMethod({"name": "ranpac", "projection_dim": 64, "first_session": {"adapter": {"bottleneck": 4}}},
                         "method.projection_dim=-1"),
    "sema": TinyMethod({"name": "sema", "sema": {"bottleneck": 4, "rd_dim": 8, "threshold": 0.0}, "rd_epochs": 1,
                        "detect_batch_size": 16}, "method.sema.first_expandable=5"),
    "simplecil": TinyMethod({"name": "simplecil"}, "method.cache_features=7"),
    "slca": TinyMethod({"name": "slca", "milestones": [3], "alignment": {"epochs": 1, "scheduler_t_max": 1,
                                                                          "samples_per_class": 4}}, "method.milestones=[0]"),
    "ssiat": TinyMethod({"name": "ssiat", "adapter": {"bottleneck": 4}, "later_epochs": 1,
                         "alignment": {"epochs": 1, "samples_per_class": 4}}, "method.shift_sigma=0"),
    "tuna": TinyMethod({"name": "tuna", "adapter": {"bottleneck": 4},
                        "alignment": {"epochs": 1, "samples_per_class": 4}}, "method.scale=0"),
}


def tiny_method_config(name: str, **sections):
    """`tiny_config` (or `clip_config` for a CLIP method) with the method's tiny options."""
    tiny = TINY_METHODS[name]
    if tiny.clip:
        return clip_config(tiny.options, **sections)
    return tiny_config(method=tiny.options, **sections)
