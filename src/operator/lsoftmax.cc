/*!
 * \file lsoftmax.cc
 * \brief Registration of the op ``lsoftmax_target`` through MXNet's lib_api, and its CPU launcher.
 *
 * Inputs:  logits (N, C) = x W^T from FullyConnected, data x (N, D), weight W (C, D),
 *          label (N,) class indices (any real or integer dtype), step (1,) (mutated).
 * Outputs: output (N, C), the logits with the target column blended (D6);
 *          beta (1,), the schedule value this forward used (D12).
 *
 * lib_api hands the op no training flag and no write/add request, and a
 * library op cannot call MXNet's operators. So the op does only the O(N D)
 * target-column step; mx_lsoftmax.lsoftmax() composes it with FullyConnected,
 * and inserts it only into training graphs. Gradients are always written
 * (never added): MXNet sums the two paths into data and weight itself.
 *
 * The schedule counter is a mutated input, which MXNet treats as an auxiliary
 * state owned by the caller: the op instance holds no state, because MXNet
 * creates instances afresh for imperative and hybridized calls.
 */
#include <cmath>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "mxnet/lib_api.h"
#include "lsoftmax-inl.h"
#include "lsoftmax-launch.h"
#include "lsoftmax-gpu.h"

using namespace mxnet::ext;

namespace lsoftmax {

/*!
 * \brief MX_ERROR_MSG with the messages of earlier, already reported errors dropped.
 *
 * lib_api keeps every message ever added in one process-wide list and MXNet
 * prints the whole list with each failure, so without this a second error
 * would be reported with the first one's text in front of it. The list is
 * the only member of MXerrorMsgs (lib_api.h, MX_LIBRARY_VERSION 11), the
 * copy compiled into this library.
 */
std::stringstream& error_message(const char* file, int line) {
  auto* messages = reinterpret_cast<std::vector<std::stringstream*>*>(MXerrorMsgs::get());
  for (std::stringstream* message : *messages) delete message;
  messages->clear();
  return MXerrorMsgs::get()->add(file, line);
}

namespace {


bool parse_number(const std::unordered_map<std::string, std::string>& attrs, const char* name,
                  double fallback, double* value) {
  auto found = attrs.find(name);
  if (found == attrs.end()) {
    *value = fallback;
    return true;
  }
  std::istringstream stream(found->second);
  stream >> *value;
  if (stream.fail() || !stream.eof() || !std::isfinite(*value)) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter " << name << " must be a finite number, got '"
                 << found->second << "'";
    return false;
  }
  return true;
}

}  // namespace

/*! \brief Parse and validate the settings; errors name the parameter and the value. */
bool parse_params(const std::unordered_map<std::string, std::string>& attrs, Params* p) {
  double margin;
  if (!parse_number(attrs, "margin", 2.0, &margin) || !parse_number(attrs, "beta", 0.0, &p->beta) ||
      !parse_number(attrs, "beta_min", 0.0, &p->beta_min) ||
      !parse_number(attrs, "scale", 1.0, &p->scale) ||
      !parse_number(attrs, "gamma", 0.0, &p->gamma) ||
      !parse_number(attrs, "power", 1.0, &p->power)) {
    return false;
  }
  if (margin < 1.0 || margin != static_cast<double>(static_cast<int>(margin))) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter margin must be an integer >= 1, got " << margin;
    return false;
  }
  p->margin = static_cast<int>(margin);
  if (p->beta < 0.0) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter beta must be >= 0, got " << p->beta;
    return false;
  }
  if (p->beta_min < 0.0) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter beta_min must be >= 0, got " << p->beta_min;
    return false;
  }
  if (!(p->scale > 0.0 && p->scale <= 1.0)) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter scale must be in (0, 1], got " << p->scale;
    return false;
  }
  if (p->gamma < 0.0) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter gamma must be >= 0, got " << p->gamma;
    return false;
  }
  if (!(p->power > 0.0)) {
    LSOFTMAX_ERROR << "lsoftmax_target: parameter power must be > 0, got " << p->power;
    return false;
  }
  return true;
}

namespace {

MXReturnValue parse_attrs(const std::unordered_map<std::string, std::string>& attrs,
                          int* num_inputs, int* num_outputs) {
  Params p;
  if (!parse_params(attrs, &p)) return MX_FAIL;
  *num_inputs = kNumInputs;
  *num_outputs = kNumOutputs;
  return MX_SUCCESS;
}

MXReturnValue infer_type(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  // Symbols may leave some dtypes unknown (-1): take the first known one.
  int dtype = -1;
  for (int input : {kLogits, kData, kWeight, kStep}) {
    if (dtype < 0) dtype = (*in_types)[input];
  }
  if (dtype < 0) return MX_SUCCESS;
  if (dtype != kFloat32 && dtype != kFloat64) {
    LSOFTMAX_ERROR << "lsoftmax_target: input logits must be float32 or float64, got dtype code "
                 << dtype;
    return MX_FAIL;
  }
  for (int input : {kLogits, kData, kWeight, kStep}) {
    if ((*in_types)[input] < 0) (*in_types)[input] = dtype;
    if ((*in_types)[input] != dtype) {
      LSOFTMAX_ERROR << "lsoftmax_target: input " << input_name(input)
                   << " must have the dtype of logits (code " << dtype << "), got code "
                   << (*in_types)[input];
      return MX_FAIL;
    }
  }
  (*out_types)[kOutput] = dtype;
  (*out_types)[kBetaUsed] = dtype;
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<std::vector<unsigned int>>* in_shapes,
                          std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& logits = (*in_shapes)[kLogits];
  const auto& data = (*in_shapes)[kData];
  const auto& weight = (*in_shapes)[kWeight];
  const auto& label = (*in_shapes)[kLabel];
  const auto& step = (*in_shapes)[kStep];
  if (data.size() != 2) {
    LSOFTMAX_ERROR << "lsoftmax_target: input data must be 2-D (N, D), got " << data.size()
                 << " dimensions";
    return MX_FAIL;
  }
  if (logits.size() != 2 || logits[0] != data[0]) {
    LSOFTMAX_ERROR << "lsoftmax_target: input logits must be (N, C) with N = " << data[0];
    return MX_FAIL;
  }
  if (weight.size() != 2 || weight[0] != logits[1] || weight[1] != data[1]) {
    LSOFTMAX_ERROR << "lsoftmax_target: input weight must be (C, D) = (" << logits[1] << ", "
                 << data[1] << ")";
    return MX_FAIL;
  }
  if (label.size() != 1 || label[0] != data[0]) {
    LSOFTMAX_ERROR << "lsoftmax_target: input label must be (N,) = (" << data[0] << ",)";
    return MX_FAIL;
  }
  if (step.size() != 1 || step[0] != 1) {
    LSOFTMAX_ERROR << "lsoftmax_target: input step must have shape (1,)";
    return MX_FAIL;
  }
  (*out_shapes)[kOutput] = logits;
  (*out_shapes)[kBetaUsed] = std::vector<unsigned int>{1};
  return MX_SUCCESS;
}

// Dense only. Declared explicitly: lib_api's default check fails while a
// bound graph still has storage types undecided (-1), as Module's does.
MXReturnValue infer_storage_type(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<int>* in_storage_types,
                                 std::vector<int>* out_storage_types) {
  for (int& type : *in_storage_types) {
    if (type != -1 && type != kDefaultStorage) {
      LSOFTMAX_ERROR << "lsoftmax_target: inputs must be dense NDArrays, got storage type " << type;
      return MX_FAIL;
    }
    type = kDefaultStorage;
  }
  for (int& type : *out_storage_types) type = kDefaultStorage;
  return MX_SUCCESS;
}

MXReturnValue mutate_inputs(const std::unordered_map<std::string, std::string>& attrs,
                            std::vector<int>* input_indices) {
  input_indices->push_back(kStep);
  return MX_SUCCESS;
}

// Sizes read off the tensors, checked once for both passes.
struct Shape {
  int64_t rows, classes, dims;
};

Shape shape_of(const std::vector<MXTensor>& inputs, int logits_index, int data_index) {
  return Shape{inputs[logits_index].shape[0], inputs[logits_index].shape[1],
               inputs[data_index].shape[1]};
}

// Labels are read through their own dtype; every row is checked before any
// output is written, so a bad label leaves the outputs and the step untouched.
template <typename L>
bool check_labels_typed(const L* labels, int64_t rows, int64_t classes,
                        std::vector<int64_t>* indices) {
  indices->resize(rows);
  for (int64_t i = 0; i < rows; ++i) {
    (*indices)[i] = class_index(labels[i], classes);
    if ((*indices)[i] < 0) {
      LSOFTMAX_ERROR << "lsoftmax_target: input label must hold integer class indices in [0, "
                   << classes << "), got label[" << i << "] = " << static_cast<double>(labels[i]);
      return false;
    }
  }
  return true;
}

// The one place that maps a label dtype code to a C++ type: `visit` is called
// with a null pointer of the label's element type. Labels may be any real or
// integer type MXNet users pass (float labels are common with NDArrayIter).
template <typename Visitor>
MXReturnValue with_label_type(int dtype, Visitor visit) {
  switch (dtype) {
    case kFloat32: return visit(static_cast<float*>(nullptr));
    case kFloat64: return visit(static_cast<double*>(nullptr));
    case kInt32: return visit(static_cast<int32_t*>(nullptr));
    case kInt64: return visit(static_cast<int64_t*>(nullptr));
    case kUint8: return visit(static_cast<uint8_t*>(nullptr));
    case kInt8: return visit(static_cast<int8_t*>(nullptr));
    default:
      LSOFTMAX_ERROR << "lsoftmax_target: input label has unsupported dtype code " << dtype;
      return MX_FAIL;
  }
}

MXReturnValue read_labels(MXTensor& label, int64_t classes, std::vector<int64_t>* indices) {
  return with_label_type(label.dtype, [&](auto* tag) {
    using L = std::remove_pointer_t<decltype(tag)>;
    return check_labels_typed(label.data<L>(), label.shape[0], classes, indices) ? MX_SUCCESS
                                                                               : MX_FAIL;
  });
}

// MXNet 1.9.1 does not pool CPU memory: every imperative call gets fresh
// (C, D) and (N, C) buffers, and first-touch page faults cost more than the
// copies themselves (11 ms to zero a 20 MB weight gradient, measured).
// Asking for transparent huge pages on the 2 MB-aligned interior cuts the
// faults 512-fold where the kernel allows it; elsewhere it is a no-op.
void prefer_huge_pages(void* pointer, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(pointer) + huge - 1) & ~(huge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(pointer) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename T>
MXReturnValue forward_cpu_typed(const Params& p, std::vector<MXTensor>* inputs,
                                std::vector<MXTensor>* outputs) {
  const Shape s = shape_of(*inputs, kLogits, kData);
  std::vector<int64_t> labels;
  if (!read_labels((*inputs)[kLabel], s.classes, &labels)) return MX_FAIL;
  const T* logits = (*inputs)[kLogits].data<T>();
  const T* data = (*inputs)[kData].data<T>();
  const T* weight = (*inputs)[kWeight].data<T>();
  T* step = (*inputs)[kStep].data<T>();
  T* out = (*outputs)[kOutput].data<T>();
  const T beta = static_cast<T>(beta_at(p, static_cast<double>(step[0])));
  prefer_huge_pages(out, sizeof(T) * s.rows * s.classes);
  std::memcpy(out, logits, sizeof(T) * s.rows * s.classes);
  for (int64_t i = 0; i < s.rows; ++i) {
    forward_row(i, labels[i], logits, data, weight, out, s.classes, s.dims, beta, p.margin);
  }
  (*outputs)[kBetaUsed].data<T>()[0] = beta;
  step[0] += T(1);
  return MX_SUCCESS;
}

// Backward inputs are [grad_output, grad_beta, logits, data, weight, label, step, output, beta].
template <typename T>
MXReturnValue backward_cpu_typed(const Params& p, std::vector<MXTensor>* inputs,
                                 std::vector<MXTensor>* outputs) {
  const Shape s = shape_of(*inputs, kBackwardLogits, kBackwardData);
  std::vector<int64_t> labels;
  if (!read_labels((*inputs)[kBackwardLabel], s.classes, &labels)) return MX_FAIL;
  const T* grad_output = (*inputs)[kBackwardGradOutput].data<T>();
  const T* logits = (*inputs)[kBackwardLogits].data<T>();
  const T* data = (*inputs)[kBackwardData].data<T>();
  const T* weight = (*inputs)[kBackwardWeight].data<T>();
  const T beta = (*inputs)[kBackwardBetaUsed].data<T>()[0];
  T* grad_logits = (*outputs)[kLogits].data<T>();
  T* grad_data = (*outputs)[kData].data<T>();
  T* grad_weight = (*outputs)[kWeight].data<T>();
  prefer_huge_pages(grad_logits, sizeof(T) * s.rows * s.classes);
  prefer_huge_pages(grad_weight, sizeof(T) * s.classes * s.dims);
  std::memcpy(grad_logits, grad_output, sizeof(T) * s.rows * s.classes);
  std::memset(grad_weight, 0, sizeof(T) * s.classes * s.dims);
  for (int64_t i = 0; i < s.rows; ++i) {
    const int64_t y = labels[i];
    const RowGradient<T> row =
        backward_row(i, y, grad_output, logits, data, weight, s.classes, s.dims, beta, p.margin);
    grad_logits[i * s.classes + y] = row.grad_target;
    for (int64_t d = 0; d < s.dims; ++d) {
      grad_data[i * s.dims + d] = row.along_data * data[i * s.dims + d];
      grad_weight[y * s.dims + d] += row.along_weight * weight[y * s.dims + d];
    }
  }
  zero_tensor_cpu(outputs, kLabel);
  zero_tensor_cpu(outputs, kStep);
  return MX_SUCCESS;
}

#if defined(LSOFTMAX_WITH_CUDA)
// ---- GPU launchers: unpack the tensors, dispatch on dtypes, call lsoftmax.cu ----

MXReturnValue report_gpu(int result, int64_t classes) {
  if (result == kGpuSuccess) return MX_SUCCESS;
  if (result == kCudaFailure) {
    LSOFTMAX_ERROR << "lsoftmax_target: a CUDA kernel failed to launch";
  } else {
    LSOFTMAX_ERROR << "lsoftmax_target: input label must hold integer class indices in [0, "
                   << classes << "), got a bad value at label[" << result << "]";
  }
  return MX_FAIL;
}


template <typename T, typename L>
MXReturnValue forward_gpu_typed(const Params& p, std::vector<MXTensor>* inputs,
                                std::vector<MXTensor>* outputs, const OpResource& resource) {
  const Shape s = shape_of(*inputs, kLogits, kData);
  GpuForward<T, L> a{(*inputs)[kLogits].data<T>(), (*inputs)[kData].data<T>(),
                     (*inputs)[kWeight].data<T>(), (*inputs)[kLabel].data<L>(),
                     (*inputs)[kStep].data<T>(), (*outputs)[kOutput].data<T>(),
                     (*outputs)[kBetaUsed].data<T>(), s.rows, s.classes, s.dims, p,
                     static_cast<int*>(resource.alloc_gpu(sizeof(int))),
                     resource.get_cuda_stream()};
  return report_gpu(forward_gpu_launch(a), s.classes);
}

template <typename T, typename L>
MXReturnValue backward_gpu_typed(const Params& p, std::vector<MXTensor>* inputs,
                                 std::vector<MXTensor>* outputs, const OpResource& resource) {
  const Shape s = shape_of(*inputs, kBackwardLogits, kBackwardData);
  GpuBackward<T, L> a{(*inputs)[kBackwardGradOutput].data<T>(),
                      (*inputs)[kBackwardLogits].data<T>(), (*inputs)[kBackwardData].data<T>(),
                      (*inputs)[kBackwardWeight].data<T>(), (*inputs)[kBackwardLabel].data<L>(),
                      (*inputs)[kBackwardBetaUsed].data<T>(), (*outputs)[kLogits].data<T>(),
                      (*outputs)[kData].data<T>(), (*outputs)[kWeight].data<T>(), s.rows,
                      s.classes, s.dims, p.margin,
                      static_cast<int*>(resource.alloc_gpu(sizeof(int))),
                      resource.get_cuda_stream()};
  const int result = backward_gpu_launch(a);
  for (int index : {kLabel, kStep}) {
    if (index < static_cast<int>(outputs->size())) {
      MXTensor& tensor = (*outputs)[index];
      zero_device(tensor.data_ptr, tensor.size() * dtype_size(tensor.dtype), a.stream);
    }
  }
  return report_gpu(result, s.classes);
}

#endif  // LSOFTMAX_WITH_CUDA

MXReturnValue forward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& resource) {
  Params p;
  if (!parse_params(attrs, &p)) return MX_FAIL;
  if ((*inputs)[kLogits].dtype == kFloat64) return forward_cpu_typed<double>(p, inputs, outputs);
  return forward_cpu_typed<float>(p, inputs, outputs);
}

MXReturnValue backward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& resource) {
  Params p;
  if (!parse_params(attrs, &p)) return MX_FAIL;
  if ((*inputs)[kBackwardLogits].dtype == kFloat64) {
    return backward_cpu_typed<double>(p, inputs, outputs);
  }
  return backward_cpu_typed<float>(p, inputs, outputs);
}

#if defined(LSOFTMAX_WITH_CUDA)
// Forward and backward differ only in where logits and label sit among the
// inputs and in the typed launcher `typed(value_tag, label_tag, params)`.
template <typename Typed>
MXReturnValue gpu_entry(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                        const OpResource& resource, int logits_index, int label_index,
                        Typed typed) {
  Params p;
  if (!parse_params(attrs, &p)) return MX_FAIL;
  const bool is_double = (*inputs)[logits_index].dtype == kFloat64;
  return with_label_type((*inputs)[label_index].dtype, [&](auto* label_tag) {
    return is_double ? typed(static_cast<double*>(nullptr), label_tag, p)
                     : typed(static_cast<float*>(nullptr), label_tag, p);
  });
}

MXReturnValue forward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& resource) {
  return gpu_entry(attrs, inputs, outputs, resource, kLogits, kLabel,
                   [&](auto* value_tag, auto* label_tag, const Params& p) {
                     using T = std::remove_pointer_t<decltype(value_tag)>;
                     using L = std::remove_pointer_t<decltype(label_tag)>;
                     return forward_gpu_typed<T, L>(p, inputs, outputs, resource);
                   });
}

MXReturnValue backward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& resource) {
  return gpu_entry(attrs, inputs, outputs, resource, kBackwardLogits, kBackwardLabel,
                   [&](auto* value_tag, auto* label_tag, const Params& p) {
                     using T = std::remove_pointer_t<decltype(value_tag)>;
                     using L = std::remove_pointer_t<decltype(label_tag)>;
                     return backward_gpu_typed<T, L>(p, inputs, outputs, resource);
                   });
}
#endif  // LSOFTMAX_WITH_CUDA

}  // namespace

void zero_tensor_cpu(std::vector<MXTensor>* tensors, int index) {
  if (index >= static_cast<int>(tensors->size())) return;
  MXTensor& tensor = (*tensors)[index];
  std::memset(tensor.data_ptr, 0, tensor.size() * dtype_size(tensor.dtype));
}

size_t dtype_size(int dtype) {
  switch (dtype) {
    case kFloat64: case kInt64: return 8;
    case kFloat32: case kInt32: return 4;
    case kFloat16: return 2;
    default: return 1;
  }
}

const char* input_name(int index) {
  static const char* names[kNumInputs] = {"logits", "data", "weight", "label", "step"};
  return index >= 0 && index < kNumInputs ? names[index] : "?";
}

}  // namespace lsoftmax

REGISTER_OP(lsoftmax_target)
    .setParseAttrs(lsoftmax::parse_attrs)
    .setInferType(lsoftmax::infer_type)
    .setInferShape(lsoftmax::infer_shape)
    .setInferSType(lsoftmax::infer_storage_type)
    .setMutateInputs(lsoftmax::mutate_inputs)
    .setForward(lsoftmax::forward_cpu, "cpu")
    .setBackward(lsoftmax::backward_cpu, "cpu")
#if defined(LSOFTMAX_WITH_CUDA)
    .setForward(lsoftmax::forward_gpu, "gpu")
    .setBackward(lsoftmax::backward_gpu, "gpu")
#endif
    ;

MXReturnValue initialize(int version) {
  if (version >= 10700) return MX_SUCCESS;
  LSOFTMAX_ERROR << "lsoftmax: this library needs MXNet >= 1.7.0, got version " << version;
  return MX_FAIL;
}
