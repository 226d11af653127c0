"""MXNet 1.9.1's two array interfaces, met at the layer's boundary.

MXNet 1.9.1 has the legacy ``mx.nd`` / ``mx.sym`` arrays and the NumPy interface
(``mx.np`` arrays and ``mx.sym.np`` symbols, which Gluon hands to blocks after
``npx.set_np()``). Legacy operators, FullyConnected, Custom and the library's
ops among them, refuse NumPy-interface inputs, and a Gluon block in NumPy mode
must return them. The layer is written once, on legacy arrays: its entry points
take either kind (:func:`accepts_numpy_interface`) and give back the caller's.
A legacy view shares memory and autograd history with the array it views, so
the schedule's in-place step and every gradient reach the caller's arrays.
"""
import functools

import mxnet as mx
from mxnet.numpy import ndarray as NumpyArray
from mxnet.symbol.numpy import _Symbol as NumpySymbol

__all__ = ["is_numpy_interface", "legacy", "accepts_numpy_interface", "on_legacy_arrays", "unknown_size"]


def is_numpy_interface(value):
    """True for an ``mx.np`` array or an ``mx.sym.np`` symbol."""
    return isinstance(value, (NumpyArray, NumpySymbol))


def legacy(value):
    """The legacy view of a NumPy-interface array or symbol; anything else as it is."""
    return value.as_nd_ndarray() if is_numpy_interface(value) else value


def accepts_numpy_interface(function):
    """Let ``function``, written for legacy arrays, take NumPy-interface ones: its array
    arguments are viewed as legacy and its result is given back in the NumPy interface
    when any argument came in it."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if not any(is_numpy_interface(value) for value in (*args, *kwargs.values())):
            return function(*args, **kwargs)
        result = function(*map(legacy, args), **{key: legacy(value) for key, value in kwargs.items()})
        return result.as_np_ndarray()
    return wrapper


def on_legacy_arrays(method):
    """Run a CustomOp's ``forward`` / ``backward`` on legacy views of its arrays: MXNet hands
    a CustomOp NumPy-interface arrays when it was registered under ``npx.set_np()`` (the
    package imported after it), and its outputs and gradients are written through the views."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        def viewed(value):
            return list(map(legacy, value)) if isinstance(value, list) else value
        return method(self, *map(viewed, args), **{key: viewed(value) for key, value in kwargs.items()})
    return wrapper


def unknown_size():
    """The size MXNet's shape inference reads as not known yet: 0 in legacy shapes, -1
    under NumPy shape semantics (``npx.set_np()``), where 0 is a real, empty size."""
    return -1 if mx.util.is_np_shape() else 0
