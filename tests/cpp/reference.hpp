// A straightforward float64 reference of Keras' batch normalization (statistics, renorm,
// adjustment, moving update, backward) on contiguous C-order data: per-element loops, two-pass
// statistics, no folding or shortcuts. Also the shared helpers of the tests: seeded data, dtype
// conversions, masks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

namespace bntest {

using Shape = std::vector<std::int64_t>;

inline std::int64_t numel(const Shape& shape) {
  std::int64_t n = 1;
  for (std::int64_t s : shape) n *= s;
  return n;
}

// Seeded N(mean, stddev) samples, rounded to T so the reference sees exactly what the layer sees.
template <class T>
std::vector<T> normal(std::size_t n, double mean, double stddev, unsigned seed) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<double> distribution(mean, stddev);
  std::vector<T> values(n);
  for (T& v : values) v = static_cast<T>(distribution(engine));
  return values;
}

template <class T, class U>
std::vector<T> convert(const std::vector<U>& values) {
  return std::vector<T>(values.begin(), values.end());
}

// Booleans with the given share of true values (fixed seed); bool arrays, as the layer takes.
inline std::unique_ptr<bool[]> random_mask(std::size_t n, double share, unsigned seed) {
  std::mt19937_64 engine(seed);
  std::bernoulli_distribution draw(share);
  std::unique_ptr<bool[]> mask(new bool[n]);
  for (std::size_t i = 0; i < n; ++i) mask[i] = draw(engine);
  return mask;
}

struct RefConfig {
  Shape shape;
  std::vector<int> axes;  // negative values count from the end
  double momentum = 0.99;
  double epsilon = 1e-3;
  bool renorm = false;
  double renorm_momentum = 0.99;
  double rmin = -std::numeric_limits<double>::infinity();
  double rmax = std::numeric_limits<double>::infinity();
  double dmax = std::numeric_limits<double>::infinity();
  std::int64_t virtual_batch_size = 0;
};

// Per-feature weights; gamma/beta empty where absent, the renorm vectors empty without renorm.
struct RefWeights {
  std::vector<double> gamma, beta, moving_mean, moving_variance;
  std::vector<double> moving_stddev, renorm_mean, renorm_stddev;
};

struct RefGradients {
  std::vector<double> dx, dgamma, dbeta;
};

class Reference {
 public:
  explicit Reference(RefConfig config) : config_(std::move(config)) {
    const int rank = static_cast<int>(config_.shape.size());
    std::vector<bool> feature(static_cast<std::size_t>(rank), false);
    for (int a : config_.axes) feature[static_cast<std::size_t>(a < 0 ? a + rank : a)] = true;
    for (int a = 0; a < rank; ++a) {
      if (feature[static_cast<std::size_t>(a)]) features_ *= config_.shape[a];
    }
    groups_ = config_.virtual_batch_size > 0 && config_.shape[0] > 0
                  ? config_.shape[0] / config_.virtual_batch_size
                  : 1;
    const std::int64_t n = numel(config_.shape);
    feature_of_.resize(static_cast<std::size_t>(n));
    reduced_of_.resize(static_cast<std::size_t>(n));
    stat_of_.resize(static_cast<std::size_t>(n));
    std::vector<std::int64_t> index(static_cast<std::size_t>(rank), 0);
    for (std::int64_t i = 0; i < n; ++i) {
      std::int64_t c = 0, m = 0;
      for (int a = 0; a < rank; ++a) {
        const auto k = static_cast<std::size_t>(a);
        if (feature[k]) {
          c = c * config_.shape[k] + index[k];
        } else {
          m = m * config_.shape[k] + index[k];
        }
      }
      // Keras reshapes the batch to (V, G, ...): sample s belongs to ghost batch s % G.
      const std::int64_t g = index[0] % groups_;
      feature_of_[static_cast<std::size_t>(i)] = c;
      reduced_of_[static_cast<std::size_t>(i)] = m;
      stat_of_[static_cast<std::size_t>(i)] = g * features_ + c;
      for (int a = rank - 1; a >= 0; --a) {
        const auto k = static_cast<std::size_t>(a);
        if (++index[k] < config_.shape[k]) break;
        index[k] = 0;
      }
    }
  }

  std::int64_t features() const { return features_; }

  // Training forward; updates `w` as Keras does and remembers what backward needs.
  // `mask` covers the input shape without the feature axes (C order), or is null.
  std::vector<double> train(const std::vector<double>& x, RefWeights& w, const bool* mask,
                            const std::vector<double>& adjust_scale = {},
                            const std::vector<double>& adjust_bias = {}) {
    const std::size_t n = x.size(), stats = static_cast<std::size_t>(groups_ * features_);
    valid_.assign(n, true);
    if (mask) {
      for (std::size_t i = 0; i < n; ++i) valid_[i] = mask[reduced_of_[i]];
    }
    count_.assign(stats, 0.0);
    mean_.assign(stats, 0.0);
    std::vector<double> var(stats, 0.0);
    for (std::size_t i = 0; i < n; ++i) {
      if (!valid_[i]) continue;
      count_[stat_of_[i]] += 1.0;
      mean_[stat_of_[i]] += x[i];
    }
    for (std::size_t k = 0; k < stats; ++k) mean_[k] = count_[k] > 0 ? mean_[k] / count_[k] : 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      if (valid_[i]) var[stat_of_[i]] += (x[i] - mean_[stat_of_[i]]) * (x[i] - mean_[stat_of_[i]]);
    }
    std_.assign(stats, 0.0);
    for (std::size_t k = 0; k < stats; ++k) {
      var[k] = count_[k] > 0 ? var[k] / count_[k] : 0.0;
      std_[k] = std::sqrt(var[k] + config_.epsilon);
    }

    const auto features = static_cast<std::size_t>(features_);
    r_.assign(features, 1.0);
    d_.assign(features, 0.0);
    adjust_scale_.assign(features, 1.0);
    adjust_bias_.assign(features, 0.0);
    if (!adjust_scale.empty()) adjust_scale_ = adjust_scale;
    if (!adjust_bias.empty()) adjust_bias_ = adjust_bias;
    for (std::size_t c = 0; c < features; ++c) {
      double mean_sum = 0.0, var_sum = 0.0, valid_groups = 0.0;
      for (std::int64_t g = 0; g < groups_; ++g) {
        const std::size_t k = static_cast<std::size_t>(g) * features + c;
        if (count_[k] > 0) {
          mean_sum += mean_[k];
          var_sum += var[k];
          valid_groups += 1.0;
        }
      }
      if (valid_groups == 0.0) continue;  // no valid position: moving statistics unchanged
      const double batch_mean = mean_sum / valid_groups, batch_var = var_sum / valid_groups;
      const double batch_std = std::sqrt(batch_var + config_.epsilon);
      const double m = config_.momentum;
      if (config_.renorm) {
        const double renorm_std = std::max(w.renorm_stddev[c], std::sqrt(config_.epsilon));
        r_[c] = std::clamp(batch_std / renorm_std, config_.rmin, config_.rmax);
        d_[c] =
            std::clamp((batch_mean - w.renorm_mean[c]) / renorm_std, -config_.dmax, config_.dmax);
        const double rm = config_.renorm_momentum;
        w.renorm_mean[c] = w.renorm_mean[c] * rm + batch_mean * (1 - rm);
        w.renorm_stddev[c] = w.renorm_stddev[c] * rm + batch_std * (1 - rm);
        w.moving_stddev[c] = w.moving_stddev[c] * m + batch_std * (1 - m);
        w.moving_variance[c] =
            std::max(w.moving_stddev[c] * w.moving_stddev[c] - config_.epsilon, 0.0);
      } else {
        w.moving_variance[c] = w.moving_variance[c] * m + batch_var * (1 - m);
      }
      w.moving_mean[c] = w.moving_mean[c] * m + batch_mean * (1 - m);
    }

    x_ = x;
    gamma_ = w.gamma;
    beta_ = w.beta;
    std::vector<double> y(n);
    for (std::size_t i = 0; i < n; ++i) y[i] = z(i) * gamma(feature_of_[i]) + beta(feature_of_[i]);
    return y;
  }

  // Backward of the last train(): the textbook formulas, sums over all positions of the group.
  RefGradients train_backward(const std::vector<double>& dy) const {
    const std::size_t n = dy.size(), stats = count_.size();
    const auto features = static_cast<std::size_t>(features_);
    std::vector<double> sum_g(stats, 0.0), sum_g_xhat(stats, 0.0);
    RefGradients out{std::vector<double>(n), std::vector<double>(features, 0.0),
                     std::vector<double>(features, 0.0)};
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t k = stat_of_[i], c = feature_of_[i];
      const double g = dy[i] * gamma(c) * r_[c] * adjust_scale_[c];
      sum_g[k] += g;
      sum_g_xhat[k] += g * xhat(i);
      out.dgamma[c] += dy[i] * z(i);
      out.dbeta[c] += dy[i];
    }
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t k = stat_of_[i], c = feature_of_[i];
      const double g = dy[i] * gamma(c) * r_[c] * adjust_scale_[c];
      double dx = g / std_[k];
      if (valid_[i] && count_[k] > 0) {
        dx -= (sum_g[k] + xhat(i) * sum_g_xhat[k]) / (count_[k] * std_[k]);
      }
      out.dx[i] = dx;
    }
    return out;
  }

  std::vector<double> infer(const std::vector<double>& x, const RefWeights& w) const {
    std::vector<double> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const std::size_t c = feature_of_[i];
      const double g = w.gamma.empty() ? 1.0 : w.gamma[c];
      const double b = w.beta.empty() ? 0.0 : w.beta[c];
      y[i] = (x[i] - w.moving_mean[c]) * g / std::sqrt(w.moving_variance[c] + config_.epsilon) + b;
    }
    return y;
  }

  RefGradients infer_backward(const std::vector<double>& dy, const std::vector<double>& x,
                              const RefWeights& w) const {
    const auto features = static_cast<std::size_t>(features_);
    RefGradients out{std::vector<double>(x.size()), std::vector<double>(features, 0.0),
                     std::vector<double>(features, 0.0)};
    for (std::size_t i = 0; i < x.size(); ++i) {
      const std::size_t c = feature_of_[i];
      const double inv_std = 1.0 / std::sqrt(w.moving_variance[c] + config_.epsilon);
      out.dx[i] = dy[i] * (w.gamma.empty() ? 1.0 : w.gamma[c]) * inv_std;
      out.dgamma[c] += dy[i] * (x[i] - w.moving_mean[c]) * inv_std;
      out.dbeta[c] += dy[i];
    }
    return out;
  }

  // Statistics of the last train(), index g * C + c.
  const std::vector<double>& count() const { return count_; }
  const std::vector<double>& mean() const { return mean_; }

 private:
  double gamma(std::size_t c) const { return gamma_.empty() ? 1.0 : gamma_[c]; }
  double beta(std::size_t c) const { return beta_.empty() ? 0.0 : beta_[c]; }
  double xhat(std::size_t i) const { return (x_[i] - mean_[stat_of_[i]]) / std_[stat_of_[i]]; }
  // The value multiplied by gamma.
  double z(std::size_t i) const {
    const std::size_t c = feature_of_[i];
    return (xhat(i) * r_[c] + d_[c]) * adjust_scale_[c] + adjust_bias_[c];
  }

  RefConfig config_;
  std::int64_t features_ = 1, groups_ = 1;
  std::vector<std::size_t> feature_of_, reduced_of_, stat_of_;
  std::vector<bool> valid_;
  std::vector<double> x_, gamma_, beta_, count_, mean_, std_, r_, d_, adjust_scale_, adjust_bias_;
};

}  // namespace bntest
