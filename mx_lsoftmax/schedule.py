"""The L-Softmax hyper-parameters: validation and the beta schedule (D12).

One place for both, shared by the Python op, the compiled-op wrapper and the
Gluon block, so every backend accepts and rejects exactly the same settings.
"""
import math
from dataclasses import dataclass

__all__ = ["LSoftmaxParams", "beta_at"]


def _number(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"L-Softmax parameter {name} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class LSoftmaxParams:
    """Validated L-Softmax settings.

    margin:   integer m >= 1 (1 with beta = 0 is the plain layer). Default 2.
    beta:     initial blend weight of the plain logit (the paper's lambda), >= 0. Default 0.
    beta_min: floor of the schedule, >= 0. Default 0.
    scale:    geometric decay per training step, in (0, 1]. Default 1 (none).
    gamma:    power-decay rate per training step, >= 0. Default 0 (none).
    power:    power-decay exponent, > 0. Default 1.
    """

    margin: int = 2
    beta: float = 0.0
    beta_min: float = 0.0
    scale: float = 1.0
    gamma: float = 0.0
    power: float = 1.0

    def __post_init__(self):
        margin = self.margin
        if isinstance(margin, str):
            margin = margin.strip()
        try:
            margin_value = float(margin)
        except (TypeError, ValueError):
            raise ValueError(f"L-Softmax parameter margin must be an integer >= 1, got {self.margin!r}") from None
        if not math.isfinite(margin_value) or margin_value != int(margin_value) or margin_value < 1:
            raise ValueError(f"L-Softmax parameter margin must be an integer >= 1, got {self.margin!r}")
        object.__setattr__(self, "margin", int(margin_value))
        for name in ("beta", "beta_min", "scale", "gamma", "power"):
            value = _number(name, getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"L-Softmax parameter {name} must be finite, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.beta < 0:
            raise ValueError(f"L-Softmax parameter beta must be >= 0, got {self.beta!r}")
        if self.beta_min < 0:
            raise ValueError(f"L-Softmax parameter beta_min must be >= 0, got {self.beta_min!r}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"L-Softmax parameter scale must be in (0, 1], got {self.scale!r}")
        if self.gamma < 0:
            raise ValueError(f"L-Softmax parameter gamma must be >= 0, got {self.gamma!r}")
        if self.power <= 0:
            raise ValueError(f"L-Softmax parameter power must be > 0, got {self.power!r}")

    @classmethod
    def from_attrs(cls, attrs):
        """Build from a mapping of string attributes (what CustomOpProp receives)."""
        fields = ("margin", "beta", "beta_min", "scale", "gamma", "power")
        return cls(**{name: attrs[name] for name in fields if name in attrs})

    def beta_at(self, step):
        """The blend weight used by the training forward number ``step`` (0-based)."""
        return beta_at(step, self.beta, self.beta_min, self.scale, self.gamma, self.power)

    def as_attrs(self):
        """The settings as operator attributes (strings, full float precision)."""
        return {
            "margin": str(self.margin),
            "beta": repr(self.beta),
            "beta_min": repr(self.beta_min),
            "scale": repr(self.scale),
            "gamma": repr(self.gamma),
            "power": repr(self.power),
        }


def beta_at(step, beta=0.0, beta_min=0.0, scale=1.0, gamma=0.0, power=1.0):
    """beta_t = max(beta_min, beta * scale^t * (1 + gamma t)^(-power))  (D12).

    ``step`` t counts the training forwards before this one (0 on the first).
    scale < 1 gives mx-lsoftmax's geometric decay, gamma > 0 Caffe's power decay.
    Computed in log space so that scale^t for large t underflows to 0 cleanly.
    """
    t = float(step)
    if t < 0:
        raise ValueError(f"L-Softmax schedule step must be >= 0, got {step!r}")
    if beta == 0.0:
        return max(beta_min, 0.0)
    log_value = math.log(beta) + t * math.log(scale) - power * math.log1p(gamma * t)
    return max(beta_min, math.exp(log_value))
