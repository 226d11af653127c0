/*!
 * \file margin_softmax.cc
 * \brief Registration of ``margin_softmax_target`` and ``margin_softmax_normalise`` through
 *        MXNet's lib_api, the settings parser, and the CPU launchers.
 *
 * Inputs:  logits (N, C) = x W^T from FullyConnected, data x (N, D),
 *          weight: W (C, D) for lsoftmax; for the kinds that normalise weights, the float64
 *          norms |w_j| (C,) from margin_softmax_normalise, whose unit rows FullyConnected
 *          used (K11); label (N,) class indices (any real or integer dtype),
 *          step (1,) (mutated: the schedule's auxiliary state), training: one float32,
 *          (1,) or (1, 1) (1 where MXNet runs the graph for training, else 0: see enum Input).
 * Outputs: output (N, C), the kind's logits with the target column blended (K2, K3);
 *          beta (1,), the schedule value this forward used (D12);
 *          data_norm (N,) and weight_norm (C,), float64 |x_i| and |w_j| for the backward
 *          (weight_norm holds only the target rows for lsoftmax, which needs no others).
 *
 * lib_api hands the op no training flag and no write/add request, and a
 * library op cannot call MXNet's operators. So the op does only the step
 * around the products; mx_lsoftmax composes it with FullyConnected, inserts it
 * only into training graphs, and gives it the training flag as an input (a
 * training graph still runs outside training under Module's score and predict).
 * Gradients are always written (never added): MXNet sums the two paths into
 * data and weight itself.
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
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "mxnet/lib_api.h"
#include "margin_softmax-inl.h"
#include "margin_softmax-gpu.h"

using namespace mxnet::ext;

namespace margin_softmax {

// Forward inputs, and backward outputs (one gradient per input). class_margins (C,)
// is there only with per_class_margin = 1, after the kNumInputs others.
//
// training, one float32, is 1 where MXNet runs the graph for training and 0 where it does not
// (Module's score and predict, forward(is_train=False)): lib_api hands a library op no
// is_train, so the graph derives the flag from a stock op that reads it (mx_lsoftmax/graph.py).
// Outside training the op gives the kind's plain logits, reads no label and keeps the step.
enum Input {
  kLogits = 0, kData, kWeight, kLabel, kStep, kTraining, kNumInputs,
  kClassMargins = kNumInputs
};
enum Output { kOutput = 0, kBetaUsed, kDataNorm, kWeightNorm, kNumOutputs };
// Backward inputs: [output grads..., forward inputs..., forward outputs...]; where the
// forward outputs start depends on the number of forward inputs (backward_output).
enum BackwardInput {
  kBackwardGradOutput = 0,
  kBackwardLogits = kNumOutputs,
  kBackwardData,
  kBackwardWeight,
  kBackwardLabel,
  kBackwardStep,
  kBackwardTraining,
  kBackwardClassMargins,
};

int input_count(const Settings& p) { return kNumInputs + (p.per_class_margin != 0.0 ? 1 : 0); }

/*! \brief The optional class_margins input at `index` (forward or backward), or null. */
template <typename T>
const T* class_margins_of(const Settings& p, std::vector<MXTensor>* inputs, int index) {
  return p.per_class_margin != 0.0 ? (*inputs)[index].data<T>() : nullptr;
}

/*! \brief Index among the backward's inputs of the forward output `output`. */
int backward_output(const Settings& p, int output) { return kNumOutputs + input_count(p) + output; }

const char* const kOpName = "margin_softmax_target";
const char* const kNormaliseName = "margin_softmax_normalise";

/*!
 * \brief MX_ERROR_MSG with the messages of earlier, already reported errors dropped.
 *
 * lib_api keeps every message ever added in one process-wide list and MXNet
 * prints the whole list with each failure, so without this a second error
 * would be reported with the first one's text in front of it. The list is
 * the only member of MXerrorMsgs (lib_api.h, MX_LIBRARY_VERSION 11), the
 * copy compiled into this library.
 */
std::stringstream& error_message(const char* file, int line, const char* op_name) {
  auto* messages = reinterpret_cast<std::vector<std::stringstream*>*>(MXerrorMsgs::get());
  for (std::stringstream* message : *messages) delete message;
  messages->clear();
  std::stringstream& message = MXerrorMsgs::get()->add(file, line);
  message << op_name << ": ";
  return message;
}
#define MARGIN_ERROR ::margin_softmax::error_message(__FILE__, __LINE__, ::margin_softmax::kOpName)
#define NORMALISE_ERROR \
  ::margin_softmax::error_message(__FILE__, __LINE__, ::margin_softmax::kNormaliseName)

namespace {

std::string describe_range(const SettingField& field) {
  std::ostringstream text;
  const bool has_low = field.low > -HUGE_VAL, has_high = field.high < HUGE_VAL;
  if (has_low && has_high) {
    text << "in " << (field.low_open ? "(" : "[") << field.low << ", " << field.high
         << (field.high_open ? ")" : "]");
  } else if (has_low) {
    text << (field.low_open ? "> " : ">= ") << field.low;
  } else {
    text << "a finite number";
  }
  return text.str();
}

bool parse_number(const std::string& name, const std::string& text, double* value) {
  std::istringstream stream(text);
  stream >> *value;
  if (stream.fail() || !stream.eof() || !std::isfinite(*value)) {
    MARGIN_ERROR << "parameter " << name << " must be a finite number, got '" << text << "'";
    return false;
  }
  return true;
}

}  // namespace

/*!
 * \brief Parse and validate a node's attributes against the tables of kinds and settings.
 *
 * Absent settings take the kind's defaults; a setting the kind does not take, an
 * unknown one, or a value out of range is an error naming the setting and the value.
 * Attributes MXNet adds itself (names starting with "__") are ignored.
 */
bool parse_settings(const std::unordered_map<std::string, std::string>& attrs, Settings* out) {
  auto kind_attr = attrs.find("kind");
  const std::string kind_name = kind_attr == attrs.end() ? "lsoftmax" : kind_attr->second;
  int kind = -1;
  for (int k = 0; k < kNumKinds; ++k) {
    if (kind_name == kKinds[k].name) kind = k;
  }
  if (kind < 0) {
    std::stringstream& message = MARGIN_ERROR;
    message << "parameter kind must be one of";
    for (const KindRow& row : kKinds) message << " " << row.name;
    message << ", got '" << kind_name << "'";
    return false;
  }
  const KindRow& row = kKinds[kind];
  *out = row.defaults;
  out->kind = kind;
  out->normalise_features = row.normalise_features;
  out->normalise_weights = row.normalise_weights;
  for (const auto& attr : attrs) {
    if (attr.first == "kind" || attr.first.rfind("__", 0) == 0) continue;
    int index = -1;
    for (int f = 0; f < kNumSettingFields; ++f) {
      if (attr.first == kSettingFields[f].name) index = f;
    }
    if (index < 0 || !(row.takes & (1u << index))) {
      MARGIN_ERROR << "kind " << row.name << " does not take the setting '" << attr.first << "'";
      return false;
    }
    const SettingField& field = kSettingFields[index];
    double value;
    if (!parse_number(attr.first, attr.second, &value)) return false;
    const bool below = value < field.low || (field.low_open && value == field.low);
    const bool above = value > field.high || (field.high_open && value == field.high);
    if (below || above) {
      MARGIN_ERROR << "parameter " << field.name << " must be " << describe_range(field)
                   << ", got " << attr.second;
      return false;
    }
    out->*(field.member) = value;
  }
  if (row.integer_margin && (out->margin < 1.0 || out->margin != std::floor(out->margin))) {
    MARGIN_ERROR << "parameter margin must be an integer >= 1, got " << out->margin;
    return false;
  }
  if (kind == kArcFace && !(out->margin < M_PI)) {
    MARGIN_ERROR << "parameter margin must be in [0, pi), got " << out->margin;
    return false;
  }
  if (out->easy_margin != 0.0 && out->easy_margin != 1.0) {
    MARGIN_ERROR << "parameter easy_margin must be 0 or 1, got " << out->easy_margin;
    return false;
  }
  if (out->per_class_margin != 0.0 && out->per_class_margin != 1.0) {
    MARGIN_ERROR << "parameter per_class_margin must be 0 or 1, got " << out->per_class_margin;
    return false;
  }
  return true;
}

namespace {

const char* input_name(int index) {
  static const char* names[kNumInputs + 1] = {"logits", "data",     "weight",       "label",
                                              "step",   "training", "class_margins"};
  return index >= 0 && index <= kNumInputs ? names[index] : "?";
}

// Messages name dtypes and shapes as the Python side prints them.
std::string dtype_name(int dtype) {
  static const char* names[] = {"float32", "float64", "float16", "uint8", "int32", "int8", "int64"};
  if (dtype >= 0 && dtype < static_cast<int>(sizeof(names) / sizeof(names[0]))) return names[dtype];
  return "dtype code " + std::to_string(dtype);
}

// The dtype code of the op's value types (float or double).
template <typename T>
constexpr int dtype_code() {
  return sizeof(T) == sizeof(double) ? kFloat64 : kFloat32;
}

// The errors found in the data, one text for the CPU and the GPU: a label that is no class
// index; the backward's overflows (docs/derivatives.md, limit of float32), a data row whose
// s / |x| leaves T, a weight row whose 1 / |w| does.
MXReturnValue bad_label(int64_t row, double label, int64_t classes) {
  MARGIN_ERROR << "input label must hold integer class indices in [0, " << classes << "), got label["
               << row << "] = " << label;
  return MX_FAIL;
}

template <typename T>
MXReturnValue data_row_overflow(int64_t row, double norm, double s) {
  MARGIN_ERROR << "input data row " << row << " has norm " << norm
               << ": the gradient of its normalisation (s / |x| times the logits' gradient) "
               << "overflows " << dtype_name(dtype_code<T>())
               << " (norms below s / " << std::numeric_limits<T>::max() << " = "
               << s / std::numeric_limits<T>::max()
               << " can); use float64 data or features of larger norm (a zero row is fine)";
  return MX_FAIL;
}

template <typename T>
MXReturnValue weight_row_overflow(int64_t row, double norm) {
  NORMALISE_ERROR << "input weight row " << row << " has norm " << norm
                  << ": its gradient through the normalisation (about |dL/du| / |w|) overflows "
                  << dtype_name(dtype_code<T>())
                  << "; use float64 or weight rows of larger norm (a zero row is fine)";
  return MX_FAIL;
}

std::string shape_text(const std::vector<unsigned int>& shape) {
  std::ostringstream text;
  text << "(";
  for (size_t i = 0; i < shape.size(); ++i) text << (i ? ", " : "") << shape[i];
  text << (shape.size() == 1 ? ",)" : ")");
  return text.str();
}

// Whether MXNet knows every size of a shape: lib_api hands an unknown rank over as no sizes
// and an unknown size as -1 cast to unsigned.
bool shape_is_known(const std::vector<unsigned int>& shape) {
  if (shape.empty()) return false;
  for (unsigned int size : shape) {
    if (size == static_cast<unsigned int>(-1)) return false;
  }
  return true;
}

MXReturnValue parse_attrs(const std::unordered_map<std::string, std::string>& attrs,
                          int* num_inputs, int* num_outputs) {
  Settings settings;
  if (!parse_settings(attrs, &settings)) return MX_FAIL;
  *num_inputs = input_count(settings);
  *num_outputs = kNumOutputs;
  return MX_SUCCESS;
}

MXReturnValue infer_type(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  // Symbols may leave some dtypes unknown (-1): take the first known one,
  // data's first, since the user sets it and the others follow from it.
  Settings settings;
  if (!parse_settings(attrs, &settings)) return MX_FAIL;
  // Where the kind normalises weights, the weight input is the float64 norms of the unit rows
  // that FullyConnected used (margin_softmax_normalise, K11); else the raw weight.
  const bool given_norms = settings.normalise_weights;
  if (given_norms) {
    if ((*in_types)[kWeight] < 0) (*in_types)[kWeight] = kFloat64;
    if ((*in_types)[kWeight] != kFloat64) {
      MARGIN_ERROR << "input weight of kind " << kKinds[settings.kind].name
                   << " must be the float64 norms from margin_softmax_normalise, got "
                   << dtype_name((*in_types)[kWeight]);
      return MX_FAIL;
    }
  }
  int dtype = -1;
  int source = kData;
  for (int input : {kData, kLogits, kStep}) {
    if (dtype < 0) source = input;
    if (dtype < 0) dtype = (*in_types)[input];
  }
  if (dtype < 0) return MX_SUCCESS;
  if (dtype != kFloat32 && dtype != kFloat64) {
    MARGIN_ERROR << "input " << input_name(source) << " must be float32 or float64, got "
                 << dtype_name(dtype);
    return MX_FAIL;
  }
  std::vector<int> same = {kLogits, kData, kStep};
  if (!given_norms) same.push_back(kWeight);
  if (in_types->size() > kClassMargins) same.push_back(kClassMargins);
  for (int input : same) {
    if ((*in_types)[input] < 0) (*in_types)[input] = dtype;
    if ((*in_types)[input] != dtype) {
      MARGIN_ERROR << "input " << input_name(input) << " must have the dtype of "
                   << input_name(source) << " (" << dtype_name(dtype) << "), got "
                   << dtype_name((*in_types)[input]);
      return MX_FAIL;
    }
  }
  // Labels may have any dtype; one nobody declared follows data, as in the Python op.
  if ((*in_types)[kLabel] < 0) (*in_types)[kLabel] = dtype;
  if ((*in_types)[kTraining] < 0) (*in_types)[kTraining] = kFloat32;
  if ((*in_types)[kTraining] != kFloat32) {
    MARGIN_ERROR << "input training must be float32, got " << dtype_name((*in_types)[kTraining]);
    return MX_FAIL;
  }
  (*out_types)[kOutput] = dtype;
  (*out_types)[kBetaUsed] = dtype;
  (*out_types)[kDataNorm] = kFloat64;
  (*out_types)[kWeightNorm] = kFloat64;
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
    MARGIN_ERROR << "input data must be 2-D (N, D), got shape " << shape_text(data);
    return MX_FAIL;
  }
  if (logits.size() != 2 || logits[0] != data[0]) {
    MARGIN_ERROR << "input logits must be (N, C) with N = " << data[0];
    return MX_FAIL;
  }
  Settings settings;
  if (!parse_settings(attrs, &settings)) return MX_FAIL;
  if (settings.normalise_weights) {  // the norms of the unit weight rows (K11)
    if (weight.size() != 1 || weight[0] != logits[1]) {
      MARGIN_ERROR << "input weight of kind " << kKinds[settings.kind].name
                   << " must be the norms (C,) = (" << logits[1]
                   << ",) from margin_softmax_normalise, got shape " << shape_text(weight);
      return MX_FAIL;
    }
  } else if (weight.size() != 2 || weight[0] != logits[1] || weight[1] != data[1]) {
    MARGIN_ERROR << "input weight must be (C, D) = (" << logits[1] << ", " << data[1] << ")";
    return MX_FAIL;
  }
  if (label.size() != 1 || label[0] != data[0]) {
    MARGIN_ERROR << "input label must be (N,) = (" << data[0] << ",)";
    return MX_FAIL;
  }
  if (step.size() != 1 || step[0] != 1) {
    MARGIN_ERROR << "input step must have shape (1,)";
    return MX_FAIL;
  }
  // One value, whatever its rank: the graph gives (1, 1) (mx.viz.print_summary cannot show a
  // 1-D intermediate), direct callers (1,).
  const auto& training = (*in_shapes)[kTraining];
  int64_t training_size = 1;
  for (int64_t size : training) training_size *= size;
  if (training.empty() || training_size != 1) {
    MARGIN_ERROR << "input training must hold one value, got shape " << shape_text(training);
    return MX_FAIL;
  }
  if (in_shapes->size() > kClassMargins) {
    auto& class_margins = (*in_shapes)[kClassMargins];
    if (!shape_is_known(class_margins)) class_margins = {logits[1]};  // a variable without a shape yet
    if (class_margins.size() != 1 || class_margins[0] != logits[1]) {
      MARGIN_ERROR << "input class_margins must have shape (C,) = (" << logits[1] << ",), got "
                   << shape_text(class_margins);
      return MX_FAIL;
    }
  }
  (*out_shapes)[kOutput] = logits;
  (*out_shapes)[kBetaUsed] = std::vector<unsigned int>{1};
  (*out_shapes)[kDataNorm] = std::vector<unsigned int>{data[0]};
  (*out_shapes)[kWeightNorm] = std::vector<unsigned int>{logits[1]};
  return MX_SUCCESS;
}

// Dense only. Declared explicitly: lib_api's default check fails while a
// bound graph still has storage types undecided (-1), as Module's does.
MXReturnValue infer_storage_type(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<int>* in_storage_types,
                                 std::vector<int>* out_storage_types) {
  for (int& type : *in_storage_types) {
    if (type != -1 && type != kDefaultStorage) {
      MARGIN_ERROR << "inputs must be dense NDArrays, got storage type " << type;
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
      bad_label(i, static_cast<double>(labels[i]), classes);
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
      MARGIN_ERROR << "input label has unsupported dtype " << dtype_name(dtype);
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

size_t dtype_size(int dtype) {
  switch (dtype) {
    case kFloat64: case kInt64: return 8;
    case kFloat32: case kInt32: return 4;
    case kFloat16: return 2;
    default: return 1;
  }
}

void zero_tensor_cpu(std::vector<MXTensor>* tensors, int index) {
  if (index >= static_cast<int>(tensors->size())) return;
  MXTensor& tensor = (*tensors)[index];
  std::memset(tensor.data_ptr, 0, tensor.size() * dtype_size(tensor.dtype));
}

/*!
 * \brief body(begin, end) over [0, count) split across the machine's cores.
 *
 * The op's passes are memory-bound loops over (N, C) and (C, D) arrays that
 * MXNet's engine gives one worker thread; FullyConnected beside them uses every
 * core, so the op does too. Threads are started per pass (tens of microseconds
 * against milliseconds of work); small passes run inline.
 */
template <typename Body>
void parallel_for(int64_t count, int64_t work_per_item, Body body) {
  static const int threads = [] {
    const char* limit = std::getenv("OMP_NUM_THREADS");
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    const int wanted = limit && std::atoi(limit) > 0 ? std::atoi(limit) : cores;
    return wanted > 0 ? wanted : 1;
  }();
  const int used = static_cast<int>(std::min<int64_t>(threads, count));
  if (used <= 1 || count * work_per_item < (int64_t(1) << 16)) {
    body(int64_t(0), count);
    return;
  }
  std::vector<std::thread> workers;
  const int64_t chunk = (count + used - 1) / used;
  for (int t = 1; t < used; ++t) {
    const int64_t begin = t * chunk, end = std::min(count, begin + chunk);
    if (begin < end) workers.emplace_back(body, begin, end);
  }
  body(int64_t(0), std::min(count, chunk));
  for (std::thread& worker : workers) worker.join();
}

/*!
 * \brief rho_i (K1) in the arithmetic A of the (N, C) passes.
 *
 * A is the data's type when every factor is finite in it, so float32 passes
 * vectorise; a norm below ~1e-37 makes s / |x| overflow float, and then the
 * passes run in double (the per-row math always does).
 */
template <typename A>
bool feature_factors(const Settings& p, const double* data_norm, int64_t rows, std::vector<A>* rho) {
  rho->resize(rows);
  bool finite = true;
  for (int64_t i = 0; i < rows; ++i) {
    (*rho)[i] = static_cast<A>(feature_factor(p, data_norm[i]));
    finite = finite && std::isfinite((*rho)[i]);
  }
  return finite;
}

// out[j] = in[j] * factor over one row.
template <typename T, typename A>
void store_scaled(const T* in, A factor, T* out, int64_t count) {
  for (int64_t j = 0; j < count; ++j) out[j] = static_cast<T>(in[j] * factor);
}

#if defined(__SSE2__)
// The float32 row with streaming stores. The large arrays written this way (the (N, C) output and
// its gradient, the (C, D) unit rows; scale_row's rows too, the data gradient and lsoftmax's
// weight-gradient rows of the batch's classes, small beside them) are read by another operator
// after this one, from memory either way at C = 10^5 (100 MB and more): writing past the caches
// saves the read-for-ownership of each line. Profiled on an Intel Xeon VM: the target op's
// passes and the unit rows 15-30% faster at 256 x 512 x 100000 and 10000, the FullyConnected
// that reads them no slower. The same products as the loop above, so the same values bit for
// bit. The pass that calls it ends with store_fence().
inline void store_scaled(const float* in, float factor, float* out, int64_t count) {
  int64_t j = 0;
  for (; j < count && (reinterpret_cast<uintptr_t>(out + j) & 15) != 0; ++j) out[j] = in[j] * factor;
  const __m128 scale = _mm_set1_ps(factor);
  for (; j + 4 <= count; j += 4) _mm_stream_ps(out + j, _mm_mul_ps(_mm_loadu_ps(in + j), scale));
  for (; j < count; ++j) out[j] = in[j] * factor;
}
#endif

// Streaming stores are visible to other threads once the storing thread has fenced them: each
// thread's part of a pass that streams ends with this, before parallel_for joins.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// out_ij = f_ij rho_i (K2), rows split across threads.
template <typename T, typename A>
void scale_logits(const T* logits, T* out, const std::vector<A>& rho, int64_t rows, int64_t classes) {
  parallel_for(rows, classes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) store_scaled(logits + i * classes, rho[i], out + i * classes, classes);
    store_fence();
  });
}

// G' = G rho off the target column and S_i = sum_j G_ij o_ij (K8).
template <typename T, typename A>
void scale_gradient(const T* grad_output, const T* output, T* grad_logits, const std::vector<A>& rho,
                    int64_t rows, int64_t classes, std::vector<double>* row_sum) {
  parallel_for(rows, classes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const A r = rho[i];
      const T* g = grad_output + i * classes;
      T* g_prime = grad_logits + i * classes;
      store_scaled(g, r, g_prime, classes);
      // In the pass's arithmetic A, as the scaling: float32 lanes vectorise twice as wide.
      (*row_sum)[i] = dot_product<A>(g, output + i * classes, classes);
    }
    store_fence();
  });
}

template <typename T>
bool all_finite(const T* values, int64_t count) {
  for (int64_t index = 0; index < count; ++index) {
    if (!std::isfinite(values[index])) return false;
  }
  return true;
}

// A row of zeros, written past the caches where the CPU can: lsoftmax's weight gradient is
// zero in every class outside the batch (nearly all of a (C, D) array), and MXNet's add_n reads
// it next, after 200 MB at C = 10^5, so a streaming store saves each line's read-for-ownership.
// The caller's pass ends with store_fence().
inline void zero_row(void* row, int64_t bytes) {
#if defined(__SSE2__)
  char* byte = static_cast<char*>(row);
  char* const end = byte + bytes;
  const int64_t head = std::min<int64_t>(bytes, (16 - (reinterpret_cast<uintptr_t>(byte) & 15)) & 15);
  std::memset(byte, 0, head);
  byte += head;
  const __m128i zeros = _mm_setzero_si128();
  for (; end - byte >= 16; byte += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(byte), zeros);
  std::memset(byte, 0, end - byte);
#else
  std::memset(row, 0, bytes);
#endif
}

// out = exact * in over one row of `dims` values.
template <typename T>
void scale_row(const T* in, double exact, T* out, int64_t dims) {
  if (exact == 0.0) {
    zero_row(out, sizeof(T) * dims);
  } else if (fits<T>(exact)) {
    store_scaled(in, static_cast<T>(exact), out, dims);
  } else {
    // P_i / |x_i| or 1 / |w_j| can leave float32 (|x| = 1e-22: 6e45) while its product with
    // the row, of length |x|, does not: such rows are scaled in float64.
    for (int64_t d = 0; d < dims; ++d) out[d] = static_cast<T>(exact * static_cast<double>(in[d]));
  }
}

// out[r, :] = coefficient[r] * rows[r, :]: the norm paths P_i x_i / a_i and Q_j w_j / b_j.
template <typename T>
void scale_rows(const T* rows, const std::vector<double>& coefficient, T* out, int64_t count,
                int64_t dims) {
  parallel_for(count, dims, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) scale_row(rows + r * dims, coefficient[r], out + r * dims, dims);
    store_fence();
  });
}

// A large copy split over the cores: one thread's memcpy does not saturate the memory bus.
template <typename T>
void parallel_copy(T* destination, const T* source, int64_t count) {
  const int64_t block = int64_t(1) << 16;
  parallel_for((count + block - 1) / block, block, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * block, last = std::min(count, end * block);
    if (last > first) std::memcpy(destination + first, source + first, sizeof(T) * (last - first));
  });
}

template <typename T>
void row_norms(const T* rows, int64_t count, int64_t dims, double* norms) {
  parallel_for(count, dims, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norms[r] = row_norm(rows + r * dims, dims);
  });
}

template <typename T>
MXReturnValue forward_cpu_typed(const Settings& p, std::vector<MXTensor>* inputs,
                                std::vector<MXTensor>* outputs) {
  const Shape s = shape_of(*inputs, kLogits, kData);
  const bool training = (*inputs)[kTraining].data<float>()[0] != 0.0f;
  std::vector<int64_t> labels;
  if (training && !read_labels((*inputs)[kLabel], s.classes, &labels)) return MX_FAIL;
  const T* logits = (*inputs)[kLogits].data<T>();
  const T* data = (*inputs)[kData].data<T>();
  T* step = (*inputs)[kStep].data<T>();
  const T* class_margins = class_margins_of<T>(p, inputs, kClassMargins);
  T* out = (*outputs)[kOutput].data<T>();
  double* data_norm = (*outputs)[kDataNorm].data<double>();
  double* weight_norm = (*outputs)[kWeightNorm].data<double>();
  const double beta = beta_at(p, static_cast<double>(step[0]));
  row_norms(data, s.rows, s.dims, data_norm);
  if (p.normalise_weights) {  // unit rows: the weight input is their norms (K11)
    std::memcpy(weight_norm, (*inputs)[kWeight].data<double>(), sizeof(double) * s.classes);
  } else {
    const T* weight = (*inputs)[kWeight].data<T>();
    std::memset(weight_norm, 0, sizeof(double) * s.classes);
    for (int64_t y : labels) weight_norm[y] = row_norm(weight + y * s.dims, s.dims);
  }
  prefer_huge_pages(out, sizeof(T) * s.rows * s.classes);
  if (p.normalise_features) {
    std::vector<T> rho;
    if (feature_factors(p, data_norm, s.rows, &rho)) {
      scale_logits(logits, out, rho, s.rows, s.classes);
    } else {
      std::vector<double> rho64;
      feature_factors(p, data_norm, s.rows, &rho64);
      scale_logits(logits, out, rho64, s.rows, s.classes);
    }
  } else {
    parallel_copy(out, logits, s.rows * s.classes);
  }
  (*outputs)[kBetaUsed].data<T>()[0] = static_cast<T>(beta);
  if (!training) return MX_SUCCESS;  // the plain logits (K2)
  const double floor = angle_floor<T>();
  for (int64_t i = 0; i < s.rows; ++i) {
    const int64_t y = labels[i];
    const TargetColumn column = target_column(row_settings(p, class_margins, y),
                                              logits[i * s.classes + y], data_norm[i],
                                              weight_norm[y], beta, floor);
    out[i * s.classes + y] = static_cast<T>(column.output);
  }
  step[0] += T(1);
  return MX_SUCCESS;
}

// (K8): G' into grad_logits, then the norm paths P_i x_i / a_i and (lsoftmax) Q_j w_j / b_j.
template <typename T>
MXReturnValue backward_cpu_typed(const Settings& p, std::vector<MXTensor>* inputs,
                                 std::vector<MXTensor>* outputs) {
  const Shape s = shape_of(*inputs, kBackwardLogits, kBackwardData);
  // After a forward outside training, the gradient of the plain logits it gave.
  const bool training = (*inputs)[kBackwardTraining].data<float>()[0] != 0.0f;
  std::vector<int64_t> labels;
  if (training && !read_labels((*inputs)[kBackwardLabel], s.classes, &labels)) return MX_FAIL;
  const T* grad_output = (*inputs)[kBackwardGradOutput].data<T>();
  const T* logits = (*inputs)[kBackwardLogits].data<T>();
  const T* data = (*inputs)[kBackwardData].data<T>();
  const T* class_margins = class_margins_of<T>(p, inputs, kBackwardClassMargins);
  const T* output = (*inputs)[backward_output(p, kOutput)].data<T>();
  const double* data_norm = (*inputs)[backward_output(p, kDataNorm)].data<double>();
  const double* weight_norm = (*inputs)[backward_output(p, kWeightNorm)].data<double>();
  const double beta =
      static_cast<double>((*inputs)[backward_output(p, kBetaUsed)].data<T>()[0]);
  T* grad_logits = (*outputs)[kLogits].data<T>();
  T* grad_data = (*outputs)[kData].data<T>();
  prefer_huge_pages(grad_logits, sizeof(T) * s.rows * s.classes);

  std::vector<double> row_sum(s.rows, 0.0), along_weight(s.classes, 0.0);
  if (p.normalise_features) {
    std::vector<T> rho;
    if (feature_factors(p, data_norm, s.rows, &rho)) {
      scale_gradient(grad_output, output, grad_logits, rho, s.rows, s.classes, &row_sum);
    } else {
      std::vector<double> rho64;
      feature_factors(p, data_norm, s.rows, &rho64);
      scale_gradient(grad_output, output, grad_logits, rho64, s.rows, s.classes, &row_sum);
      // G' = G rho can leave T only on rows whose rho does (|x| < s / max(T)); there the
      // data gradient, about rho |G|, overflows too: an error naming the row, not inf / NaN.
      for (int64_t i = 0; i < s.rows; ++i) {
        if (std::isfinite(rho[i]) || all_finite(grad_logits + i * s.classes, s.classes)) continue;
        return data_row_overflow<T>(i, data_norm[i], p.s);
      }
    }
  } else {
    parallel_copy(grad_logits, grad_output, s.rows * s.classes);
  }
  const double floor = angle_floor<T>();
  std::vector<double> along_data(s.rows, 0.0);
  for (int64_t i = 0; i < s.rows; ++i) {
    const double a = data_norm[i];
    double along = p.normalise_features ? -row_sum[i] / (a > 0.0 ? a : 1.0) : 0.0;
    if (training) {
      const int64_t y = labels[i];
      const double b = weight_norm[y];
      const double g = grad_output[i * s.classes + y];
      const TargetColumn column = target_column(row_settings(p, class_margins, y),
                                                logits[i * s.classes + y], a, b, beta, floor);
      grad_logits[i * s.classes + y] = static_cast<T>(g * column.d_f);
      along += g * column.p;
      // Only the sample's own class: a non-finite row reaches no other class's gradient.
      if (b > 0.0) along_weight[y] += g * column.q / b;
    }
    along_data[i] = a > 0.0 ? along / a : 0.0;
  }
  scale_rows(data, along_data, grad_data, s.rows, s.dims);
  if (p.normalise_weights) {
    zero_tensor_cpu(outputs, kWeight);  // the norms of unit rows shape no logit (K11)
  } else {
    T* grad_weight = (*outputs)[kWeight].data<T>();
    prefer_huge_pages(grad_weight, sizeof(T) * s.classes * s.dims);
    scale_rows((*inputs)[kBackwardWeight].data<T>(), along_weight, grad_weight, s.classes, s.dims);
  }
  zero_tensor_cpu(outputs, kLabel);
  zero_tensor_cpu(outputs, kStep);
  zero_tensor_cpu(outputs, kTraining);
  if (class_margins != nullptr) zero_tensor_cpu(outputs, kClassMargins);  // constants
  return MX_SUCCESS;
}

MXReturnValue forward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& resource) {
  Settings p;
  if (!parse_settings(attrs, &p)) return MX_FAIL;
  if ((*inputs)[kLogits].dtype == kFloat64) return forward_cpu_typed<double>(p, inputs, outputs);
  return forward_cpu_typed<float>(p, inputs, outputs);
}

MXReturnValue backward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& resource) {
  Settings p;
  if (!parse_settings(attrs, &p)) return MX_FAIL;
  if ((*inputs)[kBackwardLogits].dtype == kFloat64) {
    return backward_cpu_typed<double>(p, inputs, outputs);
  }
  return backward_cpu_typed<float>(p, inputs, outputs);
}

// ---- margin_softmax_normalise: unit weight rows for the kinds that normalise weights (K11) ----
//
// Inputs rows (C, D) and data (N, D); outputs unit (C, D) = rows / |rows| (0 for a zero row)
// and norm (C,) float64. The weight-normalising kinds run FullyConnected on the unit rows, so the
// whole weight gradient arrives here in one piece: FullyConnected's product term and the norm path
// are combined in one pass (K11) instead of MXNet adding two dense (C, D) terms of separate ops.
//
// data is read for its shape only (gradient 0): lib_api lets an op infer its inputs' shapes
// from its other inputs, never from its outputs, and a weight variable declared without a
// shape (Module, symbol graphs) gets (num_hidden, D) from here, as FullyConnected would give it.
enum NormaliseInput { kNormaliseRows = 0, kNormaliseData, kNormaliseInputs };
enum NormaliseOutput { kNormaliseUnit = 0, kNormaliseNorm, kNormaliseOutputs };
// Backward inputs: [grad unit, grad norm, rows, data, unit, norm].
enum NormaliseBackwardInput {
  kNormaliseGradUnit = 0, kNormaliseGradNorm, kNormaliseBackwardRows, kNormaliseBackwardData,
  kNormaliseBackwardUnit, kNormaliseBackwardNorm,
};
// The one attribute: num_hidden, the number of rows C.
bool parse_num_hidden(const std::unordered_map<std::string, std::string>& attrs, int64_t* rows) {
  for (const auto& attr : attrs) {
    if (attr.first.rfind("__", 0) == 0 || attr.first == "num_hidden") continue;  // MXNet's own
    NORMALISE_ERROR << "takes only num_hidden, got " << attr.first << "=" << attr.second;
    return false;
  }
  const auto found = attrs.find("num_hidden");
  double value = 0.0;
  if (found == attrs.end() || !parse_number("num_hidden", found->second, &value) || value < 1 ||
      value != std::floor(value)) {
    NORMALISE_ERROR << "parameter num_hidden must be an integer >= 1, got "
                    << (found == attrs.end() ? std::string("nothing") : found->second);
    return false;
  }
  *rows = static_cast<int64_t>(value);
  return true;
}

MXReturnValue normalise_parse_attrs(const std::unordered_map<std::string, std::string>& attrs,
                                    int* num_inputs, int* num_outputs) {
  int64_t rows = 0;
  if (!parse_num_hidden(attrs, &rows)) return MX_FAIL;
  *num_inputs = kNormaliseInputs;
  *num_outputs = kNormaliseOutputs;
  return MX_SUCCESS;
}

MXReturnValue normalise_infer_type(const std::unordered_map<std::string, std::string>& attrs,
                                   std::vector<int>* in_types, std::vector<int>* out_types) {
  const bool from_data = (*in_types)[kNormaliseData] >= 0;
  const int dtype = from_data ? (*in_types)[kNormaliseData] : (*in_types)[kNormaliseRows];
  if (dtype < 0) return MX_SUCCESS;
  if (dtype != kFloat32 && dtype != kFloat64) {
    NORMALISE_ERROR << "input " << (from_data ? "data" : "weight")
                    << " must be float32 or float64, got " << dtype_name(dtype);
    return MX_FAIL;
  }
  for (int input : {kNormaliseRows, kNormaliseData}) {
    if ((*in_types)[input] < 0) (*in_types)[input] = dtype;
    if ((*in_types)[input] != dtype) {
      NORMALISE_ERROR << "input weight must have the dtype of data (" << dtype_name(dtype)
                      << "), got " << dtype_name((*in_types)[kNormaliseRows]);
      return MX_FAIL;
    }
  }
  (*out_types)[kNormaliseUnit] = dtype;
  (*out_types)[kNormaliseNorm] = kFloat64;
  return MX_SUCCESS;
}

MXReturnValue normalise_infer_shape(const std::unordered_map<std::string, std::string>& attrs,
                                    std::vector<std::vector<unsigned int>>* in_shapes,
                                    std::vector<std::vector<unsigned int>>* out_shapes) {
  int64_t classes = 0;
  if (!parse_num_hidden(attrs, &classes)) return MX_FAIL;
  const auto& data = (*in_shapes)[kNormaliseData];
  auto& rows = (*in_shapes)[kNormaliseRows];
  if (data.size() != 2) {
    NORMALISE_ERROR << "input data must be 2-D (N, D), got shape " << shape_text(data);
    return MX_FAIL;
  }
  const std::vector<unsigned int> wanted = {static_cast<unsigned int>(classes), data[1]};
  if (!shape_is_known(rows)) rows = wanted;  // a weight variable without (all of) its shape yet
  if (rows != wanted) {
    NORMALISE_ERROR << "input weight must be (num_hidden, D) = (" << classes << ", " << data[1]
                    << "), got shape " << shape_text(rows);
    return MX_FAIL;
  }
  (*out_shapes)[kNormaliseUnit] = rows;
  (*out_shapes)[kNormaliseNorm] = std::vector<unsigned int>{rows[0]};
  return MX_SUCCESS;
}

// One pass per row: its norm, then the row scaled while it is still in the cache.
template <typename T>
void normalise_rows_cpu(const T* rows, T* unit, double* norms, int64_t count, int64_t dims) {
  parallel_for(count, dims, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      norms[r] = row_norm(rows + r * dims, dims);
      scale_row(rows + r * dims, unit_factor(norms[r]), unit + r * dims, dims);
    }
    store_fence();
  });
}

// out[d] = a g[d] + b u[d] over one row.
template <typename T>
void combine_row(const T* g, T a, const T* u, T b, T* out, int64_t dims) {
  for (int64_t d = 0; d < dims; ++d) out[d] = a * g[d] + b * u[d];
}

#if defined(__SSE2__)
// The float32 row with streaming stores: the weight gradient is read next by the optimizer,
// long after this pass, so writing it past the caches saves the read-for-ownership of every
// line (a third of the pass's memory traffic). Same products and sums as above, so the same
// result bit for bit.
inline void combine_row(const float* g, float a, const float* u, float b, float* out, int64_t dims) {
  int64_t d = 0;
  for (; d < dims && (reinterpret_cast<uintptr_t>(out + d) & 15) != 0; ++d) out[d] = a * g[d] + b * u[d];
  const __m128 along_gradient = _mm_set1_ps(a), along_unit = _mm_set1_ps(b);
  for (; d + 4 <= dims; d += 4) {
    _mm_stream_ps(out + d, _mm_add_ps(_mm_mul_ps(along_gradient, _mm_loadu_ps(g + d)),
                                      _mm_mul_ps(along_unit, _mm_loadu_ps(u + d))));
  }
  for (; d < dims; ++d) out[d] = a * g[d] + b * u[d];
}
#endif

// dL/dv = along_gradient g_u + along_unit u per row (K11), in one pass. Returns the first
// row whose gradient overflowed T (a norm below T's range: 1 / |v| times g_u), or -1.
template <typename T>
int64_t normalise_rows_backward_cpu(const T* grad_unit, const double* grad_norm, const T* unit,
                                    const double* norms, T* grad_rows, int64_t count, int64_t dims) {
  std::atomic<int64_t> overflowed(count);
  parallel_for(count, dims, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = grad_unit + r * dims;
      const T* u = unit + r * dims;
      T* out = grad_rows + r * dims;
      const UnitRowGradient row =
          unit_row_gradient(norms[r], dot_product(g, u, dims), grad_norm[r]);
      if (fits<T>(row.along_gradient) && fits<T>(row.along_unit)) {
        combine_row(g, static_cast<T>(row.along_gradient), u, static_cast<T>(row.along_unit), out, dims);
      } else {  // a row of norm below float32's range: its 1 / |v| is combined in float64
        for (int64_t d = 0; d < dims; ++d) {
          out[d] = static_cast<T>(row.along_gradient * static_cast<double>(g[d]) +
                                  row.along_unit * static_cast<double>(u[d]));
        }
        // Only such rows can overflow; the smallest index wins, whichever thread sees it.
        if (!all_finite(out, dims)) {
          int64_t seen = overflowed.load();
          while (r < seen && !overflowed.compare_exchange_weak(seen, r)) {
          }
        }
      }
    }
    store_fence();
  });
  return overflowed.load() < count ? overflowed.load() : -1;
}

MXReturnValue normalise_forward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                                    std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                    const OpResource& resource) {
  MXTensor& rows = (*inputs)[kNormaliseRows];
  const int64_t count = rows.shape[0], dims = rows.shape[1];
  double* norms = (*outputs)[kNormaliseNorm].data<double>();
  if (rows.dtype == kFloat64) {
    normalise_rows_cpu(rows.data<double>(), (*outputs)[kNormaliseUnit].data<double>(), norms, count, dims);
  } else {
    normalise_rows_cpu(rows.data<float>(), (*outputs)[kNormaliseUnit].data<float>(), norms, count, dims);
  }
  return MX_SUCCESS;
}

MXReturnValue normalise_backward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                                     std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                     const OpResource& resource) {
  MXTensor& unit = (*inputs)[kNormaliseBackwardUnit];
  const int64_t count = unit.shape[0], dims = unit.shape[1];
  const double* grad_norm = (*inputs)[kNormaliseGradNorm].data<double>();
  const double* norms = (*inputs)[kNormaliseBackwardNorm].data<double>();
  prefer_huge_pages((*outputs)[kNormaliseRows].data_ptr, dtype_size(unit.dtype) * count * dims);
  zero_tensor_cpu(outputs, kNormaliseData);  // read for its shape only
  const int64_t overflowed =
      unit.dtype == kFloat64
          ? normalise_rows_backward_cpu((*inputs)[kNormaliseGradUnit].data<double>(), grad_norm,
                                        unit.data<double>(), norms,
                                        (*outputs)[kNormaliseRows].data<double>(), count, dims)
          : normalise_rows_backward_cpu((*inputs)[kNormaliseGradUnit].data<float>(), grad_norm,
                                        unit.data<float>(), norms,
                                        (*outputs)[kNormaliseRows].data<float>(), count, dims);
  if (overflowed < 0) return MX_SUCCESS;
  return unit.dtype == kFloat64 ? weight_row_overflow<double>(overflowed, norms[overflowed])
                                : weight_row_overflow<float>(overflowed, norms[overflowed]);
}

#if defined(MARGIN_SOFTMAX_WITH_CUDA)
// ---- GPU launchers: unpack the tensors, dispatch on dtypes, call margin_softmax.cu ----

// The launcher's result as lib_api's, with the CPU op's messages (`s`: the kind's logit scale).
template <typename T>
MXReturnValue report_gpu(const GpuResult& result, int64_t classes, double s) {
  switch (result.status) {
    case kGpuSuccess:
      return MX_SUCCESS;
    case kBadLabel:
      return bad_label(result.row, result.value, classes);
    case kDataRowOverflow:
      return data_row_overflow<T>(result.row, result.value, s);
    case kWeightRowOverflow:
      return weight_row_overflow<T>(result.row, result.value);
    default:
      MARGIN_ERROR << "a CUDA kernel failed to launch";
      return MX_FAIL;
  }
}

template <typename T, typename L>
MXReturnValue forward_gpu_typed(const Settings& p, std::vector<MXTensor>* inputs,
                                std::vector<MXTensor>* outputs, const OpResource& resource) {
  const Shape s = shape_of(*inputs, kLogits, kData);
  const bool unit_rows = p.normalise_weights;  // the weight input is their norms (K11)
  GpuForward<T, L> a{(*inputs)[kLogits].data<T>(), (*inputs)[kData].data<T>(),
                     unit_rows ? nullptr : (*inputs)[kWeight].data<T>(),
                     unit_rows ? (*inputs)[kWeight].data<double>() : nullptr,
                     (*inputs)[kLabel].data<L>(),
                     (*inputs)[kStep].data<T>(),
                     (*inputs)[kTraining].data<float>(),
                     class_margins_of<T>(p, inputs, kClassMargins),
                     (*outputs)[kOutput].data<T>(),
                     (*outputs)[kBetaUsed].data<T>(), (*outputs)[kDataNorm].data<double>(),
                     (*outputs)[kWeightNorm].data<double>(), s.rows, s.classes, s.dims, p,
                     resource.alloc_gpu(gpu_scratch_bytes(s.rows, s.classes)),
                     resource.get_cuda_stream()};
  return report_gpu<T>(forward_gpu_launch(a), s.classes, p.s);
}

template <typename T, typename L>
MXReturnValue backward_gpu_typed(const Settings& p, std::vector<MXTensor>* inputs,
                                 std::vector<MXTensor>* outputs, const OpResource& resource) {
  const Shape s = shape_of(*inputs, kBackwardLogits, kBackwardData);
  const bool unit_rows = p.normalise_weights;  // the weight input is their norms (K11)
  GpuBackward<T, L> a{(*inputs)[kBackwardGradOutput].data<T>(),
                      (*inputs)[kBackwardLogits].data<T>(), (*inputs)[kBackwardData].data<T>(),
                      unit_rows ? nullptr : (*inputs)[kBackwardWeight].data<T>(),
                      (*inputs)[kBackwardLabel].data<L>(),
                      (*inputs)[kBackwardTraining].data<float>(),
                      class_margins_of<T>(p, inputs, kBackwardClassMargins),
                      (*inputs)[backward_output(p, kOutput)].data<T>(),
                      (*inputs)[backward_output(p, kBetaUsed)].data<T>(),
                      (*inputs)[backward_output(p, kDataNorm)].data<double>(),
                      (*inputs)[backward_output(p, kWeightNorm)].data<double>(),
                      (*outputs)[kLogits].data<T>(),
                      (*outputs)[kData].data<T>(),
                      unit_rows ? nullptr : (*outputs)[kWeight].data<T>(), s.rows,
                      s.classes, s.dims, p,
                      resource.alloc_gpu(gpu_scratch_bytes(s.rows, s.classes)),
                      resource.get_cuda_stream()};
  const GpuResult result = backward_gpu_launch(a);
  for (int index : {int(kLabel), int(kStep), int(kTraining), int(kClassMargins),
                    unit_rows ? int(kWeight) : -1}) {
    if (index >= 0 && index < static_cast<int>(outputs->size())) {
      MXTensor& tensor = (*outputs)[index];
      zero_device(tensor.data_ptr, tensor.size() * dtype_size(tensor.dtype), a.stream);
    }
  }
  return report_gpu<T>(result, s.classes, p.s);
}

// Forward and backward differ only in where logits and label sit among the
// inputs and in the typed launcher `typed(value_tag, label_tag, settings)`.
template <typename Typed>
MXReturnValue gpu_entry(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<MXTensor>* inputs, int logits_index, int label_index,
                        Typed typed) {
  Settings p;
  if (!parse_settings(attrs, &p)) return MX_FAIL;
  const bool is_double = (*inputs)[logits_index].dtype == kFloat64;
  return with_label_type((*inputs)[label_index].dtype, [&](auto* label_tag) {
    return is_double ? typed(static_cast<double*>(nullptr), label_tag, p)
                     : typed(static_cast<float*>(nullptr), label_tag, p);
  });
}

MXReturnValue forward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& resource) {
  return gpu_entry(attrs, inputs, kLogits, kLabel,
                   [&](auto* value_tag, auto* label_tag, const Settings& p) {
                     using T = std::remove_pointer_t<decltype(value_tag)>;
                     using L = std::remove_pointer_t<decltype(label_tag)>;
                     return forward_gpu_typed<T, L>(p, inputs, outputs, resource);
                   });
}

MXReturnValue backward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& resource) {
  return gpu_entry(attrs, inputs, kBackwardLogits, kBackwardLabel,
                   [&](auto* value_tag, auto* label_tag, const Settings& p) {
                     using T = std::remove_pointer_t<decltype(value_tag)>;
                     using L = std::remove_pointer_t<decltype(label_tag)>;
                     return backward_gpu_typed<T, L>(p, inputs, outputs, resource);
                   });
}

MXReturnValue normalise_forward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                                    std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                    const OpResource& resource) {
  MXTensor& rows = (*inputs)[kNormaliseRows];
  const int64_t count = rows.shape[0], dims = rows.shape[1];
  double* norms = (*outputs)[kNormaliseNorm].data<double>();
  void* stream = resource.get_cuda_stream();
  return rows.dtype == kFloat64
             ? report_gpu<double>(normalise_gpu_launch(rows.data<double>(),
                                                       (*outputs)[kNormaliseUnit].data<double>(),
                                                       norms, count, dims, stream),
                                  0, 0.0)
             : report_gpu<float>(normalise_gpu_launch(rows.data<float>(),
                                                      (*outputs)[kNormaliseUnit].data<float>(),
                                                      norms, count, dims, stream),
                                 0, 0.0);
}

MXReturnValue normalise_backward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                                     std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                     const OpResource& resource) {
  MXTensor& unit = (*inputs)[kNormaliseBackwardUnit];
  const int64_t count = unit.shape[0], dims = unit.shape[1];
  const double* grad_norm = (*inputs)[kNormaliseGradNorm].data<double>();
  const double* norms = (*inputs)[kNormaliseBackwardNorm].data<double>();
  void* stream = resource.get_cuda_stream();
  void* scratch = resource.alloc_gpu(normalise_gpu_scratch_bytes());
  MXTensor& grad_data = (*outputs)[kNormaliseData];  // read for its shape only
  zero_device(grad_data.data_ptr, grad_data.size() * dtype_size(grad_data.dtype), stream);
  return unit.dtype == kFloat64
             ? report_gpu<double>(normalise_backward_gpu_launch(
                                      (*inputs)[kNormaliseGradUnit].data<double>(), grad_norm,
                                      unit.data<double>(), norms,
                                      (*outputs)[kNormaliseRows].data<double>(), count, dims,
                                      scratch, stream),
                                  0, 0.0)
             : report_gpu<float>(normalise_backward_gpu_launch(
                                     (*inputs)[kNormaliseGradUnit].data<float>(), grad_norm,
                                     unit.data<float>(), norms,
                                     (*outputs)[kNormaliseRows].data<float>(), count, dims,
                                     scratch, stream),
                                 0, 0.0);
}
#endif  // MARGIN_SOFTMAX_WITH_CUDA

}  // namespace
}  // namespace margin_softmax

REGISTER_OP(margin_softmax_target)
    .setParseAttrs(margin_softmax::parse_attrs)
    .setInferType(margin_softmax::infer_type)
    .setInferShape(margin_softmax::infer_shape)
    .setInferSType(margin_softmax::infer_storage_type)
    .setMutateInputs(margin_softmax::mutate_inputs)
    .setForward(margin_softmax::forward_cpu, "cpu")
    .setBackward(margin_softmax::backward_cpu, "cpu")
#if defined(MARGIN_SOFTMAX_WITH_CUDA)
    .setForward(margin_softmax::forward_gpu, "gpu")
    .setBackward(margin_softmax::backward_gpu, "gpu")
#endif
    ;

REGISTER_OP(margin_softmax_normalise)
    .setParseAttrs(margin_softmax::normalise_parse_attrs)
    .setInferType(margin_softmax::normalise_infer_type)
    .setInferShape(margin_softmax::normalise_infer_shape)
    .setInferSType(margin_softmax::infer_storage_type)
    .setForward(margin_softmax::normalise_forward_cpu, "cpu")
    .setBackward(margin_softmax::normalise_backward_cpu, "cpu")
#if defined(MARGIN_SOFTMAX_WITH_CUDA)
    .setForward(margin_softmax::normalise_forward_gpu, "gpu")
    .setBackward(margin_softmax::normalise_backward_gpu, "gpu")
#endif
    ;

MXReturnValue initialize(int version) {
  if (version >= 10700) return MX_SUCCESS;
  MARGIN_ERROR << "this library needs MXNet >= 1.7.0, got version " << version;
  return MX_FAIL;
}

#if defined(MARGIN_SOFTMAX_WITH_CUDA)
// ---------------------------------------------------------------------------
// Kernel-level C entry points for the CuPy harness (mx_lsoftmax/support/cuda_harness.py):
// device pointers, sizes, the settings as "name=value" pairs separated by ';'
// (parsed by parse_settings, like a node's attributes), device scratch of
// margin_softmax_scratch_bytes(rows, classes) bytes, and a stream (0: default).
// Labels are int64. Kinds that normalise weights compose as the graph does (K11):
// margin_softmax_normalise_forward makes the unit rows and norms, the logits are
// products with the unit rows, the forward takes weight = null and those norms,
// and its backward leaves grad_weight (null) to margin_softmax_normalise_backward.
// margin_softmax_normalise_backward takes a scratch of margin_softmax_normalise_scratch_bytes().
// Return kGpuSuccess (-1), the first bad label's row, kCudaFailure (-2), -3 for bad
// settings, or -4 for a row whose gradient overflowed the dtype
// (margin_softmax_last_error() says why and which row, in the op's words).
// ---------------------------------------------------------------------------
namespace {
std::string last_error;
constexpr int kBadSettingsCode = -3, kOverflowCode = -4;

std::string latest_error_message(const char* fallback) {
  auto* messages = reinterpret_cast<std::vector<std::stringstream*>*>(MXerrorMsgs::get());
  return messages->empty() ? fallback : messages->back()->str();
}

template <typename T>
int entry_code(const margin_softmax::GpuResult& result, int64_t classes, double s) {
  switch (result.status) {
    case margin_softmax::kGpuSuccess:
    case margin_softmax::kCudaFailure:
      return result.status;
    case margin_softmax::kBadLabel:
      return static_cast<int>(result.row);
    default:
      margin_softmax::report_gpu<T>(result, classes, s);
      last_error = latest_error_message("a gradient overflowed");
      return kOverflowCode;
  }
}

// "key=value;key=value" as a node's attributes.
std::unordered_map<std::string, std::string> attributes_from_text(const char* text) {
  std::unordered_map<std::string, std::string> attrs;
  std::stringstream stream(text ? text : "");
  std::string pair;
  while (std::getline(stream, pair, ';')) {
    const size_t equals = pair.find('=');
    if (equals != std::string::npos) attrs[pair.substr(0, equals)] = pair.substr(equals + 1);
  }
  return attrs;
}

bool settings_from_text(const char* text, margin_softmax::Settings* settings) {
  if (margin_softmax::parse_settings(attributes_from_text(text), settings)) return true;
  last_error = latest_error_message("bad settings");
  return false;
}
}  // namespace

extern "C" const char* margin_softmax_last_error() { return last_error.c_str(); }

extern "C" size_t margin_softmax_scratch_bytes(int64_t rows, int64_t classes) {
  return margin_softmax::gpu_scratch_bytes(rows, classes);
}

extern "C" size_t margin_softmax_normalise_scratch_bytes() {
  return margin_softmax::normalise_gpu_scratch_bytes();
}

#define MARGIN_C_ENTRY(T, SUFFIX)                                                                \
  extern "C" int margin_softmax_forward_##SUFFIX(                                                 \
      const T* logits, const T* data, const T* weight, const double* unit_weight_norm,           \
      const int64_t* label, T* step, const float* training, const T* class_margins, T* out,      \
      T* beta_used, double* data_norm, double* weight_norm, int64_t rows, int64_t classes,       \
      int64_t dims, const char* settings_text, void* scratch, void* stream) {                    \
    margin_softmax::Settings settings;                                                            \
    if (!settings_from_text(settings_text, &settings)) return kBadSettingsCode;                   \
    margin_softmax::GpuForward<T, int64_t> a{logits, data, weight, unit_weight_norm, label,      \
                                             step, training, class_margins, out, beta_used,      \
                                             data_norm, weight_norm, rows, classes, dims,        \
                                             settings, scratch, stream};                         \
    return entry_code<T>(margin_softmax::forward_gpu_launch(a), classes, settings.s);             \
  }                                                                                               \
  extern "C" int margin_softmax_backward_##SUFFIX(                                                \
      const T* grad_output, const T* logits, const T* data, const T* weight,                     \
      const int64_t* label, const float* training, const T* class_margins, const T* output,      \
      const T* beta_used, const double* data_norm,                                                \
      const double* weight_norm, T* grad_logits, T* grad_data, T* grad_weight, int64_t rows,     \
      int64_t classes, int64_t dims, const char* settings_text, void* scratch, void* stream) {   \
    margin_softmax::Settings settings;                                                            \
    if (!settings_from_text(settings_text, &settings)) return kBadSettingsCode;                   \
    margin_softmax::GpuBackward<T, int64_t> a{                                                    \
        grad_output, logits, data, weight, label, training, class_margins, output, beta_used,   \
        data_norm,                                                                                \
        weight_norm, grad_logits, grad_data, grad_weight, rows, classes, dims, settings,         \
        scratch,     stream};                                                                     \
    return entry_code<T>(margin_softmax::backward_gpu_launch(a), classes, settings.s);            \
  }                                                                                               \
  extern "C" int margin_softmax_normalise_forward_##SUFFIX(const T* rows, T* unit, double* norms, \
                                                           int64_t count, int64_t dims,          \
                                                           void* stream) {                        \
    return entry_code<T>(margin_softmax::normalise_gpu_launch(rows, unit, norms, count, dims,    \
                                                              stream),                          \
                         0, 0.0);                                                                 \
  }                                                                                               \
  extern "C" int margin_softmax_normalise_backward_##SUFFIX(                                      \
      const T* grad_unit, const double* grad_norm, const T* unit, const double* norms,           \
      T* grad_rows, int64_t count, int64_t dims, void* scratch, void* stream) {                   \
    return entry_code<T>(margin_softmax::normalise_backward_gpu_launch(                           \
                             grad_unit, grad_norm, unit, norms, grad_rows, count, dims, scratch,  \
                             stream),                                                             \
                         0, 0.0);                                                                 \
  }

MARGIN_C_ENTRY(float, float32)
MARGIN_C_ENTRY(double, float64)
#endif  // MARGIN_SOFTMAX_WITH_CUDA
