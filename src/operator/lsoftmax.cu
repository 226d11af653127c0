/*!
 * \file lsoftmax.cu
 * \brief GPU kernels of ``lsoftmax_target``: thin launchers around lsoftmax-inl.h.
 *
 * One thread block per row: the block reduces |x_i| and |w_y| (the only
 * O(D) work), then one thread evaluates the shared host/device math of
 * lsoftmax-inl.h. Everything runs on the stream MXNet hands the op.
 *
 * This file does not include lib_api.h (which would need cuRAND's headers
 * under nvcc): lsoftmax.cc, compiled by the host compiler, registers the op
 * and calls the launchers below with raw device pointers. The extern "C"
 * entry points at the end let tests drive the same kernels from CuPy.
 */
#include <cuda_runtime.h>

#include "lsoftmax-inl.h"
#include "lsoftmax-gpu.h"

namespace lsoftmax {
namespace {

constexpr int kThreads = 256;

// Block-wide sums of v.v for two rows at once (|x_i|^2 and |w_y|^2).
template <typename T>
__device__ void block_squared_norms(const T* x, const T* w, int64_t dims, T* x_out, T* w_out) {
  __shared__ T partial_x[kThreads];
  __shared__ T partial_w[kThreads];
  T sum_x = T(0), sum_w = T(0);
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    sum_x += x[d] * x[d];
    sum_w += w[d] * w[d];
  }
  partial_x[threadIdx.x] = sum_x;
  partial_w[threadIdx.x] = sum_w;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial_x[threadIdx.x] += partial_x[threadIdx.x + stride];
      partial_w[threadIdx.x] += partial_w[threadIdx.x + stride];
    }
    __syncthreads();
  }
  *x_out = partial_x[0];
  *w_out = partial_w[0];
}

template <typename T, typename L>
__global__ void forward_kernel(const T* logits, const T* data, const T* weight, const L* label,
                               const T* step, T* out, int64_t classes, int64_t dims,
                               Params params, int* bad_label) {
  const int64_t i = blockIdx.x;
  const int64_t y = class_index(label[i], classes);
  if (y < 0) {
    if (threadIdx.x == 0) atomicMin(bad_label, static_cast<int>(i));
    return;
  }
  T squared_x, squared_w;
  block_squared_norms(data + i * dims, weight + y * dims, dims, &squared_x, &squared_w);
  if (threadIdx.x == 0) {
    const T beta = static_cast<T>(beta_at(params, static_cast<double>(step[0])));
    out[i * classes + y] =
        target_column(logits[i * classes + y], sqrt(squared_x), sqrt(squared_w), beta,
                      params.margin).output;
  }
}

// Runs after every row has read the step: publishes beta and advances the schedule.
template <typename T>
__global__ void advance_step_kernel(T* step, T* beta_used, Params params) {
  beta_used[0] = static_cast<T>(beta_at(params, static_cast<double>(step[0])));
  step[0] += T(1);
}

template <typename T, typename L>
__global__ void backward_kernel(const T* grad_output, const T* logits, const T* data,
                                const T* weight, const L* label, const T* beta_used,
                                T* grad_logits, T* grad_data, T* grad_weight, int64_t classes,
                                int64_t dims, int margin, int* bad_label) {
  const int64_t i = blockIdx.x;
  const int64_t y = class_index(label[i], classes);
  if (y < 0) {
    if (threadIdx.x == 0) atomicMin(bad_label, static_cast<int>(i));
    return;
  }
  const T* x = data + i * dims;
  const T* w = weight + y * dims;
  T squared_x, squared_w;
  block_squared_norms(x, w, dims, &squared_x, &squared_w);
  __shared__ T along_data, along_weight;
  if (threadIdx.x == 0) {
    const T norm_x = sqrt(squared_x), norm_w = sqrt(squared_w);
    const T g = grad_output[i * classes + y];
    const TargetColumn<T> column =
        target_column(logits[i * classes + y], norm_x, norm_w, beta_used[0], margin);
    grad_logits[i * classes + y] = g * column.d_z;
    along_data = norm_x > T(0) ? g * column.d_norm_x / norm_x : T(0);
    along_weight = norm_w > T(0) ? g * column.d_norm_w / norm_w : T(0);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    grad_data[i * dims + d] = along_data * x[d];
    // Several rows may share a target class: their weight shares add up.
    atomicAdd(grad_weight + y * dims + d, along_weight * w[d]);
  }
}

// The flag lives in scratch the caller owns (OpResource's allocator in
// lsoftmax.cc, a CuPy array in the tests).
int read_bad_label(int* bad_label, cudaStream_t stream) {
  int host = kNoBadLabel;
  cudaMemcpyAsync(&host, bad_label, sizeof(int), cudaMemcpyDeviceToHost, stream);
  cudaStreamSynchronize(stream);
  return host;
}

}  // namespace

template <typename T, typename L>
int forward_gpu_launch(const GpuForward<T, L>& a) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  cudaMemcpyAsync(a.out, a.logits, sizeof(T) * a.rows * a.classes, cudaMemcpyDeviceToDevice,
                  stream);
  cudaMemsetAsync(a.bad_label, kNoBadLabelByte, sizeof(int), stream);
  if (a.rows > 0) {
    forward_kernel<<<a.rows, kThreads, 0, stream>>>(a.logits, a.data, a.weight, a.label, a.step,
                                                    a.out, a.classes, a.dims, a.params,
                                                    a.bad_label);
  }
  // The label check needs one small copy back; it keeps a bad label from
  // advancing the schedule and from passing silently.
  const int bad = read_bad_label(a.bad_label, stream);
  if (bad != kNoBadLabel) return bad;
  advance_step_kernel<<<1, 1, 0, stream>>>(a.step, a.beta_used, a.params);
  return cudaGetLastError() == cudaSuccess ? kGpuSuccess : kCudaFailure;
}

template <typename T, typename L>
int backward_gpu_launch(const GpuBackward<T, L>& a) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  cudaMemcpyAsync(a.grad_logits, a.grad_output, sizeof(T) * a.rows * a.classes,
                  cudaMemcpyDeviceToDevice, stream);
  cudaMemsetAsync(a.grad_weight, 0, sizeof(T) * a.classes * a.dims, stream);
  cudaMemsetAsync(a.bad_label, kNoBadLabelByte, sizeof(int), stream);
  if (a.rows > 0) {
    backward_kernel<<<a.rows, kThreads, 0, stream>>>(
        a.grad_output, a.logits, a.data, a.weight, a.label, a.beta_used, a.grad_logits,
        a.grad_data, a.grad_weight, a.classes, a.dims, a.margin, a.bad_label);
  }
  const int bad = read_bad_label(a.bad_label, stream);
  if (bad != kNoBadLabel) return bad;
  return cudaGetLastError() == cudaSuccess ? kGpuSuccess : kCudaFailure;
}

void zero_device(void* pointer, size_t bytes, void* stream) {
  cudaMemsetAsync(pointer, 0, bytes, static_cast<cudaStream_t>(stream));
}

#define LSOFTMAX_INSTANTIATE(T, L)                                   \
  template int forward_gpu_launch<T, L>(const GpuForward<T, L>&);   \
  template int backward_gpu_launch<T, L>(const GpuBackward<T, L>&);
#define LSOFTMAX_INSTANTIATE_LABELS(T) \
  LSOFTMAX_INSTANTIATE(T, float)       \
  LSOFTMAX_INSTANTIATE(T, double)      \
  LSOFTMAX_INSTANTIATE(T, int32_t)     \
  LSOFTMAX_INSTANTIATE(T, int64_t)     \
  LSOFTMAX_INSTANTIATE(T, uint8_t)     \
  LSOFTMAX_INSTANTIATE(T, int8_t)
LSOFTMAX_INSTANTIATE_LABELS(float)
LSOFTMAX_INSTANTIATE_LABELS(double)

}  // namespace lsoftmax

// ---------------------------------------------------------------------------
// Kernel-level C entry points for the CuPy tests (tests/test_lsoftmax_gpu.py):
// device pointers, sizes, settings, a stream (0 for the default), and a
// device int for the label flag. Labels are int64. Return kGpuSuccess (-1),
// the first bad row index, or kCudaFailure (-2).
// ---------------------------------------------------------------------------
#define LSOFTMAX_C_ENTRY(T, SUFFIX)                                                              \
  extern "C" int lsoftmax_forward_##SUFFIX(                                                       \
      const T* logits, const T* data, const T* weight, const int64_t* label, T* step, T* out,    \
      T* beta_used, int64_t rows, int64_t classes, int64_t dims, int margin, double beta,        \
      double beta_min, double scale, double gamma, double power, int* bad_label, void* stream) { \
    lsoftmax::Params params{margin, beta, beta_min, scale, gamma, power};                         \
    lsoftmax::GpuForward<T, int64_t> a{logits, data, weight, label, step, out, beta_used,        \
                                       rows, classes, dims, params, bad_label, stream};         \
    return lsoftmax::forward_gpu_launch(a);                                                       \
  }                                                                                               \
  extern "C" int lsoftmax_backward_##SUFFIX(                                                      \
      const T* grad_output, const T* logits, const T* data, const T* weight,                     \
      const int64_t* label, const T* beta_used, T* grad_logits, T* grad_data, T* grad_weight,    \
      int64_t rows, int64_t classes, int64_t dims, int margin, int* bad_label, void* stream) {   \
    lsoftmax::GpuBackward<T, int64_t> a{grad_output, logits, data, weight, label, beta_used,      \
                                        grad_logits, grad_data, grad_weight, rows, classes,      \
                                        dims, margin, bad_label, stream};                        \
    return lsoftmax::backward_gpu_launch(a);                                                      \
  }

LSOFTMAX_C_ENTRY(float, float32)
LSOFTMAX_C_ENTRY(double, float64)
