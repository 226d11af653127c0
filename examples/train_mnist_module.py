#!/usr/bin/env python3
"""Train LeNet with a margin-softmax head through MXNet's Module API (symbol graphs), on one
machine or several (--kvstore dist_sync under `python -m mx_lsoftmax.launch`).

The settings are train_mnist.py's (same data sets, losses, long-tailed subsets, shards, --json
log); this script trains the symbol-graph way: `mx_lsoftmax.margin_logits` on Symbols, the schedule
counter as the graph's auxiliary state `head_step`, `Module.fit` with the kvstore, checkpoints by
`mx.callback.do_checkpoint` (rank 0). Not here: --net other than lenet, --plot, --drw-epoch.

Example:
  python examples/train_mnist_module.py --loss cosface --s 16 --margin 0.2 --epochs 5 --json module.json
"""
import json
import time

import numpy as np

import mxnet as mx

import mx_lsoftmax
import train_mnist

HEAD = "head"


def lenet_symbol(embed_dim):
    """The LeNet of train_mnist.lenet as a Symbol: its input 'data', its embedding out."""
    net = mx.sym.var("data")
    for channels in (32, 64):
        net = mx.sym.Convolution(net, kernel=(5, 5), num_filter=channels)
        net = mx.sym.Pooling(mx.sym.relu(net), kernel=(2, 2), stride=(2, 2), pool_type="max")
    net = mx.sym.relu(mx.sym.FullyConnected(mx.sym.flatten(net), num_hidden=256))
    return mx.sym.FullyConnected(net, num_hidden=embed_dim, name="embedding")


def head_symbols(arguments, embedding, label, class_counts):
    """(training logits, plain logits, fixed arguments): softmax's FC, or the margin kind's graphs.
    ``label`` is the graph's one label node, shared with the loss."""
    weight = mx.sym.var(f"{HEAD}_weight")
    if arguments.loss == "softmax":
        logits = mx.sym.FullyConnected(embedding, weight, no_bias=True, num_hidden=10, name=HEAD)
        return logits, logits, {}
    kind = train_mnist.HEAD_KIND.get(arguments.loss, arguments.loss)
    settings = train_mnist.kind_settings(arguments)
    fixed = {}
    class_margins = None
    if arguments.loss == "ldam":  # LDAM's margins: a graph argument nobody trains
        class_margins = mx.sym.var(f"{HEAD}_class_margins")
        fixed[f"{HEAD}_class_margins"] = mx.nd.array(mx_lsoftmax.ldam_margins(class_counts, arguments.max_margin))
    training = mx_lsoftmax.margin_logits(embedding, weight, label, 10, kind, backend=arguments.backend, name=HEAD,
                                         class_margins=class_margins, **settings)
    plain = mx_lsoftmax.inference_symbol(embedding, weight, 10, kind, name=HEAD, **settings)
    return training, plain, fixed


def iterator(images, labels, batch_size, shuffle, last_batch):
    data = ((images.astype(np.float32) - 128.0) / 128.0)[:, None]
    return mx.io.NDArrayIter(data, labels.astype(np.float32), batch_size, shuffle=shuffle,
                             last_batch_handle=last_batch, label_name="softmax_label")


def check_arguments(arguments):
    unsupported = [(arguments.net != "lenet", f"--net {arguments.net}"), (bool(arguments.plot), "--plot"),
                   (bool(arguments.drw_epoch), "--drw-epoch")]
    for bad, option in unsupported:
        if bad:
            raise SystemExit(f"train_mnist_module.py: error: {option} is train_mnist.py's only (Gluon)")


def main(argv=None):
    arguments = train_mnist.parse_arguments(argv)
    check_arguments(arguments)
    prepared = train_mnist.prepare(arguments)
    batch_size = arguments.batch_size
    # Distributed: whole batches only, so that every worker takes the same steps.
    train = iterator(prepared.train_images, prepared.train_labels, batch_size, True,
                     "discard" if prepared.distributed else "pad")
    test = iterator(prepared.test_images, prepared.test_labels, 500, False, "pad")
    embedding = lenet_symbol(arguments.embed_dim)
    label = mx.sym.var("softmax_label")
    training, plain, fixed = head_symbols(arguments, embedding, label, prepared.class_counts)
    module = mx.mod.Module(mx.sym.SoftmaxOutput(training, label, name="softmax"),
                           context=mx.cpu(), fixed_param_names=list(fixed))
    steps_per_epoch = len(prepared.train_images) // batch_size if prepared.distributed else \
        (len(prepared.train_images) + batch_size - 1) // batch_size
    arg_params, aux_params, start_epoch = None, None, 0
    if arguments.resume:
        with open(arguments.resume + ".json") as handle:
            start_epoch = json.load(handle)["epoch"]
        _, arg_params, aux_params = mx.model.load_checkpoint(arguments.resume, start_epoch)
    module.bind(train.provide_data, train.provide_label)
    module.init_params(mx.init.Xavier(), arg_params={**(arg_params or {}), **fixed}, aux_params=aux_params,
                       allow_missing=True)
    schedule = train_mnist.learning_rate_schedule(arguments, steps_per_epoch)
    optimizer = mx.optimizer.SGD(learning_rate=arguments.lr, momentum=0.9, wd=arguments.wd, lr_scheduler=schedule,
                                 begin_num_update=start_epoch * steps_per_epoch,
                                 rescale_grad=1.0 / (batch_size * prepared.num_workers))
    module.init_optimizer(kvstore=prepared.kvstore, optimizer=optimizer)
    scorer = mx.mod.Module(mx.sym.softmax(plain), context=mx.cpu(), label_names=None)
    scorer.bind(test.provide_data, for_training=False, shared_module=None)

    def evaluate():
        arguments_now, _ = module.get_params()
        scorer.set_params({k: v for k, v in arguments_now.items() if k in plain.list_arguments()}, {},
                          allow_missing=False, allow_extra=True)
        predictions = scorer.predict(test).argmax(axis=1).asnumpy().astype(np.int64)[:len(prepared.test_labels)]
        right = predictions == prepared.test_labels
        per_class = [float(right[prepared.test_labels == index].mean()) for index in range(10)]
        return float(right.mean()), per_class

    log, samples_per_second = [], []
    metric = mx.metric.Accuracy()
    for epoch in range(start_epoch, arguments.epochs):
        train.reset()
        metric.reset()
        seen, elapsed = 0, 0.0
        for batch in train:
            start = time.perf_counter()
            module.forward_backward(batch)
            module.update()
            module.update_metric(metric, batch.label)  # also waits for the step to finish
            elapsed += time.perf_counter() - start
            seen += batch_size - batch.pad
        test_accuracy, _ = evaluate()
        step = module.get_params()[1].get(f"{HEAD}_step")
        beta = (mx_lsoftmax.MarginSettings(train_mnist.HEAD_KIND.get(arguments.loss, arguments.loss),
                                           **train_mnist.kind_settings(arguments)).beta_at(float(step.asscalar()))
                if step is not None else None)
        samples_per_second.append(seen / elapsed)
        log.append(dict(epoch=epoch + 1, train_accuracy=metric.get()[1], test_accuracy=test_accuracy, beta=beta,
                        samples_per_sec=seen / elapsed))
        print(f"epoch {epoch + 1}: train {metric.get()[1]:.4f} test {test_accuracy:.4f} "
              f"{seen / elapsed:.0f} samples/s", flush=True)
        if arguments.save and prepared.writer:
            module.save_checkpoint(arguments.save, epoch + 1)
            with open(arguments.save + ".json", "w") as handle:
                json.dump({"epoch": epoch + 1}, handle)
    test_accuracy, per_class = evaluate()
    return train_mnist.summarize(arguments, prepared, test_accuracy, per_class, samples_per_second,
                                 log[-1]["beta"] if log else None, log)


if __name__ == "__main__":
    main()
