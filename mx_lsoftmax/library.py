"""Loading the compiled op library: the one place that knows where it lives.

``make`` builds ``mx_lsoftmax/lib/liblsoftmax.so`` (CPU) and ``make cuda``
``mx_lsoftmax/lib/liblsoftmax_cuda.so`` (CPU + GPU); ``pip install .`` builds
the CPU one into the installed package. ``$MX_LSOFTMAX_LIBRARY`` overrides
the search. Loading registers ``margin_softmax_target`` (every kind) and
``margin_softmax_normalise`` (unit weight rows, K11) in ``mx.nd`` and ``mx.sym``.
"""
import os
import threading

import mxnet as mx

__all__ = ["LibraryMissingError", "load", "is_loaded", "library_path", "require"]

_LIBRARY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
_CANDIDATES = ("liblsoftmax_cuda.so", "liblsoftmax.so")
_lock = threading.Lock()
_state = {"path": None, "error": None, "tried": False}

BUILD_HINT = ("build it with `make` (CPU) or `make cuda` (CPU + GPU) in the mx-lsoftmax checkout, "
              "or reinstall with `pip install .`")


class LibraryMissingError(RuntimeError):
    """The compiled op was asked for but is not built or does not load."""


def library_path():
    """The library file that ``load`` would use, or None when none is built."""
    override = os.environ.get("MX_LSOFTMAX_LIBRARY")
    if override:
        return os.path.abspath(override)
    for name in _CANDIDATES:
        path = os.path.join(_LIBRARY_DIR, name)
        if os.path.exists(path):
            return path
    return None


def load():
    """Load the library once per process; return its path or None (reason kept for ``require``).

    A GPU-enabled build is preferred: it runs its CPU path in a CPU-only MXNet too.
    """
    with _lock:
        if _state["tried"]:
            return _state["path"]
        _state["tried"] = True
        path = library_path()
        if path is None:
            _state["error"] = f"the compiled L-Softmax library is not built: {BUILD_HINT}"
            return None
        if not os.path.exists(path):
            _state["error"] = f"the compiled L-Softmax library {path} does not exist: {BUILD_HINT}"
            return None
        try:
            mx.library.load(path, verbose=False)
        except Exception as error:  # an MXNetError from a mismatched build, an OSError, ...
            _state["error"] = (f"the compiled L-Softmax library {path} failed to load into MXNet "
                               f"{mx.__version__} ({error}); rebuild it against this MXNet: "
                               f"`make clean && make`")
            return None
        _state["path"] = path
        return path


def is_loaded():
    return load() is not None


def require():
    """Return the loaded library's path or raise LibraryMissingError with the build command."""
    path = load()
    if path is None:
        raise LibraryMissingError(_state["error"])
    return path
