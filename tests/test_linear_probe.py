"""The joint linear probe: scikit-learn's logistic regression, solved to the same optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from carecl.engine import run_experiment
from carecl.methods.linear_probe import fit_logistic_regression

from helpers import tiny_config


def test_fit_equals_scikit_learns_multinomial_logistic_regression():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(90, 6)) + np.repeat(rng.normal(scale=2.0, size=(3, 6)), 30, axis=0)
    targets = np.repeat(np.arange(3), 30)
    for C in (0.1, 1.0):
        weight, bias = fit_logistic_regression(torch.from_numpy(features), torch.from_numpy(targets), 3, C, 500)
        reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(features, targets)
        # The multinomial optimum is unique up to a shift shared by all classes' biases.
        np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-4)
        np.testing.assert_allclose(bias.numpy() - bias.numpy().mean(), reference.intercept_ - reference.intercept_.mean(),
                                   atol=2e-4)


def test_joint_probe_run_beats_chance_and_caches_the_frozen_features(tmp_path):
    config = tiny_config(method={"name": "linear_probe"}, data={"init_cls": 6, "increment": 6})
    summary = run_experiment(config, tmp_path / "run")
    assert summary.a_last > 50.0  # 6 synthetic classes: chance is 16.7
    assert len(summary.top1_curve) == 1


@pytest.mark.parametrize("cache", [True, False])
def test_simplecil_feature_cache_gives_the_same_run(tmp_path, cache):
    config = tiny_config(method={"name": "simplecil", "cache_features": cache})
    summary = run_experiment(config, tmp_path / "run")
    reference = run_experiment(tiny_config(method={"name": "simplecil", "cache_features": not cache}), tmp_path / "other")
    assert summary.top1_curve == reference.top1_curve


def test_feature_cache_computes_each_distinct_image_once():
    from carecl.feature_cache import FeatureCache

    calls = []

    def compute(images):
        calls.append(len(images))
        return images.flatten(1).sum(1, keepdim=True)

    cache = FeatureCache(compute)
    first = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    new = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cache(first), compute(first))
    mixed = torch.cat([first[2:], new, first[:1]])
    torch.testing.assert_close(cache(mixed), compute(mixed))
    assert calls == [4, 4, 1, 4]  # our two reference calls, then the cache's own: 4 images, then only the new one
    assert (cache.hits, cache.misses, len(cache)) == (3, 5, 5)
