"""MIN: the noise after each block is the authors' mixture, the mixture weights follow the prototypes' cosines,
the analytic classifier equals the ridge closed form over every fit, only the first task tunes the noise's mlp and
the LayerNorms while later tasks train their own pair, and a run resumes mid-task to identical numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carecl.engine import Experiment, learn_task, run_experiment
from carecl.methods.min import MiN, mixture_weights
from carecl.tuners.noise import MixtureOfNoiseInjector, NoiseConfig, TunedLayerNorms

from helpers import DEMO_BACKBONE, GLYPHS, check_interrupted_run_resumes_identically, tiny_config, tiny_vit

MIN = {"name": "min", "noise": {"hidden": 8}, "buffer_size": 64, "fit_epochs": 2, "fit_batch_size": 16,
       "later_epochs": 1}


def randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_noise_is_the_authors_mixture_and_a_fresh_injection_changes_nothing():
    vit = tiny_vit()
    images = torch.rand(3, 3, 16, 16)
    plain = vit(images)
    injector = MixtureOfNoiseInjector(vit, NoiseConfig(hidden=8), torch.Generator().manual_seed(0))
    injector.add_task()
    torch.testing.assert_close(vit(images), plain, msg="zero mlp and pairs add nothing")
    generator = torch.Generator().manual_seed(1)
    pairs = []  # every task's (mean, scale) as the authors keep them: two maps per task
    for _ in range(3):
        layer = injector.layers[0]
        randomise_(layer.mean, generator)
        randomise_(layer.scale, generator)
        pairs.append((layer.mean[0].weight.clone(), layer.mean[0].bias.clone(), layer.scale[0].weight.clone(),
                      layer.scale[0].bias.clone()))
        injector.add_task()
    pairs = pairs + [(torch.zeros(8, 8), torch.zeros(8), torch.zeros(8, 8), torch.zeros(8))]
    randomise_(injector.layers[0].mlp, generator)
    injector.mixture = torch.tensor([0.1, 0.2, 0.3, 0.4])
    hidden = torch.randn(3, 5, 32, generator=generator)
    layer = injector.layers[0]
    projected = hidden @ layer.down
    noise = sum(((projected @ mw.T + mb) + (projected @ sw.T + sb)) * w
                for (mw, mb, sw, sb), w in zip(pairs, injector.mixture))
    expected = layer.mlp(hidden) + noise @ layer.up + hidden
    torch.testing.assert_close(layer(hidden, injector.mixture), expected, rtol=1e-5, atol=1e-6)
    injector.remove()
    torch.testing.assert_close(vit(images), plain)


def test_tuned_layer_norms_start_as_the_originals_and_change_the_output_when_trained():
    vit = tiny_vit()
    images = torch.rand(2, 3, 16, 16)
    plain = vit(images)
    norms = TunedLayerNorms(vit)
    assert len(norms.norms) == 2 * len(vit.blocks) + 1  # norm1 and norm2 of every block, and the final norm
    torch.testing.assert_close(vit(images), plain)
    with torch.no_grad():
        norms.norms["norm"].bias.add_(1.0)
    assert not torch.allclose(vit(images), plain)
    assert all(not p.requires_grad for p in vit.parameters() if p.data_ptr() not in
               {q.data_ptr() for q in norms.norms.parameters()})
    norms.remove()
    torch.testing.assert_close(vit(images), plain)


def test_mixture_weights_are_zero_until_two_tasks_finish_then_a_softmax_of_prototype_cosines():
    prototypes = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixture_weights(prototypes[:0], 1), torch.zeros(1))
    assert torch.equal(mixture_weights(prototypes[:1], 2), torch.zeros(2))
    scores = torch.ones(4)
    for i in range(3):  # the authors' loop: s_i = cos(p_last, p_i); the new task keeps s = 1
        scores[i] = torch.dot(prototypes[-1], prototypes[i]) / (prototypes[-1].norm() * prototypes[i].norm())
    torch.testing.assert_close(mixture_weights(prototypes, 4), scores.softmax(0))


def test_analytic_classifier_is_the_ridge_solution_over_every_fit(monkeypatch):
    experiment = Experiment.build(tiny_config(method=MIN, train={"epochs": 1}))
    method: MiN = experiment.method
    fitted = []
    original = MiN.fit

    def record(self, features, labels, task):
        fitted.append((self.expand(features), labels.clone(), task.high))
        return original(self, features, labels, task)

    monkeypatch.setattr(MiN, "fit", record)
    for task in experiment.scenario.tasks()[:2]:
        learn_task(experiment, task)
    # Every task: fit_epochs augmented passes and one un-augmented pass over its images.
    assert len({id(h) for h, _, _ in fitted}) == len(fitted) and len(fitted) >= 2 * (MIN["fit_epochs"] + 1)
    hidden = torch.cat([h for h, _, _ in fitted])
    targets = torch.cat([F.one_hot(y, 4).double() for _, y, _ in fitted])
    gram = hidden.T @ hidden + method.options.gamma * torch.eye(hidden.shape[1], dtype=torch.float64)
    closed_form = torch.linalg.solve(gram, hidden.T @ targets)
    torch.testing.assert_close(method.analytic.weight, closed_form, rtol=1e-6, atol=1e-9)


def test_first_task_tunes_the_mlp_and_norms_later_tasks_only_their_own_pair():
    config = tiny_config(method={**MIN, "later_epochs": 2}, train={"epochs": 2, "lr": 0.5})
    experiment = Experiment.build(config)
    method: MiN = experiment.method
    tasks = experiment.scenario.tasks()
    state = lambda module: {k: v.clone() for k, v in module.state_dict().items()}  # noqa: E731
    norms, mlp = state(method.norms), state(method.noise.layers)
    learn_task(experiment, tasks[0])
    assert any(not torch.equal(norms[k], v) for k, v in method.norms.state_dict().items())
    after_first = state(method.norms), [state(layer.mlp) for layer in method.noise.layers]
    assert any(not torch.equal(mlp[f"{i}.mlp.weight"], layer.mlp.weight) for i, layer in enumerate(method.noise.layers))
    for task in tasks[1:]:
        learn_task(experiment, task)
    assert all(torch.equal(after_first[0][k], v) for k, v in method.norms.state_dict().items())
    assert all(torch.equal(a["weight"], layer.mlp.weight) for a, layer in zip(after_first[1], method.noise.layers))
    layer = method.noise.layers[0]
    # Tasks 0 and 1 train with mixture weight 0 (fewer than two finished prototypes): their pairs stay zero.
    assert layer.finished_weight.shape[0] == 2 and torch.count_nonzero(layer.finished_weight) == 0
    assert torch.count_nonzero(layer.mean[0].weight) > 0, "the third task's pair trains"
    torch.testing.assert_close(method.noise.mixture, mixture_weights(method.prototypes[:2], 3))


def test_three_tasks_through_the_loop(tmp_path):
    config = tiny_config(method={**MIN, "later_epochs": 2, "gamma": 1.0}, train={"epochs": 2, "lr": 0.01},
                         backbone=DEMO_BACKBONE, data=GLYPHS)
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7


def test_interrupted_mid_task_resumes_to_identical_results(tmp_path, monkeypatch):
    config = tiny_config(method={**MIN, "later_epochs": 2},
                         train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task2/beneficial-noise/epoch1/batch0", tmp_path, monkeypatch)
