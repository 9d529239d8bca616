// The CPU backend: the layer operations as OpenMP passes over the chunk kernels of the
// instruction set picked at run time (cpu/kernels.hpp).
#include "core/backend.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "core/synchronize.hpp"
#include "cpu/kernels.hpp"

namespace batchnorm::detail {

namespace {

// The folded coefficients of a call, in one allocation, each array with cpu::kRowWrap entries of
// room past its statistics for the row-mode passes (cpu::RowCoefficients). Shift, scale, slope
// and offset are written in full by the coefficient code before a pass reads them (slope by the
// backward's only), so they are left uninitialized: zeroing them cost more than computing them
// for wide rows ((16, 8192)). prescale exists for the per-feature forward path only (the
// vectorized loops never split a scale): it starts at one there, and only the scales that need
// a split change it.
template <class Acc>
struct CoefficientBuffers {
  std::int64_t count, stride;
  cpu::PartialBuffer<Acc> values;
  bool has_prescale = false;
  explicit CoefficientBuffers(std::int64_t n)
      : count(n), stride(n + cpu::kRowWrap), values(5 * stride) {}
  Acc* array(int i) { return values.data() + i * stride; }
  // The arrays without prescale: for the vectorized coefficient loops and the backward.
  Coefficients<Acc> view() { return {array(0), array(1), array(2), array(3)}; }
  // The arrays with prescale, for the per-feature forward path.
  Coefficients<Acc> view_with_split() {
    if (!has_prescale) std::fill(array(4), array(4) + count, Acc(1));
    has_prescale = true;
    Coefficients<Acc> k = view();
    k.prescale = array(4);
    return k;
  }
  bool prescaled() const {
    if (!has_prescale) return false;
    const Acc* prescale = values.data() + 4 * stride;
    std::int64_t split = 0;  // counted, without an early exit: the scan vectorizes
    for (std::int64_t i = 0; i < count; ++i) split += prescale[i] != Acc(1);
    return split > 0;
  }
};

// Whether a training forward's coefficients take the vectorized loops of the kernel table.
template <class A>
bool plain_training(std::int64_t groups, const TrainScalars& s, const WeightPtrs<A>& w) {
  return groups == 1 && !s.renorm && w.adjust_scale == nullptr && w.adjust_bias == nullptr;
}

// The view of an optional per-feature array from feature `first` on (null stays null).
template <class P>
P* from_feature(P* array, std::int64_t first) {
  return array ? array + first : array;
}

// The views of per-feature structures from feature `first` on (one group: feature c at index c).
GroupStats from_feature(const GroupStats& s, std::int64_t first) {
  return {s.count + first,   s.mean + first,   s.var + first,
          s.inv_std + first, s.zscale + first, s.zshift + first};
}

template <class W>
WeightPtrs<W> from_feature(WeightPtrs<W> w, std::int64_t first) {
  for (W** p : {&w.gamma, &w.beta, &w.moving_mean, &w.moving_variance, &w.moving_stddev,
                &w.renorm_mean, &w.renorm_stddev}) {
    *p = from_feature(*p, first);
  }
  w.adjust_scale = from_feature(w.adjust_scale, first);
  w.adjust_bias = from_feature(w.adjust_bias, first);
  return w;
}

template <class Acc>
Coefficients<Acc> from_feature(Coefficients<Acc> k, std::int64_t first) {
  for (Acc** p : {&k.shift, &k.scale, &k.slope, &k.offset, &k.prescale})
    *p = from_feature(*p, first);
  return k;
}

// A per-feature array for the CPU passes: n entries and the room past them that row-mode passes
// use (cpu::RowCoefficients).
template <class Acc>
std::vector<Acc> pass_array(std::size_t n) {
  return std::vector<Acc>(n + cpu::kRowWrap, Acc(0));
}

// The forward's elementwise pass, out = (in - shift) * scale + offset. Where a scale did not fit
// the compute type (see Coefficients) it runs in two passes: out = (in - shift) * prescale for
// those statistics (and out = in for the rest, exactly), then out = out * scale + offset in
// place (the rest: (out - shift) * scale + offset, as in one pass). Powers of two scale exactly.
template <class T, class Acc>
void apply_affine(const Plan& plan, const T* in, T* out, CoefficientBuffers<Acc>& k) {
  const bool split = k.prescaled();
  const Coefficients<Acc> c = split ? k.view_with_split() : k.view();
  if (!split) {
    cpu::affine(plan, in, out, c.shift, c.scale, c.offset);
    return;
  }
  const auto n = static_cast<std::size_t>(k.count);
  std::vector<Acc> first_shift = pass_array<Acc>(n), zero = pass_array<Acc>(n),
                   second_shift = pass_array<Acc>(n);
  for (std::size_t i = 0; i < n; ++i) {
    const bool split = c.prescale[i] != Acc(1);
    first_shift[i] = split ? c.shift[i] : Acc(0);
    second_shift[i] = split ? Acc(0) : c.shift[i];
  }
  cpu::affine(plan, in, out, first_shift.data(), c.prescale, zero.data());
  // The second pass reads what the first wrote: operand 0 takes the output's strides.
  Plan in_place = plan;
  for (LoopNest* nest : {&in_place.stat, &in_place.reduced}) {
    for (int d = 0; d < nest->count; ++d) nest->dims[d].stride[0] = nest->dims[d].stride[1];
  }
  cpu::affine(in_place, static_cast<const T*>(out), out, second_shift.data(), c.scale, c.offset);
}

// `values` as n copies of `value`, writing only the entries that differ from it bit for bit (a
// signed zero or a NaN included): a loop of calls then only reads them.
void reset_to(std::vector<double>& values, std::size_t n, double value) {
  values.resize(n, value);
  std::uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  for (double& v : values) {
    std::uint64_t current;
    std::memcpy(&current, &v, sizeof current);
    if (current != bits) v = value;
  }
}

// Sizes the context for a training forward. count, mean and inv_std keep their sizes without
// being cleared: every forward path writes them for every statistic, and zeros written here, on
// the calling thread, made each thread that then wrote a block of features take those cache lines
// from this core ((128, 1024) training on two threads: 25-26 us with them, 23-24 us without).
// zscale and zshift must hold 1 and 0 where no renorm or adjustment sets them (the vectorized
// coefficients leave them so for the backward).
void reset_context(TrainingContext& context, std::int64_t groups, std::int64_t features,
                   bool has_mask) {
  const auto stats = static_cast<std::size_t>(groups * features);
  context.groups = groups;
  context.features = features;
  context.count.resize(stats);
  context.mean.resize(stats);
  context.inv_std.resize(stats);
  reset_to(context.zscale, static_cast<std::size_t>(features), 1.0);
  reset_to(context.zshift, static_cast<std::size_t>(features), 0.0);
  context.has_mask = has_mask;
}

// The CPU backend: each operation as a sequence of parallel passes.
struct Cpu {
  static bool available() { return true; }

  template <class T>
  static void run(const TrainForward<T>& call) {
    using Acc = compute_t<T>;
    const cpu::CallShare share;
    TrainingContext& context = call.context;
    const std::int64_t groups = call.stats_plan.groups, features = call.stats_plan.features;
    const std::int64_t stats = groups * features;
    reset_context(context, groups, features, call.mask != nullptr);
    // Every path writes each statistic's variance before reading it: scratch memory, not zeros
    // written on this thread (see reset_context).
    cpu::PartialBuffer<double> var(stats);
    CoefficientBuffers<Acc> k(stats);
    // Within one process, plane layouts finish each feature while its data is in cache.
    if (!synchronizing(call.communicator) &&
        cpu::train_forward_fused(call.stats_plan, call.apply_plan, call.x, call.y, call.mask,
                                 call.scalars, call.weights, context, var.data(),
                                 k.view_with_split())) {
      // Rare (denormal data, tiny epsilon): the fused pass multiplied by the split scales only.
      if (k.prescaled()) apply_affine(call.apply_plan, call.x, call.y, k);
      return;
    }
    const GroupStats group_stats{
        context.count.data(),   context.mean.data(),   var.data(),
        context.inv_std.data(), context.zscale.data(), context.zshift.data()};
    if (call.stats_plan.row && call.apply_plan.row && !context.ghost_batches &&
        !synchronizing(call.communicator) && plain_training(groups, call.scalars, call.weights)) {
      // Row layouts in one region: each block of features takes its coefficients as soon as
      // its statistics are merged. A block whose scale needs the split path (rare: denormal
      // data, tiny epsilon) is marked and taken by the per-feature path below.
      cpu::PartialBuffer<char> split(features);
      std::fill(split.data(), split.data() + features, char{0});
      const Coefficients<Acc> plain_view = k.view();
      const bool normalized = cpu::train_rows_fused(
          call.stats_plan, call.apply_plan, call.x, call.y, call.mask, context.count.data(),
          context.mean.data(), var.data(), {plain_view.shift, plain_view.scale, plain_view.offset},
          [&](std::int64_t first, std::int64_t last) {
            if (cpu::kernels<T>().plain_train_coefficients(
                    last - first, call.scalars, from_feature(group_stats, first),
                    from_feature(call.weights, first), from_feature(plain_view, first))) {
              return true;
            }
            std::fill(split.data() + first, split.data() + last, char{1});
            return false;
          });
      if (normalized) return;
      const Coefficients<Acc> split_view = k.view_with_split();
      for (std::int64_t c = 0; c < features; ++c) {
        if (!split[static_cast<std::size_t>(c)]) continue;
        const GhostSums sums =
            group_statistics(c, features, groups, call.scalars.epsilon, group_stats);
        feature_coefficients<Acc, Acc>(c, features, groups, call.scalars, group_stats, sums,
                                       call.weights, split_view);
      }
      apply_affine(call.apply_plan, call.x, call.y, k);
      return;
    }
    cpu::moments(call.stats_plan, call.x, call.mask, context.count.data(), context.mean.data(),
                 var.data());
    // Ghost batches stay per process: only their averages are synchronized (one collective
    // either way).
    if (!context.ghost_batches) {
      synchronize_moments(call.communicator, context.count, context.mean, var.data());
    }

    const bool plain = !context.ghost_batches &&
                       plain_training(groups, call.scalars, call.weights) &&
                       cpu::kernels<T>().plain_train_coefficients(
                           features, call.scalars, group_stats, call.weights, k.view());
    if (!plain) {
      std::vector<GhostSums> ghost(static_cast<std::size_t>(features));
      for (std::int64_t c = 0; c < features; ++c) {
        ghost[static_cast<std::size_t>(c)] =
            group_statistics(c, features, groups, call.scalars.epsilon, group_stats);
      }
      if (context.ghost_batches) synchronize_ghost_sums(call.communicator, ghost);
      const Coefficients<Acc> split_view = k.view_with_split();
      for (std::int64_t c = 0; c < features; ++c) {
        feature_coefficients<Acc, Acc>(c, features, groups, call.scalars, group_stats,
                                       ghost[static_cast<std::size_t>(c)], call.weights,
                                       split_view);
      }
    }
    apply_affine(call.apply_plan, call.x, call.y, k);
  }

  template <class T>
  static void run(const InferForward<T>& call) {
    using Acc = compute_t<T>;
    const cpu::CallShare share;
    CoefficientBuffers<Acc> k(call.plan.features);
    if (!cpu::kernels<T>().inference_coefficients(call.plan.features, call.epsilon, call.weights,
                                                  k.view())) {
      const Coefficients<Acc> split_view = k.view_with_split();
      for (std::int64_t c = 0; c < call.plan.features; ++c) {
        inference_feature<Acc, Acc>(c, call.epsilon, call.weights, split_view);
      }
    }
    apply_affine(call.plan, call.x, call.y, k);
  }

  template <class T>
  static void run(const TrainBackward<T>& call) {
    using Acc = compute_t<T>;
    const cpu::CallShare share;
    const TrainingContext& context = call.context;
    const std::int64_t groups = context.groups, features = context.features;
    const auto stats = static_cast<std::size_t>(groups * features);
    const auto feature_step = [&](std::int64_t c, const BackwardSums& sums,
                                  const Coefficients<Acc>& out) {
      train_backward_feature<Acc, Acc>(c, features, groups, context.count.data(),
                                       context.mean.data(), context.inv_std.data(),
                                       context.zscale.data(), context.zshift.data(),
                                       call.weights.gamma, sums, call.dgamma, call.dbeta, out);
    };
    if (!synchronizing(call.communicator) &&
        cpu::backward_fused(call.sums_plan, call.dx_plan, call.dy, call.x, call.dx, call.mask,
                            context.mean.data(), groups, feature_step)) {
      return;
    }
    if (groups == 1 && !context.ghost_batches && !synchronizing(call.communicator) &&
        call.sums_plan.row && call.dx_plan.row) {
      // Row layouts in one region: each block of features takes its coefficients, dgamma and
      // dbeta as soon as its sums are added, then the dx pass. The sums are written in full
      // before they are read (scratch memory, as the forward's variances).
      cpu::PartialBuffer<double> sum_dy(features), sum_dy_centered(features);
      CoefficientBuffers<Acc> k(features);
      const Coefficients<Acc> view = k.view();
      cpu::backward_rows_fused(
          call.sums_plan, call.dx_plan, call.dy, call.x, call.mask, call.dx, context.mean.data(),
          sum_dy.data(), sum_dy_centered.data(), {view.shift, view.scale, view.slope, view.offset},
          [&](std::int64_t first, std::int64_t last) {
            cpu::kernels<T>().backward_coefficients(
                last - first, context.count.data() + first, context.mean.data() + first,
                context.inv_std.data() + first, context.zscale.data() + first,
                context.zshift.data() + first, from_feature(call.weights.gamma, first),
                BackwardSums{sum_dy.data() + first, sum_dy_centered.data() + first},
                from_feature(call.dgamma, first), from_feature(call.dbeta, first),
                from_feature(view, first));
          });
      return;
    }
    std::vector<double> sum_dy(stats), sum_dy_centered(stats);
    cpu::backward_sums(call.sums_plan, call.dy, call.x, context.mean.data(), sum_dy.data(),
                       sum_dy_centered.data());
    // Without ghost batches dx needs the global sums; with them, dx uses its process's ghost
    // batches and only the dgamma/dbeta totals are synchronized.
    if (!context.ghost_batches) synchronize_sums(call.communicator, sum_dy, sum_dy_centered);
    CoefficientBuffers<Acc> k(groups * features);
    const BackwardSums sums{sum_dy.data(), sum_dy_centered.data()};
    if (groups == 1 && !context.ghost_batches) {
      cpu::kernels<T>().backward_coefficients(features, context.count.data(), context.mean.data(),
                                              context.inv_std.data(), context.zscale.data(),
                                              context.zshift.data(), call.weights.gamma, sums,
                                              call.dgamma, call.dbeta, k.view());
      cpu::backward_dx(call.dx_plan, call.dy, call.x, call.mask, call.dx, k.view());
      return;
    }
    const auto n = static_cast<std::size_t>(features);
    std::vector<double> total_dy(n), total_dy_xhat(n);
    for (std::int64_t c = 0; c < features; ++c) {
      const ParameterSums totals = backward_coefficients<Acc, Acc>(
          c, features, groups, context.count.data(), context.mean.data(), context.inv_std.data(),
          context.zscale.data(), call.weights.gamma, sums, k.view());
      total_dy[static_cast<std::size_t>(c)] = totals.dy;
      total_dy_xhat[static_cast<std::size_t>(c)] = totals.dy_xhat;
    }
    if (context.ghost_batches) synchronize_sums(call.communicator, total_dy, total_dy_xhat);
    for (std::size_t c = 0; c < n; ++c) {
      parameter_gradients<Acc>(static_cast<std::int64_t>(c), context.zscale.data(),
                               context.zshift.data(), ParameterSums{total_dy[c], total_dy_xhat[c]},
                               call.dgamma, call.dbeta);
    }
    cpu::backward_dx(call.dx_plan, call.dy, call.x, call.mask, call.dx, k.view());
  }

  template <class T>
  static void run(const InferBackward<T>& call) {
    using Acc = compute_t<T>;
    const cpu::CallShare share;
    const std::int64_t features = call.sums_plan.features;
    const auto n = static_cast<std::size_t>(features);
    std::vector<double> moving_mean(n), sum_dy(n), sum_dy_centered(n);
    for (std::size_t c = 0; c < n; ++c) {
      moving_mean[c] = static_cast<double>(call.weights.moving_mean[c]);
    }
    // The dx kernels multiply x - shift by a zero slope here, so a NaN or infinity in x would
    // make dx NaN at its position although dx = dy * gamma / std does not depend on x. Such
    // values also make the feature's sum(dy * (x - mm)) non-finite: then dx is made again from
    // dy alone (rare; the sum is dgamma's, which rightly stays non-finite).
    std::atomic<bool> not_finite{false};
    const auto feature_step = [&](std::int64_t c, const BackwardSums& sums,
                                  const Coefficients<Acc>& out) {
      inference_backward_feature<Acc, Acc>(c, call.epsilon, call.weights, sums, call.dgamma,
                                           call.dbeta, out);
      if (!std::isfinite(sums.dy_centered[c])) not_finite.store(true, std::memory_order_relaxed);
    };
    const auto* no_mask = static_cast<const std::uint8_t*>(nullptr);
    if (!cpu::backward_fused(call.sums_plan, call.dx_plan, call.dy, call.x, call.dx, no_mask,
                             moving_mean.data(), 1, feature_step)) {
      cpu::backward_sums(call.sums_plan, call.dy, call.x, moving_mean.data(), sum_dy.data(),
                         sum_dy_centered.data());
      CoefficientBuffers<Acc> k(features);
      const BackwardSums sums{sum_dy.data(), sum_dy_centered.data()};
      for (std::int64_t c = 0; c < features; ++c) feature_step(c, sums, k.view());
      cpu::backward_dx(call.dx_plan, call.dy, call.x, no_mask, call.dx, k.view());
    }
    if (!not_finite.load(std::memory_order_relaxed)) return;
    // dx = (dy - 0) * scale + 0 through the forward's pass, with dx in operand 1's place.
    std::vector<Acc> zero = pass_array<Acc>(n), scale = pass_array<Acc>(n);
    for (std::size_t c = 0; c < n; ++c) {
      const double variance = static_cast<double>(call.weights.moving_variance[c]);
      const double gamma = value_or(call.weights.gamma, static_cast<std::int64_t>(c), 1.0);
      scale[c] = static_cast<Acc>(gamma * (1.0 / std::sqrt(variance + call.epsilon)));
    }
    Plan plan = call.dx_plan;
    for (LoopNest* nest : {&plan.stat, &plan.reduced}) {
      for (int d = 0; d < nest->count; ++d) nest->dims[d].stride[1] = nest->dims[d].stride[2];
    }
    cpu::affine(plan, call.dy, call.dx, zero.data(), scale.data(), zero.data());
  }
};

constexpr Backend kCpu = Backend::of<Cpu>();

}  // namespace

const Backend& cpu_backend() { return kCpu; }

}  // namespace batchnorm::detail
