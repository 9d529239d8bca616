// Bindings of the layer operations: Options, TrainingContext and the four entry points. The GIL
// is released around every kernel; weights are updated in place.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "access.hpp"
#include "batchnorm/layer.hpp"
#include "bindings.hpp"
#include "cuda/runtime.hpp"
#include "tensors.hpp"
#include "weights.hpp"

namespace batchnorm::python {

namespace {

std::optional<TensorRef> mask_of(const std::optional<InputArray>& array) {
  if (!array) return std::nullopt;
  return to_mask(*array);
}

// The caller's device memory for the statistics a CUDA forward keeps (TrainingContext::
// device_storage), or none.
void use_statistics_storage(TrainingContext& context, const nb::object& storage,
                            const TensorRef& x) {
  context.device_storage = nullptr;
  context.device_storage_size = 0;
  if (storage.is_none()) return;
  const char* name = "statistics_storage";
  const TensorRef s = ArrayArgument(storage, name, ArrayArgument::Access::write).tensor();
  if (x.device.type != DeviceType::cuda) {
    throw nb::value_error("statistics_storage: only CUDA inputs keep their statistics there");
  }
  if (s.rank != 1 || (s.shape[0] > 1 && s.strides[0] != 1) || s.dtype != DType::float64) {
    throw nb::value_error("statistics_storage: expected a contiguous float64 vector");
  }
  if (s.device.type != x.device.type || s.device.index != x.device.index) {
    throw nb::value_error("statistics_storage: must live on the same device as the input");
  }
  context.device_storage = static_cast<double*>(s.data);
  context.device_storage_size = static_cast<std::size_t>(s.shape[0]);
}

void train_forward_binding(nb::handle x_array, nb::handle y_array,
                           const std::optional<InputArray>& mask_array, const Options& options,
                           const nb::object& adjust_scale, const nb::object& adjust_bias,
                           bool update_moving, TrainingContext& context,
                           const Communicator* communicator, const BoundWeights& bound,
                           const nb::object& statistics_storage) {
  const ArrayArgument x_argument(x_array, "x", ArrayArgument::Access::read);
  const TensorRef& x = x_argument.tensor();
  use_statistics_storage(context, statistics_storage, x);
  const ArrayArgument y_argument(y_array, "y", ArrayArgument::Access::write);
  const TensorRef& y = y_argument.tensor();
  const std::optional<TensorRef> mask = mask_of(mask_array);
  const std::int64_t features = feature_count(x, options);
  const Weights weights = bound.for_input(x, features);
  Adjustment adjustment;
  adjustment.scale =
      weight_pointer(adjust_scale, features, weights.dtype, x.device, "adjustment scale");
  adjustment.bias =
      weight_pointer(adjust_bias, features, weights.dtype, x.device, "adjustment bias");
  const bool adjusted = adjustment.scale || adjustment.bias;
  nb::gil_scoped_release released;
  train_forward(x, y, mask ? &*mask : nullptr, options, weights, adjusted ? &adjustment : nullptr,
                update_moving, context, communicator);
}

void infer_forward_binding(nb::handle x_array, nb::handle y_array, const Options& options,
                           const BoundWeights& bound) {
  const ArrayArgument x_argument(x_array, "x", ArrayArgument::Access::read);
  const TensorRef& x = x_argument.tensor();
  const ArrayArgument y_argument(y_array, "y", ArrayArgument::Access::write);
  const TensorRef& y = y_argument.tensor();
  const Weights weights = bound.for_input(x, feature_count(x, options));
  nb::gil_scoped_release released;
  infer_forward(x, y, options, weights);
}

void train_backward_binding(nb::handle dy_array, nb::handle x_array, nb::handle dx_array,
                            const std::optional<InputArray>& mask_array, const Options& options,
                            const TrainingContext& context, const nb::object& dgamma,
                            const nb::object& dbeta, const Communicator* communicator,
                            const BoundWeights& bound) {
  const ArrayArgument dy_argument(dy_array, "dy", ArrayArgument::Access::read);
  const TensorRef& dy = dy_argument.tensor();
  const ArrayArgument x_argument(x_array, "x", ArrayArgument::Access::read);
  const TensorRef& x = x_argument.tensor();
  const ArrayArgument dx_argument(dx_array, "dx", ArrayArgument::Access::write);
  const TensorRef& dx = dx_argument.tensor();
  const std::optional<TensorRef> mask = mask_of(mask_array);
  const std::int64_t features = feature_count(x, options);
  const Weights weights = bound.for_input(x, features);
  void* dgamma_ptr = weight_pointer(dgamma, features, weights.dtype, x.device, "dgamma");
  void* dbeta_ptr = weight_pointer(dbeta, features, weights.dtype, x.device, "dbeta");
  nb::gil_scoped_release released;
  train_backward(dy, x, dx, mask ? &*mask : nullptr, options, weights, context, dgamma_ptr,
                 dbeta_ptr, communicator);
}

void infer_backward_binding(nb::handle dy_array, nb::handle x_array, nb::handle dx_array,
                            const Options& options, const nb::object& dgamma,
                            const nb::object& dbeta, const BoundWeights& bound) {
  const ArrayArgument dy_argument(dy_array, "dy", ArrayArgument::Access::read);
  const TensorRef& dy = dy_argument.tensor();
  const ArrayArgument x_argument(x_array, "x", ArrayArgument::Access::read);
  const TensorRef& x = x_argument.tensor();
  const ArrayArgument dx_argument(dx_array, "dx", ArrayArgument::Access::write);
  const TensorRef& dx = dx_argument.tensor();
  const std::int64_t features = feature_count(x, options);
  const Weights weights = bound.for_input(x, features);
  void* dgamma_ptr = weight_pointer(dgamma, features, weights.dtype, x.device, "dgamma");
  void* dbeta_ptr = weight_pointer(dbeta, features, weights.dtype, x.device, "dbeta");
  nb::gil_scoped_release released;
  infer_backward(dy, x, dx, options, weights, dgamma_ptr, dbeta_ptr);
}

// What each backward reads of its forward call's weights, which the forward keeps a copy of (a
// later update of gamma must not change an earlier call's gradient): the training backward gamma
// only; the inference backward gamma and the moving statistics (of beta only whether it exists,
// which decides whether dbeta is computed).
const std::vector<std::string>& kept_for_backward(bool training) {
  static const std::vector<std::string> training_names{"gamma"};
  static const std::vector<std::string> inference_names{"gamma", "moving_mean", "moving_variance"};
  return training ? training_names : inference_names;
}

// kept_for_backward as a set of BoundWeights slots (resolved once).
BoundWeights::SlotMask kept_slots(bool training) {
  static const auto slots = [](bool training) {
    BoundWeights::SlotMask mask = 0;
    for (const std::string& name : kept_for_backward(training)) {
      mask |= 1u << weight_slot_index(name);
    }
    return mask;
  };
  static const BoundWeights::SlotMask training_slots = slots(true), inference_slots = slots(false);
  return training ? training_slots : inference_slots;
}

// numpy.empty(n, dtype) for a gradient vector. The function and the two dtypes are looked up
// once and kept for the life of the process (like numpy_array_type's ndarray type).
nb::object new_numpy_vector(std::int64_t n, DType dtype) {
  static PyObject* const empty =
      nb::object(nb::module_::import_("numpy").attr("empty")).release().ptr();
  static PyObject* const float32 =
      nb::object(nb::module_::import_("numpy").attr("dtype")("float32")).release().ptr();
  static PyObject* const float64 =
      nb::object(nb::module_::import_("numpy").attr("dtype")("float64")).release().ptr();
  const nb::object length = nb::int_(n);
  PyObject* args[] = {length.ptr(), dtype == DType::float64 ? float64 : float32};
  PyObject* result = PyObject_Vectorcall(empty, args, 2, nullptr);
  if (!result) throw nb::python_error();
  return nb::steal(result);
}

// Whether the plain call writes its result for x into `out` as it is: a writable, aligned NumPy
// array of x's dtype and shape whose bytes lie apart from x's and the other inputs'. (Arrays that
// interleave without sharing an element take the general path, which tells them apart.)
bool writes_as_is(const ArrayArgument& out, const TensorRef& x,
                  std::initializer_list<const TensorRef*> inputs) {
  if (!out.read()) return false;
  const TensorRef& t = out.tensor();
  if (t.dtype != x.dtype || t.rank != x.rank ||
      !std::equal(x.shape.begin(), x.shape.begin() + x.rank, t.shape.begin()) ||
      detail::layer_views_overlap(t, x)) {
    return false;
  }
  for (const TensorRef* input : inputs) {
    if (input && detail::layer_views_overlap(t, *input)) return false;
  }
  return true;
}

// Statistics objects for the training calls (the plain binding's, TrainingContext.pooled), taken
// back when Python frees them: a context whose vectors already have a call's sizes is sized again
// without being written (reset_context), where a new one zero-filled 3 * groups * features
// doubles on the calling thread, lines which the threads that then wrote the statistics took from
// its core. A layer's call frees the statistics of its call before the last, so a loop of calls
// alternates between two of them. At most kKeptContexts wait, none larger than kMaxKeptBytes;
// they are never freed (nor is the pool: a Python object can outlive the module's static
// objects at exit).
class ContextPool {
 public:
  static constexpr std::size_t kKeptContexts = 8;
  static constexpr std::size_t kMaxKeptBytes = std::size_t{1} << 20;

  static ContextPool& instance() {
    static ContextPool* const pool = new ContextPool;
    return *pool;
  }

  // A context for a training call of `features` features: a kept one of that many if there is
  // one, else the last one kept, else a new one.
  std::shared_ptr<TrainingContext> take(std::size_t features) {
    std::unique_ptr<TrainingContext> context;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!kept_.empty()) {
        auto match = std::find_if(kept_.begin(), kept_.end(),
                                  [&](const auto& c) { return c->zscale.size() == features; });
        if (match == kept_.end()) match = kept_.end() - 1;
        context = std::move(*match);
        kept_.erase(match);
      }
    }
    if (!context) context = std::make_unique<TrainingContext>();
    // No statistics until a forward fills it (a backward refuses it before): the vectors keep
    // their sizes, which the forward then leaves unwritten where they fit.
    context->groups = 0;
    context->features = 0;
    context->has_mask = false;
    context->ghost_batches = false;
    return {context.release(), [](TrainingContext* freed) { instance().keep(freed); }};
  }

 private:
  ContextPool() { kept_.reserve(kKeptContexts); }

  void keep(TrainingContext* freed) noexcept {
    std::unique_ptr<TrainingContext> context(freed);
    // Statistics a CUDA forward kept on its device are released now, as when a context is
    // destroyed (the host vectors of such a context are empty).
    context->device.reset();
    context->device_storage = nullptr;
    context->device_storage_size = 0;
    const std::size_t values = context->count.capacity() + context->mean.capacity() +
                               context->inv_std.capacity() + context->zscale.capacity() +
                               context->zshift.capacity();
    if (values * sizeof(double) > kMaxKeptBytes) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (kept_.size() < kKeptContexts) kept_.push_back(std::move(context));  // (reserved)
  }

  std::mutex mutex_;
  std::vector<std::unique_ptr<TrainingContext>> kept_;
};

// The plain call, in one binding: NumPy data read through the buffer protocol and host weights.
// It keeps the weights the backward reads, makes the statistics object and runs the kernel, with
// positional arguments, instead of the general path's Python objects per call. None where the
// call is not that case (y included: an `out=` the call cannot write as it is); the general path
// then takes it, with its conversions and errors.
nb::object plain_forward_binding(nb::handle x_array, nb::handle y_array, bool training,
                                 bool update_moving, const Options& options,
                                 const BoundWeights& bound, const Communicator* communicator,
                                 WeightAccess* access, nb::handle name) {
  if (bound.device().type != DeviceType::cpu) return nb::none();
  const ArrayArgument x_argument(x_array, ArrayArgument::Access::read);
  if (!x_argument.read()) return nb::none();
  const TensorRef& x = x_argument.tensor();
  const ArrayArgument y_argument(y_array, ArrayArgument::Access::write);
  if (!writes_as_is(y_argument, x, {})) return nb::none();
  const TensorRef& y = y_argument.tensor();
  const std::int64_t features = feature_count(x, options);
  const Weights weights = bound.for_input(x, features);
  if (!training) {
    // A reader of the weights: computed again, holding the guard's lock, where a writer (another
    // thread's training call) was at work or began meanwhile. The lock is given back as soon as
    // the kernel is done, before the GIL is taken again: other threads' Python can hold the GIL
    // for milliseconds, and a training call waiting for the lock would wait that long too.
    const auto read = [&](ReadScope* reading) {
      nb::object kept = bound.kept_snapshot(kept_slots(false));
      {
        nb::gil_scoped_release released;
        infer_forward(x, y, options, weights);
        if (reading) reading->release();
      }
      return nb::make_tuple(kept, nb::none());
    };
    if (!access) return read(nullptr);
    const std::uint64_t version = access->version();
    if (!(version & 1)) {
      nb::object result = read(nullptr);
      if (access->version() == version) return result;
    }
    ReadScope reading(*access);
    return read(&reading);
  }
  const std::shared_ptr<TrainingContext> pooled =
      ContextPool::instance().take(static_cast<std::size_t>(features));
  nb::object statistics = nb::cast(pooled);
  TrainingContext& context = *pooled;
  std::optional<WriteScope> writing;  // (the layer's guard; functional's calls have none)
  if (access) writing.emplace(*access, true, name);
  // Copied before the kernel runs: a later update of gamma must not change this call's gradient.
  nb::object kept = bound.kept_snapshot(kept_slots(true));
  {
    nb::gil_scoped_release released;
    train_forward(x, y, nullptr, options, weights, nullptr, update_moving, context, communicator);
    writing.reset();  // (given back before the GIL is taken again, as a reader gives its lock)
  }
  return nb::make_tuple(kept, statistics);
}

// The plain backward of a plain forward's context (`context` None for an inference call): dy a
// NumPy array of x's dtype and shape, dx given, dgamma and dbeta made here. None where dy is not
// such an array (the general path casts it or words the error).
nb::object plain_backward_binding(nb::handle dy_array, nb::handle x_array, nb::handle dx_array,
                                  const std::optional<InputArray>& mask_array,
                                  const Options& options, const TrainingContext* context,
                                  const BoundWeights& bound, const Communicator* communicator) {
  if (bound.device().type != DeviceType::cpu) return nb::none();
  const ArrayArgument dy_argument(dy_array, ArrayArgument::Access::read);
  const ArrayArgument x_argument(x_array, ArrayArgument::Access::read);
  if (!dy_argument.read() || !x_argument.read()) return nb::none();
  const TensorRef& dy = dy_argument.tensor();
  const TensorRef& x = x_argument.tensor();
  if (dy.dtype != x.dtype || dy.rank != x.rank ||
      !std::equal(x.shape.begin(), x.shape.begin() + x.rank, dy.shape.begin())) {
    return nb::none();
  }
  const std::optional<TensorRef> mask = mask_of(mask_array);
  const ArrayArgument dx_argument(dx_array, ArrayArgument::Access::write);
  if (!writes_as_is(dx_argument, x, {&dy, mask ? &*mask : nullptr})) return nb::none();
  const TensorRef& dx = dx_argument.tensor();
  const std::int64_t features = feature_count(x, options);
  const Weights weights = bound.for_input(x, features);
  nb::object dgamma = bound.has("gamma") ? new_numpy_vector(features, weights.dtype) : nb::none();
  nb::object dbeta = bound.has("beta") ? new_numpy_vector(features, weights.dtype) : nb::none();
  void* dgamma_ptr = weight_pointer(dgamma, features, weights.dtype, x.device, "dgamma");
  void* dbeta_ptr = weight_pointer(dbeta, features, weights.dtype, x.device, "dbeta");
  {
    nb::gil_scoped_release released;
    if (context) {
      train_backward(dy, x, dx, mask ? &*mask : nullptr, options, weights, *context, dgamma_ptr,
                     dbeta_ptr, communicator);
    } else {
      infer_backward(dy, x, dx, options, weights, dgamma_ptr, dbeta_ptr);
    }
  }
  return nb::make_tuple(nb::borrow(dx_array), dgamma, dbeta);
}

// The packed form of a training context: [count | mean | inv_std | zscale | zshift], the first
// three groups * features values each, the last two features each (host float64).
std::size_t packed_size(std::int64_t groups, std::int64_t features) {
  return static_cast<std::size_t>(3 * groups * features + 2 * features);
}

using PackedArray = nb::ndarray<nb::numpy, double, nb::ndim<1>>;
using PackedInput = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

PackedArray pack_context(TrainingContext& context) {
  statistics_to_host(context);
  const std::size_t size = packed_size(context.groups, context.features);
  auto* values = new double[size];
  nb::capsule owner(values, [](void* p) noexcept { delete[] static_cast<double*>(p); });
  double* cursor = values;
  for (const std::vector<double>* part :
       {&context.count, &context.mean, &context.inv_std, &context.zscale, &context.zshift}) {
    cursor = std::copy(part->begin(), part->end(), cursor);
  }
  return PackedArray(values, {size}, owner);
}

TrainingContext unpack_context(const PackedInput& packed, std::int64_t groups,
                               std::int64_t features, bool has_mask, bool ghost_batches) {
  if (groups < 0 || features < 0 || packed.shape(0) != packed_size(groups, features)) {
    throw nb::value_error("unpack: the packed statistics do not fit these groups and features");
  }
  TrainingContext context;
  context.groups = groups;
  context.features = features;
  context.has_mask = has_mask;
  context.ghost_batches = ghost_batches;
  const double* cursor = packed.data();
  const auto stats = static_cast<std::ptrdiff_t>(groups * features);
  for (auto [part, n] : {std::pair{&context.count, stats}, std::pair{&context.mean, stats},
                         std::pair{&context.inv_std, stats},
                         std::pair{&context.zscale, static_cast<std::ptrdiff_t>(features)},
                         std::pair{&context.zshift, static_cast<std::ptrdiff_t>(features)}}) {
    part->assign(cursor, cursor + n);
    cursor += n;
  }
  return context;
}

// A context over statistics a CUDA training forward kept in `storage` (its statistics_storage),
// for a backward rebuilt from that array: they are read there, never copied to the host.
TrainingContext context_in_storage(const nb::object& storage, std::int64_t groups,
                                   std::int64_t features, bool has_mask, bool ghost_batches) {
  const TensorRef s = ArrayArgument(storage, "storage", ArrayArgument::Access::write).tensor();
  if (groups < 0 || features < 0 || s.rank != 1 || s.dtype != DType::float64 ||
      s.device.type != DeviceType::cuda ||
      static_cast<std::size_t>(s.shape[0]) != packed_size(groups, features) ||
      (s.shape[0] > 1 && s.strides[0] != 1)) {
    throw nb::value_error(
        "in_device_storage: expected a contiguous float64 CUDA vector of the packed size");
  }
  TrainingContext context;
  context.groups = groups;
  context.features = features;
  context.has_mask = has_mask;
  context.ghost_batches = ghost_batches;
  context.device = cuda::statistics_in(static_cast<double*>(s.data), groups, features);
  return context;
}

}  // namespace

void bind_operations(nb::module_& m) {
  auto options = nb::class_<Options>(m, "Options", "Layer hyper-parameters passed to the kernels.")
                     .def(nb::init<>())
                     .def_rw("axes", &Options::axes);
#define BATCHNORM_BIND_OPTION(type, name, default_value) options.def_rw(#name, &Options::name);
  BATCHNORM_SCALAR_OPTIONS(BATCHNORM_BIND_OPTION)
#undef BATCHNORM_BIND_OPTION

  m.def("validate", &validate, nb::arg("options"), nb::arg("with_adjustment") = false,
        "Raises ValueError naming the first option outside its range (with_adjustment: the "
        "calls will pass Keras' adjustment).");
  nb::class_<WeightSchema>(m, "WeightSchema",
                           "The weights of a layer with given options for inputs of a shape.")
      .def_ro("axes", &WeightSchema::axes)
      .def_ro("feature_shape", &WeightSchema::feature_shape)
      .def_ro("features", &WeightSchema::features)
      .def_ro("weight_shape", &WeightSchema::weight_shape)
      .def_ro("names", &WeightSchema::names);
  m.def("weight_schema", &weight_schema, nb::arg("options"), nb::arg("input_shape"),
        "The resolved feature axes, feature shape and count, Keras' weight shape and the weight "
        "names in Keras order (validates the options and the axes against the shape).");
  m.def("weight_names", &weight_names, nb::arg("options"),
        "The weight names in Keras order for these options.");

  nb::class_<TrainingContext>(m, "TrainingContext",
                              "Statistics a training forward keeps for its backward pass.")
      .def(nb::init<>())
      .def_ro("groups", &TrainingContext::groups)
      .def_ro("features", &TrainingContext::features)
      .def_ro("has_mask", &TrainingContext::has_mask)
      .def_ro("ghost_batches", &TrainingContext::ghost_batches)
      .def("pack", &pack_context,
           "The statistics as one new float64 host vector [count | mean | inv_std | zscale | "
           "zshift] (groups * features values for the first three, features for the others), for "
           "frameworks that keep a call's state as arrays.")
      .def_static("unpack", &unpack_context, nb::arg("packed"), nb::arg("groups"),
                  nb::arg("features"), nb::arg("has_mask"), nb::arg("ghost_batches"),
                  "A context from the vector pack() made (the backward checks it against its "
                  "input as any other).")
      .def_static(
          "pooled",
          [](std::int64_t features) {
            return ContextPool::instance().take(
                static_cast<std::size_t>(std::max<std::int64_t>(features, 0)));
          },
          nb::arg("features"),
          "An empty context (a backward refuses it until a training forward fills it) for a "
          "forward of `features` features, its vectors those of a context Python freed: a "
          "forward that sizes them as before writes nothing on the calling thread before its "
          "statistics.")
      .def_static("in_device_storage", &context_in_storage, nb::arg("storage"), nb::arg("groups"),
                  nb::arg("features"), nb::arg("has_mask"), nb::arg("ghost_batches"),
                  "A context over the statistics a CUDA training forward kept in its "
                  "statistics_storage (the packed layout, read in place by the backward; keep "
                  "the array alive and unchanged until then).");

  // Keyword-only: a call names every array. The weights come bound in a Weights object (by
  // Keras' names, checked when bound); each array's dtype is its own.
  m.def("train_forward", &train_forward_binding, nb::kw_only(), nb::arg("x"),
        nb::arg("y").noconvert(), nb::arg("mask").none() = nb::none(), nb::arg("options"),
        nb::arg("adjust_scale").none() = nb::none(), nb::arg("adjust_bias").none() = nb::none(),
        nb::arg("update_moving") = true, nb::arg("context"),
        nb::arg("communicator").none() = nb::none(), nb::arg("weights"),
        nb::arg("statistics_storage").none() = nb::none(),
        nb::sig("def train_forward(*, x: object, y: object, mask: object | None = None, "
                "options: Options, adjust_scale: object | None = None, adjust_bias: object | "
                "None = None, update_moving: bool = True, context: TrainingContext, "
                "communicator: Communicator | None = None, weights: Weights, "
                "statistics_storage: object | None = None) -> None"),
        "Training forward pass: y from the batch statistics of x (over the mask's true "
        "positions), the statistics kept in `context`, and the moving statistics updated in "
        "place when update_moving. With a communicator of size > 1 the statistics are those of "
        "every process's batch. On CUDA, `statistics_storage` (a float64 device vector of the "
        "packed size, kept alive by the caller until the last backward) holds the kept "
        "statistics, so that the call allocates nothing that outlives it (CUDA graph capture).");
  m.def("infer_forward", &infer_forward_binding, nb::kw_only(), nb::arg("x"),
        nb::arg("y").noconvert(), nb::arg("options"), nb::arg("weights"),
        nb::sig("def infer_forward(*, x: object, y: object, options: Options, weights: Weights) "
                "-> None"),
        "Inference forward pass with the moving statistics.");
  m.def("train_backward", &train_backward_binding, nb::kw_only(), nb::arg("dy"), nb::arg("x"),
        nb::arg("dx").noconvert(), nb::arg("mask").none() = nb::none(), nb::arg("options"),
        nb::arg("context"), nb::arg("dgamma").none() = nb::none(),
        nb::arg("dbeta").none() = nb::none(), nb::arg("communicator").none() = nb::none(),
        nb::arg("weights"),
        nb::sig("def train_backward(*, dy: object, x: object, dx: object, mask: object | None = "
                "None, options: Options, context: TrainingContext, dgamma: object | None = None, "
                "dbeta: object | None = None, communicator: Communicator | None = None, "
                "weights: Weights) -> None"),
        "Backward of train_forward with its context (and mask): writes dx, dgamma and dbeta "
        "(synchronized as the forward was).");
  m.def("infer_backward", &infer_backward_binding, nb::kw_only(), nb::arg("dy"), nb::arg("x"),
        nb::arg("dx").noconvert(), nb::arg("options"), nb::arg("dgamma").none() = nb::none(),
        nb::arg("dbeta").none() = nb::none(), nb::arg("weights"),
        nb::sig("def infer_backward(*, dy: object, x: object, dx: object, options: Options, "
                "dgamma: object | None = None, dbeta: object | None = None, weights: Weights) "
                "-> None"),
        "Backward of infer_forward: writes dx, dgamma and dbeta.");
  // Positional: these are the per-call path of the NumPy layer, where naming every argument
  // costs more than the smallest kernels' setup.
  m.def("plain_forward", &plain_forward_binding, nb::arg("x"), nb::arg("y").noconvert(),
        nb::arg("training"), nb::arg("update_moving"), nb::arg("options"), nb::arg("weights"),
        nb::arg("communicator").none(), nb::arg("access").none(), nb::arg("name").none(),
        nb::sig("def plain_forward(x: object, y: object, training: bool, update_moving: bool, "
                "options: Options, weights: Weights, communicator: Communicator | None, "
                "access: WeightAccess | None, name: object) -> tuple[Weights, TrainingContext | "
                "None] | None"),
        "train_forward (without mask or adjustment) or infer_forward of a float16/32/64 NumPy "
        "array with host weights into y (a writable NumPy array like x, apart from it), holding "
        "`access` (where given) as a writer (training) or "
        "reading the weights again where a writer overlapped (inference): returns the weights the "
        "backward "
        "reads, copied first, and the training statistics; None, with nothing done, for any "
        "other input or weights. `name` names the layer in errors.");
  m.def("plain_backward", &plain_backward_binding, nb::arg("dy"), nb::arg("x"),
        nb::arg("dx").noconvert(), nb::arg("mask").none(), nb::arg("options"),
        nb::arg("context").none(), nb::arg("weights"), nb::arg("communicator").none(),
        nb::sig("def plain_backward(dy: object, x: object, dx: object, mask: object | None, "
                "options: Options, context: TrainingContext | None, weights: Weights, "
                "communicator: Communicator | None) -> tuple[object, object | None, "
                "object | None] | None"),
        "Backward of a plain_forward call (context None for inference) into dx, with new "
        "NumPy dgamma and dbeta: (dx, dgamma, dbeta); None, with nothing done, where dy is "
        "not a NumPy array of x's dtype and shape, dx not a writable one apart from x, dy and "
        "the mask, or the weights are not on the host.");
  m.def("kept_for_backward", &kept_for_backward, nb::arg("training"),
        "The weights a backward reads of its forward call's, which the forward keeps a copy "
        "of.");
  m.def(
      "runtime_info",
      [] {
        const RuntimeInfo info = runtime_info();
        nb::dict result;
        result["cpu_instruction_set"] = info.cpu_instruction_set;
        result["cpu_threads"] = info.cpu_threads;
        result["cuda_built"] = info.cuda_built;
        result["cuda_devices"] = info.cuda_devices;
        return result;
      },
      nb::sig("def runtime_info() -> dict[str, str | int | bool]"),
      "What the kernels run with here: the CPU instruction set picked at run time, OpenMP's "
      "threads per call, whether this build has the CUDA backend and how many devices it sees.");
  m.def("cuda_available", &cuda_available,
        "Whether this build has the CUDA backend and a CUDA device is visible.");
}

}  // namespace batchnorm::python
