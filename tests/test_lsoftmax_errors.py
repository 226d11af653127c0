"""Bad input: a clear error naming the parameter and the value, and MXNet keeps working."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import mx_lsoftmax

from conftest import nd, tiny_row_case

GOOD = dict(data=np.ones((4, 3)), weight=np.ones((5, 3)), label=np.array([0, 1, 4, 2]))


def call(backend, data=None, weight=None, label=None, num_hidden=5, **settings):
    data = GOOD["data"] if data is None else data
    weight = GOOD["weight"] if weight is None else weight
    label = GOOD["label"] if label is None else label
    with autograd.record():
        out = mx_lsoftmax.lsoftmax(nd(data), nd(weight), nd(label), num_hidden, backend=backend,
                                   **settings)
    return out.asnumpy()


def assert_still_working():
    np.testing.assert_array_equal((mx.nd.ones((2, 2)) * 3).asnumpy(), np.full((2, 2), 3.0))


@pytest.mark.parametrize("settings, message", [
    (dict(label=np.array([0, 1, 5, 2])), "label[2] = 5"),
    (dict(label=np.array([0, -1, 4, 2])), "label[1] = -1"),
    (dict(label=np.array([0, 1.5, 4, 2])), "label[1] = 1.5"),
    (dict(label=np.array([0, np.nan, 4, 2])), "label[1] = nan"),
    (dict(margin=0), "margin must be an integer >= 1, got 0"),
    (dict(margin=2.5), "margin must be an integer >= 1, got 2.5"),
    (dict(beta=-1.0), "beta must be >= 0, got -1.0"),
    (dict(beta_min=-2.0), "beta_min must be >= 0, got -2.0"),
    (dict(scale=0.0), "scale must be in (0, 1], got 0.0"),
    (dict(scale=1.01), "scale must be in (0, 1], got 1.01"),
    (dict(power=0.0), "power must be > 0, got 0.0"),
    (dict(power=-1.0), "power must be > 0, got -1.0"),
    (dict(gamma=-0.5), "gamma must be >= 0, got -0.5"),
    (dict(data=np.ones((4, 3, 1))), "data must be 2-D (N, D), got shape (4, 3, 1)"),
    (dict(weight=np.ones((5, 2))), "weight must have shape (num_hidden, D) = (5, 3), got (5, 2)"),
    (dict(weight=np.ones((4, 3))), "weight must have shape (num_hidden, D) = (5, 3), got (4, 3)"),
    (dict(label=np.array([0, 1])), "label must have shape (N,) = (4,), got (2,)"),
    (dict(num_hidden=0), "num_hidden must be a positive integer, got 0"),
    (dict(backend_override="gpu"), "backend must be one of"),
    (dict(weight_grad_req="null"), "weight_grad_req must be 'write' or 'add', got 'null'"),
])
def test_entry_point_rejects_bad_input(backend, settings, message):
    settings = dict(settings)
    if "backend_override" in settings:
        backend = settings.pop("backend_override")
    with pytest.raises(ValueError) as error:
        call(backend, **settings)
    assert message in str(error.value)
    assert_still_working()
    call("python")  # the layer itself still works


def test_custom_op_rejects_bad_settings_without_crashing():
    x, w, y, step = mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), mx.nd.array([0, 1]), mx.nd.zeros((1,))
    for settings in (dict(margin=0), dict(beta=-1), dict(scale=2), dict(power=0), dict(num_hidden=3)):
        attrs = dict(num_hidden=4) | settings
        with pytest.raises(mx.base.MXNetError):
            mx.nd.Custom(x, w, y, step, op_type="LSoftmax", **attrs).asnumpy()
    with pytest.raises(mx.base.MXNetError):
        with autograd.record():
            mx.nd.Custom(x, w, mx.nd.array([0, 9]), step, op_type="LSoftmax", num_hidden=4).asnumpy()
    assert step.asscalar() == 0  # a rejected forward does not advance the schedule
    assert_still_working()


@pytest.mark.parametrize("settings, message", [
    (dict(margin=0), "parameter margin must be an integer >= 1, got 0"),
    (dict(margin="x"), "parameter margin must be a finite number, got 'x'"),
    (dict(beta=-1), "parameter beta must be >= 0, got -1"),
    (dict(beta_min=-1), "parameter beta_min must be >= 0, got -1"),
    (dict(scale=0), "parameter scale must be in (0, 1], got 0"),
    (dict(gamma=-1), "parameter gamma must be >= 0, got -1"),
    (dict(power=0), "parameter power must be > 0, got 0"),
    # The table of kinds and settings (src/operator/margin_softmax-inl.h):
    (dict(kind="facenet"), "parameter kind must be one of lsoftmax sphereface cosface arcface combined, got 'facenet'"),
    (dict(kind="cosface", m1="2"), "kind cosface does not take the setting 'm1'"),
    (dict(kind="arcface", margin="3.5"), "parameter margin must be in [0, pi), got 3.5"),
    (dict(kind="cosface", s="-1"), "parameter s must be > 0, got -1"),
    (dict(kind="arcface", easy_margin="2"), "parameter easy_margin must be in [0, 1], got 2"),
])
def test_compiled_op_reports_bad_settings_through_mxnet(settings, message):
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    inputs = (mx.nd.ones((2, 4)), mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), mx.nd.array([0, 1]),
              mx.nd.zeros((1,)), mx.nd.ones((1,)))
    with pytest.raises(mx.base.MXNetError) as error:
        mx.nd.margin_softmax_target(*inputs, **settings)[0].asnumpy()
    assert message in str(error.value)
    assert str(error.value).count("margin_softmax_target:") == 1  # no stale messages from earlier errors
    assert_still_working()


def test_compiled_op_reports_bad_label_through_mxnet():
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    step = mx.nd.zeros((1,))
    with pytest.raises(mx.base.MXNetError) as error:
        mx.nd.margin_softmax_target(mx.nd.ones((2, 4)), mx.nd.ones((2, 3)), mx.nd.ones((4, 3)),
                                    mx.nd.array([0, 7]), step, mx.nd.ones((1,)))[0].asnumpy()
    assert "label[1] = 7" in str(error.value)
    assert step.asscalar() == 0
    assert_still_working()


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_an_empty_batch_is_a_clear_error_and_harms_no_later_call(backend, hybridize):
    from mx_lsoftmax.gluon import ArcFaceDense
    empty = mx.nd.array(np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3\)\)"):
        with autograd.record():
            mx_lsoftmax.margin_logits(empty, nd(GOOD["weight"], "float32"), mx.nd.array(np.zeros(0)), 5,
                                      "cosface", backend=backend)
    block = ArcFaceDense(5, in_units=3, backend=backend, s=8.0)
    block.initialize()
    if hybridize:
        block.hybridize()
    label = nd(GOOD["label"], "float32")
    for _ in range(2):  # an empty batch between good ones, twice
        with autograd.record():
            good = block(nd(GOOD["data"], "float32") + mx.nd.arange(3).reshape((1, 3)), label)
        good.backward()
        assert good.shape == (4, 5) and np.all(np.isfinite(good.asnumpy()))
        with pytest.raises(ValueError, match="empty batch"):
            with autograd.record():
                block(empty, mx.nd.array(np.zeros(0)))
        with pytest.raises(ValueError, match="empty batch"):
            block(empty)
    assert block.step.data().asscalar() == 2
    assert_still_working()


@pytest.mark.parametrize("settings, message", [
    (dict(label=np.array([0, 1, 5, 2])), "label[2] = 5"),
    (dict(label=np.array([0, 1.5, 4, 2])), "label[1] = 1.5"),
    (dict(label=np.array([0, 1])), "label must have shape (N,) = (4,), got (2,)"),
    (dict(data=np.ones((4, 2))), "weight must have shape (num_hidden, D) = (5, 2), got (5, 3)"),
])
def test_hybridized_block_errors_name_the_input(backend, settings, message):
    """In a hybridized block the caught exception carries the message, for both backends."""
    from mx_lsoftmax.gluon import LSoftmaxDense
    block = LSoftmaxDense(5, in_units=3, backend=backend, margin=2)
    block.initialize()
    block.hybridize()
    data = settings.get("data", GOOD["data"])
    label = settings.get("label", GOOD["label"])
    with pytest.raises(ValueError) as error:
        with autograd.record():
            block(nd(data, "float32"), nd(label, "float32"))
    assert message in str(error.value)
    with autograd.record():
        good = block(nd(GOOD["data"], "float32"), nd(GOOD["label"], "float32"))
    assert good.shape == (4, 5) and block.step.data().asscalar() == 1
    assert_still_working()


@pytest.mark.parametrize("data, message", [
    (np.ones((4, 3, 1)), "data must be 2-D (N, D), got shape (4, 3, 1)"),
    (np.ones((4, 2)), "weight must have shape (num_hidden, D) = (5, 2), got (5, 3)"),
    (np.ones((4, 3), dtype=np.float64), "weight must have the dtype of data (float64), got float32"),
], ids=["3-D", "width", "dtype"])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_plain_calls_hold_the_training_calls_input_rules(backend, hybridize, data, message):
    """A prediction call refuses what a training call refuses, in the block and the entry point:
    FullyConnected alone would flatten a (4, 3, 1) batch into logits the layer never trained."""
    from mx_lsoftmax.gluon import CosFaceDense
    block = CosFaceDense(5, in_units=3, backend=backend)
    block.initialize()
    if hybridize:
        block.hybridize()
    array = mx.nd.array(data, dtype=data.dtype)
    with pytest.raises(ValueError) as error:
        block(array)
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:
        mx_lsoftmax.margin_logits(array, block.weight.data(), None, 5, "cosface", backend=backend)
    assert message in str(error.value)
    assert block(nd(GOOD["data"], "float32")).shape == (4, 5)
    assert_still_working()


def _bound_module(backend, data_shape, data_dtype="float32"):
    data, label = mx.sym.var("data", dtype=data_dtype), mx.sym.var("softmax_label")
    logits = mx_lsoftmax.margin_logits(data, mx.sym.var("cosface_weight"), label, 5, kind="cosface",
                                       backend=backend, name="cosface")
    module = mx.mod.Module(mx.sym.SoftmaxOutput(logits, label, name="softmax"))
    module.bind([mx.io.DataDesc("data", data_shape, data_dtype)], [("softmax_label", (data_shape[0],))])
    return module


@pytest.mark.parametrize("settings, message", [
    (dict(label=np.array([0, 1, 5, 2])), "label[2] = 5"),
    (dict(label=np.array([0, -1, 4, 2])), "label[1] = -1"),
    (dict(data_shape=(4, 3, 1)), "data must be 2-D (N, D), got shape (4, 3, 1)"),
    (dict(data_dtype="float16"), "data must be float32 or float64, got float16"),
])
def test_symbol_graph_errors_name_the_input(backend, settings, message):
    """Under Module the caught exception carries the op's message, for both backends
    (the Python op's callbacks sit behind MXNet's C boundary: mx_lsoftmax.hooks relays it)."""
    data_shape = settings.get("data_shape", (4, 3))
    data_dtype = settings.get("data_dtype", "float32")
    with pytest.raises((mx.base.MXNetError, RuntimeError)) as error:
        module = _bound_module(backend, data_shape, data_dtype)
        module.init_params(mx.init.Xavier())
        batch = mx.io.DataBatch([nd(GOOD["data"], "float32")], [nd(settings.get("label", GOOD["label"]))])
        module.forward(batch, is_train=True)
        module.get_outputs()[0].asnumpy()
    assert message in str(error.value)
    # The relayed message is consumed: an unrelated later failure does not carry it.
    with pytest.raises(mx.base.MXNetError) as unrelated:
        mx.nd.FullyConnected(mx.nd.ones((2, 3)), mx.nd.ones((4, 2)), num_hidden=4, no_bias=True).asnumpy()
    assert message not in str(unrelated.value)
    module = _bound_module(backend, (4, 3))
    module.init_params(mx.init.Xavier())
    module.forward(mx.io.DataBatch([nd(GOOD["data"], "float32")], [nd(GOOD["label"])]), is_train=True)
    assert module.get_outputs()[0].shape == (4, 5)
    assert_still_working()


def test_inputs_of_the_wrong_type_are_named(backend):
    """A NumPy array, a list, or a Symbol among NDArrays (and the reverse): a TypeError naming
    the input and its type, before MXNet's own messages (an AttributeError on ``asnumpy``, an
    assertion on 'Positional arguments')."""
    from mx_lsoftmax.gluon import CosFaceDense
    x, w, y = (nd(GOOD[name], "float32") for name in ("data", "weight", "label"))
    symbols = [mx.sym.var(name) for name in ("data", "weight", "label")]
    cases = [
        (dict(data=GOOD["data"]), "input data must be an MXNet NDArray or Symbol, got numpy.ndarray "
                                  "(convert with mx.nd.array)"),
        (dict(data=GOOD["data"].tolist()), "input data must be an MXNet NDArray or Symbol, got builtins.list"),
        (dict(label=GOOD["label"]), "input label must be an MXNet NDArray or Symbol, got numpy.ndarray"),
        (dict(weight=symbols[1]), "input weight must be an NDArray, as data is, got mxnet.symbol.symbol.Symbol"),
        (dict(step=mx.sym.var("step")), "input step must be an NDArray, as data is, got mxnet.symbol"),
        (dict(data=symbols[0], weight=w, label=symbols[2]),
         "input weight must be a Symbol, as data is, got mxnet.ndarray.ndarray.NDArray"),
        (dict(data=symbols[0], weight=symbols[1], label=y),
         "input label must be a Symbol, as data is, got mxnet.ndarray.ndarray.NDArray"),
    ]
    for recording in (True, False):
        for change, message in cases:
            arguments = dict(dict(data=x, weight=w, label=y), **change)
            with pytest.raises(TypeError) as error, autograd.record(train_mode=recording):
                mx_lsoftmax.margin_logits(num_hidden=5, kind="cosface", backend=backend, **arguments)
            assert message in str(error.value)
    with pytest.raises(TypeError, match="input data must be a Symbol .inference_symbol builds a graph"):
        mx_lsoftmax.inference_symbol(x, w, 5, "cosface")
    with pytest.raises(TypeError, match="input weight must be a Symbol"):
        mx_lsoftmax.inference_symbol(symbols[0], w, 5, "cosface")
    block = CosFaceDense(5, in_units=3, backend=backend)
    block.initialize()
    for hybridize in (False, True):
        block.hybridize(hybridize)
        with pytest.raises(TypeError, match="input data must be an MXNet NDArray or Symbol, got numpy.ndarray"):
            block(GOOD["data"])
        with pytest.raises(TypeError, match="input label must be an MXNet NDArray or Symbol, got numpy.ndarray"), \
                autograd.record():
            block(x, GOOD["label"])
        with autograd.record():
            assert block(x, y).shape == (4, 5)
    assert_still_working()


def test_no_label_while_training_gives_the_plain_logits(backend):
    """``label=None`` is a plain call in every mode (the blocks' ``block(x)`` rule): the plain
    logits, the schedule left alone (the compiled backend failed on ``None.dtype``)."""
    x, w = nd(GOOD["data"], "float64"), nd(np.random.default_rng(3).standard_normal((5, 3)), "float64")
    step = mx_lsoftmax.new_step(dtype="float64")
    with autograd.record():
        out = mx_lsoftmax.margin_logits(x, w, None, 5, "cosface", backend=backend, step=step, s=4.0)
    expected = 4.0 * (GOOD["data"] / np.linalg.norm(GOOD["data"], axis=1, keepdims=True)) @ \
        (w.asnumpy() / np.linalg.norm(w.asnumpy(), axis=1, keepdims=True)).T
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-12, atol=1e-12)
    assert step.asscalar() == 0


@pytest.mark.parametrize("kind, tiny", [("cosface", "data"), ("arcface", "data"), ("sphereface", "weight"),
                                        ("combined", "weight")])
def test_rows_too_small_for_float32_are_named_not_nan(backend, kind, tiny):
    """float32 rows of norm ~1e-42 (subnormal) under normalisation: the gradient, about
    s / |x| or 1 / |w| times the logits' gradient, leaves float32 (and the Python op's
    logits with it). Both backends stop with an error naming the row (docs/derivatives.md,
    limit of float32) instead of NaN or inf; the CUDA kernels too (tests/test_lsoftmax_gpu.py)."""
    data, weight, label = tiny_row_case(tiny)
    x, w = nd(data, "float32"), nd(weight, "float32")
    x.attach_grad()
    w.attach_grad()
    step = mx_lsoftmax.new_step()
    with pytest.raises(mx.base.MXNetError) as error:
        with autograd.record():
            out = mx_lsoftmax.margin_logits(x, w, nd(label), 3, kind, backend=backend, step=step)
        out.backward(mx.nd.ones_like(out))
        mx.nd.waitall()
    row = 2 if tiny == "data" else 1
    assert f"{tiny} row {row}" in str(error.value) and "float32" in str(error.value)
    # The Python op refuses in its forward, before the step; the compiled op in the backward.
    assert step.asscalar() == (0 if backend == "python" else 1)
    # The plain layer (prediction, export) takes such rows: its unit rows are quotients.
    plain = mx_lsoftmax.margin_logits(x, w, None, 3, kind, backend=backend).asnumpy()
    normalise_features = kind != "sphereface"
    data, weight = (array.astype(np.float32).astype(np.float64) for array in (data, weight))  # as rounded
    unit_data = data / np.linalg.norm(data, axis=1, keepdims=True) if normalise_features else data
    unit_weight = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    scale = 64.0 if normalise_features else 1.0
    # A norm of 1e-42 is itself a float32 subnormal, good to ~1e-3 (steps of 1.4e-45).
    np.testing.assert_allclose(plain, scale * unit_data @ unit_weight.T, rtol=0, atol=scale * 2e-3)
    # Ordinary rows still train, and so does float64 with the same tiny row.
    x64, w64 = nd(data, "float64"), nd(weight, "float64")
    x64.attach_grad()
    w64.attach_grad()
    with autograd.record():
        out = mx_lsoftmax.margin_logits(x64, w64, nd(label), 3, kind, backend=backend)
    out.backward(mx.nd.ones_like(out))
    assert all(np.isfinite(array.asnumpy()).all() for array in (out, x64.grad, w64.grad))
    assert call(backend).shape == (4, 5)
    assert_still_working()


@pytest.mark.parametrize("training, message", [
    (mx.nd.ones((2,)), "input training must hold one value, got shape (2,)"),
    (mx.nd.ones((1, 2)), "input training must hold one value, got shape (1, 2)"),
])
def test_compiled_op_takes_one_training_value_of_any_rank(training, message):
    """The flag is (1, 1) in the layer's graphs, (1,) for direct callers; more values are an error."""
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    inputs = (mx.nd.ones((2, 4)), mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), mx.nd.array([0, 1]), mx.nd.zeros((1,)))
    with pytest.raises(mx.base.MXNetError) as error:
        mx.nd.margin_softmax_target(*inputs, training)[0].asnumpy()
    assert message in str(error.value)
    for flag in (mx.nd.zeros((1,)), mx.nd.zeros((1, 1))):  # outside training: the plain logits
        np.testing.assert_array_equal(mx.nd.margin_softmax_target(*inputs, flag)[0].asnumpy(), np.ones((2, 4)))
    assert_still_working()
