// CPU backend: the four layer operations as kernel sequences, explicitly instantiated for every
// element type. Compiled at -O3 into the core library.
#include "core/backend.hpp"

#include <vector>

#include "core/synchronize.hpp"
#include "cpu/kernels.hpp"

namespace batchnorm::detail {

namespace {

template <class Acc>
struct CoefficientBuffers {
  std::vector<Acc> shift, scale, slope, offset;
  explicit CoefficientBuffers(std::int64_t n)
      : shift(static_cast<std::size_t>(n)),
        scale(static_cast<std::size_t>(n)),
        slope(static_cast<std::size_t>(n)),
        offset(static_cast<std::size_t>(n)) {}
  Coefficients<Acc> view() { return {shift.data(), scale.data(), slope.data(), offset.data()}; }
};

void reset_context(TrainingContext& context, std::int64_t groups, std::int64_t features,
                   bool has_mask) {
  const auto stats = static_cast<std::size_t>(groups * features);
  context.groups = groups;
  context.features = features;
  context.count.assign(stats, 0.0);
  context.mean.assign(stats, 0.0);
  context.inv_std.assign(stats, 0.0);
  context.zscale.assign(static_cast<std::size_t>(features), 1.0);
  context.zshift.assign(static_cast<std::size_t>(features), 0.0);
  context.has_mask = has_mask;
}

}  // namespace

template <class T>
void CpuBackend::train_forward(const Plan& stats_plan, const Plan& apply_plan, const T* x, T* y,
                               const std::uint8_t* mask, const TrainScalars& scalars,
                               const WeightPtrs<compute_t<T>>& weights, TrainingContext& context,
                               const Communicator* communicator) {
  using Acc = compute_t<T>;
  const std::int64_t groups = stats_plan.groups, features = stats_plan.features;
  const std::int64_t stats = groups * features;
  reset_context(context, groups, features, mask != nullptr);
  std::vector<double> var(static_cast<std::size_t>(stats));
  // Within one process, plane layouts finish each feature while its data is in cache.
  if (!synchronizing(communicator) &&
      cpu::train_forward_fused(stats_plan, apply_plan, x, y, mask, scalars, weights, context,
                               var.data())) {
    return;
  }
  cpu::moments(stats_plan, x, mask, context.count.data(), context.mean.data(), var.data());
  // Ghost batches stay per process: only their averages are synchronized (one collective either
  // way).
  if (!context.ghost_batches) synchronize_moments(communicator, context.count, context.mean, var);

  CoefficientBuffers<Acc> k(stats);
  const GroupStats group_stats{
      context.count.data(),   context.mean.data(),   var.data(),
      context.inv_std.data(), context.zscale.data(), context.zshift.data()};
  std::vector<GhostSums> ghost(static_cast<std::size_t>(features));
  for (std::int64_t c = 0; c < features; ++c) {
    ghost[static_cast<std::size_t>(c)] =
        group_statistics(c, features, groups, scalars.epsilon, group_stats);
  }
  if (context.ghost_batches) synchronize_ghost_sums(communicator, ghost);
  for (std::int64_t c = 0; c < features; ++c) {
    feature_coefficients<Acc, Acc>(c, features, groups, scalars, group_stats,
                                   ghost[static_cast<std::size_t>(c)], weights, k.view());
  }
  cpu::affine(apply_plan, x, y, k.shift.data(), k.scale.data(), k.offset.data());
}

template <class T>
void CpuBackend::infer_forward(const Plan& plan, const T* x, T* y, double epsilon,
                               const WeightPtrs<compute_t<T>>& weights) {
  using Acc = compute_t<T>;
  CoefficientBuffers<Acc> k(plan.features);
  for (std::int64_t c = 0; c < plan.features; ++c) {
    inference_feature<Acc, Acc>(c, epsilon, weights, k.view());
  }
  cpu::affine(plan, x, y, k.shift.data(), k.scale.data(), k.offset.data());
}

template <class T>
void CpuBackend::train_backward(const Plan& sums_plan, const Plan& dx_plan, const T* dy, const T* x,
                                T* dx, const std::uint8_t* mask,
                                const WeightPtrs<compute_t<T>>& weights,
                                const TrainingContext& context, compute_t<T>* dgamma,
                                compute_t<T>* dbeta, const Communicator* communicator) {
  using Acc = compute_t<T>;
  const std::int64_t groups = context.groups, features = context.features;
  const auto stats = static_cast<std::size_t>(groups * features);
  const auto feature_step = [&](std::int64_t c, const BackwardSums& sums,
                                const Coefficients<Acc>& out) {
    train_backward_feature<Acc, Acc>(
        c, features, groups, context.count.data(), context.mean.data(), context.inv_std.data(),
        context.zscale.data(), context.zshift.data(), weights.gamma, sums, dgamma, dbeta, out);
  };
  if (!synchronizing(communicator) &&
      cpu::backward_fused(sums_plan, dx_plan, dy, x, dx, mask, context.mean.data(), groups,
                          feature_step)) {
    return;
  }
  std::vector<double> sum_dy(stats), sum_dy_centered(stats);
  cpu::backward_sums(sums_plan, dy, x, context.mean.data(), sum_dy.data(), sum_dy_centered.data());
  // Without ghost batches dx needs the global sums; with them, dx uses its process's ghost
  // batches and only the dgamma/dbeta totals are synchronized.
  if (!context.ghost_batches) synchronize_sums(communicator, sum_dy, sum_dy_centered);
  CoefficientBuffers<Acc> k(groups * features);
  const BackwardSums sums{sum_dy.data(), sum_dy_centered.data()};
  const auto n = static_cast<std::size_t>(features);
  std::vector<double> total_dy(n), total_dy_xhat(n);
  for (std::int64_t c = 0; c < features; ++c) {
    const ParameterSums totals = backward_coefficients<Acc, Acc>(
        c, features, groups, context.count.data(), context.mean.data(), context.inv_std.data(),
        context.zscale.data(), weights.gamma, sums, k.view());
    total_dy[static_cast<std::size_t>(c)] = totals.dy;
    total_dy_xhat[static_cast<std::size_t>(c)] = totals.dy_xhat;
  }
  if (context.ghost_batches) synchronize_sums(communicator, total_dy, total_dy_xhat);
  for (std::size_t c = 0; c < n; ++c) {
    parameter_gradients<Acc>(static_cast<std::int64_t>(c), context.zscale.data(),
                             context.zshift.data(), ParameterSums{total_dy[c], total_dy_xhat[c]},
                             dgamma, dbeta);
  }
  cpu::backward_dx(dx_plan, dy, x, mask, dx, k.view());
}

template <class T>
void CpuBackend::infer_backward(const Plan& sums_plan, const Plan& dx_plan, const T* dy, const T* x,
                                T* dx, double epsilon, const WeightPtrs<compute_t<T>>& weights,
                                compute_t<T>* dgamma, compute_t<T>* dbeta) {
  using Acc = compute_t<T>;
  const std::int64_t features = sums_plan.features;
  const auto n = static_cast<std::size_t>(features);
  std::vector<double> moving_mean(n), sum_dy(n), sum_dy_centered(n);
  for (std::size_t c = 0; c < n; ++c) moving_mean[c] = static_cast<double>(weights.moving_mean[c]);
  const auto feature_step = [&](std::int64_t c, const BackwardSums& sums,
                                const Coefficients<Acc>& out) {
    inference_backward_feature<Acc, Acc>(c, epsilon, weights, sums, dgamma, dbeta, out);
  };
  if (cpu::backward_fused(sums_plan, dx_plan, dy, x, dx, static_cast<const std::uint8_t*>(nullptr),
                          moving_mean.data(), 1, feature_step)) {
    return;
  }
  cpu::backward_sums(sums_plan, dy, x, moving_mean.data(), sum_dy.data(), sum_dy_centered.data());
  CoefficientBuffers<Acc> k(features);
  const BackwardSums sums{sum_dy.data(), sum_dy_centered.data()};
  for (std::int64_t c = 0; c < features; ++c) {
    inference_backward_feature<Acc, Acc>(c, epsilon, weights, sums, dgamma, dbeta, k.view());
  }
  cpu::backward_dx(dx_plan, dy, x, static_cast<const std::uint8_t*>(nullptr), dx, k.view());
}

BATCHNORM_INSTANTIATE_BACKEND(CpuBackend)

}  // namespace batchnorm::detail
