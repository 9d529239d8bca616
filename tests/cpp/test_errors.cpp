// Bad input raises exceptions naming the problem (never exit() or asserts), and a failed call
// leaves the layer unchanged: the class's options, shapes, call order and state, and the free
// functions' argument checks.
#include <batchnorm/batchnorm.hpp>
#include <limits>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "reference.hpp"

namespace {

using batchnorm::BatchNormalization;
using batchnorm::DType;
using batchnorm::LayerOptions;
using Invalid = std::invalid_argument;
using Order = std::logic_error;

LayerOptions with_axes(std::vector<int> axes) {
  LayerOptions o;
  o.axes = std::move(axes);
  return o;
}

BNTEST_CASE(constructor_rejects_bad_options) {
  LayerOptions o;
  o.epsilon = 0.0;
  BNTEST_THROWS(Invalid, "epsilon must be > 0, got 0", BatchNormalization<float>{o});
  o = {};
  o.momentum = 1.5;
  BNTEST_THROWS(Invalid, "momentum must be in [0, 1], got 1.5", BatchNormalization<float>{o});
  o = {};
  o.momentum = std::numeric_limits<double>::quiet_NaN();
  BNTEST_THROWS(Invalid, "momentum must be in [0, 1]", BatchNormalization<double>{o});
  o = {};
  o.renorm_momentum = -0.1;
  BNTEST_THROWS(Invalid, "renorm_momentum must be in [0, 1]", BatchNormalization<float>{o});
  o = {};
  o.rmin = 2.0;
  o.rmax = 1.0;
  BNTEST_THROWS(Invalid, "rmax (1) must be >= rmin (2)", BatchNormalization<float>{o});
  o = {};
  o.dmax = -1.0;
  BNTEST_THROWS(Invalid, "dmax must be >= 0", BatchNormalization<float>{o});
  o = {};
  o.virtual_batch_size = -2;
  BNTEST_THROWS(Invalid, "virtual_batch_size must be > 0", BatchNormalization<float>{o});
  o = with_axes({0});
  o.virtual_batch_size = 2;
  BNTEST_THROWS(Invalid, "axis 0 cannot be a feature axis", BatchNormalization<float>{o});
  BNTEST_THROWS(Invalid, "axes must not be empty", BatchNormalization<float>{with_axes({})});
}

BNTEST_CASE(build_rejects_bad_shapes) {
  BatchNormalization<float> out_of_range(with_axes({4}));
  BNTEST_THROWS(Invalid, "axis 4 is out of range for an input of rank 4",
                out_of_range.build({2, 3, 4, 5}));
  BNTEST_CHECK(!out_of_range.built());
  BatchNormalization<float> duplicates(with_axes({1, -3}));
  BNTEST_THROWS(Invalid, "duplicates once resolved (axis 1)", duplicates.build({2, 3, 4, 5}));
  BatchNormalization<float> layer;
  BNTEST_THROWS(Invalid, "rank 1..8, got rank 0", layer.build({}));
  BNTEST_THROWS(Invalid, "rank 1..8, got rank 9", layer.build(std::vector<std::int64_t>(9, 1)));
  BNTEST_THROWS(Invalid, "feature axis 1 must be known to build", layer.build({4, -1}));
  BatchNormalization<float> no_features;  // an empty feature axis builds empty weights
  no_features.build({4, 0});
  BNTEST_CHECK(no_features.built() && no_features.features() == 0);
  const std::vector<float> nothing;
  BNTEST_CHECK(no_features(nothing, {4, 0}, true).empty());
  LayerOptions ghost = with_axes({-2});
  ghost.virtual_batch_size = 2;
  BatchNormalization<float> ghost_layer(ghost);
  BNTEST_THROWS(Invalid, "axis 0 cannot be a feature axis", ghost_layer.build({4, 3}));
}

BNTEST_CASE(calls_reject_bad_inputs_and_change_nothing) {
  BatchNormalization<float> layer(with_axes({1}));
  std::vector<float> x(24, 1.0f), y(24);
  layer.build({2, 3, 4});
  const auto before = layer.get_weights();
  BNTEST_THROWS(Invalid, "expected inputs of rank 3, got shape (2, 12)",
                layer.call(x.data(), y.data(), {2, 12}, true));
  BNTEST_THROWS(Invalid, "feature axis 1 has size 4 but the layer was built for 3",
                layer.call(x.data(), y.data(), {2, 4, 3}, true));
  BNTEST_THROWS(Invalid, "negative size", layer.call(x.data(), y.data(), {-2, 3, 4}, true));
  BNTEST_THROWS(Invalid, "input holds 24 values but the shape (2, 3, 5) needs 30",
                layer(x, {2, 3, 5}, true));
  BNTEST_THROWS(Invalid, "must not overlap the input",
                layer.call(x.data(), x.data(), {2, 3, 4}, true));
  BNTEST_THROWS(Invalid, "has no data pointer", layer.call(nullptr, y.data(), {2, 3, 4}, true));
  std::vector<double> wide(24);
  const auto x64 = batchnorm::contiguous_view(wide.data(), DType::float64, {2, 3, 4});
  BNTEST_THROWS(Invalid, "a float32 layer takes float32, float16 or bfloat16 data",
                layer.call(x64, x64, true));
  const auto y32 = batchnorm::contiguous_view(y.data(), DType::float32, {2, 3, 5});
  const auto x32 = batchnorm::contiguous_view(x.data(), DType::float32, {2, 3, 4});
  BNTEST_THROWS(Invalid, "the output has shape (2, 3, 5), expected (2, 3, 4)",
                layer.call(x32, y32, true));
  BNTEST_CHECK(layer.get_weights() == before);
  BNTEST_THROWS(Order, "backward needs a forward call first", layer.backward(x));
}

BNTEST_CASE(ghost_batches_and_adjustment_errors) {
  LayerOptions o = with_axes({-1});
  o.virtual_batch_size = 4;
  BatchNormalization<double> layer(o);
  std::vector<double> x(30, 1.0), scale(3, 1.0);
  BNTEST_THROWS(Invalid, "batch size 10 is not a multiple of virtual_batch_size 4",
                layer(x, {10, 3}, true));
  batchnorm::TrainingExtras<double> extras;
  extras.adjustment_scale = scale.data();
  BNTEST_THROWS(Invalid, "adjustment cannot be combined with virtual_batch_size",
                layer(x, {10, 3}, true, extras));
}

BNTEST_CASE(backward_and_gradients_errors) {
  BatchNormalization<float> layer;
  BNTEST_THROWS(Order, "apply_gradients needs a backward call first", layer.apply_gradients(0.1));
  std::vector<float> x = bntest::normal<float>(12, 0.0, 1.0, 1), dy(12, 1.0f), small(6);
  layer(x, {4, 3}, true);
  BNTEST_THROWS(Invalid, "dy holds 6 values but the shape (4, 3) needs 12", layer.backward(small));
  BNTEST_THROWS(Invalid, "dx must not overlap the input",
                layer.backward(dy.data(), const_cast<float*>(x.data())));
  layer.backward(dy);
  BNTEST_THROWS(Invalid, "learning_rate must be finite",
                layer.apply_gradients(std::numeric_limits<double>::infinity()));
}

BNTEST_CASE(state_errors_leave_weights_unchanged) {
  LayerOptions o;
  o.scale = false;
  BatchNormalization<float> layer(o);
  BNTEST_THROWS(Order, "set_weights needs a built layer", layer.set_weights({}));
  BNTEST_THROWS(Order, "get_weights needs a built layer", layer.get_weights());
  BNTEST_THROWS(Order, "weight_shape needs a built layer", layer.weight_shape());
  layer.build({-1, 2});
  const auto before = layer.get_weights();
  BNTEST_THROWS(Invalid, "expected 3 vectors [beta, moving_mean, moving_variance], got 2",
                layer.set_weights({{1, 2}, {3, 4}}));
  BNTEST_THROWS(Invalid, "weight 'moving_variance' expects 2 values, got 3",
                layer.set_weights({{0, 0}, {5, 5}, {1, 2, 3}}));
  BNTEST_CHECK(layer.get_weights() == before);
  BNTEST_THROWS(Order, "this layer has no gamma (see weight_names()", layer.gamma());
  BNTEST_THROWS(Order, "this layer has no moving_stddev (see weight_names()",
                layer.moving_stddev());
}

BNTEST_CASE(free_functions_check_their_arguments) {
  std::vector<float> x(12, 1.0f), y(12), y_short(8), mean(3, 0.0f), variance(3, 1.0f);
  std::vector<double> wide(3);
  const auto xv = batchnorm::contiguous_view(x.data(), DType::float32, {4, 3});
  const auto yv = batchnorm::contiguous_view(y.data(), DType::float32, {4, 3});
  batchnorm::Options options;
  batchnorm::Weights w;
  w.moving_mean = mean.data();
  w.moving_variance = variance.data();
  batchnorm::TrainingContext context;

  BNTEST_THROWS(Invalid, "batchnorm.train_forward: output has shape (4, 2), expected (4, 3)",
                batchnorm::train_forward(
                    xv, batchnorm::contiguous_view(y_short.data(), DType::float32, {4, 2}), nullptr,
                    options, w, nullptr, true, context));
  batchnorm::Weights doubles = w;
  doubles.dtype = DType::float64;
  doubles.moving_mean = wide.data();
  BNTEST_THROWS(Invalid, "weights have dtype float64 but float32 data needs float32",
                batchnorm::infer_forward(xv, yv, options, doubles));
  batchnorm::Weights missing;
  BNTEST_THROWS(Invalid, "moving_mean and moving_variance are required",
                batchnorm::infer_forward(xv, yv, options, missing));
  const auto mask = batchnorm::contiguous_view(x.data(), DType::float32, {4, 3});
  BNTEST_THROWS(Invalid, "mask must be boolean",
                batchnorm::train_forward(xv, yv, &mask, options, w, nullptr, true, context));
  batchnorm::Options bad_axis;
  bad_axis.axes = {2};
  BNTEST_THROWS(Invalid, "axis 2 is out of range for an input of rank 2",
                batchnorm::infer_forward(xv, yv, bad_axis, w));
  BNTEST_THROWS(
      Invalid, "rank 9 exceeds the supported maximum of 8",
      batchnorm::contiguous_view(x.data(), DType::float32, std::vector<std::int64_t>(9, 1)));
  batchnorm::train_forward(xv, yv, nullptr, options, w, nullptr, true, context);
  const auto other = batchnorm::contiguous_view(x.data(), DType::float32, {2, 6});
  BNTEST_THROWS(Invalid, "training context does not belong to an input of this shape",
                batchnorm::train_backward(other, other, other, nullptr, options, w, context,
                                          nullptr, nullptr));
  // The mask must be the forward call's: its presence is checked against the context.
  bool flags[4] = {true, false, true, true};
  batchnorm::TensorRef per_row = batchnorm::contiguous_view(flags, DType::boolean, {4, 1});
  per_row.shape[1] = 3;
  per_row.strides[1] = 0;
  std::vector<float> dx(12);
  const auto dxv = batchnorm::contiguous_view(dx.data(), DType::float32, {4, 3});
  BNTEST_THROWS(
      Invalid, "the forward call had no mask",
      batchnorm::train_backward(xv, xv, dxv, &per_row, options, w, context, nullptr, nullptr));
  batchnorm::train_forward(xv, yv, &per_row, options, w, nullptr, true, context);
  BNTEST_THROWS(
      Invalid, "the forward call had a mask",
      batchnorm::train_backward(xv, xv, dxv, nullptr, options, w, context, nullptr, nullptr));
  batchnorm::train_backward(xv, xv, dxv, &per_row, options, w, context, nullptr, nullptr);
}

// A context that did not come from train_forward holds no statistics: refused, never read past
// its (empty) vectors. statistics_to_host leaves a CPU context as it is.
BNTEST_CASE(backward_refuses_a_context_without_statistics) {
  std::vector<float> x(12, 1.0f), dx(12), mean(3, 0.0f), variance(3, 1.0f);
  const auto xv = batchnorm::contiguous_view(x.data(), DType::float32, {4, 3});
  const auto dxv = batchnorm::contiguous_view(dx.data(), DType::float32, {4, 3});
  batchnorm::Weights w;
  w.moving_mean = mean.data();
  w.moving_variance = variance.data();
  batchnorm::TrainingContext made_by_hand;
  made_by_hand.groups = 1;
  made_by_hand.features = 3;
  BNTEST_THROWS(
      Invalid, "the training context holds no statistics",
      batchnorm::train_backward(xv, xv, dxv, nullptr, {}, w, made_by_hand, nullptr, nullptr));
  batchnorm::TrainingContext context;
  batchnorm::train_forward(xv, dxv, nullptr, {}, w, nullptr, false, context);
  const std::vector<double> count = context.count;
  batchnorm::statistics_to_host(context);
  BNTEST_CHECK(!context.device && context.count == count);
}

// A T* that is not aligned for T is undefined behaviour to read: such views are refused with a
// message, before any kernel runs.
BNTEST_CASE(misaligned_data_is_refused) {
  alignas(8) unsigned char bytes[4 * 12 + 1] = {};
  std::vector<float> y(12), mean(3, 0.0f), variance(3, 1.0f);
  batchnorm::Weights w;
  w.moving_mean = mean.data();
  w.moving_variance = variance.data();
  batchnorm::Options options;
  batchnorm::TrainingContext context;
  const auto shifted = batchnorm::contiguous_view(bytes + 1, DType::float32, {4, 3});
  const auto yv = batchnorm::contiguous_view(y.data(), DType::float32, {4, 3});
  BNTEST_THROWS(Invalid, "input is not aligned to its 4-byte elements",
                batchnorm::train_forward(shifted, yv, nullptr, options, w, nullptr, true, context));
  BNTEST_THROWS(Invalid, "output is not aligned to its 4-byte elements",
                batchnorm::infer_forward(yv, shifted, options, w));
  batchnorm::Weights shifted_weights = w;
  shifted_weights.moving_mean = bytes + 1;
  BNTEST_THROWS(Invalid, "a weight vector is not aligned",
                batchnorm::infer_forward(yv, yv, options, shifted_weights));
  BNTEST_CHECK(mean == std::vector<float>(3, 0.0f));
}

// An empty mask may carry a null data pointer (an empty framework tensor); the forward call still
// had a mask, and its backward takes the same one.
BNTEST_CASE(empty_mask_without_data_pairs_forward_and_backward) {
  std::vector<float> mean(3, 0.0f), variance(3, 1.0f);
  batchnorm::Weights w;
  w.moving_mean = mean.data();
  w.moving_variance = variance.data();
  batchnorm::Options options;
  batchnorm::TrainingContext context;
  const auto empty = batchnorm::contiguous_view(nullptr, DType::float32, {0, 3});
  const auto mask = batchnorm::contiguous_view(nullptr, DType::boolean, {0, 3});
  batchnorm::train_forward(empty, empty, &mask, options, w, nullptr, true, context);
  BNTEST_CHECK(context.has_mask);
  batchnorm::train_backward(empty, empty, empty, &mask, options, w, context, nullptr, nullptr);
  BNTEST_THROWS(Invalid, "the forward call had a mask",
                batchnorm::train_backward(empty, empty, empty, nullptr, options, w, context,
                                          nullptr, nullptr));
}

}  // namespace

int main() { return bntest::run_all(); }
