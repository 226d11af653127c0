"""What a measurement depends on besides the code: the processor, threads, MXNet and its settings.

MXNet's CPU kernels (oneDNN, and the wheel's BLAS) pick code paths by processor and thread
count: training runs repeat on one machine and differ in the last digits across machines,
and speed ratios against FullyConnected move with the processor's memory bandwidth.
"""
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


def machine(library=None):
    """A JSON-ready description of this machine, MXNet and the settings above; ``library``:
    the path of the compiled op's library in use, if any."""
    return {"processor": processor(), "machine": platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "mxnet": mx.__version__, "numpy": np.__version__,
            "environment": {name: os.environ.get(name) for name in SETTINGS},
            "mx_lsoftmax_backend_library": library}
