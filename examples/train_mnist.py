#!/usr/bin/env python3
"""Train LeNet (or the paper's network, or ResNet-18) with a margin-softmax head on MNIST or Fashion-MNIST.

Examples:
  python examples/train_mnist.py --embed-dim 2 --margin 4 --beta 100 --scale 0.99 --plot features.png
  python examples/train_mnist.py --loss softmax --epochs 20 --json softmax.json
  python examples/train_mnist.py --dataset fashion-mnist --loss arcface --s 16 --margin 0.3 \
      --embed-dim 3 --plot sphere.png
  python examples/train_mnist.py --dataset fashion-mnist --imbalance exp --imbalance-factor 0.01 \
      --loss ldam --drw-epoch 12 --epochs 15
Test accuracy is always measured on the plain logits of the head (the kind's normalised
classifier for sphereface / cosface / arcface / combined; x W^T for softmax and lsoftmax).
"""
import argparse
import json
import os
import sys
import time
import types

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon import nn

import mx_lsoftmax
from mx_lsoftmax.support.cli import (DefaultsFormatter, check_margin_settings, non_negative_float, non_negative_int,
                                     positive_float, positive_int)
from mx_lsoftmax.kinds import KINDS, SCHEDULE, SETTINGS
from mx_lsoftmax.support import environment
from mx_lsoftmax.support.data import DATASETS, DataError, load_dataset
from mx_lsoftmax.support.imbalance import (PROFILES, drw_class_weights, long_tailed_counts,
                                           long_tailed_indices, shot_groups)
from mx_lsoftmax.gluon import MarginDense, trainable_parameters

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
        if isinstance(self.head, MarginDense):
            return embedding, self.head(embedding, label)
        return embedding, self.head(embedding)


def resnet18(embed_dim):
    """The Gluon model zoo's ResNet-18 v1 with its thumbnail stem (3x3 conv, no max-pool, for
    small images), its classifier layer giving the embedding."""
    from mxnet.gluon.model_zoo import vision
    return vision.resnet18_v1(thumbnail=True, classes=embed_dim)


NETWORKS = {"lenet": (lenet, 256), "paper": (paper_net, 512), "resnet18": (resnet18, 512)}


def build(arguments, ctx, class_counts):
    features = NETWORKS[arguments.net][0](arguments.embed_dim)
    if arguments.loss == "softmax":
        head = nn.Dense(10, use_bias=False)
    elif arguments.loss == "ldam":  # cosface with LDAM's margin per class, from the training counts
        head = MarginDense(10, kind="cosface", backend=arguments.backend,
                           class_margins=mx_lsoftmax.ldam_margins(class_counts, arguments.max_margin),
                           **kind_settings(arguments))
    else:
        head = MarginDense(10, kind=arguments.loss, backend=arguments.backend, **kind_settings(arguments))
    model = Classifier(features, head)
    model.initialize(mx.init.Xavier(), ctx=ctx)
    features.hybridize(static_alloc=True, static_shape=True)
    head.hybridize()
    return model


def batches(images, labels, batch_size, shuffle, rng, drop_last=False):
    """(data (B, 1, 28, 28) scaled to [-1, 1), labels (B,) float32) per batch; ``drop_last``
    leaves out a last, smaller batch."""
    order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
    end = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size]
        data = (images[index].astype(np.float32) - 128.0) / 128.0
        yield mx.nd.array(data[:, None]), mx.nd.array(labels[index].astype(np.float32))


def evaluate(model, images, labels, batch_size, rng, keep_features=False):
    """(overall accuracy, per-class accuracy list (classes in label order), test features or None)."""
    predictions, features = [], []
    for data, _ in batches(images, labels, batch_size, False, rng):
        embedding, logits = model(data)
        predictions.append(logits.argmax(axis=1).asnumpy().astype(np.int64))
        if keep_features:
            features.append(embedding.asnumpy())
    right = np.concatenate(predictions) == labels
    per_class = [float(right[labels == index].mean()) if np.any(labels == index) else None
                 for index in range(int(labels.max()) + 1)]
    return float(right.mean()), per_class, (np.concatenate(features) if keep_features else None)


def plot_features(features, labels, path, title, class_names):
    """2-D features as they are (the paper's Fig. 2); 3-D features normalised onto the unit sphere."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sphere = features.shape[1] == 3
    figure = plt.figure(figsize=(5, 5))
    axis = figure.add_subplot(projection="3d" if sphere else None)
    if sphere:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        features = features / np.maximum(norms, np.finfo(features.dtype).tiny)
        axis.view_init(elev=25, azim=35)
        axis.set_box_aspect((1, 1, 1))
        for setter in (axis.set_xlim, axis.set_ylim, axis.set_zlim):
            setter(-1, 1)
    for index, name in enumerate(class_names):
        chosen = features[labels == index]
        axis.scatter(*chosen.T, s=1, alpha=0.5, label=name)
    axis.set_title(title, fontsize=9)
    axis.legend(markerscale=8, fontsize=7, loc="upper right")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def head_title(arguments):
    """'softmax', 'L-Softmax m=4', 'ArcFace s=16 m=0.3', ...: the head and its margin settings."""
    if arguments.loss == "softmax":
        return "softmax"
    if arguments.loss == "ldam":
        return f"LDAM s={arguments.s:g} max m={arguments.max_margin:g}"
    row = KINDS[arguments.loss]
    shown = [f"{name if name != 'margin' else 'm'}={getattr(arguments, name):g}"
             for name in ("s", "margin", "m1", "m2", "m3") if name in EXAMPLE_DEFAULTS[arguments.loss]]
    return f"{row.title} {' '.join(shown)}"


def code_version(root=None):
    """The commit of the checkout at ``root`` (default: this example's), for the --json log, with
    '+changes' when a tracked file outside docs/ differs from it; None outside git.

    docs/ is left out: it holds the runs' own logs and the documents made from them, which
    `make results` rewrites between its runs (and a log removed to re-run it is a change there),
    so counting it would mark every re-run as made by uncommitted code.
    """
    import subprocess
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)docs"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


# The example's defaults per loss: the table of kinds (the papers' settings), except that
# lsoftmax keeps this example's MNIST schedule (margin 4, beta 100 decaying by 0.99 a step).
# ldam is the cosface kind with a margin per class from the training counts (LDAM's s = 30);
# the per-class switch itself is no option: the example sets it for ldam.
LOSSES = ("softmax",) + tuple(KINDS) + ("ldam",)
KIND_SETTINGS = tuple(name for name in SETTINGS if name != "per_class_margin")
EXAMPLE_DEFAULTS = {name: {key: value for key, value in {**SCHEDULE, **row.schedule, **row.defaults}.items()
                           if key in KIND_SETTINGS} for name, row in KINDS.items()}
EXAMPLE_DEFAULTS["lsoftmax"].update(margin=4, beta=100.0, scale=0.99)
EXAMPLE_DEFAULTS["ldam"] = {"s": 30.0, **SCHEDULE}
HEAD_KIND = {"ldam": "cosface"}  # the kind behind a loss of another name
KVSTORES = ("local", "device", "dist_sync", "dist_device_sync", "dist_async")


def kind_settings(arguments):
    """The head's settings from the parsed arguments: the ones its kind takes."""
    return {name: getattr(arguments, name) for name in EXAMPLE_DEFAULTS[arguments.loss]}


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _boolean(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _defaults_text(name):
    shown = [f"{loss} {defaults[name]:g}" if not isinstance(defaults[name], bool) else f"{loss} {defaults[name]}"
             for loss, defaults in EXAMPLE_DEFAULTS.items() if name in defaults]
    return "; default: " + ", ".join(shown)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="mnist", help="the data set")
    parser.add_argument("--net", choices=list(NETWORKS), default="lenet",
                        help="the network; resnet18: the Gluon model zoo's ResNet-18 v1, thumbnail stem")
    parser.add_argument("--loss", choices=LOSSES, default="lsoftmax",
                        help="the head: softmax = plain FC + softmax, else a margin kind")
    parser.add_argument("--backend", choices=["auto", "python", "compiled", "softmax"], default="auto",
                        help="the margin op's backend; 'softmax' is the older spelling of --loss softmax")
    parser.add_argument("--embed-dim", type=positive_int, default=None,
                        help="feature size before the head (2: the plane figure, 3: the sphere figure); "
                             "default 256 for lenet, 512 for paper and resnet18")
    # The kind's settings, one option per row of mx_lsoftmax.kinds.SETTINGS; a default of
    # None means "the loss's own" (listed in the help), resolved after parsing.
    for name in KIND_SETTINGS:
        setting = SETTINGS[name]
        value_type = _boolean if setting.type is bool else _finite_float
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=value_type, default=None,
                            help=f"{setting.description} ({setting.describe_range()})"
                                 f"{_defaults_text(name)}; softmax takes none")
    parser.add_argument("--max-margin", type=_finite_float, default=None,
                        help="ldam: the rarest class's margin (margins proportional to n_j^(-1/4)); "
                             "default: ldam 0.5; other losses take none")
    parser.add_argument("--imbalance", choices=("none",) + PROFILES, default="none",
                        help="long-tailed training set: exp or step profile (LDAM-DRW's); the test set stays balanced")
    parser.add_argument("--imbalance-factor", type=_finite_float, default=0.01,
                        help="smallest / largest class size, in (0, 1] (0.01: a ratio of 100)")
    parser.add_argument("--drw-epoch", type=non_negative_int, default=0,
                        help="deferred re-weighting: weigh classes by (1 - b)/(1 - b^n_j) after this many "
                             "epochs (0: never)")
    parser.add_argument("--drw-beta", type=_finite_float, default=0.9999, help="DRW's b, in [0, 1)")
    parser.add_argument("--many-shot", type=positive_int, default=1000,
                        help="classes with at least this many training images form the many-shot group")
    parser.add_argument("--few-shot", type=positive_int, default=200,
                        help="classes with fewer training images than this form the few-shot group")
    parser.add_argument("--kvstore", choices=KVSTORES, default="device",
                        help="Gluon Trainer's kvstore; dist_*: one process per worker, started by "
                             "`python -m mx_lsoftmax.launch` (each worker trains on its shard)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    parser.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate")
    parser.add_argument("--lr-steps", type=non_negative_int, nargs="*", default=[10], help="epochs at which lr x0.1")
    parser.add_argument("--wd", type=non_negative_float, default=5e-4, help="weight decay")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    parser.add_argument("--data-dir", default=None,
                        help="the data set's IDX files (else $MNIST_DIR or $FASHION_MNIST_DIR, then the usual folders)")
    parser.add_argument("--train-limit", type=non_negative_int, default=0,
                        help="use only the first N training images (0: all)")
    parser.add_argument("--test-limit", type=non_negative_int, default=0, help="use only the first N test images (0: all)")
    parser.add_argument("--json", metavar="PATH", help="write final metrics and settings here")
    parser.add_argument("--plot", metavar="PATH",
                        help="draw the test features: the plane (--embed-dim 2) or the unit sphere (--embed-dim 3)")
    parser.add_argument("--save", metavar="PREFIX", help="save parameters and trainer state after each epoch")
    parser.add_argument("--resume", metavar="PREFIX", help="resume from a --save prefix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_arguments(argv=None):
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.backend == "softmax" or arguments.loss == "softmax":
        arguments.loss = arguments.backend = "softmax"
    if arguments.embed_dim is None:
        arguments.embed_dim = NETWORKS[arguments.net][1]
    check_imbalance(parser, arguments)
    if arguments.plot and arguments.embed_dim not in (2, 3):
        parser.error(f"--plot needs --embed-dim 2 or 3, got --embed-dim {arguments.embed_dim}")
    taken = EXAMPLE_DEFAULTS.get(arguments.loss, {})
    for name in KIND_SETTINGS:
        given = getattr(arguments, name)
        if name not in taken:
            if given is not None:
                parser.error(f"--{name.replace('_', '-')} {given}: the {arguments.loss} loss does not take it "
                             f"(its settings: {', '.join(sorted(taken)) or 'none'})")
            continue
        setattr(arguments, name, taken[name] if given is None else given)
    if arguments.loss != "softmax":
        # Ranges and kind rules (an integer margin for lsoftmax / sphereface) from the table;
        # the resolved values (ints where the kind takes ints) go into the --json settings.
        kind = HEAD_KIND.get(arguments.loss, arguments.loss)
        settings = check_margin_settings(parser, kind, **kind_settings(arguments))
        for name, value in settings.values.items():
            if name in KIND_SETTINGS:
                setattr(arguments, name, value)
    if arguments.loss == "ldam":
        arguments.max_margin = 0.5 if arguments.max_margin is None else arguments.max_margin
        if not arguments.max_margin > 0:
            parser.error(f"--max-margin must be > 0, got {arguments.max_margin}")
    elif arguments.max_margin is not None:
        parser.error(f"--max-margin {arguments.max_margin}: only the ldam loss takes it")
    return arguments


def check_imbalance(parser, arguments):
    """The long-tail settings, before any data is read: the profile's counts on the balanced
    per-class size of the data set (or of --train-limit), DRW inside the run."""
    if arguments.imbalance != "none":
        per_class = DATASETS[arguments.dataset].train_per_class
        if arguments.train_limit:
            per_class = min(per_class, arguments.train_limit // 10)
        try:
            long_tailed_counts(per_class, 10, arguments.imbalance, arguments.imbalance_factor)
        except ValueError as error:
            parser.error(f"--imbalance {arguments.imbalance} --imbalance-factor {arguments.imbalance_factor}: {error}")
    elif not 0 < arguments.imbalance_factor <= 1:
        parser.error(f"--imbalance-factor must be in (0, 1], got {arguments.imbalance_factor}")
    if arguments.drw_epoch and arguments.drw_epoch >= arguments.epochs:
        parser.error(f"--drw-epoch {arguments.drw_epoch} is past the run (--epochs {arguments.epochs}): "
                     f"re-weighting would never start")
    if not 0 <= arguments.drw_beta < 1:
        parser.error(f"--drw-beta must be in [0, 1), got {arguments.drw_beta}")
    if arguments.few_shot > arguments.many_shot:
        parser.error(f"--few-shot {arguments.few_shot} must be <= --many-shot {arguments.many_shot}")


def prepare(arguments):
    """Seeds, data (checked), the long-tailed subset, the kvstore and this worker's shard.

    Returns a namespace: the worker's shard of the (long-tailed) training set, the test set, the
    whole training set's class counts, and the worker's place in the job."""
    mx.random.seed(arguments.seed)
    np.random.seed(arguments.seed)
    try:
        loaded = load_dataset(arguments.dataset, arguments.data_dir)
    except DataError as error:
        raise SystemExit(f"error: {error}")
    train_images, train_labels = loaded["train"]
    test_images, test_labels = loaded["test"]
    if arguments.train_limit:
        train_images, train_labels = train_images[:arguments.train_limit], train_labels[:arguments.train_limit]
    if arguments.test_limit:
        test_images, test_labels = test_images[:arguments.test_limit], test_labels[:arguments.test_limit]
    if arguments.imbalance != "none":
        try:
            chosen, _ = long_tailed_indices(train_labels, arguments.imbalance, arguments.imbalance_factor,
                                            arguments.seed)
        except ValueError as error:  # --train-limit left a class smaller than the parse-time check assumed
            raise SystemExit(f"error: --imbalance {arguments.imbalance}: {error}")
        train_images, train_labels = train_images[chosen], train_labels[chosen]
    class_counts = np.bincount(train_labels, minlength=10).tolist()  # of the whole set, on every worker
    if min(class_counts) == 0:
        raise SystemExit(f"error: class {class_counts.index(0)} has no training image "
                         f"(training counts {class_counts}); raise --train-limit")
    kvstore, rank, num_workers = arguments.kvstore, 0, 1
    if kvstore.startswith("dist"):
        kvstore = mx.kv.create(arguments.kvstore)
        rank, num_workers = kvstore.rank, kvstore.num_workers
        # Every worker takes the same number of steps (dist_sync waits for all of them at every
        # step, and the margin schedule's step counter, never exchanged, must stay in step):
        # equal shards, the remainder of the set dropped.
        shard = np.arange(len(train_images))[rank::num_workers][:len(train_images) // num_workers]
        train_images, train_labels = train_images[shard], train_labels[shard]
    if arguments.backend == "auto":
        arguments.backend = mx_lsoftmax.resolve_backend("auto")
    # rank 0 alone writes the log, the plot and the checkpoints
    return types.SimpleNamespace(train_images=train_images, train_labels=train_labels, test_images=test_images,
                    test_labels=test_labels, class_counts=class_counts, kvstore=kvstore, rank=rank,
                    num_workers=num_workers, writer=rank == 0,
                    distributed=arguments.kvstore.startswith("dist"))


def learning_rate_schedule(arguments, steps_per_epoch):
    """lr x0.1 at each of --lr-steps (epochs), as a per-update schedule; None without steps."""
    steps = [step * steps_per_epoch for step in arguments.lr_steps if step > 0]
    return mx.lr_scheduler.MultiFactorScheduler(steps, factor=0.1, base_lr=arguments.lr) if steps else None


def main(argv=None):
    arguments = parse_arguments(argv)
    prepared = prepare(arguments)
    rng = np.random.default_rng(arguments.seed)
    train_images, train_labels = prepared.train_images, prepared.train_labels
    test_images, test_labels = prepared.test_images, prepared.test_labels
    class_counts, kvstore, num_workers = prepared.class_counts, prepared.kvstore, prepared.num_workers
    writer, distributed = prepared.writer, prepared.distributed
    ctx = mx.cpu()
    model = build(arguments, ctx, class_counts)
    # Deferred re-weighting (LDAM-DRW): per-class loss weights from the --drw-epoch-th epoch on.
    class_weights = mx.nd.array(drw_class_weights(class_counts, arguments.drw_beta), ctx=ctx)
    steps_per_epoch = (len(train_images) // arguments.batch_size if distributed
                       else (len(train_images) + arguments.batch_size - 1) // arguments.batch_size)
    schedule = learning_rate_schedule(arguments, steps_per_epoch)
    # Distributed: Gluon's default, the optimizer (stock SGD, pickled) updates on the servers;
    # the schedule's step counters stay out of the kvstore (trainable_parameters).
    trainer = gluon.Trainer(trainable_parameters(model), "sgd",
                            {"learning_rate": arguments.lr, "momentum": 0.9, "wd": arguments.wd,
                             "lr_scheduler": schedule}, kvstore=kvstore)
    loss_function = gluon.loss.SoftmaxCrossEntropyLoss()
    start_epoch = 0
    if arguments.resume:
        model.load_parameters(arguments.resume + ".params", ctx=ctx)
        with open(arguments.resume + ".json") as handle:
            start_epoch = json.load(handle)["epoch"]
        if os.path.exists(arguments.resume + ".states") and not distributed:
            trainer.load_states(arguments.resume + ".states")
        else:  # optimizer states live on the servers (MXNet cannot save them): momentum restarts,
            # the learning-rate schedule goes on from the step it had reached
            trainer.optimizer.begin_num_update = trainer.optimizer.num_update = start_epoch * steps_per_epoch

    log = []
    samples_per_second = []
    for epoch in range(start_epoch, arguments.epochs):
        total_loss, correct, seen, elapsed = 0.0, 0, 0, 0.0
        progress = None
        if tqdm is not None and not arguments.no_progress:
            progress = tqdm(total=len(train_images), desc=f"epoch {epoch + 1}/{arguments.epochs}",
                            unit="img", leave=False, file=sys.stderr)
        # Distributed: whole batches only (the servers' optimizer keeps the first batch size).
        for data, label in batches(train_images, train_labels, arguments.batch_size, True, rng,
                                   drop_last=distributed):
            start = time.perf_counter()
            with autograd.record():
                _, logits = model(data, label)
                reweighted = arguments.drw_epoch and epoch >= arguments.drw_epoch
                sample_weight = class_weights.take(label).reshape((-1, 1)) if reweighted else None
                loss = loss_function(logits, label, sample_weight)
            loss.backward()
            trainer.step(data.shape[0] * num_workers)
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
        test_accuracy, _, _ = evaluate(model, test_images, test_labels, 500, rng)
        beta = model.head.current_beta if isinstance(model.head, MarginDense) else None
        speed = seen / elapsed
        samples_per_second.append(speed)
        entry = dict(epoch=epoch + 1, loss=total_loss / seen, train_accuracy=correct / seen,
                     test_accuracy=test_accuracy, beta=beta, samples_per_sec=speed)
        log.append(entry)
        print(f"epoch {epoch + 1}: loss {entry['loss']:.4f} train {entry['train_accuracy']:.4f} "
              f"test {test_accuracy:.4f} beta {beta if beta is None else f'{beta:.4g}'} "
              f"{speed:.0f} samples/s", flush=True)
        if arguments.save and writer:
            model.save_parameters(arguments.save + ".params")
            if not distributed:
                trainer.save_states(arguments.save + ".states")
            with open(arguments.save + ".json", "w") as handle:
                json.dump({"epoch": epoch + 1}, handle)

    test_accuracy, per_class, features = evaluate(model, test_images, test_labels, 500, rng,
                                                  keep_features=bool(arguments.plot))
    if arguments.plot and writer:
        plot_features(features, test_labels, arguments.plot, f"{head_title(arguments)}: test accuracy "
                      f"{test_accuracy:.2%}", DATASETS[arguments.dataset].class_names)
    final_beta = model.head.current_beta if isinstance(model.head, MarginDense) else None
    return summarize(arguments, prepared, test_accuracy, per_class, samples_per_second, final_beta, log)


def summarize(arguments, prepared, test_accuracy, per_class, samples_per_second, final_beta, log):
    """The run's summary (printed accuracy; the --json log, written by rank 0)."""
    groups = shot_groups(prepared.class_counts, arguments.many_shot, arguments.few_shot)
    group_accuracy = {}
    for group in ("many", "medium", "few"):
        members = [index for index, name in enumerate(groups) if name == group]
        # Classes weigh equally (the test set is balanced): the mean of their accuracies.
        group_accuracy[group] = float(np.mean([per_class[index] for index in members])) if members else None
    summary = dict(test_accuracy=test_accuracy, test_accuracy_per_class=per_class,
                   train_class_counts=prepared.class_counts, shot_groups=groups,
                   shot_thresholds=dict(many=f">= {arguments.many_shot}", few=f"< {arguments.few_shot}"),
                   group_accuracy=group_accuracy,
                   train_samples_per_sec=float(np.median(samples_per_second)) if samples_per_second else None,
                   final_beta=final_beta, settings={k: v for k, v in vars(arguments).items()},
                   code_version=code_version(), machine=environment.machine(mx_lsoftmax.library.load()),
                   num_workers=prepared.num_workers, epochs=log)
    print(f"test accuracy {test_accuracy:.4f}", flush=True)
    if arguments.json and prepared.writer:
        os.makedirs(os.path.dirname(os.path.abspath(arguments.json)), exist_ok=True)
        with open(arguments.json, "w") as handle:
            json.dump(summary, handle, indent=1)
    return summary


if __name__ == "__main__":
    main()
