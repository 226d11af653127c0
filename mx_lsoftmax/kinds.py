"""The margin kinds and their settings: each declared once, for the Python side.

``SETTINGS`` is the field table (name, type, range, description: MXNet's
``DMLC_DECLARE_FIELD`` habit); ``KINDS`` is the table of kinds (what each
normalises, which settings it takes with which defaults, and its target
function psi on host arrays, used by the Python CustomOp). ``MarginSettings`` is
one validated set of values for one kind, with the beta schedule (D12).
The compiled op mirrors both tables in ``src/operator/margin_softmax-inl.h``.

Adding a kind: one ``Kind`` row here (and its ``psi`` function), one row in
the C++ header's table, and the closed form in ``spec.family_psi``.
Equation numbers refer to ``docs/derivatives.md``.
"""
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Setting", "Kind", "SETTINGS", "SCHEDULE", "KINDS", "MarginSettings", "beta_at",
           "angle_floor"]


@dataclass(frozen=True)
class Setting:
    """One setting: its name, value type, allowed range and meaning.

    ``low``/``high`` bound the value (None: unbounded), ``*_open`` excludes the bound.
    """

    name: str
    type: type
    description: str
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False

    def describe_range(self):
        if self.type is bool:
            return "a boolean"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"

    def in_range(self, value):
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


SETTINGS = {setting.name: setting for setting in (
    Setting("margin", float, "the margin m: an integer multiple of the angle (lsoftmax, sphereface), "
            "a cosine offset (cosface) or an angle in radians (arcface)", low=0.0),
    Setting("s", float, "the logit scale of the normalised kinds", low=0.0, low_open=True),
    Setting("easy_margin", bool, "arcface: shift the angle only where cos(theta) > 0"),
    Setting("m1", float, "combined margin: multiplies the angle", low=0.0, low_open=True),
    Setting("m2", float, "combined margin: added to the angle (radians)", low=0.0, high=math.pi,
            high_open=True),
    Setting("m3", float, "combined margin: subtracted from the cosine", low=0.0),
    Setting("beta", float, "initial blend weight of the plain logit (the paper's lambda)", low=0.0),
    Setting("beta_min", float, "floor of the beta schedule", low=0.0),
    Setting("scale", float, "geometric decay of beta per training step", low=0.0, high=1.0,
            low_open=True),
    Setting("gamma", float, "power-decay rate of beta per training step", low=0.0),
    Setting("power", float, "power-decay exponent of beta", low=0.0, low_open=True),
    Setting("per_class_margin", bool, "cosface: the margin of each class comes from the extra "
            "input class_margins (C,) (LDAM); set by passing class_margins"),
)}

# The schedule (D12), taken by every kind; beta = 0 (no blending) unless a kind says otherwise.
SCHEDULE = {"beta": 0.0, "beta_min": 0.0, "scale": 1.0, "gamma": 0.0, "power": 1.0}


def angle_floor(dtype):
    """delta of (K5): sqrt(eps) of the data's dtype, the floor of sin(theta) in psi'."""
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


# ---- psi and psi' on float64 NumPy arrays of cosines c, shape (N,) (D4, D5, K5) ----
# Host arithmetic: the target column is a few dozen operations on N numbers, which as
# NDArray operations would cost the Python op a dispatch each (docs/performance.md).

def _psi_chebyshev(c, values, floor):
    margin = int(values["margin"])
    k = np.zeros_like(c)
    for j in range(1, margin):  # (D2): k from the thresholds, no arccos
        k += c < math.cos(j * math.pi / margin)
    sign = 1 - 2 * np.mod(k, 2)  # (-1)^k
    t_previous, t_current = np.ones_like(c), c  # T_0, T_1 (D3)
    u_previous, u_current = np.zeros_like(c), np.ones_like(c)  # U_{-1}, U_0 (D5)
    for _ in range(margin - 1):
        t_previous, t_current = t_current, 2 * c * t_current - t_previous
        u_previous, u_current = u_current, 2 * c * u_current - u_previous
    return sign * t_current - 2 * k, sign * margin * u_current


def _psi_cosface(c, values, floor):
    return c - values["margin"], np.ones_like(c)


def _sine(c):
    return np.sqrt(np.maximum(1 - c * c, 0))


def _psi_arcface(c, values, floor):
    m = values["margin"]
    sine = _sine(c)
    shifted_psi = c * math.cos(m) - sine * math.sin(m)  # cos(theta + m)
    # -d cos(theta + m)/dtheta / max(sin theta, delta) (K5)
    shifted_derivative = (sine * math.cos(m) + c * math.sin(m)) / np.maximum(sine, floor)
    if values["easy_margin"]:
        shifted, other = c > 0, c
    else:
        shifted, other = c > -math.cos(m), c - m * math.sin(m)  # theta < pi - m, else the guard
    return np.where(shifted, shifted_psi, other), np.where(shifted, shifted_derivative, 1.0)


def _psi_combined(c, values, floor):
    m1, m2, m3 = values["m1"], values["m2"], values["m3"]
    angle = m1 * np.arccos(c) + m2
    return np.cos(angle) - m3, m1 * np.sin(angle) / np.maximum(_sine(c), floor)


@dataclass(frozen=True)
class Kind:
    """One row of the table of kinds (K1).

    normalise_features: the layer uses s x/|x| instead of x.
    normalise_weights:  the layer uses w_j/|w_j| instead of w_j.
    defaults:           the settings it takes besides the schedule, with their defaults, and
                        any schedule default of its own.
    integer_margin:     psi is the integer-m multiple-angle form (D4).
    psi:                (c, values, angle floor) -> (psi, psi'), float64 NumPy arrays.
    """

    name: str
    title: str
    normalise_features: bool
    normalise_weights: bool
    defaults: dict
    psi: object
    integer_margin: bool = False
    schedule: dict = field(default_factory=dict)


KINDS = {kind.name: kind for kind in (
    Kind("lsoftmax", "L-Softmax", False, False, {"margin": 2}, _psi_chebyshev, integer_margin=True),
    Kind("sphereface", "SphereFace", False, True, {"margin": 4}, _psi_chebyshev, integer_margin=True,
         schedule={"beta": 1000.0, "beta_min": 5.0, "gamma": 0.12, "power": 1.0}),
    Kind("cosface", "CosFace", True, True, {"margin": 0.35, "s": 64.0, "per_class_margin": False},
         _psi_cosface),
    Kind("arcface", "ArcFace", True, True, {"margin": 0.5, "s": 64.0, "easy_margin": False},
         _psi_arcface),
    Kind("combined", "combined margin", True, True, {"m1": 1.0, "m2": 0.3, "m3": 0.2, "s": 64.0},
         _psi_combined),
)}


def _parse_bool(title, name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError(f"{title} parameter {name} must be a boolean, got {value!r}")


class MarginSettings:
    """The validated settings of one kind: ``MarginSettings('arcface', margin=0.4)``.

    Values are attributes (``settings.margin``, ``settings.s``, ...); settings the
    kind does not take are errors naming them; every value is range-checked with
    an error naming the setting and the value. ``as_attrs()`` gives the operator
    attributes (strings, full precision, ``kind`` included).
    """

    def __init__(self, kind="lsoftmax", **values):
        if kind not in KINDS:
            raise ValueError(f"margin parameter kind must be one of {tuple(KINDS)}, got {kind!r}")
        row = KINDS[kind]
        accepted = {**SCHEDULE, **row.schedule, **row.defaults}
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            raise ValueError(f"{row.title} does not take the setting(s) {unknown}; its settings are "
                             f"{sorted(accepted)}")
        resolved = {}
        for name, default in accepted.items():
            value = values.get(name, default)
            resolved[name] = self._check(row, SETTINGS[name], value)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "values", resolved)

    @staticmethod
    def _check(row, setting, value):
        title, name = row.title, setting.name
        if setting.type is bool:
            return _parse_bool(title, name, value)
        if name == "margin" and row.integer_margin:
            try:
                number = float(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or number != int(number) or number < 1:
                raise ValueError(f"{title} parameter margin must be an integer >= 1, got {value!r}")
            return int(number)
        if isinstance(value, bool):
            raise ValueError(f"{title} parameter {name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{title} parameter {name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{title} parameter {name} must be finite, got {value!r}")
        if name == "margin" and row.name == "arcface" and not number < math.pi:
            raise ValueError(f"{title} parameter margin must be in [0, pi), got {value!r}")
        if not setting.in_range(number):
            raise ValueError(f"{title} parameter {name} must be {setting.describe_range()}, got {value!r}")
        return number

    @classmethod
    def from_attrs(cls, attrs):
        """From operator attributes (strings); ``kind`` defaults to 'lsoftmax'."""
        attrs = dict(attrs)
        return cls(attrs.pop("kind", "lsoftmax"), **attrs)

    @property
    def row(self):
        return KINDS[self.kind]

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        raise AttributeError("MarginSettings is immutable")

    def __eq__(self, other):
        return isinstance(other, MarginSettings) and (self.kind, self.values) == (other.kind, other.values)

    def __hash__(self):
        return hash((self.kind, tuple(sorted(self.values.items()))))

    def __repr__(self):
        inner = ", ".join(f"{name}={value!r}" for name, value in self.values.items())
        return f"MarginSettings({self.kind!r}, {inner})"

    def as_dict(self):
        return dict(self.values)

    def as_attrs(self):
        """Operator attributes: every setting as a string, floats at full precision."""
        attrs = {"kind": self.kind}
        for name, value in self.values.items():
            attrs[name] = str(int(value)) if isinstance(value, bool) else (
                str(value) if isinstance(value, int) else repr(float(value)))
        return attrs

    def beta_at(self, step):
        """The blend weight of the training forward number ``step`` (0-based) (D12)."""
        v = self.values
        return beta_at(step, v["beta"], v["beta_min"], v["scale"], v["gamma"], v["power"])


def beta_at(step, beta=0.0, beta_min=0.0, scale=1.0, gamma=0.0, power=1.0):
    """beta_t = max(beta_min, beta * scale^t * (1 + gamma t)^(-power))  (D12).

    ``step`` t counts the training forwards before this one (0 on the first).
    scale < 1 gives mx-lsoftmax's geometric decay, gamma > 0 Caffe's power decay.
    Computed in log space so that scale^t for large t underflows to 0 cleanly.
    """
    t = float(step)
    if t < 0:
        raise ValueError(f"schedule step must be >= 0, got {step!r}")
    if beta == 0.0:
        return max(beta_min, 0.0)
    log_value = math.log(beta) + t * math.log(scale) - power * math.log1p(gamma * t)
    return max(beta_min, math.exp(log_value))
