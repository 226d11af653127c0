"""``mx_lsoftmax.lsoftmax``: the one entry point, dispatching between backends.

backend='python'   the CustomOp ``LSoftmax`` (products by MXNet's dot/FullyConnected
                   inside the op, target column by NDArray element-wise ops);
backend='compiled' FullyConnected composed with the library op ``lsoftmax_target``
                   (the products stay in MXNet's FullyConnected, the library op fuses
                   the O(N D) target-column step);
backend='auto'     'compiled' when the library is loaded, else 'python'.
"""
import functools

import mxnet as mx
import numpy as np

from . import library
from .op import check_labels
from .schedule import LSoftmaxParams

__all__ = ["lsoftmax", "resolve_backend", "new_step", "BACKENDS"]

BACKENDS = ("auto", "python", "compiled")


def resolve_backend(backend):
    """'auto' -> 'compiled' if the library loads, else 'python'; errors name the value."""
    if backend not in BACKENDS:
        raise ValueError(f"L-Softmax parameter backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "compiled" if library.is_loaded() else "python"
    if backend == "compiled":
        library.require()
    return backend


def new_step(ctx=None, dtype="float32", start=0):
    """A schedule counter NDArray (1,) to pass as ``step=``: the training forwards done so far."""
    return mx.nd.full((1,), start, ctx=ctx or mx.current_context(), dtype=dtype)


def _check_arrays(data, weight, label, num_classes):
    if data.ndim != 2:
        raise ValueError(f"L-Softmax input data must be 2-D (N, D), got shape {data.shape}")
    if weight.shape != (num_classes, data.shape[1]):
        raise ValueError(f"L-Softmax input weight must have shape (num_hidden, D) = "
                         f"{(num_classes, data.shape[1])}, got {weight.shape}")
    if label.shape != (data.shape[0],):
        raise ValueError(f"L-Softmax input label must have shape (N,) = ({data.shape[0]},), "
                         f"got {label.shape}")
    if np.dtype(data.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"L-Softmax input data must be float32 or float64, got {np.dtype(data.dtype).name}")
    if weight.dtype != data.dtype:
        raise ValueError(f"L-Softmax input weight must have the dtype of data ({np.dtype(data.dtype).name}), "
                         f"got {np.dtype(weight.dtype).name}")


def _check_num_classes(num_hidden):
    if isinstance(num_hidden, bool) or not isinstance(num_hidden, (int, np.integer)) or num_hidden < 1:
        raise ValueError(f"L-Softmax parameter num_hidden must be a positive integer, got {num_hidden!r}")
    return int(num_hidden)


def lsoftmax(data, weight, label, num_hidden, margin=2, beta=0.0, beta_min=0.0, scale=1.0,
             gamma=0.0, power=1.0, backend="auto", step=None, name=None):
    """Large-Margin Softmax logits (Liu et al., ICML 2016) for NDArrays or Symbols.

    Parameters
    ----------
    data : NDArray or Symbol, (N, D) float32/float64 features.
    weight : NDArray or Symbol, (C, D), FullyConnected layout, no bias.
    label : NDArray or Symbol, (N,) class indices in [0, C) (float or integer dtype).
    num_hidden : int, the number of classes C.
    margin : int >= 1, the angular margin m. Default 2.
    beta, beta_min, scale, gamma, power : the schedule
        beta_t = max(beta_min, beta scale^t (1 + gamma t)^-power), t = training forwards
        so far. Defaults 0, 0, 1, 0, 1 (constant beta = 0: pure L-Softmax).
    backend : 'auto' (default), 'python' or 'compiled'.
    step : the schedule counter t, shape (1,), dtype of data; the op reads it and
        advances it by one on every training forward. NDArrays: pass one made by
        ``new_step`` to carry the schedule across calls (default: a fresh zero, so
        beta stays at its initial value). Symbols: default a variable
        ``{name}_step`` initialised to zero, an auxiliary state of the graph
        (saved with Module checkpoints).
    name : str, the name prefix of a Symbol graph (default 'lsoftmax').

    Notes
    -----
    With NDArrays and the compiled backend, the layer runs as a cached graph
    with static memory (one per shape, dtype and setting; the last four are
    kept with their buffers), which is what makes repeated imperative calls as
    fast as a bound executor on MXNet 1.9.1's unpooled CPU memory.

    Returns
    -------
    NDArray (N, C): margin logits when autograd is recording in training mode,
    else the plain logits x W^T. Symbol (N, C): the training graph (margin
    logits); build the inference graph with ``inference_symbol``.
    """
    num_classes = _check_num_classes(num_hidden)
    params = LSoftmaxParams(margin=margin, beta=beta, beta_min=beta_min, scale=scale,
                            gamma=gamma, power=power)
    backend = resolve_backend(backend)
    if isinstance(data, mx.sym.Symbol):
        return _symbol(data, weight, label, num_classes, params, backend, step, name or "lsoftmax")
    _check_arrays(data, weight, label, num_classes)
    if not mx.autograd.is_training():
        return mx.nd.FullyConnected(data, weight, no_bias=True, num_hidden=num_classes)
    check_labels(label, num_classes)
    if step is None:
        step = new_step(data.context, data.dtype)
    elif step.shape != (1,) or step.dtype != data.dtype:
        raise ValueError(f"L-Softmax input step must have shape (1,) and the dtype of data, "
                         f"got shape {step.shape} dtype {np.dtype(step.dtype).name}")
    if backend == "python":
        return mx.nd.Custom(data, weight, label, step, op_type="LSoftmax", num_hidden=num_classes,
                            **params.as_attrs())
    graph = _static_graph(num_classes, tuple(sorted(params.as_attrs().items())), data.shape,
                          np.dtype(data.dtype).name, np.dtype(label.dtype).name, data.context)
    return graph(data, weight, label, step)


@functools.lru_cache(maxsize=4)
def _static_graph(num_classes, attrs, data_shape, dtype, label_dtype, context):
    """The compiled layer as a CachedOp with static memory, one per shape and setting.

    Called op by op, FullyConnected and lsoftmax_target would get fresh buffers
    on every call (MXNet 1.9.1 does not pool CPU memory), and the first-touch
    page faults of the (N, C) copies and of the dense (C, D) weight gradient
    that a lib_api op must write cost 10-30% of the layer at C = 10^4-10^5
    (docs/performance.md). A CachedOp with static_alloc keeps its internal
    buffers across calls, as a bound executor does; its outputs and the input
    gradients are still fresh arrays, so nothing a caller holds is overwritten
    (tests/test_lsoftmax_modes.py). Four entries cover a training loop's full
    and last batches and an evaluation shape or two; each holds its buffers.
    """
    data, weight = mx.sym.var("data"), mx.sym.var("weight")
    label, step = mx.sym.var("label"), mx.sym.var("step")
    logits = mx.sym.FullyConnected(data=data, weight=weight, no_bias=True, num_hidden=num_classes)
    graph = mx.sym.lsoftmax_target(logits, data, weight, label, step, **dict(attrs))[0]
    return mx.nd.CachedOp(graph, flags=[("static_alloc", True), ("static_shape", True)])


def _symbol(data, weight, label, num_classes, params, backend, step, name):
    if step is None:
        step = mx.sym.Variable(f"{name}_step", shape=(1,), init=mx.init.Zero())
    if backend == "python":
        return mx.sym.Custom(data=data, weight=weight, label=label, step=step, op_type="LSoftmax",
                             num_hidden=num_classes, name=name, **params.as_attrs())
    logits = mx.sym.FullyConnected(data=data, weight=weight, no_bias=True, num_hidden=num_classes,
                                   name=f"{name}_fc")
    return mx.sym.lsoftmax_target(logits, data, weight, label, step, name=name,
                                  **params.as_attrs())[0]


def inference_symbol(data, weight, num_hidden, name="lsoftmax"):
    """The plain-logit graph x W^T sharing ``weight`` with a training graph."""
    return mx.sym.FullyConnected(data=data, weight=weight, no_bias=True,
                                 num_hidden=_check_num_classes(num_hidden), name=f"{name}_fc")
