"""The schedule advances once per training step in every way of running the layer."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import mx_lsoftmax
from mx_lsoftmax import spec
from mx_lsoftmax.gluon import LSoftmaxDense

from conftest import TOLERANCE, angle_clear_inputs, nd

SCHEDULE = dict(beta=8.0, beta_min=0.3, scale=0.5, gamma=0.1, power=1.5)
STEPS = 5


def expected_betas(start=0, count=STEPS):
    return [mx_lsoftmax.beta_at(t, **SCHEDULE) for t in range(start, start + count)]


def beta_from_output(out, data, weight, label, margin):
    """Recover the beta a forward used: o = (beta z + F) / (1 + beta) => beta = (F - o) / (o - z)."""
    rows = np.arange(len(label))
    z = (data @ weight.T)[rows, label]
    zero_beta = spec.forward(data, weight, label, margin, 0.0)[rows, label]
    o = out[rows, label]
    return float(np.median((zero_beta - o) / (o - z)))


def test_imperative_with_a_step_array(backend):
    data, weight, label = angle_clear_inputs(8, 4, 3, 2, seed=1)
    step = mx_lsoftmax.new_step(dtype="float64")
    for t, beta in enumerate(expected_betas()):
        with autograd.record():
            out = mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), 3, margin=2,
                                       backend=backend, step=step, **SCHEDULE)
        np.testing.assert_allclose(out.asnumpy(), spec.forward(data, weight, label, 2, beta),
                                   **TOLERANCE["float64"])
        assert step.asscalar() == t + 1
    # Inference calls leave the schedule alone.
    mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), 3, backend=backend, step=step)
    assert step.asscalar() == STEPS


def test_imperative_resumes_at_a_given_step(backend):
    data, weight, label = angle_clear_inputs(8, 4, 3, 2, seed=2)
    step = mx_lsoftmax.new_step(dtype="float64", start=1000)
    with autograd.record():
        out = mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), 3, margin=2, backend=backend,
                                   step=step, **SCHEDULE)
    beta = mx_lsoftmax.beta_at(1000, **SCHEDULE)
    np.testing.assert_allclose(out.asnumpy(), spec.forward(data, weight, label, 2, beta),
                               **TOLERANCE["float64"])


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_gluon_block(backend, hybridize):
    data, weight, label = angle_clear_inputs(8, 4, 3, 3, seed=3)
    block = LSoftmaxDense(3, in_units=4, margin=3, backend=backend, dtype="float64", **SCHEDULE)
    block.initialize()
    block.weight.set_data(nd(weight))
    if hybridize:
        block.hybridize()
    for t, beta in enumerate(expected_betas()):
        assert block.current_beta == pytest.approx(beta)
        with autograd.record():
            out = block(nd(data), nd(label))
        out.backward()
        np.testing.assert_allclose(out.asnumpy(), spec.forward(data, weight, label, 3, beta),
                                   **TOLERANCE["float64"])
        # A plain call in between neither fails nor moves the schedule.
        np.testing.assert_allclose(block(nd(data)).asnumpy(), data @ weight.T, **TOLERANCE["float64"])
    assert block.step.data().asscalar() == STEPS


def test_module_bound_executor(backend):
    data, weight, label = angle_clear_inputs(8, 4, 3, 2, seed=4)
    graph = mx_lsoftmax.lsoftmax(mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label"), 3,
                                 margin=2, backend=backend, name="head", **SCHEDULE)
    module = mx.mod.Module(graph, data_names=["data", "label"], label_names=None)
    module.bind(data_shapes=[("data", data.shape), ("label", label.shape)], for_training=True)
    module.init_params(arg_params={"weight": nd(weight, "float32")}, allow_missing=True)
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.0})
    batch = mx.io.DataBatch([nd(data, "float32"), nd(label, "float32")])
    for t, beta in enumerate(expected_betas()):
        module.forward(batch, is_train=True)
        out = module.get_outputs()[0].asnumpy()
        used = beta_from_output(out.astype(np.float64), data, weight, label, 2)
        assert used == pytest.approx(beta, rel=2e-3, abs=2e-3)
        module.backward([mx.nd.ones((8, 3))])
        module.update()
    mx.nd.waitall()
    assert module.get_params()[1]["head_step"].asscalar() == STEPS


def test_module_checkpoint_carries_the_step(tmp_path):
    graph = mx_lsoftmax.lsoftmax(mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label"), 3,
                                 backend="python", name="head", **SCHEDULE)
    module = mx.mod.Module(graph, data_names=["data", "label"], label_names=None)
    module.bind(data_shapes=[("data", (4, 2)), ("label", (4,))], for_training=True)
    module.init_params(mx.init.Xavier())
    module.init_optimizer(optimizer="sgd")
    batch = mx.io.DataBatch([mx.nd.ones((4, 2)), mx.nd.array([0, 1, 2, 0])])
    for _ in range(3):
        module.forward(batch, is_train=True)
        module.backward([mx.nd.ones((4, 3))])
        module.update()
    # The Python CustomOp finishes on MXNet's custom-op thread; reading the
    # executor's auxiliary arrays does not wait for it, waitall does.
    mx.nd.waitall()
    module.save_checkpoint(str(tmp_path / "head"), 1)
    _, _, aux = mx.model.load_checkpoint(str(tmp_path / "head"), 1)
    assert aux["head_step"].asscalar() == 3


def test_imperative_calls_keep_their_own_outputs_and_gradients(backend):
    """Static memory (the compiled path's cached graph) must not leak between calls: two
    forwards in one recorded graph, then earlier results checked after later calls."""
    margin, beta = 3, 0.5
    data, weight, label = angle_clear_inputs(6, 4, 5, margin, seed=3)
    other = np.random.default_rng(4).standard_normal(data.shape)
    first, second, w = nd(data), nd(other), nd(weight)
    for array in (first, second, w):
        array.attach_grad()
    head = np.random.default_rng(5).standard_normal((6, 5))
    with autograd.record():
        out_first = mx_lsoftmax.lsoftmax(first, w, nd(label), 5, margin=margin, beta=beta, backend=backend)
        out_second = mx_lsoftmax.lsoftmax(second, w, nd(label), 5, margin=margin, beta=beta, backend=backend)
        total = (out_first * nd(head)).sum() + (out_second * nd(2 * head)).sum()
    total.backward()
    grad_first, grad_other_weight = spec.backward(data, weight, label, margin, beta, head)
    grad_second, grad_second_weight = spec.backward(other, weight, label, margin, beta, 2 * head)
    kept_output, kept_grad = out_first.asnumpy().copy(), first.grad.asnumpy().copy()
    np.testing.assert_allclose(kept_output, spec.forward(data, weight, label, margin, beta), **TOLERANCE["float64"])
    np.testing.assert_allclose(out_second.asnumpy(), spec.forward(other, weight, label, margin, beta),
                               **TOLERANCE["float64"])
    np.testing.assert_allclose(kept_grad, grad_first, **TOLERANCE["float64"])
    np.testing.assert_allclose(second.grad.asnumpy(), grad_second, **TOLERANCE["float64"])
    np.testing.assert_allclose(w.grad.asnumpy(), grad_other_weight + grad_second_weight, **TOLERANCE["float64"])
    with autograd.record():  # a later call on other data leaves the earlier arrays alone
        later = mx_lsoftmax.lsoftmax(second, w, nd(label), 5, margin=margin, beta=beta, backend=backend)
    later.backward()
    assert np.array_equal(out_first.asnumpy(), kept_output)
    assert np.array_equal(first.grad.asnumpy(), kept_grad)
