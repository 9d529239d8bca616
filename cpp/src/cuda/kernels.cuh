// CUDA kernels of the batchnorm backend, templated on the storage type T and the vector width
// V (elements a thread takes at a time, one vector load where aligned; 1 for strided data). They
// walk a Plan (core/layout.hpp) cut into blocks by a Geometry (cuda/launch.hpp). Reductions
// accumulate in float64 per thread from shifted sums, merge in a fixed tree inside the block, and
// the chunks of a statistic merge in chunk order in a second kernel: no floating-point atomics, so
// every result is bitwise identical from run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/half.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"
#include "cuda/launch.hpp"

namespace batchnorm::cuda {

using detail::LoopDim;
using detail::LoopNest;

// V consecutive elements moved by one load or store instruction.
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V consecutive elements: one vector load or store where the operands are `aligned` to the
// vector's size (launch.hpp: vector_bytes), else V scalar ones. The grouping into V elements, and
// so the order of every sum, is the same either way: the same data at another offset gives the same
// bits.
template <class T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* at, bool aligned) {
  if constexpr (V == 1) {
    return *reinterpret_cast<const Pack<T, V>*>(at);
  } else {
    if (aligned) return *reinterpret_cast<const Pack<T, V>*>(at);
    Pack<T, V> pack;
#pragma unroll
    for (int v = 0; v < V; ++v) pack.v[v] = at[v];
    return pack;
  }
}

template <class T, int V>
__device__ __forceinline__ void store_pack(T* at, const Pack<T, V>& pack, bool aligned) {
  if constexpr (V == 1) {
    *at = pack.v[0];
  } else if (aligned) {
    constexpr int kWords = sizeof(Pack<T, V>) / sizeof(unsigned);
    static_assert(kWords == 2 || kWords == 4, "a vector is 8 or 16 bytes");
    unsigned words[kWords];
    memcpy(words, &pack, sizeof words);
#if defined(__CUDA_ARCH__)
    // One vector store, spelled out: left to the compiler, the row kernels' stores of a Pack
    // came out as V scalar stores.
    if constexpr (kWords == 4) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(at), "r"(words[0]),
                   "r"(words[1]), "r"(words[2]), "r"(words[3])
                   : "memory");
    } else {
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(at), "r"(words[0]), "r"(words[1])
                   : "memory");
    }
#else
    memcpy(at, words, sizeof words);
#endif
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) at[v] = pack.v[v];
  }
}

// Element offsets of the first Ops operands for the row-major index `index` over the dims
// [0, end) of a nest. A single dim (the common case once contiguous dims are merged) costs a
// multiply; deeper nests pay one 64-bit division per dim.
template <int Ops>
__device__ __forceinline__ void offsets_of(const LoopNest& nest, std::int64_t index, int end,
                                           std::int64_t (&out)[Ops]) {
  if (end == 1) {
#pragma unroll
    for (int op = 0; op < Ops; ++op) out[op] = index * nest.dims[0].stride[op];
    return;
  }
#pragma unroll
  for (int op = 0; op < Ops; ++op) out[op] = 0;
  for (int d = end - 1; d >= 0; --d) {
    const std::int64_t size = nest.dims[d].size;
    const std::int64_t quotient = index / size;
    const std::int64_t i = index - quotient * size;
#pragma unroll
    for (int op = 0; op < Ops; ++op) out[op] += i * nest.dims[d].stride[op];
    index = quotient;
  }
}

// offsets_of for the per-load index of a walk: a kernel for a flat walk (at most one dim,
// Geometry::flat) multiplies and nothing else. A 64-bit division is a subroutine call whose
// saved registers spilled the wide kernels, so nests that need one get kernels of their own.
template <bool Flat, int Ops>
__device__ __forceinline__ void walk_offsets(const LoopNest& nest, std::int64_t index, int end,
                                             std::int64_t (&out)[Ops]) {
  if constexpr (Flat) {
#pragma unroll
    for (int op = 0; op < Ops; ++op) out[op] = end == 0 ? 0 : index * nest.dims[0].stride[op];
  } else {
    offsets_of(nest, index, end, out);
  }
}

// Row mode: the block's outer item, column tile and row chunk, and this thread's column.
struct RowBlock {
  std::int64_t item, chunk, column, first_row, end_row;
  bool active;

  __device__ explicit RowBlock(const Geometry& geo) {
    const std::int64_t block = blockIdx.x;
    chunk = block % geo.chunks;
    const std::int64_t rest = block / geo.chunks;
    item = rest / geo.tiles;
    column = (rest % geo.tiles) * geo.tile_x + threadIdx.x;
    active = column < geo.columns;
    first_row = chunk * geo.per_chunk + threadIdx.y;
    const std::int64_t end = (chunk + 1) * geo.per_chunk;
    end_row = end < geo.rows ? end : geo.rows;
  }
};

// Plane mode: walks this thread's positions (in units of V elements) inside the block's chunk
// of one statistic, keeping (run, position in run) without a division per step.
template <int V>
struct PlaneCursor {
  std::int64_t stat, index, end, unit, position, run_vectors, step_units, step_positions;

  __device__ explicit PlaneCursor(const Geometry& geo) {
    const std::int64_t block = blockIdx.x;
    const std::int64_t chunk = block % geo.chunks;
    stat = block / geo.chunks;
    run_vectors = geo.run / V;
    const std::int64_t total = geo.units * run_vectors;
    const std::int64_t per_chunk = geo.per_chunk / V;
    index = chunk * per_chunk + threadIdx.x;
    const std::int64_t chunk_end = (chunk + 1) * per_chunk;
    end = chunk_end < total ? chunk_end : total;
    unit = index / run_vectors;
    position = index - unit * run_vectors;
    step_units = blockDim.x / run_vectors;
    step_positions = blockDim.x - step_units * run_vectors;
  }

  __device__ bool valid() const { return index < end; }

  __device__ void next() {
    index += blockDim.x;
    unit += step_units;
    position += step_positions;
    if (position >= run_vectors) {
      position -= run_vectors;
      ++unit;
    }
  }
};

// ---- block merges (fixed trees: the same pairing on every run) --------------------------------

__device__ __forceinline__ void merge_sums(detail::Moments& into, const detail::Moments& other) {
  detail::merge_into(into, other);
}

__device__ __forceinline__ void merge_sums(Sums& into, const Sums& other) {
  into.dy += other.dy;
  into.dy_centered += other.dy_centered;
}

// Merges the values of the threads sharing threadIdx.x (all threads for a 1-D block); the
// result is valid in the threads with threadIdx.y == 0. blockDim.y must be a power of two.
template <class P>
__device__ P merge_over_rows(P value, P* shared) {
  const int x = threadIdx.x, y = threadIdx.y, width = blockDim.x;
  shared[y * width + x] = value;
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (y < half) merge_sums(shared[y * width + x], shared[(y + half) * width + x]);
    __syncthreads();
  }
  value = shared[x];
  __syncthreads();  // the caller may reuse `shared` right away
  return value;
}

// Same over a 1-D block; the result is valid in thread 0. blockDim.x must be a power of two.
template <class P>
__device__ P merge_over_block(P value, P* shared) {
  const int x = threadIdx.x;
  shared[x] = value;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (x < half) merge_sums(shared[x], shared[x + half]);
    __syncthreads();
  }
  return shared[0];
}

// ---- batched walks -----------------------------------------------------------------------------

// Vector loads a thread issues before it uses any: a dependent use right after each load would
// leave one load in flight per warp, too few to cover memory latency. A kernel that reads two
// operands walks kLoadsInFlight / 2 positions at a time; more would not fit the registers of
// kMinBlocks resident blocks.
inline constexpr int kLoadsInFlight = 4;

// Row mode: calls load(u, row) for the next Batch rows of this thread (it returns whether the
// row takes part), then use(u) for each taking part, in row order.
template <int Batch, class Load, class Use>
__device__ __forceinline__ void for_each_row(const RowBlock& b, Load&& load, Use&& use) {
  const std::int64_t step = blockDim.y;
  for (std::int64_t r = b.first_row; r < b.end_row; r += Batch * step) {
    bool taken[Batch];
#pragma unroll
    for (int u = 0; u < Batch; ++u) {
      const std::int64_t row = r + u * step;
      taken[u] = row < b.end_row && load(u, row);
    }
#pragma unroll
    for (int u = 0; u < Batch; ++u) {
      if (taken[u]) use(u);
    }
  }
}

// Plane mode: the same over the cursor's positions; load(u, unit, position).
template <int Batch, int V, class Load, class Use>
__device__ __forceinline__ void for_each_position(PlaneCursor<V>& cursor, Load&& load, Use&& use) {
  while (cursor.valid()) {
    bool taken[Batch];
#pragma unroll
    for (int u = 0; u < Batch; ++u) {
      taken[u] = cursor.valid() && load(u, cursor.unit, cursor.position);
      cursor.next();
    }
#pragma unroll
    for (int u = 0; u < Batch; ++u) {
      if (taken[u]) use(u);
    }
  }
}

// ---- statistics ------------------------------------------------------------------------------

// Shifted float64 sums of one thread: the shift is the thread's first valid value, so the sums
// stay small and the variance exact even when the mean dwarfs the spread.
struct ShiftedSums {
  double count = 0.0, shift = 0.0, sum = 0.0, squares = 0.0;

  __device__ void add(double value) {
    if (count == 0.0) shift = value;
    const double d = value - shift;
    sum += d;
    squares += d * d;
    count += 1.0;
  }
  __device__ detail::Moments moments() const {
    return detail::moments_from_shifted_sums(count, shift, sum, squares);
  }
};

template <class T, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    row_moments_kernel(Plan plan, Geometry geo, const T* __restrict__ x,
                       const std::uint8_t* __restrict__ mask,
                       detail::Moments* __restrict__ partial) {
  __shared__ detail::Moments shared[kThreads];
  const RowBlock b(geo);
  std::int64_t base[2];
  offsets_of(plan.stat, b.item, plan.stat.count - 1, base);
  // Features of one row share a mask value, so all V lanes count the same rows. The shifts are
  // values of x, held in a type that represents them exactly in half the registers of a double.
  using Shift = std::conditional_t<sizeof(T) == 8, double, float>;
  double count = 0.0, sum[V], squares[V];
  Shift shift[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    shift[v] = Shift(0);
    sum[v] = squares[v] = 0.0;
  }
  if (b.active) {
    const T* column = x + base[0] + b.column * V;
    Pack<T, V> p[kLoadsInFlight];
    for_each_row<kLoadsInFlight>(
        b,
        [&](int u, std::int64_t row) {
          std::int64_t at[2];
          walk_offsets<Flat>(plan.reduced, row, plan.reduced.count, at);
          if (mask && !mask[base[1] + at[1]]) return false;
          p[u] = load_pack<T, V>(column + at[0], geo.aligned);
          return true;
        },
        [&](int u) {
          if (count == 0.0) {
#pragma unroll
            for (int v = 0; v < V; ++v) shift[v] = detail::load<Shift>(p[u].v[v]);
          }
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const double d = detail::load<double>(p[u].v[v]) - static_cast<double>(shift[v]);
            sum[v] += d;
            squares[v] += d * d;
          }
          count += 1.0;
        });
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const detail::Moments merged = merge_over_rows(
        detail::moments_from_shifted_sums(count, static_cast<double>(shift[v]), sum[v], squares[v]),
        shared);
    if (threadIdx.y == 0 && b.active) {
      const std::int64_t stat = b.item * geo.inner + b.column * V + v;
      partial[stat * geo.chunks + b.chunk] = merged;
    }
  }
}

template <class T, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    plane_moments_kernel(Plan plan, Geometry geo, const T* __restrict__ x,
                         const std::uint8_t* __restrict__ mask,
                         detail::Moments* __restrict__ partial) {
  __shared__ detail::Moments shared[kThreads];
  PlaneCursor<V> cursor(geo);
  const std::int64_t stat = cursor.stat;
  std::int64_t base[2];
  offsets_of(plan.stat, stat, plan.stat.count, base);
  const LoopDim& last = plan.reduced.dims[plan.reduced.count - 1];
  ShiftedSums sums;
  Pack<T, V> p[kLoadsInFlight];
  for_each_position<kLoadsInFlight>(
      cursor,
      [&](int u, std::int64_t unit, std::int64_t position) {
        std::int64_t at[2];
        walk_offsets<Flat>(plan.reduced, unit, geo.unit_dims, at);
        const std::int64_t i = position * V;
        if constexpr (V == 1) {
          if (mask && !mask[base[1] + at[1] + i * last.stride[1]]) return false;
          p[u].v[0] = x[base[0] + at[0] + i * last.stride[0]];
        } else {  // vector path: unit stride and no mask (make_geometry guarantees both)
          p[u] = load_pack<T, V>(x + base[0] + at[0] + i, geo.aligned);
        }
        return true;
      },
      [&](int u) {
#pragma unroll
        for (int v = 0; v < V; ++v) sums.add(detail::load<double>(p[u].v[v]));
      });
  const detail::Moments merged = merge_over_block(sums.moments(), shared);
  if (threadIdx.x == 0) partial[stat * geo.chunks + (blockIdx.x % geo.chunks)] = merged;
}

// One warp per statistic: lanes merge chunks lane, lane + 32, ... in order, then a fixed
// shuffle tree merges the lanes.
__global__ void __launch_bounds__(kThreads)
    merge_moments_kernel(const detail::Moments* __restrict__ partial, std::int64_t stats,
                         std::int64_t chunks, double* __restrict__ count, double* __restrict__ mean,
                         double* __restrict__ var) {
  const std::int64_t stat = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (stat >= stats) return;  // whole warps leave together
  detail::Moments total;
  for (std::int64_t c = lane; c < chunks; c += 32) {
    detail::merge_into(total, partial[stat * chunks + c]);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const detail::Moments other{__shfl_down_sync(0xffffffffu, total.count, offset),
                                __shfl_down_sync(0xffffffffu, total.mean, offset),
                                __shfl_down_sync(0xffffffffu, total.m2, offset)};
    detail::merge_into(total, other);
  }
  if (lane == 0) {
    count[stat] = total.count;
    mean[stat] = total.mean;
    var[stat] = total.count > 0.0 ? total.m2 / total.count : 0.0;
  }
}

// ---- elementwise forward ---------------------------------------------------------------------

template <class T, class Acc, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    row_affine_kernel(Plan plan, Geometry geo, const T* __restrict__ x, T* __restrict__ y,
                      const Acc* __restrict__ shift, const Acc* __restrict__ scale,
                      const Acc* __restrict__ offset) {
  const RowBlock b(geo);
  if (!b.active) return;
  std::int64_t base[2];
  offsets_of(plan.stat, b.item, plan.stat.count - 1, base);
  const std::int64_t k = b.item * geo.inner + b.column * V;
  Acc m[V], a[V], o[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    m[v] = shift[k + v];
    a[v] = scale[k + v];
    o[v] = offset[k + v];
  }
  const T* in = x + base[0] + b.column * V;
  T* out = y + base[1] + b.column * V;
  Pack<T, V> p[kLoadsInFlight];
  std::int64_t to[kLoadsInFlight];
  for_each_row<kLoadsInFlight>(
      b,
      [&](int u, std::int64_t row) {
        std::int64_t at[2];
        walk_offsets<Flat>(plan.reduced, row, plan.reduced.count, at);
        p[u] = load_pack<T, V>(in + at[0], geo.aligned);
        to[u] = at[1];
        return true;
      },
      [&](int u) {
        Pack<T, V> q;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          q.v[v] = detail::store<T>((detail::load<Acc>(p[u].v[v]) - m[v]) * a[v] + o[v]);
        }
        store_pack<T, V>(out + to[u], q, geo.aligned);
      });
}

template <class T, class Acc, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    plane_affine_kernel(Plan plan, Geometry geo, const T* __restrict__ x, T* __restrict__ y,
                        const Acc* __restrict__ shift, const Acc* __restrict__ scale,
                        const Acc* __restrict__ offset) {
  PlaneCursor<V> cursor(geo);
  const std::int64_t stat = cursor.stat;
  std::int64_t base[2];
  offsets_of(plan.stat, stat, plan.stat.count, base);
  const LoopDim& last = plan.reduced.dims[plan.reduced.count - 1];
  const Acc m = shift[stat], a = scale[stat], o = offset[stat];
  Pack<T, V> p[kLoadsInFlight];
  std::int64_t to[kLoadsInFlight];
  for_each_position<kLoadsInFlight>(
      cursor,
      [&](int u, std::int64_t unit, std::int64_t position) {
        std::int64_t at[2];
        walk_offsets<Flat>(plan.reduced, unit, geo.unit_dims, at);
        const std::int64_t i = position * V;
        if constexpr (V == 1) {
          p[u].v[0] = x[base[0] + at[0] + i * last.stride[0]];
          to[u] = base[1] + at[1] + i * last.stride[1];
        } else {
          p[u] = load_pack<T, V>(x + base[0] + at[0] + i, geo.aligned);
          to[u] = base[1] + at[1] + i;
        }
        return true;
      },
      [&](int u) {
        Pack<T, V> q;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          q.v[v] = detail::store<T>((detail::load<Acc>(p[u].v[v]) - m) * a + o);
        }
        store_pack<T, V>(y + to[u], q, geo.aligned);
      });
}

// ---- backward --------------------------------------------------------------------------------

template <class T, class S, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    row_backward_sums_kernel(Plan plan, Geometry geo, const T* __restrict__ dy,
                             const T* __restrict__ x, const S* __restrict__ shift,
                             Sums* __restrict__ partial) {
  __shared__ Sums shared[kThreads];
  const RowBlock b(geo);
  std::int64_t base[2];
  offsets_of(plan.stat, b.item, plan.stat.count - 1, base);
  const std::int64_t k = b.item * geo.inner + b.column * V;
  S m[V];  // converted to double at each use: half the registers for float statistics
  double sum_dy[V], sum_dyx[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    m[v] = b.active ? shift[k + v] : S(0);
    sum_dy[v] = sum_dyx[v] = 0.0;
  }
  if (b.active) {
    const T* g = dy + base[0] + b.column * V;
    const T* in = x + base[1] + b.column * V;
    Pack<T, V> pg[kLoadsInFlight / 2], px[kLoadsInFlight / 2];
    for_each_row<kLoadsInFlight / 2>(
        b,
        [&](int u, std::int64_t row) {
          std::int64_t at[2];
          walk_offsets<Flat>(plan.reduced, row, plan.reduced.count, at);
          pg[u] = load_pack<T, V>(g + at[0], geo.aligned);
          px[u] = load_pack<T, V>(in + at[1], geo.aligned);
          return true;
        },
        [&](int u) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const double gd = detail::load<double>(pg[u].v[v]);
            sum_dy[v] += gd;
            sum_dyx[v] += gd * (detail::load<double>(px[u].v[v]) - static_cast<double>(m[v]));
          }
        });
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const Sums merged = merge_over_rows(Sums{sum_dy[v], sum_dyx[v]}, shared);
    if (threadIdx.y == 0 && b.active) partial[(k + v) * geo.chunks + b.chunk] = merged;
  }
}

template <class T, class S, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    plane_backward_sums_kernel(Plan plan, Geometry geo, const T* __restrict__ dy,
                               const T* __restrict__ x, const S* __restrict__ shift,
                               Sums* __restrict__ partial) {
  __shared__ Sums shared[kThreads];
  PlaneCursor<V> cursor(geo);
  const std::int64_t stat = cursor.stat;
  std::int64_t base[2];
  offsets_of(plan.stat, stat, plan.stat.count, base);
  const LoopDim& last = plan.reduced.dims[plan.reduced.count - 1];
  const double m = static_cast<double>(shift[stat]);
  Sums sums{0.0, 0.0};
  Pack<T, V> pg[kLoadsInFlight / 2], px[kLoadsInFlight / 2];
  for_each_position<kLoadsInFlight / 2>(
      cursor,
      [&](int u, std::int64_t unit, std::int64_t position) {
        std::int64_t at[2];
        walk_offsets<Flat>(plan.reduced, unit, geo.unit_dims, at);
        const std::int64_t i = position * V;
        if constexpr (V == 1) {
          pg[u].v[0] = dy[base[0] + at[0] + i * last.stride[0]];
          px[u].v[0] = x[base[1] + at[1] + i * last.stride[1]];
        } else {
          pg[u] = load_pack<T, V>(dy + base[0] + at[0] + i, geo.aligned);
          px[u] = load_pack<T, V>(x + base[1] + at[1] + i, geo.aligned);
        }
        return true;
      },
      [&](int u) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const double gd = detail::load<double>(pg[u].v[v]);
          sums.dy += gd;
          sums.dy_centered += gd * (detail::load<double>(px[u].v[v]) - m);
        }
      });
  const Sums merged = merge_over_block(sums, shared);
  if (threadIdx.x == 0) partial[stat * geo.chunks + (blockIdx.x % geo.chunks)] = merged;
}

__global__ void __launch_bounds__(kThreads)
    merge_sums_kernel(const Sums* __restrict__ partial, std::int64_t stats, std::int64_t chunks,
                      double* __restrict__ sum_dy, double* __restrict__ sum_dy_centered) {
  const std::int64_t stat = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (stat >= stats) return;
  Sums total{0.0, 0.0};
  for (std::int64_t c = lane; c < chunks; c += 32) merge_sums(total, partial[stat * chunks + c]);
  for (int offset = 16; offset > 0; offset /= 2) {
    total.dy += __shfl_down_sync(0xffffffffu, total.dy, offset);
    total.dy_centered += __shfl_down_sync(0xffffffffu, total.dy_centered, offset);
  }
  if (lane == 0) {
    sum_dy[stat] = total.dy;
    sum_dy_centered[stat] = total.dy_centered;
  }
}

template <class T, class Acc, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    row_backward_dx_kernel(Plan plan, Geometry geo, const T* __restrict__ dy,
                           const T* __restrict__ x, const std::uint8_t* __restrict__ mask,
                           T* __restrict__ dx, Coefficients<Acc> k) {
  const RowBlock b(geo);
  if (!b.active) return;
  std::int64_t base[4];
  offsets_of(plan.stat, b.item, plan.stat.count - 1, base);
  const std::int64_t s = b.item * geo.inner + b.column * V;
  Acc m[V], a[V], slope[V], o[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    m[v] = k.shift[s + v];
    a[v] = k.scale[s + v];
    slope[v] = k.slope[s + v];
    o[v] = k.offset[s + v];
  }
  const T* g = dy + base[0] + b.column * V;
  const T* in = x + base[1] + b.column * V;
  T* out = dx + base[2] + b.column * V;
  Pack<T, V> pg[kLoadsInFlight / 2], px[kLoadsInFlight / 2];
  std::int64_t to[kLoadsInFlight / 2];
  bool valid[kLoadsInFlight / 2];
  for_each_row<kLoadsInFlight / 2>(
      b,
      [&](int u, std::int64_t row) {
        std::int64_t at[4];
        walk_offsets<Flat>(plan.reduced, row, plan.reduced.count, at);
        valid[u] = !mask || mask[base[3] + at[3]];
        pg[u] = load_pack<T, V>(g + at[0], geo.aligned);
        if (valid[u]) px[u] = load_pack<T, V>(in + at[1], geo.aligned);
        to[u] = at[2];
        return true;
      },
      [&](int u) {
        Pack<T, V> q;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          Acc value = detail::load<Acc>(pg[u].v[v]);
          if (valid[u]) value -= o[v] + (detail::load<Acc>(px[u].v[v]) - m[v]) * slope[v];
          q.v[v] = detail::store<T>(a[v] * value);
        }
        store_pack<T, V>(out + to[u], q, geo.aligned);
      });
}

template <class T, class Acc, int V, bool Flat>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    plane_backward_dx_kernel(Plan plan, Geometry geo, const T* __restrict__ dy,
                             const T* __restrict__ x, const std::uint8_t* __restrict__ mask,
                             T* __restrict__ dx, Coefficients<Acc> k) {
  PlaneCursor<V> cursor(geo);
  const std::int64_t s = cursor.stat;
  std::int64_t base[4];
  offsets_of(plan.stat, s, plan.stat.count, base);
  const LoopDim& last = plan.reduced.dims[plan.reduced.count - 1];
  const Acc m = k.shift[s], a = k.scale[s], slope = k.slope[s], o = k.offset[s];
  Pack<T, V> pg[kLoadsInFlight / 2], px[kLoadsInFlight / 2];
  std::int64_t to[kLoadsInFlight / 2];
  bool valid[kLoadsInFlight / 2];
  for_each_position<kLoadsInFlight / 2>(
      cursor,
      [&](int u, std::int64_t unit, std::int64_t position) {
        std::int64_t at[4];
        walk_offsets<Flat>(plan.reduced, unit, geo.unit_dims, at);
        const std::int64_t i = position * V;
        if constexpr (V == 1) {
          valid[u] = !mask || mask[base[3] + at[3] + i * last.stride[3]];
          pg[u].v[0] = dy[base[0] + at[0] + i * last.stride[0]];
          if (valid[u]) px[u].v[0] = x[base[1] + at[1] + i * last.stride[1]];
          to[u] = base[2] + at[2] + i * last.stride[2];
        } else {  // no mask on the vector path
          valid[u] = true;
          pg[u] = load_pack<T, V>(dy + base[0] + at[0] + i, geo.aligned);
          px[u] = load_pack<T, V>(x + base[1] + at[1] + i, geo.aligned);
          to[u] = base[2] + at[2] + i;
        }
        return true;
      },
      [&](int u) {
        Pack<T, V> q;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          Acc value = detail::load<Acc>(pg[u].v[v]);
          if (valid[u]) value -= o + (detail::load<Acc>(px[u].v[v]) - m) * slope;
          q.v[v] = detail::store<T>(a * value);
        }
        store_pack<T, V>(dx + to[u], q, geo.aligned);
      });
}

// ---- per-feature coefficients (one thread per feature) -----------------------------------------

__device__ __forceinline__ std::int64_t feature_index() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <class W>
__global__ void train_coefficients_kernel(std::int64_t features, std::int64_t groups,
                                          detail::TrainScalars scalars, detail::GroupStats stats,
                                          detail::WeightPtrs<W> weights, Coefficients<W> out) {
  const std::int64_t c = feature_index();
  if (c < features) detail::train_feature<W, W>(c, features, groups, scalars, stats, weights, out);
}

// The two halves of train_feature, for synchronized statistics: the ghost-group sums go through
// the host's communicator between them.
__global__ void group_statistics_kernel(std::int64_t features, std::int64_t groups, double epsilon,
                                        detail::GroupStats stats, detail::GhostSums* ghost) {
  const std::int64_t c = feature_index();
  if (c < features) ghost[c] = detail::group_statistics(c, features, groups, epsilon, stats);
}

template <class W>
__global__ void feature_coefficients_kernel(std::int64_t features, std::int64_t groups,
                                            detail::TrainScalars scalars, detail::GroupStats stats,
                                            const detail::GhostSums* ghost,
                                            detail::WeightPtrs<W> weights, Coefficients<W> out) {
  const std::int64_t c = feature_index();
  if (c < features) {
    detail::feature_coefficients<W, W>(c, features, groups, scalars, stats, ghost[c], weights, out);
  }
}

template <class W>
__global__ void inference_coefficients_kernel(std::int64_t features, double epsilon,
                                              detail::WeightPtrs<W> weights, Coefficients<W> out) {
  const std::int64_t c = feature_index();
  if (c < features) detail::inference_feature<W, W>(c, epsilon, weights, out);
}

template <class W>
__global__ void train_backward_coefficients_kernel(std::int64_t features, std::int64_t groups,
                                                   const double* count, const double* mean,
                                                   const double* inv_std, const double* zscale,
                                                   const double* zshift, const W* gamma,
                                                   detail::BackwardSums sums, W* dgamma, W* dbeta,
                                                   Coefficients<W> out) {
  const std::int64_t c = feature_index();
  if (c >= features) return;
  detail::train_backward_feature<W, W>(c, features, groups, count, mean, inv_std, zscale, zshift,
                                       gamma, sums, dgamma, dbeta, out);
}

// The two halves of train_backward_feature, for synchronized ghost batches: the per-feature
// parameter sums go through the host's communicator between them.
template <class W>
__global__ void backward_coefficients_kernel(std::int64_t features, std::int64_t groups,
                                             const double* count, const double* mean,
                                             const double* inv_std, const double* zscale,
                                             const W* gamma, detail::BackwardSums sums,
                                             detail::ParameterSums* totals, Coefficients<W> out) {
  const std::int64_t c = feature_index();
  if (c >= features) return;
  totals[c] = detail::backward_coefficients<W, W>(c, features, groups, count, mean, inv_std, zscale,
                                                  gamma, sums, out);
}

template <class W>
__global__ void parameter_gradients_kernel(std::int64_t features, const double* zscale,
                                           const double* zshift,
                                           const detail::ParameterSums* totals, W* dgamma,
                                           W* dbeta) {
  const std::int64_t c = feature_index();
  if (c < features) detail::parameter_gradients<W>(c, zscale, zshift, totals[c], dgamma, dbeta);
}

template <class W>
__global__ void inference_backward_coefficients_kernel(std::int64_t features, double epsilon,
                                                       detail::WeightPtrs<W> weights,
                                                       detail::BackwardSums sums, W* dgamma,
                                                       W* dbeta, Coefficients<W> out) {
  const std::int64_t c = feature_index();
  if (c >= features) return;
  detail::inference_backward_feature<W, W>(c, epsilon, weights, sums, dgamma, dbeta, out);
}

}  // namespace batchnorm::cuda
