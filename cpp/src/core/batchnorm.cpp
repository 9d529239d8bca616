// Public entry points: argument checks, canonical plans, and the one place where a runtime
// dtype and device become an element type and a backend.
#include "batchnorm/batchnorm.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>

#include "core/backend.hpp"
#include "core/elements.hpp"
#include "cpu/dispatch.hpp"
#include "cuda/runtime.hpp"

namespace batchnorm {

using detail::compute_t;
using detail::TrainScalars;
using detail::WeightPtrs;

const char* dtype_name(DType dtype) {
  switch (dtype) {
#define BATCHNORM_NAME_CASE(type, name) \
  case DType::name:                     \
    return #name;
    BATCHNORM_ELEMENT_TYPES(BATCHNORM_NAME_CASE)
#undef BATCHNORM_NAME_CASE
    case DType::boolean:
      return "bool";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  std::size_t size = 1;  // bool
  detail::visit_element(dtype, [&](auto element) { size = sizeof(element); });
  return size;
}

std::int64_t TensorRef::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  return n;
}

TensorRef contiguous_view(void* data, DType dtype, const std::vector<std::int64_t>& shape,
                          Device device) {
  if (shape.size() > static_cast<std::size_t>(kMaxRank)) {
    throw std::invalid_argument("batchnorm: rank " + std::to_string(shape.size()) +
                                " exceeds the supported maximum of " + std::to_string(kMaxRank));
  }
  TensorRef t;
  t.data = data;
  t.dtype = dtype;
  t.rank = static_cast<int>(shape.size());
  t.device = device;
  std::int64_t stride = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    t.shape[i] = shape[static_cast<std::size_t>(i)];
    t.strides[i] = stride;
    stride *= shape[static_cast<std::size_t>(i)];
  }
  return t;
}

namespace {

[[noreturn]] void fail(const char* op, const std::string& message) {
  throw std::invalid_argument(std::string("batchnorm.") + op + ": " + message);
}

std::string shape_string(const TensorRef& t) {
  std::string s = "(";
  for (int i = 0; i < t.rank; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.rank == 1 ? ",)" : ")");
}

bool same_device(const Device& a, const Device& b) {
  return a.type == b.type && (a.type == DeviceType::cpu || a.index == b.index);
}

// Numbers in messages as a person writes them: 0.5, 1e-05, inf.
std::string number(double value) {
  std::ostringstream s;
  s << value;
  return s.str();
}

void check_ghost_axes(const char* op, std::uint32_t feature_axes, std::int64_t virtual_batch_size) {
  if (virtual_batch_size > 0 && (feature_axes & 1u)) {
    fail(op, "axis 0 cannot be a feature axis when virtual_batch_size is set");
  }
}

std::uint32_t resolve_axes(const char* op, int rank, const std::vector<int>& axes) {
  if (rank < 1 || rank > kMaxRank) {
    fail(op, "inputs must have rank 1.." + std::to_string(kMaxRank) + ", got rank " +
                 std::to_string(rank));
  }
  std::uint32_t mask = 0;
  for (int axis : axes) {
    const int resolved = axis < 0 ? axis + rank : axis;
    if (resolved < 0 || resolved >= rank) {
      fail(op, "axis " + std::to_string(axis) + " is out of range for an input of rank " +
                   std::to_string(rank));
    }
    if (mask & (1u << resolved)) {
      fail(op, "axes contain duplicates once resolved (axis " + std::to_string(resolved) + ")");
    }
    mask |= 1u << resolved;
  }
  return mask;
}

// Dereferencing a T* that is not aligned for T is undefined behaviour (UBSan reports it, some
// targets fault), so the kernels only ever see aligned data. NumPy can make such views (e.g.
// np.frombuffer at an odd offset); the Python layer copies them before they get here.
void check_aligned(const char* op, const char* name, const void* data, DType dtype) {
  const std::size_t bytes = dtype_size(dtype);
  if (reinterpret_cast<std::uintptr_t>(data) % bytes != 0) {
    fail(op, std::string(name) + " is not aligned to its " + std::to_string(bytes) +
                 "-byte elements (" + dtype_name(dtype) + "); pass an aligned copy");
  }
}

void validate_options(const char* op, const Options& o, bool adjustment = false) {
  if (o.axes.empty()) fail(op, "axes must not be empty");
  if (!(o.momentum >= 0.0 && o.momentum <= 1.0)) {
    fail(op, "momentum must be in [0, 1], got " + number(o.momentum));
  }
  if (!(o.epsilon > 0.0)) fail(op, "epsilon must be > 0, got " + number(o.epsilon));
  if (!(o.renorm_momentum >= 0.0 && o.renorm_momentum <= 1.0)) {
    fail(op, "renorm_momentum must be in [0, 1], got " + number(o.renorm_momentum));
  }
  if (std::isnan(o.rmin) || std::isnan(o.rmax) || std::isnan(o.dmax)) {
    fail(op, "renorm_clipping: bounds must be numbers, got NaN");
  }
  if (o.rmax < o.rmin) {
    fail(op,
         "renorm_clipping: rmax (" + number(o.rmax) + ") must be >= rmin (" + number(o.rmin) + ")");
  }
  if (!(o.dmax >= 0.0)) fail(op, "renorm_clipping: dmax must be >= 0, got " + number(o.dmax));
  if (o.virtual_batch_size < 0) {
    fail(op, "virtual_batch_size must be > 0 (or 0 for no ghost batches), got " +
                 std::to_string(o.virtual_batch_size));
  }
  for (int axis : o.axes) check_ghost_axes(op, axis == 0 ? 1u : 0u, o.virtual_batch_size);
  if (adjustment && o.virtual_batch_size > 0) {
    fail(op, "adjustment cannot be combined with virtual_batch_size");
  }
}

// Everything a call needs, checked once.
struct Checked {
  std::uint32_t feature_axes = 0;
  std::int64_t groups = 1;
  std::int64_t features = 1;
};

void check_like(const char* op, const char* name, const TensorRef& t, const TensorRef& x) {
  if (t.data == nullptr && t.numel() != 0) fail(op, std::string(name) + " has no data pointer");
  check_aligned(op, name, t.data, t.dtype);
  if (t.rank != x.rank) {
    fail(op, std::string(name) + " has rank " + std::to_string(t.rank) + ", expected " +
                 std::to_string(x.rank));
  }
  for (int i = 0; i < x.rank; ++i) {
    if (t.shape[i] != x.shape[i]) {
      fail(op,
           std::string(name) + " has shape " + shape_string(t) + ", expected " + shape_string(x));
    }
  }
  if (t.dtype != x.dtype) {
    fail(op, std::string(name) + " has dtype " + dtype_name(t.dtype) + ", expected " +
                 dtype_name(x.dtype));
  }
  if (!same_device(t.device, x.device)) fail(op, std::string(name) + " is on another device");
}

// What an operation reads of the weights beyond gamma and beta: every one reads the moving
// statistics but the training backward, and only the training forward reads the renorm weights.
enum class Reads { moving_statistics, moving_and_renorm, statistics_context };

Checked check_common(const char* op, const TensorRef& x, const Options& o, const Weights& w,
                     bool training, Reads reads, bool adjustment = false) {
  validate_options(op, o, adjustment);
  Checked c;
  c.feature_axes = resolve_axes(op, x.rank, o.axes);
  if (x.dtype == DType::boolean) fail(op, "input dtype bool is not a floating-point type");
  if (x.data == nullptr && x.numel() != 0) fail(op, "input has no data pointer");
  check_aligned(op, "input", x.data, x.dtype);
  for (int i = 0; i < x.rank; ++i) {
    if (x.shape[i] < 0) fail(op, "input shape " + shape_string(x) + " has a negative size");
    if (c.feature_axes & (1u << i)) c.features *= x.shape[i];
  }
  if (w.dtype != weight_dtype(x.dtype)) {
    fail(op, std::string("weights have dtype ") + dtype_name(w.dtype) + " but " +
                 dtype_name(x.dtype) + " data needs " + dtype_name(weight_dtype(x.dtype)));
  }
  if (!same_device(w.device, x.device)) fail(op, "weights and input are on different devices");
  // (With no features at all, empty weight vectors may come without a data pointer.)
  if (reads != Reads::statistics_context && (!w.moving_mean || !w.moving_variance) &&
      c.features != 0) {
    fail(op, "moving_mean and moving_variance are required");
  }
  const void* const weight_vectors[] = {w.gamma,           w.beta,          w.moving_mean,
                                        w.moving_variance, w.moving_stddev, w.renorm_mean,
                                        w.renorm_stddev};
  for (const void* vector : weight_vectors) check_aligned(op, "a weight vector", vector, w.dtype);
  if (reads == Reads::moving_and_renorm && o.renorm && c.features != 0 &&
      (!w.moving_stddev || !w.renorm_mean || !w.renorm_stddev)) {
    fail(op, "renorm needs moving_stddev, renorm_mean and renorm_stddev");
  }
  check_ghost_axes(op, c.feature_axes, o.virtual_batch_size);
  if (training && o.virtual_batch_size != 0) {
    if (x.shape[0] % o.virtual_batch_size != 0) {
      fail(op, "the batch size " + std::to_string(x.shape[0]) +
                   " is not a multiple of virtual_batch_size " +
                   std::to_string(o.virtual_batch_size));
    }
    if (x.shape[0] > 0) c.groups = x.shape[0] / o.virtual_batch_size;
  }
  return c;
}

void check_mask(const char* op, const TensorRef* mask, const TensorRef& x) {
  if (!mask) return;
  if (mask->dtype != DType::boolean) fail(op, "mask must be boolean");
  if (mask->rank != x.rank) fail(op, "mask must be given with the input's rank");
  if (!same_device(mask->device, x.device)) fail(op, "mask is on another device than the input");
  for (int i = 0; i < x.rank; ++i) {
    if (mask->shape[i] != x.shape[i]) {
      fail(op,
           "mask shape " + shape_string(*mask) + " does not match the input " + shape_string(x));
    }
  }
}

template <class W>
WeightPtrs<W> typed_weights(const Weights& w, const Adjustment* adjustment) {
  WeightPtrs<W> p{static_cast<W*>(w.gamma),
                  static_cast<W*>(w.beta),
                  static_cast<W*>(w.moving_mean),
                  static_cast<W*>(w.moving_variance),
                  static_cast<W*>(w.moving_stddev),
                  static_cast<W*>(w.renorm_mean),
                  static_cast<W*>(w.renorm_stddev),
                  nullptr,
                  nullptr};
  if (adjustment) {
    p.adjust_scale = static_cast<const W*>(adjustment->scale);
    p.adjust_bias = static_cast<const W*>(adjustment->bias);
  }
  return p;
}

const detail::Backend& backend_of(const char* op, const Device& device) {
  switch (device.type) {
    case DeviceType::cuda:
      return detail::cuda_backend();
    case DeviceType::cpu:
      return detail::cpu_backend();
  }
  fail(op, "arrays must live on the CPU or a CUDA device (DLPack device type " +
               std::to_string(static_cast<int>(device.type)) + ")");
}

// The single dtype dispatch: calls f(T{}) with the storage type of x's dtype.
template <class F>
void with_element_type(const char* op, const TensorRef& x, F&& f) {
  if (!detail::visit_element(x.dtype, f)) {
    fail(op, std::string("unsupported dtype ") + dtype_name(x.dtype));
  }
}

template <class T>
T* data_of(const TensorRef& t) {
  return static_cast<T*>(t.data);
}

const std::uint8_t* mask_data(const TensorRef* mask) {
  return mask ? static_cast<const std::uint8_t*>(mask->data) : nullptr;
}

}  // namespace

DType weight_dtype(DType data) {
  DType weights = DType::float32;
  detail::visit_element(
      data, [&](auto element) { weights = detail::dtype_of<compute_t<decltype(element)>>; });
  return weights;
}

void validate(const Options& options, bool with_adjustment) {
  validate_options("validate", options, with_adjustment);
}

WeightSchema weight_schema(const Options& options, const std::vector<std::int64_t>& input_shape) {
  const char* op = "weight_schema";
  validate_options(op, options);
  const int rank = static_cast<int>(input_shape.size());
  const std::uint32_t axes = resolve_axes(op, rank, options.axes);
  check_ghost_axes(op, axes, options.virtual_batch_size);
  WeightSchema schema;
  for (int axis = 0; axis < rank; ++axis) {
    if (!(axes & (1u << axis))) continue;
    const std::int64_t size = input_shape[static_cast<std::size_t>(axis)];
    if (size < 0) {  // an unknown size (None in Python)
      TensorRef shape;
      shape.rank = rank;
      std::copy(input_shape.begin(), input_shape.end(), shape.shape.begin());
      fail(op, "the size of the feature axis " + std::to_string(axis) +
                   " must be known to build "
                   "(input shape " +
                   shape_string(shape) + ")");
    }
    schema.axes.push_back(axis);
    schema.feature_shape.push_back(size);
    schema.features *= size;
  }
  if (schema.axes.size() == 1) {
    schema.weight_shape = schema.feature_shape;
  } else {
    schema.weight_shape.assign(input_shape.size(), 1);
    for (std::size_t i = 0; i < schema.axes.size(); ++i) {
      schema.weight_shape[static_cast<std::size_t>(schema.axes[i])] = schema.feature_shape[i];
    }
  }
  schema.names = weight_names(options);
  return schema;
}

namespace {

// Every weight in Keras order, with its member in Weights and the options that make it exist:
// the one list of them.
struct WeightEntry {
  const char* name;
  void* Weights::* slot;
  bool (*present)(const Options&);
};
constexpr WeightEntry kWeightEntries[] = {
    {"gamma", &Weights::gamma, [](const Options& o) { return o.scale; }},
    {"beta", &Weights::beta, [](const Options& o) { return o.center; }},
    {"moving_mean", &Weights::moving_mean, [](const Options&) { return true; }},
    {"moving_variance", &Weights::moving_variance, [](const Options&) { return true; }},
    {"moving_stddev", &Weights::moving_stddev, [](const Options& o) { return o.renorm; }},
    {"renorm_mean", &Weights::renorm_mean, [](const Options& o) { return o.renorm; }},
    {"renorm_stddev", &Weights::renorm_stddev, [](const Options& o) { return o.renorm; }},
};

}  // namespace

std::vector<std::string> weight_names(const Options& options) {
  std::vector<std::string> names;
  for (const WeightEntry& entry : kWeightEntries) {
    if (entry.present(options)) names.emplace_back(entry.name);
  }
  return names;
}

void** weight_slot(Weights& weights, std::string_view name) {
  for (const WeightEntry& entry : kWeightEntries) {
    if (name == entry.name) return &(weights.*entry.slot);
  }
  return nullptr;
}

static_assert(std::size(kWeightEntries) == kWeightCount);

void** weight_slot(Weights& weights, int index) { return &(weights.*kWeightEntries[index].slot); }

const char* weight_name(int index) { return kWeightEntries[index].name; }

void statistics_to_host(TrainingContext& context) {
  if (context.device) context.device->to_host(context);
}

std::int64_t feature_count(const std::vector<std::int64_t>& shape, const Options& options) {
  const std::uint32_t axes =
      resolve_axes("feature_count", static_cast<int>(shape.size()), options.axes);
  std::int64_t n = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (axes & (1u << i)) n *= shape[i];
  }
  return n;
}

std::int64_t feature_count(const TensorRef& x, const Options& options) {
  return feature_count(std::vector<std::int64_t>(x.shape.begin(), x.shape.begin() + x.rank),
                       options);
}

void train_forward(const TensorRef& x, const TensorRef& y, const TensorRef* mask,
                   const Options& options, const Weights& weights, const Adjustment* adjustment,
                   bool update_moving, TrainingContext& context, const Communicator* communicator) {
  const char* op = "train_forward";
  const Checked c =
      check_common(op, x, options, weights, true, Reads::moving_and_renorm, adjustment != nullptr);
  check_like(op, "output", y, x);
  check_mask(op, mask, x);
  if (communicator && communicator->size > 1 && !communicator->allgather) {
    fail(op, "a communicator of size > 1 needs an allgather function");
  }
  const TensorRef* stats_ops[] = {&x, mask ? mask : &x};
  const TensorRef* apply_ops[] = {&x, &y};
  context.ghost_batches = options.virtual_batch_size != 0;
  const TrainScalars scalars{options.epsilon, options.momentum, options.renorm_momentum,
                             options.rmin,    options.rmax,     options.dmax,
                             options.renorm,  update_moving};
  with_element_type(op, x, [&](auto element) {
    using T = decltype(element);
    backend_of(op, x.device)
        .run(detail::TrainForward<T>{
            detail::make_plan(x, c.feature_axes, c.groups, stats_ops, mask ? 2 : 1, mask ? 1 : -1),
            detail::make_plan(x, c.feature_axes, c.groups, apply_ops, 2, -1), data_of<T>(x),
            data_of<T>(y), mask_data(mask), scalars,
            typed_weights<compute_t<T>>(weights, adjustment), context, communicator});
  });
  // Whether a mask was given, not whether it has data: an empty tensor may have a null pointer,
  // and backward must still accept the same (empty) mask.
  context.has_mask = mask != nullptr;
}

void infer_forward(const TensorRef& x, const TensorRef& y, const Options& options,
                   const Weights& weights) {
  const char* op = "infer_forward";
  const Checked c = check_common(op, x, options, weights, false, Reads::moving_statistics);
  check_like(op, "output", y, x);
  const TensorRef* ops[] = {&x, &y};
  with_element_type(op, x, [&](auto element) {
    using T = decltype(element);
    backend_of(op, x.device)
        .run(detail::InferForward<T>{detail::make_plan(x, c.feature_axes, 1, ops, 2, -1),
                                     data_of<T>(x), data_of<T>(y), options.epsilon,
                                     typed_weights<compute_t<T>>(weights, nullptr)});
  });
}

void train_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                    const TensorRef* mask, const Options& options, const Weights& weights,
                    const TrainingContext& context, void* dgamma, void* dbeta,
                    const Communicator* communicator) {
  const char* op = "train_backward";
  const Checked c = check_common(op, x, options, weights, true, Reads::statistics_context);
  check_like(op, "dy", dy, x);
  check_like(op, "dx", dx, x);
  check_mask(op, mask, x);
  if (communicator && communicator->size > 1 && !communicator->allgather) {
    fail(op, "a communicator of size > 1 needs an allgather function");
  }
  if (context.groups != c.groups || context.features != c.features) {
    fail(op, "the training context does not belong to an input of this shape");
  }
  if (context.has_mask != (mask != nullptr)) {
    fail(op, context.has_mask ? "the forward call had a mask: pass the same mask to backward"
                              : "the forward call had no mask: backward takes none either");
  }
  // A context whose statistics stayed on a device meets data on the CPU: fetch them first.
  TrainingContext fetched;
  const bool fetch = context.device && x.device.type == DeviceType::cpu;
  if (fetch) {
    fetched = context;
    statistics_to_host(fetched);
  }
  const TrainingContext& statistics = fetch ? fetched : context;
  const auto stats = static_cast<std::size_t>(c.groups * c.features);
  const bool on_host = statistics.count.size() == stats && statistics.mean.size() == stats &&
                       statistics.inv_std.size() == stats &&
                       statistics.zscale.size() == static_cast<std::size_t>(c.features) &&
                       statistics.zshift.size() == static_cast<std::size_t>(c.features);
  if (!on_host && !statistics.device) {
    fail(op, "the training context holds no statistics (it must come from train_forward)");
  }
  const TensorRef* sums_ops[] = {&dy, &x};
  const TensorRef* dx_ops[] = {&dy, &x, &dx, mask ? mask : &x};
  with_element_type(op, x, [&](auto element) {
    using T = decltype(element);
    using W = compute_t<T>;
    backend_of(op, x.device)
        .run(detail::TrainBackward<T>{
            detail::make_plan(x, c.feature_axes, c.groups, sums_ops, 2, -1),
            detail::make_plan(x, c.feature_axes, c.groups, dx_ops, mask ? 4 : 3, mask ? 3 : -1),
            data_of<T>(dy), data_of<T>(x), data_of<T>(dx), mask_data(mask),
            typed_weights<W>(weights, nullptr), statistics, static_cast<W*>(dgamma),
            static_cast<W*>(dbeta), communicator});
  });
}

void infer_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                    const Options& options, const Weights& weights, void* dgamma, void* dbeta) {
  const char* op = "infer_backward";
  const Checked c = check_common(op, x, options, weights, false, Reads::moving_statistics);
  check_like(op, "dy", dy, x);
  check_like(op, "dx", dx, x);
  const TensorRef* sums_ops[] = {&dy, &x};
  const TensorRef* dx_ops[] = {&dy, &x, &dx};
  with_element_type(op, x, [&](auto element) {
    using T = decltype(element);
    using W = compute_t<T>;
    backend_of(op, x.device)
        .run(detail::InferBackward<T>{detail::make_plan(x, c.feature_axes, 1, sums_ops, 2, -1),
                                      detail::make_plan(x, c.feature_axes, 1, dx_ops, 3, -1),
                                      data_of<T>(dy), data_of<T>(x), data_of<T>(dx),
                                      options.epsilon, typed_weights<W>(weights, nullptr),
                                      static_cast<W*>(dgamma), static_cast<W*>(dbeta)});
  });
}

bool cuda_available() { return detail::cuda_backend().available(); }

RuntimeInfo runtime_info() {
  RuntimeInfo info;
  info.cpu_instruction_set = cpu::isa_name(cpu::active_isa());
  info.cpu_threads = cpu::max_threads();
  info.cuda_built = cuda::built();
  info.cuda_devices = cuda::device_count();
  return info;
}

namespace {
// Per thread, like a framework's "current stream": threads driving different streams do not
// interfere. Kept in builds without CUDA too, so that code setting a stream runs on every build.
thread_local void* current_cuda_stream = nullptr;
}  // namespace

void set_cuda_stream(void* stream) { current_cuda_stream = stream; }

void* cuda_stream() { return current_cuda_stream; }

}  // namespace batchnorm
