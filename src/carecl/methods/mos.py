"""MOS ("MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning", Sun et al., AAAI 2025;
code sun-hailong/AAAI25-MOS, also in LAMDA-PILOT): one set of parallel adapters is carried from task to
task and trained again on each, with a linear head over every class of the stream (the current task's
logits only) and an orthogonality loss that keeps the batch's features apart from the stored class means.

Adapter merging: while task t trains, the working set is pulled towards the mean of the snapshots of tasks
0..t-1, θ <- (1 - m) θ + m · mean(snapshots), as the authors' code does it: their training forward merges
every block's adapter once before EACH block runs (block L runs after L + 1 merges, a forward leaves D
merges on every block of a depth-D ViT), and each optimiser step is followed by one more merge. A snapshot
of the working set is kept at the end of each task. The class statistics are then computed class by class
(batches of 3 x the batch size) with the same merging forward. From the second task on, the head is
aligned on features sampled from the class Gaussians.

Inference (self-refined adapter retrieval): the first task's adapters and cosine prototypes guess the
task; the head, run on the feature through the guessed task's adapters, names a task again, up to three
hops until it stops moving; the answer is softmax(head) + softmax(T · prototype cosines). Task t's
adapters at inference are the mean of snapshots 0..t-1 (snapshot 0 for t = 0): the authors' evaluation
merges each stored set in place towards that mean D times per test batch, so after its first batch or two
it uses exactly this limit (`inference_adapters: snapshots` uses the raw snapshots instead). Only the
adapters an image's retrieval visits are run (at most four, one batched forward per hop), never all T.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.alignment_config import AlignmentConfig
from carecl.classifiers import linear_head
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, ParameterGroup, Phase, StateHolder, StepOutput, TaskContext, register_method
from carecl.methods.regularisers import orthogonality_loss
from carecl.scenario import Scenario, Task
from carecl.statistics import ClassFeatureSums, GaussianClassStatistics
from carecl.tuners.adapter import FLAT_ADAPTER_KEYS, AdapterConfig, ParallelAdapterInjector
from carecl.tuners.adapter_bank import AdapterBankInjector



def mos_alignment() -> AlignmentConfig:
    """The authors' `classifer_align`: 30 epochs at `ca_lr` 0.005, cosine over all of them, 5 x batch
    size samples per class, no decay of old means (their YAMLs set weight decay to `weight_decay`)."""
    return AlignmentConfig(epochs=30, lr=0.005, scheduler_t_max=30, samples_per_class=None, decay=False)


@dataclass
class MOSConfig(MethodConfig):
    name: str = "mos"
    # The carried adapters (`ffn_num`; scale 0.1, no LayerNorm, dropout 0.1 in their ViT).
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(bottleneck=16))
    # m of the merge towards the mean of earlier snapshots (`adapter_momentum`); 0 turns merging off.
    merge_momentum: float = 0.1
    # Weight of the orthogonality loss (`reg`) and its temperature (0.8 in the code).
    orthogonality_weight: float = 0.1
    orthogonality_temperature: float = 0.8
    # The head trains at lr x this (the code's `init_lr * 0.1`).
    head_lr_scale: float = 0.1
    # Class statistics read each class in batches of this many x `train.batch_size` (3 in the code).
    statistics_batch_factor: int = 3
    covariance_ridge: float = 1e-4
    # Hops of self-refinement after the prototype guess (their MAX_ITER = 4 forwards, so 3 hops).
    refine_hops: int = 3
    # Add softmax(T · prototype cosines) to the head's softmax (`ensemble`).
    ensemble: bool = True
    # "merged": task t's adapters at inference are the mean of snapshots 0..t-1, the limit the authors'
    # evaluation reaches (module docstring); "snapshots": each task's own snapshot.
    inference_adapters: Literal["merged", "snapshots"] = "merged"
    alignment: AlignmentConfig = field(default_factory=mos_alignment)

    moved_keys = FLAT_ADAPTER_KEYS

    def validate(self) -> None:
        require(0.0 <= self.merge_momentum <= 1.0, "merge_momentum", f"must be in [0, 1], got {self.merge_momentum}")
        require(self.orthogonality_weight >= 0, "orthogonality_weight", f"must be >= 0, got {self.orthogonality_weight}")
        require(self.orthogonality_temperature > 0, "orthogonality_temperature",
                f"must be positive, got {self.orthogonality_temperature}")
        require(self.head_lr_scale >= 0, "head_lr_scale", f"must be >= 0, got {self.head_lr_scale}")
        require(self.statistics_batch_factor > 0, "statistics_batch_factor",
                f"must be positive, got {self.statistics_batch_factor}")
        require(self.covariance_ridge >= 0, "covariance_ridge", f"must be >= 0, got {self.covariance_ridge}")
        require(self.refine_hops >= 0, "refine_hops", f"must be >= 0, got {self.refine_hops}")
        self.alignment.validate()


def merge_towards_mean(blocks: list[tuple[list[Tensor], list[Tensor]]], times: list[int], n_snapshots: int,
                       momentum: float) -> None:
    """Block L's parameters θ <- (1 - m) θ + m · Σ snapshots / n, `times[L]` times, in place.

    The authors' `reweight_adapter`, in their operation order so the numbers match. It writes through
    `.data` (their code assigns `.data`): a merge after the forward does not bump autograd's version
    counter, and the backward then sees the merged weights, as in their code.
    """
    if n_snapshots == 0 or momentum == 0:
        return
    entries = [(parameter.data, momentum * total / n_snapshots, count)
               for (parameters, totals), count in zip(blocks, times) for parameter, total in zip(parameters, totals)]
    for round_ in range(max(times, default=0)):
        data = [d for d, _, count in entries if count > round_]
        targets = [t for _, t, count in entries if count > round_]
        torch._foreach_mul_(data, 1 - momentum)
        torch._foreach_add_(data, targets)


@register_method("mos", MOSConfig)
class MOS(Method):
    options: MOSConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options = self.options
        self.backbone = backbone
        adapters = options.adapter
        self.working = ParallelAdapterInjector(backbone, adapters)  # trained on every task, never reset
        self.bank = AdapterBankInjector(backbone, adapters)  # task t's inference adapters (module docstring)
        for index, parameter in enumerate(self.working.adapters.parameters()):
            self.register_buffer(f"snapshot_sum_{index}", torch.zeros_like(parameter))
        # Linear over every class of the stream, as their ViT head (timm init: N(0, 0.02) truncated, bias 0).
        self.head = linear_head(backbone.num_features, int(scenario.boundaries[-1]))
        # Class means through the first task's adapters (their cosine `fc`, sigma 1, for the task guess).
        self.register_buffer("prototypes", torch.zeros(0, backbone.num_features))
        self.statistics = GaussianClassStatistics(options.alignment.storage, ridge=options.covariance_ridge)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    @property
    def snapshot_sums(self) -> list[Tensor]:
        return [getattr(self, f"snapshot_sum_{index}") for index in range(len(list(self.working.adapters.parameters())))]

    def working_blocks(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        """Per block: the working adapter's parameters and the running sums of their snapshots."""
        sums, blocks = iter(self.snapshot_sums), []
        for adapter in self.working.adapters:
            parameters = list(adapter.parameters())
            blocks.append((parameters, [next(sums) for _ in parameters]))
        return blocks

    def merge_working(self, task_index: int, times: list[int]) -> None:
        """Merge block L's working adapter `times[L]` times towards the mean of the snapshots of tasks 0..t-1."""
        merge_towards_mean(self.working_blocks(), times, task_index, self.options.merge_momentum)

    def merging_forward(self, images: Tensor, task_index: int) -> Tensor:
        """Their `train=True` forward: before each block runs, EVERY block's working adapter is merged once, so
        block L runs after L + 1 merges and each forward leaves D merges on every block."""
        depth = len(self.working.adapters)
        self.merge_working(task_index, [block + 1 for block in range(depth)])
        features = self.backbone(images)
        self.merge_working(task_index, [depth - block - 1 for block in range(depth)])
        return features

    # ---- training ----------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        self.bank.add_set().requires_grad_(False)
        grown = self.prototypes.new_zeros(task.high, self.prototypes.shape[1])
        grown[: self.prototypes.shape[0]] = self.prototypes
        self.prototypes = grown

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        return [Phase.from_train("adapter", train)] if train.epochs > 0 else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.working.adapters.parameters(), *self.head.parameters()]

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        return [ParameterGroup(list(self.working.adapters.parameters()), name="adapters"),
                ParameterGroup(list(self.head.parameters()), lr_scale=self.options.head_lr_scale, name="head")]

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        features = self.merging_forward(images, task.index)
        classification = F.cross_entropy(self.head(features)[:, task.low: task.high], targets - task.low)
        orthogonality = orthogonality_loss(features, self.statistics.mean_table(task.low, features.device),
                                           self.options.orthogonality_temperature)
        loss = classification + self.options.orthogonality_weight * orthogonality
        return StepOutput(loss, {"loss": loss.item(), "orthogonality": orthogonality.item()})

    def after_optimizer_step(self, task: Task) -> None:
        self.merge_working(task.index, [1] * len(self.working.adapters))  # their `adapter_merge`

    # ---- end of task: snapshot, statistics, alignment, prototypes -------------------------
    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        task = context.task
        self.eval()
        snapshot = [parameter.detach().clone() for parameter in self.working.adapters.parameters()]
        self.store_inference_adapters(task.index, snapshot)
        self.compute_statistics(context)
        if task.index > 0:
            self.align(context)
        for total, parameter in zip(self.snapshot_sums, snapshot):
            total += parameter
        with self.working.bypassed(), self.bank.using(0):
            features, labels = context.embed_task_images(self.backbone, "mos computes its prototypes")
        sums = torch.zeros(task.size, features.shape[1], device=features.device).index_add_(0, labels - task.low, features)
        counts = torch.bincount(labels - task.low, minlength=task.size).clamp(min=1)
        self.prototypes[task.low: task.high] = sums / counts[:, None]

    def store_inference_adapters(self, task_index: int, snapshot: list[Tensor]) -> None:
        """Task t's inference set: its snapshot, or the mean of the earlier snapshots ("merged", t > 0)."""
        merged = self.options.inference_adapters == "merged" and task_index > 0 and self.options.merge_momentum > 0
        for destination, own, total in zip(self.bank.sets[task_index].parameters(), snapshot, self.snapshot_sums):
            destination.copy_(total / task_index if merged else own)

    def compute_statistics(self, context: TaskContext) -> None:
        """Class by class through the working set, with their merging forward (their `_compute_mean`)."""
        task, batch = context.task, self.options.statistics_batch_factor * self.experiment.train.batch_size
        sums = ClassFeatureSums(task.low, task.high, self.backbone.num_features, self.options.alignment.storage)
        for images, labels in context.class_batches(batch, "mos computes its class statistics"):
            sums.add(self.merging_forward(images.to(context.device), task.index), labels)
        sums.store_into(self.statistics)

    def align(self, context: TaskContext) -> None:
        high = context.task.high
        self.align_head(self.head, self.statistics, self.options.alignment, context, "mos",
                        logits=lambda features: self.head(features)[:, :high])

    # ---- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        n_classes, n_tasks = self.n_seen_classes, self.n_learned_tasks
        task_of = torch.as_tensor(self.scenario.task_of_class()[:n_classes], device=images.device).long()
        with self.working.bypassed():
            with self.bank.using(0):
                first = self.backbone(images)
            prototype_logits = F.normalize(first, dim=1) @ F.normalize(self.prototypes[:n_classes], dim=1).T
            adapter = task_of[prototype_logits.argmax(1)]
            logits = self.head_logits_through(images, adapter, first, n_classes)
            for _ in range(self.options.refine_hops):
                named = task_of[logits.argmax(1)]
                moving = torch.nonzero(named != adapter).flatten()
                if len(moving) == 0:
                    break
                adapter[moving] = named[moving]
                logits[moving] = self.head_logits_through(images[moving], adapter[moving], first[moving], n_classes)
        if not self.options.ensemble:
            return logits.float()
        return logits.float().softmax(1) + (n_tasks * prototype_logits).float().softmax(1)

    def head_logits_through(self, images: Tensor, adapter: Tensor, first: Tensor, n_classes: int) -> Tensor:
        """Head logits of each image's feature through its own task's adapters (set 0's feature is known)."""
        features = first.clone()
        others = torch.nonzero(adapter != 0).flatten()
        if len(others):
            features[others] = self.bank.features_per_image(images[others], adapter[others]).to(features.dtype)
        return self.head(features)[:, :n_classes]

    @torch.no_grad()
    def class_probabilities(self, images: Tensor) -> Tensor:
        scores = self.predict(images)
        return scores / 2 if self.options.ensemble else scores.softmax(1)

    # ---- state -----------------------------------------------------------------------------
    def saved_states(self) -> dict[str, StateHolder]:
        return {"statistics": self.statistics}

