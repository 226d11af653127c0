#!/usr/bin/env python3
"""Train LeNet (or the paper's MNIST network) with an L-Softmax head on real MNIST.

Examples:
  python examples/train_mnist.py --embed-dim 2 --margin 4 --beta 100 --scale 0.99 --plot features.png
  python examples/train_mnist.py --backend softmax --epochs 20 --json softmax.json
Test accuracy is always measured on plain logits (x W^T).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon import nn

import mx_lsoftmax
from mx_lsoftmax.support.cli import (check_margin_settings, non_negative_float, non_negative_int,
                                     positive_float, positive_int)
from mx_lsoftmax.support.data import DataError, load_mnist
from mx_lsoftmax.gluon import LSoftmaxDense

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a convenience, not a requirement
    tqdm = None


def lenet(embed_dim):
    net = nn.HybridSequential()
    net.add(nn.Conv2D(32, 5, activation="relu"), nn.MaxPool2D(2),
            nn.Conv2D(64, 5, activation="relu"), nn.MaxPool2D(2),
            nn.Dense(256, activation="relu"), nn.Dense(embed_dim))
    return net


def paper_net(embed_dim):
    """3x3 conv 64, then three stages of three 3x3 convs (64, 128, 256) each followed by
    max-pooling, BN + ReLU after every conv, then FC (embed_dim, 512 in the paper)."""
    net = nn.HybridSequential()

    def conv(channels):
        net.add(nn.Conv2D(channels, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"))
    conv(64)
    for channels in (64, 128, 256):
        for _ in range(3):
            conv(channels)
        net.add(nn.MaxPool2D(2, ceil_mode=True))
    net.add(nn.Dense(embed_dim))
    return net


class Classifier(gluon.Block):
    """Features (hybridized) then the head; the head takes the label while training."""

    def __init__(self, features, head, **kwargs):
        super().__init__(**kwargs)
        self.features = features
        self.head = head

    def forward(self, x, label=None):
        embedding = self.features(x)
        if isinstance(self.head, LSoftmaxDense):
            return embedding, self.head(embedding, label)
        return embedding, self.head(embedding)


def build(arguments, ctx):
    features = lenet(arguments.embed_dim) if arguments.net == "lenet" else paper_net(arguments.embed_dim)
    if arguments.backend == "softmax":
        head = nn.Dense(10, use_bias=False)
    else:
        head = LSoftmaxDense(10, margin=arguments.margin, beta=arguments.beta, beta_min=arguments.beta_min,
                             scale=arguments.scale, gamma=arguments.gamma, power=arguments.power,
                             backend=arguments.backend)
    model = Classifier(features, head)
    model.initialize(mx.init.Xavier(), ctx=ctx)
    features.hybridize(static_alloc=True, static_shape=True)
    head.hybridize()
    return model


def batches(images, labels, batch_size, shuffle, rng):
    order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        data = (images[index].astype(np.float32) - 128.0) / 128.0
        yield mx.nd.array(data[:, None]), mx.nd.array(labels[index].astype(np.float32))


def evaluate(model, images, labels, batch_size, rng, keep_features=False):
    correct, features = 0, []
    for data, label in batches(images, labels, batch_size, False, rng):
        embedding, logits = model(data)
        correct += int((logits.argmax(axis=1) == label).sum().asscalar())
        if keep_features:
            features.append(embedding.asnumpy())
    return correct / len(images), (np.concatenate(features) if keep_features else None)


def plot_features(features, labels, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(5, 5))
    for digit in range(10):
        chosen = features[labels == digit]
        axis.scatter(chosen[:, 0], chosen[:, 1], s=1, alpha=0.5, label=str(digit))
    axis.set_title(title)
    axis.legend(markerscale=8, fontsize=7, loc="upper right")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine():
    """What the run's numbers depend on besides the code: processor, threads, MXNet and its settings.

    MXNet's CPU kernels (oneDNN) pick code paths by processor and thread count, so a run is
    repeatable on one machine and differs in the last digits across machines.
    """
    import platform
    model = None
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        pass
    return {"processor": model or platform.processor(), "machine": platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "mxnet": mx.__version__, "numpy": np.__version__,
            "environment": {name: os.environ.get(name) for name in
                            ("OMP_NUM_THREADS", "MXNET_ENFORCE_DETERMINISM", "MXNET_CPU_WORKER_NTHREADS",
                             "MXNET_ENGINE_TYPE")},
            "mx_lsoftmax_backend_library": mx_lsoftmax.library.load()}


def code_version():
    """The checkout's commit (with '+changes' when the tree differs), for the --json log; None outside git."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--net", choices=["lenet", "paper"], default="lenet", help="the network")
    parser.add_argument("--backend", choices=["softmax", "python", "compiled", "auto"], default="auto",
                        help="softmax = plain FC baseline")
    parser.add_argument("--embed-dim", type=positive_int, default=None,
                        help="feature size before the head (2: the figure); default 256 for lenet, 512 for paper")
    parser.add_argument("--margin", type=positive_int, default=4, help="L-Softmax margin m")
    parser.add_argument("--beta", type=non_negative_float, default=100.0, help="initial beta of the schedule")
    parser.add_argument("--beta-min", type=non_negative_float, default=0.0, help="floor of beta")
    parser.add_argument("--scale", type=positive_float, default=0.99, help="beta decay per step, in (0, 1]")
    parser.add_argument("--gamma", type=non_negative_float, default=0.0, help="Caffe's power-decay rate")
    parser.add_argument("--power", type=positive_float, default=1.0, help="Caffe's power-decay exponent")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    parser.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate")
    parser.add_argument("--lr-steps", type=non_negative_int, nargs="*", default=[10], help="epochs at which lr x0.1")
    parser.add_argument("--wd", type=non_negative_float, default=5e-4, help="weight decay")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (else $MNIST_DIR, ~/.mxnet/datasets/mnist)")
    parser.add_argument("--train-limit", type=non_negative_int, default=0,
                        help="use only the first N training images (0: all)")
    parser.add_argument("--test-limit", type=non_negative_int, default=0, help="use only the first N test images (0: all)")
    parser.add_argument("--json", metavar="PATH", help="write final metrics and settings here")
    parser.add_argument("--plot", metavar="PATH", help="draw 2-D test features (needs --embed-dim 2)")
    parser.add_argument("--save", metavar="PREFIX", help="save parameters and trainer state after each epoch")
    parser.add_argument("--resume", metavar="PREFIX", help="resume from a --save prefix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    arguments = parser.parse_args(argv)
    if arguments.embed_dim is None:
        arguments.embed_dim = 512 if arguments.net == "paper" else 256
    if arguments.plot and arguments.embed_dim != 2:
        parser.error(f"--plot needs --embed-dim 2, got --embed-dim {arguments.embed_dim}")
    check_margin_settings(parser, "lsoftmax", margin=arguments.margin, beta=arguments.beta,
                          beta_min=arguments.beta_min, scale=arguments.scale, gamma=arguments.gamma,
                          power=arguments.power)
    return arguments


def main(argv=None):
    arguments = parse_arguments(argv)
    mx.random.seed(arguments.seed)
    np.random.seed(arguments.seed)
    rng = np.random.default_rng(arguments.seed)
    try:
        mnist = load_mnist(arguments.data_dir)
    except DataError as error:
        raise SystemExit(f"error: {error}")
    train_images, train_labels = mnist["train"]
    test_images, test_labels = mnist["test"]
    if arguments.train_limit:
        train_images, train_labels = train_images[:arguments.train_limit], train_labels[:arguments.train_limit]
    if arguments.test_limit:
        test_images, test_labels = test_images[:arguments.test_limit], test_labels[:arguments.test_limit]
    if arguments.backend == "auto":
        arguments.backend = mx_lsoftmax.resolve_backend("auto")

    ctx = mx.cpu()
    model = build(arguments, ctx)
    steps_per_epoch = (len(train_images) + arguments.batch_size - 1) // arguments.batch_size
    schedule = mx.lr_scheduler.MultiFactorScheduler(
        [s * steps_per_epoch for s in arguments.lr_steps if s > 0], factor=0.1, base_lr=arguments.lr) \
        if arguments.lr_steps else None
    trainer = gluon.Trainer(model.collect_params(), "sgd",
                            {"learning_rate": arguments.lr, "momentum": 0.9, "wd": arguments.wd,
                             "lr_scheduler": schedule})
    loss_function = gluon.loss.SoftmaxCrossEntropyLoss()
    start_epoch = 0
    if arguments.resume:
        model.load_parameters(arguments.resume + ".params", ctx=ctx)
        trainer.load_states(arguments.resume + ".states")
        with open(arguments.resume + ".json") as handle:
            start_epoch = json.load(handle)["epoch"]

    log = []
    samples_per_second = []
    for epoch in range(start_epoch, arguments.epochs):
        total_loss, correct, seen, elapsed = 0.0, 0, 0, 0.0
        progress = None
        if tqdm is not None and not arguments.no_progress:
            progress = tqdm(total=len(train_images), desc=f"epoch {epoch + 1}/{arguments.epochs}",
                            unit="img", leave=False, file=sys.stderr)
        for data, label in batches(train_images, train_labels, arguments.batch_size, True, rng):
            start = time.perf_counter()
            with autograd.record():
                _, logits = model(data, label)
                loss = loss_function(logits, label)
            loss.backward()
            trainer.step(data.shape[0])
            mx.nd.waitall()  # backward and update run asynchronously: time them to the end
            elapsed += time.perf_counter() - start
            batch_loss = float(loss.mean().asscalar())
            total_loss += batch_loss * data.shape[0]
            correct += int((logits.argmax(axis=1) == label).sum().asscalar())
            seen += data.shape[0]
            if progress is not None:
                progress.update(data.shape[0])
                progress.set_postfix(loss=f"{batch_loss:.3f}")
        if progress is not None:
            progress.close()
        test_accuracy, _ = evaluate(model, test_images, test_labels, 500, rng)
        beta = model.head.current_beta if isinstance(model.head, LSoftmaxDense) else None
        speed = seen / elapsed
        samples_per_second.append(speed)
        entry = dict(epoch=epoch + 1, loss=total_loss / seen, train_accuracy=correct / seen,
                     test_accuracy=test_accuracy, beta=beta, samples_per_sec=speed)
        log.append(entry)
        print(f"epoch {epoch + 1}: loss {entry['loss']:.4f} train {entry['train_accuracy']:.4f} "
              f"test {test_accuracy:.4f} beta {beta if beta is None else f'{beta:.4g}'} "
              f"{speed:.0f} samples/s", flush=True)
        if arguments.save:
            model.save_parameters(arguments.save + ".params")
            trainer.save_states(arguments.save + ".states")
            with open(arguments.save + ".json", "w") as handle:
                json.dump({"epoch": epoch + 1}, handle)

    test_accuracy, features = evaluate(model, test_images, test_labels, 500, rng, keep_features=bool(arguments.plot))
    if arguments.plot:
        title = "softmax" if arguments.backend == "softmax" else f"L-Softmax m={arguments.margin}"
        plot_features(features, test_labels, arguments.plot, f"{title}: test accuracy {test_accuracy:.2%}")
    summary = dict(test_accuracy=test_accuracy,
                   train_samples_per_sec=float(np.median(samples_per_second)) if samples_per_second else None,
                   final_beta=model.head.current_beta if isinstance(model.head, LSoftmaxDense) else None,
                   settings={k: v for k, v in vars(arguments).items()}, code_version=code_version(),
                   machine=machine(), epochs=log)
    print(f"test accuracy {test_accuracy:.4f}", flush=True)
    if arguments.json:
        os.makedirs(os.path.dirname(os.path.abspath(arguments.json)), exist_ok=True)
        with open(arguments.json, "w") as handle:
            json.dump(summary, handle, indent=1)
    return summary


if __name__ == "__main__":
    main()
