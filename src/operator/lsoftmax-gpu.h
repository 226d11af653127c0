/*!
 * \file lsoftmax-gpu.h
 * \brief The GPU launchers' arguments, shared by lsoftmax.cu (nvcc) and lsoftmax.cc (host
 *        compiler). Plain pointers and sizes only: no lib_api, no CUDA headers.
 */
#ifndef LSOFTMAX_GPU_H_
#define LSOFTMAX_GPU_H_

#include <stddef.h>
#include <stdint.h>

#include "lsoftmax-inl.h"

namespace lsoftmax {

// Launcher results: success, or the first row whose label is bad (>= 0), or a CUDA error.
constexpr int kGpuSuccess = -1;
constexpr int kCudaFailure = -2;
// The device flag starts here (a byte-wise memset); atomicMin leaves the first bad row in it.
constexpr int kNoBadLabelByte = 0x7f;
constexpr int kNoBadLabel = 0x7f7f7f7f;

/*! \brief Forward: out = logits with the target column blended; step advanced; beta published. */
template <typename T, typename L>
struct GpuForward {
  const T* logits;   // (rows, classes)
  const T* data;     // (rows, dims)
  const T* weight;   // (classes, dims)
  const L* label;    // (rows,)
  T* step;           // (1,), read then advanced
  T* out;            // (rows, classes)
  T* beta_used;      // (1,)
  int64_t rows, classes, dims;
  Params params;
  int* bad_label;    // one device int of scratch
  void* stream;      // cudaStream_t
};

/*! \brief Backward: gradients of the target-column step (D7, D8). */
template <typename T, typename L>
struct GpuBackward {
  const T* grad_output;  // (rows, classes)
  const T* logits;       // (rows, classes)
  const T* data;         // (rows, dims)
  const T* weight;       // (classes, dims)
  const L* label;        // (rows,)
  const T* beta_used;    // (1,), the forward's beta
  T* grad_logits;        // (rows, classes)
  T* grad_data;          // (rows, dims), the norm path only
  T* grad_weight;        // (classes, dims), the norm path only
  int64_t rows, classes, dims;
  int margin;
  int* bad_label;
  void* stream;
};

void zero_device(void* pointer, size_t bytes, void* stream);

template <typename T, typename L>
int forward_gpu_launch(const GpuForward<T, L>& arguments);
template <typename T, typename L>
int backward_gpu_launch(const GpuBackward<T, L>& arguments);

}  // namespace lsoftmax

#endif  // LSOFTMAX_GPU_H_
