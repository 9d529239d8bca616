// Tests of the stateful class batchnorm::BatchNormalization<T> (float and double) against the
// float64 reference: row (NHWC, (N, C)) and plane (NCHW) layouts, several feature axes, masks,
// ghost batches, renorm with clipping, adjustment, inference, backward (formulas and finite
// differences), state get/set, 16-bit data and thread-count determinism.
#include <algorithm>
#include <batchnorm/batchnorm.hpp>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "float16.hpp"
#include "reference.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using batchnorm::BatchNormalization;
using batchnorm::LayerOptions;
using bntest::convert;
using bntest::numel;
using bntest::Shape;

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-11;
}

double max_abs(const std::vector<double>& values) {
  double m = 0.0;
  for (double v : values) m = std::max(m, std::fabs(v));
  return m;
}

// Closeness relative to the expected vector's scale, so near-zero entries are not over-judged.
template <class A>
bool close(const std::vector<A>& actual, const std::vector<double>& expected, double tol,
           const std::string& what) {
  return bntest::close_all(actual, expected, tol * std::max(1.0, max_abs(expected)), tol, __FILE__,
                           __LINE__, what);
}

struct Scenario {
  const char* name;
  Shape shape;
  std::vector<int> axes;
  std::int64_t virtual_batch_size = 0;
  double mask_share = -1.0;  // < 0: no mask
  bool renorm = false;
  bool adjustment = false;
  bool center = true;
  bool scale = true;
};

std::vector<int> resolve(const std::vector<int>& axes, std::size_t rank) {
  std::vector<int> resolved;
  for (int a : axes) resolved.push_back(a < 0 ? a + static_cast<int>(rank) : a);
  return resolved;
}

std::int64_t mask_size(const Shape& shape, const std::vector<int>& resolved) {
  std::int64_t n = 1;
  for (std::size_t a = 0; a < shape.size(); ++a) {
    if (std::find(resolved.begin(), resolved.end(), static_cast<int>(a)) == resolved.end()) {
      n *= shape[a];
    }
  }
  return n;
}

LayerOptions options_of(const Scenario& s) {
  LayerOptions o;
  o.axes = s.axes;
  o.momentum = 0.8;
  o.epsilon = 1e-3;
  o.virtual_batch_size = s.virtual_batch_size;
  o.center = s.center;
  o.scale = s.scale;
  o.renorm = s.renorm;
  if (s.renorm) {
    o.renorm_momentum = 0.7;
    o.rmin = 0.8;
    o.rmax = 1.2;
    o.dmax = 0.3;
  }
  return o;
}

bntest::RefConfig reference_config(const Scenario& s) {
  const LayerOptions o = options_of(s);
  bntest::RefConfig c;
  c.shape = s.shape;
  c.axes = resolve(s.axes, s.shape.size());
  c.momentum = o.momentum;
  c.epsilon = o.epsilon;
  c.renorm = o.renorm;
  c.renorm_momentum = o.renorm_momentum;
  c.rmin = o.rmin;
  c.rmax = o.rmax;
  c.dmax = o.dmax;
  c.virtual_batch_size = o.virtual_batch_size;
  return c;
}

std::vector<double>* reference_slot(bntest::RefWeights& w, const std::string& name) {
  if (name == "gamma") return &w.gamma;
  if (name == "beta") return &w.beta;
  if (name == "moving_mean") return &w.moving_mean;
  if (name == "moving_variance") return &w.moving_variance;
  if (name == "moving_stddev") return &w.moving_stddev;
  if (name == "renorm_mean") return &w.renorm_mean;
  return &w.renorm_stddev;
}

// Random weights (positive where they must be) set on the layer; the reference gets the same
// T-rounded values.
template <class T>
bntest::RefWeights randomize_weights(BatchNormalization<T>& layer, unsigned seed) {
  const auto c = static_cast<std::size_t>(layer.features());
  std::vector<std::vector<T>> values;
  bntest::RefWeights reference;
  for (const std::string& name : layer.weight_names()) {
    std::vector<T> v;
    if (name == "gamma") {
      v = bntest::normal<T>(c, 1.0, 0.3, seed++);
    } else if (name == "moving_variance" || name.find("stddev") != std::string::npos) {
      v = bntest::normal<T>(c, 0.0, 1.0, seed++);
      for (T& e : v) e = static_cast<T>(std::fabs(e) + 0.5);
    } else {
      v = bntest::normal<T>(c, 0.0, 0.5, seed++);
    }
    values.push_back(v);
    *reference_slot(reference, name) = convert<double>(v);
  }
  layer.set_weights(values);
  return reference;
}

template <class T>
void check_weights(const BatchNormalization<T>& layer, bntest::RefWeights& reference,
                   const std::string& what) {
  const std::vector<std::string> names = layer.weight_names();
  const std::vector<std::vector<T>> weights = layer.get_weights();
  for (std::size_t i = 0; i < names.size(); ++i) {
    close(weights[i], *reference_slot(reference, names[i]), tolerance<T>(), what + " " + names[i]);
  }
}

// Two training steps (forward, moving statistics, backward), then inference and its backward,
// all against the reference.
template <class T>
void run_scenario(const Scenario& s) {
  const std::string label = std::string(s.name) + (std::is_same_v<T, float> ? " f32" : " f64");
  BatchNormalization<T> layer(options_of(s));
  layer.build(s.shape);
  bntest::Reference reference(reference_config(s));
  bntest::RefWeights weights = randomize_weights(layer, 11);
  const auto n = static_cast<std::size_t>(numel(s.shape));
  const auto c = static_cast<std::size_t>(layer.features());
  const auto masked = static_cast<std::size_t>(mask_size(s.shape, resolve(s.axes, s.shape.size())));

  for (unsigned step = 0; step < 2; ++step) {
    const std::vector<T> x = bntest::normal<T>(n, 3.0, 2.0, 100 + step);
    const std::vector<T> dy = bntest::normal<T>(n, 0.0, 1.0, 200 + step);
    const auto mask = bntest::random_mask(masked, s.mask_share, 300 + step);
    const std::vector<T> adjust_scale = bntest::normal<T>(c, 1.0, 0.2, 400 + step);
    const std::vector<T> adjust_bias = bntest::normal<T>(c, 0.0, 0.3, 500 + step);
    batchnorm::TrainingExtras<T> extras;
    if (s.mask_share >= 0) extras.mask = mask.get();
    if (s.adjustment) {
      extras.adjustment_scale = adjust_scale.data();
      extras.adjustment_bias = adjust_bias.data();
    }
    const std::string at = label + " step " + std::to_string(step);

    const std::vector<T> y = layer(x, s.shape, true, extras);
    const std::vector<double> y_ref =
        reference.train(convert<double>(x), weights, extras.mask,
                        s.adjustment ? convert<double>(adjust_scale) : std::vector<double>{},
                        s.adjustment ? convert<double>(adjust_bias) : std::vector<double>{});
    close(y, y_ref, tolerance<T>(), at + " y");
    check_weights(layer, weights, at);

    const std::vector<T> dx = layer.backward(dy);
    const bntest::RefGradients g = reference.train_backward(convert<double>(dy));
    close(dx, g.dx, tolerance<T>(), at + " dx");
    if (s.scale) close(layer.gradients().gamma, g.dgamma, tolerance<T>(), at + " dgamma");
    if (s.center) close(layer.gradients().beta, g.dbeta, tolerance<T>(), at + " dbeta");
    BNTEST_CHECK(layer.gradients().gamma.size() == (s.scale ? c : 0));
    BNTEST_CHECK(layer.gradients().beta.size() == (s.center ? c : 0));
  }

  const std::vector<T> x = bntest::normal<T>(n, 3.0, 2.0, 600);
  const std::vector<T> dy = bntest::normal<T>(n, 0.0, 1.0, 700);
  const std::vector<T> y = layer(x, s.shape);
  close(y, reference.infer(convert<double>(x), weights), tolerance<T>(), label + " inference y");
  check_weights(layer, weights, label + " after inference");
  const std::vector<T> dx = layer.backward(dy);
  const bntest::RefGradients g =
      reference.infer_backward(convert<double>(dy), convert<double>(x), weights);
  close(dx, g.dx, tolerance<T>(), label + " inference dx");
  if (s.scale)
    close(layer.gradients().gamma, g.dgamma, tolerance<T>(), label + " inference dgamma");
  if (s.center) close(layer.gradients().beta, g.dbeta, tolerance<T>(), label + " inference dbeta");
}

const std::vector<Scenario>& scenarios() {
  static const std::vector<Scenario> all = {
      {"row (N, C)", {37, 5}, {-1}},
      {"row NHWC", {4, 3, 5, 6}, {-1}},
      {"plane NCHW", {4, 6, 3, 5}, {1}},
      {"plane (B, C, T) axis -2", {3, 7, 11}, {-2}},
      {"axes {1, 3}", {3, 4, 2, 5}, {1, 3}},
      {"NHWC mask", {4, 3, 5, 6}, {-1}, 0, 0.6},
      {"NCHW mask", {4, 6, 3, 5}, {1}, 0, 0.5},
      {"all positions masked", {8, 3}, {-1}, 0, 0.0},
      {"rows of 24 masked, in groups", {5, 3, 3, 24}, {-1}, 0, 0.6},
      {"rows of 9 masked, a group and rows left", {3, 7, 9}, {-1}, 0, 0.7},
      {"all rows of 24 masked", {8, 24}, {-1}, 0, 0.0},
      {"rows of 3 masked, dx blocks across rows", {2, 37, 3}, {-1}, 0, 0.7},
      {"wide rows, normalized a tile at a time", {11, 1100}, {-1}},
      // Two or more threads split these rows' features (statistics and sums in cache).
      {"wide rows, features split among threads", {40, 1000}, {-1}},
      {"wide rows, features split among threads, masked", {40, 1000}, {-1}, 0, 0.6},
      {"rows of 16 masked, a block a row", {5, 16}, {-1}, 0, 0.5},
      {"NHWC ghost batches", {6, 2, 3, 4}, {-1}, 2},
      {"NCHW ghost batches + mask", {8, 3, 2, 5}, {1}, 4, 0.5},
      {"row renorm clipped", {40, 4}, {-1}, 0, -1.0, true},
      {"NCHW renorm + ghost", {6, 3, 4, 2}, {1}, 3, -1.0, true},
      {"NHWC renorm + mask", {4, 3, 5, 6}, {-1}, 0, 0.7, true},
      {"NCHW adjustment", {4, 6, 3, 5}, {1}, 0, -1.0, false, true},
      {"row renorm + adjustment", {40, 4}, {-1}, 0, -1.0, true, true},
      {"NHWC no center", {4, 3, 5, 6}, {-1}, 0, -1.0, false, false, false, true},
      {"NCHW no scale", {4, 6, 3, 5}, {1}, 0, -1.0, false, false, true, false},
      {"row no center, no scale", {9, 5}, {-1}, 0, -1.0, false, false, false, false},
  };
  return all;
}

BNTEST_CASE(scenarios_float) {
  for (const Scenario& s : scenarios()) run_scenario<float>(s);
}

BNTEST_CASE(scenarios_double) {
  for (const Scenario& s : scenarios()) run_scenario<double>(s);
}

// dx, dgamma and dbeta of a training call against central differences of sum(w * y), in float64.
// Renorm is left out: its r and d are constants for the gradient (as Keras), so the true
// derivative differs by design.
BNTEST_CASE(backward_matches_finite_differences) {
  const Scenario cases[] = {
      {"row", {7, 3}, {-1}},
      {"NCHW ghost + mask", {4, 3, 2, 2}, {1}, 2, 0.6},
      {"NHWC adjustment", {3, 2, 2, 3}, {-1}, 0, -1.0, false, true},
  };
  for (const Scenario& s : cases) {
    BatchNormalization<double> base(options_of(s));
    base.build(s.shape);
    randomize_weights(base, 21);
    const auto n = static_cast<std::size_t>(numel(s.shape));
    const auto c = static_cast<std::size_t>(base.features());
    const std::vector<double> x = bntest::normal<double>(n, 3.0, 2.0, 31);
    const std::vector<double> w = bntest::normal<double>(n, 0.0, 1.0, 32);
    const auto mask = bntest::random_mask(
        static_cast<std::size_t>(mask_size(s.shape, resolve(s.axes, s.shape.size()))), s.mask_share,
        33);
    const std::vector<double> adjust_scale = bntest::normal<double>(c, 1.0, 0.2, 34);
    const std::vector<double> adjust_bias = bntest::normal<double>(c, 0.0, 0.3, 35);
    batchnorm::TrainingExtras<double> extras;
    if (s.mask_share >= 0) extras.mask = mask.get();
    if (s.adjustment) {
      extras.adjustment_scale = adjust_scale.data();
      extras.adjustment_bias = adjust_bias.data();
    }
    auto loss = [&](const std::vector<double>& input,
                    const std::vector<std::vector<double>>& weights) {
      BatchNormalization<double> layer = base;
      layer.set_weights(weights);
      const std::vector<double> y = layer(input, s.shape, true, extras);
      double sum = 0.0;
      for (std::size_t i = 0; i < n; ++i) sum += w[i] * y[i];
      return sum;
    };
    BatchNormalization<double> layer = base;
    layer(x, s.shape, true, extras);
    const std::vector<double> dx = layer.backward(w);

    const double h = 1e-5;
    const std::vector<std::vector<double>> weights = base.get_weights();
    std::vector<double> dx_fd(n);
    for (std::size_t i = 0; i < n; ++i) {
      std::vector<double> plus = x, minus = x;
      plus[i] += h;
      minus[i] -= h;
      dx_fd[i] = (loss(plus, weights) - loss(minus, weights)) / (2 * h);
    }
    BNTEST_CLOSE(dx, dx_fd, 1e-6, 1e-6, std::string(s.name) + " dx");
    const std::vector<double>* analytic[] = {&layer.gradients().gamma, &layer.gradients().beta};
    for (std::size_t k = 0; k < 2; ++k) {  // gamma, beta come first in Keras order
      std::vector<double> fd(c);
      for (std::size_t j = 0; j < c; ++j) {
        std::vector<std::vector<double>> plus = weights, minus = weights;
        plus[k][j] += h;
        minus[k][j] -= h;
        fd[j] = (loss(x, plus) - loss(x, minus)) / (2 * h);
      }
      BNTEST_CLOSE(*analytic[k], fd, 1e-6, 1e-6,
                   std::string(s.name) + (k == 0 ? " dgamma" : " dbeta"));
    }
  }
}

BNTEST_CASE(build_shapes_names_and_initial_values) {
  LayerOptions o;
  o.axes = {1, 3};
  o.renorm = true;
  o.moving_mean_initializer = 0.5;
  o.moving_variance_initializer = 4.0;
  o.gamma_initializer = 2.0;
  o.beta_initializer = -1.0;
  BatchNormalization<double> layer(o);
  BNTEST_CHECK(!layer.built());
  BNTEST_CHECK(layer.axes().empty());
  layer.build({-1, 4, 5, 6});  // the batch size may be unknown
  BNTEST_CHECK(layer.built());
  BNTEST_CHECK((layer.axes() == std::vector<int>{1, 3}));
  BNTEST_CHECK((layer.feature_shape() == Shape{4, 6}));
  BNTEST_CHECK(layer.features() == 24);
  BNTEST_CHECK(layer.input_rank() == 4);
  BNTEST_CHECK((layer.weight_shape() == Shape{1, 4, 1, 6}));
  BNTEST_CHECK((layer.weight_names() == std::vector<std::string>{"gamma", "beta", "moving_mean",
                                                                 "moving_variance", "moving_stddev",
                                                                 "renorm_mean", "renorm_stddev"}));
  BNTEST_CHECK(layer.gamma() == std::vector<double>(24, 2.0));
  BNTEST_CHECK(layer.beta() == std::vector<double>(24, -1.0));
  BNTEST_CHECK(layer.moving_mean() == std::vector<double>(24, 0.5));
  BNTEST_CHECK(layer.moving_variance() == std::vector<double>(24, 4.0));
  BNTEST_CHECK(layer.moving_stddev() == std::vector<double>(24, 2.0));
  BNTEST_CHECK(layer.renorm_mean() == std::vector<double>(24, 0.5));
  BNTEST_CHECK(layer.renorm_stddev() == std::vector<double>(24, 2.0));
  layer.build({2, 9, 9, 9});  // already built: ignored, as Keras
  BNTEST_CHECK(layer.features() == 24);

  LayerOptions plain;
  plain.axes = {-3};
  plain.center = false;
  BatchNormalization<float> nchw(plain);
  nchw.build({8, 16, 4, 4});
  BNTEST_CHECK((nchw.axes() == std::vector<int>{1}));
  BNTEST_CHECK((nchw.weight_shape() == Shape{16}));
  BNTEST_CHECK(
      (nchw.weight_names() == std::vector<std::string>{"gamma", "moving_mean", "moving_variance"}));
}

BNTEST_CASE(first_call_builds_and_get_set_round_trip) {
  BatchNormalization<float> layer;  // axis -1, Keras defaults
  const Shape shape{5, 3};
  const std::vector<float> x = bntest::normal<float>(15, 1.0, 1.0, 1);
  const std::vector<float> y = layer(x, shape);  // inference with fresh weights: x / sqrt(1 + eps)
  BNTEST_CHECK(layer.built() && layer.features() == 3);
  std::vector<double> expected(15);
  for (std::size_t i = 0; i < 15; ++i) expected[i] = x[i] / std::sqrt(1.0 + 1e-3);
  close(y, expected, 1e-6, "fresh inference");

  const std::vector<std::vector<float>> values = {
      {1.5f, 2.f, 0.5f}, {0.f, -1.f, 1.f}, {3.f, 2.f, 1.f}, {4.f, 1.f, 0.25f}};
  layer.set_weights(values);
  BNTEST_CHECK(layer.get_weights() == values);
  BNTEST_CHECK(layer.moving_variance() == values[3]);
}

BNTEST_CASE(not_trainable_runs_inference_and_keeps_state) {
  LayerOptions o;
  o.axes = {1};
  o.trainable = false;
  BatchNormalization<double> layer(o);
  const Shape shape{4, 3, 2};
  const std::vector<double> x = bntest::normal<double>(24, 3.0, 2.0, 5);
  layer.build(shape);
  const auto before = layer.get_weights();
  const std::vector<double> y = layer(x, shape, true);
  BNTEST_CHECK(layer.get_weights() == before);
  BatchNormalization<double> inference(o);
  inference.build(shape);
  BNTEST_CHECK(y == inference(x, shape, false));

  // Switching trainable on makes the next training call update the moving statistics.
  layer.set_trainable(true);
  layer(x, shape, true);
  BNTEST_CHECK(layer.get_weights() != before);
}

BNTEST_CASE(apply_gradients_is_plain_sgd) {
  LayerOptions o;
  o.axes = {-1};
  BatchNormalization<double> layer(o);
  const Shape shape{6, 4};
  const std::vector<double> x = bntest::normal<double>(24, 3.0, 2.0, 7);
  const std::vector<double> dy = bntest::normal<double>(24, 0.0, 1.0, 8);
  layer(x, shape, true);
  layer.backward(dy);
  const std::vector<double> gamma = layer.gamma(), beta = layer.beta();
  layer.apply_gradients(0.1);
  for (std::size_t c = 0; c < 4; ++c) {
    BNTEST_CHECK(layer.gamma()[c] == gamma[c] - 0.1 * layer.gradients().gamma[c]);
    BNTEST_CHECK(layer.beta()[c] == beta[c] - 0.1 * layer.gradients().beta[c]);
  }
  layer.set_trainable(false);
  const std::vector<double> frozen = layer.gamma();
  layer.apply_gradients(0.1);
  BNTEST_CHECK(layer.gamma() == frozen);
}

BNTEST_CASE(zero_size_batch_leaves_moving_statistics) {
  BatchNormalization<float> layer;
  layer.build({-1, 4});
  const auto before = layer.get_weights();
  const std::vector<float> empty;
  const std::vector<float> y = layer(empty, {0, 4}, true);
  BNTEST_CHECK(y.empty());
  BNTEST_CHECK(layer.get_weights() == before);
  BNTEST_CHECK(layer.backward(empty).empty());
}

// Accuracy contract: float32 data whose mean is 1e6 times its spread keeps its variance to 1e-5
// relative (the one-pass E[x^2] - E[x]^2 loses every digit here).
BNTEST_CASE(large_mean_variance_is_exact) {
  LayerOptions o;
  o.momentum = 0.0;  // the moving variance becomes the batch variance
  BatchNormalization<float> layer(o);
  const Shape shape{4096, 2};
  std::vector<float> x = bntest::normal<float>(8192, 0.0, 1.0, 9);
  for (float& v : x) v += 1.0e6f;
  layer(x, shape, true);
  bntest::RefConfig config;
  config.shape = shape;
  config.axes = {1};
  config.momentum = 0.0;
  bntest::Reference reference(config);
  bntest::RefWeights w{{1, 1}, {0, 0}, {0, 0}, {1, 1}, {}, {}, {}};
  reference.train(convert<double>(x), w, nullptr);
  BNTEST_CLOSE(layer.moving_variance(), w.moving_variance, 0.0, 1e-5, "variance at mean 1e6");
  BNTEST_CLOSE(layer.moving_mean(), w.moving_mean, 0.0, 1e-7, "mean at 1e6");
}

// The TensorRef overloads: a transposed (non-contiguous) view gives the contiguous result.
BNTEST_CASE(strided_views_match_contiguous) {
  const std::int64_t N = 3, C = 4, H = 5, W = 2;
  const std::vector<float> nchw = bntest::normal<float>(N * C * H * W, 3.0, 2.0, 41);
  std::vector<float> nhwc(nchw.size());
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t w = 0; w < W; ++w)
          nhwc[((n * H + h) * W + w) * C + c] = nchw[((n * C + c) * H + h) * W + w];
  // NCHW memory seen as an NHWC-shaped view.
  batchnorm::TensorRef view;
  view.data = const_cast<float*>(nchw.data());
  view.dtype = batchnorm::DType::float32;
  view.rank = 4;
  view.shape = {N, H, W, C};
  view.strides = {C * H * W, W, 1, H * W};
  std::vector<float> y_view(nhwc.size()), dx_view(nhwc.size());
  const auto y_ref =
      batchnorm::contiguous_view(y_view.data(), batchnorm::DType::float32, {N, H, W, C});
  const auto dx_ref =
      batchnorm::contiguous_view(dx_view.data(), batchnorm::DType::float32, {N, H, W, C});
  const std::vector<float> dy = bntest::normal<float>(nhwc.size(), 0.0, 1.0, 42);
  const auto dy_ref = batchnorm::contiguous_view(const_cast<float*>(dy.data()),
                                                 batchnorm::DType::float32, {N, H, W, C});

  BatchNormalization<float> strided, contiguous;
  strided.call(view, y_ref, true);
  strided.backward(dy_ref, dx_ref);
  const std::vector<float> y = contiguous(nhwc, {N, H, W, C}, true);
  const std::vector<float> dx = contiguous.backward(dy);
  BNTEST_CLOSE(y_view, y, 1e-5, 1e-5, "strided y");
  BNTEST_CLOSE(dx_view, dx, 1e-5, 1e-5, "strided dx");
  BNTEST_CLOSE(strided.moving_variance(), contiguous.moving_variance(), 0.0, 1e-6, "strided mv");
}

// A float layer takes float16 data through TensorRef, computing in float32.
BNTEST_CASE(float16_data_in_a_float_layer) {
  const Shape shape{16, 3, 4};
  const auto n = static_cast<std::size_t>(numel(shape));
  const std::vector<float> source = bntest::normal<float>(n, 3.0, 2.0, 51);
  std::vector<std::uint16_t> x(n), y(n);
  std::vector<double> rounded(n);
  for (std::size_t i = 0; i < n; ++i) {
    x[i] = bntest::float16_bits(source[i]);
    rounded[i] = bntest::float16_value(x[i]);
  }
  LayerOptions o;
  o.axes = {1};
  BatchNormalization<float> layer(o);
  layer.call(batchnorm::contiguous_view(x.data(), batchnorm::DType::float16, shape),
             batchnorm::contiguous_view(y.data(), batchnorm::DType::float16, shape), true);
  bntest::RefConfig config;
  config.shape = shape;
  config.axes = {1};
  bntest::Reference reference(config);
  bntest::RefWeights w{{1, 1, 1}, {0, 0, 0}, {0, 0, 0}, {1, 1, 1}, {}, {}, {}};
  const std::vector<double> expected = reference.train(rounded, w, nullptr);
  std::vector<float> actual(n);
  for (std::size_t i = 0; i < n; ++i) actual[i] = bntest::float16_value(y[i]);
  BNTEST_CLOSE(actual, expected, 2e-3, 1e-3, "float16 y");
  close(layer.moving_mean(), w.moving_mean, 1e-6, "float16 moving_mean (float32 weights)");
}

#ifdef _OPENMP
// Fixed-size blocks merged in a fixed order: bitwise the same results for any thread count. The
// plane layout takes the fused plane passes; the rows, wide enough for 3 threads to split their
// features, take the column split of the statistics and sums (1 thread: the row split).
BNTEST_CASE(bitwise_identical_across_thread_counts) {
  struct Layout {
    Shape shape;
    int axis;
  };
  for (const Layout& layout : {Layout{{16, 8, 64, 64}, 1}, Layout{{128, 1000}, 1}}) {
    LayerOptions o;
    o.axes = {layout.axis};
    const auto n = static_cast<std::size_t>(numel(layout.shape));
    const std::vector<float> x = bntest::normal<float>(n, 3.0, 2.0, 61);
    const std::vector<float> dy = bntest::normal<float>(n, 0.0, 1.0, 62);
    auto run = [&](int threads) {
      omp_set_num_threads(threads);
      BatchNormalization<float> layer(o);
      std::vector<float> y = layer(x, layout.shape, true);
      std::vector<float> dx = layer.backward(dy);
      return std::make_tuple(y, dx, layer.get_weights(), layer.gradients().gamma);
    };
    const auto one = run(1);
    const auto three = run(3);
    BNTEST_CHECK(std::get<0>(one) == std::get<0>(three));
    BNTEST_CHECK(std::get<1>(one) == std::get<1>(three));
    BNTEST_CHECK(std::get<2>(one) == std::get<2>(three));
    BNTEST_CHECK(std::get<3>(one) == std::get<3>(three));
  }
}
#endif

}  // namespace

int main() { return bntest::run_all(); }
