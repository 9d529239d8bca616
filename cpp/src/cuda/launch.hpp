// Host-callable launchers of the CUDA kernels (cuda/kernels.cuh) and the work decomposition
// they share. Every launcher queues its kernel on `stream` and returns; none synchronizes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/config.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"

namespace batchnorm::cuda {

using detail::Coefficients;
using detail::Moments;
using detail::Plan;

// Throws std::runtime_error naming `what` and the CUDA error unless `status` is cudaSuccess.
void check(cudaError_t status, const char* what);

// Makes the device that owns `pointer` current for the scope (restoring the previous one), and
// rejects pointers that are not device memory with an error naming `what`.
class DeviceScope {
 public:
  DeviceScope(const void* pointer, const char* what);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// The stream set by batchnorm::set_cuda_stream for the calling thread.
cudaStream_t current_stream();

// batchnorm's own stream-ordered memory pool on the current device, for per-call scratch
// memory. Unlike the device's default pool (which returns memory to the driver at every
// synchronization) it keeps what it has grown to, so repeated calls do not map memory again.
cudaMemPool_t scratch_pool();

inline constexpr int kThreads = 256;
inline constexpr int kVectorBytes = 16;
// Elements one block reduces per statistic chunk: enough per thread (128) to amortize the
// block merge, small enough that a (32, 64, 112, 112) tensor gives over a thousand blocks.
inline constexpr std::int64_t kChunkElements = 32768;

// How a Plan is cut into blocks. Depends only on the shape and the alignment of the operands,
// never on the GPU, so the reduction order (and every result bit) is the same on any device.
//
// Row mode: per outer stat item a (rows x inner) matrix with contiguous features. A block is
// a tile of tile_x vectors of `vector` features times tile_y threads over rows, and reduces
// `per_chunk` rows. Plane mode: per statistic `units` runs of `run` elements; a block reduces
// `per_chunk` consecutive elements of one statistic.
struct Geometry {
  bool row = false;
  int vector = 1;              // elements per load: kVectorBytes / sizeof(T) when aligned, else 1
  std::int64_t stats = 0;      // statistics (g * C + c)
  std::int64_t inner = 1;      // row mode: features per row
  std::int64_t rows = 0;       // row mode: rows per outer item
  std::int64_t columns = 0;    // row mode: vectors per row (inner / vector)
  int tile_x = 1;              // row mode: threads across columns (blockDim.x)
  int tile_y = 1;              // row mode: threads across rows (blockDim.y)
  std::int64_t tiles = 0;      // row mode: column tiles per row
  std::int64_t run = 1;        // plane mode: elements per run (innermost reduced dim)
  std::int64_t units = 0;      // plane mode: runs per statistic
  int unit_dims = 0;           // plane mode: reduced dims that enumerate the runs
  std::int64_t per_chunk = 1;  // rows (row mode) or elements (plane mode) per block
  std::int64_t chunks = 0;     // chunks per statistic
  std::int64_t blocks = 0;     // grid size

  BATCHNORM_HD std::int64_t outer() const { return row ? stats / inner : stats; }
};

// `pointers` holds the plan's operand base addresses; `mask_operand` (or -1) names the mask,
// which is read one byte at a time and does not limit the vector width in row mode.
Geometry make_geometry(const Plan& plan, std::size_t element_bytes, const void* const* pointers,
                       int mask_operand);

// Partial sums of the backward pass per (statistic, chunk).
struct Sums {
  double dy;
  double dy_centered;
};

// Partial moments per (statistic, chunk) of x over the valid positions (operands: x, mask).
template <class T>
void launch_moments(const Plan& plan, const Geometry& geo, const T* x, const std::uint8_t* mask,
                    Moments* partial, cudaStream_t stream);

// Merges the chunks of each statistic in chunk order: count, mean, biased variance.
void launch_merge_moments(const Moments* partial, std::int64_t stats, std::int64_t chunks,
                          double* count, double* mean, double* var, cudaStream_t stream);

// y = (x - shift) * scale + offset per statistic (operands: x, y).
template <class T, class Acc>
void launch_affine(const Plan& plan, const Geometry& geo, const T* x, T* y, const Acc* shift,
                   const Acc* scale, const Acc* offset, cudaStream_t stream);

// Partial sum(dy) and sum(dy * (x - shift)) per (statistic, chunk) (operands: dy, x).
template <class T, class S>
void launch_backward_sums(const Plan& plan, const Geometry& geo, const T* dy, const T* x,
                          const S* shift, Sums* partial, cudaStream_t stream);

// Adds the chunks of each statistic in chunk order.
void launch_merge_sums(const Sums* partial, std::int64_t stats, std::int64_t chunks, double* sum_dy,
                       double* sum_dy_centered, cudaStream_t stream);

// dx = scale * (dy - valid * (offset + (x - shift) * slope)) (operands: dy, x, dx, mask).
template <class T, class Acc>
void launch_backward_dx(const Plan& plan, const Geometry& geo, const T* dy, const T* x,
                        const std::uint8_t* mask, T* dx, const Coefficients<Acc>& k,
                        cudaStream_t stream);

// Per-feature coefficients (one thread per feature, the shared scalar math of core/math.hpp).
template <class W>
void launch_train_coefficients(std::int64_t features, std::int64_t groups,
                               const detail::TrainScalars& scalars, const detail::GroupStats& stats,
                               const detail::WeightPtrs<W>& weights, const Coefficients<W>& out,
                               cudaStream_t stream);

// train_coefficients in two halves, for synchronized statistics (see core/math.hpp).
void launch_group_statistics(std::int64_t features, std::int64_t groups, double epsilon,
                             const detail::GroupStats& stats, detail::GhostSums* ghost,
                             cudaStream_t stream);

template <class W>
void launch_feature_coefficients(std::int64_t features, std::int64_t groups,
                                 const detail::TrainScalars& scalars,
                                 const detail::GroupStats& stats, const detail::GhostSums* ghost,
                                 const detail::WeightPtrs<W>& weights, const Coefficients<W>& out,
                                 cudaStream_t stream);

template <class W>
void launch_inference_coefficients(std::int64_t features, double epsilon,
                                   const detail::WeightPtrs<W>& weights, const Coefficients<W>& out,
                                   cudaStream_t stream);

// Backward coefficients of a training step; shift[g * C + c] is the group mean rounded to W, the
// remainder folded into the offset (detail::backward_coefficients).
template <class W>
void launch_train_backward_coefficients(std::int64_t features, std::int64_t groups,
                                        const double* count, const double* mean,
                                        const double* inv_std, const double* zscale,
                                        const double* zshift, const W* gamma,
                                        const detail::BackwardSums& sums, W* dgamma, W* dbeta,
                                        const Coefficients<W>& out, cudaStream_t stream);

// launch_train_backward_coefficients in two halves, for synchronized ghost batches: the
// per-feature parameter sums land in `totals`, and dgamma/dbeta come from (synchronized) totals.
template <class W>
void launch_backward_coefficients(std::int64_t features, std::int64_t groups, const double* count,
                                  const double* mean, const double* inv_std, const double* zscale,
                                  const W* gamma, const detail::BackwardSums& sums,
                                  detail::ParameterSums* totals, const Coefficients<W>& out,
                                  cudaStream_t stream);

template <class W>
void launch_parameter_gradients(std::int64_t features, const double* zscale, const double* zshift,
                                const detail::ParameterSums* totals, W* dgamma, W* dbeta,
                                cudaStream_t stream);

// Backward coefficients of inference; also sets shift[c] to the moving mean.
template <class W>
void launch_inference_backward_coefficients(std::int64_t features, double epsilon,
                                            const detail::WeightPtrs<W>& weights,
                                            const detail::BackwardSums& sums, W* dgamma, W* dbeta,
                                            const Coefficients<W>& out, cudaStream_t stream);

}  // namespace batchnorm::cuda
