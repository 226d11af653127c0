"""The entry points: ``margin_logits`` (every kind) and ``lsoftmax``, dispatching between backends.

backend='python'   the CustomOp ``MarginSoftmax`` (products by MXNet's FullyConnected and its backward
                   inside the op, target column by NDArray element-wise ops);
backend='compiled' FullyConnected composed with the library ops ``margin_softmax_target``
                   and, for the kinds that normalise weights, ``margin_softmax_normalise``
                   (the products stay in MXNet's FullyConnected, the library ops fuse
                   the O(N C + N D + C D) rest);
backend='auto'     'compiled' when the library is loaded, else 'python'.

Validation lives here, once for every caller: settings (``MarginSettings``),
shapes, dtypes and labels, each error naming the input and the value.
"""
import functools

import mxnet as mx
import numpy as np

from . import graph, library
from .arrays import accepts_numpy_interface
from .kinds import MarginSettings
from .op import FLOAT, check_labels

__all__ = ["margin_logits", "lsoftmax", "inference_symbol", "resolve_backend", "new_step", "ldam_margins",
           "BACKENDS", "check_num_classes", "check_batch", "check_inputs", "check_input_types", "check_class_margins",
           "margin_settings"]

BACKENDS = ("auto", "python", "compiled")


def resolve_backend(backend):
    """'auto' -> 'compiled' if the library loads, else 'python'; errors name the value."""
    if backend not in BACKENDS:
        raise ValueError(f"margin softmax parameter backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "compiled" if library.is_loaded() else "python"
    if backend == "compiled":
        library.require()
    return backend


def new_step(ctx=None, dtype="float32", start=0):
    """A schedule counter NDArray (1,) to pass as ``step=``: the training forwards done so far."""
    return mx.nd.full((1,), start, ctx=ctx or mx.current_context(), dtype=dtype)


def check_num_classes(num_hidden):
    if isinstance(num_hidden, bool) or not isinstance(num_hidden, (int, np.integer)) or num_hidden < 1:
        raise ValueError(f"margin softmax parameter num_hidden must be a positive integer, got {num_hidden!r}")
    return int(num_hidden)


def check_batch(data):
    """An empty batch is refused before anything is allocated or cached, so later calls are
    unharmed: MXNet 1.9.1 cannot run FullyConnected (nor nn.Dense) on N = 0 either."""
    if data.ndim >= 1 and data.shape[0] == 0:
        raise ValueError(f"margin softmax input data is an empty batch (shape {data.shape}): MXNet 1.9.1's "
                         f"FullyConnected cannot run on N = 0 either; skip empty batches")


def check_input_types(reason="as data is", **inputs):
    """Every given input an NDArray (legacy or ``mx.np``), or every one a Symbol, as ``data``
    is (None inputs left out); ``reason`` None: Symbols only. TypeError naming the input and
    the type it got."""
    symbolic = reason is None or isinstance(inputs["data"], mx.sym.Symbol)
    wanted, what = (mx.sym.Symbol, "a Symbol") if symbolic else (mx.nd.NDArray, "an NDArray")
    for name, value in inputs.items():
        if value is None or isinstance(value, wanted):
            continue
        got = f"{type(value).__module__}.{type(value).__name__}"
        if not isinstance(value, (mx.sym.Symbol, mx.nd.NDArray)):
            hint = " (convert with mx.nd.array)" if isinstance(value, (np.ndarray, list, tuple)) else ""
            raise TypeError(f"margin softmax input {name} must be an MXNet NDArray or Symbol, got {got}{hint}")
        because = (f", {reason}" if reason else
                   " (inference_symbol builds a graph; for NDArrays, margin_logits gives the plain logits "
                   "outside autograd.record())")
        raise TypeError(f"margin softmax input {name} must be {what}{because}, got {got}")


def _check_arrays(data, weight, label, num_classes):
    """Shapes and dtypes; ``weight`` None (not known yet: deferred init) skips its checks."""
    if data.ndim != 2:
        raise ValueError(f"margin softmax input data must be 2-D (N, D), got shape {data.shape}")
    check_batch(data)
    if np.dtype(data.dtype).name not in FLOAT:
        raise ValueError(f"margin softmax input data must be float32 or float64, got {np.dtype(data.dtype).name}")
    if label is not None and label.shape != (data.shape[0],):
        raise ValueError(f"margin softmax input label must have shape (N,) = ({data.shape[0]},), "
                         f"got {label.shape}")
    if weight is None:
        return
    if weight.shape != (num_classes, data.shape[1]):
        raise ValueError(f"margin softmax input weight must have shape (num_hidden, D) = "
                         f"{(num_classes, data.shape[1])}, got {weight.shape}")
    if weight.dtype != data.dtype:
        raise ValueError(f"margin softmax input weight must have the dtype of data "
                         f"({np.dtype(data.dtype).name}), got {np.dtype(weight.dtype).name}")


def margin_settings(kind, settings, per_class, role):
    """``MarginSettings`` of ``kind``; with ``per_class`` (class margins given as an ``role``,
    'input' or 'parameter'), switched to per-class margins, or an error naming the kind."""
    if per_class:
        if "per_class_margin" not in MarginSettings(kind).values:
            raise ValueError(f"margin softmax {role} class_margins: kind {kind!r} takes one margin for every "
                             f"class (per-class margins: kind 'cosface')")
        settings = dict(settings, per_class_margin=True)
    return MarginSettings(kind, **settings)


def check_class_margins(class_margins, num_classes, dtype):
    """Per-class margins (C,): the dtype of data, finite and >= 0; ValueError naming the value."""
    if tuple(class_margins.shape) != (num_classes,):
        raise ValueError(f"margin softmax input class_margins must have shape (num_hidden,) = ({num_classes},), "
                         f"got {tuple(class_margins.shape)}")
    if class_margins.dtype != dtype:
        raise ValueError(f"margin softmax input class_margins must have the dtype of data "
                         f"({np.dtype(dtype).name}), got {np.dtype(class_margins.dtype).name}")
    values = class_margins.asnumpy()
    bad = ~(np.isfinite(values) & (values >= 0))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"margin softmax input class_margins must be finite and >= 0, "
                         f"got class_margins[{index}] = {values[index]!r}")


def ldam_margins(class_counts, max_margin=0.5):
    """LDAM's per-class margins (Cao et al., NeurIPS 2019): m_j proportional to n_j^(-1/4),
    scaled so that the largest (the rarest class's) is ``max_margin``.

    class_counts : sequence of C training-sample counts, each >= 1.
    Returns a float64 numpy array (C,); pass it (as an NDArray of the data's dtype) as
    ``class_margins`` of the cosface kind, with the paper's s = 30.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or not np.all(np.isfinite(counts)) or np.any(counts < 1):
        raise ValueError(f"ldam_margins: class_counts must be C >= 1 counts, each >= 1, got {class_counts!r}")
    if not (np.isfinite(max_margin) and max_margin > 0):
        raise ValueError(f"ldam_margins: max_margin must be > 0, got {max_margin!r}")
    quarter = counts ** -0.25
    return quarter * (max_margin / quarter.max())


def check_inputs(data, weight, label, num_classes):
    """Shapes, dtypes and labels of a call (weight None: not known yet; label None: a plain
    call, nothing to check); ValueError naming the input and the value. Reads the labels on
    the host once and returns them (int64), or None without labels."""
    _check_arrays(data, weight, label, num_classes)
    return None if label is None else check_labels(label, num_classes)


@accepts_numpy_interface
def margin_logits(data, weight, label, num_hidden, kind="lsoftmax", backend="auto", step=None,
                  name=None, class_margins=None, weight_grad_req="write", **settings):
    """Margin-softmax logits of any kind, for NDArrays or Symbols.

    Parameters
    ----------
    data : NDArray or Symbol, (N, D) float32/float64 features.
    weight : NDArray or Symbol, (C, D), FullyConnected layout, no bias; the raw parameter
        (the normalised kinds normalise it inside the layer, with the exact gradient).
    label : NDArray or Symbol, (N,) class indices in [0, C) (float or integer dtype);
        None: the plain logits (a Symbol: the plain graph, as ``inference_symbol``).
    num_hidden : int, the number of classes C.
    kind : 'lsoftmax' (default), 'sphereface', 'cosface', 'arcface' or 'combined'.
    backend : 'auto' (default), 'python' or 'compiled'.
    step : the schedule counter t, shape (1,), dtype of data; the op reads it and
        advances it by one on every training forward. NDArrays: pass one made by
        ``new_step`` to carry the schedule across calls (default: a fresh zero).
        Symbols: default a variable ``{name}_step`` initialised to zero, an
        auxiliary state of the graph (saved with Module checkpoints).
    name : str, the name prefix of a Symbol graph (default the kind's name).
    class_margins : NDArray or Symbol (C,), dtype of data: the margin of each class (K10),
        for kinds that take per-class margins (cosface; LDAM's margins, see ``ldam_margins``);
        replaces the ``margin`` setting. Default None: one margin for every class.
    weight_grad_req : 'write' (default) or 'add': 'add' where the weight's gradient is summed
        into rather than written, as MXNet's grad_req 'add' does (gradient accumulation), or
        where several heads share the weight. The compiled layer then reads the weight through
        a copy, whose backward adds: a library op cannot add (lib_api passes it no request),
        and MXNet would ask the layer's op to. Gluon blocks pass their weight's ``grad_req``.
    **settings : the kind's settings (``mx_lsoftmax.kinds.SETTINGS``; defaults per kind in
        ``mx_lsoftmax.kinds.KINDS``): margin, s, easy_margin, m1, m2, m3, and the schedule
        beta, beta_min, scale, gamma, power. A setting the kind does not take is an error.

    Returns
    -------
    NDArray (N, C): training logits when autograd is recording in training mode,
    else the plain logits of the kind. Symbol (N, C): the training graph; build
    the plain graph with ``inference_symbol``. NumPy-interface inputs (``mx.np``
    arrays, ``mx.sym.np`` symbols) give a NumPy-interface output.

    Notes
    -----
    With NDArrays and the compiled backend, the layer runs as a cached graph
    with static memory (one per shape, dtype and setting; the last four are
    kept with their buffers), which is what makes repeated imperative calls as
    fast as a bound executor on MXNet 1.9.1's unpooled CPU memory.
    """
    num_classes = check_num_classes(num_hidden)
    if weight_grad_req not in ("write", "add"):
        raise ValueError(f"margin softmax parameter weight_grad_req must be 'write' or 'add', "
                         f"got {weight_grad_req!r}")
    check_input_types(data=data, weight=weight, label=label, step=step, class_margins=class_margins)
    parsed = margin_settings(kind, settings, class_margins is not None, "input")
    backend = resolve_backend(backend)
    name = name or kind
    if isinstance(data, mx.sym.Symbol):
        if step is None:
            step = mx.sym.Variable(f"{name}_step", shape=(1,), init=mx.init.Zero())
        return graph.build(mx.sym, data, weight, label, step, num_classes, parsed, backend, name,
                           class_margins, weight_grad_req)
    if label is None or not mx.autograd.is_training():
        check_inputs(data, weight, None, num_classes)
        return graph.build(mx.nd, data, weight, None, None, num_classes, parsed, backend, name)
    check_inputs(data, weight, label, num_classes)
    if class_margins is not None:
        check_class_margins(class_margins, num_classes, data.dtype)
    if step is None:
        step = new_step(data.context, data.dtype)
    elif step.shape != (1,) or step.dtype != data.dtype:
        raise ValueError(f"margin softmax input step must have shape (1,) and the dtype of data, "
                         f"got shape {step.shape} dtype {np.dtype(step.dtype).name}")
    if backend == "python":
        return graph.build(mx.nd, data, weight, label, step, num_classes, parsed, backend, name,
                           class_margins)
    cached = _static_graph(num_classes, parsed, data.shape, np.dtype(data.dtype).name,
                           np.dtype(label.dtype).name, data.context, weight_grad_req)
    return cached(data, weight, label, step, *([] if class_margins is None else [class_margins]))


def lsoftmax(data, weight, label, num_hidden, margin=2, beta=0.0, beta_min=0.0, scale=1.0,
             gamma=0.0, power=1.0, backend="auto", step=None, name=None, weight_grad_req="write"):
    """Large-Margin Softmax logits (Liu et al., ICML 2016): ``margin_logits`` with kind 'lsoftmax'.

    margin : int >= 1, the angular margin m. Default 2.
    beta, beta_min, scale, gamma, power : the schedule
        beta_t = max(beta_min, beta scale^t (1 + gamma t)^-power), t = training forwards
        so far. Defaults 0, 0, 1, 0, 1 (constant beta = 0: pure L-Softmax).
    The rest as ``margin_logits``; ``name`` defaults to 'lsoftmax'.
    """
    return margin_logits(data, weight, label, num_hidden, "lsoftmax", backend=backend, step=step,
                         name=name, weight_grad_req=weight_grad_req, margin=margin, beta=beta,
                         beta_min=beta_min, scale=scale, gamma=gamma, power=power)


@functools.lru_cache(maxsize=4)
def _static_graph(num_classes, settings, data_shape, dtype, label_dtype, context, weight_grad_req):
    """The compiled layer as a CachedOp with static memory, one per shape and setting.

    Called op by op, FullyConnected and the library op would get fresh buffers
    on every call (MXNet 1.9.1 does not pool CPU memory), and the first-touch
    page faults of the (N, C) copies and of the dense (C, D) weight gradient
    that a lib_api op must write cost 10-30% of the layer at C = 10^4-10^5
    (docs/performance.md). A CachedOp with static_alloc keeps its internal
    buffers across calls, as a bound executor does; its outputs and the input
    gradients are still fresh arrays, so nothing a caller holds is overwritten
    (tests/test_lsoftmax_modes.py). Four entries cover a training loop's full
    and last batches and an evaluation shape or two; each holds its buffers.
    """
    inputs = [mx.sym.var(name) for name in ("data", "weight", "label", "step")]
    class_margins = mx.sym.var("class_margins") if settings.values.get("per_class_margin") else None
    symbol = graph.build(mx.sym, *inputs, num_classes, settings, "compiled", settings.kind, class_margins,
                         weight_grad_req)
    return mx.nd.CachedOp(symbol, flags=[("static_alloc", True), ("static_shape", True)])


@accepts_numpy_interface
def inference_symbol(data, weight, num_hidden, kind="lsoftmax", name=None, **settings):
    """The plain-logit graph of a kind (K2), sharing ``weight`` with a training graph.

    Stock MXNet operators only: it runs (and exports) without mx_lsoftmax.
    ``settings`` as ``margin_logits``; only ``s`` changes the plain logits.
    """
    check_input_types(reason=None, data=data, weight=weight)
    parsed = MarginSettings(kind, **settings)
    return graph.build(mx.sym, data, weight, None, None, check_num_classes(num_hidden), parsed,
                       "python", name or kind)
