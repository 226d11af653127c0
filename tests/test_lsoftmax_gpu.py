"""GPU kernels against the float64 spec.

Kernel level (CuPy + the library's extern "C" entry points): runs wherever a
GPU, CuPy and `make cuda` are present, no GPU build of MXNet needed. MXNet
level: runs with a GPU build of MXNet. Everything else skips, saying why.
"""
import ctypes
import math
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import mx_lsoftmax
from mx_lsoftmax import spec

from conftest import BETAS, MARGINS, TOLERANCE, angle_clear_inputs, nd

CUDA_LIBRARY = os.path.join(os.path.dirname(mx_lsoftmax.__file__), "lib", "liblsoftmax_cuda.so")
SUCCESS = -1


def _cupy():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError as error:
        pytest.skip(f"no usable CUDA GPU ({error})")
    if not os.path.exists(CUDA_LIBRARY):
        pytest.fail(f"a GPU is present but {CUDA_LIBRARY} is not built: run `make cuda`")
    return cupy


@pytest.fixture(scope="module")
def kernels():
    cupy = _cupy()
    library = ctypes.CDLL(CUDA_LIBRARY)
    pointer, int64, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("float32", "float64"):
        forward = getattr(library, f"lsoftmax_forward_{suffix}")
        forward.argtypes = [pointer] * 7 + [int64] * 3 + [ctypes.c_int] + [real] * 5 + [pointer] * 2
        forward.restype = ctypes.c_int
        backward = getattr(library, f"lsoftmax_backward_{suffix}")
        backward.argtypes = [pointer] * 9 + [int64] * 3 + [ctypes.c_int] + [pointer] * 2
        backward.restype = ctypes.c_int
    return cupy, library


def run_kernels(kernels, data, weight, label, margin, grad, dtype, step=0.0, **schedule):
    cupy, library = kernels
    rows, classes, dims = data.shape[0], weight.shape[0], data.shape[1]
    x, w = cupy.asarray(data, dtype=dtype), cupy.asarray(weight, dtype=dtype)
    y = cupy.asarray(label, dtype=cupy.int64)
    logits = x @ w.T
    step_array = cupy.full((1,), step, dtype=dtype)
    out, beta_used = cupy.empty_like(logits), cupy.empty((1,), dtype=dtype)
    flag = cupy.empty((1,), dtype=cupy.int32)
    settings = dict(beta=0.0, beta_min=0.0, scale=1.0, gamma=0.0, power=1.0) | schedule
    suffix = np.dtype(dtype).name
    status = getattr(library, f"lsoftmax_forward_{suffix}")(
        logits.data.ptr, x.data.ptr, w.data.ptr, y.data.ptr, step_array.data.ptr, out.data.ptr,
        beta_used.data.ptr, rows, classes, dims, margin, *settings.values(), flag.data.ptr, None)
    if status != SUCCESS:
        return status, None
    g = cupy.asarray(grad, dtype=dtype)
    grad_logits, grad_data, grad_weight = cupy.empty_like(logits), cupy.empty_like(x), cupy.empty_like(w)
    status = getattr(library, f"lsoftmax_backward_{suffix}")(
        g.data.ptr, logits.data.ptr, x.data.ptr, w.data.ptr, y.data.ptr, beta_used.data.ptr,
        grad_logits.data.ptr, grad_data.data.ptr, grad_weight.data.ptr, rows, classes, dims,
        margin, flag.data.ptr, None)
    assert status == SUCCESS
    # The full layer's gradients: the product path (cuBLAS) plus the kernels' norm path.
    full_data = grad_logits @ w + grad_data
    full_weight = grad_logits.T @ x + grad_weight
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
