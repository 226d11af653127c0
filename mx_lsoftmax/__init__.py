"""mx_lsoftmax: Large-Margin Softmax (L-Softmax, Liu et al. ICML 2016) for MXNet 1.9.1.

Importing the package registers the Python CustomOp ``op_type='LSoftmax'`` and,
when built, loads the compiled op library (``mx.nd.lsoftmax_target``).
The entry point is ``lsoftmax``; the Gluon block is ``mx_lsoftmax.gluon.LSoftmaxDense``.
"""
from . import op  # noqa: F401  (registers op_type='LSoftmax')
from . import library
from .dispatch import BACKENDS, inference_symbol, lsoftmax, new_step, resolve_backend
from .schedule import LSoftmaxParams, beta_at

library.load()

__version__ = "0.1.0"
__all__ = ["lsoftmax", "inference_symbol", "new_step", "resolve_backend", "beta_at",
           "LSoftmaxParams", "BACKENDS", "library"]
