"""What a measurement depends on besides the code: the processor, threads, MXNet and its settings.

MXNet's CPU kernels (oneDNN, and the wheel's BLAS) pick code paths by processor and thread
count: training runs repeat on one machine and differ in the last digits across machines,
and speed ratios against FullyConnected move with the processor's memory bandwidth.
"""
import ctypes
import os
import platform

import mxnet as mx
import numpy as np

SETTINGS = ("OMP_NUM_THREADS", "MXNET_ENFORCE_DETERMINISM", "MXNET_CPU_WORKER_NTHREADS", "MXNET_ENGINE_TYPE")


def processor():
    """The processor's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def operator_threads():
    """The OpenMP threads oneDNN's operators (FullyConnected and its backward) run on in this
    process, as the OpenMP runtime reports it; None where that runtime is not libgomp.

    Without OMP_NUM_THREADS, MXNet 1.9.1 on x86 sets half the processors, on the assumption
    that every core runs two hardware threads: on a machine without them (many VMs)
    FullyConnected uses half the cores. Read from the runtime, not recomputed, because
    MXNet sets it when it starts.
    """
    try:
        return int(ctypes.CDLL("libgomp.so.1").omp_get_max_threads())
    except (OSError, AttributeError):
        return None


def machine(library=None):
    """A JSON-ready description of this machine, MXNet and the settings above; ``library``:
    the path of the compiled op's library in use, if any."""
    return {"processor": processor(), "machine": platform.machine(), "cores": os.cpu_count(),
            "operator_threads": operator_threads(), "python": platform.python_version(),
            "mxnet": mx.__version__, "numpy": np.__version__,
            "environment": {name: os.environ.get(name) for name in SETTINGS},
            "mx_lsoftmax_backend_library": library}
