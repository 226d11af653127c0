#!/usr/bin/env python3
"""Forward+backward time of the L-Softmax layer per backend against MXNet's FullyConnected.

Every shape runs the plain layer and each backend in one process, alternating
call by call, and reports the median of repeated rounds and its ratio to the
plain layer measured in the same rounds. Three settings:

  bound       a graph bound once (simple_bind), as Module trains: buffers are
              reused across steps;
  hybridized  a Gluon block after hybridize(static_alloc=True, static_shape=True);
  imperative  autograd on NDArrays: MXNet 1.9.1 allocates fresh CPU memory for
              every call, so first-touch page faults are part of the cost.

The kinds section times every margin kind on both backends at the two large
shapes, bound as Module binds, against FullyConnected and against the graph an
MXNet user would write instead: insightface's margins from stock operators
(L2Normalization of x and W, FullyConnected, pick, sqrt/arccos, where, one_hot).

Besides the layer table: LeNet training samples/s per backend (the example's
--json, batch 128 and 256; needs MNIST), and a GPU section timing the CUDA
kernels against cuBLAS products through mx_lsoftmax.support.cuda_harness (needs CuPy,
a GPU and `make cuda`; otherwise the section says what was missing).

Example: python examples/benchmark.py --write docs/benchmarks.md
"""
import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time

import numpy as np

import mxnet as mx
from mxnet import autograd

import mx_lsoftmax
from mx_lsoftmax.support.cli import non_negative_float, positive_float, positive_int
from mx_lsoftmax.support.cli import shape as shape_argument
from mx_lsoftmax.support import environment
from mx_lsoftmax.support.cuda_harness import HarnessUnavailable, KernelHarness
from mx_lsoftmax.support.data import resolve_directory

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXAMPLES)

SHAPES = [(128, 2, 10), (256, 256, 10), (256, 512, 1000), (256, 512, 10000), (256, 512, 100000)]


def peak_memory_mb():
    """This process's peak resident memory, MB: VmHWM, which starts afresh at exec (ru_maxrss
    keeps the peak of the process that forked it, so a child of a large benchmark reads high)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bind_graph(graph, rows, dims, classes, dtype, arrays, weight_grad_req="write"):
    """forward+backward of ``graph`` bound once (simple_bind, as Module binds: static memory);
    the weight's gradient written, or added to with ``weight_grad_req`` 'add'."""
    shapes = {"data": (rows, dims), "weight": (classes, dims)}
    if "label" in graph.list_arguments():
        shapes["label"] = (rows,)
    requests = {name: "null" if name == "label" else "write" for name in graph.list_arguments()}
    requests["weight"] = weight_grad_req
    executor = graph.simple_bind(mx.cpu(), grad_req=requests, type_dict={name: dtype for name in shapes},
                                 **shapes)
    for name, value in arrays.items():
        if name in executor.arg_dict:
            executor.arg_dict[name][:] = value
    head = mx.nd.ones((rows, classes), dtype=dtype)

    def run():
        executor.forward(is_train=True)
        executor.backward([head])
        mx.nd.waitall()
    run.executor = executor
    return run


def bound_runner(backend, rows, dims, classes, dtype, arrays, settings):
    data, weight, label = mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label")
    if backend == "softmax":
        graph = mx.sym.FullyConnected(data, weight, no_bias=True, num_hidden=classes)
    else:
        graph = mx_lsoftmax.lsoftmax(data, weight, label, classes, backend=backend, **settings)
    return bind_graph(graph, rows, dims, classes, dtype, arrays)


def imperative_runner(backend, rows, dims, classes, dtype, arrays, settings):
    data, weight = mx.nd.array(arrays["data"], dtype=dtype), mx.nd.array(arrays["weight"], dtype=dtype)
    label = mx.nd.array(arrays["label"], dtype=dtype)
    data.attach_grad()
    weight.attach_grad()
    step = mx_lsoftmax.new_step(dtype=dtype)

    def run():
        with autograd.record():
            if backend == "softmax":
                out = mx.nd.FullyConnected(data, weight, no_bias=True, num_hidden=classes)
            else:
                out = mx_lsoftmax.lsoftmax(data, weight, label, classes, backend=backend, step=step,
                                           **settings)
        out.backward()
        mx.nd.waitall()
    return run


def hybridized_runner(backend, rows, dims, classes, dtype, arrays, settings):
    """A Gluon block hybridized with static memory, as `block.hybridize(static_alloc=True, static_shape=True)`."""
    from mxnet import gluon
    from mx_lsoftmax.gluon import LSoftmaxDense
    if backend == "softmax":
        block = gluon.nn.Dense(classes, use_bias=False, in_units=dims, dtype=dtype)
    else:
        block = LSoftmaxDense(classes, in_units=dims, backend=backend, dtype=dtype, **settings)
    block.initialize()
    block.weight.set_data(mx.nd.array(arrays["weight"], dtype=dtype))
    block.hybridize(static_alloc=True, static_shape=True)
    data, label = mx.nd.array(arrays["data"], dtype=dtype), mx.nd.array(arrays["label"], dtype=dtype)
    data.attach_grad()

    def run():
        with autograd.record():
            out = block(data) if backend == "softmax" else block(data, label)
        out.backward()
        mx.nd.waitall()
    return run


RUNNERS = {"bound": bound_runner, "imperative": imperative_runner, "hybridized": hybridized_runner}

KIND_SHAPES = [(256, 512, 10000), (256, 512, 100000)]
STOCK_KINDS = ("cosface", "arcface", "combined")  # the kinds insightface writes from stock operators


def insightface_symbol(kind, data, weight, label, classes, settings, dtype="float32"):
    """insightface's margin heads as an MXNet user writes them from stock operators.

    L2-normalised x (times s) and W, FullyConnected, the target logit picked and
    modified, the difference added back through a one-hot matrix.
    """
    s = settings.s
    x = mx.sym.L2Normalization(data, mode="instance") * s
    w = mx.sym.L2Normalization(weight, mode="instance")
    logits = mx.sym.FullyConnected(x, w, no_bias=True, num_hidden=classes)
    target = mx.sym.pick(logits, label, axis=1)
    cosine = target / s
    if kind == "cosface":
        new_target = target - s * settings.margin
    elif kind == "arcface":
        m = settings.margin
        sine = mx.sym.sqrt(1.0 - cosine * cosine)
        shifted = s * (cosine * np.cos(m) - sine * np.sin(m))
        keep = mx.sym.Activation(cosine - np.cos(np.pi - m), act_type="relu") > 0  # insightface's guard
        new_target = mx.sym.where(keep, shifted, target - s * np.sin(np.pi - m) * m)
    else:
        angle = mx.sym.arccos(cosine) * settings.m1 + settings.m2
        new_target = s * (mx.sym.cos(angle) - settings.m3)
    difference = mx.sym.expand_dims(new_target - target, axis=1)
    return logits + mx.sym.broadcast_mul(mx.sym.one_hot(label, depth=classes, dtype=dtype), difference)


# A backend name with this suffix: the backend with the weight's gradient added to (grad_req
# 'add' and the layer's weight_grad_req 'add'), as gradient accumulation runs it.
ADDING = " +add"


def kind_runner(kind, backend, rows, dims, classes, dtype, arrays):
    """A bound forward+backward (static memory, as Module) of one kind and backend;
    backend 'stock' is ``insightface_symbol``, 'softmax' the plain FullyConnected, and a
    backend named with ``ADDING`` adds to the weight's gradient."""
    weight_grad_req = "add" if backend.endswith(ADDING) else "write"
    backend = backend[:-len(ADDING)] if backend.endswith(ADDING) else backend
    data, weight, label = mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label")
    settings = mx_lsoftmax.MarginSettings(kind)
    if backend == "softmax":
        graph = mx.sym.FullyConnected(data, weight, no_bias=True, num_hidden=classes)
    elif backend == "stock":
        graph = insightface_symbol(kind, data, weight, label, classes, settings, dtype)
    else:
        graph = mx_lsoftmax.margin_logits(data, weight, label, classes, kind, backend=backend,
                                          weight_grad_req=weight_grad_req)
    return bind_graph(graph, rows, dims, classes, dtype, arrays, weight_grad_req)


def scale_point(backend, rows, dims, classes, kind="arcface", steps=3):
    """One training step (forward+backward, float32, bound graph) at a large C, in this process:
    {'ms': median of ``steps`` after one warm-up, 'peak_mb': the process's peak resident memory}.
    Run each point in a fresh process (``scale_section``) so that peaks do not mix."""
    arrays = {"data": mx.nd.random.normal(shape=(rows, dims)), "weight": mx.nd.random.normal(shape=(classes, dims)),
              "label": mx.nd.array(np.random.default_rng(0).integers(0, classes, rows))}
    run = kind_runner(kind, backend, rows, dims, classes, "float32", arrays)
    del arrays
    run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return {"ms": float(np.median(times)), "peak_mb": peak_memory_mb()}


def scale_section(backends, classes=10 ** 6, dims_list=(128, 512), rows=256, kind="arcface"):
    """Markdown and raw rows: time and peak memory per training step at ``classes`` classes."""
    import subprocess
    rows_out = []
    for dims in dims_list:
        row = {"dims": dims}
        for backend in ["softmax"] + list(backends):
            code = (f"import json, benchmark; print('RESULT', json.dumps(benchmark.scale_point("
                    f"{backend!r}, {rows}, {dims}, {classes}, {kind!r})))")
            done = subprocess.run([sys.executable, "-c", code], cwd=EXAMPLES, capture_output=True, text=True,
                                  timeout=1800)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"scale point {backend} D={dims} failed: {done.stderr[-2000:]}")
            row[backend] = json.loads(lines[-1][len("RESULT "):])
            print(f"C={classes} D={dims} {backend}: {row[backend]['ms']:.0f} ms, peak {row[backend]['peak_mb']:.0f} MB",
                  flush=True)
        rows_out.append(row)
    header = ("| D | weight MB | FullyConnected ms / peak MB | " +
              " | ".join(f"{backend} ms (ratio) / peak MB" for backend in backends) + " |\n|---|---|---|" +
              "---|" * len(backends) + "\n")
    lines = []
    for row in rows_out:
        base = row["softmax"]
        cells = [f"{row[b]['ms']:.0f} ({row[b]['ms'] / base['ms']:.2f}x) / {row[b]['peak_mb']:.0f}" for b in backends]
        lines.append(f"| {row['dims']} | {classes * row['dims'] * 4 / 2 ** 20:.0f} | {base['ms']:.0f} / "
                     f"{base['peak_mb']:.0f} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines), rows_out


def measure_kinds(shape, dtype, kinds, backends, rounds):
    """Median ms per (kind, backend) and ratio to FullyConnected, alternating call by call.

    One kind at a time (with FullyConnected in the same rounds) so that only a few
    (C, D) weights and gradients are alive at once."""
    rows, dims, classes = shape
    arrays = random_arrays(shape, dtype)
    results = []
    for kind in kinds:
        names = list(backends) + (["stock"] if kind in STOCK_KINDS else [])
        runners = {name: kind_runner(kind, name, rows, dims, classes, dtype, arrays)
                   for name in ["softmax"] + names}
        medians = median_milliseconds(runners, rounds, warm_up=3)
        results.append({"shape": list(shape), "dtype": dtype, "kind": kind, "ms": medians,
                        "ratio": {name: medians[name] / medians["softmax"] for name in names}})
        print(f"{'x'.join(map(str, shape))} {kind}: " + ", ".join(
            f"{name} {medians[name]:.1f} ms ({medians[name] / medians['softmax']:.3f}x)"
            for name in names) + f", FullyConnected {medians['softmax']:.1f} ms", flush=True)
        del runners
    return results


def kinds_table(results, backends):
    names = list(backends) + ["stock"]
    header = ("| N x D x C | kind | FullyConnected ms | " +
              " | ".join(f"{'insightface stock ops' if n == 'stock' else n} ms (ratio)" for n in names) + " |")
    lines = [header, "|" + "---|" * (3 + len(names))]
    for r in results:
        cells = " | ".join(f"{r['ms'][n]:.1f} ({r['ratio'][n]:.3f}x)" if n in r["ratio"] else "-" for n in names)
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['kind']} | {r['ms']['softmax']:.1f} | {cells} |")
    return "\n".join(lines)


def random_arrays(shape, dtype):
    """Host data (N, D), weight (C, D) and label (N,) for an N x D x C shape, seed 0."""
    rows, dims, classes = shape
    rng = np.random.default_rng(0)
    return {"data": rng.standard_normal((rows, dims)).astype(dtype),
            "weight": rng.standard_normal((classes, dims)).astype(dtype),
            "label": rng.integers(0, classes, rows).astype(dtype)}


def median_milliseconds(runners, rounds, warm_up):
    """Median ms per runner over ``rounds`` rounds that alternate the runners call by call,
    after ``warm_up`` untimed rounds (allocation, oneDNN primitives, first-touch pages)."""
    for _ in range(warm_up):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) * 1e3 for name, values in times.items()}


def measure(shape, dtype, mode, backends, rounds, settings):
    rows, dims, classes = shape
    arrays = random_arrays(shape, dtype)
    make = RUNNERS[mode]
    runners = {name: make(name, rows, dims, classes, dtype, arrays, settings)
               for name in ["softmax"] + backends}
    medians = median_milliseconds(runners, rounds, warm_up=2)
    return {"shape": list(shape), "dtype": dtype, "mode": mode, "ms": medians,
            "ratio": {name: medians[name] / medians["softmax"] for name in backends},
            "peak_memory_mb": peak_memory_mb()}


def profile(shape, dtype, mode, backend, settings, calls=5, kind=None):
    """MXNet's aggregate operator profile of ``calls`` forward+backward calls (text table):
    the layer table's ``mode`` runner, or with ``kind`` that kind's bound graph at its defaults."""
    rows, dims, classes = shape
    arrays = random_arrays(shape, dtype)
    if kind is None:
        run = RUNNERS[mode](backend, rows, dims, classes, dtype, arrays, settings)
    else:
        run = kind_runner(kind, backend, rows, dims, classes, dtype, arrays)
    run()
    run()
    mx.profiler.set_config(profile_all=True, aggregate_stats=True, filename=os.devnull)
    mx.profiler.set_state("run")
    for _ in range(calls):
        run()
    mx.profiler.set_state("stop")
    return mx.profiler.dumps(reset=True)


def table(results, backends):
    header = "| N x D x C | dtype | mode | FullyConnected ms | " + " | ".join(
        f"{name} ms (ratio)" for name in backends) + " | peak RSS MB |"
    lines = [header, "|" + "---|" * (5 + len(backends))]
    for r in results:
        cells = " | ".join(f"{r['ms'][name]:.2f} ({r['ratio'][name]:.3f}x)" for name in backends)
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['mode']} | "
                     f"{r['ms']['softmax']:.2f} | {cells} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def lenet_speed_args(backend, batch, images=12800):
    """train_mnist.py arguments of one throughput run: LeNet (256-wide embedding), m = 4 with the
    mx-lsoftmax schedule (beta 100, scale 0.99: with beta near 0 from the start, m = 4 collapses
    the features to zero and nothing is learned), two epochs of ``images`` images, lr fixed."""
    argv = ["--backend", backend, "--batch-size", str(batch), "--epochs", "2", "--train-limit", str(images),
            "--lr-steps"]
    return argv + (["--margin", "4", "--beta", "100", "--scale", "0.99"] if backend != "softmax" else [])


def lenet_throughput(batch_sizes=(128, 256), backends=("softmax", "python", "compiled"), images=12800,
                     run_one=None):
    """LeNet training samples/s per backend and batch size, from the example's --json.

    Each run is examples/train_mnist.py with ``lenet_speed_args``; the second epoch
    is timed (the first pays for graph building and oneDNN primitives).
    ``run_one(name, argv)`` returns a run's --json summary; the default trains it,
    writing build/results/{name}.json, and raises LookupError when MNIST is missing.
    Returns rows {batch, backend: samples/s, backend_test_accuracy: ..., ...}.
    """
    if run_one is None:
        if resolve_directory(None) is None:
            raise LookupError("real MNIST not found (set MNIST_DIR, see ../shared/data/mnist)")
        import train_mnist  # a sibling script: Python puts this folder first on the path

        def run_one(name, argv):
            path = os.path.join(ROOT, "build", "results", name + ".json")
            return train_mnist.main(argv + ["--no-progress", "--json", path])
    rows = []
    for batch in batch_sizes:
        row = {"batch": batch}
        for backend in backends:
            summary = run_one(f"speed_{backend}_{batch}", lenet_speed_args(backend, batch, images))
            row[backend] = summary["epochs"][-1]["samples_per_sec"]
            row[f"{backend}_test_accuracy"] = summary["test_accuracy"]
        rows.append(row)
    return rows


def lenet_table(rows, backends=("softmax", "python", "compiled")):
    """Markdown: samples/s per backend, the ratio to softmax, and each run's test accuracy
    (every run must have learned for its speed to count)."""
    others = [name for name in backends if name != "softmax"]
    lines = ["| batch | softmax samples/s | " + " | ".join(f"{name} samples/s (ratio)" for name in others)
             + " | test accuracy after 2 epochs (" + ", ".join(backends) + ") |",
             "|" + "---|" * (3 + len(others))]
    for row in rows:
        cells = " | ".join(f"{row[name]:.0f} ({row[name] / row['softmax']:.2f}x)" for name in others)
        accuracies = ", ".join(f"{row[name + '_test_accuracy']:.3f}" for name in backends)
        lines.append(f"| {row['batch']} | {row['softmax']:.0f} | {cells} | {accuracies} |")
    return "\n".join(lines)


def gpu_measure(harness, shape, dtype, rounds, settings):
    """Median ms of forward+backward: three cuBLAS products alone vs the layer (products + kernels)."""
    cupy = harness.device
    rows, dims, classes = shape
    generator = cupy.random.default_rng(0)
    x = generator.standard_normal((rows, dims), dtype=dtype)
    w = generator.standard_normal((classes, dims), dtype=dtype)
    label = generator.integers(0, classes, rows).astype(cupy.int64)
    grad = cupy.ones((rows, classes), dtype=dtype)
    step = cupy.zeros((1,), dtype=dtype)

    def plain():
        logits = x @ w.T
        return logits, grad @ w, grad.T @ x

    def layer():
        status, saved, _ = harness.forward(x, w, label, step, dict(kind="lsoftmax", **settings))
        status_back, grad_data, grad_weight = harness.backward(grad, saved)
        if status != -1 or status_back != -1:
            raise RuntimeError(f"CUDA kernels failed: status {status}, {status_back}")
        return grad_data, grad_weight

    times = {"plain": [], "layer": []}
    for run in (plain, layer, plain, layer):  # warm-up: cuBLAS handles, kernel loading
        run()
    cupy.cuda.Device().synchronize()
    for _ in range(rounds):
        for name, run in (("plain", plain), ("layer", layer)):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times[name].append(cupy.cuda.get_elapsed_time(start, stop))
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return {"shape": list(shape), "dtype": dtype, "ms": medians, "ratio": medians["layer"] / medians["plain"]}


def gpu_section(shapes, dtypes, rounds, settings):
    """(markdown, results): the GPU table, or a line saying why there is none."""
    try:
        harness = KernelHarness()
    except HarnessUnavailable as reason:
        return f"Not measured on this machine: {reason}.", []
    results = []
    for shape in shapes:
        for dtype in dtypes:
            results.append(gpu_measure(harness, shape, dtype, rounds, settings))
    lines = [f"Device: {harness.device_name()}. Forward+backward, CUDA events, median of {rounds} "
             "alternating rounds; plain = the three cuBLAS products of a FullyConnected layer "
             "(x W^T, G W, G^T x), layer = the same products plus the margin_softmax_target kernels "
             "(norms, logits scaling, target column, label check, step advance), L-Softmax settings of the "
             "layer table.", "",
             "| N x D x C | dtype | cuBLAS products ms | L-Softmax ms (ratio) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['ms']['plain']:.3f} | "
                     f"{r['ms']['layer']:.3f} ({r['ratio']:.3f}x) |")
    return "\n".join(lines), results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=["layer", "kinds", "lenet", "gpu"],
                        choices=["layer", "kinds", "lenet", "gpu", "scale"],
                        help="which sections to measure (scale: C = 10^6, minutes and ~10 GB; not by default)")
    parser.add_argument("--scale-classes", type=positive_int, default=10 ** 6, help="C of the scale section")
    parser.add_argument("--kinds", nargs="*", default=list(mx_lsoftmax.KINDS), choices=list(mx_lsoftmax.KINDS),
                        help="kinds of the kinds section (each at its defaults)")
    parser.add_argument("--kind-shapes", nargs="+", type=shape_argument, default=None,
                        help="NxDxC shapes of the kinds section (default: 256x512x10000 256x512x100000)")
    parser.add_argument("--shapes", nargs="+", type=shape_argument, default=None,
                        help="NxDxC shapes (default: the five of docs/benchmarks.md)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"],
                        help="data types of the layer table")
    parser.add_argument("--modes", nargs="+", default=list(RUNNERS), choices=list(RUNNERS),
                        help="ways of running the layer (see the module docstring)")
    parser.add_argument("--backends", nargs="+", default=None, choices=["python", "compiled"],
                        help="default: python, and compiled when built")
    parser.add_argument("--weight-grad-req", choices=["write", "both"], default="write",
                        help="kinds section: 'both' times each backend also with the weight's gradient "
                             f"added to (grad_req 'add', weight_grad_req 'add'), as backend name + '{ADDING}'")
    parser.add_argument("--rounds", type=positive_int, default=9, help="alternating rounds per shape (median)")
    parser.add_argument("--margin", type=positive_int, default=4, help="L-Softmax margin of the layer table")
    parser.add_argument("--beta", type=non_negative_float, default=1.0, help="L-Softmax beta of the layer table")
    parser.add_argument("--max-weight-mb", type=positive_float, default=1024,
                        help="skip shapes whose weight exceeds this (memory)")
    parser.add_argument("--lenet-images", type=positive_int, default=12800,
                        help="training images per epoch of the LeNet runs (two epochs, the second timed)")
    parser.add_argument("--write", metavar="MARKDOWN", help="write the results to this file")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    parser.add_argument("--profile", metavar="PATH",
                        help="instead of timing: write MXNet's operator profile of 5 calls per backend and "
                             "mode at the first --shapes shape and --dtypes dtype to PATH (set "
                             "MXNET_EXEC_BULK_EXEC_TRAIN=0 to see bound graphs operator by operator)")
    parser.add_argument("--profile-kind", choices=list(mx_lsoftmax.KINDS),
                        help="with --profile: profile this kind's bound graph at its defaults (the kinds "
                             "section's graph) instead of the layer table's runners; --modes is then unused")
    arguments = parser.parse_args(argv)

    shapes = arguments.shapes or SHAPES
    backends = arguments.backends or (["python", "compiled"] if mx_lsoftmax.library.is_loaded() else ["python"])
    settings = dict(margin=arguments.margin, beta=arguments.beta)
    # The thread count moves every figure (docs/performance.md, "Threads"): say it when set.
    threads_setting = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads_setting + "python examples/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if arguments.profile:
        with open(arguments.profile, "w") as handle:
            handle.write(f"Command: {command}\n")
            modes = ["bound"] if arguments.profile_kind else arguments.modes
            for mode in modes:
                for backend in ["softmax"] + backends:
                    what = f"{arguments.profile_kind} {backend}" if arguments.profile_kind else backend
                    operators = profile(shapes[0], arguments.dtypes[0], mode, backend, settings,
                                        kind=arguments.profile_kind)
                    handle.write(f"\n== {'x'.join(map(str, shapes[0]))} {arguments.dtypes[0]} {mode} {what}, "
                                 f"5 calls\n{operators}")
        print(f"wrote {arguments.profile}")
        return {"command": command, "profile": arguments.profile}
    sections, raw = [], {"command": command}

    if "layer" in arguments.parts:
        results = []
        for shape in shapes:
            for dtype in arguments.dtypes:
                weight_mb = shape[1] * shape[2] * np.dtype(dtype).itemsize / 2 ** 20
                if weight_mb > arguments.max_weight_mb:
                    print(f"skip {shape} {dtype}: weight {weight_mb:.0f} MB > --max-weight-mb", flush=True)
                    continue
                rounds = max(3, arguments.rounds // 3) if shape[2] >= 100000 else arguments.rounds
                for mode in arguments.modes:
                    result = measure(shape, dtype, mode, backends, rounds, settings)
                    results.append(result)
                    print(f"{'x'.join(map(str, shape))} {dtype} {mode}: " + ", ".join(
                        f"{name} {result['ms'][name]:.2f} ms" for name in ["softmax"] + backends) + " | " +
                        ", ".join(f"{name} {result['ratio'][name]:.3f}x" for name in backends), flush=True)
        raw["results"] = results
        sections.append(f"""## The layer against FullyConnected

Forward+backward of the L-Softmax layer (margin {arguments.margin}, beta {arguments.beta}) against
MXNet's FullyConnected (no bias) on the same shapes, in one process, alternating call by call;
median of {arguments.rounds} rounds (a third of that, at least 3, for C = 100000). Ratio = backend / FullyConnected
in the same rounds. Data and weight gradients are computed in every mode. `bound` is a graph bound
once (`simple_bind`, as Module trains); `hybridized` is a Gluon block (`nn.Dense` against
`LSoftmaxDense`) after `hybridize(static_alloc=True, static_shape=True)`; `imperative` is autograd on
NDArrays, where MXNet 1.9.1 allocates fresh CPU memory on every call, as it also does for a block
hybridized without static memory (see [performance.md](performance.md)).

{table(results, backends)}
""")

    if "kinds" in arguments.parts:
        kind_shapes = arguments.kind_shapes or KIND_SHAPES
        results = []
        for shape in kind_shapes:
            rounds = max(5, arguments.rounds // 2) if shape[2] >= 100000 else arguments.rounds
            kind_backends = backends + ([name + ADDING for name in backends]
                                        if arguments.weight_grad_req == "both" else [])
            results += measure_kinds(shape, "float32", arguments.kinds, kind_backends, rounds)
        raw["kinds"] = results
        sections.append(f"""## Every kind against FullyConnected and against stock MXNet operators

Forward+backward, float32, each kind at its defaults (`mx_lsoftmax.KINDS`), every graph bound once
with static memory (`simple_bind`, as Module trains); median of {arguments.rounds} rounds ({max(5, arguments.rounds // 2)} at
C = 100000), alternating with
FullyConnected call by call. "insightface stock ops" is the graph an MXNet user writes instead:
L2Normalization of x (times s) and of W, FullyConnected, pick, sqrt / arccos, where, one_hot
(`insightface_symbol` in examples/benchmark.py; its output equals the layer's, see
tests/test_lsoftmax_benchmark.py).

{kinds_table(results, kind_backends)}
""")

    if "lenet" in arguments.parts:
        lenet_backends = ["softmax"] + backends
        try:
            rows = lenet_throughput(backends=lenet_backends, images=arguments.lenet_images)
            raw["lenet"] = rows
            text = lenet_table(rows, lenet_backends)
        except LookupError as reason:
            text = f"Not measured: {reason}."
        sections.append(f"""## LeNet training throughput

LeNet with a 256-wide embedding on real MNIST, m = 4, beta 100, scale 0.99, SGD: samples/s over the second of two
epochs of {arguments.lenet_images} images (the first pays for graph building), read from
`examples/train_mnist.py --json` (`epochs[-1].samples_per_sec`), one run per cell.

{text}
""")

    if "scale" in arguments.parts:
        text, results = scale_section(backends, arguments.scale_classes)
        raw["scale"] = results
        sections.append(f"""## One machine at C = {arguments.scale_classes} classes

ArcFace (defaults), float32, N = 256, a graph bound once (`simple_bind`), forward+backward with data
and weight gradients: the median of 3 steps after a warm-up, and the peak resident memory of a fresh
process holding that one graph (VmHWM: weight, its gradient, the (N, C) logits and their
gradient, the kernels' buffers, and MXNet itself).

{text}
""")

    if "gpu" in arguments.parts:
        text, results = gpu_section(shapes, arguments.dtypes, arguments.rounds, settings)
        raw["gpu"] = results
        sections.append(f"## GPU: the CUDA kernels against cuBLAS\n\n{text}\n")

    threads = environment.operator_threads()
    machine = (f"{environment.processor()} ({platform.machine()}), {os.cpu_count()} cores, MXNet {mx.__version__} "
               f"(operators on {threads or 'an unknown number of'} OpenMP thread{'' if threads == 1 else 's'}), "
               f"Python {platform.python_version()}")
    document = (f"# Benchmarks\n\n- Machine: {machine}\n- Date: {datetime.date.today().isoformat()}\n"
                f"- Command: `{command}`\n\n" + "\n".join(sections))
    print(document)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(raw, handle, indent=1)
    if arguments.write:
        with open(arguments.write, "w") as handle:
            handle.write(document)
    return raw


if __name__ == "__main__":
    main()
