"""The README's Python snippet runs as written, and its inference graph scores in a default Module."""
import os
import re

import mxnet as mx
import numpy as np

from conftest import ROOT


def readme_python_blocks():
    with open(os.path.join(ROOT, "README.md")) as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)


def test_readme_use_snippet_runs_and_its_graphs_train_and_score():
    blocks = readme_python_blocks()
    assert blocks, "the README has no Python snippet"
    rng = np.random.default_rng(0)
    namespace = {
        # What the snippet assumes the reader has: a batch, a classifier weight, labels, features.
        "x": mx.nd.array(rng.standard_normal((8, 6))),
        "weight": mx.nd.array(rng.standard_normal((10, 6))),
        "label": mx.nd.array(rng.integers(0, 10, 8)),
        "features": mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=6, name="embed"),
    }
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)
    assert namespace["step"].asscalar() == 2  # two training calls shared the counter
    head = namespace["head"]
    assert head(mx.nd.ones((2, 6))).shape == (2, 10)
    ldam = namespace["ldam"]
    ldam.initialize()
    margins = ldam.class_margins.data().asnumpy()
    assert margins.argmax() == 9 and abs(margins.max() - 0.5) < 1e-6  # the rarest class: max_margin
    with mx.autograd.record():
        assert ldam(mx.nd.ones((2, 6)), mx.nd.array([0, 9])).shape == (2, 10)
    # The Trainer holds the weight and not the schedule's counter.
    assert [p.name for p in namespace["trainer"]._params] == [head.weight.name]

    data = rng.standard_normal((32, 4)).astype(np.float32)
    labels = rng.integers(0, 10, 32).astype(np.float32)
    iterator = mx.io.NDArrayIter(data, labels, batch_size=8)
    train = mx.mod.Module(namespace["net"], context=mx.cpu())  # default data/label names
    train.fit(iterator, num_epoch=1, initializer=mx.init.Xavier())
    arguments, auxiliary = train.get_params()
    test = mx.mod.Module(namespace["test_net"], context=mx.cpu())
    test.bind(iterator.provide_data, iterator.provide_label, for_training=False)
    test.set_params({k: v for k, v in arguments.items() if k in namespace["test_net"].list_arguments()}, {},
                    allow_missing=False)
    (name, accuracy), = test.score(iterator, "acc")
    assert name == "accuracy" and 0.0 <= accuracy <= 1.0
