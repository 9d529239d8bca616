// Host-side merge of per-process contributions for synchronized statistics. Each process
// gathers every contribution and merges them in rank order, so all processes compute bitwise
// the same result (an all-reduce whose order does not depend on the transport).
#pragma once

#include <cstddef>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "batchnorm/detail/math.hpp"

namespace batchnorm::detail {

inline bool synchronizing(const Communicator* communicator) {
  return communicator != nullptr && communicator->size > 1;
}

// Replaces local (count, mean, biased variance) per statistic with those of the global batch,
// merged by Chan's formula.
inline void synchronize_moments(const Communicator* communicator, std::vector<double>& count,
                                std::vector<double>& mean, std::vector<double>& var) {
  if (!synchronizing(communicator)) return;
  const std::size_t stats = count.size();
  std::vector<double> send(3 * stats);
  for (std::size_t k = 0; k < stats; ++k) {
    send[3 * k] = count[k];
    send[3 * k + 1] = mean[k];
    send[3 * k + 2] = var[k] * count[k];
  }
  const auto ranks = static_cast<std::size_t>(communicator->size);
  std::vector<double> gathered(ranks * send.size());
  communicator->allgather(send.data(), gathered.data(), send.size());
  for (std::size_t k = 0; k < stats; ++k) {
    Moments total;
    for (std::size_t r = 0; r < ranks; ++r) {
      const double* part = gathered.data() + r * send.size() + 3 * k;
      merge_into(total, Moments{part[0], part[1], part[2]});
    }
    count[k] = total.count;
    mean[k] = total.mean;
    var[k] = total.count > 0.0 ? total.m2 / total.count : 0.0;
  }
}

// Replaces local backward sums with their global totals, added in rank order.
inline void synchronize_sums(const Communicator* communicator, std::vector<double>& sum_dy,
                             std::vector<double>& sum_dy_centered) {
  if (!synchronizing(communicator)) return;
  const std::size_t stats = sum_dy.size();
  std::vector<double> send(2 * stats);
  for (std::size_t k = 0; k < stats; ++k) {
    send[2 * k] = sum_dy[k];
    send[2 * k + 1] = sum_dy_centered[k];
  }
  const auto ranks = static_cast<std::size_t>(communicator->size);
  std::vector<double> gathered(ranks * send.size());
  communicator->allgather(send.data(), gathered.data(), send.size());
  for (std::size_t k = 0; k < stats; ++k) {
    double total_dy = 0.0, total_centered = 0.0;
    for (std::size_t r = 0; r < ranks; ++r) {
      total_dy += gathered[r * send.size() + 2 * k];
      total_centered += gathered[r * send.size() + 2 * k + 1];
    }
    sum_dy[k] = total_dy;
    sum_dy_centered[k] = total_centered;
  }
}

}  // namespace batchnorm::detail
