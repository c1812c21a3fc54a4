"""MoE-Adapters4CL: zero-initialised experts leave CLIP's logits exactly as they were; routing picks the top k
by the router's logits, with noise only while training; activate-freeze keeps a frozen expert's weights
fixed through later tasks; DDAS sends an out-of-distribution batch to the frozen CLIP; a 3-domain MTIL
run goes through `carecl train` and `carecl report`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carecl.cli.main import main
from carecl.engine import Experiment, run_experiment
from carecl.engine.optim import warmup_cosine_factor
from carecl.methods.ddas import DDASConfig, DistributionSelector
from carecl.scenario import Task
from carecl.tuners.moe_adapter import MoEAdapterConfig, MoEAdapterInjector, noisy_top_k_gates

from helpers import clip_config, domains_config, write_domains

CIL = {"name": "moe_adapters"}
MTIL = {"name": "moe_adapters", "moe": {"experts": 4}, "routers": "per_task", "freeze_top_experts": 2, "steps_per_task": 6,
        "warmup_steps": 2, "ddas": {"features": "clip_image", "steps": 20, "threshold": 0.5}}


def randomise(parameters, seed: int = 0, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.normal_(0, std, generator=generator)


def plain_logits(clip: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    image = F.normalize(clip.encode_image(images), dim=-1)
    text = F.normalize(clip.encode_text(tokens), dim=-1)
    return clip.logit_scale.exp() * image @ text.t()


def test_zero_initialised_experts_reproduce_frozen_clip_logits():
    method = Experiment.build(clip_config(CIL)).method.eval()
    task = method.scenario.task(0)
    method.begin_task(task)
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        adapted = method.scores(images, task, route=0)
        from carecl.clip_backbone import tokenize

        tokens = tokenize(method.clip, [method.options.template.format(n) for n in method.scenario.names(0, 2)])
        for injector in method.injectors:
            injector.remove()
        frozen = plain_logits(method.clip, images, tokens)
    assert torch.equal(adapted, frozen)
    # The same adapters with a trained up-projection do change the logits (the comparison can fail).
    method = Experiment.build(clip_config(CIL)).method.eval()
    method.begin_task(task)
    randomise([p for injector in method.injectors for p in injector.banks.parameters()])
    with torch.no_grad():
        assert not torch.allclose(method.scores(images, task, route=0), frozen, atol=1e-3)


def test_top_k_gates_by_hand_and_noise_only_when_asked():
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_gate = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 1.0]])
    gates = noisy_top_k_gates(tokens, w_gate, torch.zeros(2, 4), k=2, noisy=False, epsilon=0.01)
    expected = torch.zeros(2, 4)
    expected[0, [0, 2]] = torch.tensor([3.0, 2.0]).softmax(0)
    expected[1, [1, 2]] = torch.tensor([5.0, 4.0]).softmax(0)
    torch.testing.assert_close(gates, expected)
    noisy = [noisy_top_k_gates(tokens, w_gate, torch.ones(2, 4), k=2, noisy=True, epsilon=0.01) for _ in range(3)]
    assert not torch.equal(noisy[0], noisy[1]) or not torch.equal(noisy[1], noisy[2])
    assert all(torch.allclose(g.sum(1), torch.ones(2)) and (g > 0).sum(1).eq(2).all() for g in noisy)


def test_the_method_routes_with_noise_in_training_and_without_at_evaluation():
    experiment = Experiment.build(clip_config(CIL))
    method = experiment.method
    task = experiment.scenario.task(0)
    method.begin_task(task)
    randomise([p for injector in method.injectors for p in injector.banks.parameters()])
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    method.train()
    method.training_loss(images, targets, task)
    assert all(injector.noisy and injector.route == 0 for injector in method.injectors)
    method.finish_task(experiment.context(task))
    method.eval()
    first, second = method.predict(images), method.predict(images)
    assert torch.equal(first, second) and not any(injector.noisy for injector in method.injectors)
    method.options.eval_noise = True  # the authors' CIL quirk: noisy gates at test time too
    method._text_cache.clear()
    assert not torch.equal(method.predict(images), method.predict(images))


def test_usage_counts_every_selection_and_freezing_takes_the_most_used(tmp_path):
    vit_config = clip_config(CIL)
    clip = Experiment.build(vit_config).method.clip
    injector = MoEAdapterInjector(clip.visual, MoEAdapterConfig(experts=4, top_k=2))
    injector.add_router()
    randomise(injector.router_parameters(0), std=2.0)
    injector.route, injector.counting = 0, True
    with torch.no_grad():
        clip.encode_image(torch.rand(6, 3, 16, 16))
    for bank in injector.banks:
        assert bank.usage.sum() == 6 * 2  # every image picks two experts in every block
    frozen = injector.freeze_most_used(2)
    for block, bank in enumerate(injector.banks):
        chosen = sorted(expert for b, expert in frozen if b == block)
        assert chosen == sorted(torch.sort(bank.usage, descending=True, stable=True).indices[:2].tolist())
        assert [not any(p.requires_grad for p in e.parameters()) for e in bank.experts] == bank.frozen.tolist()


def test_a_frozen_expert_never_changes_after_its_task(tmp_path):
    roots = write_domains(tmp_path / "data")
    config = domains_config(roots, MTIL)
    experiment = Experiment.build(config)
    from carecl.engine import learn_task

    learn_task(experiment, experiment.scenario.task(0))
    method = experiment.method
    banks = [bank for injector in method.injectors for bank in injector.banks]
    frozen = [(bank, index) for bank in banks for index in bank.frozen.nonzero().flatten().tolist()]
    assert len(frozen) == 2 * len(banks)
    snapshot = {id(bank.experts[i]): [p.detach().clone() for p in bank.experts[i].parameters()] for bank, i in frozen}
    trainable_before = [[p.detach().clone() for p in bank.experts[i].parameters()]
                        for bank in banks for i in range(len(bank.experts)) if not bank.frozen[i]]
    for task in experiment.scenario.tasks()[1:]:
        learn_task(experiment, task)
    for bank, index in frozen:
        assert all(torch.equal(a, b) for a, b in zip(bank.experts[index].parameters(), snapshot[id(bank.experts[index])]))
    trainable_after = [[p.detach() for p in bank.experts[i].parameters()]
                       for bank in banks for i in range(len(bank.experts)) if not bank.frozen[:len(bank.experts)][i]]
    assert trainable_before, "some experts stay trainable after the first task"
    changed = [not all(torch.equal(a, b) for a, b in zip(before, after))
               for before, after in zip(trainable_before, trainable_after)]
    assert any(changed) or all(bank.frozen.all() for bank in banks)
    assert method.image_moe.n_routers == 3


def test_ddas_sends_an_out_of_distribution_batch_to_the_frozen_path():
    class Pixels(nn.Module):
        def forward(self, images):
            return images.flatten(1) * 4 - 2  # sigmoid spreads the pixels over (0.12, 0.88)

    torch.manual_seed(0)
    selector = DistributionSelector(DDASConfig(features="clip_image", code_size=8, threshold=0.01), Pixels(), 4)
    selector.begin_task(Task(0, 0, 2))
    pattern = torch.zeros(3, 4, 4)
    pattern[:, ::2] = 1.0
    seen = pattern + 0.05 * torch.rand(16, 3, 4, 4)
    optimiser = torch.optim.Adam(selector.autoencoders[0].parameters(), lr=0.01)
    for _ in range(300):
        loss = selector.training_loss(seen)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    unseen = 1.0 - pattern + 0.05 * torch.rand(16, 3, 4, 4)
    assert selector.route(seen) == 0
    assert selector.route(unseen) is None
    assert selector.routes(torch.cat([seen[:2], unseen[:2]])) == [0, 0, None, None]
    # A reference autoencoder that reconstructs a batch best also sends it to the frozen path.
    config = DDASConfig(features="clip_image", code_size=8, threshold=1.0, reference_root="generic")
    with_reference = DistributionSelector(config, Pixels(), 4)
    with_reference.begin_task(Task(0, 0, 2))
    with_reference.autoencoders[0].load_state_dict(selector.autoencoders[0].state_dict())
    assert with_reference.route(seen) is None and with_reference.route(unseen) == 0


def test_warmup_cosine_is_stepped_per_optimiser_step():
    assert warmup_cosine_factor(0, 30, 100) == pytest.approx(1 / 30)
    assert warmup_cosine_factor(29, 30, 100) == pytest.approx(1.0)
    assert warmup_cosine_factor(30, 30, 100) == pytest.approx(1.0)
    assert warmup_cosine_factor(65, 30, 100) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 30, 100) == pytest.approx(0.0, abs=1e-12)


def test_a_fixed_step_phase_runs_exactly_its_steps(tmp_path, monkeypatch):
    from carecl.methods.moe_adapters import MoEAdapters

    steps = []
    monkeypatch.setattr(MoEAdapters, "after_optimizer_step", lambda self, task: steps.append(task.index))
    # 6 training images per task in batches of 4: 2 batches per pass, 5 steps = 3 passes (the loader restarted).
    config = clip_config({**CIL, "steps_per_task": 5}, train={"batch_size": 4}, data={
        "dataset": "synthetic", "synthetic_classes": 4, "synthetic_train_per_class": 3, "synthetic_test_per_class": 2,
        "image_size": 16, "init_cls": 2, "increment": 2})
    run_experiment(config, tmp_path / "run")
    assert steps == [0] * 5 + [1] * 5


def test_a_three_domain_mtil_run_through_the_cli_and_its_report(tmp_path, capsys):
    roots = write_domains(tmp_path / "data")
    config = tmp_path / "mtil.yaml"
    domains = "\n".join(f"    - {{name: {name}, root: {root}}}" for name, root in roots.items())
    config.write_text(f"""seed: 0
data:
  dataset: domains
  image_size: 16
  domains:
{domains}
backbone: {json.dumps(clip_config(CIL).backbone.__dict__)}
train: {{device: cpu, optimizer: adamw, lr: 0.01, weight_decay: 0.0, epochs: 1, batch_size: 8, progress: false}}
eval: {{batch_size: 32, topk: 2, protocol: task_incremental, unseen_tasks: true}}
method: {json.dumps(MTIL)}
""")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    matrix = torch.tensor(summary["matrix"])
    assert matrix.shape == (3, 3) and torch.isfinite(matrix).all()  # every domain measured after every task
    expected_transfer = ((matrix[0, 1] + (matrix[0, 2] + matrix[1, 2]) / 2) / 2).item()
    assert summary["transfer"] == pytest.approx(expected_transfer)
    assert summary["last_task_average"] == pytest.approx(matrix[-1].mean().item())
    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Transfer (%)" in report and "colours → stripes → textures" in report


def test_an_mtil_run_interrupted_mid_task_resumes_identically(tmp_path, monkeypatch):
    from helpers import check_interrupted_run_resumes_identically

    roots = write_domains(tmp_path / "data", train=4, test=2)
    # Image files read by 2 worker processes: with mid-task checkpoints they are started per epoch, so the
    # resumed run's augmentation follows from the checkpointed loader state.
    config = domains_config(roots, MTIL, train={"checkpoint_every_epochs": 1})
    config.data.num_workers = 2
    check_interrupted_run_resumes_identically(config, "task1/experts/epoch0/batch3", tmp_path, monkeypatch)


@pytest.mark.parametrize("options, message", [
    ({"routers": "per_task"}, r"method\.ddas is needed with routers: per_task"),
    ({"routers": "per_task", "ddas": {"code_size": 0}}, r"method\.ddas\.code_size must be positive"),
    ({"moe": {"top_k": 3}}, r"method\.moe\.top_k must be in 1\.\.experts \(2\)"),
    ({"template": "a photo"}, r"method\.template needs a \{\}"),
])
def test_invalid_options_name_the_key(options, message):
    from carecl.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        clip_config({**CIL, **options})


def test_moe_adapters_refuses_a_vit_backbone():
    from carecl.config import ConfigError
    from helpers import tiny_config

    with pytest.raises(ConfigError, match="needs a CLIP backbone: set backbone.family: open_clip"):
        Experiment.build(tiny_config(method=CIL))
