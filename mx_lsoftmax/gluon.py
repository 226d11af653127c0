"""Gluon blocks: drop-ins for ``nn.Dense(units, use_bias=False)`` in front of a softmax loss.

``MarginDense`` serves every kind; ``LSoftmaxDense``, ``SphereFaceDense``,
``CosFaceDense``, ``ArcFaceDense`` and ``CombinedMarginDense`` fix the kind.
Their settings and defaults come from the table of kinds (``mx_lsoftmax.kinds``).
"""
import mxnet as mx
from mxnet import autograd
from mxnet.gluon import HybridBlock

from . import graph
from .dispatch import (check_class_margins, check_input_types, check_inputs, check_num_classes, ldam_margins,
                       margin_logits, margin_settings, resolve_backend)
from .kinds import KINDS, SETTINGS

__all__ = ["trainable_parameters", "MarginDense", "LSoftmaxDense", "SphereFaceDense", "CosFaceDense", "ArcFaceDense",
           "CombinedMarginDense", "LDAMDense"]


def trainable_parameters(block):
    """``block.collect_params()`` without the parameters nobody trains (``grad_req`` 'null'):
    what to give ``gluon.Trainer`` when its kvstore is distributed.

    A Trainer puts every parameter it gets into its kvstore and, on a distributed one,
    broadcasts rank 0's values at its first step. The margin blocks' ``step`` counter is
    advanced by the op itself, outside the engine's view for the Python backend, so that
    broadcast can land after the op's own write and set the schedule back; the counter needs
    no exchange anyway, since every worker takes the same steps.
    """
    return {name: parameter for name, parameter in block.collect_params().items() if parameter.grad_req != "null"}


class MarginDense(HybridBlock):
    """Margin-softmax classifier layer of any kind (docs/derivatives.md, K1-K9).

    ``block(x, label)`` while ``autograd.record()`` trains gives the training
    logits (N, units): the kind's plain logits with the target column replaced
    by the margin target. ``block(x)``, or any call outside training, gives the
    kind's plain logits (normalised where the kind normalises). Both work
    hybridized or not, in either order, any number of times: plain calls never
    enter the cached graph, which only ever sees (x, label).

    Parameters
    ----------
    units : int, the number of classes C.
    kind : 'lsoftmax', 'sphereface', 'cosface', 'arcface' or 'combined'.
    in_units : int, the feature size D; 0 (default) infers it on the first call.
    backend : 'auto' (default; the compiled op when built), 'python' or 'compiled'.
    weight_initializer : initializer of ``weight``; default the global one.
    dtype : 'float32' (default) or 'float64'.
    class_margins : sequence of C margins, one per class (K10), for kinds that take them
        (cosface; ``LDAMDense`` computes LDAM's from class counts). Default None.
    **settings : the kind's settings (margin, s, easy_margin, m1, m2, m3, beta, beta_min,
        scale, gamma, power); defaults per kind from ``mx_lsoftmax.kinds.KINDS``.

    Parameters of the block: ``weight`` (units, in_units), the raw classifier, and
    ``step`` (1,), the training steps taken so far (not trained, grad_req 'null'),
    so that ``save_parameters``/``load_parameters`` resume the schedule exactly.
    Each device copy advances its own ``step``; all copies take the same steps.
    ``weight.grad_req`` 'add' (gradient accumulation) is passed on to the layer
    (``margin_logits``'s ``weight_grad_req``) whenever the block builds its graph.
    With ``class_margins``, a constant parameter ``class_margins`` (units,) holds them.
    """

    kind = None  # fixed by the subclasses

    def __init__(self, units, kind=None, in_units=0, backend="auto", weight_initializer=None,
                 dtype="float32", class_margins=None, **settings):
        prefix_settings = {key: settings.pop(key) for key in ("prefix", "params") if key in settings}
        super().__init__(**prefix_settings)
        kind = kind or self.kind or "lsoftmax"
        self._units = check_num_classes(units)
        self._in_units = in_units
        self.settings = margin_settings(kind, settings, class_margins is not None, "parameter")
        self.backend = resolve_backend(backend)
        self._graph_weight_grad_req = None  # the weight_grad_req of the cached training graph
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(units, in_units), dtype=dtype,
                                          init=weight_initializer, allow_deferred_init=True)
            self.step = self.params.get("step", shape=(1,), dtype=dtype, init=mx.init.Zero(),
                                        grad_req="null", differentiable=False)
            if class_margins is not None:
                values = mx.nd.array(class_margins, dtype=dtype)
                check_class_margins(values, self._units, values.dtype)
                if mx.util.is_np_array():  # NumPy-mode Gluon keeps NumPy-interface parameters
                    values = values.as_np_ndarray()
                self.class_margins = self.params.get_constant("class_margins", values)

    @property
    def schedule(self):
        """The settings (``MarginSettings``); kept under this name for L-Softmax users."""
        return self.settings

    @property
    def current_beta(self):
        """The beta the next training step will use (from ``step`` on the first context)."""
        if self.backend == "python":
            # The Python op advances ``step`` from MXNet's custom-op thread, a write the engine
            # does not order before other reads of ``step``: let every pushed op finish first.
            mx.nd.waitall()
        return self.settings.beta_at(float(self.step.data(self.step.list_ctx()[0]).asnumpy()[0]))

    def forward(self, x, label=None):
        check_input_types(data=x, label=label)
        plain = label is None or not autograd.is_training()
        if isinstance(x, mx.nd.NDArray):
            # Before the cached graph: an error raised inside a Python CustomOp reaches the
            # caller as an opaque MXNetError, so inputs are checked here, naming input and value.
            # Plain calls too: they hold the training calls' rules (a (N, D) batch of the
            # weight's dtype), though their FullyConnected alone would flatten other shapes.
            if plain or self._active:  # unhybridized training calls are checked by margin_logits
                check_inputs(x, None if self.weight._deferred_init else self.weight.data(x.context),
                             None if plain else label, self._units)
        if plain and isinstance(x, mx.nd.NDArray):
            # Outside the cached graph: a cached graph keeps one argument
            # structure, and inference needs neither the label nor the op.
            if self.weight._deferred_init:
                self.infer_shape(x)
                for parameter in self.params.values():
                    parameter._finish_deferred_init()
            return graph.build(mx.nd, x, self.weight.data(x.context), None, None, self._units,
                               self.settings, self.backend, self.name)
        if self._graph_weight_grad_req not in (None, self._weight_grad_req()):
            # The weight's grad_req changed since this block's graph was built, and the compiled
            # graph depends on it (margin_logits, weight_grad_req): build it again.
            self._clear_cached_op()
        return super().forward(x, label)

    def hybridize(self, active=True, backend=None, clear=True, static_alloc=None, static_shape=None,
                  inline_limit=2, forward_bulk_size=None, backward_bulk_size=None, **backend_options):
        """As ``HybridBlock.hybridize`` (same parameters, in the same order: ``optimize_for``
        passes them by position), but with static memory unless told otherwise.

        ``static_alloc`` and ``static_shape`` default to True here (False in
        Gluon): MXNet 1.9.1 does not pool CPU memory, and without static
        buffers every training call pays first-touch page faults on the (N, C)
        and (C, D) arrays of the layer (docs/performance.md). Outputs and
        gradients are still fresh arrays; another input shape re-plans the graph.
        """
        if backend and self.backend == "compiled":
            # A subgraph backend partitions the cached graph, the training graph only (plain calls
            # never enter it), with passes meant for inference: MKLDNN's removes the Dropout from
            # which the compiled graph learns whether MXNet trains, and the layer would then give
            # plain logits while training, silently.
            raise ValueError(f"{self.__class__.__name__}.hybridize parameter backend={backend!r}: the "
                             f"block's cached graph is its training graph, and a subgraph backend's inference "
                             f"passes would remove what tells the compiled op that MXNet trains; hybridize "
                             f"without a backend (predictions never use the cached graph), or use "
                             f"backend='python' for the layer")
        super().hybridize(active, backend, clear, True if static_alloc is None else static_alloc,
                          True if static_shape is None else static_shape, inline_limit, forward_bulk_size,
                          backward_bulk_size, **backend_options)

    def infer_shape(self, x, label=None, *args):
        self.weight.shape = (self._units, x.shape[1])

    def _weight_grad_req(self):
        return "add" if self.weight.grad_req == "add" else "write"

    def _clear_cached_op(self):
        super()._clear_cached_op()
        self._graph_weight_grad_req = None

    def hybrid_forward(self, F, x, label=None, weight=None, step=None, class_margins=None):
        weight_grad_req = self._weight_grad_req()
        if F is mx.nd and label is not None:  # not hybridized: the entry point and its cached graph
            return margin_logits(x, weight, label, self._units, self.settings.kind, backend=self.backend,
                                 step=step, class_margins=class_margins, weight_grad_req=weight_grad_req,
                                 **self.settings.as_dict())
        if label is not None:
            self._graph_weight_grad_req = weight_grad_req
        return graph.build(F, x, weight, label, step, self._units, self.settings, self.backend, "fwd",
                           class_margins, weight_grad_req)

    def export(self, path, epoch=0, remove_amp_cast=True):
        """Write the inference graph (the kind's plain logits, input ``data``) for
        ``SymbolBlock.imports`` and ``mx.mod.Module``: ``{path}-symbol.json`` and
        ``{path}-{epoch:04d}.params``. Loading them needs MXNet only, not mx_lsoftmax.
        ``remove_amp_cast`` as in ``HybridBlock.export``."""
        # The weight first: a block whose shape is still deferred raises before any file is written.
        weight = self.weight.data(self.weight.list_ctx()[0]).as_in_context(mx.cpu())
        symbol = graph.build(mx.sym, mx.sym.var("data"), mx.sym.var(self.weight.name), None, None,
                             self._units, self.settings, self.backend, self.prefix + "fwd")
        symbol.save(f"{path}-symbol.json", remove_amp_cast=remove_amp_cast)
        # As HybridBlock.export: NumPy mode saves (and SymbolBlock.imports loads) with npx.
        save = mx.npx.save if mx.util.is_np_array() else mx.nd.save
        save(f"{path}-{epoch:04d}.params", {f"arg:{self.weight.name}": weight})
        return f"{path}-symbol.json", f"{path}-{epoch:04d}.params"

    def __repr__(self):
        shape = self.weight.shape
        settings = ", ".join(f"{name}={value}" for name, value in self.settings.values.items()
                             if name in KINDS[self.settings.kind].defaults)
        return (f"{self.__class__.__name__}({shape[1] if shape[1] else None} -> {self._units}, "
                f"{settings}, backend={self.backend})")


def _settings_doc(kind):
    row = KINDS[kind]
    lines = []
    for name, default in {**row.defaults, **row.schedule}.items():
        lines.append(f"    {name} : {SETTINGS[name].description}. Default {default!r}.")
    lines.append("    beta, beta_min, scale, gamma, power : the schedule beta_t = max(beta_min, "
                 "beta scale^t (1 + gamma t)^-power)" + ("; defaults above." if row.schedule else
                                                        "; defaults 0, 0, 1, 0, 1 (no blending)."))
    return "\n".join(lines)


def _fixed_kind(class_name, kind, summary):
    def __init__(self, units, in_units=0, backend="auto", weight_initializer=None, dtype="float32",
                 **settings):
        MarginDense.__init__(self, units, kind, in_units=in_units, backend=backend,
                             weight_initializer=weight_initializer, dtype=dtype, **settings)

    doc = (f"{summary}\n\n    ``MarginDense`` with kind '{kind}': units, in_units, backend, "
           f"weight_initializer, dtype as there.\n\n    Settings\n    --------\n{_settings_doc(kind)}\n")
    return type(class_name, (MarginDense,), {"kind": kind, "__init__": __init__, "__doc__": doc})


LSoftmaxDense = _fixed_kind("LSoftmaxDense", "lsoftmax", "Large-Margin Softmax (Liu et al., ICML 2016).")
SphereFaceDense = _fixed_kind("SphereFaceDense", "sphereface", "SphereFace / A-Softmax (Liu et al., CVPR 2017).")
CosFaceDense = _fixed_kind("CosFaceDense", "cosface", "CosFace / AM-Softmax (Wang et al., CVPR 2018).")
ArcFaceDense = _fixed_kind("ArcFaceDense", "arcface", "ArcFace (Deng et al., CVPR 2019).")
CombinedMarginDense = _fixed_kind("CombinedMarginDense", "combined",
                                  "insightface's combined margin s (cos(m1 theta + m2) - m3).")


class LDAMDense(MarginDense):
    """LDAM (Cao et al., NeurIPS 2019): CosFace with a margin per class, m_j proportional to
    n_j^(-1/4) for the class's training count n_j, the largest ``max_margin``.

    ``MarginDense`` with kind 'cosface' and ``class_margins = ldam_margins(class_counts,
    max_margin)``; the defaults are the paper's code's: max_margin 0.5, s 30.

    Parameters
    ----------
    units : int, the number of classes C.
    class_counts : sequence of C training-sample counts (each >= 1).
    max_margin : float, the rarest class's margin. Default 0.5.
    s : float, the logit scale. Default 30.
    in_units, backend, weight_initializer, dtype, and the schedule (beta, ...) as ``MarginDense``.
    """

    kind = "cosface"

    def __init__(self, units, class_counts, max_margin=0.5, s=30.0, in_units=0, backend="auto",
                 weight_initializer=None, dtype="float32", **settings):
        if len(class_counts) != units:
            raise ValueError(f"LDAMDense parameter class_counts must hold units = {units} counts, "
                             f"got {len(class_counts)}")
        super().__init__(units, "cosface", in_units=in_units, backend=backend,
                         weight_initializer=weight_initializer, dtype=dtype,
                         class_margins=ldam_margins(class_counts, max_margin), s=s, **settings)
