"""Both backends against the float64 spec, numeric gradients, edge cases, parity."""
import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import mx_lsoftmax
from mx_lsoftmax import spec

from conftest import (BETAS, MARGINS, NUMERIC_GRADIENT, TOLERANCE, angle_clear_inputs, nd,
                      numeric_gradient)

# Both routes of the Python op (host and engine) in every backend-parametrized test.
BOTH_PYTHON_ROUTES = True


def run_layer(backend, data, weight, label, margin, beta, grad_output, **schedule):
    """One training forward + backward through the entry point; returns (out, d data, d weight)."""
    dtype = data.dtype
    x, w = nd(data), nd(weight)
    x.attach_grad()
    w.attach_grad()
    with autograd.record():
        out = mx_lsoftmax.lsoftmax(x, w, nd(label, "float32"), weight.shape[0], margin=margin,
                                   beta=beta, backend=backend, **schedule)
    out.backward(nd(grad_output, dtype))
    return out.asnumpy(), x.grad.asnumpy(), w.grad.asnumpy()


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("beta", BETAS)
def test_forward_and_gradients_match_spec(backend, dtype, margin, beta):
    data, weight, label = angle_clear_inputs(16, 7, 5, margin, seed=margin, dtype=dtype)
    grad = np.random.default_rng(margin).standard_normal((16, 5)).astype(dtype)
    out, grad_data, grad_weight = run_layer(backend, data, weight, label, margin, beta, grad)
    expected = spec.forward(data, weight, label, margin, beta)
    expected_data, expected_weight = spec.backward(data, weight, label, margin, beta, grad)
    np.testing.assert_allclose(out, expected, **TOLERANCE[dtype])
    np.testing.assert_allclose(grad_data, expected_data, **TOLERANCE[dtype])
    np.testing.assert_allclose(grad_weight, expected_weight, **TOLERANCE[dtype])


def test_margin_one_beta_zero_is_fully_connected(backend, dtype):
    data, weight, label = angle_clear_inputs(9, 4, 6, 1, seed=1, dtype=dtype)
    grad = np.random.default_rng(1).standard_normal((9, 6)).astype(dtype)
    out, grad_data, grad_weight = run_layer(backend, data, weight, label, 1, 0.0, grad)
    x, w = nd(data), nd(weight)
    x.attach_grad()
    w.attach_grad()
    with autograd.record():
        plain = mx.nd.FullyConnected(x, w, no_bias=True, num_hidden=6)
    plain.backward(nd(grad))
    np.testing.assert_allclose(out, plain.asnumpy(), **TOLERANCE[dtype])
    np.testing.assert_allclose(grad_data, x.grad.asnumpy(), **TOLERANCE[dtype])
    np.testing.assert_allclose(grad_weight, w.grad.asnumpy(), **TOLERANCE[dtype])


def test_inference_is_plain_product(backend, dtype):
    data, weight, label = angle_clear_inputs(8, 5, 4, 4, seed=2, dtype=dtype)
    out = mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), 4, margin=4, beta=0.0,
                               backend=backend)
    np.testing.assert_allclose(out.asnumpy(), data @ weight.T, **TOLERANCE[dtype])
    with autograd.record(train_mode=False):
        out = mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), 4, margin=4, backend=backend)
    np.testing.assert_allclose(out.asnumpy(), data @ weight.T, **TOLERANCE[dtype])


def test_integer_and_float_labels_agree(backend):
    data, weight, label = angle_clear_inputs(6, 3, 4, 3, seed=4)
    grad = np.ones((6, 4))
    results = []
    for label_dtype in ("int32", "int64", "float32", "float64", "uint8"):
        x, w = nd(data), nd(weight)
        with autograd.record():
            out = mx_lsoftmax.lsoftmax(x, w, nd(label, label_dtype), 4, margin=3, backend=backend)
        results.append(out.asnumpy())
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("beta", BETAS)
def test_numeric_gradient_float64(backend, margin, beta):
    """Analytic gradients of the training output against finite differences in float64.

    (mxnet.test_utils.check_numeric_gradient perturbs every input, the label
    too, so the differences are taken here over data and weight only.)
    """
    data, weight, label = angle_clear_inputs(5, 4, 3, margin, seed=10 + margin, clearance=0.08)
    projection = np.random.default_rng(margin).standard_normal((5, 3))

    def loss():
        with autograd.record():
            out = mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), 3, margin=margin, beta=beta,
                                       backend=backend)
        return float(np.sum(out.asnumpy() * projection))

    _, grad_data, grad_weight = run_layer(backend, data, weight, label, margin, beta, projection)
    eps, rtol, atol = (NUMERIC_GRADIENT[key] for key in ("numeric_eps", "rtol", "atol"))
    np.testing.assert_allclose(grad_data, numeric_gradient(loss, data, eps), rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad_weight, numeric_gradient(loss, weight, eps), rtol=rtol, atol=atol)


def _single_row(angle, margin, norm_x=1.7, norm_w=0.6):
    """x at `angle` from w = e_0 (in the plane of e_0, e_1), in float64."""
    weight = np.zeros((2, 3))
    weight[0, 0] = norm_w
    weight[1] = [0.3, -0.2, 0.9]
    data = norm_x * np.array([[math.cos(angle), math.sin(angle), 0.0]])
    return data, weight, np.array([0])


@pytest.mark.parametrize("margin", (2, 3, 4, 6))
def test_continuous_across_thresholds(backend, margin):
    """theta = k pi / m +- 1e-9: the output and the gradient agree on both sides."""
    grad = np.array([[1.0, 0.5]])
    for k in range(1, margin):
        sides = []
        for offset in (-1e-9, 1e-9):
            data, weight, label = _single_row(k * math.pi / margin + offset, margin)
            result = run_layer(backend, data, weight, label, margin, 0.0, grad)
            expected = spec.forward(data, weight, label, margin, 0.0)
            np.testing.assert_allclose(result[0], expected, rtol=1e-8, atol=1e-8)
            assert all(np.all(np.isfinite(part)) for part in result)
            sides.append(result)
        for below, above in zip(*sides):
            np.testing.assert_allclose(below, above, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("angle", (0.0, 1e-9, math.pi - 1e-9, math.pi))
def test_cosine_near_one_in_magnitude(backend, dtype, angle):
    data, weight, label = _single_row(angle, 4)
    data, weight = data.astype(dtype), weight.astype(dtype)
    grad = np.array([[1.0, -1.0]], dtype=dtype)
    out, grad_data, grad_weight = run_layer(backend, data, weight, label, 4, 0.0, grad)
    expected_data, expected_weight = spec.backward(data, weight, label, 4, 0.0, grad)
    np.testing.assert_allclose(out, spec.forward(data, weight, label, 4, 0.0), **TOLERANCE[dtype])
    scale = TOLERANCE[dtype]["atol"] * 100  # the gradient of clip() at |c| = 1 is rounding-sized
    np.testing.assert_allclose(grad_data, expected_data, rtol=scale, atol=scale)
    np.testing.assert_allclose(grad_weight, expected_weight, rtol=scale, atol=scale)


def test_zero_rows_give_plain_logit_and_finite_gradient(backend, dtype):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((4, 3)).astype(dtype)
    weight = rng.standard_normal((3, 3)).astype(dtype)
    data[1] = 0.0          # zero feature row
    weight[2] = 0.0        # zero weight row, the target of sample 2
    label = np.array([0, 1, 2, 0])
    grad = rng.standard_normal((4, 3)).astype(dtype)
    out, grad_data, grad_weight = run_layer(backend, data, weight, label, 4, 0.0, grad)
    assert out[1, 1] == 0.0 and out[2, 2] == 0.0
    for part in (out, grad_data, grad_weight):
        assert np.all(np.isfinite(part))
    expected_data, expected_weight = spec.backward(data, weight, label, 4, 0.0, grad)
    np.testing.assert_allclose(out, spec.forward(data, weight, label, 4, 0.0), **TOLERANCE[dtype])
    np.testing.assert_allclose(grad_data, expected_data, **TOLERANCE[dtype])
    np.testing.assert_allclose(grad_weight, expected_weight, **TOLERANCE[dtype])


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("beta", BETAS)
def test_backends_agree_in_float64(margin, beta):
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    data, weight, label = angle_clear_inputs(32, 9, 7, margin, seed=20 + margin, clearance=0.0)
    grad = np.random.default_rng(margin).standard_normal((32, 7))
    python = run_layer("python", data, weight, label, margin, beta, grad)
    compiled = run_layer("compiled", data, weight, label, margin, beta, grad)
    for left, right in zip(python, compiled):
        np.testing.assert_allclose(left, right, rtol=1e-10, atol=1e-10)
