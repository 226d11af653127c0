"""MXNet's NumPy interface (``npx.set_np()``, ``mx.np`` arrays, ``mx.sym.np`` symbols): the
layer takes it at every entry point, gives it back, and computes exactly what it computes
on legacy arrays."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, npx

import mx_lsoftmax
from mx_lsoftmax.gluon import LDAMDense, MarginDense

from conftest import KIND_CASES, ROOT, TOLERANCE, kind_inputs

CASES = ["lsoftmax-m4", "sphereface-m4", "cosface", "arcface", "combined"]
SCHEDULE = dict(beta=8.0, beta_min=0.3, scale=0.5)


@pytest.fixture
def numpy_mode():
    """NumPy array and shape semantics for one test; legacy again afterwards."""
    npx.set_np()
    try:
        yield
    finally:
        npx.reset_np()


def schedule_of(kind):
    return SCHEDULE if kind in ("lsoftmax", "sphereface") else {}


def imperative_run(numpy, backend, kind, settings, arrays, head_gradient, train=True):
    """Output, data and weight gradients and the step after one call, on either interface."""
    make = (lambda values: mx.np.array(values, dtype=values.dtype)) if numpy else \
        (lambda values: mx.nd.array(values, dtype=values.dtype))
    data, weight, label = (make(values) for values in arrays)
    step = make(np.array([3.0], dtype=arrays[0].dtype))
    data.attach_grad()
    weight.attach_grad()
    with autograd.record(train_mode=train):
        out = mx_lsoftmax.margin_logits(data, weight, label, weight.shape[0], kind, backend=backend, step=step,
                                        **settings, **schedule_of(kind))
    out.backward(make(head_gradient))
    assert isinstance(out, mx.np.ndarray) == numpy
    return [array.asnumpy() for array in (out, data.grad, weight.grad, step)]


@pytest.mark.parametrize("train", [True, False], ids=["training", "plain"])
@pytest.mark.parametrize("case", CASES)
def test_margin_logits_on_numpy_arrays_computes_what_it_does_on_legacy_ones(backend, case, train):
    kind, settings = KIND_CASES[case]
    arrays = kind_inputs(kind, settings, 7, 5, 4, seed=11)
    head_gradient = np.random.default_rng(12).standard_normal((7, 4))
    expected = imperative_run(False, backend, kind, settings, arrays, head_gradient, train)
    npx.set_np()
    try:
        got = imperative_run(True, backend, kind, settings, arrays, head_gradient, train)
    finally:
        npx.reset_np()
    for name, want, have in zip(("output", "data gradient", "weight gradient", "step"), expected, got):
        np.testing.assert_array_equal(have, want, err_msg=name)
    assert got[3][0] == (4.0 if train else 3.0)


# Gluon heads by case: (kind and settings for the inputs, the block).
GLUON_HEADS = {
    "lsoftmax-m4": ("lsoftmax-m4", lambda backend: MarginDense(4, kind="lsoftmax", margin=4, backend=backend,
                                                               dtype="float64", **SCHEDULE)),
    "arcface": ("arcface", lambda backend: MarginDense(4, kind="arcface", backend=backend, dtype="float64")),
    "ldam": ("cosface", lambda backend: LDAMDense(4, class_counts=[50, 20, 8, 3], backend=backend,
                                                  dtype="float64")),
}


def gluon_training(numpy, backend, head, hybridize, arrays, steps=3):
    """A margin head trained ``steps`` SGD steps, then a prediction: the values along the way."""
    data, weight, label = arrays
    make = mx.np.array if numpy else mx.nd.array
    block = GLUON_HEADS[head][1](backend)
    # Zero, then the weight: MXNet 1.9.1's uniform initializer fails on float64 in NumPy mode
    # (nn.Dense(dtype='float64') too: "_npi_uniform ... Expecting 0 got 1").
    block.initialize(mx.init.Zero())
    block(make(data, dtype="float64"))  # deferred shapes from a plain call
    block.weight.set_data(make(weight, dtype="float64"))
    if hybridize:
        block.hybridize()
    trainer = gluon.Trainer(mx_lsoftmax.gluon.trainable_parameters(block), "sgd", {"learning_rate": 0.1})
    loss_function = gluon.loss.SoftmaxCrossEntropyLoss()
    values = [np.array(block.current_beta)]
    for _ in range(steps):
        with autograd.record():
            out = block(make(data, dtype="float64"), make(label, dtype="float64"))
            loss = loss_function(out, make(label, dtype="float64"))
        loss.backward()
        trainer.step(len(label))
        assert isinstance(out, mx.np.ndarray) == numpy
        values += [out.asnumpy(), block.weight.data().asnumpy()]
    prediction = block(make(data, dtype="float64"))
    assert isinstance(prediction, mx.np.ndarray) == numpy
    assert repr(block).startswith(type(block).__name__)
    return values + [np.array(block.current_beta), prediction.asnumpy(), block.step.data().asnumpy()]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("head", list(GLUON_HEADS))
def test_a_gluon_head_trains_in_numpy_mode_as_in_legacy_mode(backend, head, hybridize):
    kind, settings = KIND_CASES[GLUON_HEADS[head][0]]
    arrays = kind_inputs(kind, settings, 7, 5, 4, seed=13)
    expected = gluon_training(False, backend, head, hybridize, arrays)
    npx.set_np()
    try:
        got = gluon_training(True, backend, head, hybridize, arrays)
    finally:
        npx.reset_np()
    assert len(got) == len(expected)
    for index, (want, have) in enumerate(zip(expected, got)):
        np.testing.assert_array_equal(have, want, err_msg=f"value {index}")
    assert got[-1][0] == 3.0


class Network(gluon.HybridBlock):
    """A body and a margin head, written in NumPy-mode Gluon style."""

    def __init__(self, backend, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = gluon.nn.Dense(6, activation="relu")
            self.head = mx_lsoftmax.gluon.ArcFaceDense(4, s=8.0, backend=backend)

    def hybrid_forward(self, F, x, label=None):
        features = self.body(x)
        return self.head(features) if label is None else self.head(features, label)


def test_a_numpy_mode_network_trains_predicts_and_exports(backend, numpy_mode, tmp_path):
    rng = np.random.default_rng(14)
    data = mx.np.array(rng.standard_normal((8, 5)), dtype="float32")
    label = mx.np.array(rng.integers(0, 4, 8), dtype="float32")
    net = Network(backend)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    assert net(data).shape == (8, 4)  # a network may predict before it trains (README)
    net.hybridize()
    trainer = gluon.Trainer(mx_lsoftmax.gluon.trainable_parameters(net), "sgd", {"learning_rate": 0.1})
    for _ in range(2):
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(data, label), label)
        loss.backward()
        trainer.step(8)
    assert np.isfinite(loss.asnumpy()).all()
    assert net.head.step.data().asnumpy()[0] == 2
    net.hybridize()  # a new graph for prediction (README)
    prediction = net(data)
    assert isinstance(prediction, mx.np.ndarray)
    head = net.head
    features = net.body(data)
    np.testing.assert_allclose(prediction.asnumpy(), head(features).asnumpy(), **TOLERANCE["float32"])
    # The head's export, loaded back in NumPy mode without mx_lsoftmax's ops.
    symbol_file, params_file = head.export(str(tmp_path / "head"))
    loaded = gluon.SymbolBlock.imports(symbol_file, ["data"], params_file)
    np.testing.assert_allclose(loaded(features).asnumpy(), head(features).asnumpy(), **TOLERANCE["float32"])


@pytest.mark.parametrize("case", CASES)
def test_symbols_of_the_numpy_interface_give_numpy_symbols(backend, case, numpy_mode):
    kind, settings = KIND_CASES[case]
    data, weight, label = (mx.sym.var(name).as_np_ndarray() for name in ("data", "weight", "label"))
    training = mx_lsoftmax.margin_logits(data, weight, label, 4, kind, backend=backend, **settings)
    plain = mx_lsoftmax.inference_symbol(data, weight, 4, kind, **settings)
    assert isinstance(training, mx.sym.np._Symbol)
    assert isinstance(plain, mx.sym.np._Symbol)
    # Shapes under NumPy shape semantics, where a declared size 0 would be a real one.
    arguments, outputs, _ = training.infer_shape(data=(7, 5), label=(7,))
    assert arguments[:3] == [(7, 5), (4, 5), (7,)] and outputs == [(7, 4)]
    assert plain.infer_shape(data=(7, 5))[1] == [(7, 4)]
    npx.reset_np()  # the same graphs from legacy symbols
    legacy_data, legacy_weight, legacy_label = (mx.sym.var(name) for name in ("data", "weight", "label"))
    expected = mx_lsoftmax.margin_logits(legacy_data, legacy_weight, legacy_label, 4, kind, backend=backend,
                                         **settings)
    assert training.as_nd_ndarray().list_arguments() == expected.list_arguments()
    assert training.as_nd_ndarray().list_auxiliary_states() == expected.list_auxiliary_states()
    npx.set_np()


def test_errors_name_the_input_in_numpy_mode(backend, numpy_mode):
    data = mx.np.ones((3, 5))
    weight = mx.np.ones((4, 5))
    with pytest.raises(ValueError, match=r"label\[1\] = 7"):
        with autograd.record():
            mx_lsoftmax.margin_logits(data, weight, mx.np.array([0, 7, 1]), 4, "cosface", backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        mx_lsoftmax.margin_logits(data, mx.np.ones((4, 6)), None, 4, "cosface", backend=backend)
    assert float(mx_lsoftmax.margin_logits(data, weight, None, 4, "cosface", backend=backend).sum()) == \
        pytest.approx(3 * 4 * 64.0)


SCRIPT = """
import json, sys
import numpy as np
import mxnet as mx
from mxnet import autograd, npx
npx.set_np()
import mx_lsoftmax  # after set_np: MXNet hands the Python op NumPy-interface arrays
arrays = json.loads(sys.argv[1])
data, weight, label = (mx.np.array(values, dtype="float64") for values in arrays)
data.attach_grad(); weight.attach_grad()
step = mx.np.zeros((1,), dtype="float64")
with autograd.record():
    out = mx_lsoftmax.margin_logits(data, weight, label, 4, "arcface", backend="python", step=step)
out.backward()
print(json.dumps([array.asnumpy().tolist() for array in (out, data.grad, weight.grad, step)]))
"""


def test_the_python_op_works_when_the_package_is_imported_in_numpy_mode():
    arrays = kind_inputs("arcface", {"margin": 0.5}, 7, 5, 4, seed=15)
    completed = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([array.tolist() for array in arrays])],
                               capture_output=True, text=True, timeout=120, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT})
    assert completed.returncode == 0, completed.stderr[-3000:]
    got = json.loads(completed.stdout.strip().splitlines()[-1])
    data, weight, label = (mx.nd.array(values, dtype="float64") for values in arrays)
    data.attach_grad()
    weight.attach_grad()
    step = mx.nd.zeros((1,), dtype="float64")
    with autograd.record():
        out = mx_lsoftmax.margin_logits(data, weight, label, 4, "arcface", backend="python", step=step)
    out.backward()
    for name, want, have in zip(("output", "data gradient", "weight gradient", "step"),
                                (out, data.grad, weight.grad, step), got):
        np.testing.assert_array_equal(np.array(have), want.asnumpy(), err_msg=name)
