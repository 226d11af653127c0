"""Gluon block: ``LSoftmaxDense``, a drop-in for ``nn.Dense(units, use_bias=False)``."""
import dataclasses

import mxnet as mx
from mxnet import autograd
from mxnet.gluon import HybridBlock

from .dispatch import _check_num_classes, lsoftmax, resolve_backend
from .schedule import LSoftmaxParams

__all__ = ["LSoftmaxDense"]


class LSoftmaxDense(HybridBlock):
    """Large-Margin Softmax classifier layer (Liu et al., ICML 2016).

    ``block(x, label)`` while ``autograd.record()`` trains gives margin logits
    (N, units): the target column of x W^T replaced by the blended L-Softmax
    logit; ``block(x)``, or any call outside training, gives the plain logits
    x W^T. Both work hybridized or not, in either order, any number of times:
    plain calls never enter the cached graph, which only ever sees (x, label).

    Parameters
    ----------
    units : int, the number of classes C.
    in_units : int, the feature size D; 0 (default) infers it on the first call.
    margin : int >= 1, the angular margin m. Default 2.
    beta, beta_min, scale, gamma, power : the schedule
        beta_t = max(beta_min, beta scale^t (1 + gamma t)^-power); defaults 0, 0, 1, 0, 1.
    backend : 'auto' (default; the compiled op when built), 'python' or 'compiled'.
    weight_initializer : initializer of ``weight``; default the global one.
    dtype : 'float32' (default) or 'float64'.

    Parameters of the block: ``weight`` (units, in_units), and ``step`` (1,),
    the training steps taken so far (not trained, grad_req 'null'), so that
    ``save_parameters``/``load_parameters`` resume the schedule exactly.
    Each device copy advances its own ``step``; all copies take the same steps.

    Example
    -------
    >>> head = LSoftmaxDense(10, margin=4, beta=100, scale=0.99)
    >>> head.initialize(mx.init.Xavier()); head.hybridize()
    >>> with autograd.record():
    ...     loss = gluon.loss.SoftmaxCrossEntropyLoss()(head(features, label), label)
    >>> loss.backward()
    >>> predictions = head(features).argmax(axis=1)   # plain logits
    """

    def __init__(self, units, in_units=0, margin=2, beta=0.0, beta_min=0.0, scale=1.0,
                 gamma=0.0, power=1.0, backend="auto", weight_initializer=None,
                 dtype="float32", **kwargs):
        super().__init__(**kwargs)
        self._units = _check_num_classes(units)
        self._in_units = in_units
        self.schedule = LSoftmaxParams(margin=margin, beta=beta, beta_min=beta_min, scale=scale,
                                       gamma=gamma, power=power)
        self.backend = resolve_backend(backend)
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(units, in_units), dtype=dtype,
                                          init=weight_initializer, allow_deferred_init=True)
            self.step = self.params.get("step", shape=(1,), dtype=dtype, init=mx.init.Zero(),
                                        grad_req="null", differentiable=False)

    @property
    def current_beta(self):
        """The beta the next training step will use (from ``step`` on the first context)."""
        return self.schedule.beta_at(float(self.step.data(self.step.list_ctx()[0]).asscalar()))

    def forward(self, x, label=None):
        plain = label is None or not autograd.is_training()
        if plain and isinstance(x, mx.nd.NDArray):
            # Outside the cached graph: a cached graph keeps one argument
            # structure, and inference needs neither the label nor the op.
            if self.weight._deferred_init:
                self.infer_shape(x)
                for parameter in (self.weight, self.step):
                    parameter._finish_deferred_init()
            return mx.nd.FullyConnected(x, self.weight.data(x.context), no_bias=True,
                                        num_hidden=self._units)
        return super().forward(x, label)

    def hybridize(self, active=True, static_alloc=None, static_shape=None, **kwargs):
        """As ``HybridBlock.hybridize``, but with static memory unless told otherwise.

        ``static_alloc`` and ``static_shape`` default to True here (False in
        Gluon): MXNet 1.9.1 does not pool CPU memory, and without static
        buffers every training call pays first-touch page faults on the (N, C)
        and (C, D) arrays of the layer (docs/performance.md). Outputs and
        gradients are still fresh arrays; another input shape re-plans the graph.
        """
        super().hybridize(active, static_alloc=True if static_alloc is None else static_alloc,
                          static_shape=True if static_shape is None else static_shape, **kwargs)

    def infer_shape(self, x, label=None, *args):
        self.weight.shape = (self._units, x.shape[1])

    def hybrid_forward(self, F, x, label=None, weight=None, step=None):
        if label is None:
            return F.FullyConnected(x, weight, no_bias=True, num_hidden=self._units, name="fwd")
        attrs = self.schedule.as_attrs()
        if F is mx.nd:  # not hybridized: the entry point, which caches the compiled graph
            return lsoftmax(x, weight, label, self._units, backend=self.backend, step=step,
                            **dataclasses.asdict(self.schedule))
        if self.backend == "python":
            return F.Custom(x, weight, label, step, op_type="LSoftmax", num_hidden=self._units,
                            name="fwd", **attrs)
        logits = F.FullyConnected(x, weight, no_bias=True, num_hidden=self._units, name="fc")
        return F.lsoftmax_target(logits, x, weight, label, step, name="fwd", **attrs)[0]

    def export(self, path, epoch=0):
        """Write the inference graph (plain logits, input ``data``) for ``SymbolBlock.imports``
        and ``mx.mod.Module``: ``{path}-symbol.json`` and ``{path}-{epoch:04d}.params``.
        Loading them needs MXNet only, not mx_lsoftmax."""
        data = mx.sym.var("data")
        weight = mx.sym.var(self.weight.name)
        graph = mx.sym.FullyConnected(data, weight, no_bias=True, num_hidden=self._units,
                                      name=self.prefix + "fwd")
        graph.save(f"{path}-symbol.json", remove_amp_cast=True)
        ctx = self.weight.list_ctx()[0]
        mx.nd.save(f"{path}-{epoch:04d}.params",
                   {f"arg:{self.weight.name}": self.weight.data(ctx).as_in_context(mx.cpu())})
        return f"{path}-symbol.json", f"{path}-{epoch:04d}.params"

    def __repr__(self):
        shape = self.weight.shape
        return (f"{self.__class__.__name__}({shape[1] if shape[1] else None} -> {self._units}, "
                f"margin={self.schedule.margin}, beta={self.schedule.beta}, backend={self.backend})")
