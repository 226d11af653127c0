"""Gluon block and Module training: resume, export, several devices, each backend."""
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mx_lsoftmax
from mx_lsoftmax.gluon import LSoftmaxDense, MarginDense

from mx_lsoftmax import spec

from conftest import TOLERANCE, angle_clear_inputs, nd

SCHEDULE = dict(margin=3, beta=20.0, scale=0.8, beta_min=0.5)


def train(block, data, label, steps, contexts=(mx.cpu(),), trainer=None):
    trainer = trainer or gluon.Trainer(block.collect_params(), "sgd", {"learning_rate": 0.1})
    loss_function = gluon.loss.SoftmaxCrossEntropyLoss()
    betas = []
    for _ in range(steps):
        betas.append([block.schedule.beta_at(block.step.data(c).asscalar()) for c in contexts])
        parts_x = gluon.utils.split_and_load(nd(data, "float32"), list(contexts))
        parts_y = gluon.utils.split_and_load(nd(label, "float32"), list(contexts))
        with autograd.record():
            losses = [loss_function(block(x, y), y) for x, y in zip(parts_x, parts_y)]
        for loss in losses:
            loss.backward()
        trainer.step(len(label))
    return betas, trainer


def fresh(backend, hybridize=True, contexts=(mx.cpu(),)):
    block = LSoftmaxDense(4, in_units=6, backend=backend, **SCHEDULE)
    block.initialize(mx.init.Xavier(rnd_type="gaussian"), ctx=list(contexts))
    block.weight.set_data(nd(np.random.default_rng(7).standard_normal((4, 6)), "float32"))
    if hybridize:
        block.hybridize()
    return block


@pytest.mark.parametrize("hybridize", [False, True])
def test_resume_gives_the_same_parameters_and_betas(backend, tmp_path, hybridize):
    data, _, label = angle_clear_inputs(16, 6, 4, 3, seed=1)
    straight = fresh(backend, hybridize)
    betas_straight, _ = train(straight, data, label, 6)
    first = fresh(backend, hybridize)
    betas_first, _ = train(first, data, label, 3)
    first.save_parameters(str(tmp_path / "head.params"))
    resumed = fresh(backend, hybridize)
    resumed.load_parameters(str(tmp_path / "head.params"))
    betas_second, _ = train(resumed, data, label, 3)
    assert betas_first + betas_second == betas_straight
    np.testing.assert_allclose(resumed.weight.data().asnumpy(), straight.weight.data().asnumpy(), rtol=1e-6, atol=1e-7)
    assert resumed.step.data().asscalar() == 6


def test_export_reloads_without_mx_lsoftmax(backend, tmp_path):
    data, _, label = angle_clear_inputs(8, 6, 4, 3, seed=2)
    block = fresh(backend)
    train(block, data, label, 2)
    symbol_file, params_file = block.export(str(tmp_path / "head"))
    live = block(nd(data, "float32")).asnumpy()
    # HybridBlock.export's parameters, by position too.
    assert block.export(str(tmp_path / "again"), 3, False) == (str(tmp_path / "again-symbol.json"),
                                                             str(tmp_path / "again-0003.params"))
    np.save(tmp_path / "data.npy", data.astype("float32"))
    code = f"""
import sys, numpy as np, mxnet as mx
assert 'mx_lsoftmax' not in sys.modules
net = mx.gluon.SymbolBlock.imports({symbol_file!r}, ['data'], {params_file!r})
x = mx.nd.array(np.load({str(tmp_path / 'data.npy')!r}))
np.save({str(tmp_path / 'gluon.npy')!r}, net(x).asnumpy())
sym, args, aux = mx.model.load_checkpoint({str(tmp_path / 'head')!r}, 0)
module = mx.mod.Module(sym, data_names=['data'], label_names=None)
module.bind(data_shapes=[('data', x.shape)], for_training=False)
module.set_params(args, aux)
module.forward(mx.io.DataBatch([x]), is_train=False)
np.save({str(tmp_path / 'module.npy')!r}, module.get_outputs()[0].asnumpy())
assert 'mx_lsoftmax' not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "gluon.npy"), live, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "module.npy"), live, rtol=1e-6, atol=1e-6)


def test_two_devices_match_one_device_gluon(backend):
    data, _, label = angle_clear_inputs(16, 6, 4, 3, seed=3)
    single = fresh(backend)
    betas_single, _ = train(single, data, label, 5)
    contexts = (mx.cpu(0), mx.cpu(1))
    double = fresh(backend, contexts=contexts)
    betas_double, _ = train(double, data, label, 5, contexts=contexts)
    for per_step, expected in zip(betas_double, betas_single):
        assert per_step == [expected[0]] * 2  # every device used the same beta at every step
    for context in contexts:
        np.testing.assert_allclose(double.weight.data(context).asnumpy(), single.weight.data().asnumpy(),
                                   rtol=1e-5, atol=1e-6)


def module_fit(backend, contexts, data, label, epochs=2, batch=32):
    label_variable = mx.sym.var("softmax_label")  # one node, used by both the layer and the loss
    symbol = mx_lsoftmax.lsoftmax(mx.sym.var("data"), mx.sym.var("fc_weight"), label_variable,
                                  10, backend=backend, name="head", **SCHEDULE)
    symbol = mx.sym.SoftmaxOutput(symbol, label_variable, name="softmax")
    iterator = mx.io.NDArrayIter(data, label, batch_size=batch, shuffle=False)
    module = mx.mod.Module(symbol, context=list(contexts))
    module.fit(iterator, num_epoch=epochs, optimizer="sgd", optimizer_params={"learning_rate": 0.05},
               arg_params={"fc_weight": mx.nd.array(np.random.default_rng(5).standard_normal((10, data.shape[1])) * 0.1)},
               initializer=mx.init.Xavier(), eval_metric="ce")
    mx.nd.waitall()
    arg_params, aux_params = module.get_params()
    inference = mx.sym.SoftmaxOutput(mx_lsoftmax.inference_symbol(mx.sym.var("data"), mx.sym.var("fc_weight"), 10,
                                                                  name="head"), name="softmax")
    scorer = mx.mod.Module(inference, context=mx.cpu())
    scorer.bind(data_shapes=iterator.provide_data, label_shapes=iterator.provide_label, for_training=False)
    scorer.set_params(arg_params, aux_params, allow_extra=True)
    accuracy = dict(scorer.score(iterator, "acc"))["accuracy"]
    return arg_params["fc_weight"].asnumpy(), aux_params["head_step"].asscalar(), accuracy


def mnist_batch(count=256):
    from mx_lsoftmax.support.data import load_mnist, resolve_directory
    if resolve_directory(None) is None:
        pytest.skip("real MNIST not found (set MNIST_DIR)")
    images, labels = load_mnist(download=False)["train"]
    features = (images[:count].reshape(count, -1).astype(np.float32) - 128) / 128
    return features, labels[:count].astype(np.float32)


def test_module_fit_backends_agree_on_mnist():
    data, label = mnist_batch()
    results = {backend: module_fit(backend, [mx.cpu()], data, label)
               for backend in ("python", "compiled") if backend == "python" or mx_lsoftmax.library.is_loaded()}
    for weight, step, accuracy in results.values():
        assert step == 16  # 2 epochs of 8 batches
        assert accuracy > 0.5
    if len(results) == 2:
        np.testing.assert_allclose(results["python"][0], results["compiled"][0], rtol=1e-4, atol=1e-5)


def test_module_two_devices_match_one(backend):
    data, label = mnist_batch(128)
    single = module_fit(backend, [mx.cpu()], data, label, epochs=1)
    double = module_fit(backend, [mx.cpu(0), mx.cpu(1)], data, label, epochs=1)
    assert single[1] == double[1] == 4
    np.testing.assert_allclose(double[0], single[0], rtol=1e-4, atol=1e-5)


def test_hybridize_defaults_to_static_memory_and_respects_the_caller():
    head = LSoftmaxDense(3, in_units=4, margin=2)
    head.hybridize()
    assert dict(head._flags)["static_alloc"] is True and dict(head._flags)["static_shape"] is True
    head.hybridize(static_alloc=False, static_shape=False)
    assert dict(head._flags)["static_alloc"] is False and dict(head._flags)["static_shape"] is False


class BodyAndHead(gluon.HybridBlock):
    """A user's network: a Dense body of deferred input size (5 units) and a margin head
    (3 classes, deferred in_units); ``network(x, label)`` trains, ``network(x)`` predicts."""

    def __init__(self, kind, backend):
        super().__init__()
        with self.name_scope():
            self.body = gluon.nn.Dense(5, activation="tanh")
            self.head = MarginDense(3, kind=kind, backend=backend, **({} if kind == "lsoftmax" else {"s": 4.0}))

    def hybrid_forward(self, F, x, label=None):
        return self.head(self.body(x), label)


@pytest.mark.parametrize("kind", ["lsoftmax", "arcface"])
def test_deferred_shapes_behind_a_deferred_layer(backend, kind):
    """in_units=0 behind a layer whose own input size is deferred too: MXNet's first shape
    inference hands the head its weight as (C, unknown), which it completes as FullyConnected does."""
    network = BodyAndHead(kind, backend)
    network.initialize()
    network.hybridize()
    data, _, label = angle_clear_inputs(8, 6, 3, 2, seed=5)
    with autograd.record():
        out = network(nd(data, "float32"), nd(label, "float32"))
    out.backward()
    assert out.shape == (8, 3)
    assert network.head.weight.shape == (3, 5)
    assert np.isfinite(network.head.weight.grad().asnumpy()).all()
    assert np.abs(network.body.weight.grad().asnumpy()).max() > 0


RELOAD_WITHOUT_MX_LSOFTMAX = """
import sys, numpy as np, mxnet as mx
net = mx.gluon.SymbolBlock.imports(sys.argv[1] + '-symbol.json', ['data'], sys.argv[1] + '-0000.params')
np.save(sys.argv[1] + '-out.npy', net(mx.nd.array(np.load(sys.argv[2]))).asnumpy())
assert 'mx_lsoftmax' not in sys.modules
"""


@pytest.mark.parametrize("kind", ["lsoftmax", "arcface"])
def test_a_parent_network_predicts_and_exports_after_training(backend, kind, tmp_path):
    """A head inside a hybridized network that trains with (x, label): MXNet fixes a cached
    graph's inputs at its first call, so the network predicts and exports with x alone after
    ``hybridize()`` again (README); that graph is the kind's plain one, of stock operators."""
    network = BodyAndHead(kind, backend)
    network.initialize(mx.init.Xavier())
    network.hybridize()
    data, _, label = angle_clear_inputs(8, 6, 3, 2, seed=6)
    x, y = nd(data, "float32"), nd(label, "float32")
    trainer = gluon.Trainer(network.collect_params(), "sgd", {"learning_rate": 0.1})
    for _ in range(2):
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(network(x, y), y)
        loss.backward()
        trainer.step(8)
    with pytest.raises(ValueError, match="argument structure"):  # MXNet's rule, not the head's
        network(x)
    expected = network.head(network.body(x)).asnumpy()  # the head's plain path, outside any cached graph

    network.hybridize()
    np.testing.assert_allclose(network(x).asnumpy(), expected, rtol=1e-6, atol=1e-6)
    network.export(str(tmp_path / "network"))
    np.save(tmp_path / "data.npy", data.astype("float32"))
    result = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_MX_LSOFTMAX, str(tmp_path / "network"),
                             str(tmp_path / "data.npy")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "network-out.npy"), expected, rtol=1e-6, atol=1e-6)

    network.hybridize()  # and back to training, the schedule where it was
    with autograd.record():
        out = network(x, y)
    out.backward()
    assert network.head.step.data().asscalar() == 3
    assert np.isfinite(network.head.weight.grad().asnumpy()).all()


@pytest.mark.parametrize("kind", ["lsoftmax", "arcface"])
def test_a_parent_network_predicts_before_it_trains(backend, kind):
    """Deferred shapes, and a hybridized network's first call a prediction: its graph does
    not read the head's ``step``, on which Gluon's shape inference stopped with a KeyError
    (mx_lsoftmax.hooks, fourth adaptation)."""
    data, _, label = angle_clear_inputs(8, 6, 3, 2, seed=7)
    x, y = nd(data, "float32"), nd(label, "float32")
    network = BodyAndHead(kind, backend)
    network.initialize(mx.init.Xavier())
    network.hybridize()
    predicted = network(x).asnumpy()
    assert network.head.weight.shape == (3, 5) and network.head.step.shape == (1,)
    expected = network.head(network.body(x)).asnumpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-6, atol=1e-6)
    network.hybridize()
    with autograd.record():
        out = network(x, y)
    out.backward()
    assert out.shape == (8, 3) and network.head.step.data().asscalar() == 1
    assert np.abs(network.body.weight.grad().asnumpy()).max() > 0


@pytest.mark.parametrize("kind", ["lsoftmax", "arcface"])
def test_a_parent_network_validates_with_labels_outside_training(backend, kind):
    """A validation loop calls the trained network with its labels, not recording: the cached
    training graph then runs outside training and gives the plain logits, the step kept (the
    compiled graph reads MXNet's is_train through its Dropout flag)."""
    data, _, label = angle_clear_inputs(8, 6, 3, 2, seed=12)
    x, y = nd(data, "float32"), nd(label, "float32")
    network = BodyAndHead(kind, backend)
    network.initialize(mx.init.Xavier())
    network.hybridize()
    with autograd.record():
        trained = network(x, y)
    trained.backward()
    validated = network(x, y).asnumpy()
    plain = network.head(network.body(x)).asnumpy()
    np.testing.assert_allclose(validated, plain, rtol=1e-6, atol=1e-6)
    assert np.abs(trained.asnumpy() - plain).max() > 1e-3  # the margin acted in training
    assert network.head.step.data().asscalar() == 1


def test_a_subgraph_backend_is_refused_by_the_compiled_block_and_documented_for_networks(backend):
    """MXNet's MKLDNN subgraph backend (hybridize(backend='MKLDNN'), an inference optimisation)
    removes Dropout from the graph it partitions, and with it the compiled graph's training flag:
    the compiled block refuses it by name; in a network so hybridized the compiled layer gives the
    plain logits even while training (README), the Python op still trains."""
    from mx_lsoftmax.gluon import ArcFaceDense
    data, _, label = angle_clear_inputs(8, 6, 3, 2, seed=13)
    x, y = nd(data, "float32"), nd(label, "float32")
    block = ArcFaceDense(3, in_units=6, backend=backend, s=4.0)
    block.initialize()
    if backend == "compiled":
        with pytest.raises(ValueError, match="hybridize parameter backend='MKLDNN'"):
            block.hybridize(backend="MKLDNN")
    network = BodyAndHead("arcface", backend)
    network.initialize(mx.init.Xavier())
    network.hybridize(backend="MKLDNN")
    with autograd.record():
        out = network(x, y)
    plain = network.head(network.body(x)).asnumpy()
    if backend == "compiled":
        np.testing.assert_allclose(out.asnumpy(), plain, rtol=1e-6, atol=1e-6)
        assert network.head.step.data().asscalar() == 0
    else:
        assert np.abs(out.asnumpy() - plain).max() > 1e-3
        assert network.head.step.data().asscalar() == 1


def test_hybridize_takes_gluons_parameters_in_gluons_order(backend):
    """``HybridBlock.hybridize``'s parameters by position (``optimize_for`` passes them so): the
    block keeps Gluon's order, defaulting only the static memory to on."""
    from mx_lsoftmax.gluon import ArcFaceDense
    data, _, label = angle_clear_inputs(8, 6, 3, 2, seed=14)
    x, y = nd(data, "float32"), nd(label, "float32")
    block = ArcFaceDense(3, in_units=6, backend=backend, s=4.0)
    block.initialize()
    block.hybridize(True, None, True, False, False, 3)
    assert dict(block._flags) == dict(static_alloc=False, static_shape=False, inline_limit=3)
    block.hybridize()
    assert dict(block._flags)["static_alloc"] and dict(block._flags)["static_shape"]
    if backend == "compiled":
        with pytest.raises(ValueError, match="hybridize parameter backend='MKLDNN'"):
            block.optimize_for(x, y, backend="MKLDNN")
        return
    block.optimize_for(x, y, backend="MKLDNN")
    with autograd.record():
        out = block(x, y)
    out.backward()
    assert np.abs(out.asnumpy() - block(x).asnumpy()).max() > 1e-3  # the margin acted in training
    assert block.step.data().asscalar() == 1


def trains_from_step_zero_in_a_symbol_block(make_output):
    """``gluon.SymbolBlock`` ignores the step variable's zero initializer: the schedule started
    at the global initializer's noise (t = 0.04), and ``Xavier`` failed on the (1,) array."""
    data, weight, label = angle_clear_inputs(8, 6, 3, 3, seed=15)
    settings = dict(margin=3, beta=8.0, scale=0.5)
    symbols = [mx.sym.var(name) for name in ("data", "weight", "label")]
    block = mx.gluon.SymbolBlock(make_output(*symbols, **settings), [symbols[0], symbols[2]])
    block.cast("float64")
    block.initialize(mx.init.Xavier())
    block(nd(data, "float64"), nd(label, "float64"))  # deferred shapes, outside training
    block.collect_params()["weight"].set_data(nd(weight))
    step = block.collect_params()["head_step"]
    assert step.data().asscalar() == 0
    for t in range(3):
        with autograd.record():
            out = block(nd(data, "float64"), nd(label, "float64"))
        out.backward()
        beta = mx_lsoftmax.beta_at(t, beta=settings["beta"], scale=settings["scale"])
        np.testing.assert_allclose(out.asnumpy(), spec.forward(data, weight, label, 3, beta),
                                   **TOLERANCE["float64"])
    assert step.data().asscalar() == 3


def test_a_symbol_block_of_the_training_graph_starts_its_schedule_at_zero(backend):
    trains_from_step_zero_in_a_symbol_block(
        lambda data, weight, label, **settings: mx_lsoftmax.lsoftmax(data, weight, label, 3, backend=backend,
                                                                     name="head", **settings))


def test_a_symbol_block_of_the_custom_op_starts_its_schedule_at_zero():
    trains_from_step_zero_in_a_symbol_block(
        lambda data, weight, label, **settings: mx.sym.Custom(data, weight, label, op_type="LSoftmax",
                                                              num_hidden=3, name="head", **settings))
