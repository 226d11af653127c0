"""The op's GPU functions as MXNet calls them, against its CPU functions, on the same tensors.

MXNet's wheel has no GPU build, so nothing here calls `forward_gpu` and the other lib_api
functions through MXNet. The emulated CUDA library (`make emulated`) carries them with the
kernels compiled for the CPU, and `margin_softmax_call_op` (tools/cuda_emulation/
lib_api_entries.cc) calls any of them on host memory as MXNet's executor would: this checks the
layer between MXNet and the kernels (which input holds the unit rows' norms, where the backward
finds the forward's outputs, what it writes for labels, step and flag, the error messages) by
running the whole layer, normalise op, products and target op, once through the CPU functions
and once through the GPU ones.
"""
import ctypes

import numpy as np
import pytest

from mx_lsoftmax import KINDS, MarginSettings
from mx_lsoftmax.support.cuda_harness import HostDevice, settings_text

from conftest import KIND_CASES, kind_inputs, tiny_row_case

DTYPE_CODES = {"float32": 0, "float64": 1}  # lib_api's MXDType
MAX_RANK = 8  # kMaxRank in lib_api_entries.cc
PARITY = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=2e-6, atol=2e-6)}


def _described(arrays):
    count = len(arrays)
    shapes = (ctypes.c_int64 * (MAX_RANK * count))()
    for index, array in enumerate(arrays):
        shapes[MAX_RANK * index:MAX_RANK * index + array.ndim] = array.shape
    return (count, (ctypes.c_void_p * count)(*[HostDevice.pointer(array) for array in arrays]),
            (ctypes.c_int * count)(*[DTYPE_CODES[array.dtype.name] for array in arrays]),
            (ctypes.c_int * count)(*[array.ndim for array in arrays]), shapes)


def call_op(harness, name, attrs, inputs, outputs):
    """Run the op function ``name`` on NumPy arrays; outputs written in place. Returns the
    error message where it fails, else None."""
    status = harness.library.margin_softmax_call_op(name.encode(), attrs.encode(), *_described(inputs),
                                                    *_described(outputs))
    HostDevice.check_guards()
    assert status in (0, 1), harness.last_error()
    return harness.last_error() if status == 1 else None


def run_layer(harness, placement, settings, data, weight, label, grad, dtype, training=1.0, class_margins=None):
    """The layer as graph.py composes it, with the op functions of ``placement`` ('cpu' or 'gpu')
    and NumPy products in between. Returns every array an op function wrote, by name, or the
    error message of the first function that failed."""
    device = HostDevice
    x, w = device.asarray(data, dtype), device.asarray(weight, dtype)
    rows, classes = x.shape[0], w.shape[0]
    attrs = settings_text(settings).decode()
    written = {}
    unit_rows = KINDS[settings.kind].normalise_weights
    if unit_rows:  # K11: unit rows and their norms first
        unit, norms = device.empty_like(w), device.empty((classes,), np.float64)
        error = call_op(harness, f"normalise_forward_{placement}", f"num_hidden={classes}", [w, x], [unit, norms])
        if error:
            return error
        written.update(unit=unit, norms=norms)
        classifier, weight_input = unit, norms
    else:
        classifier, weight_input = w, w
    logits = device.asarray(x @ classifier.T)
    inputs = [logits, x, weight_input, device.asarray(label, dtype), device.zeros((1,), dtype),
              device.full((1, 1), training, np.float32)]
    if class_margins is not None:
        inputs.append(device.asarray(class_margins, dtype))
    outputs = [device.empty((rows, classes), dtype), device.empty((1,), dtype), device.empty((rows,), np.float64),
               device.empty((classes,), np.float64)]
    error = call_op(harness, f"target_forward_{placement}", attrs, inputs, outputs)
    if error:
        return error
    written.update(out=outputs[0], beta_used=outputs[1], data_norm=outputs[2], weight_norm=outputs[3],
                   step=inputs[4])
    output_grads = [device.asarray(grad, dtype), device.zeros((1,), dtype), device.zeros((rows,), np.float64),
                    device.zeros((classes,), np.float64)]
    input_grads = [device.full(array.shape, np.nan, array.dtype) for array in inputs]  # every one must be written
    error = call_op(harness, f"target_backward_{placement}", attrs, output_grads + inputs + outputs, input_grads)
    if error:
        return error
    names = ["grad_logits", "grad_data_norm_path", "grad_weight_input", "grad_label", "grad_step", "grad_training",
             "grad_class_margins"]
    written.update(zip(names, input_grads))
    grad_classifier = device.asarray(input_grads[0].T @ x)
    if unit_rows:
        grad_rows, grad_shape_only = device.empty_like(w), device.full(x.shape, np.nan, x.dtype)
        error = call_op(harness, f"normalise_backward_{placement}", f"num_hidden={classes}",
                        [grad_classifier, input_grads[2], w, x, unit, norms], [grad_rows, grad_shape_only])
        if error:
            return error
        written.update(grad_rows=grad_rows, grad_data_shape_only=grad_shape_only)
    return written


def assert_same_arrays(cpu, gpu, dtype):
    assert not isinstance(cpu, str) and not isinstance(gpu, str), (cpu, gpu)
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert np.isfinite(cpu[name]).all() and np.isfinite(gpu[name]).all(), name
        np.testing.assert_allclose(gpu[name], cpu[name], err_msg=name, **PARITY[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", KIND_CASES)
def test_gpu_functions_write_what_the_cpu_functions_write(emulated_kernels, dtype, case):
    kind, values = KIND_CASES[case]
    settings = MarginSettings(kind, **values, beta=3.5)
    data, weight, label = kind_inputs(kind, settings.values, 16, 300, 7, seed=8)
    label[:4] = 2  # rows sharing a class
    grad = np.random.default_rng(9).standard_normal((16, 7))
    cpu = run_layer(emulated_kernels, "cpu", settings, data, weight, label, grad, dtype)
    gpu = run_layer(emulated_kernels, "gpu", settings, data, weight, label, grad, dtype)
    assert_same_arrays(cpu, gpu, dtype)
    assert cpu["step"][0] == 1.0
    for name in ("grad_label", "grad_step", "grad_training"):
        assert not gpu[name].any(), name


@pytest.mark.parametrize("case", ["lsoftmax-m4", "cosface", "arcface"])
def test_gpu_functions_outside_training(emulated_kernels, case):
    """training = 0: the plain logits, no label read (an out-of-range one is no error), the step kept."""
    kind, values = KIND_CASES[case]
    settings = MarginSettings(kind, **values)
    data, weight, _ = kind_inputs(kind, settings.values, 16, 40, 7, seed=10)
    label, grad = np.full(16, 99.0), np.random.default_rng(11).standard_normal((16, 7))
    cpu = run_layer(emulated_kernels, "cpu", settings, data, weight, label, grad, "float64", training=0.0)
    gpu = run_layer(emulated_kernels, "gpu", settings, data, weight, label, grad, "float64", training=0.0)
    assert_same_arrays(cpu, gpu, "float64")
    assert gpu["step"][0] == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_functions_take_per_class_margins(emulated_kernels, dtype):
    """(K10): the class_margins input, seventh, through both paths."""
    settings = MarginSettings("cosface", s=30.0, per_class_margin=True)
    data, weight, label = kind_inputs("cosface", settings.values, 16, 40, 7, seed=12)
    margins, grad = np.linspace(0.0, 0.5, 7), np.random.default_rng(13).standard_normal((16, 7))
    cpu = run_layer(emulated_kernels, "cpu", settings, data, weight, label, grad, dtype, class_margins=margins)
    gpu = run_layer(emulated_kernels, "gpu", settings, data, weight, label, grad, dtype, class_margins=margins)
    assert_same_arrays(cpu, gpu, dtype)
    assert not gpu["grad_class_margins"].any()


@pytest.mark.parametrize("kind, tiny, message", [
    ("arcface", "label", "input label must hold integer class indices in [0, 3), got label[3] = 3"),
    ("cosface", "data", "input data row 2 has norm"),
    ("sphereface", "weight", "input weight row 1 has norm"),
])
def test_gpu_functions_fail_with_the_cpu_functions_messages(emulated_kernels, kind, tiny, message):
    data, weight, label = tiny_row_case(tiny)
    cpu, gpu = (run_layer(emulated_kernels, placement, MarginSettings(kind), data, weight, label, np.ones((5, 3)),
                          "float32")
                for placement in ("cpu", "gpu"))
    assert isinstance(cpu, str) and message in cpu
    # The same words after the op's name (the prefix says where in the source each was raised).
    assert gpu.split("margin_softmax_")[-1] == cpu.split("margin_softmax_")[-1]
