// XLA FFI handlers of batchnorm.jax (the opt-in BATCHNORM_BUILD_JAX_FFI build): XLA calls the
// kernels with its own CPU buffers, so inputs are read and results written where XLA keeps them,
// with no copy and no Python on the way. The Python side (batchnorm/jax.py) registers the four
// handlers with jax.ffi and passes every option as an attribute; optional arrays (gamma, beta,
// the mask, the adjustment) are present or absent as attributes say, in a fixed order.
#include <xla/ffi/api/ffi.h>

#include <batchnorm/batchnorm.hpp>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace ffi = xla::ffi;

namespace {

using batchnorm::DType;
using batchnorm::TensorRef;

DType dtype_of(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F16:
      return DType::float16;
    case ffi::DataType::BF16:
      return DType::bfloat16;
    case ffi::DataType::F32:
      return DType::float32;
    case ffi::DataType::F64:
      return DType::float64;
    case ffi::DataType::PRED:
      return DType::boolean;
    default:
      throw std::invalid_argument("batchnorm: unsupported dtype");
  }
}

std::vector<std::int64_t> shape_of(const ffi::AnyBuffer& buffer) {
  const auto dims = buffer.dimensions();
  return {dims.begin(), dims.end()};
}

// XLA's default layout is dense row-major, which is what contiguous_view describes.
TensorRef view(const ffi::AnyBuffer& buffer) {
  return batchnorm::contiguous_view(buffer.untyped_data(), dtype_of(buffer.element_type()),
                                    shape_of(buffer));
}

template <class T>
T attribute(const ffi::Dictionary& attrs, std::string_view name) {
  auto value = attrs.get<T>(name);
  if (!value.has_value()) {
    throw std::invalid_argument("batchnorm: attribute " + std::string(name) + " is missing");
  }
  return *value;
}

batchnorm::Options options_of(const ffi::Dictionary& attrs) {
  batchnorm::Options o;
  const auto axes = attribute<ffi::Span<const std::int64_t>>(attrs, "axes");
  o.axes.assign(axes.begin(), axes.end());
#define BATCHNORM_READ_OPTION(type, name, default_value) o.name = attribute<type>(attrs, #name);
  BATCHNORM_SCALAR_OPTIONS(BATCHNORM_READ_OPTION)
#undef BATCHNORM_READ_OPTION
  return o;
}

// The mask as the kernels read it: a boolean view with x's shape, stride 0 where it broadcasts.
// It comes in Keras' form (x's leading axes, broadcast along the last one) or with x's rank and
// sizes 1 where it broadcasts; the Python side checked the shapes before the call.
TensorRef mask_view(const ffi::AnyBuffer& mask, const TensorRef& x) {
  std::vector<std::int64_t> shape = shape_of(mask);
  if (static_cast<int>(shape.size()) == x.rank - 1) shape.push_back(1);
  TensorRef view = batchnorm::contiguous_view(mask.untyped_data(), DType::boolean, shape);
  for (int i = 0; i < x.rank; ++i) {
    if (view.shape[i] == 1 && x.shape[i] != 1) view.strides[i] = 0;
    view.shape[i] = x.shape[i];
  }
  return view;
}

// Walks the arguments (or results) of a call in order, as AnyBuffers.
template <class List>
class Cursor {
 public:
  explicit Cursor(const List& list) : list_(list) {}

  ffi::AnyBuffer next() {
    auto item = list_.template get<ffi::AnyBuffer>(index_++);
    if (!item.has_value()) throw std::invalid_argument("batchnorm: too few buffers");
    return buffer(*item);
  }

  // The next buffer's data, or null when `present` is false (then nothing is consumed).
  void* next_data_if(bool present) { return present ? next().untyped_data() : nullptr; }

 private:
  static ffi::AnyBuffer buffer(ffi::AnyBuffer b) { return b; }
  static ffi::AnyBuffer buffer(ffi::Result<ffi::AnyBuffer> b) { return *b; }

  const List& list_;
  std::size_t index_ = 0;
};

batchnorm::Weights weights_for(const TensorRef& x) {
  batchnorm::Weights w;
  w.dtype = batchnorm::weight_dtype(x.dtype);
  return w;
}

std::size_t vector_bytes(const batchnorm::Weights& w, std::int64_t features) {
  return static_cast<std::size_t>(features) * batchnorm::dtype_size(w.dtype);
}

// The packed statistics: [count | mean | inv_std | zscale | zshift] as float64 (carried by XLA
// as uint32 words, since JAX has float64 arrays only in x64 mode); the layout of
// TrainingContext.pack in the Python extension.
void pack(const batchnorm::TrainingContext& context, const ffi::AnyBuffer& saved) {
  auto* cursor = static_cast<double*>(saved.untyped_data());
  std::size_t total = 0;
  for (const auto* part :
       {&context.count, &context.mean, &context.inv_std, &context.zscale, &context.zshift}) {
    total += part->size();
  }
  if (total * sizeof(double) != saved.size_bytes()) {
    throw std::invalid_argument("batchnorm: the saved statistics have the wrong size");
  }
  for (const auto* part :
       {&context.count, &context.mean, &context.inv_std, &context.zscale, &context.zshift}) {
    std::memcpy(cursor, part->data(), part->size() * sizeof(double));
    cursor += part->size();
  }
}

batchnorm::TrainingContext unpack(const ffi::AnyBuffer& saved, std::int64_t groups,
                                  std::int64_t features, bool has_mask, bool ghost_batches) {
  const auto stats = static_cast<std::size_t>(groups * features);
  const auto per_feature = static_cast<std::size_t>(features);
  if ((3 * stats + 2 * per_feature) * sizeof(double) != saved.size_bytes()) {
    throw std::invalid_argument("batchnorm: the saved statistics have the wrong size");
  }
  batchnorm::TrainingContext context;
  context.groups = groups;
  context.features = features;
  context.has_mask = has_mask;
  context.ghost_batches = ghost_batches;
  const auto* cursor = static_cast<const double*>(saved.untyped_data());
  for (auto [part, n] :
       {std::pair{&context.count, stats}, std::pair{&context.mean, stats},
        std::pair{&context.inv_std, stats}, std::pair{&context.zscale, per_feature},
        std::pair{&context.zshift, per_feature}}) {
    part->assign(cursor, cursor + n);
    cursor += n;
  }
  return context;
}

template <class Body>
ffi::Error guarded(Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::exception& error) {
    return ffi::Error::InvalidArgument(error.what());
  }
}

// Arguments: x, [gamma], [beta], [mask], [adjust_scale, adjust_bias], the moving statistics
// (Keras order). Results: y, the saved statistics, the updated moving statistics.
ffi::Error train_forward(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  return guarded([&] {
    const batchnorm::Options options = options_of(attrs);
    Cursor<ffi::RemainingArgs> in(args);
    Cursor<ffi::RemainingRets> out(rets);
    const TensorRef x = view(in.next());
    batchnorm::Weights w = weights_for(x);
    w.gamma = in.next_data_if(options.scale);
    w.beta = in.next_data_if(options.center);
    std::optional<TensorRef> mask;
    if (attribute<bool>(attrs, "has_mask")) mask = mask_view(in.next(), x);
    std::optional<batchnorm::Adjustment> adjustment;
    if (attribute<bool>(attrs, "has_adjustment")) {
      adjustment = batchnorm::Adjustment{in.next_data_if(true), in.next_data_if(true)};
    }
    const TensorRef y = view(out.next());
    const auto saved = out.next();
    const std::int64_t features = batchnorm::feature_count(x, options);
    // The moving statistics are results: copied from their inputs, then updated in place.
    for (const std::string& name : batchnorm::weight_names(options)) {
      if (name == "gamma" || name == "beta") continue;
      const void* before = in.next_data_if(true);
      void* after = out.next_data_if(true);
      std::memcpy(after, before, vector_bytes(w, features));
      *batchnorm::weight_slot(w, name) = after;
    }
    batchnorm::TrainingContext context;
    batchnorm::train_forward(x, y, mask ? &*mask : nullptr, options, w,
                             adjustment ? &*adjustment : nullptr, true, context);
    pack(context, saved);
  });
}

// Arguments: dy, x, [gamma], [mask], the saved statistics. Results: dx, dgamma, dbeta (empty
// where the layer has no such weight).
ffi::Error train_backward(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  return guarded([&] {
    const batchnorm::Options options = options_of(attrs);
    Cursor<ffi::RemainingArgs> in(args);
    Cursor<ffi::RemainingRets> out(rets);
    const TensorRef dy = view(in.next());
    const TensorRef x = view(in.next());
    batchnorm::Weights w = weights_for(x);
    w.gamma = in.next_data_if(options.scale);
    std::optional<TensorRef> mask;
    if (attribute<bool>(attrs, "has_mask")) mask = mask_view(in.next(), x);
    const std::int64_t features = batchnorm::feature_count(x, options);
    const std::int64_t groups = options.virtual_batch_size != 0 && x.shape[0] != 0
                                    ? x.shape[0] / options.virtual_batch_size
                                    : 1;
    const batchnorm::TrainingContext context =
        unpack(in.next(), groups, features, mask.has_value(), options.virtual_batch_size != 0);
    const TensorRef dx = view(out.next());
    void* dgamma = out.next().untyped_data();
    void* dbeta = out.next().untyped_data();
    // The backward reads of beta only whether it exists: its gradient's buffer says so.
    w.beta = options.center ? dbeta : nullptr;
    batchnorm::train_backward(dy, x, dx, mask ? &*mask : nullptr, options, w, context,
                              options.scale ? dgamma : nullptr, options.center ? dbeta : nullptr);
  });
}

// Arguments: x, [gamma], [beta], moving_mean, moving_variance. Result: y.
ffi::Error infer_forward(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  return guarded([&] {
    const batchnorm::Options options = options_of(attrs);
    Cursor<ffi::RemainingArgs> in(args);
    Cursor<ffi::RemainingRets> out(rets);
    const TensorRef x = view(in.next());
    batchnorm::Weights w = weights_for(x);
    w.gamma = in.next_data_if(options.scale);
    w.beta = in.next_data_if(options.center);
    w.moving_mean = in.next_data_if(true);
    w.moving_variance = in.next_data_if(true);
    batchnorm::infer_forward(x, view(out.next()), options, w);
  });
}

// Arguments: dy, x, [gamma], moving_mean, moving_variance. Results: dx, dgamma, dbeta.
ffi::Error infer_backward(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  return guarded([&] {
    const batchnorm::Options options = options_of(attrs);
    Cursor<ffi::RemainingArgs> in(args);
    Cursor<ffi::RemainingRets> out(rets);
    const TensorRef dy = view(in.next());
    const TensorRef x = view(in.next());
    batchnorm::Weights w = weights_for(x);
    w.gamma = in.next_data_if(options.scale);
    w.moving_mean = in.next_data_if(true);
    w.moving_variance = in.next_data_if(true);
    const TensorRef dx = view(out.next());
    void* dgamma = out.next().untyped_data();
    void* dbeta = out.next().untyped_data();
    w.beta = options.center ? dbeta : nullptr;  // (read only for whether it exists)
    batchnorm::infer_backward(dy, x, dx, options, w, options.scale ? dgamma : nullptr,
                              options.center ? dbeta : nullptr);
  });
}

}  // namespace

#define BATCHNORM_FFI_HANDLER(symbol, function)   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, function, \
                                ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs())

BATCHNORM_FFI_HANDLER(BatchnormTrainForward, train_forward);
BATCHNORM_FFI_HANDLER(BatchnormTrainBackward, train_backward);
BATCHNORM_FFI_HANDLER(BatchnormInferForward, infer_forward);
BATCHNORM_FFI_HANDLER(BatchnormInferBackward, infer_backward);
