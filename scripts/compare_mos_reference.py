"""Compare carecl's MOS with the authors' code (sun-hailong/AAAI25-MOS) on a tiny ViT with shared weights.

    git clone https://github.com/sun-hailong/AAAI25-MOS /tmp/mos_ref
    python scripts/compare_mos_reference.py --reference /tmp/mos_ref

Their ViT (backbone/vit_mos.py) gets carecl's tiny timm ViT weights, their head carecl's head and their
working adapters carecl's. Their Learner's own methods (`_init_train`, `orth_loss`, `_compute_mean`,
`replace_fc`, `_eval_cnn`, taken from models/mos.py and run on a bare learner: the module imports the whole
PILOT tree) then learn the same three tasks from the same fixed batches as carecl's MOS, dropout off in
both. Per task the script reports the largest differences of: the working adapters after training (every
step merges twice); the class means and covariances (per-class batches, one merge each); the working
adapters after those merges; the prototypes. After the last task it runs their `_eval_cnn` twice over a
test set (the first pass merges their stored adapters towards the earlier snapshots, once per batch), then
compares their stored adapters with carecl's inference sets (the limit of those merges) and the predictions.
Classifier alignment samples from the Gaussians with its own RNG and is left out (epochs 0 on both sides).
Results go to benchmarks/results/mos_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.distributions.multivariate_normal import MultivariateNormal
from torch.utils.data import DataLoader
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from carecl.engine import Experiment  # noqa: E402
from carecl.methods.base import TaskContext  # noqa: E402
from helpers import TINY_VIT, tiny_config  # noqa: E402
from reference_tools import ClassData, adapter_diff, bare_class, load_pilot_vit, max_diff, task_data, train_ours  # noqa: E402

BATCH, EPOCHS, LR, WEIGHT_DECAY, PER_CLASS = 4, 2, 0.05, 0.005, 10
OPTIONS = {"name": "mos", "adapter": {"bottleneck": 4, "dropout": 0.0}, "alignment": {"epochs": 0}}


def reference_network(reference: Path, method) -> nn.Module:
    """Their MOSNet around their ViT with our ViT's weights (their q/k/v split and MLP names)."""
    from backbone import linears, vit_mos
    config = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                             ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=4,
                             d_model=TINY_VIT["embed_dim"], vpt_on=False, vpt_num=0, _device="cpu",
                             adapter_momentum=method.options.merge_momentum)
    vit = vit_mos.VisionTransformer(img_size=TINY_VIT["img_size"], patch_size=TINY_VIT["patch_size"],
                                    embed_dim=TINY_VIT["embed_dim"], depth=TINY_VIT["depth"], num_heads=TINY_VIT["num_heads"],
                                    num_classes=method.head.out_features, qkv_bias=True, tuning_config=config)
    width = TINY_VIT["embed_dim"]
    load_pilot_vit(vit, method.backbone.state_dict(), width,
                   {"head.weight": method.head.weight.data.clone(), "head.bias": method.head.bias.data.clone()})
    for name, parameter in vit.named_parameters():  # their vit_base_patch16_224_mos freezes all but these
        parameter.requires_grad = "head" in name or "adapter" in name
    for ours, theirs in zip(method.working.adapters, vit.cur_adapter):
        theirs.down_proj.load_state_dict(ours.down.state_dict())
        theirs.up_proj.load_state_dict(ours.up.state_dict())
        theirs.dropout = 0.0
    namespace = {"nn": nn, "copy": copy, "torch": torch, "CosineLinear": linears.CosineLinear,
                 "get_backbone": lambda args, pretrained: vit}
    network_class = bare_class(reference / "utils" / "inc_net.py", "MOSNet",
                               ("__init__", "feature_dim", "update_fc", "generate_fc", "forward_orig", "forward"),
                               namespace, bases="nn.Module")
    network = network_class({"device": ["cpu"]}, True)
    vit.out_dim = width
    return network


def reference_learner(reference: Path, method):
    namespace = {"torch": torch, "F": F, "np": np, "nn": nn, "optim": optim, "tqdm": tqdm, "DataLoader": DataLoader,
                 "logging": logging, "MultivariateNormal": MultivariateNormal,
                 "tensor2numpy": lambda x: x.cpu().data.numpy() if torch.is_tensor(x) else np.asarray(x)}
    learner_class = bare_class(reference / "models" / "mos.py", "Learner",
                               ("get_optimizer", "get_scheduler", "_init_train", "orth_loss", "_compute_mean",
                                "replace_fc", "_eval_cnn"), namespace)
    learner = learner_class()
    learner._network = reference_network(reference, method)
    learner.args = {"tuned_epoch": EPOCHS, "optimizer": "sgd", "scheduler": "cosine", "reg": method.options.orthogonality_weight,
                    "adapter_momentum": method.options.merge_momentum, "ca_storage_efficient_method": "covariance"}
    learner.batch_size, learner.init_lr, learner.weight_decay, learner.min_lr = BATCH, LR, WEIGHT_DECAY, 0.0
    learner._device, learner.cls_mean, learner.cls_cov, learner.cls2task = "cpu", {}, {}, {}
    learner._cur_task, learner._known_classes, learner._total_classes = -1, 0, 0
    learner.ensemble, learner.topk = True, 1
    return learner


def our_context(experiment, task, images, labels) -> TaskContext:
    def class_batches(size):
        return [(images[labels == c][i:i + size], labels[labels == c][i:i + size])
                for c in range(task.low, task.high) for i in range(0, PER_CLASS, size)]
    return TaskContext(task, experiment.scenario, torch.device("cpu"), lambda: [(images, labels)],
                       class_batch_loader=class_batches)


def learn_theirs(learner, task, images, labels, batches, data) -> None:
    learner._cur_task += 1
    learner._total_classes = task.high
    for c in range(task.low, task.high):
        learner.cls2task[c] = task.index
    learner._network.update_fc(task.high)
    learner.data_manager = data
    learner.train_dataset = SimpleNamespace(labels=labels.numpy())
    learner.train_loader_for_protonet = [(None, images, labels)]
    backbone = learner._network.backbone
    optimizer = learner.get_optimizer(backbone)
    scheduler = learner.get_scheduler(optimizer)
    learner._init_train([(None, x, y) for x, y in batches], None, optimizer, scheduler)
    backbone.adapter_update()
    learner.after_training_cur = copy.deepcopy(backbone.cur_adapter)
    learner._compute_mean(backbone)
    learner.replace_fc()
    learner._known_classes = task.high


def compare(reference: Path) -> dict:
    sys.path.insert(0, str(reference))
    torch.manual_seed(0)
    config = tiny_config(method=OPTIONS, train={"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "weight_decay": WEIGHT_DECAY,
                                               "min_lr": 0.0})
    experiment = Experiment.build(config)
    method = experiment.method
    learner = reference_learner(reference, method)
    generator, results = torch.Generator().manual_seed(1), {"tasks": []}
    for task in method.scenario.tasks():
        images, labels, batches = task_data(task, generator, PER_CLASS, TINY_VIT["img_size"], BATCH)
        method.begin_task(task)
        train_ours(method, experiment, task, batches)
        after_training = copy.deepcopy(method.working.adapters)
        method.finish_task(our_context(experiment, task, images, labels))
        learn_theirs(learner, task, images, labels, batches, ClassData(images, labels))
        backbone = learner._network.backbone
        classes = range(task.low, task.high)
        results["tasks"].append({
            "working_adapters_after_training": adapter_diff(after_training, learner.after_training_cur),
            "class_means": max(max_diff(method.statistics.mean(c), learner.cls_mean[c]) for c in classes),
            "class_covariances": max(max_diff(method.statistics.covariance(c), learner.cls_cov[c]) for c in classes),
            "working_adapters_after_statistics": adapter_diff(method.working.adapters, backbone.cur_adapter),
            "prototypes": max_diff(method.prototypes[task.low:task.high], learner._network.fc.weight.data[task.low:task.high]),
            "head": max_diff(method.head.weight, backbone.head.weight),
        })
    results.update(compare_evaluation(method, learner, generator))
    return results


def compare_evaluation(method, learner, generator) -> dict:
    n_classes = method.n_seen_classes
    labels = torch.arange(n_classes).repeat_interleave(6)
    images = torch.rand(len(labels), 3, TINY_VIT["img_size"], TINY_VIT["img_size"], generator=generator)
    images += labels[:, None, None, None] * 0.05
    loader = [(None, images[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, len(labels), BATCH)]
    first_pass, _ = learner._eval_cnn(loader)  # merges their stored adapters once per batch
    for _ in range(10):
        learner._eval_cnn(loader)
    settled, _ = learner._eval_cnn(loader)
    method.eval()
    with torch.no_grad():
        ours = method.predict(images).argmax(1).numpy()
    stored = learner._network.backbone.adapter_list
    return {
        "inference_adapters_vs_their_stored_after_evaluation": max(adapter_diff(method.bank.sets[t], stored[t])
                                                                  for t in range(method.n_learned_tasks)),
        "test_images": len(labels),
        "predictions_equal_their_settled_evaluation": int((ours == settled[:, 0]).sum()),
        "predictions_equal_their_first_evaluation": int((ours == first_pass[:, 0]).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of sun-hailong/AAAI25-MOS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    results = compare(args.reference.resolve())
    path = ROOT / "benchmarks" / "results" / "mos_reference.json"
    path.write_text(json.dumps({"reference": "sun-hailong/AAAI25-MOS", "tiny_vit": TINY_VIT, "batch_size": BATCH,
                                "epochs": EPOCHS, "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
