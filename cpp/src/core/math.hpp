// The per-feature scalar math of batch normalization, shared by every backend: Chan's merge of
// partial moments, the Keras training/inference coefficients and moving updates, and the
// backward coefficients. Everything runs in float64; kernels receive the folded coefficients
// so that each element costs one subtract and one multiply-add.
//
// The subtracted mean is the one coefficient that cannot simply be rounded to the compute type:
// a float32 mean of data with |mean| >> std is off by up to half its ulp (0.03 at 1e6), an error
// every normalized value of the feature would share, ~6e-8 |mean| / std. So the kernels subtract
// the rounded mean, `shift`, and the remainder mean - shift is taken off with the offset that
// they add anyway: x - shift is exact for x within a factor of two of the shift (Sterbenz), and
// what is left are roundings relative to the normalized value itself. Data whose compute type is
// float64 gets a zero remainder.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/config.hpp"

namespace batchnorm::detail {

// Running (count, mean, sum of squared deviations) of a set of values.
struct Moments {
  double count = 0.0;
  double mean = 0.0;
  double m2 = 0.0;
};

// Chan et al.'s pairwise merge: exact for data whose mean dwarfs its spread, unlike E[x^2]-E[x]^2.
BATCHNORM_HD inline void merge_into(Moments& into, const Moments& other) {
  if (other.count == 0.0) return;
  if (into.count == 0.0) {
    into = other;
    return;
  }
  const double total = into.count + other.count;
  const double delta = other.mean - into.mean;
  into.mean += delta * (other.count / total);
  into.m2 += other.m2 + delta * delta * (into.count * other.count / total);
  into.count = total;
}

// Moments of a block from sums of (value - shift) and its square; the shift is a value of the
// block, so the sums stay small and float64 keeps them exact enough.
BATCHNORM_HD inline Moments moments_from_shifted_sums(double count, double shift, double sum,
                                                      double sum_squares) {
  Moments result;
  if (count == 0.0) return result;
  const double mean_offset = sum / count;
  result.count = count;
  result.mean = shift + mean_offset;
  const double m2 = sum_squares - sum * mean_offset;
  // Rounding may leave a tiny negative m2; a NaN (data with NaN or infinities) must stay NaN.
  result.m2 = m2 < 0.0 ? 0.0 : m2;
  return result;
}

BATCHNORM_HD inline double clamp(double value, double low, double high) {
  return value < low ? low : (value > high ? high : value);
}

// Scalars of one training step.
struct TrainScalars {
  double epsilon;
  double momentum;
  double renorm_momentum;
  double rmin, rmax, dmax;
  bool renorm;
  bool update_moving;
};

// The layer's per-feature vectors (nullable where absent).
template <class W>
struct WeightPtrs {
  W* gamma;
  W* beta;
  W* moving_mean;
  W* moving_variance;
  W* moving_stddev;
  W* renorm_mean;
  W* renorm_stddev;
  const W* adjust_scale;
  const W* adjust_bias;
};

// Per-(group, feature) statistics of a training step, index g * C + c.
struct GroupStats {
  const double* count;
  double* mean;     // in: batch mean; out: the mean used (0 where count == 0)
  double* var;      // in: biased batch variance; out: the variance used
  double* inv_std;  // out: 1 / sqrt(var + epsilon)
  double* zscale;   // out, per feature: r * adjustment scale
  double* zshift;   // out, per feature: d * adjustment scale + adjustment bias
};

// Folded elementwise coefficients, index g * C + c: out = (in - shift) * scale + offset for the
// forward; for dx the kernels use dx = scale * (dy - valid * (offset + (x - shift) * slope)).
//
// `prescale` (nullable) is for forward scales beyond Acc's range: 1 / sqrt(var + epsilon) of
// denormal data with a tiny epsilon exceeds float32's largest value although the outputs are of
// order one. A backend that passes it gets such a scale split into a power of two, prescale[i],
// and a factor that fits, scale[i], and must compute ((in - shift) * prescale) * scale + offset
// (in two exact steps); elsewhere prescale[i] is 1. Without it the scale rounds to infinity.
template <class Acc>
struct Coefficients {
  Acc* shift;
  Acc* scale;
  Acc* slope;
  Acc* offset;
  Acc* prescale = nullptr;
};

// The largest finite value of Acc (float or double).
template <class Acc>
BATCHNORM_HD constexpr double largest_finite() {
  return sizeof(Acc) == sizeof(float) ? 3.4028234663852886e38 : 1.7976931348623157e308;
}

// Stores a forward scale (split as described at Coefficients where it does not fit Acc) and
// returns the value the kernels multiply by in effect, for the offset to cancel against.
template <class Acc>
BATCHNORM_HD inline double store_scale(Coefficients<Acc> out, std::int64_t i, double scale) {
  double power = 1.0;
  if (out.prescale) {
    if (std::fabs(scale) > largest_finite<Acc>() && std::isfinite(scale)) {
      // scale / power lies in [1, 2) (larger only past Acc's largest power of two).
      const int exponent = std::ilogb(scale);
      const int cap = std::ilogb(largest_finite<Acc>());
      power = std::ldexp(1.0, exponent < cap ? exponent : cap);
    }
    out.prescale[i] = static_cast<Acc>(power);
  }
  const Acc stored = static_cast<Acc>(scale / power);
  out.scale[i] = stored;
  return power * static_cast<double>(stored);
}

// Stores shift[i] = the mean rounded to Acc and returns the remainder mean - shift, which the
// caller folds into offset[i]: x - mean = (x - shift) - remainder. A non-finite mean leaves no
// remainder (its outputs are NaN or infinite either way).
template <class Acc>
BATCHNORM_HD inline double split_shift(Coefficients<Acc> out, std::int64_t i, double mean) {
  const Acc shift = static_cast<Acc>(mean);
  out.shift[i] = shift;
  const double remainder = mean - static_cast<double>(shift);
  return remainder == remainder ? remainder : 0.0;
}

template <class W>
BATCHNORM_HD inline double value_or(const W* values, std::int64_t i, double fallback) {
  return values ? static_cast<double>(values[i]) : fallback;
}

// Sums over the valid ghost groups of one feature: their number and the sums of their means and
// variances. Keras feeds the moving statistics and renorm with the mean over ghost batches of
// their means and variances; synchronized ghost batches add these sums across processes first.
struct GhostSums {
  double groups = 0.0;
  double mean = 0.0;
  double var = 0.0;
};

// First half of a training step for feature c across its G ghost groups (G = 1 without ghost
// batches): zeroes the statistics of groups without a valid position, sets their inverse std
// and returns the sums over the valid groups.
BATCHNORM_HD inline GhostSums group_statistics(std::int64_t c, std::int64_t features,
                                               std::int64_t groups, double epsilon,
                                               GroupStats stats) {
  GhostSums sums;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t k = g * features + c;
    if (stats.count[k] > 0.0) {
      sums.mean += stats.mean[k];
      sums.var += stats.var[k];
      sums.groups += 1.0;
    } else {
      stats.mean[k] = 0.0;
      stats.var[k] = 0.0;
    }
    stats.inv_std[k] = 1.0 / std::sqrt(stats.var[k] + epsilon);
  }
  return sums;
}

// Second half: renorm factors, folded coefficients and the moving-statistics update of feature c
// from the ghost-group sums (local, or added across processes).
template <class W, class Acc>
BATCHNORM_HD void feature_coefficients(std::int64_t c, std::int64_t features, std::int64_t groups,
                                       const TrainScalars& s, GroupStats stats, GhostSums ghost,
                                       WeightPtrs<W> w, Coefficients<Acc> out) {
  const double batch_mean = ghost.groups > 0.0 ? ghost.mean / ghost.groups : 0.0;
  const double batch_var = ghost.groups > 0.0 ? ghost.var / ghost.groups : 0.0;
  const double batch_std = std::sqrt(batch_var + s.epsilon);

  double r = 1.0, d = 0.0;
  if (s.renorm) {
    // Not fmax: it would turn a NaN renorm_stddev into sqrt(epsilon) and hide it.
    const double stored_std = static_cast<double>(w.renorm_stddev[c]);
    const double min_std = std::sqrt(s.epsilon);
    const double renorm_std = stored_std < min_std ? min_std : stored_std;
    r = clamp(batch_std / renorm_std, s.rmin, s.rmax);
    d = clamp((batch_mean - static_cast<double>(w.renorm_mean[c])) / renorm_std, -s.dmax, s.dmax);
  }
  const double adjust_scale = value_or(w.adjust_scale, c, 1.0);
  const double adjust_bias = value_or(w.adjust_bias, c, 0.0);
  const double zscale = r * adjust_scale;
  const double zshift = d * adjust_scale + adjust_bias;
  stats.zscale[c] = zscale;
  stats.zshift[c] = zshift;

  const double gamma = value_or(w.gamma, c, 1.0);
  const double beta = value_or(w.beta, c, 0.0);
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t k = g * features + c;
    const double remainder = split_shift(out, k, stats.mean[k]);
    const double scale = store_scale(out, k, stats.inv_std[k] * zscale * gamma);
    // Taken off with the rounded scale the kernels multiply by: the remainder cancels exactly.
    out.offset[k] = static_cast<Acc>(zshift * gamma + beta - remainder * scale);
  }

  if (!s.update_moving || ghost.groups == 0.0) return;
  const double m = s.momentum;
  w.moving_mean[c] =
      static_cast<W>(static_cast<double>(w.moving_mean[c]) * m + batch_mean * (1 - m));
  if (s.renorm) {
    const double rm = s.renorm_momentum;
    w.renorm_mean[c] =
        static_cast<W>(static_cast<double>(w.renorm_mean[c]) * rm + batch_mean * (1 - rm));
    w.renorm_stddev[c] =
        static_cast<W>(static_cast<double>(w.renorm_stddev[c]) * rm + batch_std * (1 - rm));
    const double stddev = static_cast<double>(w.moving_stddev[c]) * m + batch_std * (1 - m);
    w.moving_stddev[c] = static_cast<W>(stddev);
    // Keras assigns (not averages) the variance from the averaged stddev, clamped at zero.
    const double stored = static_cast<double>(w.moving_stddev[c]);
    // Clamped at zero, but NaN stays NaN (fmax would make it 0), as Keras' maximum keeps it.
    const double variance = stored * stored - s.epsilon;
    w.moving_variance[c] = static_cast<W>(variance < 0.0 ? 0.0 : variance);
  } else {
    w.moving_variance[c] =
        static_cast<W>(static_cast<double>(w.moving_variance[c]) * m + batch_var * (1 - m));
  }
}

// Training step for feature c across its G ghost groups, within one process.
template <class W, class Acc>
BATCHNORM_HD void train_feature(std::int64_t c, std::int64_t features, std::int64_t groups,
                                const TrainScalars& s, GroupStats stats, WeightPtrs<W> w,
                                Coefficients<Acc> out) {
  const GhostSums ghost = group_statistics(c, features, groups, s.epsilon, stats);
  feature_coefficients<W, Acc>(c, features, groups, s, stats, ghost, w, out);
}

// Inference coefficients for feature c: y = (x - moving_mean) * gamma / sqrt(mv + eps) + beta.
// The moving mean is a weight of the compute type itself, so it is the shift exactly: there is
// no remainder to fold.
template <class W, class Acc>
BATCHNORM_HD void inference_feature(std::int64_t c, double epsilon, const WeightPtrs<W>& w,
                                    Coefficients<Acc> out) {
  const double inv_std = 1.0 / std::sqrt(static_cast<double>(w.moving_variance[c]) + epsilon);
  out.shift[c] = static_cast<Acc>(w.moving_mean[c]);
  store_scale(out, c, value_or(w.gamma, c, 1.0) * inv_std);
  out.offset[c] = static_cast<Acc>(value_or(w.beta, c, 0.0));
}

// Per-(group, feature) sums of the backward pass over all positions, index g * C + c.
struct BackwardSums {
  const double* dy;           // sum of dy
  const double* dy_centered;  // sum of dy * (x - shift)
};

// A feature's totals over its groups of sum(dy) and sum(dy * xhat): what dgamma and dbeta are
// made of. Synchronized ghost batches add them across processes.
struct ParameterSums {
  double dy = 0.0;
  double dy_xhat = 0.0;
};

// Training backward coefficients for feature c's groups, whose means (the shift of `sums`) are
// mean[g * C + c]. With g = dy * gamma * zscale and s the group's std: dx = g / s - valid *
// (sum(g) + xhat * sum(g * xhat)) / (count * s), sums over all positions. Kernels evaluate it as
// scale * (dy - valid * (offset + (x - shift) * slope)): the bracket cancels in the data type
// before scaling, so e.g. a batch of one gives exactly zero.
template <class W, class Acc>
BATCHNORM_HD ParameterSums backward_coefficients(std::int64_t c, std::int64_t features,
                                                 std::int64_t groups, const double* count,
                                                 const double* mean, const double* inv_std,
                                                 const double* zscale, const W* gamma_ptr,
                                                 BackwardSums sums, Coefficients<Acc> out) {
  const double k = value_or(gamma_ptr, c, 1.0) * zscale[c];
  ParameterSums totals;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t i = g * features + c;
    const double inv = inv_std[i];
    const double group_dy = sums.dy[i];
    const double group_dy_xhat = sums.dy_centered[i] * inv;
    totals.dy += group_dy;
    totals.dy_xhat += group_dy_xhat;
    out.scale[i] = static_cast<Acc>(k * inv);
    const double remainder = split_shift(out, i, mean[i]);
    if (count[i] > 0.0) {
      const Acc slope = static_cast<Acc>(inv * group_dy_xhat / count[i]);
      out.slope[i] = slope;
      // (x - mean) * slope = (x - shift) * slope - remainder * slope, as in the forward.
      out.offset[i] =
          static_cast<Acc>(group_dy / count[i] - remainder * static_cast<double>(slope));
    } else {
      out.offset[i] = Acc(0);
      out.slope[i] = Acc(0);
    }
  }
  return totals;
}

// dgamma = sum(dy * z) with z = xhat * zscale + zshift, dbeta = sum(dy) (where non-null).
template <class W>
BATCHNORM_HD void parameter_gradients(std::int64_t c, const double* zscale, const double* zshift,
                                      ParameterSums totals, W* dgamma, W* dbeta) {
  if (dgamma) dgamma[c] = static_cast<W>(zscale[c] * totals.dy_xhat + zshift[c] * totals.dy);
  if (dbeta) dbeta[c] = static_cast<W>(totals.dy);
}

// Training backward for feature c within one process: coefficients, then dgamma and dbeta.
template <class W, class Acc>
BATCHNORM_HD void train_backward_feature(std::int64_t c, std::int64_t features, std::int64_t groups,
                                         const double* count, const double* mean,
                                         const double* inv_std, const double* zscale,
                                         const double* zshift, const W* gamma_ptr,
                                         BackwardSums sums, W* dgamma, W* dbeta,
                                         Coefficients<Acc> out) {
  const ParameterSums totals = backward_coefficients<W, Acc>(c, features, groups, count, mean,
                                                             inv_std, zscale, gamma_ptr, sums, out);
  parameter_gradients<W>(c, zscale, zshift, totals, dgamma, dbeta);
}

// Inference backward for feature c: dx = dy * gamma * inv_std, dgamma = inv_std * sum(dy * (x -
// mm)), dbeta = sum(dy), where `sums` are shifted by the moving mean mm.
template <class W, class Acc>
BATCHNORM_HD void inference_backward_feature(std::int64_t c, double epsilon, const WeightPtrs<W>& w,
                                             BackwardSums sums, W* dgamma, W* dbeta,
                                             Coefficients<Acc> out) {
  const double inv_std = 1.0 / std::sqrt(static_cast<double>(w.moving_variance[c]) + epsilon);
  out.shift[c] = static_cast<Acc>(w.moving_mean[c]);
  out.scale[c] = static_cast<Acc>(value_or(w.gamma, c, 1.0) * inv_std);
  out.slope[c] = Acc(0);
  out.offset[c] = Acc(0);
  if (dgamma) dgamma[c] = static_cast<W>(sums.dy_centered[c] * inv_std);
  if (dbeta) dbeta[c] = static_cast<W>(sums.dy[c]);
}

}  // namespace batchnorm::detail
