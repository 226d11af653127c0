/*!
 * \file margin_softmax-inl.h
 * \brief The margin-softmax math, once, for the CPU (margin_softmax.cc) and the GPU
 *        (margin_softmax.cu): the table of kinds, the table of settings, psi, the target
 *        column, the row norms and the unit rows' gradient.
 *
 * The compiled op is the fused step of the layer around MXNet's FullyConnected:
 * FullyConnected computes the products f = x W^T, on the raw weight (lsoftmax)
 * or on its unit rows (the kinds that normalise weights, K11), and the target
 * op scales them into the kind's plain logits, rewrites the target column,
 * and routes the gradient through f and the norms |x_i| (and lsoftmax's
 * |w_y|) (K6-K8). Equation numbers (D1)...(D12), (K1)...(K11) refer to
 * docs/derivatives.md.
 *
 * The per-row scalar math runs in double whatever the data's dtype: it is O(N)
 * work, and it keeps cos(theta), psi and the norms free of float32 overflow.
 * Everything here is a small function usable from host and device code, so
 * the CUDA launchers call these same functions.
 */
#ifndef MARGIN_SOFTMAX_INL_H_
#define MARGIN_SOFTMAX_INL_H_

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MARGIN_FUNCTION __host__ __device__ inline
#else
#define MARGIN_FUNCTION inline
#endif

namespace margin_softmax {

/*! \brief The kinds (K1); their order is the order of kKinds below. */
enum Kind { kLSoftmax = 0, kSphereFace, kCosFace, kArcFace, kCombined, kNumKinds };

/*!
 * \brief The validated settings of one op node: every field of kSettingFields, plus the
 *        kind and what it normalises (copied from its row, so device code needs no table).
 */
struct Settings {
  int kind;
  bool normalise_features;
  bool normalise_weights;
  double margin, s, easy_margin, m1, m2, m3;
  double beta, beta_min, scale, gamma, power;
  double per_class_margin;  // 0 or 1: the margin of each class comes from the input class_margins
};

/*! \brief One setting: name, member, allowed range, meaning (the DMLC_DECLARE_FIELD habit). */
struct SettingField {
  const char* name;
  double Settings::*member;
  double low, high;  // bounds; +-HUGE_VAL for none
  bool low_open, high_open;
  const char* description;
};

// Bit i of a kind's `takes` mask: it accepts field i of kSettingFields.
enum SettingBit {
  kMarginBit = 1 << 0, kScaleSBit = 1 << 1, kEasyMarginBit = 1 << 2, kM1Bit = 1 << 3,
  kM2Bit = 1 << 4, kM3Bit = 1 << 5, kScheduleBits = 0x1f << 6, kPerClassMarginBit = 1 << 11,
};

static const SettingField kSettingFields[] = {
    {"margin", &Settings::margin, 0.0, HUGE_VAL, false, false,
     "the margin m: a multiple of the angle (lsoftmax, sphereface; an integer >= 1), a cosine "
     "offset (cosface) or an angle in radians (arcface, < pi)"},
    {"s", &Settings::s, 0.0, HUGE_VAL, true, false, "the logit scale of the normalised kinds"},
    {"easy_margin", &Settings::easy_margin, 0.0, 1.0, false, false,
     "arcface: shift the angle only where cos(theta) > 0 (0 or 1)"},
    {"m1", &Settings::m1, 0.0, HUGE_VAL, true, false, "combined margin: multiplies the angle"},
    {"m2", &Settings::m2, 0.0, M_PI, false, true, "combined margin: added to the angle"},
    {"m3", &Settings::m3, 0.0, HUGE_VAL, false, false, "combined margin: subtracted from cos"},
    {"beta", &Settings::beta, 0.0, HUGE_VAL, false, false, "initial blend weight (D12)"},
    {"beta_min", &Settings::beta_min, 0.0, HUGE_VAL, false, false, "floor of the schedule"},
    {"scale", &Settings::scale, 0.0, 1.0, true, false, "geometric decay per training step"},
    {"gamma", &Settings::gamma, 0.0, HUGE_VAL, false, false, "power-decay rate per step"},
    {"power", &Settings::power, 0.0, HUGE_VAL, true, false, "power-decay exponent"},
    {"per_class_margin", &Settings::per_class_margin, 0.0, 1.0, false, false,
     "cosface: take the margin of each class from the extra input class_margins (C,) (LDAM); "
     "0 or 1"},
};
constexpr int kNumSettingFields = sizeof(kSettingFields) / sizeof(kSettingFields[0]);

/*! \brief One row of the table of kinds (K1, K4): what it normalises, takes and defaults to. */
struct KindRow {
  const char* name;
  bool normalise_features;
  bool normalise_weights;
  bool integer_margin;
  unsigned takes;     // SettingBit mask
  Settings defaults;  // kind and flags filled in by the parser
};

// Defaults (K4): margin, s, m1, m2, m3, beta, beta_min, gamma; scale = power = 1, easy_margin 0.
#define MARGIN_DEFAULTS(margin, s, m1, m2, m3, beta, beta_min, gamma) \
  Settings{0, false, false, margin, s, 0.0, m1, m2, m3, beta, beta_min, 1.0, gamma, 1.0, 0.0}
static const KindRow kKinds[kNumKinds] = {
    {"lsoftmax", false, false, true, kMarginBit | kScheduleBits,
     MARGIN_DEFAULTS(2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)},
    {"sphereface", false, true, true, kMarginBit | kScheduleBits,
     MARGIN_DEFAULTS(4.0, 1.0, 1.0, 0.0, 0.0, 1000.0, 5.0, 0.12)},
    {"cosface", true, true, false, kMarginBit | kScaleSBit | kScheduleBits | kPerClassMarginBit,
     MARGIN_DEFAULTS(0.35, 64.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)},
    {"arcface", true, true, false, kMarginBit | kScaleSBit | kEasyMarginBit | kScheduleBits,
     MARGIN_DEFAULTS(0.5, 64.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)},
    {"combined", true, true, false, kScaleSBit | kM1Bit | kM2Bit | kM3Bit | kScheduleBits,
     MARGIN_DEFAULTS(0.0, 64.0, 1.0, 0.3, 0.2, 0.0, 0.0, 0.0)},
};
#undef MARGIN_DEFAULTS

/*!
 * \brief beta_t = max(beta_min, beta scale^t (1 + gamma t)^(-power))   (D12)
 *
 * Evaluated in log space, like the Python side, so that scale^t for large t
 * underflows to 0 instead of overflowing an intermediate, and so that both
 * sides round the same way.
 */
MARGIN_FUNCTION double beta_at(const Settings& p, double step) {
  if (p.beta == 0.0) return p.beta_min > 0.0 ? p.beta_min : 0.0;
  const double log_value = log(p.beta) + step * log(p.scale) - p.power * log1p(p.gamma * step);
  const double value = exp(log_value);
  return value > p.beta_min ? value : p.beta_min;
}

/*! \brief delta of (K5): sqrt(eps) of the data's dtype, the floor of sin(theta) in psi'. */
template <typename T>
MARGIN_FUNCTION double angle_floor() {
  return sizeof(T) == sizeof(float) ? 3.4526698300124393e-04 : 1.4901161193847656e-08;
}

struct Psi {
  double value;       // psi(c)
  double derivative;  // psi'(c) = d psi / dc
};

/*!
 * \brief psi(c) and psi'(c) of a kind (D4, D5, K1, K5).
 *
 * lsoftmax / sphereface: k from the m - 1 thresholds cos(j pi / m) (D2), T_m
 * and U_{m-1} by the three-term recurrences (D3, D5): polynomials, nothing
 * divides by c or sin(theta). The angle-based kinds divide by
 * max(sin theta, floor) (K5): exact where sin(theta) >= floor, tapering to 0
 * at the poles, where the vector psi' multiplies has length ~sin(theta).
 */
MARGIN_FUNCTION Psi psi(const Settings& p, double c, double floor) {
  Psi result;
  const double sine = sqrt(fmax(1.0 - c * c, 0.0));
  switch (p.kind) {
    case kCosFace:
      result.value = c - p.margin;
      result.derivative = 1.0;
      return result;
    case kArcFace: {
      const double cos_m = cos(p.margin), sin_m = sin(p.margin);
      // insightface's guard: theta < pi - m, i.e. c > -cos m; easy_margin: c > 0.
      const bool shifted = p.easy_margin != 0.0 ? c > 0.0 : c > -cos_m;
      if (shifted) {
        result.value = c * cos_m - sine * sin_m;  // cos(theta + m)
        result.derivative = (sine * cos_m + c * sin_m) / fmax(sine, floor);
      } else {
        result.value = p.easy_margin != 0.0 ? c : c - p.margin * sin_m;
        result.derivative = 1.0;
      }
      return result;
    }
    case kCombined: {
      const double angle = p.m1 * acos(c) + p.m2;
      result.value = cos(angle) - p.m3;
      result.derivative = p.m1 * sin(angle) / fmax(sine, floor);
      return result;
    }
    default: {  // kLSoftmax, kSphereFace
      const int margin = static_cast<int>(p.margin);
      int k = 0;
      for (int j = 1; j < margin; ++j) {
        if (c < cos(j * M_PI / margin)) ++k;
      }
      double t_previous = 1.0, t_current = c;    // T_0, T_1
      double u_previous = 0.0, u_current = 1.0;  // U_{-1}, U_0
      for (int n = 1; n < margin; ++n) {
        const double t_next = 2.0 * c * t_current - t_previous;
        const double u_next = 2.0 * c * u_current - u_previous;
        t_previous = t_current;
        t_current = t_next;
        u_previous = u_current;
        u_current = u_next;
      }
      const double sign = (k % 2) ? -1.0 : 1.0;
      result.value = sign * t_current - 2.0 * k;
      result.derivative = sign * margin * u_current;
      return result;
    }
  }
}

/*!
 * \brief The settings of a row whose target class is y (K10).
 *
 * With per-class margins (LDAM) the kind's margin is the target class's entry of
 * class_margins; everything else, and every other row's settings, is unchanged.
 */
template <typename T>
MARGIN_FUNCTION Settings row_settings(const Settings& p, const T* class_margins, int64_t y) {
  if (p.per_class_margin == 0.0 || class_margins == nullptr) return p;
  Settings row = p;
  row.margin = static_cast<double>(class_margins[y]);
  return row;
}

/*! \brief rho_i of (K1): s / |x_i| under feature normalisation (0 for a zero row), else 1. */
MARGIN_FUNCTION double feature_factor(const Settings& p, double norm_x) {
  if (!p.normalise_features) return 1.0;
  return norm_x > 0.0 ? p.s / norm_x : 0.0;
}

/*! \brief The target entry: its output and the coefficients of the backward (K3, K7, K8). */
struct TargetColumn {
  double output;  // o (training), or z where a b = 0
  double d_f;     // do/df, the target entry of G' / g
  double p;       // P_i = [feat](-S_i / a) + g p, S over the output (K8)
  double q;       // Q_y gains g q (lsoftmax: the only kind whose logits hold the raw |w_y|)
};

/*!
 * \brief The training target of one row from f, a = |x|, b = |w_y| (K3, K7, K11).
 *
 * f is x . w_y, or x . w_y / b where the kind normalises weights: the weights
 * reach FullyConnected as unit rows (K11), so b only marks a zero row there.
 * r = rho a b for lsoftmax, rho a for sphereface, s for the others (K1).
 * p folds the target's own term of S_i, taken over the output (which holds o,
 * not z, in the target column), into the row's coefficient: p = do/da +
 * [feat] o / a; q = do/db. Rows with a b = 0 keep the plain logit z = 0 with
 * do/df = rho (K9).
 */
MARGIN_FUNCTION TargetColumn target_column(const Settings& p, double f, double a, double b,
                                           double beta, double floor) {
  TargetColumn result;
  const double rho = feature_factor(p, a);
  const double z = rho * f;
  if (!(a > 0.0 && b > 0.0)) {
    result.output = z;
    result.d_f = rho;
    result.p = 0.0;
    result.q = 0.0;
    return result;
  }
  const double inverse_a = 1.0 / a;
  // cos(theta): f / (a b) for raw weights, written so that a b cannot overflow.
  double c = p.normalise_weights ? f * inverse_a : f * inverse_a * (1.0 / b);
  c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
  const Psi value = psi(p, c, floor);
  const double radius = p.normalise_features ? p.s : (p.normalise_weights ? a : a * b);
  const double blend = 1.0 / (1.0 + beta);
  const double dz_da = p.normalise_features ? -z * inverse_a : 0.0;
  const double radius_has_a = p.normalise_features ? 0.0 : 1.0;
  result.output = (beta * z + radius * value.value) * blend;
  result.d_f = rho * (beta + value.derivative) * blend;
  const double d_a =
      (beta * dz_da + radius * inverse_a * (radius_has_a * value.value - c * value.derivative)) * blend;
  result.p = d_a + (p.normalise_features ? result.output * inverse_a : 0.0);
  // Only raw weights carry b in r and in c; unit rows get their gradient through (K11).
  // radius * (1 / b), not radius / b: the rounding lsoftmax has always had.
  result.q = p.normalise_weights ? 0.0 : radius * (1.0 / b) * (value.value - c * value.derivative) * blend;
  return result;
}

/*! \brief Label value as a row index, or -1 when it is not an integer in [0, classes). */
template <typename L>
MARGIN_FUNCTION int64_t class_index(L value, int64_t classes) {
  const double v = static_cast<double>(value);
  if (!(v >= 0.0) || !(v < static_cast<double>(classes))) return -1;
  const int64_t index = static_cast<int64_t>(v);
  return static_cast<double>(index) == v ? index : -1;
}

/*!
 * \brief Whether a float64 sum of squares can be trusted as it is.
 *
 * Squares of float32 values always fit a double (3.4e38^2 = 1.2e77, and the
 * smallest subnormal squared is 2e-90), so float32 norms never leave this
 * range. Float64 values above ~1e150 or below ~1e-150 can overflow or
 * underflow their squares; those rows are summed again with scaling, as BLAS
 * nrm2 does.
 */
MARGIN_FUNCTION bool square_sum_is_safe(double sum) {
  return sum < 1e300 && (sum == 0.0 || sum > 1e-290);
}

/*!
 * \brief sum_d u[d] v[d], accumulated in A (float64 by default), in eight interleaved partial sums.
 *
 * A single running sum is a dependency chain the compiler may not reorder
 * (IEEE order), so it stays scalar; eight independent lanes vectorise, and
 * pairwise-summing them keeps the rounding error lower than one chain.
 */
template <typename A = double, typename T>
MARGIN_FUNCTION A dot_product(const T* u, const T* v, int64_t length) {
  A lanes[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t d = 0;
  for (; d + 8 <= length; d += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] += static_cast<A>(u[d + k]) * static_cast<A>(v[d + k]);
  }
  for (; d < length; ++d) lanes[0] += static_cast<A>(u[d]) * static_cast<A>(v[d]);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

template <typename T>
MARGIN_FUNCTION double sum_of_squares(const T* row, int64_t length) {
  return dot_product(row, row, length);
}

/*! \brief |v| of one contiguous row, without overflow or underflow for any finite input. */
template <typename T>
MARGIN_FUNCTION double row_norm(const T* row, int64_t length) {
  const double sum = sum_of_squares(row, length);
  if (square_sum_is_safe(sum)) return sqrt(sum);
  double largest = 0.0;
  for (int64_t d = 0; d < length; ++d) largest = fmax(largest, fabs(static_cast<double>(row[d])));
  if (largest == 0.0 || !(largest < HUGE_VAL)) return largest;  // 0, or a non-finite row
  double scaled = 0.0;
  for (int64_t d = 0; d < length; ++d) {
    const double v = static_cast<double>(row[d]) / largest;
    scaled += v * v;
  }
  return largest * sqrt(scaled);
}

/*!
 * \brief Whether `exact`, rounded to T, is finite and, unless 0, of T's normal range: then a row
 *        of T scaled by it stays in T (vectorised in T on the CPU); else the row is scaled in
 *        float64, and only such rows can overflow T (the ops' overflow checks look at them alone).
 */
template <typename T>
MARGIN_FUNCTION bool fits(double exact) {
  const double value = static_cast<double>(static_cast<T>(exact));
  const double smallest = sizeof(T) == sizeof(float) ? 1.1754943508222875e-38 : 2.2250738585072014e-308;
  return isfinite(value) && (exact == 0.0 || fabs(value) >= smallest);
}

/*! \brief The factor of the unit row v / |v|: 1 / |v|, or 0 for a zero row (K9, K11). */
MARGIN_FUNCTION double unit_factor(double norm) { return norm > 0.0 ? 1.0 / norm : 0.0; }

/*! \brief dL/dv = along_gradient g_u + along_unit u for one row (K11). */
struct UnitRowGradient {
  double along_gradient, along_unit;
};

/*!
 * \brief The gradient of a row v through its unit row u = v / n and its norm n = |v| (K11).
 *
 * du/dv = (I - u u^T) / n and dn/dv = u^T, so with g_u = dL/du and g_n = dL/dn:
 *   dL/dv = (g_u - (g_u . u) u) / n + g_n u = g_u / n + (g_n - (g_u . u) / n) u.
 * `projection` is g_u . u. A zero row has neither derivative; it gets 0 (K9).
 */
MARGIN_FUNCTION UnitRowGradient unit_row_gradient(double norm, double projection, double grad_norm) {
  UnitRowGradient result;
  if (!(norm > 0.0)) {
    result.along_gradient = 0.0;
    result.along_unit = 0.0;
    return result;
  }
  result.along_gradient = 1.0 / norm;
  result.along_unit = grad_norm - projection / norm;
  return result;
}

}  // namespace margin_softmax

#endif  // MARGIN_SOFTMAX_INL_H_
