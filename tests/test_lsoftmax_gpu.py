"""GPU kernels against the float64 spec.

Kernel level (CuPy + the library's extern "C" entry points): runs wherever a
GPU, CuPy and `make cuda` are present, no GPU build of MXNet needed. MXNet
level: runs with a GPU build of MXNet. Everything else skips, saying why.
"""
import math
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import mx_lsoftmax
from mx_lsoftmax import spec
from mx_lsoftmax.support.cuda_harness import SUCCESS, HarnessUnavailable, KernelHarness

from conftest import BETAS, MARGINS, TOLERANCE, angle_clear_inputs, nd


@pytest.fixture(scope="module")
def kernels():
    try:
        return KernelHarness()
    except HarnessUnavailable as reason:
        if reason.gpu_present:  # a GPU without the library is a broken set-up, not a skip
            pytest.fail(f"a GPU is present but {reason}")
        pytest.skip(str(reason))


def run_kernels(kernels, data, weight, label, margin, grad, dtype, step=0.0, **schedule):
    cupy = kernels.cupy
    x, w = cupy.asarray(data, dtype=dtype), cupy.asarray(weight, dtype=dtype)
    y = cupy.asarray(label, dtype=cupy.int64)
    step_array = cupy.full((1,), step, dtype=dtype)
    status, logits, out, beta_used = kernels.forward(x, w, y, step_array, margin, **schedule)
    if status != SUCCESS:
        return status, None
    status, full_data, full_weight = kernels.backward(cupy.asarray(grad, dtype=dtype), logits, x, w, y,
                                                      beta_used, margin)
    assert status == SUCCESS
    return status, dict(out=cupy.asnumpy(out), beta=float(beta_used[0]), step=float(step_array[0]),
                        grad_data=cupy.asnumpy(full_data), grad_weight=cupy.asnumpy(full_weight))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("beta", BETAS)
def test_kernels_match_spec(kernels, dtype, margin, beta):
    data, weight, label = angle_clear_inputs(64, 300, 11, margin, seed=margin)  # D > block size
    label[:8] = 3  # several rows share a class: the weight gradient's atomics add up
    grad = np.random.default_rng(margin).standard_normal((64, 11))
    status, result = run_kernels(kernels, data, weight, label, margin, grad, dtype, beta=beta)
    assert status == SUCCESS
    expected_data, expected_weight = spec.backward(data, weight, label, margin, beta, grad)
    tolerance = TOLERANCE[dtype] if dtype == "float64" else dict(rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(result["out"], spec.forward(data, weight, label, margin, beta), **tolerance)
    np.testing.assert_allclose(result["grad_data"], expected_data, **tolerance)
    np.testing.assert_allclose(result["grad_weight"], expected_weight, **tolerance)


def test_kernels_zero_rows_and_thresholds(kernels):
    margin = 4
    weight = np.array([[0.6, 0.0, 0.0], [0.3, -0.2, 0.9], [0.0, 0.0, 0.0]])
    angles = [k * math.pi / margin + offset for k in range(1, margin) for offset in (-1e-9, 1e-9)]
    angles += [0.0, math.pi]
    data = np.array([[1.7 * math.cos(a), 1.7 * math.sin(a), 0.0] for a in angles] + [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    label = np.array([0] * len(angles) + [1, 2])  # a zero data row, then a zero weight row
    grad = np.random.default_rng(0).standard_normal((len(label), 3))
    status, result = run_kernels(kernels, data, weight, label, margin, grad, "float64")
    assert status == SUCCESS
    for key in ("out", "grad_data", "grad_weight"):
        assert np.all(np.isfinite(result[key]))
    expected_data, expected_weight = spec.backward(data, weight, label, margin, 0.0, grad)
    np.testing.assert_allclose(result["out"], spec.forward(data, weight, label, margin, 0.0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result["grad_data"], expected_data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result["grad_weight"], expected_weight, rtol=1e-6, atol=1e-6)


def test_kernels_schedule_and_bad_label(kernels):
    data, weight, label = angle_clear_inputs(8, 5, 4, 2, seed=1)
    schedule = dict(beta=100.0, beta_min=0.0, scale=0.99, gamma=0.0, power=1.0)
    status, result = run_kernels(kernels, data, weight, label, 2, np.ones((8, 4)), "float64",
                                 step=460.0, **schedule)
    assert status == SUCCESS
    assert result["beta"] == pytest.approx(mx_lsoftmax.beta_at(460, **schedule), rel=1e-12)
    assert result["step"] == 461.0
    label[5] = 4
    status, _ = run_kernels(kernels, data, weight, label, 2, np.ones((8, 4)), "float64")
    assert status == 5


needs_mxnet_gpu = pytest.mark.skipif(mx.context.num_gpus() == 0, reason="MXNet has no GPU (CPU build or no device)")


@needs_mxnet_gpu
@pytest.mark.parametrize("margin", MARGINS)
def test_mxnet_gpu_context_matches_spec(margin):
    data, weight, label = angle_clear_inputs(16, 7, 5, margin, seed=margin)
    grad = np.random.default_rng(margin).standard_normal((16, 5))
    x, w = nd(data).as_in_context(mx.gpu()), nd(weight).as_in_context(mx.gpu())
    x.attach_grad()
    w.attach_grad()
    with autograd.record():
        out = mx_lsoftmax.lsoftmax(x, w, nd(label).as_in_context(mx.gpu()), 5, margin=margin,
                                   beta=1.0, backend="compiled")
    out.backward(nd(grad).as_in_context(mx.gpu()))
    expected_data, expected_weight = spec.backward(data, weight, label, margin, 1.0, grad)
    np.testing.assert_allclose(out.asnumpy(), spec.forward(data, weight, label, margin, 1.0), **TOLERANCE["float64"])
    np.testing.assert_allclose(x.grad.asnumpy(), expected_data, **TOLERANCE["float64"])
    np.testing.assert_allclose(w.grad.asnumpy(), expected_weight, **TOLERANCE["float64"])
