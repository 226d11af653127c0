/*!
 * \file lsoftmax-inl.h
 * \brief The L-Softmax math, once, for the CPU (lsoftmax.cc) and the GPU (lsoftmax.cu).
 *
 * The compiled op is the fused target-column step of the layer: the heavy
 * products stay in MXNet's FullyConnected, and this op rewrites one column of
 * its output per row and routes the gradient through z, |x| and |w_y|.
 * Equation numbers (D1)...(D12) refer to docs/derivatives.md.
 *
 * Everything here is a small function usable from host and device code, so
 * the CUDA launcher calls these same functions; nothing is duplicated there.
 */
#ifndef LSOFTMAX_INL_H_
#define LSOFTMAX_INL_H_

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define LSOFTMAX_FUNCTION __host__ __device__ inline
#else
#define LSOFTMAX_FUNCTION inline
#endif

namespace lsoftmax {

/*! \brief The validated settings of one op node (see mx_lsoftmax/schedule.py). */
struct Params {
  int margin;
  double beta;
  double beta_min;
  double scale;
  double gamma;
  double power;
};

/*!
 * \brief beta_t = max(beta_min, beta scale^t (1 + gamma t)^(-power))   (D12)
 *
 * Evaluated in log space, like the Python side, so that scale^t for large t
 * underflows to 0 instead of overflowing an intermediate, and so that both
 * sides round the same way.
 */
LSOFTMAX_FUNCTION double beta_at(const Params& p, double step) {
  if (p.beta == 0.0) return p.beta_min > 0.0 ? p.beta_min : 0.0;
  const double log_value = log(p.beta) + step * log(p.scale) - p.power * log1p(p.gamma * step);
  const double value = exp(log_value);
  return value > p.beta_min ? value : p.beta_min;
}

/*! \brief The blended target logit and its partials in (z, |x|, |w_y|) (D6, D7). */
template <typename T>
struct TargetColumn {
  T output;    // o
  T d_z;       // do/dz
  T d_norm_x;  // do/d|x|
  T d_norm_w;  // do/d|w_y|
};

/*!
 * \brief o(z, a, b) = (beta z + a b psi(z / (a b))) / (1 + beta) and its partials.
 *
 * c = z / (a b) is clipped to [-1, 1]: rounding can push |c| past 1 for
 * nearly parallel vectors, where the polynomials are still well defined.
 * k comes from the m - 1 thresholds cos(j pi / m) (D2), no arccos, so the
 * result is exact at theta = k pi / m up to the rounding of the thresholds,
 * where psi is continuous anyway. T_m(c) and U_{m-1}(c) follow the
 * three-term recurrences (D3, D5): psi' = (-1)^k m U_{m-1}(c) is a
 * polynomial, so nothing divides by c or sin(theta).
 * Rows with a b = 0 keep the plain logit with do/dz = 1 (D11).
 */
template <typename T>
LSOFTMAX_FUNCTION TargetColumn<T> target_column(T z, T norm_x, T norm_w, T beta, int margin) {
  TargetColumn<T> result;
  const T product = norm_x * norm_w;
  if (!(product > T(0))) {
    result.output = z;
    result.d_z = T(1);
    result.d_norm_x = T(0);
    result.d_norm_w = T(0);
    return result;
  }
  T c = z / product;
  c = c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
  int k = 0;
  for (int j = 1; j < margin; ++j) {
    if (c < T(cos(j * M_PI / margin))) ++k;
  }
  T t_previous = T(1), t_current = c;  // T_0, T_1
  T u_previous = T(0), u_current = T(1);  // U_{-1}, U_0
  for (int n = 1; n < margin; ++n) {
    const T t_next = T(2) * c * t_current - t_previous;
    const T u_next = T(2) * c * u_current - u_previous;
    t_previous = t_current;
    t_current = t_next;
    u_previous = u_current;
    u_current = u_next;
  }
  const T sign = (k % 2) ? T(-1) : T(1);
  const T psi = sign * t_current - T(2 * k);
  const T psi_prime = sign * T(margin) * u_current;
  const T inverse_blend = T(1) / (T(1) + beta);
  const T radial = (psi - c * psi_prime) * inverse_blend;
  result.output = (beta * z + product * psi) * inverse_blend;
  result.d_z = (beta + psi_prime) * inverse_blend;
  result.d_norm_x = norm_w * radial;
  result.d_norm_w = norm_x * radial;
  return result;
}

/*! \brief Label value as a row index, or -1 when it is not an integer in [0, classes). */
template <typename L>
LSOFTMAX_FUNCTION int64_t class_index(L value, int64_t classes) {
  const double v = static_cast<double>(value);
  if (!(v >= 0.0) || !(v < static_cast<double>(classes))) return -1;
  const int64_t index = static_cast<int64_t>(v);
  return static_cast<double>(index) == v ? index : -1;
}

/*! \brief sqrt(sum_d v[d]^2) of one contiguous row, accumulated in T. */
template <typename T>
LSOFTMAX_FUNCTION T row_norm(const T* row, int64_t length) {
  T sum = T(0);
  for (int64_t d = 0; d < length; ++d) sum += row[d] * row[d];
  return sqrt(sum);
}

/*!
 * \brief Forward of one row i (D6): out[i, y] = o(logits[i, y], |x_i|, |w_y|).
 *
 * The caller has copied logits into out; z is read from the plain product so
 * that the blended logit and the untouched columns come from the same GEMM.
 */
template <typename T>
LSOFTMAX_FUNCTION void forward_row(int64_t i, int64_t y, const T* logits, const T* data,
                                   const T* weight, T* out, int64_t classes, int64_t dims,
                                   T beta, int margin) {
  const T z = logits[i * classes + y];
  const T norm_x = row_norm(data + i * dims, dims);
  const T norm_w = row_norm(weight + y * dims, dims);
  out[i * classes + y] = target_column(z, norm_x, norm_w, beta, margin).output;
}

/*!
 * \brief The per-row coefficients of the backward (D7, D8).
 *
 * With g = dL/do_iy: the target column of dL/dlogits becomes g do/dz, the
 * data row gains (g do/d|x| / |x|) x_i (since d|x|/dx = x/|x|), and the
 * weight row y gains (g do/d|w_y| / |w_y|) w_y. Degenerate rows give zero
 * norm coefficients, so no 0/0 is ever formed.
 */
template <typename T>
struct RowGradient {
  T grad_target;  // g do/dz
  T along_data;   // coefficient of x_i
  T along_weight; // coefficient of w_y
};

template <typename T>
LSOFTMAX_FUNCTION RowGradient<T> backward_row(int64_t i, int64_t y, const T* grad_output,
                                              const T* logits, const T* data, const T* weight,
                                              int64_t classes, int64_t dims, T beta, int margin) {
  const T g = grad_output[i * classes + y];
  const T z = logits[i * classes + y];
  const T norm_x = row_norm(data + i * dims, dims);
  const T norm_w = row_norm(weight + y * dims, dims);
  const TargetColumn<T> column = target_column(z, norm_x, norm_w, beta, margin);
  RowGradient<T> result;
  result.grad_target = g * column.d_z;
  result.along_data = norm_x > T(0) ? g * column.d_norm_x / norm_x : T(0);
  result.along_weight = norm_w > T(0) ? g * column.d_norm_w / norm_w : T(0);
  return result;
}

}  // namespace lsoftmax

#endif  // LSOFTMAX_INL_H_
