/*!
 * \file margin_softmax-gpu.h
 * \brief The GPU launchers' arguments, shared by margin_softmax.cu (nvcc) and margin_softmax.cc
 *        (host compiler). Plain pointers, sizes and the Settings struct: no lib_api, no CUDA headers.
 */
#ifndef MARGIN_SOFTMAX_GPU_H_
#define MARGIN_SOFTMAX_GPU_H_

#include <stddef.h>
#include <stdint.h>

#include "margin_softmax-inl.h"

namespace margin_softmax {

/*! \brief What a launcher reports; row and value say which row, where one is at fault. */
enum GpuStatus {
  kGpuSuccess = -1,
  kCudaFailure = -2,
  kBadLabel = -4,           // row, value: the first row whose label is not a class index, its label
  kDataRowOverflow = -5,    // row, value: the first data row whose gradient left T, its norm
  kWeightRowOverflow = -6,  // row, value: the first weight row whose gradient left T, its norm
};
struct GpuResult {
  int status;
  int64_t row;
  double value;
};

// The device flags start here (a byte-wise memset); atomicMin leaves the first row in each.
constexpr int kNoRowByte = 0x7f;
constexpr int kNoRow = 0x7f7f7f7f;

/*! \brief Device scratch of the target op: two row flags and three float64 vectors. */
inline size_t gpu_scratch_bytes(int64_t rows, int64_t classes) {
  return sizeof(double) * (2 * rows + classes + 1);
}

/*! \brief Device scratch of the normalise op's backward: its row flag. */
inline size_t normalise_gpu_scratch_bytes() { return sizeof(double); }

/*! \brief Forward: out = the kind's logits with the target blended; norms; step advanced. */
template <typename T, typename L>
struct GpuForward {
  const T* logits;      // (rows, classes), x W^T: raw weights, or unit rows (K11)
  const T* data;        // (rows, dims)
  const T* weight;      // (classes, dims), raw weights (lsoftmax); else null
  const double* unit_weight_norm;  // (classes,) |w_j| of the unit rows the logits used (K11), or null
  const L* label;       // (rows,)
  T* step;              // (1,), read, then advanced while training
  const float* training;   // (1,) 1 while training, 0 outside: plain logits (K2); null: training
  const T* class_margins;  // (classes,) with settings.per_class_margin, else null
  T* out;               // (rows, classes)
  T* beta_used;         // (1,)
  double* data_norm;    // (rows,)
  double* weight_norm;  // (classes,)
  int64_t rows, classes, dims;
  Settings settings;
  void* scratch;        // gpu_scratch_bytes(rows, classes)
  void* stream;         // cudaStream_t
};

/*! \brief Backward (K8): grad_logits = G', and the norm paths of data and weight. */
template <typename T, typename L>
struct GpuBackward {
  const T* grad_output;        // (rows, classes)
  const T* logits;             // (rows, classes)
  const T* data;               // (rows, dims)
  const T* weight;             // (classes, dims), raw weights (lsoftmax); else null
  const L* label;              // (rows,)
  const float* training;       // (1,) the forward's flag: 0, the plain logits' gradient; null: 1
  const T* class_margins;      // (classes,) with settings.per_class_margin, else null
  const T* output;             // (rows, classes), the forward's output
  const T* beta_used;          // (1,), the forward's beta
  const double* data_norm;     // (rows,)
  const double* weight_norm;   // (classes,)
  T* grad_logits;              // (rows, classes)
  T* grad_data;                // (rows, dims), the norm path only
  T* grad_weight;              // (classes, dims), the norm path only (lsoftmax); else null
  int64_t rows, classes, dims;
  Settings settings;
  void* scratch;
  void* stream;
};

void zero_device(void* pointer, size_t bytes, void* stream);

template <typename T, typename L>
GpuResult forward_gpu_launch(const GpuForward<T, L>& arguments);
template <typename T, typename L>
GpuResult backward_gpu_launch(const GpuBackward<T, L>& arguments);

/*! \brief margin_softmax_normalise (K11): unit rows and norms; and the rows' gradient, with
 *         `scratch` of normalise_gpu_scratch_bytes(). */
template <typename T>
GpuResult normalise_gpu_launch(const T* rows, T* unit, double* norms, int64_t count, int64_t dims,
                               void* stream);
template <typename T>
GpuResult normalise_backward_gpu_launch(const T* grad_unit, const double* grad_norm, const T* unit,
                                        const double* norms, T* grad_rows, int64_t count,
                                        int64_t dims, void* scratch, void* stream);

}  // namespace margin_softmax

#endif  // MARGIN_SOFTMAX_GPU_H_
