// Work decomposition and launchers of the CUDA kernels (cuda/kernels.cuh): host functions that
// queue one kernel each on `stream` and return; none synchronizes.
// Not a normal header: the CUDA backend's one translation unit with device code (cuda/backend.cu)
// includes it, and it and cuda/kernels.cuh define functions that are not inline. The templates
// are instantiated there, for exactly the calls the backend makes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "cuda/kernels.cuh"
#include "cuda/launch.hpp"

namespace batchnorm::cuda {

#if defined(__CUDACC__)
// Queues `kernel` on `stream`: a function rather than the <<<>>> syntax at each launch, so that
// the tests' host emulation of CUDA (tests/cuda_host) runs these launchers with its own.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   const Args&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
}
#endif

namespace {

bool aligned(const void* pointer, std::size_t element_bytes) {
  return reinterpret_cast<std::uintptr_t>(pointer) % vector_bytes(element_bytes) == 0;
}

// Whether dims [0, end) of `nest` step every operand but the mask by whole vectors.
bool strides_multiple(const LoopNest& nest, int end, int operands, int mask_operand,
                      std::int64_t width) {
  for (int d = 0; d < end; ++d) {
    for (int op = 0; op < operands; ++op) {
      if (op != mask_operand && nest.dims[d].stride[op] % width != 0) return false;
    }
  }
  return true;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

int tile_width(std::int64_t columns) {
  int width = 1;
  while (width < 32 && width < columns) width *= 2;
  return width;
}

unsigned grid_of(std::int64_t blocks) {
  if (blocks > 0x7fffffff) throw std::length_error("batchnorm CUDA: tensor too large for one grid");
  return static_cast<unsigned>(blocks);
}

// Calls f(V, Flat) with std::integral_constant values for the geometry's vector width and
// walk: the kernels are instantiated for vectors over a flat walk, and element by element over
// a flat or a general one.
template <class T, class F>
void with_shape(const Geometry& geo, F&& f) {
  constexpr int wide = vector_width(sizeof(T));
  if (geo.vector == wide) {
    f(std::integral_constant<int, wide>{}, std::true_type{});
  } else if (geo.flat) {
    f(std::integral_constant<int, 1>{}, std::true_type{});
  } else {
    f(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

dim3 block_of(const Geometry& geo) {
  return geo.row ? dim3(geo.tile_x, geo.tile_y) : dim3(kThreads);
}

unsigned feature_grid(std::int64_t features) { return grid_of(ceil_div(features, kThreads)); }

}  // namespace

// `pointers` holds the plan's operand base addresses; `mask_operand` (or -1) names the mask,
// which is read one byte at a time and does not limit the vector width in row mode.
Geometry make_geometry(const Plan& plan, std::size_t element_bytes, const void* const* pointers,
                       int mask_operand) {
  Geometry g;
  g.row = plan.row;
  g.stats = plan.stat.total();
  const LoopNest& red = plan.reduced;
  const std::int64_t width = vector_width(element_bytes);
  // Whether V elements group into one load depends on the shape and strides only, so that the
  // order of the sums does too; the operands' alignment only decides whether a group moves as
  // one vector load or store (Geometry::aligned).
  bool vectorize = true;
  g.aligned = true;
  for (int op = 0; op < plan.operands; ++op) {
    g.aligned = g.aligned && (op == mask_operand || aligned(pointers[op], element_bytes));
  }
  if (plan.row) {
    // Features are unit-stride in every data operand (Plan::row), so a vector needs only the
    // row and item starts on vector boundaries.
    g.inner = plan.stat.dims[plan.stat.count - 1].size;
    g.rows = red.total();
    g.flat = red.count <= 1;
    vectorize =
        vectorize && g.flat && g.inner % width == 0 &&
        strides_multiple(red, red.count, plan.operands, mask_operand, width) &&
        strides_multiple(plan.stat, plan.stat.count - 1, plan.operands, mask_operand, width);
    g.vector = vectorize ? static_cast<int>(width) : 1;
    g.columns = g.inner / g.vector;
    g.tile_x = tile_width(g.columns);
    g.tile_y = kThreads / g.tile_x;
    g.tiles = ceil_div(g.columns, g.tile_x);
    const std::int64_t rows_per_chunk =
        std::max<std::int64_t>(1, kChunkElements / (g.tile_x * g.vector));
    g.per_chunk = ceil_div(rows_per_chunk, g.tile_y) * g.tile_y;
    g.chunks = ceil_div(g.rows, g.per_chunk);
    g.blocks = (g.stats / g.inner) * g.tiles * g.chunks;
  } else {
    // The mask is read per element; vectors need unit-stride runs that start on boundaries.
    const LoopDim& last = red.dims[red.count - 1];
    g.run = last.size;
    g.units = g.run > 0 ? red.total() / g.run : 0;
    g.unit_dims = red.count - 1;
    g.flat = g.unit_dims <= 1;
    for (int op = 0; op < plan.operands; ++op) vectorize = vectorize && last.stride[op] == 1;
    vectorize = vectorize && g.flat && mask_operand < 0 && g.run % width == 0 &&
                strides_multiple(red, g.unit_dims, plan.operands, -1, width) &&
                strides_multiple(plan.stat, plan.stat.count, plan.operands, -1, width);
    g.vector = vectorize ? static_cast<int>(width) : 1;
    g.per_chunk = kChunkElements;
    g.chunks = ceil_div(g.units * g.run, g.per_chunk);
    g.blocks = g.stats * g.chunks;
  }
  return g;
}

// Partial moments per (statistic, chunk) of x over the valid positions (operands: x, mask).
template <class T>
void launch_moments(const Plan& plan, const Geometry& geo, const T* x, const std::uint8_t* mask,
                    Moments* partial, cudaStream_t stream) {
  if (geo.blocks == 0) return;
  with_shape<T>(geo, [&](auto width, auto flat) {
    constexpr int V = decltype(width)::value;
    constexpr bool F = decltype(flat)::value;
    if (geo.row) {
      launch_kernel(row_moments_kernel<T, V, F>, grid_of(geo.blocks), block_of(geo), stream, plan,
                    geo, x, mask, partial);
    } else {
      launch_kernel(plane_moments_kernel<T, V, F>, grid_of(geo.blocks), block_of(geo), stream, plan,
                    geo, x, mask, partial);
    }
  });
  launched("launching the moments kernel", stream);
}

// Merges the chunks of each statistic in chunk order: count, mean, biased variance.
void launch_merge_moments(const Moments* partial, std::int64_t stats, std::int64_t chunks,
                          double* count, double* mean, double* var, cudaStream_t stream) {
  if (stats == 0) return;
  constexpr std::int64_t warps = kThreads / 32;
  launch_kernel(merge_moments_kernel, grid_of(ceil_div(stats, warps)), kThreads, stream, partial,
                stats, chunks, count, mean, var);
  launched("launching the moments merge kernel", stream);
}

// y = (x - shift) * scale + offset per statistic (operands: x, y).
template <class T, class Acc>
void launch_affine(const Plan& plan, const Geometry& geo, const T* x, T* y, const Acc* shift,
                   const Acc* scale, const Acc* offset, cudaStream_t stream) {
  if (geo.blocks == 0) return;
  with_shape<T>(geo, [&](auto width, auto flat) {
    constexpr int V = decltype(width)::value;
    constexpr bool F = decltype(flat)::value;
    if (geo.row) {
      launch_kernel(row_affine_kernel<T, Acc, V, F>, grid_of(geo.blocks), block_of(geo), stream,
                    plan, geo, x, y, shift, scale, offset);
    } else {
      launch_kernel(plane_affine_kernel<T, Acc, V, F>, grid_of(geo.blocks), block_of(geo), stream,
                    plan, geo, x, y, shift, scale, offset);
    }
  });
  launched("launching the normalization kernel", stream);
}

// Partial sum(dy) and sum(dy * (x - shift)) per (statistic, chunk) (operands: dy, x).
template <class T, class S>
void launch_backward_sums(const Plan& plan, const Geometry& geo, const T* dy, const T* x,
                          const S* shift, Sums* partial, cudaStream_t stream) {
  if (geo.blocks == 0) return;
  with_shape<T>(geo, [&](auto width, auto flat) {
    constexpr int V = decltype(width)::value;
    constexpr bool F = decltype(flat)::value;
    if (geo.row) {
      launch_kernel(row_backward_sums_kernel<T, S, V, F>, grid_of(geo.blocks), block_of(geo),
                    stream, plan, geo, dy, x, shift, partial);
    } else {
      launch_kernel(plane_backward_sums_kernel<T, S, V, F>, grid_of(geo.blocks), block_of(geo),
                    stream, plan, geo, dy, x, shift, partial);
    }
  });
  launched("launching the backward sums kernel", stream);
}

// Adds the chunks of each statistic in chunk order.
void launch_merge_sums(const Sums* partial, std::int64_t stats, std::int64_t chunks, double* sum_dy,
                       double* sum_dy_centered, cudaStream_t stream) {
  if (stats == 0) return;
  constexpr std::int64_t warps = kThreads / 32;
  launch_kernel(merge_sums_kernel, grid_of(ceil_div(stats, warps)), kThreads, stream, partial,
                stats, chunks, sum_dy, sum_dy_centered);
  launched("launching the backward sums merge kernel", stream);
}

// dx = scale * (dy - valid * (offset + (x - shift) * slope)) (operands: dy, x, dx, mask).
template <class T, class Acc>
void launch_backward_dx(const Plan& plan, const Geometry& geo, const T* dy, const T* x,
                        const std::uint8_t* mask, T* dx, const Coefficients<Acc>& k,
                        cudaStream_t stream) {
  if (geo.blocks == 0) return;
  with_shape<T>(geo, [&](auto width, auto flat) {
    constexpr int V = decltype(width)::value;
    constexpr bool F = decltype(flat)::value;
    if (geo.row) {
      launch_kernel(row_backward_dx_kernel<T, Acc, V, F>, grid_of(geo.blocks), block_of(geo),
                    stream, plan, geo, dy, x, mask, dx, k);
    } else {
      launch_kernel(plane_backward_dx_kernel<T, Acc, V, F>, grid_of(geo.blocks), block_of(geo),
                    stream, plan, geo, dy, x, mask, dx, k);
    }
  });
  launched("launching the dx kernel", stream);
}

// Per-feature coefficients (one thread per feature, the shared scalar math of core/math.hpp).
template <class W>
void launch_train_coefficients(std::int64_t features, std::int64_t groups,
                               const detail::TrainScalars& scalars, const detail::GroupStats& stats,
                               const detail::WeightPtrs<W>& weights, const Coefficients<W>& out,
                               cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(train_coefficients_kernel<W>, feature_grid(features), kThreads, stream, features,
                groups, scalars, stats, weights, out);
  launched("launching the training coefficients kernel", stream);
}

// train_coefficients in two halves, for synchronized statistics (see core/math.hpp).
void launch_group_statistics(std::int64_t features, std::int64_t groups, double epsilon,
                             const detail::GroupStats& stats, detail::GhostSums* ghost,
                             cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(group_statistics_kernel, feature_grid(features), kThreads, stream, features, groups,
                epsilon, stats, ghost);
  launched("launching the group statistics kernel", stream);
}

template <class W>
void launch_feature_coefficients(std::int64_t features, std::int64_t groups,
                                 const detail::TrainScalars& scalars,
                                 const detail::GroupStats& stats, const detail::GhostSums* ghost,
                                 const detail::WeightPtrs<W>& weights, const Coefficients<W>& out,
                                 cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(feature_coefficients_kernel<W>, feature_grid(features), kThreads, stream, features,
                groups, scalars, stats, ghost, weights, out);
  launched("launching the feature coefficients kernel", stream);
}

template <class W>
void launch_inference_coefficients(std::int64_t features, double epsilon,
                                   const detail::WeightPtrs<W>& weights, const Coefficients<W>& out,
                                   cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(inference_coefficients_kernel<W>, feature_grid(features), kThreads, stream,
                features, epsilon, weights, out);
  launched("launching the inference coefficients kernel", stream);
}

// Backward coefficients of a training step; shift[g * C + c] is the group mean rounded to W, the
// remainder folded into the offset (detail::backward_coefficients).
template <class W>
void launch_train_backward_coefficients(std::int64_t features, std::int64_t groups,
                                        const double* count, const double* mean,
                                        const double* inv_std, const double* zscale,
                                        const double* zshift, const W* gamma,
                                        const detail::BackwardSums& sums, W* dgamma, W* dbeta,
                                        const Coefficients<W>& out, cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(train_backward_coefficients_kernel<W>, feature_grid(features), kThreads, stream,
                features, groups, count, mean, inv_std, zscale, zshift, gamma, sums, dgamma, dbeta,
                out);
  launched("launching the backward coefficients kernel", stream);
}

// launch_train_backward_coefficients in two halves, for synchronized ghost batches: the
// per-feature parameter sums land in `totals`, and dgamma/dbeta come from (synchronized) totals.
template <class W>
void launch_backward_coefficients(std::int64_t features, std::int64_t groups, const double* count,
                                  const double* mean, const double* inv_std, const double* zscale,
                                  const W* gamma, const detail::BackwardSums& sums,
                                  detail::ParameterSums* totals, const Coefficients<W>& out,
                                  cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(backward_coefficients_kernel<W>, feature_grid(features), kThreads, stream, features,
                groups, count, mean, inv_std, zscale, gamma, sums, totals, out);
  launched("launching the backward coefficients kernel", stream);
}

template <class W>
void launch_parameter_gradients(std::int64_t features, const double* zscale, const double* zshift,
                                const detail::ParameterSums* totals, W* dgamma, W* dbeta,
                                cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(parameter_gradients_kernel<W>, feature_grid(features), kThreads, stream, features,
                zscale, zshift, totals, dgamma, dbeta);
  launched("launching the parameter gradients kernel", stream);
}

// Backward coefficients of inference; also sets shift[c] to the moving mean.
template <class W>
void launch_inference_backward_coefficients(std::int64_t features, double epsilon,
                                            const detail::WeightPtrs<W>& weights,
                                            const detail::BackwardSums& sums, W* dgamma, W* dbeta,
                                            const Coefficients<W>& out, cudaStream_t stream) {
  if (features == 0) return;
  launch_kernel(inference_backward_coefficients_kernel<W>, feature_grid(features), kThreads, stream,
                features, epsilon, weights, sums, dgamma, dbeta, out);
  launched("launching the inference backward coefficients kernel", stream);
}

}  // namespace batchnorm::cuda
