"""Gaussian class statistics, decay scales and classifier alignment."""

from __future__ import annotations

import math
import typing
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from carecl.alignment import align_classifier, decay_scales
from carecl.alignment_config import AlignmentConfig
from carecl.statistics import GaussianClassStatistics, class_feature_sums
from carecl.classifiers import CosineClassifier
from carecl.config import ConfigError, config_from_dict


def _features(seed: int, n: int, dim: int, shift: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g)
    return torch.randn(n, dim, generator=g) @ mixing + shift * torch.randn(dim, generator=g)


def _stats(n_classes: int, dim: int, storage: str = "covariance", n: int = 30) -> GaussianClassStatistics:
    stats = GaussianClassStatistics(storage)
    for c in range(n_classes):
        stats.add_class(c, _features(c, n, dim))
    return stats


# ---------------------------------------------------------------- config


def test_config_defaults_validate_and_fields_are_plain():
    AlignmentConfig().validate()
    plain = {int, float, bool, str, typing.Optional[int]}
    hints = typing.get_type_hints(AlignmentConfig)
    assert all(hints[f.name] in plain or typing.get_origin(hints[f.name]) is typing.Literal
               for f in fields(AlignmentConfig))


@pytest.mark.parametrize(
    "key, value",
    [("storage", "full"), ("decay_formula", "buggy"), ("epochs", -1), ("samples_per_class", 0), ("scheduler_t_max", 0)],
)
def test_config_validate_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.alignment.{key}"):
        config_from_dict({"method": {"name": "care", "alignment": {key: value}}})


def test_samples_per_class_defaults_to_five_batches():
    assert AlignmentConfig().resolved_samples_per_class(48) == 240
    assert AlignmentConfig(samples_per_class=7).resolved_samples_per_class(48) == 7


# ---------------------------------------------------------------- statistics


def test_covariance_statistics_match_numpy():
    features = _features(0, 25, 6)
    stats = GaussianClassStatistics("covariance")
    stats.add_class(3, features)
    array = features.double().numpy()
    np.testing.assert_allclose(stats.mean(3).numpy(), array.mean(0), rtol=1e-5, atol=1e-5)
    expected = np.cov(array, rowvar=False) + 1e-4 * np.eye(6)
    np.testing.assert_allclose(stats.covariance(3).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert stats.class_ids == [3] and stats.count(3) == 25


def test_variance_statistics_match_numpy():
    features = _features(1, 25, 6)
    stats = GaussianClassStatistics("variance")
    stats.add_class(0, features)
    array = features.double().numpy()
    expected = array.var(0, ddof=1) + 1e-4
    np.testing.assert_allclose(stats.covariance(0).diagonal().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(stats.covariance(0) - torch.diag(stats.covariance(0).diagonal())) == 0
    np.testing.assert_allclose(stats.factor(0).numpy(), np.sqrt(expected), rtol=1e-5)


def test_single_sample_class_has_ridge_covariance():
    stats = GaussianClassStatistics()
    feature = torch.tensor([[1.0, -2.0, 3.0]])
    stats.add_class(0, feature)
    assert torch.equal(stats.mean(0), feature[0])
    torch.testing.assert_close(stats.covariance(0), 1e-4 * torch.eye(3))


def test_re_adding_a_class_replaces_it_and_bad_input_names_the_class():
    stats = _stats(2, 4)
    stats.add_class(1, _features(9, 10, 4))
    torch.testing.assert_close(stats.mean(1), _features(9, 10, 4).mean(0))
    with pytest.raises(ValueError, match="class 5"):
        stats.add_class(5, torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="class 6"):
        stats.add_class(6, torch.zeros(3, 5))


@pytest.mark.parametrize("storage", ["covariance", "variance"])
def test_statistics_from_reduced_sums_match_direct(storage):
    features = _features(2, 40, 5)
    direct = GaussianClassStatistics(storage)
    direct.add_class(0, features)
    # Two "ranks" reduce their sums, as an all-reduce would.
    shards = [class_feature_sums(part, storage) for part in (features[:17], features[17:])]
    count, feature_sum, second = (sum(parts) for parts in zip(*shards))
    reduced = GaussianClassStatistics(storage)
    reduced.add_from_sums(0, count, feature_sum, second)
    torch.testing.assert_close(reduced.mean(0), direct.mean(0))
    torch.testing.assert_close(reduced.covariance(0), direct.covariance(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("storage", ["covariance", "variance"])
def test_state_dict_round_trip_is_exact(storage):
    stats = _stats(4, 5, storage)
    state = load_safetensors(save_safetensors(stats.state_dict()))
    restored = GaussianClassStatistics(storage)
    restored.load_state_dict(state)
    assert restored.class_ids == stats.class_ids
    for c in stats.class_ids:
        assert torch.equal(restored.mean(c), stats.mean(c))
        assert torch.equal(restored.covariance(c), stats.covariance(c))
        assert restored.count(c) == stats.count(c)
    first = stats.sample([0, 2], 5, generator=torch.Generator().manual_seed(3))
    again = restored.sample([0, 2], 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = GaussianClassStatistics("variance" if storage == "covariance" else "covariance")
    with pytest.raises(ValueError, match="storage"):
        other.load_state_dict(state)


def test_empty_state_dict_round_trips():
    restored = GaussianClassStatistics()
    restored.load_state_dict(GaussianClassStatistics().state_dict())
    assert len(restored) == 0


# ---------------------------------------------------------------- sampling


def test_samples_equal_mean_plus_noise_times_cholesky_transposed():
    stats = _stats(3, 5)
    ids, n = [2, 0, 1], 4
    scales = {0: 0.5, 1: 1.0, 2: 2.0}
    x, y = stats.sample(ids, n, mean_scale=scales, generator=torch.Generator().manual_seed(11))
    eps = torch.randn(len(ids), n, 5, generator=torch.Generator().manual_seed(11))
    for k, c in enumerate(ids):
        factor = torch.linalg.cholesky(stats.covariance(c).double()).float()
        expected = scales[c] * stats.mean(c) + eps[k] @ factor.T
        torch.testing.assert_close(x[k * n : (k + 1) * n], expected, rtol=1e-5, atol=1e-5)
    assert y.tolist() == [2] * n + [0] * n + [1] * n


def test_samples_match_torch_multivariate_normal_draw_for_draw():
    stats = _stats(1, 6)
    x, _ = stats.sample([0], 9, generator=torch.Generator().manual_seed(5))
    with torch.random.fork_rng():
        torch.manual_seed(5)
        reference = torch.distributions.MultivariateNormal(stats.mean(0), stats.covariance(0)).sample((9,))
    torch.testing.assert_close(x, reference, rtol=1e-4, atol=1e-4)


def test_variance_samples_use_standard_deviations():
    stats = _stats(2, 4, "variance")
    x, _ = stats.sample([0, 1], 3, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    expected = torch.stack([stats.mean(c) + eps[c] * stats.covariance(c).diagonal().sqrt() for c in (0, 1)])
    torch.testing.assert_close(x, expected.reshape(6, 4))


def test_sample_moments_match_statistics():
    stats = _stats(2, 4)
    x, y = stats.sample([0, 1], 40000, generator=torch.Generator().manual_seed(0))
    for c in (0, 1):
        draws = x[y == c].double()
        scale = stats.covariance(c).diagonal().sqrt().double()
        torch.testing.assert_close(draws.mean(0), stats.mean(c).double(), atol=0.03 * scale.max().item(), rtol=0)
        correlation = torch.cov(draws.T) / torch.outer(scale, scale)
        expected = stats.covariance(c).double() / torch.outer(scale, scale)
        torch.testing.assert_close(correlation, expected, atol=0.03, rtol=0)


def test_sampling_leaves_the_global_rng_alone():
    stats = _stats(2, 4)
    before = torch.get_rng_state()
    stats.sample([0, 1], 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.get_rng_state())


def test_indefinite_covariance_gets_jitter_with_a_warning_naming_the_class():
    stats = GaussianClassStatistics()
    covariance = torch.diag(torch.tensor([1.0, 1.0, -1e-3]))
    stats.load_state_dict(
        {"class_ids": torch.tensor([7]), "counts": torch.tensor([5]), "means": torch.zeros(1, 3),
         "covariances": covariance.unsqueeze(0)}
    )
    with pytest.warns(RuntimeWarning, match="class 7"):
        factor = stats.factor(7)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.T, covariance, atol=0.02, rtol=0)


# ---------------------------------------------------------------- decay


def test_decay_scales_intended_and_release_formulas():
    task_of_class = [0, 0, 1, 1, 2, 2]
    intended = decay_scales(task_of_class, current_task=2, formula="intended", current_task_size=2)
    release = decay_scales(task_of_class, current_task=2, formula="release", current_task_size=2)
    # Hand-computed: 0.9 + 0.1 * (t + 1) / 3 with t = [0,0,1,1,2,2] and t = c // -2 = [0,-1,-1,-2,-2,-3].
    third = 0.1 / 3
    torch.testing.assert_close(intended, torch.tensor([0.9 + third] * 2 + [0.9 + 2 * third] * 2 + [1.0] * 2))
    torch.testing.assert_close(
        release, torch.tensor([0.9 + third, 0.9, 0.9, 0.9 - third, 0.9 - third, 0.9 - 2 * third])
    )
    assert (release < intended).sum() == 5
    with pytest.raises(ValueError, match="formula"):
        decay_scales(task_of_class, 2, "other", 2)


# ---------------------------------------------------------------- alignment


def _classifier(dim: int, blocks: list[int], seed: int = 0) -> CosineClassifier:
    torch.manual_seed(seed)
    classifier = CosineClassifier(dim)
    for size in blocks:
        classifier.add_block(size)
    return classifier


def test_scheduler_rises_again_after_t_max():
    stats = _stats(2, 4)
    classifier = _classifier(4, [2])
    lrs: list[float] = []
    config = AlignmentConfig(epochs=10, lr=0.1, samples_per_class=4)
    losses = align_classifier(
        classifier, stats, config, n_seen_classes=2, scale=20.0, batch_size=8,
        generator=torch.Generator().manual_seed(0), on_epoch_end=lambda epoch, loss, lr: lrs.append(lr),
    )
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    expected = [0.1 * (1 + math.cos(math.pi * (e + 1) / 5)) / 2 for e in range(10)]
    np.testing.assert_allclose(lrs, expected, atol=1e-9)
    assert lrs[4] < 1e-9 and lrs[9] == pytest.approx(0.1)


def test_zero_epochs_disables_alignment():
    classifier = _classifier(4, [2])
    before = classifier.weight().detach().clone()
    config = AlignmentConfig(epochs=0)
    assert align_classifier(classifier, _stats(2, 4), config, n_seen_classes=2, scale=20.0, batch_size=8) == []
    assert torch.equal(before, classifier.weight())


def test_missing_class_statistics_are_named():
    with pytest.raises(ValueError, match=r"\[2\]"):
        align_classifier(_classifier(4, [3]), _stats(2, 4), AlignmentConfig(epochs=1), n_seen_classes=3,
                         scale=20.0, batch_size=8)


def test_alignment_is_reproducible_with_a_generator():
    runs = []
    for _ in range(2):
        classifier = _classifier(5, [2, 2])
        config = AlignmentConfig(epochs=3, samples_per_class=6, decay=True, decay_formula="release")
        losses = align_classifier(
            classifier, _stats(4, 5), config, n_seen_classes=4, scale=20.0, batch_size=8,
            task_of_class=[0, 0, 1, 1], current_task=1, current_task_size=2,
            generator=torch.Generator().manual_seed(4),
        )
        runs.append((losses, classifier.weight().detach()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_cholesky_runs_once_per_class_not_per_epoch(monkeypatch):
    calls = {"n": 0}
    for name in ("cholesky", "cholesky_ex"):
        original = getattr(torch.linalg, name)

        def counting(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counting)
    stats = _stats(6, 5)
    config = AlignmentConfig(epochs=5, samples_per_class=4)
    options = dict(n_seen_classes=6, scale=20.0, batch_size=4, generator=torch.Generator().manual_seed(0))
    align_classifier(_classifier(5, [3, 3]), stats, config, **options)
    assert calls["n"] == 1  # one batched call covers all six classes
    align_classifier(_classifier(5, [3, 3]), stats, config, **options)
    assert calls["n"] == 1
    stats.add_class(4, _features(40, 12, 5))  # replaced statistics need a new factor
    align_classifier(_classifier(5, [3, 3]), stats, config, **options)
    assert calls["n"] == 2


def test_alignment_repairs_recency_bias_on_old_classes():
    g = torch.Generator().manual_seed(0)
    dim, n_train, n_test = 16, 100, 200
    directions = torch.randn(4, dim, generator=g)
    directions = 4 * directions / directions.norm(dim=1, keepdim=True)
    # New classes share part of their direction with old ones, so a biased new head captures old data.
    means = torch.stack([directions[0], directions[1], 0.7 * directions[0] + directions[2],
                         0.7 * directions[1] + directions[3]])

    def draw(c: int, n: int) -> torch.Tensor:
        return means[c] + 0.5 * torch.randn(n, dim, generator=g)

    train = {c: draw(c, n_train) for c in range(4)}
    test = {c: draw(c, n_test) for c in range(4)}
    classifier = _classifier(dim, [2])

    def fit(classes: list[int]) -> None:
        x = torch.cat([train[c] for c in classes])
        y = torch.tensor(classes).repeat_interleave(n_train)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=0.05, momentum=0.9)
        for _ in range(100):
            loss = F.cross_entropy(20 * classifier(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def accuracy(classes: list[int]) -> float:
        x = torch.cat([test[c] for c in classes])
        y = torch.tensor(classes).repeat_interleave(n_test)
        with torch.no_grad():
            return (classifier(x).argmax(1) == y).float().mean().item()

    fit([0, 1])  # task 0: old head on old data only
    classifier.add_block(2)
    fit([2, 3])  # task 1: new data only, over all heads -> biased towards new classes
    old_before = accuracy([0, 1])
    stats = GaussianClassStatistics()
    for c in range(4):
        stats.add_class(c, train[c])
    config = AlignmentConfig(epochs=20, lr=0.05, samples_per_class=64)
    losses = align_classifier(classifier, stats, config, n_seen_classes=4, scale=20.0, batch_size=16,
                              generator=torch.Generator().manual_seed(1))
    old_after, new_after = accuracy([0, 1]), accuracy([2, 3])
    assert old_before < 0.2
    assert old_after > old_before + 0.5
    assert new_after > 0.8
    assert losses[-1] < losses[0]


def test_thousand_classes_sample_without_per_class_distributions(monkeypatch):
    calls = {"cholesky": 0}
    original = torch.linalg.cholesky_ex

    def counting(*args, **kwargs):
        calls["cholesky"] += 1
        return original(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("alignment must not build per-class distributions")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    monkeypatch.setattr(torch.distributions, "MultivariateNormal", forbidden)
    n_classes, dim = 1000, 64
    g = torch.Generator().manual_seed(0)
    stats = GaussianClassStatistics()
    for c in range(n_classes):
        stats.add_class(c, torch.randn(3, dim, generator=g) + c % 7)
    classifier = _classifier(dim, [n_classes // 2, n_classes // 2])
    before = classifier.weight().detach().clone()
    losses = align_classifier(classifier, stats, AlignmentConfig(epochs=1, samples_per_class=4),
                              n_seen_classes=n_classes, scale=20.0, batch_size=4,
                              generator=torch.Generator().manual_seed(0))
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert calls["cholesky"] <= math.ceil(n_classes / 64)  # batched, far fewer calls than classes
    assert not torch.equal(before, classifier.weight())
