"""The CUDA kernels of ``lsoftmax_target`` driven from CuPy, without a GPU build of MXNet.

The pip wheel of MXNet 1.9.1 is CPU-only, so the GPU kernels are exercised
through the extern "C" entry points of ``liblsoftmax_cuda.so`` (``make cuda``):
the tests (tests/test_lsoftmax_gpu.py) check them against the float64 spec and
the benchmark (examples/benchmark.py) times them against cuBLAS products.
One place binds the entry points, so both use the same calls.

The layer is composed as in MXNet: logits = x W^T by cuBLAS (CuPy's matmul),
then the target-column kernel; backward: the kernel, then the two cuBLAS
products on its logits gradient plus the kernel's norm-path gradients.
"""
import ctypes
import os

import numpy as np

CUDA_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "liblsoftmax_cuda.so")
SUCCESS = -1  # kGpuSuccess in src/operator/lsoftmax-gpu.h; >= 0 is the first bad label row

__all__ = ["CUDA_LIBRARY", "SUCCESS", "HarnessUnavailable", "KernelHarness"]


class HarnessUnavailable(RuntimeError):
    """No CuPy, no CUDA device, or no ``make cuda`` build: the message says which.

    ``gpu_present`` is True when only the library is missing (a set-up error).
    """

    def __init__(self, message, gpu_present=False):
        super().__init__(message)
        self.gpu_present = gpu_present


class KernelHarness:
    """The library's GPU entry points bound with ctypes, run on CuPy arrays (default stream)."""

    def __init__(self, library_path=CUDA_LIBRARY):
        try:
            import cupy
        except ImportError as error:
            raise HarnessUnavailable("CuPy is not installed (pip install the cupy-cuda wheel that matches the CUDA driver)") from error
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as error:
            raise HarnessUnavailable(f"no usable CUDA GPU ({error})") from error
        if count < 1:
            raise HarnessUnavailable("no CUDA GPU")
        if not os.path.exists(library_path):
            raise HarnessUnavailable(f"{library_path} is not built: run `make cuda`", gpu_present=True)
        self.cupy = cupy
        self.library = ctypes.CDLL(library_path)
        pointer, int64, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        for suffix in ("float32", "float64"):
            forward = getattr(self.library, f"lsoftmax_forward_{suffix}")
            forward.argtypes = [pointer] * 7 + [int64] * 3 + [ctypes.c_int] + [real] * 5 + [pointer] * 2
            forward.restype = ctypes.c_int
            backward = getattr(self.library, f"lsoftmax_backward_{suffix}")
            backward.argtypes = [pointer] * 9 + [int64] * 3 + [ctypes.c_int] + [pointer] * 2
            backward.restype = ctypes.c_int
        self._flag = cupy.empty((1,), dtype=cupy.int32)

    def device_name(self):
        properties = self.cupy.cuda.runtime.getDeviceProperties(self.cupy.cuda.Device().id)
        name = properties["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def forward(self, x, w, label, step, margin, beta=0.0, beta_min=0.0, scale=1.0, gamma=0.0,
                power=1.0):
        """x (N, D), w (C, D), label (N,) int64, step (1,): CuPy arrays of one float dtype.

        Returns (status, logits, out, beta_used); ``step`` is advanced on success.
        """
        cupy = self.cupy
        rows, dims, classes = x.shape[0], x.shape[1], w.shape[0]
        logits = x @ w.T
        out, beta_used = cupy.empty_like(logits), cupy.empty((1,), dtype=x.dtype)
        status = getattr(self.library, f"lsoftmax_forward_{np.dtype(x.dtype).name}")(
            logits.data.ptr, x.data.ptr, w.data.ptr, label.data.ptr, step.data.ptr, out.data.ptr,
            beta_used.data.ptr, rows, classes, dims, margin, beta, beta_min, scale, gamma, power,
            self._flag.data.ptr, None)
        return status, logits, out, beta_used

    def backward(self, grad, logits, x, w, label, beta_used, margin):
        """The full layer's (status, grad_data, grad_weight) for the output gradient ``grad``."""
        cupy = self.cupy
        rows, dims, classes = x.shape[0], x.shape[1], w.shape[0]
        grad_logits, grad_data, grad_weight = cupy.empty_like(logits), cupy.empty_like(x), cupy.empty_like(w)
        status = getattr(self.library, f"lsoftmax_backward_{np.dtype(x.dtype).name}")(
            grad.data.ptr, logits.data.ptr, x.data.ptr, w.data.ptr, label.data.ptr, beta_used.data.ptr,
            grad_logits.data.ptr, grad_data.data.ptr, grad_weight.data.ptr, rows, classes, dims,
            margin, self._flag.data.ptr, None)
        # The product path (cuBLAS) plus the kernel's norm path, as MXNet sums them.
        return status, grad_logits @ w + grad_data, grad_logits.T @ x + grad_weight
