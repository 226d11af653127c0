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

The same kernels also run without a GPU: ``EMULATED_CUDA_LIBRARY`` (``make
emulated``) is margin_softmax.cu compiled by the host compiler against an
emulated CUDA runtime (tools/cuda_emulation), and ``KernelHarness.emulated()``
drives it on NumPy arrays, whose data stand for device memory. That checks the
kernels' logic (indexing, block reductions, barriers, atomics, the launchers'
order and scratch layout) on every machine; timing and nvcc's code generation
need a GPU.
"""
import ctypes
import os
import weakref

import numpy as np

from ..kinds import KINDS, MarginSettings

CUDA_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib",
                            "liblsoftmax_cuda.so")
# Built by `make emulated` in a checkout (never installed: it serves the tests).
EMULATED_CUDA_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                     "build", "liblsoftmax_cuda_emulated.so")
SUCCESS = -1  # kGpuSuccess in src/operator/margin_softmax-gpu.h; >= 0 is the first bad label row
BAD_SETTINGS = -3
GRADIENT_OVERFLOW = -4  # a row's gradient left the dtype: last_error() names the row

__all__ = ["CUDA_LIBRARY", "EMULATED_CUDA_LIBRARY", "SUCCESS", "BAD_SETTINGS", "GRADIENT_OVERFLOW",
           "HarnessUnavailable", "HostDevice", "KernelHarness"]


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


class HostDevice:
    """The part of CuPy's interface the harness and its tests use, on NumPy arrays: the
    "device" of the emulated kernels. Arrays are C-contiguous copies, as CuPy's are.

    Every array sits between two guard zones of GUARD_BYTES filled with GUARD_VALUE;
    ``check_guards()`` (the harness calls it after every kernel launch) raises if a kernel
    wrote into one, that is outside the array it was given.
    """

    float32, float64, int64, uint8 = np.float32, np.float64, np.int64, np.uint8
    GUARD_BYTES, GUARD_VALUE = 256, 0xA5
    _guarded = []  # (weak reference to the array handed out, its guarded buffer)

    @classmethod
    def empty(cls, shape, dtype=np.float64):
        dtype = np.dtype(dtype)
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = np.full(size + 2 * cls.GUARD_BYTES, cls.GUARD_VALUE, dtype=np.uint8)
        array = buffer[cls.GUARD_BYTES:cls.GUARD_BYTES + size].view(dtype).reshape(shape)
        cls._guarded.append((weakref.ref(array), buffer))
        return array

    @classmethod
    def empty_like(cls, array):
        return cls.empty(array.shape, array.dtype)

    @classmethod
    def zeros(cls, shape, dtype=np.float64):
        return cls.full(shape, 0, dtype)

    @classmethod
    def full(cls, shape, value, dtype=np.float64):
        array = cls.empty(shape, dtype)
        array[...] = value
        return array

    @classmethod
    def asarray(cls, values, dtype=None):
        values = np.asarray(values, dtype=dtype)
        array = cls.empty(values.shape, values.dtype)
        array[...] = values
        return array

    @staticmethod
    def asnumpy(array):
        return np.array(array, copy=True)

    @classmethod
    def check_guards(cls):
        """Raise RuntimeError naming the array whose guard zone a kernel wrote into; forget the
        arrays no longer in use."""
        alive = []
        for reference, buffer in cls._guarded:
            array = reference()
            if array is None:
                continue
            alive.append((reference, buffer))
            for side, zone in (("before", buffer[:cls.GUARD_BYTES]), ("after", buffer[-cls.GUARD_BYTES:])):
                if np.any(zone != cls.GUARD_VALUE):
                    zone[...] = cls.GUARD_VALUE  # report once
                    raise RuntimeError(f"a kernel wrote outside an array of shape {array.shape} "
                                       f"{array.dtype} ({side} it)")
        cls._guarded[:] = alive

    @staticmethod
    def pointer(array):
        if not array.flags.c_contiguous:  # the kernels index rows * dims + d
            raise ValueError(f"the kernels take C-contiguous arrays, got strides {array.strides}")
        return array.ctypes.data


class KernelHarness:
    """The library's GPU entry points bound with ctypes, run on CuPy arrays (default stream),
    or with ``KernelHarness.emulated()`` on NumPy arrays through the emulated build.

    ``device``: the array module of the kernels' memory (CuPy, or ``HostDevice``), with
    ``asarray``, ``asnumpy``, ``zeros``, ``full``, ``empty``, ``empty_like`` and the dtypes.
    """

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
        self.device, self.is_emulated = cupy, False
        self._bind(library_path)

    @classmethod
    def emulated(cls, library_path=EMULATED_CUDA_LIBRARY):
        """The kernels of margin_softmax.cu run on the CPU (tools/cuda_emulation); needs only
        ``make emulated``."""
        if not os.path.exists(library_path):
            raise HarnessUnavailable(f"{library_path} is not built: run `make emulated`")
        harness = cls.__new__(cls)
        harness.device, harness.is_emulated = HostDevice, True
        harness._bind(library_path)
        return harness

    def pointer(self, array):
        """The address of an array's data (None stays None: a null pointer)."""
        if array is None:
            return None
        return HostDevice.pointer(array) if self.is_emulated else array.data.ptr

    def _bind(self, library_path):
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
            normalise_backward.argtypes = [pointer] * 5 + [int64] * 2 + [pointer, pointer]
            normalise_backward.restype = ctypes.c_int
        self.library.margin_softmax_scratch_bytes.argtypes = [int64, int64]
        self.library.margin_softmax_scratch_bytes.restype = ctypes.c_size_t
        self.library.margin_softmax_normalise_scratch_bytes.argtypes = []
        self.library.margin_softmax_normalise_scratch_bytes.restype = ctypes.c_size_t
        self.library.margin_softmax_last_error.restype = ctypes.c_char_p

    def _call(self, entry_point, dtype, *arguments):
        """The entry point for ``dtype``'s suffix; under emulation, then the guard zones."""
        status = getattr(self.library, f"{entry_point}_{np.dtype(dtype).name}")(*arguments)
        if self.is_emulated:
            HostDevice.check_guards()
        return status

    def last_error(self):
        return self.library.margin_softmax_last_error().decode()

    def device_name(self):
        if self.is_emulated:
            return "CPU emulation of the CUDA kernels"
        properties = self.device.cuda.runtime.getDeviceProperties(self.device.cuda.Device().id)
        name = properties["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def _scratch(self, rows, classes):
        size = self.library.margin_softmax_scratch_bytes(rows, classes)
        return self.device.empty((size,), dtype=self.device.uint8)

    def normalise(self, rows):
        """(status, unit rows, float64 norms) of rows (C, D): margin_softmax_normalise (K11)."""
        device = self.device
        unit, norms = device.empty_like(rows), device.empty((rows.shape[0],), device.float64)
        status = self._call("margin_softmax_normalise_forward", rows.dtype, *map(self.pointer, (rows, unit, norms)),
                            rows.shape[0], rows.shape[1], None)
        return status, unit, norms

    def normalise_backward(self, grad_unit, unit, norms, grad_norm=None):
        """(status, gradient of the rows) from the unit rows' gradient and the norms' (default 0)."""
        grad_rows = self.device.empty_like(unit)
        scratch = self.device.empty((self.library.margin_softmax_normalise_scratch_bytes(),), self.device.uint8)
        status = self._call("margin_softmax_normalise_backward", unit.dtype,
                            *map(self.pointer, (grad_unit, grad_norm, unit, norms, grad_rows)),
                            unit.shape[0], unit.shape[1], self.pointer(scratch), None)
        return status, grad_rows

    def forward(self, x, w, label, step, settings, class_margins=None, training=None):
        """x (N, D), w (C, D), label (N,) int64, step (1,): arrays of ``device`` of one float dtype;
        class_margins (C,) of that dtype with settings ``per_class_margin`` (cosface), else None;
        training (1,) float32, the op's flag (1 training, 0 not: the plain logits), or None
        (training).

        Returns (status, saved, out) with ``saved`` what ``backward`` needs;
        ``step`` is advanced on success while training.
        """
        device = self.device
        rows, dims, classes = x.shape[0], x.shape[1], w.shape[0]
        unit = unit_norms = None
        if KINDS[settings_kind(settings)].normalise_weights:
            status, unit, unit_norms = self.normalise(w)
            if status != SUCCESS:
                return status, None, None
        classifier = w if unit is None else unit
        logits = x @ classifier.T
        out, beta_used = device.empty_like(logits), device.empty((1,), dtype=x.dtype)
        data_norm, weight_norm = device.empty((rows,), device.float64), device.empty((classes,), device.float64)
        text = settings_text(settings)
        scratch = self._scratch(rows, classes)
        status = self._call(
            "margin_softmax_forward", x.dtype,
            *map(self.pointer, (logits, x, None if unit is not None else w, unit_norms, label, step, training,
                                class_margins, out, beta_used, data_norm, weight_norm)),
            rows, classes, dims, text, self.pointer(scratch), None)
        saved = dict(logits=logits, x=x, w=w, classifier=classifier, unit_norms=unit_norms,
                     label=label, training=training, class_margins=class_margins, out=out, beta_used=beta_used,
                     data_norm=data_norm, weight_norm=weight_norm, text=text)
        return status, saved, out

    def backward(self, grad, saved):
        """The full layer's (status, grad_data, grad_weight) for the output gradient ``grad``."""
        device = self.device
        x, w, classifier, unit_norms = saved["x"], saved["w"], saved["classifier"], saved["unit_norms"]
        rows, dims, classes = x.shape[0], x.shape[1], w.shape[0]
        grad_logits, grad_data = device.empty_like(saved["logits"]), device.empty_like(x)
        grad_weight = None if unit_norms is not None else device.empty_like(w)
        scratch = self._scratch(rows, classes)  # held until the call returns (NumPy frees at once)
        status = self._call(
            "margin_softmax_backward", x.dtype,
            *map(self.pointer, (grad, saved["logits"], x, None if grad_weight is None else w, saved["label"],
                                saved["training"], saved["class_margins"], saved["out"], saved["beta_used"],
                                saved["data_norm"], saved["weight_norm"], grad_logits, grad_data, grad_weight)),
            rows, classes, dims, saved["text"], self.pointer(scratch), None)
        if status != SUCCESS:
            return status, None, None
        # The product path (cuBLAS) plus the kernels' norm paths, as MXNet sums them.
        grad_classifier = grad_logits.T @ x
        if grad_weight is None:  # unit rows: the whole weight gradient through (K11)
            status, grad_weight = self.normalise_backward(grad_classifier, classifier, unit_norms)
        else:
            grad_weight = grad_classifier + grad_weight
        return status, grad_logits @ classifier + grad_data, grad_weight
