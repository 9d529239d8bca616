// Host-side merge of per-process contributions for synchronized statistics. Each process
// gathers every contribution and merges them in rank order, so all processes compute bitwise
// the same result (an all-reduce whose order does not depend on the transport).
#pragma once

#include <cstddef>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "core/math.hpp"

namespace batchnorm::detail {

inline bool synchronizing(const Communicator* communicator) {
  return communicator != nullptr && communicator->size > 1;
}

// All-gathers `values` and returns every process's copy, concatenated in rank order.
inline std::vector<double> gather_all(const Communicator& communicator,
                                      const std::vector<double>& values) {
  std::vector<double> gathered(static_cast<std::size_t>(communicator.size) * values.size());
  communicator.allgather(values.data(), gathered.data(), values.size());
  return gathered;
}

// Replaces `values` with their element-wise sum over processes, added in rank order.
inline void sum_over_processes(const Communicator& communicator, std::vector<double>& values) {
  const std::vector<double> gathered = gather_all(communicator, values);
  const std::size_t n = values.size();
  for (std::size_t i = 0; i < n; ++i) {
    double total = 0.0;
    for (std::size_t r = 0; r < static_cast<std::size_t>(communicator.size); ++r) {
      total += gathered[r * n + i];
    }
    values[i] = total;
  }
}

// Replaces local (count, mean, biased variance) per statistic with those of the global batch,
// merged by Chan's formula (never E[x^2] - E[x]^2, so large-mean data stays exact).
inline void synchronize_moments(const Communicator* communicator, std::vector<double>& count,
                                std::vector<double>& mean, double* var) {
  if (!synchronizing(communicator)) return;
  const std::size_t stats = count.size();
  std::vector<double> send(3 * stats);
  for (std::size_t k = 0; k < stats; ++k) {
    send[3 * k] = count[k];
    send[3 * k + 1] = mean[k];
    send[3 * k + 2] = var[k] * count[k];
  }
  const std::vector<double> gathered = gather_all(*communicator, send);
  for (std::size_t k = 0; k < stats; ++k) {
    Moments total;
    for (std::size_t r = 0; r < static_cast<std::size_t>(communicator->size); ++r) {
      const double* part = gathered.data() + r * send.size() + 3 * k;
      merge_into(total, Moments{part[0], part[1], part[2]});
    }
    count[k] = total.count;
    mean[k] = total.mean;
    var[k] = total.count > 0.0 ? total.m2 / total.count : 0.0;
  }
}

inline void synchronize_moments(const Communicator* communicator, std::vector<double>& count,
                                std::vector<double>& mean, std::vector<double>& var) {
  synchronize_moments(communicator, count, mean, var.data());
}

// Replaces per-feature ghost-group sums (number of valid groups, sums of their means and
// variances) with their totals over all processes: the moving statistics and renorm then use
// the average over every process's ghost batches.
inline void synchronize_ghost_sums(const Communicator* communicator, std::vector<GhostSums>& sums) {
  if (!synchronizing(communicator)) return;
  const std::size_t n = sums.size();
  std::vector<double> values(3 * n);
  for (std::size_t c = 0; c < n; ++c) {
    values[c] = sums[c].groups;
    values[n + c] = sums[c].mean;
    values[2 * n + c] = sums[c].var;
  }
  sum_over_processes(*communicator, values);
  for (std::size_t c = 0; c < n; ++c)
    sums[c] = GhostSums{values[c], values[n + c], values[2 * n + c]};
}

// Replaces local backward sums (sum(dy) and sum(dy * (x - mean)) per statistic, or the
// ParameterSums of each feature) with their global totals, added in rank order.
inline void synchronize_sums(const Communicator* communicator, std::vector<double>& sum_dy,
                             std::vector<double>& sum_dy_centered) {
  if (!synchronizing(communicator)) return;
  const std::size_t n = sum_dy.size();
  std::vector<double> values(2 * n);
  for (std::size_t k = 0; k < n; ++k) {
    values[k] = sum_dy[k];
    values[n + k] = sum_dy_centered[k];
  }
  sum_over_processes(*communicator, values);
  for (std::size_t k = 0; k < n; ++k) {
    sum_dy[k] = values[k];
    sum_dy_centered[k] = values[n + k];
  }
}

}  // namespace batchnorm::detail
