// The stateful C++ twin of Python's batchnorm.BatchNormalization: options, weights and moving
// statistics held in std::vector, training and inference forward, backward and Keras-ordered
// state. Header-only glue over the compiled free functions of batchnorm.hpp, which it includes
// (and which includes it), so `#include <batchnorm/batchnorm.hpp>` is all a user writes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "batchnorm/batchnorm.hpp"

namespace batchnorm {

using Shape = std::vector<std::int64_t>;

// Constructor arguments of the layer: the kernel Options (axes, momentum, epsilon, renorm and
// its clipping and momentum, virtual_batch_size) plus what only the layer knows.
struct LayerOptions : Options {
  bool trainable = true;  // false: training calls run in inference mode and change nothing (Keras)
  // Constant initial values of the weights at build (Keras' default initializers).
  double gamma_initializer = 1.0;
  double beta_initializer = 0.0;
  double moving_mean_initializer = 0.0;
  double moving_variance_initializer = 1.0;
};

// Optional inputs of a training call on contiguous data; inference ignores them (as Keras).
template <class T>
struct TrainingExtras {
  // Booleans over the input shape without the feature axes, C order: (B, T) for a (B, T, C)
  // input with axes {-1}, (B, H, W) for NCHW with axes {1}. Only true positions feed the
  // statistics; every position is normalized.
  const bool* mask = nullptr;
  // Keras' `adjustment`: per-feature scale and bias (C values each, feature shape in C order);
  // null means scale 1 and bias 0. Not allowed together with virtual_batch_size (as Keras).
  const T* adjustment_scale = nullptr;
  const T* adjustment_bias = nullptr;
};

namespace detail {

template <class T>
constexpr DType layer_dtype() {
  return std::is_same_v<T, double> ? DType::float64 : DType::float32;
}

// Whether the memory spanned by two views intersects (conservative for interleaved views).
inline bool layer_views_overlap(const TensorRef& a, const TensorRef& b) {
  auto span = [](const TensorRef& t) {
    std::int64_t low = 0, high = 0;
    for (int i = 0; i < t.rank; ++i) {
      const std::int64_t extent = (t.shape[i] - 1) * t.strides[i];
      (extent < 0 ? low : high) += extent;
    }
    const auto bytes = static_cast<std::int64_t>(dtype_size(t.dtype));
    const auto base = reinterpret_cast<std::intptr_t>(t.data);
    return std::pair<std::intptr_t, std::intptr_t>(base + low * bytes, base + (high + 1) * bytes);
  };
  if (a.numel() == 0 || b.numel() == 0 || !a.data || !b.data) return false;
  const auto [a_first, a_end] = span(a);
  const auto [b_first, b_end] = span(b);
  return a_first < b_end && b_first < a_end;
}

inline std::string layer_number(double value) {
  std::ostringstream s;
  s << value;
  return s.str();
}

inline std::string layer_shape_string(const std::int64_t* shape, int rank) {
  std::string s = "(";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (rank == 1 ? ",)" : ")");
}

}  // namespace detail

// Keras' BatchNormalization for float or double data and weights (float layers also take
// float16/bfloat16 data through the TensorRef overloads, computing in float32).
//
// Weights are created at build (explicit, or on the first call) in Keras order: gamma (if
// scale), beta (if center), moving_mean, moving_variance and with renorm moving_stddev,
// renorm_mean, renorm_stddev; each holds C values, C = product of the feature-axis sizes in C
// order. Errors are std::invalid_argument (bad arguments) or std::logic_error (wrong call
// order), thrown before anything changes. The layer keeps a view of the last input, not a copy:
// keep it alive and unchanged until backward. Not thread-safe; copies are independent layers.
template <class T>
class BatchNormalization {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "batchnorm::BatchNormalization<T> holds float or double weights");

 public:
  using value_type = T;

  // dgamma / dbeta of the last backward, C values each (empty where the weight is absent).
  struct Gradients {
    std::vector<T> gamma;
    std::vector<T> beta;
  };

  // Validates the options (batchnorm::validate) without building.
  explicit BatchNormalization(LayerOptions options = {}) : options_(std::move(options)) {
    validate(options_);
    kernel_options_.axes.clear();  // resolved at build
  }

  // The options as given (axes unresolved; see axes() after build).
  const LayerOptions& options() const noexcept { return options_; }
  bool built() const noexcept { return built_; }
  bool trainable() const noexcept { return options_.trainable; }
  void set_trainable(bool trainable) noexcept { options_.trainable = trainable; }

  // After build: the input rank, the resolved feature axes (ascending), their sizes, and C.
  int input_rank() const noexcept { return rank_; }
  const std::vector<int>& axes() const noexcept { return kernel_options_.axes; }
  const Shape& feature_shape() const noexcept { return feature_shape_; }
  std::int64_t features() const noexcept { return features_; }

  // Keras' shape of every weight (see batchnorm::WeightSchema).
  Shape weight_shape() const {
    require_built("weight_shape");
    return weight_shape_;
  }

  // Names of the weights in Keras order (get_weights / set_weights order).
  std::vector<std::string> weight_names() const { return batchnorm::weight_names(options_); }

  // Creates the weights for inputs of `input_shape` (sizes of the non-feature axes are not used;
  // the batch size may be unknown, e.g. -1). A built layer ignores further calls, as Keras.
  void build(const Shape& input_shape) {
    if (built_) return;
    const WeightSchema schema = weight_schema(options_, input_shape);
    const std::int64_t features = schema.features;
    const auto n = static_cast<std::size_t>(features);
    // The weights the core names for these options, in its (Keras') order.
    names_ = schema.names;
    values_.clear();
    for (const std::string& name : names_) values_.emplace_back(n, initial_value(name));

    kernel_options_ = static_cast<const Options&>(options_);
    kernel_options_.axes = schema.axes;
    rank_ = static_cast<int>(input_shape.size());
    feature_shape_ = Shape(schema.feature_shape.begin(), schema.feature_shape.end());
    weight_shape_ = Shape(schema.weight_shape.begin(), schema.weight_shape.end());
    features_ = features;
    built_ = true;
  }

  // Forward pass, Keras' `layer(x, training)`, on contiguous C-order data of `shape`; builds on
  // the first call. training && trainable(): normalizes with the batch statistics (per ghost
  // batch, over the mask's true positions), y = ((x - mean) / sqrt(var + eps) * r + d) * a_s +
  // a_b) * gamma + beta, and updates the moving statistics. Otherwise inference:
  // y = (x - moving_mean) * gamma / sqrt(moving_variance + eps) + beta. Statistics accumulate in
  // float64 (Chan merges in a fixed order): results are bitwise identical for every thread
  // count. `y` must not overlap `x`.
  void call(const T* x, T* y, const Shape& shape, bool training = false,
            const TrainingExtras<T>& extras = {}) {
    check_shape(shape);
    const TensorRef x_view = contiguous_view(const_cast<T*>(x), detail::layer_dtype<T>(), shape);
    const TensorRef y_view = contiguous_view(y, detail::layer_dtype<T>(), shape);
    if (!(training && options_.trainable) || !extras.mask) {
      call(x_view, y_view, training, nullptr, extras.adjustment_scale, extras.adjustment_bias);
      return;
    }
    build(shape);
    check_input(x_view);
    TensorRef mask = contiguous_view(const_cast<bool*>(extras.mask), DType::boolean, shape);
    // The mask has no feature axes: it is broadcast along them with stride 0.
    std::int64_t stride = 1;
    for (int i = rank_ - 1; i >= 0; --i) {
      if (is_feature_axis(i)) {
        mask.strides[i] = 0;
      } else {
        mask.strides[i] = stride;
        stride *= shape[static_cast<std::size_t>(i)];
      }
    }
    call(x_view, y_view, training, &mask, extras.adjustment_scale, extras.adjustment_bias);
  }

  // The same on strided views (any strides, element counts). x and y share dtype and shape: the
  // layer's dtype, or float16/bfloat16 for a float layer (computed in float32). `mask` is a
  // boolean view of x's rank and shape with stride 0 on the feature axes (stride 0 elsewhere
  // broadcasts it, e.g. one flag per sample).
  void call(const TensorRef& x, const TensorRef& y, bool training = false,
            const TensorRef* mask = nullptr, const T* adjustment_scale = nullptr,
            const T* adjustment_bias = nullptr) {
    check_data_dtype(x, "input");
    if (!built_) build(checked_shape(x));
    check_input(x);
    check_same_shape(y, x, "the output");
    if (detail::layer_views_overlap(x, y)) {
      fail("the output must not overlap the input (backward reads the input again)");
    }
    if (training && options_.trainable) {
      const bool adjusted = adjustment_scale || adjustment_bias;
      Adjustment adjustment{adjustment_scale, adjustment_bias};
      TrainingContext context;
      train_forward(x, y, mask, kernel_options_, weights(), adjusted ? &adjustment : nullptr, true,
                    context);
      last_ = Last{true, x, mask != nullptr, mask ? *mask : TensorRef{}, std::move(context)};
    } else {
      infer_forward(x, y, kernel_options_, weights());
      last_ = Last{false, x, false, TensorRef{}, TrainingContext{}};
    }
  }

  // Convenience: the forward pass into a new vector. `x` (numel(shape) values) must outlive the
  // backward call, hence no temporaries.
  std::vector<T> operator()(const std::vector<T>& x, const Shape& shape, bool training = false,
                            const TrainingExtras<T>& extras = {}) {
    check_shape(shape);
    check_size(x.size(), shape, "input");
    std::vector<T> y(x.size());
    call(x.data(), y.data(), shape, training, extras);
    return y;
  }
  std::vector<T> operator()(std::vector<T>&&, const Shape&, bool = false,
                            const TrainingExtras<T>& = {}) = delete;

  // Backward of the last call (its input must be unchanged), contiguous dy/dx of its shape.
  // After a training call: dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps) per
  // (ghost batch, feature) with g = dy * gamma * r * a_s, renorm r/d and the adjustment held
  // constant; with a mask only the true positions get the two correction terms.
  // dgamma = sum(dy * z) with z the value multiplied by gamma, dbeta = sum(dy). After an
  // inference call: dx = dy * gamma / sqrt(moving_variance + eps). The sums accumulate in
  // float64 in a fixed order (deterministic); they land in gradients().
  void backward(const T* dy, T* dx) {
    const Last& last = require_last();
    const Shape shape(last.x.shape.begin(), last.x.shape.begin() + last.x.rank);
    backward(contiguous_view(const_cast<T*>(dy), detail::layer_dtype<T>(), shape),
             contiguous_view(dx, detail::layer_dtype<T>(), shape));
  }

  // The same on strided views of the last input's shape and dtype; dx must not overlap it.
  void backward(const TensorRef& dy, const TensorRef& dx) {
    const Last& last = require_last();
    check_same_shape(dy, last.x, "dy");
    check_same_shape(dx, last.x, "dx");
    if (detail::layer_views_overlap(dx, last.x)) {
      fail("dx must not overlap the input of the forward call");
    }
    Gradients gradients;
    gradients.gamma.assign(options_.scale ? static_cast<std::size_t>(features_) : 0, T(0));
    gradients.beta.assign(options_.center ? static_cast<std::size_t>(features_) : 0, T(0));
    T* dgamma = options_.scale ? gradients.gamma.data() : nullptr;
    T* dbeta = options_.center ? gradients.beta.data() : nullptr;
    if (last.training) {
      train_backward(dy, last.x, dx, last.has_mask ? &last.mask : nullptr, kernel_options_,
                     weights(), last.context, dgamma, dbeta);
    } else {
      infer_backward(dy, last.x, dx, kernel_options_, weights(), dgamma, dbeta);
    }
    gradients_ = std::move(gradients);
    has_gradients_ = true;
  }

  // Convenience: dx of the last call as a new vector.
  std::vector<T> backward(const std::vector<T>& dy) {
    const Last& last = require_last();
    check_size(dy.size(), Shape(last.x.shape.begin(), last.x.shape.begin() + last.x.rank), "dy");
    std::vector<T> dx(dy.size());
    backward(dy.data(), dx.data());
    return dx;
  }

  const Gradients& gradients() const noexcept { return gradients_; }

  // One plain SGD step with the last backward's gradients: w <- w - learning_rate * dw for gamma
  // and beta, in float64, rounded once to T. A non-trainable layer is left unchanged (Keras).
  void apply_gradients(double learning_rate) {
    if (!has_gradients_) fail_order("apply_gradients needs a backward call first");
    if (!std::isfinite(learning_rate)) {
      fail("learning_rate must be finite, got " + detail::layer_number(learning_rate));
    }
    if (!options_.trainable) return;
    auto step = [learning_rate](std::vector<T>& weight, const std::vector<T>& gradient) {
      for (std::size_t i = 0; i < weight.size(); ++i) {
        weight[i] = static_cast<T>(static_cast<double>(weight[i]) -
                                   learning_rate * static_cast<double>(gradient[i]));
      }
    };
    if (options_.scale) step(slot("gamma"), gradients_.gamma);
    if (options_.center) step(slot("beta"), gradients_.beta);
  }

  // Copies of the weights in Keras order (see weight_names(); flat, C values each).
  std::vector<std::vector<T>> get_weights() const {
    require_built("get_weights");
    return values_;
  }

  // Sets every weight in Keras order (C values each, any Keras layout flattened in C order).
  // Checks everything before changing anything.
  void set_weights(const std::vector<std::vector<T>>& values) {
    require_built("set_weights");
    const std::vector<std::string> names = weight_names();
    if (values.size() != names.size()) {
      std::string expected;
      for (const std::string& name : names) expected += (expected.empty() ? "" : ", ") + name;
      fail("set_weights expected " + std::to_string(names.size()) + " vectors [" + expected +
           "], got " + std::to_string(values.size()));
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (values[i].size() != static_cast<std::size_t>(features_)) {
        fail("set_weights: weight '" + names[i] + "' expects " + std::to_string(features_) +
             " values, got " + std::to_string(values[i].size()));
      }
    }
    values_ = values;
  }

  // Direct read access to each weight (throws where the layer has no such weight).
  const std::vector<T>& gamma() const { return weight("gamma"); }
  const std::vector<T>& beta() const { return weight("beta"); }
  const std::vector<T>& moving_mean() const { return weight("moving_mean"); }
  const std::vector<T>& moving_variance() const { return weight("moving_variance"); }
  const std::vector<T>& moving_stddev() const { return weight("moving_stddev"); }
  const std::vector<T>& renorm_mean() const { return weight("renorm_mean"); }
  const std::vector<T>& renorm_stddev() const { return weight("renorm_stddev"); }

 private:
  // What backward needs from the last forward call.
  struct Last {
    bool training;
    TensorRef x;
    bool has_mask;
    TensorRef mask;
    TrainingContext context;
  };

  [[noreturn]] static void fail(const std::string& message) {
    throw std::invalid_argument("batchnorm::BatchNormalization: " + message);
  }
  [[noreturn]] static void fail_order(const std::string& message) {
    throw std::logic_error("batchnorm::BatchNormalization: " + message);
  }

  void require_built(const char* what) const {
    if (!built_) fail_order(std::string(what) + " needs a built layer (call build() or the layer)");
  }

  const Last& require_last() const {
    if (!last_) fail_order("backward needs a forward call first");
    return *last_;
  }

  bool is_feature_axis(int axis) const {
    for (int a : kernel_options_.axes) {
      if (a == axis) return true;
    }
    return false;
  }

  static void check_shape(const Shape& shape) {
    if (shape.empty() || shape.size() > static_cast<std::size_t>(kMaxRank)) {
      fail("inputs must have rank 1.." + std::to_string(kMaxRank) + ", got rank " +
           std::to_string(shape.size()));
    }
    for (std::int64_t size : shape) {
      if (size < 0) {
        fail("the input shape " +
             detail::layer_shape_string(shape.data(), static_cast<int>(shape.size())) +
             " has a negative size");
      }
    }
  }

  static Shape checked_shape(const TensorRef& t) {
    if (t.rank < 1 || t.rank > kMaxRank) {
      fail("inputs must have rank 1.." + std::to_string(kMaxRank) + ", got rank " +
           std::to_string(t.rank));
    }
    Shape shape(t.shape.begin(), t.shape.begin() + t.rank);
    check_shape(shape);
    return shape;
  }

  static void check_size(std::size_t size, const Shape& shape, const char* name) {
    std::int64_t numel = 1;
    for (std::int64_t s : shape) numel *= s;
    if (size != static_cast<std::size_t>(numel)) {
      fail(std::string(name) + " holds " + std::to_string(size) + " values but the shape " +
           detail::layer_shape_string(shape.data(), static_cast<int>(shape.size())) + " needs " +
           std::to_string(numel));
    }
  }

  static void check_data_dtype(const TensorRef& t, const char* name) {
    const bool ok =
        t.dtype == detail::layer_dtype<T>() ||
        (std::is_same_v<T, float> && (t.dtype == DType::float16 || t.dtype == DType::bfloat16));
    if (!ok) {
      fail(std::string(name) + " has dtype " + dtype_name(t.dtype) + "; a " +
           dtype_name(detail::layer_dtype<T>()) + " layer takes " +
           (std::is_same_v<T, float> ? "float32, float16 or bfloat16" : "float64") + " data");
    }
  }

  // The input must match the rank and feature sizes the layer was built for.
  void check_input(const TensorRef& x) const {
    checked_shape(x);
    if (x.rank != rank_) {
      fail("expected inputs of rank " + std::to_string(rank_) + ", got shape " +
           detail::layer_shape_string(x.shape.data(), x.rank));
    }
    for (std::size_t i = 0; i < feature_shape_.size(); ++i) {
      const int axis = kernel_options_.axes[i];
      if (x.shape[axis] != feature_shape_[i]) {
        fail("the feature axis " + std::to_string(axis) + " has size " +
             std::to_string(x.shape[axis]) + " but the layer was built for " +
             std::to_string(feature_shape_[i]) + " (input shape " +
             detail::layer_shape_string(x.shape.data(), x.rank) + ")");
      }
    }
  }

  // Before the kernels see them (and before the overlap check reads their strides).
  static void check_same_shape(const TensorRef& t, const TensorRef& x, const char* name) {
    bool same = t.rank == x.rank;
    for (int i = 0; same && i < x.rank; ++i) same = t.shape[i] == x.shape[i];
    if (!same) {
      const int rank = t.rank < 0 ? 0 : (t.rank > kMaxRank ? kMaxRank : t.rank);
      fail(std::string(name) + " has shape " + detail::layer_shape_string(t.shape.data(), rank) +
           (t.rank == rank ? "" : " (rank " + std::to_string(t.rank) + ")") + ", expected " +
           detail::layer_shape_string(x.shape.data(), x.rank));
    }
  }

  // Keras' initial value of a weight: the constant initializers, and for renorm the moving
  // statistics' (the standard deviations from the variance).
  T initial_value(const std::string& name) const {
    if (name == "gamma") return static_cast<T>(options_.gamma_initializer);
    if (name == "beta") return static_cast<T>(options_.beta_initializer);
    if (name == "moving_mean" || name == "renorm_mean") {
      return static_cast<T>(options_.moving_mean_initializer);
    }
    if (name == "moving_variance") return static_cast<T>(options_.moving_variance_initializer);
    return static_cast<T>(std::sqrt(options_.moving_variance_initializer));  // the stddevs
  }

  // The weight called `name`; throws where the layer has none (e.g. gamma with scale=false).
  const std::vector<T>& weight(const std::string& name) const {
    require_built(name.c_str());
    for (std::size_t i = 0; i < names_.size(); ++i) {
      if (names_[i] == name) return values_[i];
    }
    fail_order("this layer has no " + name + " (see weight_names(); center, scale and renorm " +
               "decide which weights exist)");
  }

  std::vector<T>& slot(const std::string& name) {
    return const_cast<std::vector<T>&>(std::as_const(*this).weight(name));
  }

  Weights weights() {
    Weights w;
    for (std::size_t i = 0; i < names_.size(); ++i) {
      *weight_slot(w, names_[i]) = values_[i].empty() ? nullptr : values_[i].data();
    }
    w.dtype = detail::layer_dtype<T>();
    return w;
  }

  LayerOptions options_;
  Options kernel_options_;  // options_ with the resolved, ascending axes (after build)
  bool built_ = false;
  int rank_ = 0;
  Shape feature_shape_;
  Shape weight_shape_;
  std::int64_t features_ = 0;
  std::vector<std::string> names_;      // the weights, in Keras order (weight_names())
  std::vector<std::vector<T>> values_;  // their values, C each, in the same order
  std::optional<Last> last_;
  Gradients gradients_;
  bool has_gradients_ = false;
};

}  // namespace batchnorm
