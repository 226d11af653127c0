"""The beta schedule (D12) and the validation of every setting."""
import math

import pytest

from mx_lsoftmax import MarginSettings, beta_at


def test_caffe_mnist_power_decay():
    caffe = dict(beta=1000.0, gamma=2.5e-5, power=35.0)
    assert beta_at(0, **caffe) == pytest.approx(1000.0)
    assert beta_at(1000, **caffe) == pytest.approx(421.37, abs=0.01)
    assert beta_at(5000, **caffe) == pytest.approx(16.0, rel=0.02)
    assert beta_at(10000, **caffe) == pytest.approx(0.4056, abs=1e-4)


def test_mx_lsoftmax_geometric_decay():
    assert beta_at(460, beta=100.0, scale=0.99) == pytest.approx(100 * 0.99 ** 460)
    assert beta_at(460, beta=100.0, scale=0.99) == pytest.approx(0.98, abs=0.01)
    assert beta_at(917, beta=100.0, scale=0.99) == pytest.approx(0.01, abs=0.0005)
    assert beta_at(917, beta=100.0, scale=0.99, beta_min=0.5) == 0.5


def test_combined_formula_and_underflow():
    value = beta_at(7, beta=5.0, beta_min=0.1, scale=0.9, gamma=0.1, power=2.0)
    assert value == pytest.approx(max(0.1, 5.0 * 0.9 ** 7 * (1 + 0.7) ** -2))
    assert beta_at(10 ** 9, beta=5.0, scale=0.5) == 0.0  # underflows, never NaN
    assert beta_at(10 ** 9, beta=0.0, beta_min=2.0) == 2.0


def test_params_defaults_and_parsing_from_strings():
    params = MarginSettings()
    assert params.kind == "lsoftmax"
    assert (params.margin, params.beta, params.beta_min, params.scale, params.gamma, params.power) \
        == (2, 0.0, 0.0, 1.0, 0.0, 1.0)
    parsed = MarginSettings.from_attrs(params.as_attrs() | {"margin": "4", "beta": "0.1"})
    assert parsed.margin == 4 and parsed.beta == 0.1 and parsed.kind == "lsoftmax"


@pytest.mark.parametrize("name, value, message", [
    ("margin", 0, "margin must be an integer >= 1, got 0"),
    ("margin", 2.5, "margin must be an integer >= 1, got 2.5"),
    ("margin", "two", "margin must be an integer >= 1, got 'two'"),
    ("beta", -1.0, "beta must be >= 0, got -1.0"),
    ("beta", math.nan, "beta must be finite"),
    ("beta_min", -0.5, "beta_min must be >= 0, got -0.5"),
    ("scale", 0.0, "scale must be in (0, 1], got 0.0"),
    ("scale", 1.5, "scale must be in (0, 1], got 1.5"),
    ("gamma", -1e-3, "gamma must be >= 0, got -0.001"),
    ("power", 0.0, "power must be > 0, got 0.0"),
])
def test_bad_settings_name_the_parameter_and_value(name, value, message):
    with pytest.raises(ValueError) as error:
        MarginSettings(**{name: value})
    assert message in str(error.value)
