"""mx_lsoftmax: margin-based softmax layers for MXNet 1.9.1.

L-Softmax (Liu et al., ICML 2016) and its family: SphereFace, CosFace, ArcFace and
insightface's combined margin, on one spec (docs/derivatives.md) and two backends.

Importing the package registers the Python CustomOps ``op_type='MarginSoftmax'`` and
``op_type='LSoftmax'`` and, when built, loads the compiled op library
(``mx.nd.margin_softmax_target``, ``mx.nd.margin_softmax_normalise``). Entry points:
``margin_logits`` (every kind) and ``lsoftmax``; Gluon blocks in ``mx_lsoftmax.gluon``.
"""
from . import op  # noqa: F401  (registers op_type='MarginSoftmax' and 'LSoftmax')
from . import library
from .dispatch import (BACKENDS, inference_symbol, ldam_margins, lsoftmax, margin_logits, new_step,
                       resolve_backend)
from .kinds import KINDS, MarginSettings, beta_at

library.load()

__version__ = "0.2.0"
__all__ = ["margin_logits", "lsoftmax", "ldam_margins", "inference_symbol", "new_step", "resolve_backend",
           "beta_at", "MarginSettings", "KINDS", "BACKENDS", "library"]
