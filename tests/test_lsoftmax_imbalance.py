"""Long-tailed subsampling, DRW weights and shot groups (LDAM-DRW's definitions), hand-worked."""
import math

import numpy as np
import pytest

from mx_lsoftmax.support.imbalance import drw_class_weights, long_tailed_counts, long_tailed_indices, shot_groups


def test_exp_profile_by_hand():
    # n_i = floor(1000 * 0.01^(i/9)): 1000, 599.48, 359.38, 215.44, 129.15, 77.43, 46.42, 27.83, 16.68, 10
    assert long_tailed_counts(1000, 10, "exp", 0.01) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert long_tailed_counts(6000, 10, "exp", 0.1)[-1] == 600  # the ratio is the factor
    assert long_tailed_counts(50, 4, "exp", 1.0) == [50] * 4  # factor 1: balanced


def test_step_profile_by_hand():
    assert long_tailed_counts(1000, 10, "step", 0.1) == [1000] * 5 + [100] * 5
    assert long_tailed_counts(1000, 5, "step", 0.5) == [1000, 1000, 500, 500, 500]  # first half: C // 2


@pytest.mark.parametrize("arguments, message", [
    ((1000, 10, "linear", 0.1), "profile must be one of ('exp', 'step'), got 'linear'"),
    ((1000, 10, "exp", 0.0), "factor must be in (0, 1], got 0.0"),
    ((1000, 10, "exp", 1.5), "factor must be in (0, 1], got 1.5"),
    ((1000, 10, "exp", 1e-4), "leaves class 7 with no training sample"),  # 1000 * 1e-4^(7/9) = 0.77
    ((100, 10, "step", 0.001), "leaves class 5 with no training sample"),
])
def test_bad_settings_name_the_setting(arguments, message):
    with pytest.raises(ValueError) as error:
        long_tailed_counts(*arguments)
    assert message in str(error.value)


def test_indices_are_seeded_per_class_subsets():
    labels = np.repeat(np.arange(10), 200)
    np.random.default_rng(0).shuffle(labels)
    indices, counts = long_tailed_indices(labels, "exp", 0.1, seed=3)
    assert counts == long_tailed_counts(200, 10, "exp", 0.1)
    assert np.bincount(labels[indices], minlength=10).tolist() == counts
    assert len(np.unique(indices)) == len(indices)
    again, _ = long_tailed_indices(labels, "exp", 0.1, seed=3)
    other, _ = long_tailed_indices(labels, "exp", 0.1, seed=4)
    np.testing.assert_array_equal(indices, again)
    assert not np.array_equal(indices, other)


def test_drw_weights_by_hand():
    counts = [1000, 100, 10]
    raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in counts]
    expected = [3 * value / sum(raw) for value in raw]
    np.testing.assert_allclose(drw_class_weights(counts), expected, rtol=1e-12)
    assert math.isclose(drw_class_weights(counts).sum(), 3.0)
    assert np.all(np.diff(drw_class_weights(counts)) > 0)  # rarer classes weigh more
    np.testing.assert_allclose(drw_class_weights([5, 7], beta=0.0), [1.0, 1.0])  # beta 0: no re-weighting
    with pytest.raises(ValueError, match="DRW beta must be in"):
        drw_class_weights(counts, beta=1.0)


def test_shot_groups():
    assert shot_groups([6000, 1000, 999, 200, 199, 60]) == ["many", "many", "medium", "medium", "few", "few"]
    with pytest.raises(ValueError, match="few <= many"):
        shot_groups([1], many=10, few=20)
