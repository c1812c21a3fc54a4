"""MIN ("Mixture of Noise for Pre-Trained Model-Based Class-Incremental Learning", NeurIPS 2025; the authors' code
at ASCIIJK's commit 292d883, kept in the fork thuwng/MiN-NeurIPS2025: `MiN/models/MiN.py`, `MiN/utils/inc_net.py`,
`MiN/backbones/ViT_MiN.py`).

The ViT's features f go through a fixed random buffer in float64, h = ReLU(f B) (B: feature width x
`buffer_size`, uniform ±1/√buffer_size), and the classes are read off h by an analytic classifier: recursive
least squares with R₀ = I/γ, i.e. after every fit W = (γI + Σ HᵀH)⁻¹ Σ HᵀY over every batch fitted so far.
After every block a mixture of beneficial noise is added (tuners/noise.py): one pair of maps per task, mixed by
w = softmax(s) with s_i = cos(p_{t-1}, p_i) for the finished tasks' prototypes p_i (the mean feature of a task's
augmented training images, taken after its training) and s_t = 1; w = 0 while fewer than two tasks are finished.

- First task: the noise's `mlp`, the task's pair and every LayerNorm's affine weights train with a zero linear
  head (with bias) on h, cross-entropy, `train.epochs` at `train.lr` (SGD; their MultiStepLR at 70 and 100
  epochs). Then the prototype, and the analytic classifier fits the augmented training images `fit_epochs`
  times, then the un-augmented ones once.
- Each later task: the analytic classifier first fits the task's augmented images `fit_epochs` times with the
  noise as it stands; then the mixture weights are set and only the task's new pair trains (`later_epochs`),
  with a fresh zero linear head (no bias) over every seen class whose logits are added to the analytic
  classifier's (not differentiated); then the prototype, and one more fit on the un-augmented images.
Predictions: the analytic classifier's scores over the seen classes.

Where carecl differs from their code (docs/reproduction.md has the list): the random buffer and projections come
from a generator seeded by the run's seed (theirs: unseeded); the first task's prototype is taken once, after
training (theirs also takes one before, which nothing reads); the mixture weights are stored with the learner
(theirs are a plain attribute, lost by their checkpoints, as is their down projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from carecl.classifiers import AnalyticClassifier
from carecl.config import ExperimentConfig, MethodConfig, require
from carecl.methods.base import Method, ParameterGroup, Phase, StepOutput, TaskContext, register_method
from carecl.scenario import Scenario, Task
from carecl.tuners.noise import MixtureOfNoiseInjector, NoiseConfig, TunedLayerNorms, fixed_projection

NOISE_PHASE = "beneficial noise"


@dataclass
class MiNConfig(MethodConfig):
    name: str = "min"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # Width of the random buffer in front of the analytic classifier (`buffer_size`).
    buffer_size: int = 16384
    # Ridge γ of the analytic classifier (`gamma`: 100 for CIFAR / CUB, 500 for ImageNet-R / Food-101 / OmniBenchmark).
    gamma: float = 100.0
    # Passes of the analytic fit over the task's augmented images (`fit_epochs`).
    fit_epochs: int = 3
    # Images per recursive least-squares update (`buffer_batch`); the result does not depend on it.
    fit_batch_size: int = 1000
    # Epochs of the noise training after the first task (`epochs`); the first trains train.epochs (`init_epochs`).
    later_epochs: int = 10
    # Their MultiStepLR: lr x lr_decay at these epochs (never reached by their 10-20 epochs).
    milestones: list[int] = field(default_factory=lambda: [70, 100])
    lr_decay: float = 0.1

    def validate(self) -> None:
        self.noise.validate()
        require(self.buffer_size > 0, "buffer_size", f"must be positive, got {self.buffer_size}")
        require(self.gamma > 0, "gamma", f"must be positive, got {self.gamma}")
        require(self.fit_epochs >= 0, "fit_epochs", f"must be >= 0, got {self.fit_epochs}")
        require(self.fit_batch_size > 0, "fit_batch_size", f"must be positive, got {self.fit_batch_size}")
        require(self.later_epochs >= 0, "later_epochs", f"must be >= 0, got {self.later_epochs}")
        require(all(m > 0 for m in self.milestones), "milestones", f"must be positive epochs, got {self.milestones}")


def mixture_weights(prototypes: Tensor, n_tasks: int) -> Tensor:
    """The weights of `n_tasks` noise pairs given the finished tasks' prototypes (n_tasks - 1 of them): zero while
    fewer than two are finished, else softmax([cos(p_last, p_0), ..., cos(p_last, p_last), 1])."""
    if len(prototypes) <= 1:
        return torch.zeros(n_tasks, device=prototypes.device)
    scores = torch.ones(n_tasks, device=prototypes.device)
    scores[:len(prototypes)] = F.cosine_similarity(prototypes[-1:], prototypes, dim=1)
    return scores.softmax(dim=0)


@register_method("min", MiNConfig)
class MiN(Method):
    options: MiNConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__(config, backbone, scenario)
        options = self.options
        self.backbone = backbone
        generator = torch.Generator().manual_seed(config.seed)
        self.noise = MixtureOfNoiseInjector(backbone, options.noise, generator)
        self.norms = TunedLayerNorms(backbone)
        reference = next(backbone.parameters())
        self.register_buffer("buffer", fixed_projection(backbone.num_features, options.buffer_size, generator)
                             .to(reference.device, torch.float64))
        self.analytic = AnalyticClassifier(options.buffer_size, options.gamma).to(reference.device)
        self.training_head: nn.Linear | None = None  # made by begin_task
        self.register_buffer("prototypes", torch.zeros(0, backbone.num_features, device=reference.device))
        # The last task whose first analytic fit (before its noise trains) is done; -1: none.
        self.register_buffer("prefitted_task", torch.tensor(-1))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def expand(self, features: Tensor) -> Tensor:
        return F.relu(features.to(torch.float64) @ self.buffer)

    # ---- growth and training -------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        self.noise.add_task()
        if task.index > 0:  # only the first task tunes the noise's mlp and the LayerNorms
            self.norms.requires_grad_(False)
            for parameter in self.noise.projections():
                parameter.requires_grad_(False)
        reference = self.buffer.device
        # Their normal_fc: with a bias on the first task, without one over every seen class later; zero either way.
        head = nn.Linear(self.options.buffer_size, task.high, bias=task.index == 0).to(reference)
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        self.training_head = head

    def training_phases(self, task: Task) -> list[Phase]:
        train, options = self.experiment.train, self.options
        epochs = train.epochs if task.index == 0 else options.later_epochs
        if epochs == 0:
            return []
        return [Phase.from_train(NOISE_PHASE, train, epochs=epochs, milestones=tuple(options.milestones),
                                 lr_decay=options.lr_decay)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.n_learned_tasks == 0:
            tuned = [*self.noise.projections(), *self.noise.current_pairs(), *self.norms.parameters()]
        else:
            tuned = self.noise.current_pairs()
        return [*tuned, *self.training_head.parameters()]

    def parameter_groups(self, phase: Phase) -> list[ParameterGroup]:
        return [ParameterGroup(self.trainable_parameters())]

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        self.prepare_task(context)

    @torch.no_grad()
    def prepare_task(self, context: TaskContext) -> None:
        """Later tasks: the analytic fit on the augmented images with the noise as it stands, then the new mixture."""
        task = context.task
        if task.index == 0 or int(self.prefitted_task) == task.index:
            return
        self.eval()
        self.fit_augmented(context)
        self.noise.mixture = mixture_weights(self.prototypes, task.index + 1).to(self.noise.mixture)
        self.prefitted_task.fill_(task.index)

    def training_loss(self, images: Tensor, targets: Tensor, task: Task) -> StepOutput:
        expanded = self.expand(self.backbone(images))
        logits = self.training_head(expanded.to(self.training_head.weight.dtype))
        if task.index > 0:  # their logits2 + logits1: the analytic scores join as a constant (float64, as theirs)
            logits = logits + self.analytic(expanded.detach(), task.high)
        loss = F.cross_entropy(logits, targets)
        return StepOutput(loss, {"loss": loss.item()})

    # ---- after training: prototype and analytic fits --------------------------------------
    @torch.no_grad()
    def end_task(self, context: TaskContext) -> None:
        task = context.task
        self.prepare_task(context)  # when the task had no training phase
        self.eval()
        self.prototypes = torch.cat([self.prototypes, self.task_prototype(context)[None]])
        if task.index == 0:
            self.fit_augmented(context)
        features, labels = context.embed_task_images(self.backbone, "min refits its analytic classifier")
        self.fit(features, labels, task)

    def task_prototype(self, context: TaskContext) -> Tensor:
        """The mean feature of the task's augmented training images (their get_task_prototype)."""
        total, count = None, 0
        batches = context.training_batches(self.experiment.train.batch_size, 0, "min computes its task prototype")
        for images, _ in batches:
            features = self.backbone(images.to(context.device)).float()
            total = features.sum(0) if total is None else total + features.sum(0)
            count += len(features)
        return total / max(count, 1)

    def fit_augmented(self, context: TaskContext) -> None:
        """`fit_epochs` analytic fits over the task's augmented images (their fit_fc), each pass in its own order."""
        task, options = context.task, self.options
        for number in range(1, options.fit_epochs + 1):
            batches = context.training_batches(options.fit_batch_size, number, "min fits its analytic classifier")
            for images, labels in tqdm(batches, desc=f"task {task.index + 1} analytic fit", leave=False,
                                       disable=not context.progress):
                self.fit(self.backbone(images.to(context.device)), labels.to(context.device), task)

    def fit(self, features: Tensor, labels: Tensor, task: Task) -> None:
        for start in range(0, len(labels), self.options.fit_batch_size):
            rows = slice(start, start + self.options.fit_batch_size)
            self.analytic.fit_task(self.expand(features[rows]), labels[rows], task.high)

    # ---- prediction and state ---------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.analytic(self.expand(self.backbone(images)), self.n_seen_classes)

    def load_state_tensors(self, tensors: dict[str, Tensor], grow: bool = False) -> None:
        if "prototypes" in tensors:  # one row per finished task: its length comes from the saved state
            self.prototypes = torch.empty_like(tensors["prototypes"], device=self.prototypes.device)
        super().load_state_tensors(tensors, grow)
