"""The one builder of the layer's graphs: training (either backend), inference and export.

``build(F, ...)`` works with ``F = mx.sym`` (Symbol graphs, Gluon's
hybridized forward, ``export``, the compiled backend's cached graph) and
``F = mx.nd`` (imperative calls). Every caller goes through it, so the
training graph and the plain graph of a kind are written once.
"""
from .kinds import MarginSettings

__all__ = ["build", "COMPILED_OP"]

COMPILED_OP = "margin_softmax_target"  # registered by the library (src/operator/margin_softmax.cc)


def _normalised_rows(F, rows, scale=None):
    """rows / |rows| row-wise (times ``scale``), with zero rows kept at 0 (K9).

    Only stock operators: the plain graph of a normalised kind loads into an
    MXNet without mx_lsoftmax.
    """
    norms = F.norm(rows, axis=1, keepdims=True)
    inverse = 1.0 / (norms + (norms == 0))
    if scale is not None:
        inverse = inverse * scale
    # A same-shape product, not broadcast_div: shape inference then runs both ways, so a
    # weight variable without a declared shape gets it from FullyConnected.
    return F.elemwise_mul(rows, F.broadcast_like(inverse, rows))


def build(F, data, weight, label, step, num_classes, settings, backend, name, class_margins=None):
    """The layer's output (N, C).

    label None: the plain logits of the kind (K2), stock operators only.
    Otherwise the training output (K3) of ``backend`` ('python' or 'compiled'),
    advancing ``step`` (the schedule's auxiliary state); ``class_margins`` (C,) is
    the extra input of settings with ``per_class_margin`` (K10).
    """
    if not isinstance(settings, MarginSettings):
        raise TypeError("settings must be a MarginSettings")
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
    logits = F.FullyConnected(data, weight, no_bias=True, num_hidden=num_classes, name=f"{name}_fc")
    return getattr(F, COMPILED_OP)(logits, data, weight, label, step, *extra, name=name, **attrs)[0]
