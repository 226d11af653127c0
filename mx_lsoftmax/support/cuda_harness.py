"""The CUDA kernels of ``margin_softmax_target`` and ``margin_softmax_normalise`` driven from
CuPy, without a GPU build of MXNet.

The pip wheel of MXNet 1.9.1 is CPU-only, so the GPU kernels are exercised
through the extern "C" entry points of ``liblsoftmax_cuda.so`` (``make cuda``):
the tests (tests/test_lsoftmax_gpu.py) check them against the float64 spec and
the benchmark (examples/benchmark.py) times them against cuBLAS products.

The settings travel as one string of ``name=value`` pairs, made from
``MarginSettings.as_attrs()`` and parsed by the library's own parser, so this
file never lists them. The layer is composed as in MXNet's graph
(mx_lsoftmax/graph.py): kinds that normalise weights first make unit rows and
norms (the normalise kernels, K11); logits = x W^T by cuBLAS (CuPy's matmul)
on the raw or unit rows, then the target kernels; backward: the target
kernels, the two cuBLAS products on G' plus the kernels' norm-path gradients,
and for unit rows the normalise backward kernel.
"""
import ctypes
import os

import numpy as np

from ..kinds import KINDS, MarginSettings

CUDA_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib",
                            "liblsoftmax_cuda.so")
SUCCESS = -1  # kGpuSuccess in src/operator/margin_softmax-gpu.h; >= 0 is the first bad label row
BAD_SETTINGS = -3

__all__ = ["CUDA_LIBRARY", "SUCCESS", "BAD_SETTINGS", "HarnessUnavailable", "KernelHarness"]


class HarnessUnavailable(RuntimeError):
    """No CuPy, no CUDA device, or no ``make cuda`` build: the message says which.

    ``gpu_present`` is True when only the library is missing (a set-up error).
    """

    def __init__(self, message, gpu_present=False):
        super().__init__(message)
        self.gpu_present = gpu_present


def settings_text(settings):
    """'name=value;...' of a MarginSettings (or a dict of them, kind included); text passes as is."""
    if isinstance(settings, (bytes, str)):
        return settings.encode() if isinstance(settings, str) else settings
    if not isinstance(settings, MarginSettings):
        settings = MarginSettings(**settings)
    return ";".join(f"{name}={value}" for name, value in settings.as_attrs().items()).encode()


def settings_kind(settings):
    """The kind named by settings (MarginSettings, dict or text), default 'lsoftmax' as the op's."""
    if isinstance(settings, MarginSettings):
        return settings.kind
    if isinstance(settings, dict):
        return settings.get("kind", "lsoftmax")
    text = settings.decode() if isinstance(settings, bytes) else settings
    kind = dict(pair.split("=", 1) for pair in text.split(";") if "=" in pair).get("kind")
    return kind if kind in KINDS else "lsoftmax"


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
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        for suffix in ("float32", "float64"):
            forward = getattr(self.library, f"margin_softmax_forward_{suffix}")
            forward.argtypes = [pointer] * 12 + [int64] * 3 + [ctypes.c_char_p, pointer, pointer]
            forward.restype = ctypes.c_int
            backward = getattr(self.library, f"margin_softmax_backward_{suffix}")
            backward.argtypes = [pointer] * 14 + [int64] * 3 + [ctypes.c_char_p, pointer, pointer]
            backward.restype = ctypes.c_int
            normalise = getattr(self.library, f"margin_softmax_normalise_forward_{suffix}")
            normalise.argtypes = [pointer] * 3 + [int64] * 2 + [pointer]
            normalise.restype = ctypes.c_int
            normalise_backward = getattr(self.library, f"margin_softmax_normalise_backward_{suffix}")
            normalise_backward.argtypes = [pointer] * 5 + [int64] * 2 + [pointer]
            normalise_backward.restype = ctypes.c_int
        self.library.margin_softmax_scratch_bytes.argtypes = [int64, int64]
        self.library.margin_softmax_scratch_bytes.restype = ctypes.c_size_t
        self.library.margin_softmax_last_error.restype = ctypes.c_char_p

    def last_error(self):
        return self.library.margin_softmax_last_error().decode()

    def device_name(self):
        properties = self.cupy.cuda.runtime.getDeviceProperties(self.cupy.cuda.Device().id)
        name = properties["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def _scratch(self, rows, classes):
        size = self.library.margin_softmax_scratch_bytes(rows, classes)
        return self.cupy.empty((size,), dtype=self.cupy.uint8)

    def normalise(self, rows):
        """(status, unit rows, float64 norms) of rows (C, D): margin_softmax_normalise (K11)."""
        cupy = self.cupy
        unit, norms = cupy.empty_like(rows), cupy.empty((rows.shape[0],), cupy.float64)
        status = getattr(self.library, f"margin_softmax_normalise_forward_{np.dtype(rows.dtype).name}")(
            rows.data.ptr, unit.data.ptr, norms.data.ptr, rows.shape[0], rows.shape[1], None)
        return status, unit, norms

    def normalise_backward(self, grad_unit, unit, norms, grad_norm=None):
        """(status, gradient of the rows) from the unit rows' gradient and the norms' (default 0)."""
        grad_rows = self.cupy.empty_like(unit)
        status = getattr(self.library, f"margin_softmax_normalise_backward_{np.dtype(unit.dtype).name}")(
            grad_unit.data.ptr, None if grad_norm is None else grad_norm.data.ptr, unit.data.ptr,
            norms.data.ptr, grad_rows.data.ptr, unit.shape[0], unit.shape[1], None)
        return status, grad_rows

    def forward(self, x, w, label, step, settings, class_margins=None, training=None):
        """x (N, D), w (C, D), label (N,) int64, step (1,): CuPy arrays of one float dtype;
        class_margins (C,) of that dtype with settings ``per_class_margin`` (cosface), else None;
        training (1,) float32, the op's flag (1 training, 0 not: the plain logits), or None
        (training).

        Returns (status, saved, out) with ``saved`` what ``backward`` needs;
        ``step`` is advanced on success while training.
        """
        cupy = self.cupy
        rows, dims, classes = x.shape[0], x.shape[1], w.shape[0]
        unit = unit_norms = None
        if KINDS[settings_kind(settings)].normalise_weights:
            status, unit, unit_norms = self.normalise(w)
            if status != SUCCESS:
                return status, None, None
        classifier = w if unit is None else unit
        logits = x @ classifier.T
        out, beta_used = cupy.empty_like(logits), cupy.empty((1,), dtype=x.dtype)
        data_norm, weight_norm = cupy.empty((rows,), cupy.float64), cupy.empty((classes,), cupy.float64)
        text = settings_text(settings)
        scratch = self._scratch(rows, classes)
        status = getattr(self.library, f"margin_softmax_forward_{np.dtype(x.dtype).name}")(
            logits.data.ptr, x.data.ptr, None if unit is not None else w.data.ptr,
            None if unit_norms is None else unit_norms.data.ptr, label.data.ptr, step.data.ptr,
            None if training is None else training.data.ptr,
            None if class_margins is None else class_margins.data.ptr, out.data.ptr,
            beta_used.data.ptr, data_norm.data.ptr, weight_norm.data.ptr, rows, classes, dims, text,
            scratch.data.ptr, None)
        saved = dict(logits=logits, x=x, w=w, classifier=classifier, unit_norms=unit_norms,
                     label=label, training=training, class_margins=class_margins, out=out, beta_used=beta_used,
                     data_norm=data_norm, weight_norm=weight_norm, text=text)
        return status, saved, out

    def backward(self, grad, saved):
        """The full layer's (status, grad_data, grad_weight) for the output gradient ``grad``."""
        cupy = self.cupy
        x, w, classifier, unit_norms = saved["x"], saved["w"], saved["classifier"], saved["unit_norms"]
        rows, dims, classes = x.shape[0], x.shape[1], w.shape[0]
        grad_logits, grad_data = cupy.empty_like(saved["logits"]), cupy.empty_like(x)
        grad_weight = None if unit_norms is not None else cupy.empty_like(w)
        status = getattr(self.library, f"margin_softmax_backward_{np.dtype(x.dtype).name}")(
            grad.data.ptr, saved["logits"].data.ptr, x.data.ptr,
            None if grad_weight is None else w.data.ptr, saved["label"].data.ptr,
            None if saved["training"] is None else saved["training"].data.ptr,
            None if saved["class_margins"] is None else saved["class_margins"].data.ptr,
            saved["out"].data.ptr, saved["beta_used"].data.ptr, saved["data_norm"].data.ptr,
            saved["weight_norm"].data.ptr, grad_logits.data.ptr, grad_data.data.ptr,
            None if grad_weight is None else grad_weight.data.ptr, rows, classes, dims, saved["text"],
            self._scratch(rows, classes).data.ptr, None)
        if status != SUCCESS:
            return status, None, None
        # The product path (cuBLAS) plus the kernels' norm paths, as MXNet sums them.
        grad_classifier = grad_logits.T @ x
        if grad_weight is None:  # unit rows: the whole weight gradient through (K11)
            status, grad_weight = self.normalise_backward(grad_classifier, classifier, unit_norms)
        else:
            grad_weight = grad_classifier + grad_weight
        return status, grad_logits @ classifier + grad_data, grad_weight
