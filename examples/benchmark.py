#!/usr/bin/env python3
"""Forward+backward time of the L-Softmax layer per backend against MXNet's FullyConnected.

Every shape runs the plain layer and each backend in one process, alternating
call by call, and reports the median of repeated rounds and its ratio to the
plain layer measured in the same rounds. Two settings:

  bound       a graph bound once (simple_bind), as Module and hybridized Gluon
              with static memory train: buffers are reused across steps;
  imperative  autograd on NDArrays: MXNet 1.9.1 allocates fresh CPU memory for
              every call, so first-touch page faults are part of the cost.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mxnet as mx  # noqa: E402
from mxnet import autograd  # noqa: E402

import mx_lsoftmax  # noqa: E402

SHAPES = [(128, 2, 10), (256, 256, 10), (256, 512, 1000), (256, 512, 10000), (256, 512, 100000)]


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bound_runner(backend, rows, dims, classes, dtype, arrays, settings):
    data, weight, label = mx.sym.var("data"), mx.sym.var("weight"), mx.sym.var("label")
    if backend == "softmax":
        graph = mx.sym.FullyConnected(data, weight, no_bias=True, num_hidden=classes)
    else:
        graph = mx_lsoftmax.lsoftmax(data, weight, label, classes, backend=backend, **settings)
    shapes = {"data": (rows, dims), "weight": (classes, dims)}
    if "label" in graph.list_arguments():
        shapes["label"] = (rows,)
    requests = {name: "null" if name == "label" else "write" for name in graph.list_arguments()}
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
    return run


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


def measure(shape, dtype, mode, backends, rounds, settings):
    rows, dims, classes = shape
    rng = np.random.default_rng(0)
    arrays = {"data": rng.standard_normal((rows, dims)).astype(dtype),
              "weight": rng.standard_normal((classes, dims)).astype(dtype),
              "label": rng.integers(0, classes, rows).astype(dtype)}
    make = bound_runner if mode == "bound" else imperative_runner
    runners = {name: make(name, rows, dims, classes, dtype, arrays, settings)
               for name in ["softmax"] + backends}
    for run in runners.values():  # warm-up: allocation, oneDNN primitives
        run()
        run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(values)) * 1e3 for name, values in times.items()}
    return {"shape": list(shape), "dtype": dtype, "mode": mode, "ms": medians,
            "ratio": {name: medians[name] / medians["softmax"] for name in backends},
            "peak_memory_mb": peak_memory_mb()}


def table(results, backends):
    header = "| N x D x C | dtype | mode | FullyConnected ms | " + " | ".join(
        f"{name} ms (ratio)" for name in backends) + " | peak RSS MB |"
    lines = [header, "|" + "---|" * (5 + len(backends))]
    for r in results:
        cells = " | ".join(f"{r['ms'][name]:.2f} ({r['ratio'][name]:.3f}x)" for name in backends)
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['mode']} | "
                     f"{r['ms']['softmax']:.2f} | {cells} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="NxDxC shapes (default: the five of docs/benchmarks.md)")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    parser.add_argument("--modes", nargs="*", default=["bound", "imperative"])
    parser.add_argument("--backends", nargs="*", default=None, help="default: python, and compiled when built")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds per shape (median)")
    parser.add_argument("--margin", type=int, default=4)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--max-weight-mb", type=float, default=1024,
                        help="skip shapes whose weight exceeds this (memory)")
    parser.add_argument("--write", metavar="MARKDOWN", help="write the results section to this file")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    arguments = parser.parse_args()

    shapes = ([tuple(int(v) for v in s.split("x")) for s in arguments.shapes]
              if arguments.shapes else SHAPES)
    backends = arguments.backends or (["python", "compiled"] if mx_lsoftmax.library.is_loaded() else ["python"])
    settings = dict(margin=arguments.margin, beta=arguments.beta)
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
    text = table(results, backends)
    print(text)
    command = "python examples/benchmark.py " + " ".join(sys.argv[1:])
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump({"command": command, "results": results}, handle, indent=1)
    if arguments.write:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, MXNet {mx.__version__}, Python {platform.python_version()}"
        with open(arguments.write, "w") as handle:
            handle.write(f"""# Benchmarks

Forward+backward of the L-Softmax layer (margin {arguments.margin}, beta {arguments.beta}) against
MXNet's FullyConnected (no bias) on the same shapes, in one process, alternating call by call;
median of {arguments.rounds} rounds (a third of that, at least 3, for C = 100000). Ratio = backend / FullyConnected
in the same rounds. `bound` is a graph bound once (as Module and hybridized Gluon run);
`imperative` is autograd on NDArrays, where MXNet 1.9.1 allocates fresh CPU memory on every call.

- Machine: {machine}
- Date: {datetime.date.today().isoformat()}
- Command: `{command}`

{text}
""")


if __name__ == "__main__":
    main()
