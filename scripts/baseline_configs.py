"""Write configs/<method>/*.yaml: the published settings of the frozen-feature baselines.

    python scripts/baseline_configs.py

Every value comes from the authors' experiment files (cited in each YAML's header) or, where a
method has none for a benchmark, is marked as carecl's choice. Backbones: `vit_base_patch16_224.augreg_in21k`
is what those codes call `vit_base_patch16_224_in21k`; `vit_base_patch16_224.augreg_in21k_ft_in1k` is
timm 0.6's plain `vit_base_patch16_224` (ImageNet-21K pre-trained, ImageNet-1K fine-tuned), which
LAMDA-PILOT and RanPAC load as `pretrained_vit_b16_224`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
IN21K = "vit_base_patch16_224.augreg_in21k"
IN1K_FT = "vit_base_patch16_224.augreg_in21k_ft_in1k"

# carecl dataset name -> (file stem used in configs/)
DATASETS = {"cifar100": "cifar100", "cub": "cub", "imagenet-a": "imagenet-a", "imagenet-r": "imagenet-r",
            "objectnet": "objectnet", "omnibenchmark": "omnibenchmark", "vtab": "vtab"}


def experiment(dataset: str, init: int, increment: int, backbone: str, train: dict, method: dict, *,
               shuffle: bool = True, transforms: str | None = "pilot_wide_crop", crop_pct: float | None = None) -> dict:
    data = {"dataset": dataset, "root": "data", "init_cls": init, "increment": increment, "shuffle": shuffle}
    if transforms:
        data["transforms"] = transforms
    if crop_pct is not None:
        data["crop_pct"] = crop_pct
    return {"seed": 1993, "data": data, "backbone": {"name": backbone, "pretrained": True},
            "train": {"optimizer": "sgd", "momentum": 0.9, "min_lr": 0.0, **train}, "method": method}


def split_name(init: int, increment: int) -> str:
    return f"b{0 if init == increment else init}inc{increment}"


def write(method: str, config: dict, header: list[str]) -> Path:
    data = config["data"]
    path = ROOT / "configs" / method / f"{DATASETS[data['dataset']]}_{split_name(data['init_cls'], data['increment'])}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------- APER (zhoudw-zdw/RevisitingCIL, exps/aper_*)

APER_SPLITS = {"cifar100": (5, "cifar224_5_5"), "cub": (10, "cub_10_10"), "imagenet-a": (10, "imageneta_10_10"),
               "imagenet-r": (5, "imagenetr_5_5"), "objectnet": (10, "objectnet_10_10"),
               "omnibenchmark": (30, "omni_30_30"), "vtab": (10, "vtab_10_10")}
# (epochs, lr, batch, weight decay) per variant and dataset, where they differ from (20, 0.01, 48, 5e-4).
APER_EXCEPTIONS = {
    ("adapter", "imagenet-r"): (20, 0.05, 24, 0.005),
    **{("vpt_deep", d): (5, 0.05, 16, 5e-4) for d in ("cifar100", "cub", "imagenet-a", "imagenet-r", "vtab")},
    ("vpt_deep", "objectnet"): (20, 0.01, 128, 5e-4),
}
APER_FILES = {"adapter": "aper_adapter/{stem}_vit-b_adapter.json", "ssf": "aper_ssf/{stem}_vit-b_ssf.json",
              "vpt_shallow": "aper_vpt-shallow/{stem}_vit-b_vpt-shallow.json",
              "vpt_deep": "aper_vpt-deep/{stem}_vit-b_vpt-deep.json"}


def aper() -> list[Path]:
    paths = []
    for tuner, source in APER_FILES.items():
        for dataset, (increment, stem) in APER_SPLITS.items():
            epochs, lr, batch, decay = APER_EXCEPTIONS.get((tuner, dataset), (20, 0.01, 48, 5e-4))
            first_session = {"tuner": tuner}
            if tuner == "adapter":
                first_session["adapter"] = {"bottleneck": 64}
            if tuner.startswith("vpt"):
                first_session["vpt"] = {"n_prompts": 5}
            method = {"name": f"aper_{tuner}", "first_session": first_session}
            config = experiment(dataset, increment, increment, IN21K,
                                {"epochs": epochs, "lr": lr, "batch_size": batch, "weight_decay": decay}, method,
                                shuffle=dataset != "vtab")
            paths.append(write(f"aper_{tuner}", config, [
                f"APER ({tuner}) on {dataset}, B0 Inc{increment}: the authors' zhoudw-zdw/RevisitingCIL "
                f"exps/{source.format(stem=stem)}.",
                "Backbone: their pretrained_vit_b16_224_in21k (timm 0.6 vit_base_patch16_224_in21k = augreg_in21k).",
                "Transforms: their build_transform (random resized crop 0.05-1 + flip; resize 256 bicubic, crop 224; "
                "no normalisation).",
            ]))
    return paths


# ---------------------------------------------------------------- RanPAC (RanPAC/RanPAC, args/*_publish.csv, row 7)

RANPAC = {  # dataset: (init = increment, tuner, backbone, shuffle, test crop fraction)
    "cifar100": (10, "adapter", IN21K, True, 1.0),
    "imagenet-r": (20, "ssf", IN1K_FT, True, None),
    "imagenet-a": (20, "ssf", IN1K_FT, True, None),
    "cub": (20, "adapter", IN1K_FT, True, None),
    "omnibenchmark": (30, "vpt_deep", IN21K, True, None),
    "vtab": (10, "ssf", IN1K_FT, False, None),
}


def ranpac() -> list[Path]:
    paths = []
    csv = {"cifar100": "cifar224", "imagenet-r": "imagenetr", "imagenet-a": "imageneta", "cub": "cub",
           "omnibenchmark": "omnibenchmark", "vtab": "vtab"}
    for dataset, (increment, tuner, backbone, shuffle, crop) in RANPAC.items():
        first_session = {"tuner": tuner, "adapter": {"bottleneck": 64}, "vpt": {"n_prompts": 5}}
        method = {"name": "ranpac", "first_session": first_session, "projection_dim": 10000}
        config = experiment(dataset, increment, increment, backbone,
                            {"epochs": 20, "lr": 0.01, "batch_size": 48, "weight_decay": 5e-4}, method,
                            shuffle=shuffle, crop_pct=crop)
        paths.append(write("ranpac", config, [
            f"RanPAC on {dataset}, B0 Inc{increment}: the authors' RanPAC/RanPAC args/{csv[dataset]}_publish.csv, row 7 "
            f"(first-session {tuner}, use_RP, M = 10000).",
            f"Backbone: their {'pretrained_vit_b16_224' if backbone == IN1K_FT else 'pretrained_vit_b16_224_in21k'} "
            f"({backbone}). body_lr = head_lr = 0.01.",
            "Transforms: their build_transform (random resized crop 0.05-1 + flip; resize 256 bicubic, crop 224, "
            "CIFAR resized to 224; no normalisation).",
        ]))
    return paths


# ---------------------------------------------------------------- FeCAM (dipamgoswami/FeCAM, FeCAM_vit_*.py)

def fecam() -> list[Path]:
    paths = []
    for dataset, increment, script in (("cifar100", 10, "FeCAM_vit_cifar100.py"), ("imagenet-r", 20, "FeCAM_vit_imagenet-r.py")):
        config = experiment(dataset, increment, increment, IN21K, {"epochs": 0, "batch_size": 128},
                            {"name": "fecam", "alpha1": 10.0, "alpha2": 10.0}, transforms="pilot_wide_crop")
        paths.append(write("fecam", config, [
            f"FeCAM on {dataset}, B0 Inc{increment}: the authors' dipamgoswami/FeCAM {script} (frozen ViT-B/16 IN-21K, "
            "alpha1 = alpha2 = 10).",
            "Their ImageNet-R script splits each class 80/20 itself; here the dataset's own train/test split is used.",
            "Features: resize 256, centre crop 224, no normalisation (the recipe's test transform; nothing is trained).",
        ]))
    return paths


# ---------------------------------------------------------------- SLCA (LAMDA-PILOT exps/slca*.json)

def slca() -> list[Path]:
    paths = []
    for dataset, increment, epochs, milestones, source in (("cifar100", 10, 20, [18], "exps/slca.json"),
                                                            ("imagenet-r", 20, 5, [40], "exps/slca_inr.json")):
        method = {"name": "slca", "backbone_lr_scale": 0.01, "milestones": milestones, "lr_decay": 0.1,
                  "logit_norm": 0.1, "alignment": {"epochs": 3, "lr": 0.01, "scheduler_t_max": 3,
                                                   "samples_per_class": 256, "decay": True,
                                                   "decay_formula": "equal_tasks"}}
        config = experiment(dataset, increment, increment, IN1K_FT,
                            {"epochs": epochs, "lr": 0.01, "batch_size": 64, "weight_decay": 5e-4}, method)
        paths.append(write("slca", config, [
            f"SLCA on {dataset}, B0 Inc{increment}: LAMDA-PILOT {source} (lrate 0.01, bcb_lrscale 0.01, "
            f"milestones {milestones}, ca_epochs 3, ca_with_logit_norm 0.1).",
            "Backbone: PILOT's vit_base_patch16_224 (timm 0.6 default: augreg_in21k_ft_in1k).",
            "Transforms: PILOT's build_transform (random resized crop 0.05-1 + flip; resize 256, crop 224; no "
            "normalisation).",
        ]))
    return paths


# ---------------------------------------------------------------- ACIL (no published ViT setting)

def acil() -> list[Path]:
    paths = []
    for dataset, increment in (("cifar100", 10), ("imagenet-r", 20), ("imagenet-a", 20), ("objectnet", 10),
                               ("omnibenchmark", 30), ("vtab", 10)):
        config = experiment(dataset, increment, increment, IN21K, {"epochs": 0, "batch_size": 128},
                            {"name": "acil", "buffer_size": 8192, "gamma": 0.1}, shuffle=dataset != "vtab")
        paths.append(write("acil", config, [
            f"ACIL on {dataset}, B0 Inc{increment}: the authors' defaults (ZHUANGHP/Analytic-continual-learning "
            "config.py: buffer 8192, gamma 0.1) on the frozen ViT-B/16 IN-21K.",
            "No ViT setting is published by ACIL's authors: the split and backbone are carecl's choice (the CaRE "
            "tables' protocol); nothing is trained.",
        ]))
    return paths


def main() -> None:
    for make in (aper, ranpac, fecam, slca, acil):
        for path in make():
            print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
