"""Compare carecl's TUNA with the authors' code (up to commit 77d4f10, kept in Ngahoang2005/ICCV2025-TUNA) on a tiny ViT.

    git clone https://github.com/Ngahoang2005/ICCV2025-TUNA /tmp/tuna_ref && git -C /tmp/tuna_ref checkout 77d4f10
    python scripts/compare_tuna_reference.py --reference /tmp/tuna_ref

Their ViT (backbone/vit_tuna.py) gets the weights of carecl's tiny timm ViT, 12 blocks deep because their
orthogonality loss hard-codes 12; their working adapters and heads get carecl's initial ones. Their learner's own
`_train` (CosFace + orthogonality training, adapter snapshot, EMR merge, class statistics, classifier alignment)
and `_eval_cnn` (entropy selection + universal logits), compiled from models/tuna.py and run on a bare learner,
then learn three tasks from the same fixed batches as carecl's TUNA, dropout off in both. Per task the script
reports the largest differences of the working adapters, each task's stored set, the merged (universal) set, the
heads and the class statistics; at the end the predictions over a test set, and which adapters their evaluation
actually runs for the universal logits. Classifier alignment samples from the Gaussians with its own RNG and is
left out of the training comparison (epochs 0 on both sides); the means their alignment samples around (the
decay of older classes) are recorded from one run of their `classifer_align` and compared with carecl's.
Results go to benchmarks/results/tuna_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from carecl.alignment import decay_scales  # noqa: E402
from carecl.engine import Experiment  # noqa: E402
from carecl.methods.base import TaskContext  # noqa: E402
from helpers import tiny_config  # noqa: E402
from reference_tools import ClassData, adapter_diff, bare_class, load_pilot_vit, max_diff, task_data, train_ours  # noqa: E402

VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 12, "num_heads": 2}
BATCH, EPOCHS, LR, WEIGHT_DECAY, PER_CLASS, SCALE, MARGIN, REG = 4, 2, 0.05, 5e-4, 8, 20.0, 0.1, 0.5
OPTIONS = {"name": "tuna", "adapter": {"bottleneck": 16, "dropout": 0.0}, "scale": SCALE, "margin": MARGIN,
           "orthogonality_weight": REG, "alignment": {"epochs": 0}}


def import_reference(reference: Path):
    import timm.layers.weight_init
    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # their timm 0.6 path
    sys.path.insert(0, str(reference))
    from backbone import linears, vit_tuna
    return vit_tuna, linears


def their_network(reference: Path, method):
    vit_tuna, linears = import_reference(reference)
    config = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                             ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=16,
                             d_model=VIT["embed_dim"], vpt_on=False, vpt_num=0, _device="cpu")
    vit = vit_tuna.VisionTransformer(img_size=VIT["img_size"], patch_size=VIT["patch_size"], embed_dim=VIT["embed_dim"],
                                     depth=VIT["depth"], num_heads=VIT["num_heads"], num_classes=0, qkv_bias=True,
                                     tuning_config=config)
    width = VIT["embed_dim"]
    load_pilot_vit(vit, method.backbone.state_dict(), width)
    for name, parameter in vit.named_parameters():  # their vit_base_patch16_224_in21k_adapter freezes all but these
        parameter.requires_grad = "head" in name or "adapter" in name
    for ours, theirs in zip(method.working.adapters, vit.cur_adapter):
        theirs.down_proj.load_state_dict(ours.down.state_dict())
        theirs.up_proj.load_state_dict(ours.up.state_dict())
        theirs.dropout = 0.0
    namespace = {"nn": nn, "torch": torch, "SimpleContinualLinear": linears.SimpleContinualLinear,
                 "get_backbone": lambda args, pretrained: vit}
    network_class = bare_class(reference / "utils" / "inc_net.py", "TUNANet",
                               ("__init__", "feature_dim", "update_fc", "generate_fc", "forward"), namespace,
                               bases="nn.Module")
    network = network_class({"device": ["cpu"]}, True)
    vit.out_dim = width  # their TUNANet hard-codes ViT-B's 768
    return network


class RecordedNormal:
    """Stands in for MultivariateNormal in their alignment: records each class's mean and draws zeros."""

    means: list[torch.Tensor] = []

    def __init__(self, mean, covariance) -> None:
        RecordedNormal.means.append(mean.detach().clone())
        self.mean = mean

    def sample(self, sample_shape):
        return torch.zeros(*sample_shape, self.mean.shape[0])


def their_learner(reference: Path, method):
    import_reference(reference)
    from models.tuna import AngularPenaltySMLoss
    quiet_loader = lambda dataset, batch_size, shuffle, num_workers=0: DataLoader(dataset, batch_size, shuffle=shuffle)  # noqa: E731
    namespace = {"torch": torch, "F": F, "np": np, "nn": nn, "optim": optim, "tqdm": partial(tqdm, disable=True),
                 "DataLoader": quiet_loader, "logging": logging, "MultivariateNormal": RecordedNormal,
                 "AngularPenaltySMLoss": AngularPenaltySMLoss,
                 "tensor2numpy": lambda x: x.cpu().data.numpy() if torch.is_tensor(x) else np.asarray(x)}
    learner = bare_class(reference / "models" / "tuna.py", "Learner",
                         ("_train", "get_optimizer", "get_scheduler", "_init_train", "orth_loss", "_compute_mean",
                          "classifer_align", "_eval_cnn1", "_eval_cnn"), namespace)()
    learner._network = their_network(reference, method)
    learner.args = {"tuned_epoch": EPOCHS, "optimizer": "sgd", "scheduler": "cosine", "reg": REG, "scale": SCALE,
                    "m": MARGIN, "ca_storage_efficient_method": "covariance", "decay": True}
    learner.batch_size, learner.init_lr, learner.weight_decay, learner.min_lr = BATCH, LR, WEIGHT_DECAY, 0.0
    learner.use_orth, learner.crct_epochs, learner.ca_lr = True, 0, 0.005
    learner._device, learner.cls_mean, learner.cls_cov, learner.topk = "cpu", {}, {}, 1
    learner._cur_task, learner._known_classes, learner._total_classes = -1, 0, 0
    learner.classifer_align = lambda model: None  # their loop cannot run 0 epochs (it logs a variable it never set)
    return learner


def learn_theirs(learner, task, images, labels, batches, ours_head: torch.Tensor) -> None:
    """Their incremental_train and after_task, without their data manager."""
    learner._cur_task += 1
    learner._total_classes = task.high
    learner._network.update_fc(task.size)
    learner._network.fc.heads[-1][0].weight.data.copy_(ours_head)
    learner.data_manager = ClassData(images, labels)
    learner._train([(None, x, y) for x, y in batches], None)
    learner._known_classes = task.high


def compare(reference: Path) -> dict:
    torch.manual_seed(0)
    config = tiny_config(method=OPTIONS, backbone={"name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": VIT},
                         train={"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "weight_decay": WEIGHT_DECAY,
                                "optimizer": "sgd", "momentum": 0.9, "min_lr": 0.0})
    experiment = Experiment.build(config)
    method = experiment.method
    learner = their_learner(reference, method)
    generator, results = torch.Generator().manual_seed(1), {"tasks": []}
    for task in method.scenario.tasks():
        images, labels, batches = task_data(task, generator, PER_CLASS, VIT["img_size"], BATCH)
        method.begin_task(task)
        initial_head = method.classifier.heads[-1].detach().clone()
        train_ours(method, experiment, task, batches)
        context = TaskContext(task, experiment.scenario, torch.device("cpu"), lambda: [(images, labels)])
        method.finish_task(context)
        learn_theirs(learner, task, images, labels, batches, initial_head)
        backbone, classes = learner._network.backbone, range(task.low, task.high)
        row = {
            "working_adapters": adapter_diff(method.working.adapters, backbone.cur_adapter),
            "task_specific_sets": max(adapter_diff(method.bank.sets[t], backbone.adapter_list[t]) for t in range(task.index + 1)),
            "heads": max(max_diff(ours, theirs[0].weight) for ours, theirs in zip(method.classifier.heads, learner._network.fc.heads)),
            "class_means": max(max_diff(method.statistics.mean(c), learner.cls_mean[c]) for c in classes),
            "class_covariances": max(max_diff(method.statistics.covariance(c), learner.cls_cov[c]) for c in classes),
            "largest_adapter_weight": max(a.up.weight.abs().max().item() for a in method.working.adapters),
        }
        if task.index > 0:
            row["merged_universal_set"] = adapter_diff(method.merged.sets[0], backbone.merged_adapter)
        results["tasks"].append(row)
        if task.index == 0:
            first_set = [p.detach().clone() for p in method.bank.sets[0].parameters()]
    # Their penalty trains the finished sets' up projections (and weight decay shrinks them): how far task 0's moved.
    results["task0_set_moved_since_task0"] = max(max_diff(a, b) for a, b in zip(first_set, method.bank.sets[0].parameters()))
    results.update(compare_evaluation(method, learner, generator))
    results["alignment_mean_scales"] = compare_decay(method, learner)
    return results


def compare_evaluation(method, learner, generator) -> dict:
    labels = torch.arange(method.n_seen_classes).repeat_interleave(6)
    images = torch.rand(len(labels), 3, VIT["img_size"], VIT["img_size"], generator=generator)
    images += labels[:, None, None, None] * 0.05
    theirs, _ = learner._eval_cnn([(None, images[i:i + 8], labels[i:i + 8]) for i in range(0, len(labels), 8)])
    method.eval()
    backbone, last = learner._network.backbone, learner._cur_task
    with torch.no_grad():
        ours = method.predict(images).argmax(1).numpy()
        universal_id = backbone(images, adapter_id=last + 1, train=False)["features"]  # the id their _eval_cnn passes
        with method.working.bypassed(), method.bank.using(last):
            last_set = method.backbone(images)
        with method.working.bypassed(), method.merged.using(0):
            merged = method.backbone(images)
        merged_id = backbone(images, adapter_id=last + 2, train=False)["features"]  # an id past their list: the merge
        method.options.universal_adapter = "merged"
        with_merge = method.predict(images).argmax(1).numpy()
        method.options.universal_adapter = "latest"
    return {
        "test_images": len(labels),
        "predictions_equal_their_eval_cnn": int((ours == theirs[:, 0]).sum()),
        "their_universal_features_vs_the_last_task_set": max_diff(universal_id, last_set),
        "their_universal_features_vs_the_merged_set": max_diff(universal_id, merged),
        "their_merged_adapter_features_vs_ours": max_diff(merged_id, merged),
        "predictions_with_merged_universal_equal_their_eval_cnn": int((with_merge == theirs[:, 0]).sum()),
    }


def compare_decay(method, learner) -> float:
    """Their classifer_align's sampling means over their stored means against carecl's decay_scales ("release")."""
    RecordedNormal.means.clear()
    learner.crct_epochs = 1
    learner._known_classes = method.scenario.boundaries[-2]  # as during the last task's alignment
    type(learner).classifer_align(learner, learner._network.backbone)
    stored = [learner.cls_mean[c].double() for c in range(len(RecordedNormal.means))]
    theirs = torch.stack([(mean.double() @ m) / (m @ m) for mean, m in zip(RecordedNormal.means, stored)])
    last = method.scenario.tasks()[-1]
    ours = decay_scales(method.scenario.task_of_class()[:last.high], last.index, "release", last.size)
    return max_diff(ours, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of Ngahoang2005/ICCV2025-TUNA at 77d4f10")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    results = compare(args.reference.resolve())
    path = ROOT / "benchmarks" / "results" / "tuna_reference.json"
    path.write_text(json.dumps({"reference": "Ngahoang2005/ICCV2025-TUNA @ 77d4f10 (the authors' commits)", "vit": VIT,
                                "batch_size": BATCH, "epochs": EPOCHS, "margin": MARGIN, "reg": REG,
                                "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
