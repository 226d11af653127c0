"""Float64 reference of L-Softmax, written straight from ``docs/derivatives.md``.

This module is the yardstick the Python CustomOp and the compiled op are tested
against, so it deliberately takes other routes than they do:

* cos(m theta) comes from the multiple-angle (binomial) expansion (D3), not
  from the Chebyshev recurrence the operators use;
* psi'(c) is the derivative of that expansion term by term, not m U_{m-1};
* the gradients are assembled from the explicit dF/dx and dF/dw formulas (D9,
  D10), not from the chain rule through z, |x| and |w_y| (D7) that the
  operators use.

For the margin family (K1-K9) it normalises x and W explicitly, takes
theta = arccos(c) and the closed forms of psi in theta, and differentiates
through the normalisations with their Jacobians (I - u u^T) s / |v|, where the
operators use the chain through the raw products and the norms (K6-K8).

Everything is plain NumPy in float64; nothing here is fast and nothing needs to be.
Equation numbers (D1)...(D12), (K1)...(K9) refer to ``docs/derivatives.md``.
"""
from math import comb

import numpy as np

__all__ = [
    "cos_multiple_angle",
    "cos_multiple_angle_derivative",
    "target_interval",
    "psi",
    "psi_derivative",
    "target_logit",
    "forward",
    "backward",
    "FLOAT64_ANGLE_FLOOR",
    "family_psi",
    "family_forward",
    "family_inference",
    "family_backward",
]


def cos_multiple_angle(c, margin):
    """cos(m theta) as a polynomial in c = cos(theta) (D3).

    sum_{p=0..floor(m/2)} (-1)^p C(m, 2p) c^(m-2p) (1-c^2)^p
    """
    c = np.asarray(c, dtype=np.float64)
    s2 = 1.0 - c * c
    total = np.zeros_like(c)
    for p in range(margin // 2 + 1):
        total += (-1) ** p * comb(margin, 2 * p) * c ** (margin - 2 * p) * s2 ** p
    return total


def cos_multiple_angle_derivative(c, margin):
    """d/dc of (D3), differentiated term by term (D5 in expanded form)."""
    c = np.asarray(c, dtype=np.float64)
    s2 = 1.0 - c * c
    total = np.zeros_like(c)
    for p in range(margin // 2 + 1):
        coefficient = (-1) ** p * comb(margin, 2 * p)
        power_c = margin - 2 * p
        term = power_c * c ** (power_c - 1) * s2 ** p if power_c > 0 else 0.0
        if p > 0:
            term = term - 2 * p * c ** (power_c + 1) * s2 ** (p - 1)
        total += coefficient * term
    return total


def target_interval(c, margin):
    """k with theta in [k pi/m, (k+1) pi/m], from the thresholds cos(j pi/m) (D2).

    k counts the thresholds j = 1..m-1 that c lies strictly below, so c = 1
    gives k = 0 and c = -1 gives k = m - 1. No arccos is involved.
    """
    c = np.asarray(c, dtype=np.float64)
    k = np.zeros(c.shape, dtype=np.int64)
    for j in range(1, margin):
        k += (c < np.cos(j * np.pi / margin)).astype(np.int64)
    return k


def psi(c, margin):
    """psi(c) = (-1)^k cos(m theta) - 2k (D4)."""
    k = target_interval(c, margin)
    return (-1.0) ** k * cos_multiple_angle(c, margin) - 2.0 * k


def psi_derivative(c, margin):
    """psi'(c) = (-1)^k d cos(m theta) / dc (D5)."""
    k = target_interval(c, margin)
    return (-1.0) ** k * cos_multiple_angle_derivative(c, margin)


def _as_f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def target_logit(z, norm_x, norm_w, beta, margin):
    """The blended target logit and its partials in (z, |x|, |w_y|) (D6, D7).

    Parameters are arrays of one shape: z the plain target logit w_y . x,
    ``norm_x`` = |x|, ``norm_w`` = |w_y|; ``beta`` >= 0 and ``margin`` >= 1 scalars.
    Returns (o, do/dz, do/d|x|, do/d|w_y|). Rows with |x| |w_y| = 0 keep the
    plain logit: o = z, do/dz = 1, the two norm partials 0 (D11).
    """
    z, norm_x, norm_w = _as_f64(z, norm_x, norm_w)
    product = norm_x * norm_w
    degenerate = product == 0.0
    safe = np.where(degenerate, 1.0, product)
    c = np.clip(z / safe, -1.0, 1.0)
    p = psi(c, margin)
    dp = psi_derivative(c, margin)
    o = (beta * z + product * p) / (1.0 + beta)
    d_z = (beta + dp) / (1.0 + beta)
    d_norm_x = norm_w * (p - c * dp) / (1.0 + beta)
    d_norm_w = norm_x * (p - c * dp) / (1.0 + beta)
    o = np.where(degenerate, z, o)
    d_z = np.where(degenerate, 1.0, d_z)
    d_norm_x = np.where(degenerate, 0.0, d_norm_x)
    d_norm_w = np.where(degenerate, 0.0, d_norm_w)
    return o, d_z, d_norm_x, d_norm_w


def forward(data, weight, label, margin, beta):
    """Training-mode output (N, C) for data (N, D), weight (C, D), label (N,) (D6).

    Every column is x W^T except the target column, which holds the blended
    logit. With ``beta`` the value of the schedule at this step.
    """
    data, weight = _as_f64(data, weight)
    label = np.asarray(label).astype(np.int64)
    rows = np.arange(data.shape[0])
    logits = data @ weight.T
    w_y = weight[label]
    norm_x = np.linalg.norm(data, axis=1)
    norm_w = np.linalg.norm(w_y, axis=1)
    o, _, _, _ = target_logit(logits[rows, label], norm_x, norm_w, beta, margin)
    logits[rows, label] = o
    return logits


def backward(data, weight, label, margin, beta, grad_output):
    """Gradients (dL/d data, dL/d weight) of the training output (D8 - D10).

    Assembled from the explicit derivatives of F = |w||x| psi(c) with respect
    to x and w_y, row by row; degenerate rows take the plain-logit gradient.
    """
    data, weight, grad_output = _as_f64(data, weight, grad_output)
    label = np.asarray(label).astype(np.int64)
    grad_data = grad_output @ weight
    grad_weight = grad_output.T @ data
    for i in range(data.shape[0]):
        y = label[i]
        x = data[i]
        w = weight[y]
        a = np.linalg.norm(x)
        b = np.linalg.norm(w)
        if a * b == 0.0:
            continue
        c = float(np.clip(x @ w / (a * b), -1.0, 1.0))
        p = float(psi(c, margin))
        dp = float(psi_derivative(c, margin))
        d_f_dx = dp * w + (b / a) * (p - c * dp) * x
        d_f_dw = dp * x + (a / b) * (p - c * dp) * w
        g = grad_output[i, y] / (1.0 + beta)
        grad_data[i] += g * (d_f_dx - w)
        grad_weight[y] += g * (d_f_dw - x)
    return grad_data, grad_weight


# ---------------------------------------------------------------------------
# The margin family (K1-K9), independent of mx_lsoftmax.kinds
# ---------------------------------------------------------------------------

FLOAT64_ANGLE_FLOOR = float(np.sqrt(np.finfo(np.float64).eps))  # delta of (K5)

# What each kind applies to x and w before the product (K1): (features, weights).
_NORMALISES = {
    "lsoftmax": (False, False),
    "sphereface": (False, True),
    "cosface": (True, True),
    "arcface": (True, True),
    "combined": (True, True),
}


def family_psi(kind, theta, settings):
    """psi and d psi / d theta as closed forms in the angle theta (K1, K5)."""
    theta = np.asarray(theta, dtype=np.float64)
    if kind in ("lsoftmax", "sphereface"):
        margin = int(settings["margin"])
        k = np.minimum(np.floor(theta * margin / np.pi), margin - 1)
        sign = (-1.0) ** k
        return sign * np.cos(margin * theta) - 2 * k, -sign * margin * np.sin(margin * theta)
    if kind == "cosface":
        return np.cos(theta) - settings["margin"], -np.sin(theta)
    if kind == "arcface":
        m = settings["margin"]
        if settings.get("easy_margin", False):
            shifted, unshifted = np.cos(theta) > 0, np.cos(theta)
        else:
            shifted, unshifted = theta < np.pi - m, np.cos(theta) - m * np.sin(m)
        return (np.where(shifted, np.cos(theta + m), unshifted),
                np.where(shifted, -np.sin(theta + m), -np.sin(theta)))
    if kind == "combined":
        m1, m2, m3 = settings["m1"], settings["m2"], settings["m3"]
        return np.cos(m1 * theta + m2) - m3, -m1 * np.sin(m1 * theta + m2)
    raise ValueError(f"unknown kind {kind!r}")


def _used_inputs(kind, data, weight, settings):
    """(x-hat, w-hat) as the kind uses them, and the Jacobian factors of each row."""
    features, weights = _NORMALISES[kind]
    s = float(settings.get("s", 1.0))

    def normalise(rows, scale):
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        safe = np.where(norms > 0, norms, 1.0)
        return np.where(norms > 0, scale * rows / safe, 0.0), norms

    x_hat, x_norm = normalise(data, s) if features else (data.copy(), None)
    w_hat, w_norm = normalise(weight, 1.0) if weights else (weight.copy(), None)
    return x_hat, w_hat, (x_norm, s) if features else None, (w_norm, 1.0) if weights else None


def _pull_back(rows, grad_hat, normalisation):
    """dL/dv from dL/du for u = scale v / |v|: scale (I - u u^T / scale^2) / |v| applied row-wise.

    A zero row has no direction: its gradient is 0 (K9)."""
    if normalisation is None:
        return grad_hat
    norms, scale = normalisation
    result = np.zeros_like(rows)
    for i in range(rows.shape[0]):
        n = float(norms[i, 0])
        if n == 0.0:
            continue
        unit = rows[i] / n
        result[i] = scale / n * (grad_hat[i] - unit * (unit @ grad_hat[i]))
    return result


def _target_terms(kind, u, v, settings, beta, angle_floor):
    """F = |u||v| psi(theta(u, v)) on the used vectors, and dF/du, dF/dv (D9, D10 with (K5))."""
    a, b = np.linalg.norm(u), np.linalg.norm(v)
    c = float(np.clip(u @ v / (a * b), -1.0, 1.0))
    theta = float(np.arccos(c))
    p, d_theta = (float(value) for value in family_psi(kind, theta, settings))
    if kind in ("lsoftmax", "sphereface"):
        dp = float(psi_derivative(c, int(settings["margin"])))  # a polynomial: no pole
    else:
        dp = -d_theta / max(np.sin(theta), angle_floor)
    d_u = dp * v + (b / a) * (p - c * dp) * u
    d_v = dp * u + (a / b) * (p - c * dp) * v
    return a * b * p, d_u, d_v


def _row_settings(settings, class_margins, y):
    """(K10): with per-class margins, row i uses its class's margin."""
    return settings if class_margins is None else dict(settings, margin=float(class_margins[y]))


def family_forward(kind, data, weight, label, beta, class_margins=None, **settings):
    """Training output (N, C) of any kind (K2, K3); ``beta`` the schedule's value;
    ``class_margins`` (C,): each class's margin (K10), else None."""
    data, weight = _as_f64(data, weight)
    label = np.asarray(label).astype(np.int64)
    x_hat, w_hat, _, _ = _used_inputs(kind, data, weight, settings)
    logits = x_hat @ w_hat.T
    for i, y in enumerate(label):
        u, v = x_hat[i], w_hat[y]
        if np.linalg.norm(u) * np.linalg.norm(v) == 0.0:
            continue  # (K9): the plain logit, 0
        f, _, _ = _target_terms(kind, u, v, _row_settings(settings, class_margins, y), beta,
                                FLOAT64_ANGLE_FLOOR)
        logits[i, y] = (beta * logits[i, y] + f) / (1.0 + beta)
    return logits


def family_inference(kind, data, weight, **settings):
    """The plain logits of the kind (K2)."""
    data, weight = _as_f64(data, weight)
    x_hat, w_hat, _, _ = _used_inputs(kind, data, weight, settings)
    return x_hat @ w_hat.T


def family_backward(kind, data, weight, label, beta, grad_output, angle_floor=FLOAT64_ANGLE_FLOOR,
                    class_margins=None, **settings):
    """(dL/d data, dL/d weight) of the training output, through the explicit normalisations."""
    data, weight, grad_output = _as_f64(data, weight, grad_output)
    label = np.asarray(label).astype(np.int64)
    x_hat, w_hat, x_norm, w_norm = _used_inputs(kind, data, weight, settings)
    grad_x_hat = grad_output @ w_hat
    grad_w_hat = grad_output.T @ x_hat
    for i, y in enumerate(label):
        u, v = x_hat[i], w_hat[y]
        if np.linalg.norm(u) * np.linalg.norm(v) == 0.0:
            continue
        _, d_u, d_v = _target_terms(kind, u, v, _row_settings(settings, class_margins, y), beta,
                                    angle_floor)
        g = grad_output[i, y] / (1.0 + beta)
        grad_x_hat[i] += g * (d_u - v)
        grad_w_hat[y] += g * (d_v - u)
    return _pull_back(data, grad_x_hat, x_norm), _pull_back(weight, grad_w_hat, w_norm)
