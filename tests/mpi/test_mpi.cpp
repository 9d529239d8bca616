// C++ test of batchnorm::mpi_communicator, run with mpiexec on 2 and 3 processes: a synchronized
// training step equals one process's step on the concatenated batch (unequal batches, an empty
// process, ghost batches kept per process), and every process ends with bitwise-equal moving
// statistics and dgamma/dbeta. Every process computes the reference itself from the shared seed.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "batchnorm/mpi.hpp"

namespace {

constexpr std::int64_t kFeatures = 5;
constexpr std::int64_t kSpatial = 7;
constexpr std::int64_t kVirtualBatch = 3;

int failures = 0;

void expect_close(const std::vector<double>& actual, const std::vector<double>& expected,
                  const std::string& what, int rank) {
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double tolerance = 1e-12 + 1e-10 * std::fabs(expected[i]);
    if (actual.size() != expected.size() || !(std::fabs(actual[i] - expected[i]) <= tolerance)) {
      std::fprintf(stderr, "rank %d: %s[%zu] = %.17g, expected %.17g\n", rank, what.c_str(), i,
                   actual.size() == expected.size() ? actual[i] : NAN, expected[i]);
      ++failures;
      return;
    }
  }
}

// Samples of process r: 3, 6, 0, 9, ... (multiples of the ghost batch size; process 2 is empty).
std::int64_t batch_of(int r) { return r == 2 ? 0 : 3 * (r + 1); }

std::vector<double> samples(int r, std::uint32_t stream) {
  std::mt19937_64 generator(1000u * stream + static_cast<std::uint32_t>(r));
  std::normal_distribution<double> normal(3.0, 2.0);
  std::vector<double> values(static_cast<std::size_t>(batch_of(r) * kFeatures * kSpatial));
  for (double& v : values) v = normal(generator);
  return values;
}

struct Step {
  std::vector<double> y, dx, dgamma, dbeta, moving_mean, moving_variance;
};

// One training step (forward + backward) on an (N, C, S) float64 batch with feature axis 1.
Step train_step(const std::vector<double>& x, const std::vector<double>& dy, std::int64_t n,
                std::int64_t virtual_batch, const batchnorm::Communicator* communicator) {
  batchnorm::Options options;
  options.axes = {1};
  options.momentum = 0.5;
  options.virtual_batch_size = virtual_batch;
  std::vector<double> gamma(kFeatures), beta(kFeatures);
  for (std::int64_t c = 0; c < kFeatures; ++c) {
    gamma[static_cast<std::size_t>(c)] = 1.0 + 0.25 * static_cast<double>(c);
    beta[static_cast<std::size_t>(c)] = 0.5 - 0.1 * static_cast<double>(c);
  }
  Step s;
  s.moving_mean.assign(kFeatures, 0.0);
  s.moving_variance.assign(kFeatures, 1.0);
  s.y.resize(x.size());
  s.dx.resize(x.size());
  s.dgamma.resize(kFeatures);
  s.dbeta.resize(kFeatures);
  batchnorm::Weights weights;
  weights.gamma = gamma.data();
  weights.beta = beta.data();
  weights.moving_mean = s.moving_mean.data();
  weights.moving_variance = s.moving_variance.data();
  weights.dtype = batchnorm::DType::float64;
  const std::vector<std::int64_t> shape{n, kFeatures, kSpatial};
  auto view = [&](const std::vector<double>& v) {
    return batchnorm::contiguous_view(const_cast<double*>(v.data()), batchnorm::DType::float64,
                                      shape);
  };
  batchnorm::TrainingContext context;
  batchnorm::train_forward(view(x), view(s.y), nullptr, options, weights, nullptr, true, context,
                           communicator);
  batchnorm::train_backward(view(dy), view(x), view(s.dx), nullptr, options, weights, context,
                            s.dgamma.data(), s.dbeta.data(), communicator);
  return s;
}

// Where sample i of process r sits in the concatenated batch: after the samples of the lower
// ranks, or, with ghost batches, so that the concatenated batch's interleaved ghost batches
// (ghost j = samples j, j + G, ...) are exactly the processes' own ghost batches.
std::int64_t global_index(int r, std::int64_t i, int size, bool ghost) {
  std::int64_t before = 0, total = 0;
  for (int q = 0; q < size; ++q) {
    if (q < r) before += batch_of(q);
    total += batch_of(q);
  }
  if (!ghost) return before + i;
  const std::int64_t groups = batch_of(r) / kVirtualBatch;
  const std::int64_t all_groups = total / kVirtualBatch;
  const std::int64_t first_group = before / kVirtualBatch;
  return first_group + i % groups + (i / groups) * all_groups;
}

std::vector<double> bits_of_all(const std::vector<double>& local, int size) {
  std::vector<double> all(local.size() * static_cast<std::size_t>(size));
  MPI_Allgather(local.data(), static_cast<int>(local.size()), MPI_DOUBLE, all.data(),
                static_cast<int>(local.size()), MPI_DOUBLE, MPI_COMM_WORLD);
  return all;
}

void check_identical_everywhere(const std::vector<double>& local, const std::string& what, int rank,
                                int size) {
  const std::vector<double> all = bits_of_all(local, size);
  for (int q = 0; q < size; ++q) {
    if (std::memcmp(all.data() + q * local.size(), local.data(), local.size() * sizeof(double))) {
      std::fprintf(stderr, "rank %d: %s differs bitwise from rank %d's\n", rank, what.c_str(), q);
      ++failures;
    }
  }
}

void run_case(bool ghost, int rank, int size, const batchnorm::Communicator& communicator) {
  const std::string label = ghost ? "ghost " : "";
  const std::int64_t virtual_batch = ghost ? kVirtualBatch : 0;
  const std::int64_t row = kFeatures * kSpatial;
  std::int64_t total = 0;
  for (int q = 0; q < size; ++q) total += batch_of(q);
  std::vector<double> all_x(static_cast<std::size_t>(total * row));
  std::vector<double> all_dy(all_x.size());
  for (int q = 0; q < size; ++q) {
    const std::vector<double> x = samples(q, 1), dy = samples(q, 2);
    for (std::int64_t i = 0; i < batch_of(q); ++i) {
      const std::int64_t to = global_index(q, i, size, ghost) * row;
      std::copy(x.begin() + i * row, x.begin() + (i + 1) * row, all_x.begin() + to);
      std::copy(dy.begin() + i * row, dy.begin() + (i + 1) * row, all_dy.begin() + to);
    }
  }
  const Step expected = train_step(all_x, all_dy, total, virtual_batch, nullptr);
  const Step got =
      train_step(samples(rank, 1), samples(rank, 2), batch_of(rank), virtual_batch, &communicator);

  std::vector<double> expected_y(got.y.size()), expected_dx(got.dx.size());
  for (std::int64_t i = 0; i < batch_of(rank); ++i) {
    const std::int64_t from = global_index(rank, i, size, ghost) * row;
    std::copy(expected.y.begin() + from, expected.y.begin() + from + row,
              expected_y.begin() + i * row);
    std::copy(expected.dx.begin() + from, expected.dx.begin() + from + row,
              expected_dx.begin() + i * row);
  }
  expect_close(got.y, expected_y, label + "y", rank);
  expect_close(got.dx, expected_dx, label + "dx", rank);
  expect_close(got.dgamma, expected.dgamma, label + "dgamma", rank);
  expect_close(got.dbeta, expected.dbeta, label + "dbeta", rank);
  expect_close(got.moving_mean, expected.moving_mean, label + "moving_mean", rank);
  expect_close(got.moving_variance, expected.moving_variance, label + "moving_variance", rank);
  for (const auto* v : {&got.moving_mean, &got.moving_variance, &got.dgamma, &got.dbeta}) {
    check_identical_everywhere(*v, label + "moving statistics and dgamma/dbeta", rank, size);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  try {
    const batchnorm::Communicator communicator = batchnorm::mpi_communicator(MPI_COMM_WORLD);
    if (communicator.size != size) {
      std::fprintf(stderr, "rank %d: communicator size %d, expected %d\n", rank, communicator.size,
                   size);
      ++failures;
    }
    run_case(false, rank, size, communicator);
    run_case(true, rank, size, communicator);
    try {
      batchnorm::mpi_communicator(MPI_COMM_NULL);
      std::fprintf(stderr, "rank %d: MPI_COMM_NULL was accepted\n", rank);
      ++failures;
    } catch (const std::invalid_argument&) {
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "rank %d: %s\n", rank, error.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  int total_failures = 0;
  MPI_Allreduce(&failures, &total_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("%s: %d processes, %d failures\n", total_failures ? "FAILED" : "passed", size,
                total_failures);
  }
  MPI_Finalize();
  return total_failures ? 1 : 0;
}
