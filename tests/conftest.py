"""The one place for the test matrix (backends, dtypes, margins) and the tolerances."""
import importlib.util
import math
import os
import sys

import mxnet as mx
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mx_lsoftmax  # noqa: E402

MARGINS = (1, 2, 3, 4, 5, 6)
BETAS = (0.0, 3.5)
# The family matrix (K1): each kind at its defaults and at one other setting.
KIND_CASES = {
    "lsoftmax-m4": ("lsoftmax", dict(margin=4)),
    "sphereface-m4": ("sphereface", dict(margin=4)),
    "sphereface-m2": ("sphereface", dict(margin=2)),
    "cosface": ("cosface", dict(margin=0.35, s=64.0)),
    "cosface-s8": ("cosface", dict(margin=0.2, s=8.0)),
    "arcface": ("arcface", dict(margin=0.5, s=64.0)),
    "arcface-easy": ("arcface", dict(margin=0.5, s=16.0, easy_margin=True)),
    "combined": ("combined", dict(m1=1.0, m2=0.3, m3=0.2, s=64.0)),
    "combined-m1": ("combined", dict(m1=1.5, m2=0.1, m3=0.1, s=10.0)),
}
DTYPES = ("float32", "float64")
ALL_BACKENDS = ("python", "compiled")
# The Python op takes its row-wise steps on the host for small arrays and in MXNet's engine
# for large ones (mx_lsoftmax.op.HOST_ENTRIES). "python-engine" is the Python op with every
# array taken as large: modules that set BOTH_PYTHON_ROUTES = True test both routes.
BACKENDS_WITH_ROUTES = ("python", "python-engine", "compiled")

# Agreement with the float64 spec: the operators take other routes (Chebyshev
# recurrence, chain rule through the norms), so float64 agrees to rounding.
TOLERANCE = {
    "float64": dict(rtol=1e-10, atol=1e-10),
    "float32": dict(rtol=2e-4, atol=2e-4),
}
# Central differences in float64 with step 1e-6: truncation error ~1e-8 relative.
NUMERIC_GRADIENT = dict(numeric_eps=1e-6, rtol=1e-5, atol=1e-7)
# The normalised kinds scale logits by s (up to 64): rounding of the differenced outputs grows with it.
NUMERIC_GRADIENT_SCALED = dict(numeric_eps=1e-6, rtol=1e-5, atol=1e-6)

def compiled_available():
    return mx_lsoftmax.library.is_loaded()

def pytest_generate_tests(metafunc):
    """The backend matrix: every test taking ``backend`` runs for each (a test that
    parametrizes ``backend`` itself keeps its own list)."""
    if "backend" not in metafunc.fixturenames:
        return
    if any(marker.args and marker.args[0] == "backend" for marker in metafunc.definition.iter_markers("parametrize")):
        return
    routes = BACKENDS_WITH_ROUTES if getattr(metafunc.module, "BOTH_PYTHON_ROUTES", False) else ALL_BACKENDS
    metafunc.parametrize("backend", routes, indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "compiled" and not compiled_available():
        if os.environ.get("CI"):
            pytest.fail("the compiled library is not built in CI: `make` must run before pytest")
        pytest.skip("the compiled library is not built (run `make`)")
    if request.param == "python-engine":
        monkeypatch.setattr(mx_lsoftmax.op, "HOST_ENTRIES", 0)
        return "python"
    return request.param

@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param

def kind_thresholds(kind, settings):
    """The cosines where a kind's psi or psi' jumps, besides the poles +-1 (K1, K5)."""
    if kind in ("lsoftmax", "sphereface"):
        margin = int(settings["margin"])
        return [math.cos(j * math.pi / margin) for j in range(1, margin)]
    if kind == "arcface":
        return [0.0] if settings.get("easy_margin") else [-math.cos(settings["margin"])]
    return []


def angle_clear_inputs(rows, dims, classes, margin, seed, dtype="float64", clearance=0.05,
                       thresholds=None):
    """Random (data, weight, label) whose target angles keep `clearance` (in cos) from
    every threshold cos(j pi / m) (or the given ones) and from +-1, where psi' jumps or
    has its pole: finite differences stay honest."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((classes, dims))
    label = rng.integers(0, classes, rows)
    data = np.empty((rows, dims))
    if thresholds is None:
        thresholds = [math.cos(j * math.pi / margin) for j in range(1, margin)]
    thresholds = list(thresholds) + [1.0, -1.0]
    for i in range(rows):
        while True:
            row = rng.standard_normal(dims)
            w = weight[label[i]]
            c = row @ w / (np.linalg.norm(row) * np.linalg.norm(w))
            if all(abs(c - t) > clearance for t in thresholds):
                data[i] = row
                break
    return data.astype(dtype), weight.astype(dtype), label

def kind_inputs(kind, settings, rows, dims, classes, seed, dtype="float64", clearance=0.05):
    return angle_clear_inputs(rows, dims, classes, 1, seed, dtype=dtype, clearance=clearance,
                              thresholds=kind_thresholds(kind, settings))


def numeric_gradient(loss, array, eps):
    """Central differences of the scalar `loss()` with respect to every entry of `array`."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        plus = loss()
        array[index] = saved - eps
        minus = loss()
        array[index] = saved
        gradient[index] = (plus - minus) / (2 * eps)
    return gradient


# The unit weight rows of the compiled op (K11), for its CPU and CUDA tests.
def unit_rows_reference(weight, grad_unit, grad_norm):
    """float64 unit rows, norms, and the rows' gradient of sum(G_u * u) + sum(g_n * n) by
    central differences (step 1e-6 of each row's norm); zero rows: unit 0, gradient 0 (K9)."""
    def norm(row):  # scaled first: squares of 1e160 or 1e-160 leave float64
        largest = np.abs(row).max()
        return largest * np.linalg.norm(row / largest) if largest > 0 else 0.0

    weight = np.asarray(weight, np.float64)
    norms = np.array([norm(row) for row in weight])
    unit = np.divide(weight, norms[:, None], out=np.zeros_like(weight), where=norms[:, None] > 0)
    gradient = np.zeros_like(weight)
    for r in np.flatnonzero(norms > 0):
        def loss(row):
            return grad_unit[r] @ (row / norm(row)) + grad_norm[r] * norm(row)
        step = 1e-6 * norms[r]
        for d in range(weight.shape[1]):
            up, down = weight[r].copy(), weight[r].copy()
            up[d] += step
            down[d] -= step
            gradient[r, d] = (loss(up) - loss(down)) / (2 * step)
    return unit, norms, gradient


# Agreement of the unit rows (K11) with unit_rows_reference, per dtype: rows and norms to
# rounding; each row's gradient at its own scale (|dL/dw| ~ 1/|w|), to the differences' error.
UNIT_ROWS_TOLERANCE = {
    "float64": dict(unit=1e-12, norm=1e-12, gradient=1e-6),
    "float32": dict(unit=1e-6, norm=1e-7, gradient=1e-4),
}


def assert_unit_rows_match(weight, grad_unit, grad_norm, unit, norm, gradient, dtype):
    """The op's unit rows, norms and rows' gradient (NumPy arrays) against unit_rows_reference;
    zero rows must get exactly 0 (K9)."""
    want_unit, want_norm, want_gradient = unit_rows_reference(weight, grad_unit, grad_norm)
    tolerance = UNIT_ROWS_TOLERANCE[dtype]
    np.testing.assert_allclose(unit, want_unit, rtol=tolerance["unit"], atol=tolerance["unit"])
    assert norm.dtype == np.float64
    np.testing.assert_allclose(norm, want_norm, rtol=tolerance["norm"])
    gradient = gradient.astype(np.float64)
    assert np.all(gradient[want_norm == 0] == 0)
    for r in np.flatnonzero(want_norm > 0):
        scale = float(np.abs(want_gradient[r]).max())
        np.testing.assert_allclose(gradient[r] / scale, want_gradient[r] / scale,
                                   rtol=tolerance["gradient"], atol=tolerance["gradient"])


@pytest.fixture(scope="session")
def emulated_kernels():
    """The CUDA kernels compiled for the CPU (`make emulated`, which `make test` builds), for the
    kernel and lib_api tests; a missing build fails the test, as it needs only the host compiler."""
    from mx_lsoftmax.support.cuda_harness import HarnessUnavailable, KernelHarness
    try:
        return KernelHarness.emulated()
    except HarnessUnavailable as reason:
        pytest.fail(str(reason))


def tiny_row_case(fault):
    """(data (5, 4), weight (3, 4), label (5,)), float64, for 3 classes, with one fault: data row 2
    ('data') or weight row 1 ('weight') scaled to a norm ~1e-42, a float32 subnormal whose
    s / |x| or 1 / |w| leaves float32 (docs/derivatives.md, limit of float32), or label[3] = 3,
    no class ('label')."""
    rng = np.random.default_rng(21)
    data, weight = rng.standard_normal((5, 4)), rng.standard_normal((3, 4))
    label = np.array([0, 1, 2, 1, 0])
    if fault == "data":
        data[2] *= 1e-42
    elif fault == "weight":
        weight[1] *= 1e-42
    elif fault == "label":
        label[3] = 3
    return data, weight, label


def unit_rows_case(norms, dims=6, seed=11):
    """Rows (len(norms), dims) of the given norms, and random gradients of the unit rows and norms."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((len(norms), dims))
    weight = directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.asarray(norms)[:, None]
    grad_unit, grad_norm = rng.standard_normal(weight.shape), rng.standard_normal(len(norms))
    return weight, grad_unit, grad_norm


def nd(array, dtype=None):
    array = np.asarray(array)
    return mx.nd.array(array, dtype=dtype or array.dtype)


def load_example(name):
    """The module of examples/{name}.py (the examples are scripts, not a package)."""
    examples = os.path.join(ROOT, "examples")
    if examples not in sys.path:  # as for a script run: its folder first, so siblings import
        sys.path.insert(0, examples)
    spec = importlib.util.spec_from_file_location(name, os.path.join(examples, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
