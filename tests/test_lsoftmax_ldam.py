"""Per-class margins (K10) and LDAM: the cosface kind with a margin per class, in both
backends and the CUDA kernels, against the float64 spec, finite differences and each other."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mx_lsoftmax
from mx_lsoftmax import MarginSettings, ldam_margins, spec
from mx_lsoftmax.gluon import CosFaceDense, LDAMDense

from conftest import NUMERIC_GRADIENT_SCALED, TOLERANCE, kind_inputs, nd, numeric_gradient

# Both routes of the Python op (host and engine) in every backend-parametrized test.
BOTH_PYTHON_ROUTES = True

CLASSES = 5
MARGINS = np.array([0.5, 0.0, 0.35, 0.1, 0.25])  # a zero margin and distinct ones
SCALE = 30.0


def inputs(dtype="float64", rows=16, dims=7, seed=3):
    data, weight, label = kind_inputs("cosface", {}, rows, dims, CLASSES, seed=seed, dtype=dtype)
    label[:CLASSES] = np.arange(CLASSES)  # every class is some row's target
    grad = np.random.default_rng(seed + 1).standard_normal((rows, CLASSES)).astype(dtype)
    return data, weight, label, grad


def run_layer(backend, data, weight, label, grad, margins=MARGINS, beta=0.0):
    x, w = nd(data), nd(weight)
    x.attach_grad()
    w.attach_grad()
    with autograd.record():
        out = mx_lsoftmax.margin_logits(x, w, nd(label, "float32"), CLASSES, "cosface", backend=backend,
                                        s=SCALE, beta=beta, class_margins=nd(margins, data.dtype))
    out.backward(nd(grad, data.dtype))
    return out.asnumpy(), x.grad.asnumpy(), w.grad.asnumpy()


def expected(data, weight, label, grad, margins=MARGINS, beta=0.0, floor=spec.FLOAT64_ANGLE_FLOOR):
    return (spec.family_forward("cosface", data, weight, label, beta, class_margins=margins, s=SCALE),
            *spec.family_backward("cosface", data, weight, label, beta, grad, angle_floor=floor,
                                  class_margins=margins, s=SCALE))


@pytest.mark.parametrize("beta", [0.0, 3.5])
def test_forward_and_gradients_match_spec(backend, dtype, beta):
    data, weight, label, grad = inputs(dtype)
    floor = float(np.sqrt(np.finfo(dtype).eps))
    for got, want in zip(run_layer(backend, data, weight, label, grad, beta=beta),
                         expected(data, weight, label, grad, beta=beta, floor=floor)):
        scale = max(1.0, float(np.abs(want).max())) if dtype == "float32" else 1.0
        np.testing.assert_allclose(got / scale, want / scale, **TOLERANCE[dtype])


def test_hand_worked_target_logits(backend):
    """Two rows on the axes: cos(theta) known exactly, o = s (cos theta - m_y)."""
    data = np.array([[2.0, 0.0], [3.0, 4.0]])
    weight = np.array([[1.0, 0.0], [0.0, 5.0]])
    label = np.array([0, 1])
    margins = np.array([0.2, 0.4])
    x, w = nd(data), nd(weight)
    with autograd.record():
        out = mx_lsoftmax.margin_logits(x, w, nd(label, "float32"), 2, "cosface", backend=backend, s=10.0,
                                        class_margins=nd(margins)).asnumpy()
    # row 0: cos = 1 with class 0 (m 0.2), 0 with class 1; row 1: cos 0.6 with class 0, 0.8 with class 1 (m 0.4)
    np.testing.assert_allclose(out, [[10 * (1 - 0.2), 0.0], [6.0, 10 * (0.8 - 0.4)]], rtol=1e-12)


def test_numeric_gradient_float64(backend):
    data, weight, label, grad = inputs("float64", rows=6, dims=4)

    def loss():
        with autograd.record():
            out = mx_lsoftmax.margin_logits(nd(data), nd(weight), nd(label, "float32"), CLASSES, "cosface",
                                            backend=backend, s=SCALE, class_margins=nd(MARGINS))
        return float((out.asnumpy() * grad).sum())

    _, grad_data, grad_weight = run_layer(backend, data, weight, label, grad)
    eps = NUMERIC_GRADIENT_SCALED["numeric_eps"]
    tolerance = dict(rtol=NUMERIC_GRADIENT_SCALED["rtol"], atol=NUMERIC_GRADIENT_SCALED["atol"])
    np.testing.assert_allclose(grad_data, numeric_gradient(loss, data, eps), **tolerance)
    np.testing.assert_allclose(grad_weight, numeric_gradient(loss, weight, eps), **tolerance)


def test_backends_agree_in_float64():
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    data, weight, label, grad = inputs("float64")
    for python, compiled in zip(run_layer("python", data, weight, label, grad),
                                run_layer("compiled", data, weight, label, grad)):
        np.testing.assert_allclose(python, compiled, rtol=1e-10, atol=1e-10)


def test_equal_margins_are_plain_cosface(backend):
    """Every class at margin m: exactly the cosface kind with margin m (one definition, K10)."""
    data, weight, label, grad = inputs("float64")
    per_class = run_layer(backend, data, weight, label, grad, margins=np.full(CLASSES, 0.3))
    x, w = nd(data), nd(weight)
    x.attach_grad()
    w.attach_grad()
    with autograd.record():
        out = mx_lsoftmax.margin_logits(x, w, nd(label, "float32"), CLASSES, "cosface", backend=backend,
                                        s=SCALE, margin=0.3)
    out.backward(nd(grad))
    for got, want in zip(per_class, (out.asnumpy(), x.grad.asnumpy(), w.grad.asnumpy())):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_symbol_graph_under_module(backend):
    """The (C,) input in a symbol graph: Module binds it as an argument and does not train it."""
    data, weight, label, _ = inputs("float64", rows=8)
    symbol = mx_lsoftmax.margin_logits(mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label"),
                                       CLASSES, "cosface", backend=backend, s=SCALE,
                                       class_margins=mx.sym.var("class_margins"))
    assert "class_margins" in symbol.list_arguments()
    executor = symbol.simple_bind(mx.cpu(), data=data.shape, label=label.shape, type_dict={"data": "float64"},
                                  grad_req={"data": "write", "weight": "write", "label": "null",
                                            "class_margins": "null", "cosface_step": "null"})
    for name, value in (("data", data), ("weight", weight), ("label", label), ("class_margins", MARGINS)):
        executor.arg_dict[name][:] = value
    out = executor.forward(is_train=True)[0].asnumpy()
    np.testing.assert_allclose(out, expected(data, weight, label, np.zeros((8, CLASSES)))[0], **TOLERANCE["float64"])


@pytest.mark.parametrize("margins, message", [
    (np.array([0.1, 0.2]), "class_margins must have shape (num_hidden,) = (5,), got (2,)"),
    (np.array([0.1, -0.2, 0.0, 0.0, 0.0]), "class_margins must be finite and >= 0, got class_margins[1] = -0.2"),
    (np.array([0.1, 0.2, np.nan, 0.0, 0.0]), "got class_margins[2] = nan"),
])
def test_bad_class_margins_name_the_value(backend, margins, message):
    data, weight, label, grad = inputs("float64")
    with pytest.raises(ValueError) as error:
        run_layer(backend, data, weight, label, grad, margins=margins)
    assert message in str(error.value)
    run_layer(backend, data, weight, label, grad)  # still works


def test_only_cosface_takes_class_margins(backend):
    with pytest.raises(ValueError, match="kind 'arcface' takes one margin for every class"):
        mx_lsoftmax.margin_logits(mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), mx.nd.array([0, 1]), 4, "arcface",
                                  backend=backend, class_margins=mx.nd.ones((4,)))
    with pytest.raises(ValueError, match="class_margins"):
        CosFaceDense(4, class_margins=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="does not take"):
        MarginSettings("lsoftmax", per_class_margin=True)


def test_ldam_margins_follow_the_paper():
    counts = [5000, 500, 50, 16]
    margins = ldam_margins(counts, max_margin=0.5)
    # m_j = C n_j^(-1/4), the rarest class at 0.5: 16^(-1/4) = 1/2, so C = 1.
    np.testing.assert_allclose(margins, [5000 ** -0.25, 500 ** -0.25, 50 ** -0.25, 0.5], rtol=1e-12)
    assert np.argmax(margins) == 3 and np.all(np.diff(margins) > 0)
    for bad in ([], [10, 0], [10, np.inf]):
        with pytest.raises(ValueError, match="class_counts"):
            ldam_margins(bad)
    with pytest.raises(ValueError, match="max_margin"):
        ldam_margins([10, 20], max_margin=0)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_ldam_block_trains_saves_resumes_and_exports(backend, hybridize, tmp_path):
    counts = [400, 100, 25, 9, 4]
    data, weight, label, _ = inputs("float64", rows=8, dims=4)
    block = LDAMDense(CLASSES, counts, in_units=4, backend=backend, dtype="float64")
    block.initialize()
    block.weight.set_data(nd(weight))
    if hybridize:
        block.hybridize()
    margins = ldam_margins(counts)
    np.testing.assert_allclose(block.class_margins.data().asnumpy(), margins, rtol=1e-12)
    trainer = gluon.Trainer(block.collect_params(), "sgd", {"learning_rate": 0.1})
    with autograd.record():
        out = block(nd(data), nd(label))
    np.testing.assert_allclose(out.asnumpy(), spec.family_forward("cosface", data, weight, label, 0.0,
                                                                  class_margins=margins, s=30.0),
                               **TOLERANCE["float64"])
    out.backward()
    trainer.step(8)
    np.testing.assert_allclose(block.class_margins.data().asnumpy(), margins, rtol=1e-12)  # not trained
    assert block(nd(data)).shape == (8, CLASSES)
    block.save_parameters(str(tmp_path / "ldam.params"))
    resumed = LDAMDense(CLASSES, counts, in_units=4, backend=backend, dtype="float64")
    resumed.load_parameters(str(tmp_path / "ldam.params"))
    assert resumed.step.data().asscalar() == 1
    symbol_file, params_file = block.export(str(tmp_path / "ldam"))
    imported = gluon.SymbolBlock.imports(symbol_file, ["data"], params_file)
    imported.cast("float64")
    np.testing.assert_allclose(imported(nd(data)).asnumpy(), block(nd(data)).asnumpy(), **TOLERANCE["float64"])
    with pytest.raises(ValueError, match="class_counts must hold units = 5 counts, got 2"):
        LDAMDense(CLASSES, [3, 4])
