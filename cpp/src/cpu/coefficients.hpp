// The per-feature coefficients of the common calls, every feature in one loop. The per-feature
// functions of core/math.hpp run once per feature with the options tested inside; for a small
// call (a few hundred features, a few thousand elements each) those calls cost as much as the
// passes over the data. Here the common case (one group, no renorm, no adjustment, scales within
// the compute type's range) is a straight loop that the compiler vectorizes, once per instruction
// set like the chunk kernels (baseline x86-64 vectorized only some of these loops: their float to
// double conversions). Each loop performs the same IEEE operations in the same order as its
// per-feature counterpart, and the kernel units contract no multiply-adds, so the results are
// bitwise the same on every instruction set (tests/test_coefficients.py compares the two paths).
// Not a normal header: included by cpu/chunk_kernels.hpp inside an instruction set's region, so it
// uses nothing from the standard library that would be instantiated there.
#ifndef BATCHNORM_CPU_NS
#error "cpu/coefficients.hpp is included by the kernel translation units only"
#endif

#include <cmath>
#include <cstdint>

#include "core/math.hpp"

namespace batchnorm::cpu::BATCHNORM_CPU_NS {

using detail::Coefficients;
using detail::WeightPtrs;

// A nullable per-feature vector read as its value or a fallback: one loop per combination of
// present/absent gamma and beta, with no test in the loop.
template <bool kPresent, class W>
inline double value_at(const W* values, std::int64_t c, double fallback) {
  if constexpr (kPresent) {
    return static_cast<double>(values[c]);
  } else {
    (void)values;
    (void)c;
    return fallback;
  }
}

// Whether a stored scale may stand for one that detail::store_scale splits (beyond Acc's
// largest value): such a scale rounds to the largest value or to infinity. A scan apart from
// the other loops, with no early exit, so that it vectorizes.
template <class Acc>
bool may_need_split(std::int64_t features, const Acc* scale) {
  const Acc largest = static_cast<Acc>(detail::largest_finite<Acc>());
  // A count, not a flag: GCC 12 vectorizes an integer sum, and left `any |= ...` scalar (a third
  // of the inference coefficients' time at 1024 features).
  std::int64_t outside = 0;
  for (std::int64_t c = 0; c < features; ++c) outside += !(std::fabs(scale[c]) < largest);
  return outside > 0;
}

// detail::group_statistics + detail::feature_coefficients for every feature of a call with one
// group, no renorm and no adjustment (plain_training), whose stats.zscale and stats.zshift hold
// 1 and 0 already. Returns false where a scale may exceed
// Acc's range, having left the moving statistics alone: the per-feature path then computes
// everything again (and splits the scale). Otherwise out.prescale is left as it is (all ones).
template <bool kGamma, bool kBeta, class W, class Acc>
bool plain_train_loops(std::int64_t features, const detail::TrainScalars& s,
                       detail::GroupStats stats, WeightPtrs<W> w, Coefficients<Acc> out) {
  const double epsilon = s.epsilon;
  // Two loops, each of one width (float64 statistics, then Acc coefficients), without branches:
  // every value is read unconditionally and selected. So the compiler vectorizes them.
  for (std::int64_t c = 0; c < features; ++c) {
    const bool valid = stats.count[c] > 0.0;
    const double batch_mean = stats.mean[c], batch_var = stats.var[c];
    const double var = valid ? batch_var : 0.0;
    stats.mean[c] = valid ? batch_mean : 0.0;
    stats.var[c] = var;
    stats.inv_std[c] = 1.0 / std::sqrt(var + epsilon);
  }
  for (std::int64_t c = 0; c < features; ++c) {
    const double mean = stats.mean[c];
    const double gamma = value_at<kGamma>(w.gamma, c, 1.0);
    const double beta = value_at<kBeta>(w.beta, c, 0.0);
    const Acc shift = static_cast<Acc>(mean);
    out.shift[c] = shift;
    const double remainder_or_nan = mean - static_cast<double>(shift);
    const double remainder = remainder_or_nan == remainder_or_nan ? remainder_or_nan : 0.0;
    // No renorm and no adjustment: zscale = 1 and zshift = 0 (as stats holds them already).
    // Products by them are kept where they can change a signed zero or make a NaN.
    const Acc scale = static_cast<Acc>(stats.inv_std[c] * gamma);
    out.scale[c] = scale;
    out.offset[c] = static_cast<Acc>(0.0 * gamma + beta - remainder * static_cast<double>(scale));
  }
  if (may_need_split(features, out.scale)) return false;
  if (!s.update_moving) return true;
  const double m = s.momentum;
  // Features without a valid position keep their moving statistics: the loop tests for them
  // only where there are some (a store under a condition does not vectorize).
  std::int64_t empty = 0;  // (counted, as in may_need_split, so that the scan vectorizes)
  for (std::int64_t c = 0; c < features; ++c) empty += !(stats.count[c] > 0.0);
  const bool all_valid = empty == 0;
  for (std::int64_t c = 0; c < features; ++c) {
    if (!all_valid && !(stats.count[c] > 0.0)) continue;
    // The mean over one ghost group, summed from 0 as the per-feature path does (0 + -0 = 0).
    const double batch_mean = 0.0 + stats.mean[c];
    const double batch_var = 0.0 + stats.var[c];
    w.moving_mean[c] =
        static_cast<W>(static_cast<double>(w.moving_mean[c]) * m + batch_mean * (1 - m));
    w.moving_variance[c] =
        static_cast<W>(static_cast<double>(w.moving_variance[c]) * m + batch_var * (1 - m));
  }
  return true;
}

// plain_train_loops with gamma's and beta's presence as template arguments; an entry of the
// kernel table (W = Acc = the compute type).
template <class A>
bool plain_train_coefficients(std::int64_t features, const detail::TrainScalars& s,
                              detail::GroupStats stats, WeightPtrs<A> w, Coefficients<A> out) {
  if (w.gamma && w.beta) return plain_train_loops<true, true>(features, s, stats, w, out);
  if (w.gamma) return plain_train_loops<true, false>(features, s, stats, w, out);
  if (w.beta) return plain_train_loops<false, true>(features, s, stats, w, out);
  return plain_train_loops<false, false>(features, s, stats, w, out);
}

// detail::inference_feature for every feature. Returns false where a scale may exceed Acc's
// range (the per-feature path then computes them again); out.prescale is left as it is.
template <bool kGamma, bool kBeta, class W, class Acc>
bool inference_loops(std::int64_t features, double epsilon, WeightPtrs<W> w,
                     Coefficients<Acc> out) {
  // One loop per output: GCC 12 vectorizes none of them when the copies share the loop with the
  // float64 arithmetic.
  for (std::int64_t c = 0; c < features; ++c) {
    const double inv_std = 1.0 / std::sqrt(static_cast<double>(w.moving_variance[c]) + epsilon);
    out.scale[c] = static_cast<Acc>(value_at<kGamma>(w.gamma, c, 1.0) * inv_std);
  }
  for (std::int64_t c = 0; c < features; ++c) out.shift[c] = static_cast<Acc>(w.moving_mean[c]);
  for (std::int64_t c = 0; c < features; ++c) {
    out.offset[c] = static_cast<Acc>(value_at<kBeta>(w.beta, c, 0.0));
  }
  return !may_need_split(features, out.scale);
}

template <class A>
bool inference_coefficients(std::int64_t features, double epsilon, WeightPtrs<A> w,
                            Coefficients<A> out) {
  if (w.gamma && w.beta) return inference_loops<true, true>(features, epsilon, w, out);
  if (w.gamma) return inference_loops<true, false>(features, epsilon, w, out);
  if (w.beta) return inference_loops<false, true>(features, epsilon, w, out);
  return inference_loops<false, false>(features, epsilon, w, out);
}

// detail::backward_coefficients + detail::parameter_gradients for every feature of a training
// backward with one group per feature, within one process (or with sums already added across
// processes): the totals over groups are the group's own sums.
template <bool kGamma, class W, class Acc>
void backward_loops(std::int64_t features, const double* count, const double* mean,
                    const double* inv_std, const double* zscale, const double* zshift,
                    const W* gamma, detail::BackwardSums sums, W* dgamma, W* dbeta,
                    Coefficients<Acc> out) {
  for (std::int64_t c = 0; c < features; ++c) {
    const double inv = inv_std[c];
    const double group_dy = sums.dy[c];
    const double group_dy_xhat = sums.dy_centered[c] * inv;
    out.scale[c] = static_cast<Acc>(value_at<kGamma>(gamma, c, 1.0) * zscale[c] * inv);
    const Acc shift = static_cast<Acc>(mean[c]);
    out.shift[c] = shift;
    const double remainder_or_nan = mean[c] - static_cast<double>(shift);
    const double remainder = remainder_or_nan == remainder_or_nan ? remainder_or_nan : 0.0;
    const Acc slope = static_cast<Acc>(inv * group_dy_xhat / count[c]);
    out.slope[c] = slope;
    out.offset[c] = static_cast<Acc>(group_dy / count[c] - remainder * static_cast<double>(slope));
  }
  // A feature without a valid position gets zeros: set apart from the loop above, which has no
  // branch so that it vectorizes.
  for (std::int64_t c = 0; c < features; ++c) {
    if (!(count[c] > 0.0)) out.slope[c] = out.offset[c] = Acc(0);
  }
  // The totals over the one group, summed from 0 as the per-feature path does (separate loops:
  // a store under a condition does not vectorize).
  if (dgamma) {
    for (std::int64_t c = 0; c < features; ++c) {
      const double total_dy = 0.0 + sums.dy[c];
      const double total_dy_xhat = 0.0 + sums.dy_centered[c] * inv_std[c];
      dgamma[c] = static_cast<W>(zscale[c] * total_dy_xhat + zshift[c] * total_dy);
    }
  }
  if (dbeta) {
    for (std::int64_t c = 0; c < features; ++c) dbeta[c] = static_cast<W>(0.0 + sums.dy[c]);
  }
}

template <class A>
void backward_coefficients(std::int64_t features, const double* count, const double* mean,
                           const double* inv_std, const double* zscale, const double* zshift,
                           const A* gamma, detail::BackwardSums sums, A* dgamma, A* dbeta,
                           Coefficients<A> out) {
  if (gamma) {
    backward_loops<true>(features, count, mean, inv_std, zscale, zshift, gamma, sums, dgamma, dbeta,
                         out);
  } else {
    backward_loops<false>(features, count, mean, inv_std, zscale, zshift, gamma, sums, dgamma,
                          dbeta, out);
  }
}

}  // namespace batchnorm::cpu::BATCHNORM_CPU_NS
