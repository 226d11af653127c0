"""The margin family (K1-K9): every kind x backend x dtype against the float64 spec,
finite differences, backend parity, edge angles, zero rows, settings, blocks and symbols."""
import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mx_lsoftmax
from mx_lsoftmax import KINDS, MarginSettings, spec
from mx_lsoftmax import gluon as blocks

from conftest import (BETAS, KIND_CASES, NUMERIC_GRADIENT_SCALED, TOLERANCE, kind_inputs, nd,
                      numeric_gradient, unit_rows_case, assert_unit_rows_match)

# Both routes of the Python op (host and engine) in every backend-parametrized test.
BOTH_PYTHON_ROUTES = True

SCHEDULE_NAMES = ("beta", "beta_min", "scale", "gamma", "power")


def case_settings(case, beta=None):
    kind, settings = KIND_CASES[case]
    settings = dict(settings)
    if beta is not None:  # a constant beta: the kind's own schedule switched off
        settings.update(beta=beta, beta_min=0.0, gamma=0.0, scale=1.0)
    return kind, settings


def spec_values(kind, settings):
    """The kind's non-schedule settings at their resolved values, for the spec."""
    return {name: value for name, value in MarginSettings(kind, **settings).values.items()
            if name not in SCHEDULE_NAMES}


def run_layer(backend, kind, settings, data, weight, label, grad_output):
    """One training forward + backward through margin_logits; returns (out, d data, d weight)."""
    x, w = nd(data), nd(weight)
    x.attach_grad()
    w.attach_grad()
    with autograd.record():
        out = mx_lsoftmax.margin_logits(x, w, nd(label, "float32"), weight.shape[0], kind,
                                        backend=backend, **settings)
    out.backward(nd(grad_output, data.dtype))
    return out.asnumpy(), x.grad.asnumpy(), w.grad.asnumpy()


def expected(kind, settings, data, weight, label, grad, angle_floor=spec.FLOAT64_ANGLE_FLOOR):
    beta = MarginSettings(kind, **settings).beta_at(0)
    values = spec_values(kind, settings)
    return (spec.family_forward(kind, data, weight, label, beta, **values),
            *spec.family_backward(kind, data, weight, label, beta, grad, angle_floor=angle_floor,
                                  **values))


@pytest.mark.parametrize("case", KIND_CASES)
@pytest.mark.parametrize("beta", BETAS)
def test_forward_and_gradients_match_spec(backend, dtype, case, beta):
    kind, settings = case_settings(case, beta)
    data, weight, label = kind_inputs(kind, settings, 16, 7, 5, seed=3, dtype=dtype)
    grad = np.random.default_rng(4).standard_normal((16, 5)).astype(dtype)
    result = run_layer(backend, kind, settings, data, weight, label, grad)
    floor = float(np.sqrt(np.finfo(dtype).eps))
    # float32 logits reach s = 64: compare relative to the scale of each array.
    for got, want in zip(result, expected(kind, settings, data, weight, label, grad, floor)):
        scale = max(1.0, float(np.abs(want).max())) if dtype == "float32" else 1.0
        np.testing.assert_allclose(got / scale, want / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("case", KIND_CASES)
def test_kind_defaults_schedule(backend, case):
    """The kind's own schedule (sphereface: beta 1000, beta_min 5, ...) at step 0."""
    kind, settings = case_settings(case)
    data, weight, label = kind_inputs(kind, settings, 8, 5, 4, seed=5)
    grad = np.random.default_rng(5).standard_normal((8, 4))
    result = run_layer(backend, kind, settings, data, weight, label, grad)
    for got, want in zip(result, expected(kind, settings, data, weight, label, grad)):
        np.testing.assert_allclose(got, want, **TOLERANCE["float64"])


@pytest.mark.parametrize("case", KIND_CASES)
def test_numeric_gradient_float64(backend, case):
    """Exact gradients through both normalisations: finite differences in float64 agree."""
    kind, settings = case_settings(case, beta=0.7)
    data, weight, label = kind_inputs(kind, settings, 5, 4, 3, seed=11, clearance=0.08)
    projection = np.random.default_rng(12).standard_normal((5, 3))

    def loss():
        with autograd.record():
            out = mx_lsoftmax.margin_logits(nd(data), nd(weight), nd(label), 3, kind, backend=backend,
                                            **settings)
        return float(np.sum(out.asnumpy() * projection))

    _, grad_data, grad_weight = run_layer(backend, kind, settings, data, weight, label, projection)
    eps, rtol, atol = (NUMERIC_GRADIENT_SCALED[key] for key in ("numeric_eps", "rtol", "atol"))
    np.testing.assert_allclose(grad_data, numeric_gradient(loss, data, eps), rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad_weight, numeric_gradient(loss, weight, eps), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", KIND_CASES)
@pytest.mark.parametrize("beta", BETAS)
def test_backends_agree_in_float64(case, beta):
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    kind, settings = case_settings(case, beta)
    data, weight, label = kind_inputs(kind, settings, 32, 9, 7, seed=21, clearance=0.0)
    grad = np.random.default_rng(22).standard_normal((32, 7))
    python = run_layer("python", kind, settings, data, weight, label, grad)
    compiled = run_layer("compiled", kind, settings, data, weight, label, grad)
    for left, right in zip(python, compiled):
        np.testing.assert_allclose(left, right, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", KIND_CASES)
def test_inference_is_the_plain_logits_of_the_kind(backend, dtype, case):
    kind, settings = case_settings(case)
    data, weight, label = kind_inputs(kind, settings, 6, 5, 4, seed=7, dtype=dtype)
    want = spec.family_inference(kind, data, weight, **spec_values(kind, settings))
    out = mx_lsoftmax.margin_logits(nd(data), nd(weight), nd(label), 4, kind, backend=backend, **settings)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(out.asnumpy() / scale, want / scale, **TOLERANCE[dtype])
    graph = mx_lsoftmax.inference_symbol(mx.sym.var("data"), mx.sym.var("weight"), 4, kind, **settings)
    executor = graph.bind(mx.cpu(), {"data": nd(data), "weight": nd(weight)})
    np.testing.assert_allclose(executor.forward()[0].asnumpy() / scale, want / scale, **TOLERANCE[dtype])


def _row_at(angle, norm_x=1.7):
    """x at `angle` from w_0 = 0.6 e_0 in the plane (e_0, e_1); float64."""
    weight = np.array([[0.6, 0.0, 0.0], [0.3, -0.2, 0.9]])
    return norm_x * np.array([math.cos(angle), math.sin(angle), 0.0]), weight


@pytest.mark.parametrize("case", KIND_CASES)
def test_edge_angles_and_zero_rows_are_finite(backend, dtype, case):
    """theta = 0 and pi (parallel, antiparallel), near them, the guard angles, zero rows (K5, K9)."""
    kind, settings = case_settings(case)
    angles = [0.0, 1e-9, 1e-4, math.pi - 1e-4, math.pi - 1e-9, math.pi]
    angles += [math.acos(max(-1.0, min(1.0, t))) + offset
               for t in kind_thresholds_of(kind, settings) for offset in (-1e-9, 1e-9)]
    rows = [_row_at(angle)[0] for angle in angles]
    weight = _row_at(0.0)[1]
    rows += [np.zeros(3), np.array([1.0, 2.0, 3.0])]  # a zero feature row; a row aimed at a zero weight
    weight = np.vstack([weight, np.zeros(3)])
    label = np.array([0] * len(angles) + [1, 2])
    data = np.array(rows).astype(dtype)
    weight = weight.astype(dtype)
    grad = np.random.default_rng(0).standard_normal((len(label), 3)).astype(dtype)
    out, grad_data, grad_weight = run_layer(backend, kind, settings, data, weight, label, grad)
    for part in (out, grad_data, grad_weight):
        assert np.all(np.isfinite(part))
    floor = float(np.sqrt(np.finfo(dtype).eps))
    want = expected(kind, settings, data.astype(np.float64), weight.astype(np.float64), label,
                    grad.astype(np.float64), floor)
    scale = max(1.0, float(np.abs(want[0]).max()))
    compared = np.arange(len(label))
    if dtype == "float32" and kind == "arcface":
        # arcface's psi jumps at its guard: 1e-9 either side is inside float32 rounding, so
        # either side's value is right there; the rows elsewhere are compared.
        compared = np.r_[:6, len(angles):len(label)]
    np.testing.assert_allclose(out[compared] / scale, want[0][compared] / scale, **TOLERANCE[dtype])
    if dtype == "float64":
        # At the poles psi' is ~1/delta and multiplies a vector of rounding size: agree to 1e-6.
        np.testing.assert_allclose(grad_data, want[1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad_weight, want[2], rtol=1e-6, atol=1e-6)
    row = KINDS[kind]
    zero_feature, zero_weight_class = len(angles), 2
    if row.normalise_features:  # (K9): a zero feature row has all-zero logits and no gradient
        assert np.all(out[zero_feature] == 0) and np.all(grad_data[zero_feature] == 0)
    if row.normalise_weights:  # a zero weight row: its column is 0 and its gradient 0
        assert np.all(out[:, zero_weight_class] == 0) and np.all(grad_weight[zero_weight_class] == 0)


def kind_thresholds_of(kind, settings):
    from conftest import kind_thresholds
    return kind_thresholds(kind, MarginSettings(kind, **settings).values)


def test_per_class_sums_keep_a_non_finite_row_in_its_own_class():
    """The Python op sums target-row updates class by class: an inf or NaN update reaches
    its own class's sum and no other (a dense one-hot product gives 0 * inf)."""
    from mx_lsoftmax.op import sum_by_class
    values = np.array([[1.0, 2.0], [np.inf, 1.0], [3.0, np.nan], [4.0, 5.0]])
    classes, sums = sum_by_class(values, np.array([2, 0, 5, 2]))
    assert classes.tolist() == [0, 2, 5]
    assert sums[1].tolist() == [5.0, 7.0]
    assert sums[0, 0] == np.inf and sums[0, 1] == 1.0 and np.isnan(sums[2, 1])


# ---- settings (K4): one table per language, the same on both sides ----

@pytest.mark.parametrize("kind, setting", [("lsoftmax", "s"), ("sphereface", "easy_margin"),
                                           ("cosface", "m1"), ("arcface", "m3"), ("combined", "margin")])
def test_a_setting_the_kind_does_not_take_is_an_error_naming_it(kind, setting):
    with pytest.raises(ValueError, match=f"does not take the setting\\(s\\) \\['{setting}'\\]"):
        mx_lsoftmax.margin_logits(mx.nd.ones((2, 3)), mx.nd.ones((4, 3)), mx.nd.array([0, 1]), 4, kind,
                                  **{setting: 1.0})
    with pytest.raises(ValueError, match=setting):
        blocks.MarginDense(4, kind, **{setting: 1.0})


@pytest.mark.parametrize("kind, settings, message", [
    ("cosface", dict(s=0), "CosFace parameter s must be > 0, got 0"),
    ("cosface", dict(margin=-0.1), "CosFace parameter margin must be >= 0, got -0.1"),
    ("arcface", dict(margin=3.2), "ArcFace parameter margin must be in [0, pi), got 3.2"),
    ("arcface", dict(easy_margin="maybe"), "ArcFace parameter easy_margin must be a boolean, got 'maybe'"),
    ("sphereface", dict(margin=1.5), "SphereFace parameter margin must be an integer >= 1, got 1.5"),
    ("combined", dict(m1=0), "combined margin parameter m1 must be > 0, got 0"),
    ("combined", dict(m2=4.0), "combined margin parameter m2 must be in [0, 3.14159), got 4.0"),
    ("combined", dict(s=float("inf")), "combined margin parameter s must be finite, got inf"),
    ("facenet", dict(), "kind must be one of"),
])
def test_bad_settings_name_the_setting_and_value(kind, settings, message):
    with pytest.raises(ValueError) as error:
        MarginSettings(kind, **settings)
    assert message in str(error.value)


def test_defaults_follow_the_papers():
    assert MarginSettings("sphereface").values == dict(margin=4, beta=1000.0, beta_min=5.0, scale=1.0,
                                                       gamma=0.12, power=1.0)
    assert (MarginSettings("cosface").margin, MarginSettings("cosface").s) == (0.35, 64.0)
    arcface = MarginSettings("arcface")
    assert (arcface.margin, arcface.s, arcface.easy_margin, arcface.beta) == (0.5, 64.0, False, 0.0)
    combined = MarginSettings("combined")
    assert (combined.m1, combined.m2, combined.m3, combined.s) == (1.0, 0.3, 0.2, 64.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_defaults_equal_the_python_table(kind):
    """The C++ table of kinds gives the op, called with no settings, the Python table's defaults."""
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    data, weight, label = kind_inputs(kind, MarginSettings(kind).values, 6, 4, 3, seed=1)
    x, w = nd(data), nd(weight)
    if MarginSettings(kind).row.normalise_weights:  # unit rows into the products, norms into the op (K11)
        classifier, weight_input = mx.nd.margin_softmax_normalise(w, x, num_hidden=3)
    else:
        classifier, weight_input = w, w
    logits = mx.nd.dot(x, classifier, transpose_b=True)
    step = mx.nd.array([0.0], dtype="float64")
    training = mx.nd.ones((1,))  # the flag graph.py derives from is_train
    bare = mx.nd.margin_softmax_target(logits, x, weight_input, nd(label), step, training, kind=kind)[0]
    attrs = MarginSettings(kind).as_attrs()
    full = mx.nd.margin_softmax_target(logits, x, weight_input, nd(label),
                                       mx.nd.array([0.0], dtype="float64"), training, **attrs)[0]
    np.testing.assert_array_equal(bare.asnumpy(), full.asnumpy())
    want = expected(kind, {}, data, weight, label, np.zeros((6, 3)))[0]
    np.testing.assert_allclose(bare.asnumpy(), want, **TOLERANCE["float64"])


# ---- Gluon blocks, symbols and Module ----

BLOCKS = {"lsoftmax": blocks.LSoftmaxDense, "sphereface": blocks.SphereFaceDense,
          "cosface": blocks.CosFaceDense, "arcface": blocks.ArcFaceDense,
          "combined": blocks.CombinedMarginDense}


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_blocks_train_predict_export_and_resume(backend, kind, hybridize, tmp_path):
    settings = dict(beta=2.0, scale=0.5) if kind != "sphereface" else dict(margin=3)
    data, weight, label = kind_inputs(kind, MarginSettings(kind, **settings).values, 8, 4, 3, seed=9)
    block = BLOCKS[kind](3, in_units=4, backend=backend, dtype="float64", **settings)
    assert block.settings.kind == kind
    block.initialize()
    block.weight.set_data(nd(weight))
    if hybridize:
        block.hybridize()
    values = spec_values(kind, settings)
    for t in range(3):
        beta = block.current_beta
        assert beta == pytest.approx(MarginSettings(kind, **settings).beta_at(t))
        with autograd.record():
            out = block(nd(data), nd(label))
        out.backward()
        np.testing.assert_allclose(out.asnumpy(), spec.family_forward(kind, data, weight, label, beta, **values),
                                   **TOLERANCE["float64"])
        plain = spec.family_inference(kind, data, weight, **values)
        np.testing.assert_allclose(block(nd(data)).asnumpy(), plain, **TOLERANCE["float64"])
    assert block.step.data().asscalar() == 3
    block.save_parameters(str(tmp_path / "head.params"))
    resumed = BLOCKS[kind](3, in_units=4, backend=backend, dtype="float64", **settings)
    resumed.load_parameters(str(tmp_path / "head.params"))
    assert resumed.current_beta == block.current_beta
    symbol_file, params_file = block.export(str(tmp_path / "head"))
    imported = gluon.SymbolBlock.imports(symbol_file, ["data"], params_file)
    imported.cast("float64")
    np.testing.assert_allclose(imported(nd(data)).asnumpy(), block(nd(data)).asnumpy(), **TOLERANCE["float64"])


@pytest.mark.parametrize("kind", ["sphereface", "arcface"])
def test_module_fit_with_custom_symbol_and_compiled_graph(kind):
    """mx.sym.Custom(op_type='MarginSoftmax') and the compiled graph train alike in Module."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((64, 6)).astype(np.float32)
    label = (data[:, 0] > 0).astype(np.float32) + 2 * (data[:, 1] > 0)
    settings = dict(beta=1.0) if kind == "arcface" else dict(margin=2, beta=10.0, beta_min=1.0)
    settings = MarginSettings(kind, **({"s": 8.0} if kind == "arcface" else {}), **settings).as_attrs()
    results = []
    backends = ["python"] + (["compiled"] if mx_lsoftmax.library.is_loaded() else [])
    for backend in backends:
        x, y = mx.sym.var("data"), mx.sym.var("softmax_label")
        weight = mx.sym.var("head_weight")
        features = mx.sym.FullyConnected(x, num_hidden=5, name="embed")
        if backend == "python":
            step = mx.sym.Variable("head_step", shape=(1,), init=mx.init.Zero())
            head = mx.sym.Custom(features, weight, y, step, op_type="MarginSoftmax",
                                 num_hidden=4, name="head", **settings)
        else:
            kind_settings = {k: v for k, v in settings.items() if k != "kind"}
            head = mx_lsoftmax.margin_logits(features, weight, y, 4, kind, backend="compiled", name="head",
                                             **{k: float(v) for k, v in kind_settings.items()})
        module = mx.mod.Module(mx.sym.SoftmaxOutput(head, y), context=mx.cpu())
        iterator = mx.io.NDArrayIter(data, label, batch_size=16)
        mx.random.seed(0)
        module.fit(iterator, num_epoch=2, initializer=mx.init.Xavier(), optimizer="sgd",
                   optimizer_params={"learning_rate": 0.05})
        args, aux = module.get_params()
        assert aux["head_step"].asscalar() == 8
        results.append(args["head_weight"].asnumpy())
    if len(results) == 2:
        np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_x, norm_w", [(3.46e20, 1.0), (1e-20, 1e20), (1e-22, 1.0), (1e-15, 1e-15)])
@pytest.mark.parametrize("case", ["lsoftmax-m4", "sphereface-m4", "arcface"])
def test_float32_extreme_norms_stay_finite_and_right(backend, case, norm_x, norm_w):
    """Rows whose squared norm overflows or underflows float32 (|x| = 3.46e20, |x| = 1e-22,
    |w_y| / |x| = 1e40): the norms are computed without overflow, the per-row math in float64."""
    kind, settings = case_settings(case, beta=0.0)
    rng = np.random.default_rng(6)
    direction_x, direction_w = rng.standard_normal(15), rng.standard_normal((2, 15))
    data = (norm_x * direction_x / np.linalg.norm(direction_x))[None, :]
    weight = norm_w * direction_w / np.linalg.norm(direction_w, axis=1, keepdims=True)
    label, grad = np.array([0]), np.array([[1.0, 0.5]])
    assert np.abs(data @ weight.T).max() < 1e30  # the plain products stay inside float32
    out, grad_data, grad_weight = run_layer(backend, kind, settings, data.astype("float32"),
                                            weight.astype("float32"), label, grad.astype("float32"))
    want = expected(kind, settings, data.astype("float32").astype(np.float64),
                    weight.astype("float32").astype(np.float64), label, grad,
                    float(np.sqrt(np.finfo(np.float32).eps)))
    for got, reference in zip((out, grad_data, grad_weight), want):
        assert np.all(np.isfinite(got))
        scale = float(np.abs(reference).max())
        np.testing.assert_allclose(got / scale, reference / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lsoftmax", "arcface"])
def test_bare_custom_symbol_trains_in_module_with_a_standard_initializer(kind):
    """The contract form, no step passed: MXNet creates `{name}_step`, and Xavier starts it at 0."""
    rng = np.random.default_rng(1)
    data = mx.sym.var("data")
    label = mx.sym.var("softmax_label")
    features = mx.sym.FullyConnected(data, num_hidden=6, name="embed")
    head = mx.sym.Custom(features, mx.sym.var("fc_weight"), label, op_type="MarginSoftmax", kind=kind,
                         num_hidden=4, name="head", beta=2.0, scale=0.5)
    assert head.list_auxiliary_states() == ["head_step"]
    module = mx.mod.Module(mx.sym.SoftmaxOutput(head, label, name="softmax"))
    iterator = mx.io.NDArrayIter(rng.standard_normal((32, 5)).astype(np.float32),
                                 rng.integers(0, 4, 32).astype(np.float32), batch_size=8)
    module.fit(iterator, num_epoch=1, initializer=mx.init.Xavier())
    assert module.get_params()[1]["head_step"].asscalar() == 4  # 4 batches from 0
    with pytest.raises(ValueError, match="Unknown initialization pattern"):  # other names as before
        mx.init.Xavier()(mx.init.InitDesc("mystery"), mx.nd.zeros((2,)))


@pytest.mark.parametrize("case", ["sphereface-m4", "cosface"])
def test_python_op_past_the_diagonal_block_size_matches_spec(case, monkeypatch):
    """The Python op scales a large weight's rows by diagonal sparse blocks, which MXNet
    allows only below 2^31 entries each: C = 50000 classes spans two blocks and must match
    the spec."""
    from mx_lsoftmax import op
    monkeypatch.setattr(op, "HOST_ENTRIES", 0)  # the engine route at a test size
    classes = op.DIAGONAL_BLOCK + 17232
    kind, settings = case_settings(case, 0.0)
    rng = np.random.default_rng(5)
    data, weight = rng.standard_normal((3, 2)), rng.standard_normal((classes, 2))
    label = np.array([0, op.DIAGONAL_BLOCK + 3, classes - 1], dtype=np.float64)
    grad = rng.standard_normal((3, classes))
    result = run_layer("python", kind, settings, data, weight, label, grad)
    for got, want in zip(result, expected(kind, settings, data, weight, label, grad)):
        np.testing.assert_allclose(got, want, **TOLERANCE["float64"])


@pytest.mark.parametrize("case", ["arcface", "sphereface-m4"])
def test_python_op_in_a_bound_graph_reuses_its_work_arrays_correctly(case, monkeypatch):
    """A bound graph keeps its op instance and with it the Python op's (N, C) and (C, D)
    work arrays: every call must still give the spec's values for its own inputs."""
    monkeypatch.setattr(mx_lsoftmax.op, "HOST_ENTRIES", 0)  # the (C, D) work arrays are the engine route's
    kind, settings = case_settings(case, 0.0)
    data_var, weight_var, label_var = mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label")
    graph = mx_lsoftmax.margin_logits(data_var, weight_var, label_var, 5, kind, backend="python", **settings)
    executor = graph.simple_bind(mx.cpu(), data=(6, 4), weight=(5, 4), label=(6,), type_dict={
        "data": "float64", "weight": "float64", "label": "float64"}, grad_req={
        "data": "write", "weight": "write", "label": "null"})
    for seed in (1, 2, 3):
        data, weight, label = kind_inputs(kind, settings, 6, 4, 5, seed=seed)
        grad = np.random.default_rng(seed).standard_normal((6, 5))
        executor.arg_dict["data"][:] = data
        executor.arg_dict["weight"][:] = weight
        executor.arg_dict["label"][:] = label
        executor.aux_dict[graph.list_auxiliary_states()[0]][:] = 0
        executor.forward(is_train=True)
        executor.backward([mx.nd.array(grad, dtype="float64")])
        got = (executor.outputs[0].asnumpy(), executor.grad_dict["data"].asnumpy(),
               executor.grad_dict["weight"].asnumpy())
        for value, want in zip(got, expected(kind, settings, data, weight, label, grad)):
            np.testing.assert_allclose(value, want, **TOLERANCE["float64"])


# ---- The compiled op's unit weight rows (K11) ----

def compiled_unit_rows(weight, grad_unit, grad_norm, dtype):
    w = nd(weight, dtype)
    w.attach_grad()
    with autograd.record():
        unit, norms = mx.nd.margin_softmax_normalise(w, nd(np.ones((2, weight.shape[1])), dtype),
                                                     num_hidden=weight.shape[0])
        loss = (unit * nd(grad_unit, dtype)).sum() + (norms * nd(grad_norm)).sum().astype(dtype)
    loss.backward()
    return unit.asnumpy(), norms.asnumpy(), w.grad.asnumpy()


@pytest.mark.parametrize("dtype, norms", [
    ("float64", [1.0, 0.0, 2.5, 1e-30, 1e30, 1e-160, 1e160]),  # zero row; squares that leave float64
    ("float32", [1.0, 0.0, 2.5, 1e-30, 3e20, 1e-22]),         # squares that leave float32
])
def test_compiled_unit_rows_and_their_gradient(dtype, norms):
    """margin_softmax_normalise against explicit normalisation and finite differences, with
    the norms' gradient too (the layer passes 0 there; the op is exact for any)."""
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    weight, grad_unit, grad_norm = unit_rows_case(norms)
    weight = weight.astype(dtype).astype(np.float64)  # the reference sees the rounded rows
    assert_unit_rows_match(weight, grad_unit, grad_norm,
                           *compiled_unit_rows(weight, grad_unit, grad_norm, dtype), dtype)


@pytest.mark.parametrize("call, message", [
    (lambda w, x: mx.nd.margin_softmax_normalise(w, x), "parameter num_hidden must be an integer >= 1, got nothing"),
    (lambda w, x: mx.nd.margin_softmax_normalise(w, x, num_hidden=2.5), "num_hidden must be an integer >= 1, got 2.5"),
    (lambda w, x: mx.nd.margin_softmax_normalise(w, x, num_hidden=6), "input weight must be (num_hidden, D) = (6, 4), got shape (5, 4)"),
    (lambda w, x: mx.nd.margin_softmax_normalise(w, x.reshape((2, 2, 2)), num_hidden=5), "input data must be 2-D (N, D), got shape (2, 2, 2)"),
    (lambda w, x: mx.nd.margin_softmax_normalise(w, x.astype("float64"), num_hidden=5), "input weight must have the dtype of data (float64), got float32"),
    (lambda w, x: mx.nd.margin_softmax_normalise(w, x, num_hidden=5, margin=1), "takes only num_hidden, got margin=1"),
])
def test_compiled_unit_rows_errors_name_the_input(call, message):
    if not mx_lsoftmax.library.is_loaded():
        pytest.skip("the compiled library is not built (run `make`)")
    weight, data = mx.nd.ones((5, 4)), mx.nd.ones((2, 4))
    with pytest.raises(mx.base.MXNetError) as error:
        call(weight, data)[0].asnumpy()
    assert message in str(error.value)
    assert "margin_softmax_normalise:" in str(error.value)
    unit = mx.nd.margin_softmax_normalise(weight, data, num_hidden=5)[0]  # the process goes on
    np.testing.assert_allclose(unit.asnumpy(), np.full((5, 4), 0.5))
