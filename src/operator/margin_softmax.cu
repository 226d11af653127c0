/*!
 * \file margin_softmax.cu
 * \brief GPU kernels of ``margin_softmax_target`` and ``margin_softmax_normalise``: thin
 *        launchers around margin_softmax-inl.h.
 *
 * Row norms and the unit rows (K11): one block per row, reduced in float64
 * (scaled where the plain sum would overflow, as row_norm does on the CPU).
 * The (N, C) passes are grid-stride element-wise kernels; the target column
 * is one thread per row evaluating the shared target_column(). Everything
 * runs on the stream MXNet hands the op.
 *
 * This file does not include lib_api.h (which would need cuRAND's headers
 * under nvcc): margin_softmax.cc, compiled by the host compiler, registers the
 * op and calls the launchers below with raw device pointers.
 */
#include <cuda_runtime.h>

#include "margin_softmax-inl.h"
#include "margin_softmax-gpu.h"

namespace margin_softmax {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

// Block-wide reduction; `combine` is + or max. Every thread gets the result.
template <typename Combine>
__device__ double block_reduce(double value, Combine combine) {
  __shared__ double partial[kThreads];
  __syncthreads();  // the buffer may still be read from a previous call
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] = combine(partial[threadIdx.x], partial[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  return partial[0];
}

struct Add {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Max {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// |row| for one row per block, the block-parallel form of row_norm().
template <typename T>
__device__ double block_row_norm(const T* row, int64_t dims) {
  double sum = 0.0;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    sum += static_cast<double>(row[d]) * row[d];
  }
  sum = block_reduce(sum, Add());
  if (square_sum_is_safe(sum)) return sqrt(sum);
  double largest = 0.0;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    largest = fmax(largest, fabs(static_cast<double>(row[d])));
  }
  largest = block_reduce(largest, Max());
  if (largest == 0.0 || !(largest < HUGE_VAL)) return largest;
  double scaled = 0.0;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    const double v = static_cast<double>(row[d]) / largest;
    scaled += v * v;
  }
  return largest * sqrt(block_reduce(scaled, Add()));
}

template <typename T>
__global__ void norms_kernel(const T* rows, int64_t dims, double* norms) {
  const double norm = block_row_norm(rows + blockIdx.x * dims, dims);
  if (threadIdx.x == 0) norms[blockIdx.x] = norm;
}

// The training flag of GpuForward and GpuBackward, read on the device (no copy back, no sync);
// null counts as training.
__device__ bool is_training(const float* training) {
  return training == nullptr || *training != 0.0f;
}

// Norms of the target rows only (lsoftmax); rows sharing a class write the same value.
template <typename T, typename L>
__global__ void target_norms_kernel(const T* weight, const L* label, const float* training,
                                    int64_t classes, int64_t dims, double* weight_norm) {
  if (!is_training(training)) return;  // the plain logits read no label
  const int64_t y = class_index(label[blockIdx.x], classes);
  if (y < 0) return;  // reported by the target kernel
  const double norm = block_row_norm(weight + y * dims, dims);
  if (threadIdx.x == 0) weight_norm[y] = norm;
}

// out_ij = f_ij rho_i (K2).
template <typename T>
__global__ void scale_kernel(const T* logits, T* out, const double* data_norm, int64_t rows,
                             int64_t classes, Settings settings) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < rows * classes;
       index += int64_t(gridDim.x) * blockDim.x) {
    out[index] = static_cast<T>(logits[index] * feature_factor(settings, data_norm[index / classes]));
  }
}

// The class of row i, or -1 after flagging the row: atomicMin leaves the first bad row.
template <typename L>
__device__ int64_t checked_class(const L* label, int64_t i, int64_t classes, int* bad_label) {
  const int64_t y = class_index(label[i], classes);
  if (y < 0) atomicMin(bad_label, static_cast<int>(i));
  return y;
}

template <typename T, typename L>
__global__ void forward_target_kernel(const T* logits, const L* label, const T* step,
                                      const float* training, const T* class_margins, T* out,
                                      const double* data_norm, const double* weight_norm,
                                      int64_t rows, int64_t classes, Settings settings,
                                      int* bad_label) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= rows || !is_training(training)) return;  // outside training: the plain logits (K2)
  const int64_t y = checked_class(label, i, classes, bad_label);
  if (y < 0) return;
  const double beta = beta_at(settings, static_cast<double>(step[0]));
  out[i * classes + y] = static_cast<T>(target_column(row_settings(settings, class_margins, y),
                                                      logits[i * classes + y],
                                                      data_norm[i], weight_norm[y], beta,
                                                      angle_floor<T>()).output);
}

// Runs after every row has read the step: publishes beta and, while training, advances the
// schedule.
template <typename T>
__global__ void advance_step_kernel(T* step, const float* training, T* beta_used,
                                    Settings settings) {
  beta_used[0] = static_cast<T>(beta_at(settings, static_cast<double>(step[0])));
  if (is_training(training)) step[0] += T(1);
}

// G' = G rho off the target column, and S_i = sum_j G_ij o_ij; one block per row. G' can
// leave T only on a row whose rho does (|x| < s / max(T)): such a row is flagged, as the CPU
// op's backward reports it, rather than left inf.
template <typename T>
__global__ void backward_rows_kernel(const T* grad_output, const T* output, T* grad_logits,
                                     const double* data_norm, int64_t classes, Settings settings,
                                     double* row_sum, int* overflow_row) {
  const int64_t i = blockIdx.x;
  const double rho = feature_factor(settings, data_norm[i]);
  const bool may_overflow = !isfinite(static_cast<T>(rho));
  bool overflowed = false;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) {
    const int64_t index = i * classes + j;
    const T value = static_cast<T>(grad_output[index] * rho);
    grad_logits[index] = value;
    overflowed = overflowed || (may_overflow && !isfinite(value));
    sum += static_cast<double>(grad_output[index]) * output[index];
  }
  sum = block_reduce(sum, Add());
  if (threadIdx.x == 0) row_sum[i] = sum;
  if (overflowed) atomicMin(overflow_row, static_cast<int>(i));
}

template <typename T, typename L>
__global__ void backward_target_kernel(const T* grad_output, const T* logits, const L* label,
                                       const float* training, const T* class_margins,
                                       const T* beta_used, const double* data_norm,
                                       const double* weight_norm, T* grad_logits,
                                       const double* row_sum, double* along_data,
                                       double* along_weight, int64_t rows, int64_t classes,
                                       Settings settings, int* bad_label) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= rows) return;
  const double a = data_norm[i];
  double along = settings.normalise_features ? -row_sum[i] / (a > 0.0 ? a : 1.0) : 0.0;
  if (is_training(training)) {  // else the plain logits' gradient: no target column
    const int64_t y = checked_class(label, i, classes, bad_label);
    if (y < 0) return;
    const double b = weight_norm[y];
    const double g = grad_output[i * classes + y];
    const TargetColumn column =
        target_column(row_settings(settings, class_margins, y), logits[i * classes + y], a, b,
                      static_cast<double>(beta_used[0]), angle_floor<T>());
    grad_logits[i * classes + y] = static_cast<T>(g * column.d_f);
    along += g * column.p;
    // Only the sample's own class: a non-finite row reaches no other class's gradient.
    if (b > 0.0) atomicAdd(along_weight + y, g * column.q / b);
  }
  along_data[i] = a > 0.0 ? along / a : 0.0;
}

// out[r, d] = coefficient[r] * rows[r, d]: the norm paths P_i x_i / a_i and (lsoftmax) Q_j w_j / b_j.
template <typename T>
__global__ void scale_rows_kernel(const T* rows, const double* coefficient, T* out, int64_t count,
                                  int64_t dims) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < count * dims;
       index += int64_t(gridDim.x) * blockDim.x) {
    out[index] = static_cast<T>(coefficient[index / dims] * rows[index]);
  }
}

// unit = rows / |rows| (0 for a zero row) and the norms (K11); one block per row.
template <typename T>
__global__ void normalise_kernel(const T* rows, T* unit, double* norms, int64_t dims) {
  const int64_t r = blockIdx.x;
  const double norm = block_row_norm(rows + r * dims, dims);
  const double factor = unit_factor(norm);
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    unit[r * dims + d] = static_cast<T>(factor * static_cast<double>(rows[r * dims + d]));
  }
  if (threadIdx.x == 0) norms[r] = norm;
}

// dL/dv = along_gradient g_u + along_unit u (K11); one block per row. Only a row whose
// coefficients leave T (a norm below T's range) can overflow: it is flagged, as on the CPU.
template <typename T>
__global__ void normalise_backward_kernel(const T* grad_unit, const double* grad_norm, const T* unit,
                                          const double* norms, T* grad_rows, int64_t dims,
                                          int* overflow_row) {
  const int64_t r = blockIdx.x;
  double projection = 0.0;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    projection += static_cast<double>(grad_unit[r * dims + d]) * unit[r * dims + d];
  }
  projection = block_reduce(projection, Add());
  const UnitRowGradient row = unit_row_gradient(norms[r], projection, grad_norm ? grad_norm[r] : 0.0);
  const bool may_overflow = !(fits<T>(row.along_gradient) && fits<T>(row.along_unit));
  bool overflowed = false;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    const T value =
        static_cast<T>(row.along_gradient * static_cast<double>(grad_unit[r * dims + d]) +
                       row.along_unit * static_cast<double>(unit[r * dims + d]));
    grad_rows[r * dims + d] = value;
    overflowed = overflowed || (may_overflow && !isfinite(value));
  }
  if (overflowed) atomicMin(overflow_row, static_cast<int>(r));
}

// The row flags live in the caller's scratch (OpResource's allocator, or the harness's), two
// ints in one double slot, copied back together: one small copy and one wait per call.
struct RowFlags {
  int first, second;
};

RowFlags read_flags(const int* flags, cudaStream_t stream) {
  RowFlags host{kNoRow, kNoRow};
  cudaMemcpyAsync(&host, flags, sizeof(host), cudaMemcpyDeviceToHost, stream);
  cudaStreamSynchronize(stream);
  return host;
}

// One value of a device array, for an error message.
template <typename V>
double read_value(const V* values, int64_t row, cudaStream_t stream) {
  V host = V(0);
  cudaMemcpyAsync(&host, values + row, sizeof(V), cudaMemcpyDeviceToHost, stream);
  cudaStreamSynchronize(stream);
  return static_cast<double>(host);
}

GpuResult finished() {
  return GpuResult{cudaGetLastError() == cudaSuccess ? kGpuSuccess : kCudaFailure, -1, 0.0};
}

// Scratch layout: [bad_label, overflow_row (one double slot)][row_sum (rows)][along_data (rows)]
// [along_weight (classes)].
struct Scratch {
  int *bad_label, *overflow_row;
  double *row_sum, *along_data, *along_weight;
};

Scratch split(void* scratch, int64_t rows) {
  double* base = static_cast<double*>(scratch);
  int* flags = reinterpret_cast<int*>(base);
  return Scratch{flags, flags + 1, base + 1, base + 1 + rows, base + 1 + 2 * rows};
}

}  // namespace

template <typename T, typename L>
GpuResult forward_gpu_launch(const GpuForward<T, L>& a) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  const Scratch scratch = split(a.scratch, a.rows);
  cudaMemsetAsync(scratch.bad_label, kNoRowByte, sizeof(RowFlags), stream);
  if (a.rows > 0) norms_kernel<<<a.rows, kThreads, 0, stream>>>(a.data, a.dims, a.data_norm);
  if (a.settings.normalise_weights) {  // unit rows: their norms come with them (K11)
    cudaMemcpyAsync(a.weight_norm, a.unit_weight_norm, sizeof(double) * a.classes,
                    cudaMemcpyDeviceToDevice, stream);
  } else {
    cudaMemsetAsync(a.weight_norm, 0, sizeof(double) * a.classes, stream);
    if (a.rows > 0) {
      target_norms_kernel<<<a.rows, kThreads, 0, stream>>>(a.weight, a.label, a.training,
                                                           a.classes, a.dims, a.weight_norm);
    }
  }
  if (a.settings.normalise_features) {
    scale_kernel<<<blocks_for(a.rows * a.classes), kThreads, 0, stream>>>(
        a.logits, a.out, a.data_norm, a.rows, a.classes, a.settings);
  } else {
    cudaMemcpyAsync(a.out, a.logits, sizeof(T) * a.rows * a.classes, cudaMemcpyDeviceToDevice,
                    stream);
  }
  if (a.rows > 0) {
    forward_target_kernel<<<blocks_for(a.rows), kThreads, 0, stream>>>(
        a.logits, a.label, a.step, a.training, a.class_margins, a.out, a.data_norm,
        a.weight_norm, a.rows, a.classes, a.settings, scratch.bad_label);
  }
  // The label check needs one small copy back; it keeps a bad label from
  // advancing the schedule and from passing silently.
  const RowFlags flags = read_flags(scratch.bad_label, stream);
  if (flags.first != kNoRow) {
    return GpuResult{kBadLabel, flags.first, read_value(a.label, flags.first, stream)};
  }
  advance_step_kernel<<<1, 1, 0, stream>>>(a.step, a.training, a.beta_used, a.settings);
  return finished();
}

template <typename T, typename L>
GpuResult backward_gpu_launch(const GpuBackward<T, L>& a) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  const Scratch scratch = split(a.scratch, a.rows);
  cudaMemsetAsync(scratch.bad_label, kNoRowByte, sizeof(RowFlags), stream);
  if (a.settings.normalise_features) {
    if (a.rows > 0) {
      backward_rows_kernel<<<a.rows, kThreads, 0, stream>>>(a.grad_output, a.output,
                                                            a.grad_logits, a.data_norm, a.classes,
                                                            a.settings, scratch.row_sum,
                                                            scratch.overflow_row);
    }
  } else {
    cudaMemcpyAsync(a.grad_logits, a.grad_output, sizeof(T) * a.rows * a.classes,
                    cudaMemcpyDeviceToDevice, stream);
  }
  cudaMemsetAsync(scratch.along_weight, 0, sizeof(double) * a.classes, stream);
  if (a.rows > 0) {
    backward_target_kernel<<<blocks_for(a.rows), kThreads, 0, stream>>>(
        a.grad_output, a.logits, a.label, a.training, a.class_margins, a.beta_used, a.data_norm,
        a.weight_norm, a.grad_logits,
        scratch.row_sum, scratch.along_data, scratch.along_weight, a.rows, a.classes, a.settings,
        scratch.bad_label);
  }
  const RowFlags flags = read_flags(scratch.bad_label, stream);
  if (flags.second != kNoRow) {  // checked first, as the CPU op does
    return GpuResult{kDataRowOverflow, flags.second, read_value(a.data_norm, flags.second, stream)};
  }
  if (flags.first != kNoRow) {
    return GpuResult{kBadLabel, flags.first, read_value(a.label, flags.first, stream)};
  }
  scale_rows_kernel<<<blocks_for(a.rows * a.dims), kThreads, 0, stream>>>(
      a.data, scratch.along_data, a.grad_data, a.rows, a.dims);
  if (!a.settings.normalise_weights) {  // unit rows get theirs through margin_softmax_normalise
    scale_rows_kernel<<<blocks_for(a.classes * a.dims), kThreads, 0, stream>>>(
        a.weight, scratch.along_weight, a.grad_weight, a.classes, a.dims);
  }
  return finished();
}

template <typename T>
GpuResult normalise_gpu_launch(const T* rows, T* unit, double* norms, int64_t count, int64_t dims,
                               void* stream) {
  if (count > 0) {
    normalise_kernel<<<count, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(rows, unit, norms,
                                                                                dims);
  }
  return finished();
}

// The overflow flag costs one small copy back and a wait, as the target op's label check does.
template <typename T>
GpuResult normalise_backward_gpu_launch(const T* grad_unit, const double* grad_norm, const T* unit,
                                        const double* norms, T* grad_rows, int64_t count,
                                        int64_t dims, void* scratch, void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  int* overflow_row = static_cast<int*>(scratch);
  cudaMemsetAsync(overflow_row, kNoRowByte, sizeof(RowFlags), cuda_stream);
  if (count > 0) {
    normalise_backward_kernel<<<count, kThreads, 0, cuda_stream>>>(grad_unit, grad_norm, unit,
                                                                   norms, grad_rows, dims,
                                                                   overflow_row);
  }
  const RowFlags flags = read_flags(overflow_row, cuda_stream);
  if (flags.first != kNoRow) {
    return GpuResult{kWeightRowOverflow, flags.first, read_value(norms, flags.first, cuda_stream)};
  }
  return finished();
}

void zero_device(void* pointer, size_t bytes, void* stream) {
  cudaMemsetAsync(pointer, 0, bytes, static_cast<cudaStream_t>(stream));
}

#define MARGIN_INSTANTIATE(T, L)                                           \
  template GpuResult forward_gpu_launch<T, L>(const GpuForward<T, L>&);   \
  template GpuResult backward_gpu_launch<T, L>(const GpuBackward<T, L>&);
#define MARGIN_INSTANTIATE_LABELS(T) \
  MARGIN_INSTANTIATE(T, float)       \
  MARGIN_INSTANTIATE(T, double)      \
  MARGIN_INSTANTIATE(T, int32_t)     \
  MARGIN_INSTANTIATE(T, int64_t)     \
  MARGIN_INSTANTIATE(T, uint8_t)     \
  MARGIN_INSTANTIATE(T, int8_t)
MARGIN_INSTANTIATE_LABELS(float)
MARGIN_INSTANTIATE_LABELS(double)
#define MARGIN_INSTANTIATE_NORMALISE(T)                                                      \
  template GpuResult normalise_gpu_launch<T>(const T*, T*, double*, int64_t, int64_t, void*); \
  template GpuResult normalise_backward_gpu_launch<T>(const T*, const double*, const T*,      \
                                                      const double*, T*, int64_t, int64_t,    \
                                                      void*, void*);
MARGIN_INSTANTIATE_NORMALISE(float)
MARGIN_INSTANTIATE_NORMALISE(double)

}  // namespace margin_softmax
