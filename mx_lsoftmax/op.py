"""The Python CustomOp of every margin kind: ``mx.sym.Custom(..., op_type='MarginSoftmax', kind=...)``.

``op_type='LSoftmax'`` is the same op with ``kind='lsoftmax'`` fixed.

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
are ``FullyConnected`` and its backward on the raw inputs (nothing normalised is
materialised, K6), and the normalised kinds add O(N C) element-wise scalings.
The per-row and per-class numbers (norms, the target column (K3, K7), the
coefficients of (K8)) are length-N and length-C vectors computed on the host in
NumPy, in float64 whatever the data's dtype: as NDArray operations each of their
few dozen steps would cost a dispatch, which is most of this op's fixed cost per call.
"""
import ctypes

import mxnet as mx
import numpy as np
from mxnet.ndarray._internal import _imperative_invoke
from mxnet.base import _LIB, OpHandle, c_str, check_call

from . import hooks
from .arrays import on_legacy_arrays
from .hooks import relay_errors
from .kinds import KINDS, MarginSettings, angle_floor

__all__ = ["MarginSoftmaxOp", "MarginSoftmaxProp", "LSoftmaxProp", "check_labels", "target_column"]

FLOAT = ("float32", "float64")


def check_labels(label, num_classes):
    """Return the labels as a host int64 array; raise ValueError naming the first
    label that is not an integer in [0, C)."""
    values = label.asnumpy()
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= num_classes)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"margin softmax input label must hold integer class indices in [0, {num_classes}), "
            f"got label[{index}] = {values[index]!r}")
    return values.astype(np.int64)


def _inverse_or_zero(values, numerator=1.0):
    """numerator / values where values > 0, else 0 (K9): no division by zero is formed."""
    values = np.asarray(values, dtype=np.float64)
    return np.divide(numerator, values, out=np.zeros_like(values), where=values > 0)


def scale_factors(settings, norm_x, norm_w):
    """rho = s / |x| (or 1) and kappa = 1 / |w| (or 1) of (K1), 0 for zero rows (K9); host float64."""
    row = settings.row
    rho = _inverse_or_zero(norm_x, settings.values.get("s", 1.0)) if row.normalise_features else np.ones_like(norm_x)
    kappa = _inverse_or_zero(norm_w) if row.normalise_weights else np.ones_like(norm_w)
    return rho, kappa


def check_factor_range(rho, kappa, norm_x, norm_w, dtype):
    """ValueError naming the rows where rho_i kappa_j leaves ``dtype``: the op scales its raw
    products by it in ``dtype`` (K6-K8), so their logits and gradients there would be NaN or
    inf. In float32 that takes |x_i| |w_j| < s / 3.4e38 (docs/derivatives.md, limit of float32)."""
    largest_row, largest_class = int(np.argmax(rho)), int(np.argmax(kappa))
    largest = rho[largest_row] * kappa[largest_class]
    limit = float(np.finfo(dtype).max)
    if largest > limit:
        raise ValueError(
            f"margin softmax inputs data and weight: data row {largest_row} (norm {norm_x[largest_row]:.3g}) and "
            f"weight row {largest_class} (norm {norm_w[largest_class]:.3g}) make the normalisation's factor "
            f"{largest:.3g}, beyond {np.dtype(dtype).name} ({limit:.3g}), where the Python op's logits and "
            f"gradients would be NaN: use float64 data, backend='compiled', or rows of larger norm "
            f"(zero rows are fine)")


def target_column(settings, f, norm_x, norm_w, beta, floor, margin=None):
    """The target logit and its partials, float64 host arrays of shape (N,) (K3, K7, K9).

    f = x . w_y (raw), norm_x = |x|, norm_w = |w_y|; ``margin`` (N,), the margin of
    each row's class where the kind takes per-class margins (K10), else None (the
    settings' margin). Returns a dict with o (the training target), d_f = do/df,
    d_norm_x = do/d|x|, d_norm_w = do/d|w_y|; degenerate rows (|x| |w_y| = 0) keep
    the plain logit z of the kind and its partials.
    """
    row = settings.row
    rho, kappa = scale_factors(settings, norm_x, norm_w)
    inverse_x, inverse_w = _inverse_or_zero(norm_x), _inverse_or_zero(norm_w)
    product = norm_x * norm_w
    regular = product > 0
    # f / |x| / |w_y| rather than f / (|x| |w_y|): the product of two float64 norms can overflow.
    c = np.clip(f * inverse_x * inverse_w, -1.0, 1.0)
    values = settings.values if margin is None else dict(settings.values, margin=margin)
    psi, psi_prime = row.psi(c, values, floor)
    z = rho * kappa * f
    radius = rho * kappa * product  # r of (K1)
    blend = 1.0 / (1.0 + beta)
    d_z_norm_x = -z * inverse_x if row.normalise_features else np.zeros_like(z)
    d_z_norm_w = -z * inverse_w if row.normalise_weights else np.zeros_like(z)
    radius_has_x = 0.0 if row.normalise_features else 1.0
    radius_has_w = 0.0 if row.normalise_weights else 1.0
    # Degenerate rows can make these inf * 0 = NaN; np.where then keeps the plain values.
    with np.errstate(invalid="ignore", over="ignore"):
        o = (beta * z + radius * psi) * blend
        d_f = rho * kappa * (beta + psi_prime) * blend
        d_norm_x = (beta * d_z_norm_x + radius * inverse_x * (radius_has_x * psi - c * psi_prime)) * blend
        d_norm_w = (beta * d_z_norm_w + radius * inverse_w * (radius_has_w * psi - c * psi_prime)) * blend
    return dict(
        o=np.where(regular, o, z),
        d_f=np.where(regular, d_f, rho * kappa),
        d_norm_x=np.where(regular, d_norm_x, d_z_norm_x),
        d_norm_w=np.where(regular, d_norm_w, d_z_norm_w),
    )


# Row-wise work on arrays up to this many entries (the (N, D) data, small weights) runs on
# the host: one copy and NumPy beat MXNet's cost per operation (about 0.1-0.2 ms here,
# docs/performance.md); larger arrays stay in MXNet's engine.
HOST_ENTRIES = 1 << 20


def row_norms(rows, scratch=None):
    """|v| of every row of a (K, D) array, a float64 host array (K,); ``scratch``, if given,
    a (K, D) array of the rows' dtype to hold the squares.

    Small arrays (the (N, D) data): sums of squares on the host in float64. Large ones (a
    (C, D) weight): one FullyConnected against a ones vector (oneDNN; 2-4 times faster than
    MXNet's norm or batch_dot here). Rows whose sum overflows or underflows are recomputed
    with MXNet's norm, which scales as BLAS nrm2 does.
    """
    count, dims = rows.shape
    if rows.size <= HOST_ENTRIES:
        values = rows.asnumpy().astype(np.float64)
        host = np.einsum("ij,ij->i", values, values)
    else:
        ones = mx.nd.ones((1, dims), ctx=rows.context, dtype=rows.dtype)
        host = mx.nd.FullyConnected(mx.nd.square(rows, out=scratch), ones, no_bias=True,
                                    num_hidden=1).reshape((count,)).asnumpy()
    tiny = np.finfo(host.dtype).tiny / np.finfo(host.dtype).eps
    if np.all(np.isfinite(host) & (host > tiny)):  # 0 may be an underflow: a zero row takes the fallback
        return np.sqrt(host.astype(np.float64))
    return mx.nd.norm(rows, axis=1).astype("float64").asnumpy()


def to_ndarray(values, context, dtype):
    """A host array as a new NDArray of ``dtype``: MXNet's copy directly (``mx.nd.array`` goes
    through NDArray's slice assignment, about 0.3 ms more per call here)."""
    array = mx.nd.empty(np.shape(values), ctx=context, dtype=dtype)
    array._sync_copyfrom(np.ascontiguousarray(values, dtype=dtype))
    return array


def scatter_set(array, index, values):
    """array[index[0, k], ..., index[m-1, k]] = values[k] in place; ``index`` an (m, K) int64
    NDArray, ``values`` an NDArray or a host array whose first axis is K.

    MXNet's scatter directly: NDArray's advanced-index assignment wraps the same operator
    in about 2 ms of Python index handling per call on this machine (0.1 ms this way).
    """
    if not isinstance(values, mx.nd.NDArray):
        values = to_ndarray(values, array.context, array.dtype)
    mx.nd._internal._scatter_set_nd(lhs=array, rhs=values, indices=index, shape=array.shape, out=array)


def scale_rows_exact(rows, coefficient):
    """coefficient[r] * rows[r] taken in float64 and rounded once to the rows' dtype, for
    (N, D)-sized arrays; ``coefficient`` a host array: no range check."""
    coefficient = np.asarray(coefficient, dtype=np.float64).reshape((-1, 1))
    if rows.size <= HOST_ENTRIES:
        return to_ndarray(rows.asnumpy().astype(np.float64) * coefficient, rows.context, rows.dtype)
    column = to_ndarray(coefficient, rows.context, np.float64)
    return mx.nd.broadcast_mul(rows.astype("float64"), column).astype(rows.dtype)


# MXNet 1.9.1 refuses any array, sparse ones included, whose shape has 2^31 or more
# entries: a (K, K) diagonal must stay below that.
DIAGONAL_BLOCK = 32768


def add_scaled_rows(accumulator, rows, coefficient, scratch=None):
    """accumulator[r] += coefficient[r] * rows[r] for (K, D) arrays, in place; ``coefficient``
    a float64 host array (K,); ``scratch``, if given, a (K, D) array of the rows' dtype for
    the products.

    Arrays of up to HOST_ENTRIES entries: the products on the host in float64. Larger ones:
    in the rows' dtype, as diagonal-block sparse products (one rounded product per entry,
    as broadcast_mul gives, at 1.6 times its speed over a (C, D) weight here). A
    coefficient such as P_i / |x_i| can leave float32 (|x| = 1e-22 gives 6e45) while its
    product with the row, of length |x|, does not: then the product is taken in float64.
    """
    dtype = np.dtype(rows.dtype)
    values = np.asarray(coefficient, dtype=np.float64)
    magnitude = np.abs(values)
    nonzero = magnitude[magnitude > 0]
    info = np.finfo(dtype)
    in_range = nonzero.size == 0 or (nonzero.max() < info.max and nonzero.min() >= info.tiny)
    if rows.size <= HOST_ENTRIES or not in_range:
        accumulator += scale_rows_exact(rows, coefficient)
        return
    count = rows.shape[0]
    for first in range(0, count, DIAGONAL_BLOCK):
        size = min(DIAGONAL_BLOCK, count - first)
        diagonal = mx.nd.sparse.csr_matrix(
            (values[first:first + size].astype(dtype), np.arange(size), np.arange(size + 1)),
            shape=(size, size), ctx=rows.context, dtype=dtype)
        # A slice along the first axis is a view, written through by `out` (`+=` on a
        # slice would copy the block back onto itself).
        block = accumulator[first:first + size]
        product = mx.nd.sparse.dot(diagonal, rows[first:first + size],
                                   out=None if scratch is None else scratch[first:first + size])
        mx.nd.elemwise_add(block, product, out=block)


_FULLY_CONNECTED_BACKWARD = []


def fully_connected_backward(grad_output, data, weight, grad_data, grad_weight):
    """grad_data = G W and grad_weight = G^T X (N x C by C x D, C x N by N x D), written in place.

    Runs MXNet's own ``_backward_FullyConnected``, the kernel the compiled backend's graph and
    FullyConnected itself use (oneDNN's inner-product backward in the pip wheel): ``dot`` and
    ``linalg.gemm2`` go to the wheel's generic BLAS, 3-6 times slower than oneDNN on some
    processors (docs/performance.md). A backward operator has no shape inference, so it is
    invoked by handle with its outputs allocated, as an executor invokes it.
    """
    if not _FULLY_CONNECTED_BACKWARD:
        handle = OpHandle()
        check_call(_LIB.NNGetOpHandle(c_str("_backward_FullyConnected"), ctypes.byref(handle)))
        _FULLY_CONNECTED_BACKWARD.append(handle.value)
    _imperative_invoke(_FULLY_CONNECTED_BACKWARD[0], [grad_output, data, weight],
                       ["no_bias", "num_hidden"], ["True", str(weight.shape[0])],
                       [grad_data, grad_weight], False, "default")


def row_and_column_sums(matrix):
    """Sums over axis 1 (N,) and over axis 0 (C,) of a (N, C) array, in one pass.

    FullyConnected's backward with ones for data and weight computes exactly
    matrix . 1 and matrix^T . 1 (oneDNN; MXNet's sum and BLAS gemv are 4 times slower).
    """
    rows, columns = matrix.shape
    context, dtype = matrix.context, matrix.dtype
    sums = [mx.nd.empty((rows, 1), ctx=context, dtype=dtype), mx.nd.empty((columns, 1), ctx=context, dtype=dtype)]
    fully_connected_backward(matrix, mx.nd.ones((rows, 1), ctx=context, dtype=dtype),
                             mx.nd.ones((columns, 1), ctx=context, dtype=dtype), *sums)
    return sums[0].reshape((-1,)), sums[1].reshape((-1,))


def outer_product(column, row, out=None):
    """column[i] * row[j] as an (len(column), len(row)) array: FullyConnected with one input
    unit, one rounded product per entry (broadcast_mul is 3-5 times slower here)."""
    return mx.nd.FullyConnected(column.reshape((-1, 1)), row.reshape((-1, 1)), no_bias=True,
                                num_hidden=row.shape[0], out=out)


def sum_by_class(values, host_labels):
    """Per-class sums of the rows of a host array ``values`` (N, K): (class indices (U,),
    sums (U, K)), each class's rows added in sample order.

    Each sum touches only its own class's rows, so a non-finite row reaches its own
    class's sum and no other (a dense one-hot product would spread 0 * inf = NaN to
    every class).
    """
    classes, position = np.unique(host_labels, return_inverse=True)
    order = np.argsort(position, kind="stable")
    starts = np.searchsorted(position[order], np.arange(len(classes)))
    return classes, np.add.reduceat(values[order], starts, axis=0)


class MarginSoftmaxOp(mx.operator.CustomOp):
    def __init__(self, settings, num_classes):
        super().__init__()
        self.settings = settings
        self.num_classes = num_classes
        # What the last training forward computed and its backward reuses
        # (None after an inference forward): MXNet runs a forward and its
        # backward on the same instance in every mode.
        self.saved = None
        self.buffers = {}

    def scratch(self, name, shape, like):
        """An (N, C) or (C, D) work array kept by this instance across calls.

        A fresh CPU array costs its page faults on first touch, as much again as the
        operation writing it (MXNet 1.9.1 does not pool CPU memory). A bound graph keeps
        its op instance, so its calls reuse these; the engine orders every use of a
        buffer in the order the calls pushed them, so a call cannot overwrite what an
        earlier one has yet to read.
        """
        buffer = self.buffers.get(name)
        if (buffer is None or buffer.shape != tuple(shape) or buffer.dtype != like.dtype
                or buffer.context != like.context):
            buffer = self.buffers[name] = mx.nd.empty(shape, like.context, like.dtype)
        return buffer

    @relay_errors
    @on_legacy_arrays
    def forward(self, is_train, req, in_data, out_data, aux):
        data, weight, label = in_data[:3]
        row = self.settings.row
        dtype, context = data.dtype, data.context
        # Write the product straight into the output when allowed: a (N, C)
        # copy costs as much as the whole target-column step.
        logits = out_data[0] if req[0] == "write" else mx.nd.empty(out_data[0].shape, context, dtype)
        mx.nd.FullyConnected(data, weight, no_bias=True, num_hidden=self.num_classes, out=logits)
        normalised = row.normalise_features or row.normalise_weights
        saved = dict(normalised=normalised, target=None)
        if normalised or is_train:
            saved["norm_x"] = row_norms(data)
        if normalised:
            saved["norm_all_w"] = row_norms(weight, self.scratch("weight_sized", weight.shape, weight))
            rho, kappa = scale_factors(self.settings, saved["norm_x"], saved["norm_all_w"])
            # Before the target column, which advances the step: a refused call leaves it.
            check_factor_range(rho, kappa, saved["norm_x"], saved["norm_all_w"], dtype)
        if is_train:
            class_margins = in_data[3] if self.settings.values.get("per_class_margin") else None
            saved["target"] = self._target(data, weight, label, logits, aux[0], saved, class_margins)
        if normalised:
            # One (N, C) matrix of rho_i kappa_j, reused by the backward: MXNet's broadcast
            # multiplications over (N, C) cost 2-3 times a plain element-wise one.
            saved["factors"] = outer_product(to_ndarray(rho, context, dtype), to_ndarray(kappa, context, dtype),
                                             out=self.scratch("factors", logits.shape, logits))
            mx.nd.elemwise_mul(logits, saved["factors"], out=logits)
        if is_train:
            target = saved["target"]
            scatter_set(logits, target["index"], target["o"])
        self.saved = saved
        if req[0] != "write":
            self.assign(out_data[0], req[0], logits)

    def _target(self, data, weight, label, logits, step, saved, class_margins=None):
        """The training target column (K3) and the per-row coefficients of (K8).

        Reads the raw target products from ``logits`` before they are scaled,
        advances ``step``; the numbers returned are float64 host arrays of shape (N,).
        """
        row = self.settings.row
        host_labels = check_labels(label, self.num_classes)
        t = float(step.asscalar())
        beta = self.settings.beta_at(t)
        # (i, y_i) of every row, for the scatters; its second row is the labels as indices.
        index = to_ndarray(np.stack([np.arange(len(host_labels)), host_labels]), data.context, np.int64)
        label_index = index[1]
        f = mx.nd.pick(logits, label_index, axis=1).astype("float64").asnumpy()
        norm_x = saved["norm_x"]
        w_y = None
        if saved["normalised"]:
            norm_w = saved["norm_all_w"][host_labels]
        else:
            w_y = mx.nd.take(weight, label_index, axis=0)
            norm_w = row_norms(w_y)
        margin = (None if class_margins is None
                  else mx.nd.take(class_margins, label_index).astype("float64").asnumpy())
        column = target_column(self.settings, f, norm_x, norm_w, beta, angle_floor(data.dtype), margin)
        step[:] = t + 1
        # MXNet waits for the outputs of a CustomOp, not for its auxiliary
        # states: without this wait the executor could read a stale step.
        step.wait_to_read()
        # (K8) with S_i and T_j taken over the output, whose target holds o
        # rather than z: P_i = [feat](-S_i / a_i) + g_iy p_i and
        # Q_j = [wt](-T_j / b_j) + sum_{y_i = j} g_iy q_i, where
        # p = do/da + [feat] o / a and q = do/db + [wt] o / b.
        p, q = column["d_norm_x"], column["d_norm_w"]
        if row.normalise_features:
            p = p + column["o"] * _inverse_or_zero(norm_x)
        if row.normalise_weights:
            q = q + column["o"] * _inverse_or_zero(norm_w)
        return dict(host_labels=host_labels, label_index=label_index, index=index, w_y=w_y, norm_w=norm_w,
                    o=column["o"], d_f=column["d_f"], p=p, q=q)

    @relay_errors
    @on_legacy_arrays
    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        """Gradients by (K8): the two products on G' and O(N D + C D) row scalings.

        For lsoftmax G' differs from G in the target column only, so the
        products run on G as it is and the difference is an O(N D) correction:
        dx += (do/df - 1) g w_y, dW rows y_i += (do/df - 1) g x_i.
        A backward after an inference forward differentiates the plain logits.
        """
        data, weight, label = in_data[:3]
        dtype, context = data.dtype, data.context
        grad_output = out_grad[0]
        grad_data = in_grad[0] if req[0] == "write" else mx.nd.empty(data.shape, context, dtype)
        grad_weight = in_grad[1] if req[1] == "write" else mx.nd.empty(weight.shape, context, dtype)
        saved, row = self.saved, self.settings.row
        target = saved["target"]
        if target is not None:
            g = mx.nd.pick(grad_output, target["label_index"], axis=1).astype("float64").asnumpy()
        if saved["normalised"]:
            # Same-shape (N, C) products by elemwise_mul: `*` dispatches to broadcast_mul,
            # 2-3 times slower over arrays this size.
            product_grad = mx.nd.elemwise_mul(grad_output, saved["factors"],
                                              out=self.scratch("product_grad", grad_output.shape, grad_output))
            if target is not None:
                scatter_set(product_grad, target["index"], g * target["d_f"])
            weighted = mx.nd.elemwise_mul(grad_output, out_data[0],  # G_ij o_ij: S_i and T_j of (K8)
                                          out=self.scratch("weighted", grad_output.shape, grad_output))
            weighted_row_sums, weighted_column_sums = row_and_column_sums(weighted)  # S_i, T_j
        else:
            product_grad = grad_output
        fully_connected_backward(product_grad, data, weight, grad_data, grad_weight)

        # lsoftmax after an inference forward took no norms: its plain logits x W^T need none, their
        # whole gradient being FullyConnected's.
        inverse_x = _inverse_or_zero(saved["norm_x"]) if "norm_x" in saved else None
        along_x = g * target["p"] if target is not None else np.zeros(data.shape[0])
        if saved["normalised"] and row.normalise_features:
            along_x = along_x - weighted_row_sums.asnumpy().astype(np.float64) * inverse_x
        if target is not None:
            per_sample_q = g * target["q"] * _inverse_or_zero(target["norm_w"])  # g q_i / |w_y|
        if saved["normalised"] and (target is not None or row.normalise_features):
            grad_data += scale_rows_exact(data, along_x * inverse_x)
        if saved["normalised"]:
            # Q_j / b_j for every class: -T_j / b_j^2 plus the target terms of its samples.
            coefficient_w = np.zeros_like(saved["norm_all_w"])
            if row.normalise_weights:
                inverse_w = _inverse_or_zero(saved["norm_all_w"])
                coefficient_w = -weighted_column_sums.asnumpy().astype(np.float64) * inverse_w * inverse_w
            if target is not None:
                # Per-class sums touch only each sample's own class: a non-finite row
                # reaches its own class and no other.
                coefficient_w += np.bincount(target["host_labels"], weights=per_sample_q,
                                             minlength=self.num_classes)
            add_scaled_rows(grad_weight, weight, coefficient_w,
                            self.scratch("weight_sized", weight.shape, weight))
        elif target is not None:
            # O(N D) on the host in float64 whatever N D (small next to the O(N C D)
            # products): q / |w_y| and |x| can be 1e-40 and 1e20 apart in float32.
            through_f = g * (target["d_f"] - 1)
            host_data = data.asnumpy().astype(np.float64)
            host_w_y = target["w_y"].asnumpy().astype(np.float64)
            grad_data += to_ndarray(host_data * (along_x * inverse_x)[:, None] + host_w_y * through_f[:, None],
                                    context, dtype)
            row_updates = host_data * through_f[:, None] + host_w_y * per_sample_q[:, None]
            classes, per_class = sum_by_class(row_updates, target["host_labels"])
            classes = to_ndarray(classes.reshape((1, -1)), context, np.int64)
            scatter_set(grad_weight, classes,
                        mx.nd.take(grad_weight, classes[0]) + to_ndarray(per_class, context, dtype))
        if req[0] != "write":
            self.assign(in_grad[0], req[0], grad_data)
        if req[1] != "write":
            self.assign(in_grad[1], req[1], grad_weight)
        for index in range(2, len(in_data)):  # labels and class margins are constants
            self.assign(in_grad[index], req[index], mx.nd.zeros_like(in_data[index]))


def _fits_shape(shape, expected):
    """Whether an input's shape, as shape inference hands it over, can be ``expected``.

    MXNet passes what it does not know yet as no shape at all, or as sizes of 0 or -1 (a
    Gluon weight with deferred ``in_units`` behind a layer whose own shape is still
    deferred arrives as (C, -1)): those are filled in from ``expected``, as FullyConnected
    fills in its weight; only a known size that differs is an error.
    """
    if not shape:
        return True
    return len(shape) == len(expected) and all(size <= 0 or size == want for size, want in zip(shape, expected))


class MarginSoftmaxProp(mx.operator.CustomOpProp):
    """Shape/type inference and parameter parsing for ``op_type='MarginSoftmax'``.

    Attributes: num_hidden (C, required), kind (default 'lsoftmax'), and the
    kind's settings (``mx_lsoftmax.kinds``; all validated here, when the op is created).
    """

    fixed_kind = None

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
            raise ValueError("margin softmax parameter num_hidden (the number of classes C) is required")
        try:
            self.num_classes = int(num_hidden)
        except ValueError:
            raise ValueError(f"margin softmax parameter num_hidden must be a positive integer, "
                             f"got {num_hidden!r}") from None
        if self.num_classes < 1:
            raise ValueError(f"margin softmax parameter num_hidden must be a positive integer, got {num_hidden!r}")
        if self.fixed_kind is not None:
            if "kind" in attrs:
                raise ValueError(f"op_type='LSoftmax' is the lsoftmax kind; use op_type='MarginSoftmax' "
                                 f"for kind={attrs['kind']!r}")
            attrs = dict(attrs, kind=self.fixed_kind)
        self.settings = MarginSettings.from_attrs(attrs)

    def _per_class_margin(self):
        return self.error is None and bool(self.settings.values.get("per_class_margin"))

    def list_arguments(self):
        return ["data", "weight", "label"] + (["class_margins"] if self._per_class_margin() else [])

    def list_outputs(self):
        return ["output"]

    def list_auxiliary_states(self):
        return ["step"]

    @relay_errors
    def infer_shape(self, in_shape):
        if self.error is not None:
            raise self.error
        data_shape, weight_shape, label_shape = in_shape[:3]
        if len(data_shape) != 2:
            raise ValueError(f"margin softmax input data must be 2-D (N, D), got shape {tuple(data_shape)}")
        n, d = data_shape
        expected_weight = (self.num_classes, d)
        if not _fits_shape(weight_shape, expected_weight):
            raise ValueError(
                f"margin softmax input weight must have shape (num_hidden, D) = {expected_weight}, "
                f"got {tuple(weight_shape)}")
        if not _fits_shape(label_shape, (n,)):
            raise ValueError(f"margin softmax input label must have shape (N,) = ({n},), got {tuple(label_shape)}")
        shapes = [data_shape, expected_weight, (n,)]
        if self._per_class_margin():
            if not _fits_shape(in_shape[3], (self.num_classes,)):
                raise ValueError(f"margin softmax input class_margins must have shape (num_hidden,) = "
                                 f"({self.num_classes},), got {tuple(in_shape[3])}")
            shapes.append((self.num_classes,))
        return shapes, [(n, self.num_classes)], [(1,)]

    @relay_errors
    def infer_type(self, in_type):
        dtype = in_type[0]
        if np.dtype(dtype).name not in FLOAT:
            raise ValueError(f"margin softmax input data must be float32 or float64, got {np.dtype(dtype).name}")
        label_type = in_type[2] if in_type[2] is not None else dtype
        return [dtype, dtype, label_type] + [dtype] * (len(in_type) - 3), [dtype], [dtype]

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        return [out_grad[0], *in_data, out_data[0]]

    def create_operator(self, ctx, shapes, dtypes):
        return MarginSoftmaxOp(self.settings, self.num_classes)


mx.operator.register("MarginSoftmax")(MarginSoftmaxProp)


hooks.install()


@mx.operator.register("LSoftmax")
class LSoftmaxProp(MarginSoftmaxProp):
    """``op_type='LSoftmax'``: the lsoftmax kind (attributes num_hidden, margin, beta, ...)."""

    fixed_kind = "lsoftmax"
