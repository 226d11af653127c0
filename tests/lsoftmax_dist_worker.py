"""One worker of the loopback data-parallel test (tests/test_lsoftmax_dist.py), started by
mx_lsoftmax.launch: trains a margin head on its rows of a fixed global batch with kvstore
dist_sync, through Gluon or Module, and saves what it ends with as {out}/{api}-rank{r}.npz."""
import argparse

import mxnet as mx
import numpy as np

import mx_lsoftmax
from mx_lsoftmax.gluon import MarginDense, trainable_parameters

ROWS, DIMS, CLASSES, STEPS, LEARNING_RATE = 8, 5, 4, 3, 0.5
SETTINGS = dict(margin=0.3, s=8.0, beta=4.0, scale=0.5)  # a decaying beta: the schedule matters


def global_batches():
    """STEPS batches of ROWS rows each, float64, the same in every process."""
    rng = np.random.default_rng(11)
    return [(rng.standard_normal((ROWS, DIMS)), rng.integers(0, CLASSES, ROWS)) for _ in range(STEPS)]


def initial_weight():
    return np.random.default_rng(12).standard_normal((CLASSES, DIMS))


def train_gluon(kind, backend, batches, kvstore, workers):
    block = MarginDense(CLASSES, kind=kind, in_units=DIMS, backend=backend, dtype="float64", **SETTINGS)
    block.initialize()
    block.weight.set_data(mx.nd.array(initial_weight(), dtype="float64"))
    if HYBRIDIZE:
        block.hybridize()
    trainer = mx.gluon.Trainer(trainable_parameters(block), "sgd", {"learning_rate": LEARNING_RATE},
                               kvstore=kvstore)
    betas = []
    for data, label in batches:
        betas.append(block.current_beta)
        with mx.autograd.record():
            loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()(block(mx.nd.array(data, dtype="float64"),
                                                                 mx.nd.array(label)), mx.nd.array(label))
        loss.backward()
        trainer.step(data.shape[0] * workers)
    mx.nd.waitall()  # the Python op's write of ``step`` is outside the engine's ordering
    return dict(weight=block.weight.data().asnumpy(), step=block.step.data().asnumpy(), betas=np.array(betas))


def train_module(kind, backend, batches, kvstore, workers):
    data, label = mx.sym.var("data", dtype="float64"), mx.sym.var("softmax_label")
    logits = mx_lsoftmax.margin_logits(data, mx.sym.var("head_weight"), label, CLASSES, kind, backend=backend,
                                       name="head", **SETTINGS)
    module = mx.mod.Module(mx.sym.SoftmaxOutput(logits, label, name="softmax"), context=mx.cpu())
    rows = batches[0][0].shape[0]
    module.bind([mx.io.DataDesc("data", (rows, DIMS), "float64")],
                [mx.io.DataDesc("softmax_label", (rows,), "float64")])
    module.init_params(arg_params={"head_weight": mx.nd.array(initial_weight(), dtype="float64")},
                       aux_params={"head_step": mx.nd.zeros((1,), dtype="float64")})
    module.init_optimizer(kvstore=kvstore, optimizer="sgd",
                          optimizer_params={"learning_rate": LEARNING_RATE, "rescale_grad": 1.0 / (rows * workers)})
    for x, y in batches:
        module.forward_backward(mx.io.DataBatch([mx.nd.array(x, dtype="float64")],
                                                [mx.nd.array(y, dtype="float64")]))
        module.update()
    arguments, auxiliary = module.get_params()  # no wait of ours: the step is current (hooks)
    return dict(weight=arguments["head_weight"].asnumpy(), step=auxiliary["head_step"].asnumpy())


TRAIN = {"gluon": train_gluon, "module": train_module}
HYBRIDIZE = False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=list(TRAIN), required=True)
    parser.add_argument("--kind", default="cosface")
    parser.add_argument("--backend", default="python")
    parser.add_argument("--out", required=True)
    parser.add_argument("--hybridize", action="store_true")
    arguments = parser.parse_args()
    global HYBRIDIZE
    HYBRIDIZE = arguments.hybridize
    kvstore = mx.kv.create("dist_sync")
    rank, workers = kvstore.rank, kvstore.num_workers
    share = ROWS // workers
    batches = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in global_batches()]
    result = TRAIN[arguments.api](arguments.kind, arguments.backend, batches, kvstore, workers)
    np.savez(f"{arguments.out}/{arguments.api}-rank{rank}.npz", **result)


if __name__ == "__main__":
    main()
