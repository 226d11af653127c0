"""The float64 spec itself, checked against hand-worked values and arccos."""
import math

import numpy as np
import pytest

from mx_lsoftmax import spec

from conftest import MARGINS


@pytest.mark.parametrize("margin", MARGINS)
def test_expansion_equals_cos_of_multiple_angle(margin):
    theta = np.linspace(0.0, math.pi, 1001)
    np.testing.assert_allclose(spec.cos_multiple_angle(np.cos(theta), margin),
                               np.cos(margin * theta), atol=1e-12)


@pytest.mark.parametrize("margin", MARGINS)
def test_interval_index_matches_arccos(margin):
    theta = np.linspace(0.0, math.pi, 1002)  # step pi/1001: no point on a threshold for m <= 6
    expected = np.minimum(np.floor(theta * margin / math.pi), margin - 1).astype(int)
    np.testing.assert_array_equal(spec.target_interval(np.cos(theta), margin), expected)


@pytest.mark.parametrize("margin", MARGINS)
def test_psi_is_continuous_and_decreasing_in_theta(margin):
    theta = np.linspace(0.0, math.pi, 20001)
    values = spec.psi(np.cos(theta), margin)
    assert np.all(np.diff(values) <= 1e-12)
    assert np.max(np.abs(np.diff(values))) < 1e-2  # no jump at theta = k pi / m
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(1.0 - 2.0 * margin)


@pytest.mark.parametrize("margin", MARGINS)
def test_psi_derivative_matches_finite_difference(margin):
    c = np.linspace(-0.999, 0.999, 401)
    c = c[np.min([np.abs(c - math.cos(j * math.pi / margin)) for j in range(margin + 1)], axis=0) > 1e-3]
    h = 1e-7
    numeric = (spec.psi(c + h, margin) - spec.psi(c - h, margin)) / (2 * h)
    np.testing.assert_allclose(spec.psi_derivative(c, margin), numeric, rtol=1e-6, atol=1e-6)


def test_hand_worked_margin_two():
    # m = 2: cos 2theta = 2c^2 - 1; theta = 60 deg lies before 90 deg, so k = 0.
    c = 0.5
    assert spec.cos_multiple_angle(c, 2) == pytest.approx(-0.5)
    assert spec.target_interval(c, 2) == 0
    assert spec.psi(c, 2) == pytest.approx(-0.5)
    assert spec.psi_derivative(c, 2) == pytest.approx(2.0)  # 4c
    # theta = 120 deg: k = 1, psi = -cos(240 deg) - 2 = 0.5 - 2 = -1.5, psi' = -4c = 2.
    assert spec.psi(-0.5, 2) == pytest.approx(-1.5)
    assert spec.psi_derivative(-0.5, 2) == pytest.approx(2.0)


def test_hand_worked_target_logit():
    # x = (3, 0), w = (1, 1): |x| = 3, |w| = sqrt 2, z = 3, c = 1/sqrt 2 (45 deg).
    # m = 2: psi = cos 90 deg = 0, psi' = 4c = 2 sqrt 2.
    # beta = 1: o = (1 * 3 + 3 sqrt2 * 0) / 2 = 1.5; do/dz = (1 + 2 sqrt 2) / 2;
    # do/d|x| = sqrt 2 (0 - (1/sqrt 2)(2 sqrt 2)) / 2 = -sqrt 2; do/d|w| = 3 (-2) / 2 = -3.
    o, d_z, d_norm_x, d_norm_w = spec.target_logit(3.0, 3.0, math.sqrt(2), 1.0, 2)
    assert o == pytest.approx(1.5)
    assert d_z == pytest.approx((1 + 2 * math.sqrt(2)) / 2)
    assert d_norm_x == pytest.approx(-math.sqrt(2))
    assert d_norm_w == pytest.approx(-3.0)
    forward = spec.forward([[3.0, 0.0]], [[1.0, 1.0], [0.0, 2.0]], [0], 2, 1.0)
    np.testing.assert_allclose(forward, [[1.5, 0.0]], atol=1e-12)


def test_backward_matches_finite_differences_of_forward():
    rng = np.random.default_rng(3)
    data, weight = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    label, grad = np.array([0, 4, 4, 2]), rng.standard_normal((4, 5))
    for margin in (1, 3, 4):
        grad_data, grad_weight = spec.backward(data, weight, label, margin, 0.7, grad)
        for array, analytic in ((data, grad_data), (weight, grad_weight)):
            numeric = np.zeros_like(array)
            for index in np.ndindex(array.shape):
                saved = array[index]
                array[index] = saved + 1e-6
                plus = np.sum(spec.forward(data, weight, label, margin, 0.7) * grad)
                array[index] = saved - 1e-6
                minus = np.sum(spec.forward(data, weight, label, margin, 0.7) * grad)
                array[index] = saved
                numeric[index] = (plus - minus) / 2e-6
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)


def test_degenerate_rows_keep_the_plain_logit():
    o, d_z, d_norm_x, d_norm_w = spec.target_logit(np.array([0.0, 0.0]), np.array([0.0, 2.0]),
                                                   np.array([1.0, 0.0]), 0.0, 4)
    np.testing.assert_array_equal(o, [0.0, 0.0])
    np.testing.assert_array_equal(d_z, [1.0, 1.0])
    np.testing.assert_array_equal(d_norm_x, [0.0, 0.0])
    np.testing.assert_array_equal(d_norm_w, [0.0, 0.0])
