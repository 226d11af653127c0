/*!
 * \file lib_api_entries.cc
 * \brief The emulated CUDA library's view of the op as MXNet sees it: margin_softmax.cc (with
 *        its GPU launchers) plus one entry point that calls the op's lib_api functions, CPU or
 *        GPU, on host memory, the way MXNet's executor calls them.
 *
 * The kernel tests drive the launchers through the extern "C" entry points of
 * margin_softmax.cc; this one reaches the layer above them, where forward_gpu and friends unpack
 * MXNet's tensors (which input holds the norms of unit rows, where the backward finds the
 * forward's outputs, which gradients are zeroed), so that tests/test_lsoftmax_gpu.py can give
 * the CPU functions and the emulated GPU functions the same tensors and compare what they write.
 * Built into build/liblsoftmax_cuda_emulated.so only (`make emulated`), never installed.
 */
#ifndef MARGIN_SOFTMAX_WITH_CUDA
#define MARGIN_SOFTMAX_WITH_CUDA
#endif
#include "margin_softmax.cc"

#include <memory>

namespace {

using OpFunction = MXReturnValue (*)(const std::unordered_map<std::string, std::string>&,
                                     std::vector<MXTensor>*, std::vector<MXTensor>*,
                                     const OpResource&);

struct NamedFunction {
  const char* name;
  OpFunction function;
  bool gpu;
};

const NamedFunction kOpFunctions[] = {
    {"target_forward_cpu", margin_softmax::forward_cpu, false},
    {"target_forward_gpu", margin_softmax::forward_gpu, true},
    {"target_backward_cpu", margin_softmax::backward_cpu, false},
    {"target_backward_gpu", margin_softmax::backward_gpu, true},
    {"normalise_forward_cpu", margin_softmax::normalise_forward_cpu, false},
    {"normalise_forward_gpu", margin_softmax::normalise_forward_gpu, true},
    {"normalise_backward_cpu", margin_softmax::normalise_backward_cpu, false},
    {"normalise_backward_gpu", margin_softmax::normalise_backward_gpu, true},
};

// What OpResource hands out during one call, freed when it returns (MXNet's temporary space).
std::vector<std::unique_ptr<char[]>> call_allocations;

void* allocate(void*, int bytes) {
  call_allocations.emplace_back(new char[bytes > 0 ? bytes : 1]);
  return call_allocations.back().get();
}

constexpr int kMaxRank = 8;

// Tensor t: data[t], dtypes[t] (lib_api's codes), ranks[t] sizes at shapes[kMaxRank * t].
std::vector<MXTensor> tensors(int count, void** data, const int* dtypes, const int* ranks,
                              const int64_t* shapes, bool gpu) {
  std::vector<MXTensor> result;
  for (int t = 0; t < count; ++t) {
    std::vector<int64_t> shape(shapes + kMaxRank * t, shapes + kMaxRank * t + ranks[t]);
    result.emplace_back(data[t], shape, static_cast<MXDType>(dtypes[t]), static_cast<size_t>(t),
                        MXContext(gpu ? "gpu" : "cpu", 0));
  }
  return result;
}

}  // namespace

/*!
 * \brief Calls the op function `name` (kOpFunctions) with the attributes `attrs_text`
 *        ("key=value;...") on the given tensors, writing the outputs in place.
 * \return 0, 1 where the function failed (margin_softmax_last_error() has its message), or -1
 *         for an unknown name or a rank above kMaxRank.
 */
extern "C" int margin_softmax_call_op(const char* name, const char* attrs_text, int inputs_count,
                                      void** input_data, const int* input_dtypes,
                                      const int* input_ranks, const int64_t* input_shapes,
                                      int outputs_count, void** output_data,
                                      const int* output_dtypes, const int* output_ranks,
                                      const int64_t* output_shapes) {
  const NamedFunction* found = nullptr;
  for (const NamedFunction& entry : kOpFunctions) {
    if (std::string(name) == entry.name) found = &entry;
  }
  for (int t = 0; t < inputs_count; ++t) {
    if (input_ranks[t] > kMaxRank) found = nullptr;
  }
  for (int t = 0; t < outputs_count; ++t) {
    if (output_ranks[t] > kMaxRank) found = nullptr;
  }
  if (found == nullptr) {
    last_error = std::string("no op function ") + name + " (or a rank above 8)";
    return -1;
  }
  std::vector<MXTensor> inputs =
      tensors(inputs_count, input_data, input_dtypes, input_ranks, input_shapes, found->gpu);
  std::vector<MXTensor> outputs =
      tensors(outputs_count, output_data, output_dtypes, output_ranks, output_shapes, found->gpu);
  const OpResource resource(allocate, nullptr, allocate, nullptr, nullptr, nullptr, nullptr,
                            nullptr, nullptr);
  const MXReturnValue result = found->function(attributes_from_text(attrs_text), &inputs,
                                               &outputs, resource);
  call_allocations.clear();
  if (result == MX_SUCCESS) return 0;
  last_error = latest_error_message("the op function failed");
  return 1;
}
