// Tests of the free functions over raw pointers (train_forward, infer_forward, train_backward,
// infer_backward) for float and double: row (N, C) and plane (N, C, S) layouts, a transposed
// and a reversed view, a broadcast per-sample mask, the training context and update_moving,
// empty views, and the outputs of float data with a large mean.
#include <algorithm>
#include <batchnorm/batchnorm.hpp>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "reference.hpp"

namespace {

using batchnorm::DType;
using batchnorm::TensorRef;
using bntest::convert;
using bntest::Shape;

template <class T>
constexpr DType dtype_of() {
  return std::is_same_v<T, float> ? DType::float32 : DType::float64;
}

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-11;
}

template <class T>
TensorRef view(std::vector<T>& values, const Shape& shape) {
  return batchnorm::contiguous_view(values.data(), dtype_of<T>(), shape);
}

// The per-feature vectors a framework would own, plus the reference's copy.
template <class T>
struct Buffers {
  std::vector<T> gamma, beta, moving_mean, moving_variance;
  bntest::RefWeights reference;

  explicit Buffers(std::size_t c)
      : gamma(bntest::normal<T>(c, 1.0, 0.3, 1)),
        beta(bntest::normal<T>(c, 0.0, 0.5, 2)),
        moving_mean(bntest::normal<T>(c, 0.0, 0.5, 3)),
        moving_variance(c, T(1.5)) {
    reference.gamma = convert<double>(gamma);
    reference.beta = convert<double>(beta);
    reference.moving_mean = convert<double>(moving_mean);
    reference.moving_variance = convert<double>(moving_variance);
  }

  batchnorm::Weights weights() {
    batchnorm::Weights w;
    w.gamma = gamma.data();
    w.beta = beta.data();
    w.moving_mean = moving_mean.data();
    w.moving_variance = moving_variance.data();
    w.dtype = dtype_of<T>();
    return w;
  }
};

template <class T>
void close(const std::vector<T>& actual, const std::vector<double>& expected,
           const std::string& what) {
  double scale = 1.0;
  for (double e : expected) scale = std::max(scale, std::fabs(e));
  BNTEST_CLOSE(actual, expected, tolerance<T>() * scale, tolerance<T>(), what);
}

// Training forward (with the context and the moving update), backward, inference and its
// backward on contiguous data; the mask (or null) covers the shape without the feature axis.
template <class T>
void run_layout(const char* name, const Shape& shape, int axis, const bool* mask) {
  const std::string label = std::string(name) + (std::is_same_v<T, float> ? " f32" : " f64");
  const auto n = static_cast<std::size_t>(bntest::numel(shape));
  batchnorm::Options options;
  options.axes = {axis};
  options.momentum = 0.75;
  const auto c = static_cast<std::size_t>(batchnorm::feature_count(shape, options));
  Buffers<T> b(c);
  std::vector<T> x = bntest::normal<T>(n, 3.0, 2.0, 10), y(n), dx(n);
  std::vector<T> dy = bntest::normal<T>(n, 0.0, 1.0, 11), dgamma(c), dbeta(c);

  // The mask as the kernels take it: x's shape, stride 0 on the feature axis.
  TensorRef mask_view;
  if (mask) {
    Shape reduced = shape;
    reduced[static_cast<std::size_t>(axis)] = 1;
    mask_view = batchnorm::contiguous_view(const_cast<bool*>(mask), DType::boolean, reduced);
    mask_view.shape[axis] = shape[static_cast<std::size_t>(axis)];
    mask_view.strides[axis] = 0;
  }
  bntest::RefConfig config;
  config.shape = shape;
  config.axes = {axis};
  config.momentum = options.momentum;
  bntest::Reference reference(config);

  batchnorm::TrainingContext context;
  batchnorm::train_forward(view(x, shape), view(y, shape), mask ? &mask_view : nullptr, options,
                           b.weights(), nullptr, true, context);
  close(y, reference.train(convert<double>(x), b.reference, mask), label + " train y");
  close(b.moving_mean, b.reference.moving_mean, label + " moving_mean");
  close(b.moving_variance, b.reference.moving_variance, label + " moving_variance");
  BNTEST_CHECK(context.groups == 1 && context.features == static_cast<std::int64_t>(c));
  BNTEST_CLOSE(context.count, reference.count(), 0.0, 0.0, label + " context count");
  BNTEST_CLOSE(context.mean, reference.mean(), 1e-12, 1e-12, label + " context mean");

  batchnorm::train_backward(view(dy, shape), view(x, shape), view(dx, shape),
                            mask ? &mask_view : nullptr, options, b.weights(), context,
                            dgamma.data(), dbeta.data());
  const bntest::RefGradients g = reference.train_backward(convert<double>(dy));
  close(dx, g.dx, label + " train dx");
  close(dgamma, g.dgamma, label + " train dgamma");
  close(dbeta, g.dbeta, label + " train dbeta");

  batchnorm::infer_forward(view(x, shape), view(y, shape), options, b.weights());
  close(y, reference.infer(convert<double>(x), b.reference), label + " infer y");
  batchnorm::infer_backward(view(dy, shape), view(x, shape), view(dx, shape), options, b.weights(),
                            dgamma.data(), dbeta.data());
  const bntest::RefGradients gi =
      reference.infer_backward(convert<double>(dy), convert<double>(x), b.reference);
  close(dx, gi.dx, label + " infer dx");
  close(dgamma, gi.dgamma, label + " infer dgamma");
  close(dbeta, gi.dbeta, label + " infer dbeta");
}

template <class T>
void run_layouts() {
  run_layout<T>("row (N, C)", {53, 7}, -1, nullptr);
  run_layout<T>("row NHWC", {3, 4, 5, 6}, 3, nullptr);
  run_layout<T>("plane NCHW", {3, 6, 4, 5}, 1, nullptr);
  run_layout<T>("plane (N, C, S), S = 1", {9, 4, 1}, 1, nullptr);
  const auto row_mask = bntest::random_mask(3 * 4 * 5, 0.6, 12);
  run_layout<T>("row NHWC masked", {3, 4, 5, 6}, 3, row_mask.get());
  const auto plane_mask = bntest::random_mask(3 * 4 * 5, 0.4, 13);
  run_layout<T>("plane NCHW masked", {3, 6, 4, 5}, 1, plane_mask.get());
}

BNTEST_CASE(layouts_float) { run_layouts<float>(); }

BNTEST_CASE(layouts_double) { run_layouts<double>(); }

// Views the caller owns with any strides: NCHW memory read as NHWC (feature axis strided), the
// batch reversed (negative stride) and a per-sample mask broadcast with stride 0.
template <class T>
void run_strided() {
  const std::int64_t N = 4, C = 3, H = 2, W = 5;
  const Shape nhwc_shape{N, H, W, C};
  const auto n = static_cast<std::size_t>(N * C * H * W);
  std::vector<T> nchw = bntest::normal<T>(n, -2.0, 3.0, 20);
  // What the view shows, materialized contiguously for the reference: sample N-1-i first.
  std::vector<double> shown(n);
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t w = 0; w < W; ++w)
        for (std::int64_t c = 0; c < C; ++c)
          shown[static_cast<std::size_t>(((i * H + h) * W + w) * C + c)] =
              nchw[static_cast<std::size_t>((((N - 1 - i) * C + c) * H + h) * W + w)];
  TensorRef x;
  x.data = nchw.data() + (N - 1) * C * H * W;
  x.dtype = dtype_of<T>();
  x.rank = 4;
  x.shape = {N, H, W, C};
  x.strides = {-C * H * W, W, 1, H * W};
  bool per_sample[] = {true, false, true, true};
  TensorRef mask;
  mask.data = per_sample;
  mask.dtype = DType::boolean;
  mask.rank = 4;
  mask.shape = x.shape;
  mask.strides = {1, 0, 0, 0};
  std::vector<bool> reduced_mask;
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t k = 0; k < H * W; ++k) reduced_mask.push_back(per_sample[i]);
  std::unique_ptr<bool[]> reference_mask(new bool[reduced_mask.size()]);
  std::copy(reduced_mask.begin(), reduced_mask.end(), reference_mask.get());

  batchnorm::Options options;
  options.axes = {-1};
  Buffers<T> b(static_cast<std::size_t>(C));
  std::vector<T> y(n), dx(n), dy = bntest::normal<T>(n, 0.0, 1.0, 21), dgamma(C), dbeta(C);
  bntest::RefConfig config;
  config.shape = nhwc_shape;
  config.axes = {3};
  config.momentum = options.momentum;
  bntest::Reference reference(config);
  batchnorm::TrainingContext context;
  batchnorm::train_forward(x, view(y, nhwc_shape), &mask, options, b.weights(), nullptr, true,
                           context);
  close(y, reference.train(shown, b.reference, reference_mask.get()), "strided train y");
  close(b.moving_variance, b.reference.moving_variance, "strided moving_variance");
  batchnorm::train_backward(view(dy, nhwc_shape), x, view(dx, nhwc_shape), &mask, options,
                            b.weights(), context, dgamma.data(), dbeta.data());
  const bntest::RefGradients g = reference.train_backward(convert<double>(dy));
  close(dx, g.dx, "strided train dx");
  close(dgamma, g.dgamma, "strided train dgamma");
  close(dbeta, g.dbeta, "strided train dbeta");
}

BNTEST_CASE(strided_views_float) { run_strided<float>(); }

BNTEST_CASE(strided_views_double) { run_strided<double>(); }

// Float data whose mean is 1e6 times its spread: y and dx stay within 1e-4 of the float64
// reference on the same float values (subtracting the float mean alone would be off by up to
// 0.03), on a row layout with ghost batches of 8 and on a plane layout.
void run_large_mean(const char* name, const Shape& shape, int axis,
                    std::int64_t virtual_batch_size) {
  const auto n = static_cast<std::size_t>(bntest::numel(shape));
  batchnorm::Options options;
  options.axes = {axis};
  options.virtual_batch_size = virtual_batch_size;
  Buffers<float> b(static_cast<std::size_t>(batchnorm::feature_count(shape, options)));
  std::vector<float> x = bntest::normal<float>(n, 1e6, 1.0, 40), y(n), dx(n);
  std::vector<float> dy = bntest::normal<float>(n, 0.0, 1.0, 41), dgamma(b.gamma.size()),
                     dbeta(b.gamma.size());
  bntest::RefConfig config;
  config.shape = shape;
  config.axes = {axis};
  config.momentum = options.momentum;
  config.virtual_batch_size = virtual_batch_size;
  bntest::Reference reference(config);
  batchnorm::TrainingContext context;
  batchnorm::train_forward(view(x, shape), view(y, shape), nullptr, options, b.weights(), nullptr,
                           true, context);
  const std::string label = std::string("large mean ") + name;
  BNTEST_CLOSE(y, reference.train(convert<double>(x), b.reference, nullptr), 1e-4, 0.0,
               label + " train y");
  batchnorm::train_backward(view(dy, shape), view(x, shape), view(dx, shape), nullptr, options,
                            b.weights(), context, dgamma.data(), dbeta.data());
  BNTEST_CLOSE(dx, reference.train_backward(convert<double>(dy)).dx, 1e-4, 0.0,
               label + " train dx");
}

BNTEST_CASE(large_mean_outputs_float) {
  run_large_mean("row (N, C), ghost batches of 8", {4096, 8}, -1, 8);
  run_large_mean("plane (N, C, S)", {64, 8, 64}, 1, 0);
}

BNTEST_CASE(update_moving_false_keeps_weights) {
  const Shape shape{10, 4};
  std::vector<double> x = bntest::normal<double>(40, 3.0, 2.0, 30), y(40);
  Buffers<double> b(4);
  const std::vector<double> mean = b.moving_mean, variance = b.moving_variance;
  batchnorm::Options options;
  batchnorm::TrainingContext context;
  batchnorm::train_forward(view(x, shape), view(y, shape), nullptr, options, b.weights(), nullptr,
                           false, context);
  BNTEST_CHECK(b.moving_mean == mean);
  BNTEST_CHECK(b.moving_variance == variance);
  BNTEST_CHECK(context.count == std::vector<double>(4, 10.0));
}

// A context that another call filled (a renorm call over ghost batches of another batch size:
// other groups, counts and r, d not 1 and 0) and that the next call reuses gives that call's
// results exactly, as a fresh context does, on each path a training call can take: rows, the
// fused plane passes, ghost batches and statistics synchronized over processes.
struct ReusedContextCase {
  const char* name;
  Shape shape;
  int axis;
  std::int64_t virtual_batch_size;
  bool synchronized;
};

void run_reused_context(const ReusedContextCase& c) {
  const std::size_t features = 6;
  const auto n = static_cast<std::size_t>(bntest::numel(c.shape));
  std::vector<double> x = bntest::normal<double>(n, 2.0, 3.0, 50);
  std::vector<double> dy = bntest::normal<double>(n, 0.0, 1.0, 51);
  Buffers<double> b(features);
  // Another call first: renorm over ghost batches of 8 on a (40, 6) batch.
  const Shape other_shape{40, 6};
  std::vector<double> other_x = bntest::normal<double>(240, -1.0, 0.5, 52), other_y(240);
  batchnorm::Options renorm;
  renorm.renorm = true;
  renorm.rmax = 1.5;
  renorm.dmax = 0.5;
  renorm.virtual_batch_size = 8;
  std::vector<double> stddev(features, 0.5), renorm_mean(features, -1.0);
  batchnorm::Weights with_renorm = b.weights();
  with_renorm.moving_stddev = stddev.data();
  with_renorm.renorm_mean = renorm_mean.data();
  with_renorm.renorm_stddev = stddev.data();
  batchnorm::TrainingContext reused, fresh;
  batchnorm::train_forward(view(other_x, other_shape), view(other_y, other_shape), nullptr, renorm,
                           with_renorm, nullptr, false, reused);
  BNTEST_CHECK(reused.groups == 5);
  BNTEST_CHECK(reused.zscale != std::vector<double>(features, 1.0));
  // A fake two-process communicator: the other process holds the same batch.
  batchnorm::Communicator twins;
  twins.size = 2;
  twins.allgather = [](const double* send, double* receive, std::size_t count) {
    std::copy(send, send + count, receive);
    std::copy(send, send + count, receive + count);
  };
  const batchnorm::Communicator* communicator = c.synchronized ? &twins : nullptr;
  batchnorm::Options options;
  options.axes = {c.axis};
  options.virtual_batch_size = c.virtual_batch_size;
  struct Results {
    std::vector<double> y, dx, dgamma, dbeta;
  };
  auto run = [&](batchnorm::TrainingContext& context) {
    Results r{std::vector<double>(n), std::vector<double>(n), std::vector<double>(features),
              std::vector<double>(features)};
    batchnorm::train_forward(view(x, c.shape), view(r.y, c.shape), nullptr, options, b.weights(),
                             nullptr, false, context, communicator);
    batchnorm::train_backward(view(dy, c.shape), view(x, c.shape), view(r.dx, c.shape), nullptr,
                              options, b.weights(), context, r.dgamma.data(), r.dbeta.data(),
                              communicator);
    return r;
  };
  const Results from_reused = run(reused), from_fresh = run(fresh);
  const std::string label = std::string("reused context, ") + c.name;
  if (reused.groups != fresh.groups || reused.count != fresh.count || reused.mean != fresh.mean ||
      reused.inv_std != fresh.inv_std || reused.zscale != fresh.zscale ||
      reused.zshift != fresh.zshift) {
    bntest::report(__FILE__, __LINE__, label + ": the statistics differ");
  }
  if (from_reused.y != from_fresh.y || from_reused.dx != from_fresh.dx ||
      from_reused.dgamma != from_fresh.dgamma || from_reused.dbeta != from_fresh.dbeta) {
    bntest::report(__FILE__, __LINE__, label + ": y, dx, dgamma or dbeta differ");
  }
}

BNTEST_CASE(context_reused_by_another_call) {
  run_reused_context({"rows", {48, 6}, -1, 0, false});
  run_reused_context({"planes", {8, 6, 16}, 1, 0, false});
  run_reused_context({"ghost batches", {48, 6}, -1, 12, false});
  run_reused_context({"synchronized", {48, 6}, -1, 0, true});
  run_reused_context({"synchronized planes", {8, 6, 16}, 1, 0, true});
}

// Views with an empty axis among others (slices such as x[:0, :, :0]): no element is read or
// written, the statistics count nothing, the moving statistics stay, the gradients are zero.
// The loop nests once reduced an empty axis by a modulo of its size (a division by zero).
bool zero_first(const std::vector<double>& values, std::size_t n) {
  return std::all_of(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(n),
                     [](double v) { return v == 0.0; });
}

void run_empty_view(const Shape& base_shape, const std::vector<int>& axes, int empty_axis) {
  const auto n = static_cast<std::size_t>(bntest::numel(base_shape));
  std::vector<double> storage = bntest::normal<double>(n, 1.0, 2.0, 40), out(n, -7.0);
  TensorRef x = batchnorm::contiguous_view(storage.data(), DType::float64, base_shape);
  x.shape[empty_axis] = 0;  // a slice: the strides of the full array stay
  TensorRef y = x;
  y.data = out.data();
  batchnorm::Options options;
  options.axes = axes;
  const auto c = static_cast<std::size_t>(batchnorm::feature_count(
      std::vector<std::int64_t>(x.shape.begin(), x.shape.begin() + x.rank), options));
  // One spare element keeps the pointers non-null when there are no features.
  std::vector<double> mean(c + 1, 0.5), variance(c + 1, 2.0), gamma(c + 1, 1.5), dgamma(c + 1, 9.0),
      dbeta(c + 1, 9.0);
  batchnorm::Weights w;
  w.gamma = gamma.data();
  w.moving_mean = mean.data();
  w.moving_variance = variance.data();
  w.dtype = DType::float64;
  // A context that held another call's statistics: the empty call's own replace them.
  batchnorm::TrainingContext context;
  context.count.assign(c, 5.0);
  context.mean.assign(c, 0.25);
  context.inv_std.assign(c, 3.0);
  context.zscale.assign(c, 2.0);
  context.zshift.assign(c, -1.0);
  batchnorm::train_forward(x, y, nullptr, options, w, nullptr, true, context);
  BNTEST_CHECK(context.count == std::vector<double>(c, 0.0));
  BNTEST_CHECK(context.mean == std::vector<double>(c, 0.0));
  // (No rows: variance 0, so epsilon alone.)
  BNTEST_CHECK(context.inv_std == std::vector<double>(c, 1.0 / std::sqrt(options.epsilon)));
  BNTEST_CHECK(context.zscale == std::vector<double>(c, 1.0));
  BNTEST_CHECK(context.zshift == std::vector<double>(c, 0.0));
  BNTEST_CHECK(mean == std::vector<double>(c + 1, 0.5));
  BNTEST_CHECK(variance == std::vector<double>(c + 1, 2.0));
  batchnorm::train_backward(x, x, y, nullptr, options, w, context, dgamma.data(), dbeta.data());
  BNTEST_CHECK(zero_first(dgamma, c) && zero_first(dbeta, c));
  batchnorm::infer_forward(x, y, options, w);
  batchnorm::infer_backward(x, x, y, options, w, dgamma.data(), nullptr);
  BNTEST_CHECK(zero_first(dgamma, c));
  BNTEST_CHECK(out == std::vector<double>(n, -7.0));  // nothing written
}

BNTEST_CASE(empty_views) {
  run_empty_view({3, 2, 3}, {1}, 0);            // x[:0] of (3, 2, 3), axis 1
  run_empty_view({3, 2, 3}, {1}, 2);            // x[:, :, :0]
  run_empty_view({11, 3, 3, 7, 4}, {0, 3}, 2);  // axis list around an empty reduced axis
  run_empty_view({5, 4, 6}, {1}, 1);            // no features at all
  run_empty_view({4, 6, 3}, {-1}, 1);           // channels-last, empty middle axis
}

BNTEST_CASE(feature_count_and_contiguous_view) {
  batchnorm::Options options;
  options.axes = {1, -1};
  BNTEST_CHECK(batchnorm::feature_count({2, 3, 4, 5}, options) == 15);
  float data[24];
  const TensorRef t = batchnorm::contiguous_view(data, DType::float32, {2, 3, 4});
  BNTEST_CHECK(t.rank == 3 && t.numel() == 24);
  BNTEST_CHECK(t.strides[0] == 12 && t.strides[1] == 4 && t.strides[2] == 1);
  BNTEST_CHECK(std::string(batchnorm::dtype_name(DType::bfloat16)) == "bfloat16");
}

}  // namespace

int main() { return bntest::run_all(); }
