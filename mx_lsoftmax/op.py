"""The Python CustomOp ``LSoftmax``: ``mx.sym.Custom(..., op_type='LSoftmax')``.

Inputs: data (N, D), weight (C, D) (FullyConnected layout, no bias), label (N,)
class indices in any dtype. Auxiliary state: ``step`` (1,), the number of
training forwards so far, which drives the beta schedule (D12). Output: (N, C).

The state lives in an auxiliary array, not in the op instance, because MXNet
1.9.1 creates a fresh CustomOp instance for every imperative call and every
call of a hybridized block; an auxiliary array is carried by the caller (the
executor, the Gluon parameter, the NDArray passed in) like BatchNorm's
moving averages, so the schedule advances in all three modes and is saved
with the parameters.

All heavy work stays in MXNet's engine: the three (N x D) by (D x C) products
are ``dot``/``FullyConnected`` calls, and the O(N) target-column step (D6, D7)
is a handful of element-wise NDArray operations on length-N vectors.
"""
import math

import mxnet as mx
import numpy as np

from .schedule import LSoftmaxParams

__all__ = ["LSoftmaxOp", "LSoftmaxProp", "target_column", "check_labels"]


def check_labels(label, num_classes):
    """Return the labels as a host int64 array; raise ValueError naming the first
    label that is not an integer in [0, C)."""
    values = label.asnumpy()
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= num_classes)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"L-Softmax input label must hold integer class indices in [0, {num_classes}), "
            f"got label[{index}] = {values[index]!r}")
    return values.astype(np.int64)


def _chebyshev(c, margin):
    """T_m(c) and U_{m-1}(c) by the three-term recurrences (D3, D5)."""
    t_previous, t_current = mx.nd.ones_like(c), c
    u_previous, u_current = mx.nd.zeros_like(c), mx.nd.ones_like(c)  # U_{-1}, U_0
    for _ in range(margin - 1):
        t_previous, t_current = t_current, 2 * c * t_current - t_previous
        u_previous, u_current = u_current, 2 * c * u_current - u_previous
    return t_current, u_current


def target_column(z, norm_x, norm_w, beta, margin):
    """Blended target logit and its partials in (z, |x|, |w_y|), NDArrays of shape (N,).

    Returns (o, do/dz, do/d|x|, do/d|w_y|) (D6, D7); rows with |x| |w_y| = 0
    keep the plain logit with do/dz = 1 and zero norm partials (D11).
    """
    product = norm_x * norm_w
    regular = product > 0
    safe_product = mx.nd.where(regular, product, mx.nd.ones_like(product))
    c = mx.nd.clip(z / safe_product, -1.0, 1.0)
    # k counts the thresholds cos(j pi / m) that c lies below (D2): no arccos.
    k = mx.nd.zeros_like(c)
    for j in range(1, margin):
        k = k + (c < math.cos(j * math.pi / margin))
    sign = 1 - 2 * mx.nd.round(k - 2 * mx.nd.floor(k / 2))  # (-1)^k
    cos_m, chebyshev_u = _chebyshev(c, margin)
    psi = sign * cos_m - 2 * k
    psi_prime = sign * margin * chebyshev_u
    radial = (psi - c * psi_prime) / (1.0 + beta)
    o = (beta * z + product * psi) / (1.0 + beta)
    d_z = (beta + psi_prime) / (1.0 + beta)
    o = mx.nd.where(regular, o, z)
    d_z = mx.nd.where(regular, d_z, mx.nd.ones_like(d_z))
    d_norm_x = mx.nd.where(regular, norm_w * radial, mx.nd.zeros_like(radial))
    d_norm_w = mx.nd.where(regular, norm_x * radial, mx.nd.zeros_like(radial))
    return o, d_z, d_norm_x, d_norm_w


def _target_quantities(data, weight, label):
    """z = x . w_y, |x| and |w_y| per row: O(N D) work."""
    w_y = mx.nd.take(weight, label, axis=0)
    z = mx.nd.sum(data * w_y, axis=1)
    return z, mx.nd.norm(data, axis=1), mx.nd.norm(w_y, axis=1), w_y


class LSoftmaxOp(mx.operator.CustomOp):
    def __init__(self, params, num_classes):
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        # What the last training forward computed and its backward reuses
        # (None after an inference forward): MXNet runs a forward and its
        # backward on the same instance in every mode.
        self.saved = None

    def forward(self, is_train, req, in_data, out_data, aux):
        data, weight, label = in_data
        # Write the product straight into the output when allowed: a (N, C)
        # copy costs as much as the whole target-column step.
        logits = out_data[0] if req[0] == "write" else mx.nd.empty(out_data[0].shape, data.context, data.dtype)
        mx.nd.FullyConnected(data, weight, no_bias=True, num_hidden=self.num_classes, out=logits)
        self.saved = None
        if is_train:
            host_labels = check_labels(label, self.num_classes)
            step = aux[0]
            t = float(step.asscalar())
            beta = self.params.beta_at(t)
            label_index = label.astype("int64")
            rows = mx.nd.arange(data.shape[0], dtype="int64", ctx=data.context)
            z, norm_x, norm_w, w_y = _target_quantities(data, weight, label_index)
            o, d_z, d_norm_x, d_norm_w = target_column(z, norm_x, norm_w, beta, self.params.margin)
            logits[rows, label_index] = o
            step[:] = t + 1
            # MXNet waits for the outputs of a CustomOp, not for its auxiliary
            # states: without this wait the executor could read a stale step.
            step.wait_to_read()
            self.saved = (host_labels, label_index, norm_x, norm_w, w_y, d_z, d_norm_x, d_norm_w)
        if req[0] != "write":
            self.assign(out_data[0], req[0], logits)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        """Gradients without copying or rewriting the (N, C) output gradient G.

        With G' = G except G'[i, y_i] = g_i do/dz (D7, D8):
          dx = G' W + (g do/d|x| / |x|) x = G W + (do/dz - 1) g w_y + (g do/d|x| / |x|) x
          dW = G'^T x + rows y_i += (g do/d|w| / |w_y|) w_y
             = G^T x + rows y_i += (do/dz - 1) g x_i + (g do/d|w| / |w_y|) w_y
        so the two products run on G as it is and every correction is O(N D).
        """
        data, weight, label = in_data
        grad_output = out_grad[0]
        grad_data = in_grad[0] if req[0] == "write" else mx.nd.empty(data.shape, data.context, data.dtype)
        grad_weight = in_grad[1] if req[1] == "write" else mx.nd.empty(weight.shape, data.context, data.dtype)
        mx.nd.dot(grad_output, weight, out=grad_data)
        mx.nd.dot(grad_output, data, transpose_a=True, out=grad_weight)
        if self.saved is not None:
            host_labels, label_index, norm_x, norm_w, w_y, d_z, d_norm_x, d_norm_w = self.saved
            g_target = mx.nd.pick(grad_output, label_index, axis=1)
            ones = mx.nd.ones_like(norm_x)
            through_z = (g_target * (d_z - 1)).expand_dims(1)
            along_x = (g_target * d_norm_x / mx.nd.where(norm_x > 0, norm_x, ones)).expand_dims(1)
            along_w = (g_target * d_norm_w / mx.nd.where(norm_w > 0, norm_w, ones)).expand_dims(1)
            grad_data += through_z * w_y + along_x * data
            row_updates = through_z * data + along_w * w_y
            # Rows of W that are targets of several samples collect every
            # sample's update: sum them per distinct class (an N x U one-hot
            # product), then add once per class, so no index repeats.
            classes, position = np.unique(host_labels, return_inverse=True)
            class_index = mx.nd.array(classes, ctx=data.context, dtype="int64")
            membership = mx.nd.one_hot(mx.nd.array(position, ctx=data.context), len(classes), dtype=data.dtype)
            per_class = mx.nd.dot(membership, row_updates, transpose_a=True)
            grad_weight[class_index] = mx.nd.take(grad_weight, class_index) + per_class
        if req[0] != "write":
            self.assign(in_grad[0], req[0], grad_data)
        if req[1] != "write":
            self.assign(in_grad[1], req[1], grad_weight)
        self.assign(in_grad[2], req[2], mx.nd.zeros_like(label))


@mx.operator.register("LSoftmax")
class LSoftmaxProp(mx.operator.CustomOpProp):
    """Shape/type inference and parameter parsing for ``op_type='LSoftmax'``.

    Attributes: num_hidden (C, required), margin, beta, beta_min, scale, gamma,
    power (see ``LSoftmaxParams``; all validated here, when the op is created).
    """

    def __init__(self, num_hidden=None, **attrs):
        super().__init__(need_top_grad=True)
        # An exception escaping this constructor kills the process inside
        # MXNet's C callback, so a bad setting is kept and raised from
        # infer_shape, whose errors MXNet turns into an MXNetError.
        self.error = None
        try:
            self._parse(num_hidden, attrs)
        except ValueError as error:
            self.error = error

    def _parse(self, num_hidden, attrs):
        if num_hidden is None:
            raise ValueError("L-Softmax parameter num_hidden (the number of classes C) is required")
        try:
            self.num_classes = int(num_hidden)
        except ValueError:
            raise ValueError(f"L-Softmax parameter num_hidden must be a positive integer, got {num_hidden!r}") from None
        if self.num_classes < 1:
            raise ValueError(f"L-Softmax parameter num_hidden must be a positive integer, got {num_hidden!r}")
        unknown = set(attrs) - {"margin", "beta", "beta_min", "scale", "gamma", "power"}
        if unknown:
            raise ValueError(f"L-Softmax got unknown parameter(s) {sorted(unknown)}")
        self.params = LSoftmaxParams.from_attrs(attrs)

    def list_arguments(self):
        return ["data", "weight", "label"]

    def list_outputs(self):
        return ["output"]

    def list_auxiliary_states(self):
        return ["step"]

    def infer_shape(self, in_shape):
        if self.error is not None:
            raise self.error
        data_shape, weight_shape, label_shape = in_shape[:3]
        if len(data_shape) != 2:
            raise ValueError(f"L-Softmax input data must be 2-D (N, D), got shape {tuple(data_shape)}")
        n, d = data_shape
        expected_weight = (self.num_classes, d)
        if weight_shape and tuple(weight_shape) != expected_weight:
            raise ValueError(
                f"L-Softmax input weight must have shape (num_hidden, D) = {expected_weight}, "
                f"got {tuple(weight_shape)}")
        if label_shape and tuple(label_shape) != (n,):
            raise ValueError(f"L-Softmax input label must have shape (N,) = ({n},), got {tuple(label_shape)}")
        return [data_shape, expected_weight, (n,)], [(n, self.num_classes)], [(1,)]

    def infer_type(self, in_type):
        dtype = in_type[0]
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"L-Softmax input data must be float32 or float64, got {np.dtype(dtype).name}")
        label_type = in_type[2] if in_type[2] is not None else dtype
        return [dtype, dtype, label_type], [dtype], [dtype]

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        return [out_grad[0], in_data[0], in_data[1], in_data[2]]

    def create_operator(self, ctx, shapes, dtypes):
        return LSoftmaxOp(self.params, self.num_classes)
