"""GPU kernels against the float64 spec.

Kernel level (the library's extern "C" entry points), on two devices: "emulated",
the kernels of margin_softmax.cu compiled for the CPU against an emulated CUDA
runtime (`make emulated`, which `make test` builds: runs everywhere), and "cuda",
the nvcc build on a GPU through CuPy (wherever a GPU, CuPy and `make cuda` are
present; no GPU build of MXNet needed). MXNet level: runs with a GPU build of
MXNet. What cannot run skips, saying why.
"""
import math
import os
import shutil

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import mx_lsoftmax
from mx_lsoftmax import spec
from mx_lsoftmax import MarginSettings
from mx_lsoftmax.support.cuda_harness import (BAD_SETTINGS, GRADIENT_OVERFLOW, SUCCESS, HarnessUnavailable,
                                             KernelHarness)

from conftest import (BETAS, KIND_CASES, MARGINS, TOLERANCE, angle_clear_inputs, kind_inputs, nd,
                      tiny_row_case, unit_rows_case, assert_unit_rows_match)

SCHEDULE_NAMES = ("beta", "beta_min", "scale", "gamma", "power")


@pytest.fixture(scope="module", params=["emulated", "cuda"])
def kernels(request):
    if request.param == "emulated":
        return request.getfixturevalue("emulated_kernels")
    try:
        return KernelHarness()
    except HarnessUnavailable as reason:
        if reason.gpu_present:  # a GPU without the library is a broken set-up, not a skip
            pytest.fail(f"a GPU is present but {reason}")
        pytest.skip(str(reason))


def run_kernels(kernels, data, weight, label, settings, grad, dtype, step=0.0):
    device = kernels.device
    x, w = device.asarray(data, dtype=dtype), device.asarray(weight, dtype=dtype)
    y = device.asarray(label, dtype=device.int64)
    step_array = device.full((1,), step, dtype=dtype)
    status, saved, out = kernels.forward(x, w, y, step_array, settings)
    if status != SUCCESS:
        return status, None
    status, full_data, full_weight = kernels.backward(device.asarray(grad, dtype=dtype), saved)
    assert status == SUCCESS
    return status, dict(out=device.asnumpy(out), beta=float(saved["beta_used"][0]), step=float(step_array[0]),
                        grad_data=device.asnumpy(full_data), grad_weight=device.asnumpy(full_weight))


def spec_result(settings, data, weight, label, grad, dtype):
    values = {k: v for k, v in settings.values.items() if k not in SCHEDULE_NAMES}
    beta = settings.beta_at(0)
    floor = float(np.sqrt(np.finfo(dtype).eps))
    return (spec.family_forward(settings.kind, data, weight, label, beta, **values),
            *spec.family_backward(settings.kind, data, weight, label, beta, grad, angle_floor=floor, **values))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", KIND_CASES)
@pytest.mark.parametrize("beta", BETAS)
def test_kernels_match_spec(kernels, dtype, case, beta):
    kind, values = KIND_CASES[case]
    settings = MarginSettings(kind, **values, beta=beta, beta_min=0.0, gamma=0.0)
    data, weight, label = kind_inputs(kind, settings.values, 64, 300, 11, seed=2)  # D > block size
    label[:8] = 3  # several rows share a class: the weight gradient's atomics add up
    grad = np.random.default_rng(3).standard_normal((64, 11))
    status, result = run_kernels(kernels, data, weight, label, settings, grad, dtype)
    assert status == SUCCESS
    tolerance = TOLERANCE[dtype] if dtype == "float64" else dict(rtol=1e-3, atol=1e-3)
    for key, want in zip(("out", "grad_data", "grad_weight"), spec_result(settings, data, weight, label, grad, dtype)):
        scale = max(1.0, float(np.abs(want).max())) if dtype == "float32" else 1.0
        np.testing.assert_allclose(result[key] / scale, want / scale, **tolerance)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", KIND_CASES)
def test_kernels_outside_training_give_the_plain_logits(kernels, dtype, case):
    """training = 0 (Module's score and predict): the plain logits (K2) and their gradient, no
    label read (an out-of-range one is no error), the step kept."""
    kind, values = KIND_CASES[case]
    settings = MarginSettings(kind, **values, beta=2.0)
    data, weight, _ = kind_inputs(kind, settings.values, 64, 300, 11, seed=4)
    grad = np.random.default_rng(5).standard_normal((64, 11))
    device = kernels.device
    step = device.zeros((1,), dtype=dtype)
    status, saved, out = kernels.forward(device.asarray(data, dtype=dtype), device.asarray(weight, dtype=dtype),
                                         device.full((64,), 99, dtype=device.int64), step, settings,
                                         training=device.zeros((1,), dtype=device.float32))
    assert status == SUCCESS and float(step[0]) == 0.0
    status, grad_data, grad_weight = kernels.backward(device.asarray(grad, dtype=dtype), saved)
    assert status == SUCCESS
    wants = (spec.family_inference(kind, data, weight, **values),
             *spec.family_backward(kind, data, weight, np.zeros(0), 0.0, grad, **values))  # no target
    tolerance = TOLERANCE[dtype] if dtype == "float64" else dict(rtol=1e-3, atol=1e-3)
    for got, want in zip((out, grad_data, grad_weight), wants):
        scale = max(1.0, float(np.abs(want).max())) if dtype == "float32" else 1.0
        np.testing.assert_allclose(device.asnumpy(got) / scale, want / scale, **tolerance)


@pytest.mark.parametrize("kind, rows, dims, classes", [("lsoftmax", 128, 128, 9000), ("cosface", 1025, 4, 1025)])
def test_kernels_grid_stride_past_the_grid_cap(kernels, kind, rows, dims, classes):
    """The element-wise kernels launch at most 4096 blocks of 256 threads and stride over the
    rest: (N, C) and (C, D) arrays above 4096 x 256 entries take every thread round more than
    once (lsoftmax scales its weight rows, cosface its logits; the sizes keep the emulation's
    one-block-per-row kernels short)."""
    settings = MarginSettings(kind, beta=1.0)
    data, weight, label = kind_inputs(kind, settings.values, rows, dims, classes, seed=7)
    assert (classes * dims if kind == "lsoftmax" else rows * classes) > 4096 * 256
    grad = np.random.default_rng(8).standard_normal((rows, classes))
    status, result = run_kernels(kernels, data, weight, label, settings, grad, "float64")
    assert status == SUCCESS
    for key, want in zip(("out", "grad_data", "grad_weight"), spec_result(settings, data, weight, label, grad, "float64")):
        np.testing.assert_allclose(result[key], want, **TOLERANCE["float64"])


@pytest.mark.parametrize("margin", MARGINS)
def test_kernels_lsoftmax_every_margin(kernels, margin):
    settings = MarginSettings("lsoftmax", margin=margin, beta=3.5)
    data, weight, label = angle_clear_inputs(32, 40, 7, margin, seed=margin)
    grad = np.random.default_rng(margin).standard_normal((32, 7))
    status, result = run_kernels(kernels, data, weight, label, settings, grad, "float64")
    assert status == SUCCESS
    for key, want in zip(("out", "grad_data", "grad_weight"), spec_result(settings, data, weight, label, grad, "float64")):
        np.testing.assert_allclose(result[key], want, **TOLERANCE["float64"])


@pytest.mark.parametrize("case", KIND_CASES)
def test_kernels_edge_angles_and_zero_rows(kernels, case):
    kind, values = KIND_CASES[case]
    settings = MarginSettings(kind, **values)
    weight = np.array([[0.6, 0.0, 0.0], [0.3, -0.2, 0.9], [0.0, 0.0, 0.0]])
    angles = [0.0, 1e-9, math.pi - 1e-9, math.pi, 1.0]
    data = np.array([[1.7 * math.cos(a), 1.7 * math.sin(a), 0.0] for a in angles] + [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    label = np.array([0] * len(angles) + [1, 2])  # a zero data row, then a zero weight row
    grad = np.random.default_rng(0).standard_normal((len(label), 3))
    status, result = run_kernels(kernels, data, weight, label, settings, grad, "float64")
    assert status == SUCCESS
    for key in ("out", "grad_data", "grad_weight"):
        assert np.all(np.isfinite(result[key]))
    want = spec_result(settings, data, weight, label, grad, "float64")
    np.testing.assert_allclose(result["out"], want[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result["grad_data"], want[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result["grad_weight"], want[2], rtol=1e-6, atol=1e-6)


def test_kernels_schedule_bad_label_and_bad_settings(kernels):
    data, weight, label = angle_clear_inputs(8, 5, 4, 2, seed=1)
    schedule = dict(beta=100.0, beta_min=0.0, scale=0.99, gamma=0.0, power=1.0)
    settings = MarginSettings("lsoftmax", margin=2, **schedule)
    status, result = run_kernels(kernels, data, weight, label, settings, np.ones((8, 4)), "float64", step=460.0)
    assert status == SUCCESS
    assert result["beta"] == pytest.approx(mx_lsoftmax.beta_at(460, **schedule), rel=1e-12)
    assert result["step"] == 461.0
    label[5] = 4
    status, _ = run_kernels(kernels, data, weight, label, settings, np.ones((8, 4)), "float64")
    assert status == 5
    device = kernels.device
    x = device.asarray(data)
    status, _, _ = kernels.forward(x, device.asarray(weight), device.zeros((8,), device.int64), device.zeros((1,)),
                                   b"kind=cosface;m1=2")
    assert status == BAD_SETTINGS and "m1" in kernels.last_error()


@pytest.mark.parametrize("kind, tiny", [("cosface", "data"), ("arcface", "data"), ("sphereface", "weight"),
                                        ("combined", "weight")])
def test_kernels_name_rows_too_small_for_float32(kernels, kind, tiny):
    """As the CPU op does (tests/test_lsoftmax_errors.py): a float32 row of norm ~1e-42 under
    normalisation makes its gradient, about s / |x| or 1 / |w| times the logits' gradient,
    leave float32. The forward takes it; the backward stops naming the row instead of writing
    inf (the target kernels for a data row, the normalise kernels for a weight row)."""
    data, weight, label = tiny_row_case(tiny)
    grad = np.ones((5, 3))
    settings = MarginSettings(kind)
    device = kernels.device
    status, saved, out = kernels.forward(device.asarray(data, device.float32), device.asarray(weight, device.float32),
                                         device.asarray(label, device.int64), device.zeros((1,), device.float32),
                                         settings)
    assert status == SUCCESS and np.isfinite(device.asnumpy(out)).all()
    status, _, _ = kernels.backward(device.asarray(grad, device.float32), saved)
    assert status == GRADIENT_OVERFLOW
    row = 2 if tiny == "data" else 1
    assert f"input {tiny} row {row} has norm" in kernels.last_error()
    assert "overflows float32" in kernels.last_error()
    # The same rows in float64 train, and so does float32 without them.
    status, result = run_kernels(kernels, data, weight, label, settings, grad, "float64")
    assert status == SUCCESS and all(np.isfinite(result[key]).all() for key in ("out", "grad_data", "grad_weight"))
    data[2], weight[1] = np.random.default_rng(22).standard_normal((2, 4))
    status, result = run_kernels(kernels, data, weight, label, settings, grad, "float32")
    assert status == SUCCESS and all(np.isfinite(result[key]).all() for key in ("out", "grad_data", "grad_weight"))


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


def test_c_entry_points_parse_settings_with_the_op_parser():
    """The CuPy entry points take the settings as text through parse_settings, before any CUDA
    call, so this runs without a GPU wherever `make cuda` has built the library."""
    import ctypes
    from mx_lsoftmax.support.cuda_harness import CUDA_LIBRARY, settings_text
    if not os.path.exists(CUDA_LIBRARY):
        if os.environ.get("CI") and shutil.which("nvcc"):
            pytest.fail("CI has nvcc but the CUDA library is not built")
        pytest.skip("the CUDA library is not built (run `make cuda`)")
    library = ctypes.CDLL(CUDA_LIBRARY)
    library.margin_softmax_last_error.restype = ctypes.c_char_p
    forward = library.margin_softmax_forward_float64
    pointers = 12  # logits, data, weight, unit_weight_norm, label, step, training, class_margins, out,
    #               beta_used, data_norm, weight_norm
    forward.argtypes = ([ctypes.c_void_p] * pointers + [ctypes.c_int64] * 3
                        + [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p])
    for text, message in ((b"kind=cosface;m1=2", "kind cosface does not take the setting 'm1'"),
                          (b"kind=arcface;s=0", "parameter s must be > 0, got 0"),
                          (b"kind=sphereface;margin=2.5", "parameter margin must be an integer >= 1, got 2.5"),
                          (b"kind=arcface;per_class_margin=1", "kind arcface does not take the setting 'per_class_margin'"),
                          (b"kind=cosface;per_class_margin=2", "parameter per_class_margin must be in [0, 1], got 2")):
        assert forward(*([None] * pointers), 1, 1, 1, text, None, None) == BAD_SETTINGS
        assert message in library.margin_softmax_last_error().decode()
    assert settings_text(MarginSettings("arcface", margin=0.4)).startswith(b"kind=arcface;")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_per_class_margins_match_spec(kernels, dtype):
    """(K10): cosface with a margin per class (LDAM) through the CUDA kernels."""
    settings = MarginSettings("cosface", s=30.0, per_class_margin=True)
    data, weight, label = kind_inputs("cosface", settings.values, 64, 300, 11, seed=5)
    label[:8] = 3
    margins = np.linspace(0.0, 0.5, 11)
    grad = np.random.default_rng(6).standard_normal((64, 11))
    device = kernels.device
    x, w = device.asarray(data, dtype=dtype), device.asarray(weight, dtype=dtype)
    status, saved, out = kernels.forward(x, w, device.asarray(label, dtype=device.int64), device.zeros((1,), dtype=dtype),
                                         settings, class_margins=device.asarray(margins, dtype=dtype))
    assert status == SUCCESS
    status, grad_data, grad_weight = kernels.backward(device.asarray(grad, dtype=dtype), saved)
    assert status == SUCCESS
    floor = float(np.sqrt(np.finfo(dtype).eps))
    want = (spec.family_forward("cosface", data, weight, label, 0.0, class_margins=margins, s=30.0),
            *spec.family_backward("cosface", data, weight, label, 0.0, grad, angle_floor=floor,
                                  class_margins=margins, s=30.0))
    tolerance = TOLERANCE[dtype] if dtype == "float64" else dict(rtol=1e-3, atol=1e-3)
    for got, expected in zip((out, grad_data, grad_weight), want):
        scale = max(1.0, float(np.abs(expected).max())) if dtype == "float32" else 1.0
        np.testing.assert_allclose(device.asnumpy(got) / scale, expected / scale, **tolerance)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_unit_rows_match_reference(kernels, dtype):
    """The normalise kernels (K11) with D > block size, a zero row and extreme norms, and a
    gradient for the norms too, against explicit normalisation and finite differences."""
    norms = [1.0, 0.0, 2.5, 1e-30, 3e20, 1e-22] + ([1e-160, 1e160] if dtype == "float64" else [])
    weight, grad_unit, grad_norm = unit_rows_case(norms, dims=300)
    weight = weight.astype(dtype).astype(np.float64)
    device = kernels.device
    status, unit, norm = kernels.normalise(device.asarray(weight, dtype=dtype))
    assert status == SUCCESS
    status, gradient = kernels.normalise_backward(device.asarray(grad_unit, dtype=dtype), unit, norm,
                                                  device.asarray(grad_norm))
    assert status == SUCCESS
    assert_unit_rows_match(weight, grad_unit, grad_norm, device.asnumpy(unit), device.asnumpy(norm),
                           device.asnumpy(gradient), dtype)
