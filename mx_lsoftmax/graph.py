"""The one builder of the layer's graphs: training (either backend), inference and export.

``build(F, ...)`` works with ``F = mx.sym`` (Symbol graphs, Gluon's
hybridized forward, ``export``, the compiled backend's cached graph) and
``F = mx.nd`` (imperative calls). Every caller goes through it, so the
training graph and the plain graph of a kind are written once.
"""
import itertools

import mxnet as mx

from .arrays import accepts_numpy_interface, unknown_size
from .kinds import MarginSettings

__all__ = ["build", "COMPILED_OP", "COMPILED_NORMALISE_OP"]

# Registered by the library (src/operator/margin_softmax.cc).
COMPILED_OP = "margin_softmax_target"
COMPILED_NORMALISE_OP = "margin_softmax_normalise"


def _normalised_rows(F, rows, scale=None):
    """rows / |rows| row-wise (times ``scale``), with zero rows kept at 0 (K9).

    Only stock operators: the plain graph of a normalised kind loads into an
    MXNet without mx_lsoftmax.
    """
    norms = F.norm(rows, axis=1, keepdims=True)
    # A division by the norm, not a product with its reciprocal: 1 / |rows| overflows for a
    # subnormal norm (below 2.9e-39 in float32), and inf times the row gave NaN logits, where
    # the quotient of two small numbers is exact. A same-shape operator, not broadcast_div:
    # shape inference then runs both ways, so a weight variable without a declared shape
    # gets it from FullyConnected.
    unit = F.elemwise_div(rows, F.broadcast_like(norms + (norms == 0), rows))
    return unit if scale is None else unit * scale


# Makes every copy of _adding_copy distinct (see there).
_COPY_NUMBERS = itertools.count()


def _adding_copy(F, array, name):
    """A copy of ``array`` to give a library op, so that MXNet adds the op's gradient into
    ``array``'s through the copy's backward (a stock op that honours add requests): lib_api
    passes a library op no write/add request, and one asked to add would overwrite.

    Each copy gets an attribute of its own: MXNet 1.9.1 merges equal nodes on equal inputs
    (its common-expression pass), and copies of one array for several heads would become one
    copy read by all their ops, back in the sum that the copies are there to keep them out of.
    """
    if F is mx.sym:
        return F.identity(array, name=name, attr={"__mx_lsoftmax_copy__": str(next(_COPY_NUMBERS))})
    return F.identity(array)


def _declare_shape(symbol, shape):
    """Give a variable declared without a shape the one the layer implies (0: any size).

    The library ops cannot take an input's shape from their outputs (lib_api
    passes them only the inputs'), and MXNet 1.9.1's lib_api bridge sizes its
    copy of the input shapes by their ranks, counting an unknown rank as -1:
    an input of unknown rank makes it write past the end of that copy. With
    the rank declared, the ops fill in the sizes themselves. ``shape`` writes an
    unknown size as 0, as legacy shapes do.
    """
    if symbol.get_children() is None and symbol.attr("__shape__") is None:
        symbol._set_attr(__shape__=str(tuple(size or unknown_size() for size in shape)))


class _NamedAfterLayer(mx.name.NameManager):
    """Names the operators the layer creates without a name (``1.0 / norms``, ...) after the
    layer, ``{name}_{operator}N``, through the name manager in force (Gluon's block prefix):
    exports, summaries and profiles then show them under the layer, not as ``_plus0``."""

    def __init__(self, name):
        super().__init__()
        self._layer = name

    def get(self, name, hint):
        return self._old_manager.get(name, hint if name else f"{self._layer}_{hint}")


@accepts_numpy_interface
def build(F, data, weight, label, step, num_classes, settings, backend, name, class_margins=None,
          weight_grad_req="write"):
    """The layer's output (N, C).

    label None: the plain logits of the kind (K2), stock operators only.
    Otherwise the training output (K3) of ``backend`` ('python' or 'compiled'),
    advancing ``step`` (the schedule's auxiliary state); ``class_margins`` (C,) is
    the extra input of settings with ``per_class_margin`` (K10). ``weight_grad_req`` 'add':
    the compiled graph reads the weight through a copy (``margin_logits``).
    Every operator of a Symbol graph is named ``{name}...``. NumPy-interface inputs
    (``mx.np``, ``mx.sym.np``) give a NumPy-interface output.
    """
    if not isinstance(settings, MarginSettings):
        raise TypeError("settings must be a MarginSettings")
    if F is not mx.sym:
        return _build(F, data, weight, label, step, num_classes, settings, backend, name, class_margins,
                      weight_grad_req)
    with _NamedAfterLayer(name):
        return _build(F, data, weight, label, step, num_classes, settings, backend, name, class_margins,
                      weight_grad_req)


def _build(F, data, weight, label, step, num_classes, settings, backend, name, class_margins,
           weight_grad_req):
    row = settings.row
    if label is None:
        features = (_normalised_rows(F, data, settings.s) if row.normalise_features else data)
        classifier = _normalised_rows(F, weight) if row.normalise_weights else weight
        return F.FullyConnected(features, classifier, no_bias=True, num_hidden=num_classes,
                                name=f"{name}_fc")
    attrs = settings.as_attrs()
    extra = [class_margins] if settings.values.get("per_class_margin") else []
    if bool(extra) != (class_margins is not None):
        raise ValueError("margin softmax input class_margins goes with the setting per_class_margin=True")
    if backend == "python":
        return F.Custom(data, weight, label, *extra, step, op_type="MarginSoftmax", num_hidden=num_classes,
                        name=name, **attrs)
    if F is mx.sym:
        _declare_shape(weight, (num_classes, 0))
        if class_margins is not None:
            _declare_shape(class_margins, (num_classes,))
    if weight_grad_req == "add":
        # A (C, D) copy each way, paid only when asked for: MXNet would ask a library op that
        # reads the weight to add its gradient (the normalise op, the weight's only reader where
        # the kind normalises weights, under grad_req 'add'; any reader of a weight shared by
        # enough heads), and a library op cannot (see data below).
        weight = _adding_copy(F, weight, f"{name}_weight")
    if row.normalise_weights:
        # Unit rows into FullyConnected, their norms into the target op (K11): the whole weight
        # gradient then comes back through one op, with no (C, D) sum of two terms. data only
        # gives the op its shape, so none of its (zero) gradient joins data's sum.
        unit_rows = getattr(F, COMPILED_NORMALISE_OP)(weight, F.BlockGrad(data, name=f"{name}_data_shape"),
                                                      num_hidden=num_classes,
                                                      name=f"{name}_normalise")
        classifier, weight_input = unit_rows[0], unit_rows[1]
    else:
        classifier, weight_input = weight, weight
    logits = F.FullyConnected(data, classifier, no_bias=True, num_hidden=num_classes, name=f"{name}_fc")
    # data always reaches the target op through a copy: MXNet asks the last readers of a gradient
    # it sums in place to add theirs, which bound and static graphs do once 8 or more operators
    # read a tensor (MXNET_EXEC_INPLACE_GRAD_SUM_CAP; three weight-normalising heads on one feature
    # make 9). The copy is (N, D), small beside the layer's (N, C) and (C, D) arrays.
    return getattr(F, COMPILED_OP)(logits, _adding_copy(F, data, f"{name}_data"), weight_input, label, step,
                                   _training_flag(F, name), *extra, name=name, **attrs)[0]


def _training_flag(F, name):
    """(1, 1) float32: 1 where MXNet runs the graph for training, 0 where it does not.

    lib_api hands a library op no is_train, and a bound graph runs the same op for Module's
    fit (training) and its score and predict (not): the target op reads this flag to give
    the plain logits and keep the step outside training, as the Python op does. Dropout is
    the stock operator that reads is_train: outside training it passes a one through, in
    training it gives 0 or 1 / (1 - p) = 2, never 1, whichever its random draw.
    """
    # (1, 1), not (1,): mx.viz.print_summary fails on any 1-D intermediate (IndexError).
    one = F.ones(shape=(1, 1), dtype="float32", name=f"{name}_one")
    return F.Dropout(one, p=0.5, name=f"{name}_training_dropout") != 1.0
