import numpy as np
import pytest

from carecl.scenario import Scenario, ScenarioError, class_order, label_map_for, task_sizes


def test_pilot_order_for_seed_1993_matches_published_prefix():
    assert class_order(100, 1993)[:10].tolist() == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def test_order_equals_legacy_global_rng_permutation():
    state = np.random.get_state()
    try:
        np.random.seed(7)
        expected = np.random.permutation(37)
    finally:
        np.random.set_state(state)
    assert class_order(37, 7).tolist() == expected.tolist()


def test_order_leaves_global_rng_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    class_order(100, 1993)
    assert np.array_equal(np.random.get_state()[1], before)


def test_no_shuffle_and_explicit_order():
    assert class_order(5, 1, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert class_order(3, 1, explicit=[2, 0, 1]).tolist() == [2, 0, 1]
    with pytest.raises(ScenarioError, match="class_order"):
        class_order(3, 1, explicit=[0, 0, 1])


def test_label_map_is_position_in_order():
    order = np.array([2, 0, 3, 1])
    mapping = label_map_for(order)
    assert [mapping[y] for y in range(4)] == [order.tolist().index(y) for y in range(4)]


@pytest.mark.parametrize(
    "n, init, inc, expected",
    [
        (100, 10, 10, [10] * 10),
        (100, 0 + 5, 5, [5] * 20),
        (1000, 100, 3, [100] + [3] * 300),
        (1000, 100, 6, [100] + [6] * 150),
        (10, 4, 4, [4, 4, 2]),
        (10, 10, 3, [10]),
    ],
)
def test_task_splits(n, init, inc, expected):
    assert task_sizes(n, init, inc) == expected


@pytest.mark.parametrize("init, inc", [(0, 2), (11, 2), (2, 0), (2, -1)])
def test_impossible_splits_are_errors(init, inc):
    with pytest.raises(ScenarioError):
        task_sizes(10, init, inc)


def test_scenario_boundaries_and_task_of_class():
    scenario = Scenario.build(10, 4, 3, seed=1993)
    assert scenario.sizes == (4, 3, 3)
    assert scenario.boundaries.tolist() == [0, 4, 7, 10]
    assert [(t.low, t.high) for t in scenario.tasks()] == [(0, 4), (4, 7), (7, 10)]
    assert scenario.task_of_class().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
