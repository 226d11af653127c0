/*!
 * \file lsoftmax-launch.h
 * \brief What lsoftmax.cc (registration, CPU) and lsoftmax.cu (GPU) share:
 *        the tensor positions of the op and the GPU launchers' signatures.
 */
#ifndef LSOFTMAX_LAUNCH_H_
#define LSOFTMAX_LAUNCH_H_

#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "mxnet/lib_api.h"
#include "lsoftmax-inl.h"

namespace lsoftmax {

// Forward inputs, and backward outputs (one gradient per input).
enum Input { kLogits = 0, kData, kWeight, kLabel, kStep, kNumInputs };
enum Output { kOutput = 0, kBetaUsed, kNumOutputs };
// Backward inputs: [output grads..., forward inputs..., forward outputs...].
enum BackwardInput {
  kBackwardGradOutput = 0,
  kBackwardGradBeta,
  kBackwardLogits,
  kBackwardData,
  kBackwardWeight,
  kBackwardLabel,
  kBackwardStep,
  kBackwardOutput,
  kBackwardBetaUsed,
};

/*! \brief A fresh error message (see lsoftmax.cc): LSOFTMAX_ERROR << "...". */
std::stringstream& error_message(const char* file, int line);
#define LSOFTMAX_ERROR ::lsoftmax::error_message(__FILE__, __LINE__)

bool parse_params(const std::unordered_map<std::string, std::string>& attrs, Params* p);
void zero_tensor_cpu(std::vector<mxnet::ext::MXTensor>* tensors, int index);
size_t dtype_size(int dtype);
const char* input_name(int index);


}  // namespace lsoftmax

#endif  // LSOFTMAX_LAUNCH_H_
