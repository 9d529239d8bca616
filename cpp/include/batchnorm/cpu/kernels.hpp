// OpenMP kernels of the CPU backend, templated on the storage type T. Each kernel walks a Plan
// (detail/layout.hpp) in fixed chunks: row mode vectorizes across the contiguous features,
// plane mode along the contiguous reduced run. Reductions accumulate in float64 per chunk and
// are merged in chunk order, so the result never depends on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "batchnorm/detail/half.hpp"
#include "batchnorm/detail/layout.hpp"
#include "batchnorm/detail/math.hpp"

namespace batchnorm::cpu {

using detail::Chunking;
using detail::LoopDim;
using detail::LoopNest;
using detail::Moments;
using detail::NestWalker;
using detail::Plan;

// Lanes of independent accumulators: lets the compiler vectorize float64 sums without
// reassociating (and so without changing) the summation order.
inline constexpr int kLanes = 8;

// Geometry shared by the kernels: which chunks exist and how work items map onto them.
struct Geometry {
  std::int64_t inner = 1;  // row mode: features per row; plane mode: 1
  std::int64_t outer = 1;  // stat items: stat count / inner
  std::int64_t run = 1;    // plane mode: inner reduced run length; row mode: 1
  std::int64_t units = 0;  // rows (row mode) or outer reduced indices (plane mode)
  int unit_dims = 0;       // reduced dims walked per unit
  Chunking chunking;

  explicit Geometry(const Plan& plan) {
    const LoopNest& stat = plan.stat;
    const LoopNest& red = plan.reduced;
    if (plan.row) {
      inner = stat.dims[stat.count - 1].size;
      outer = stat.total() / std::max<std::int64_t>(inner, 1);
      units = red.total();
      unit_dims = red.count;
    } else {
      outer = stat.total();
      run = red.dims[red.count - 1].size;
      units = run > 0 ? red.total() / run : 0;
      unit_dims = red.count - 1;
    }
    chunking = detail::make_chunking(units, inner * run);
  }

  std::int64_t items() const { return outer * chunking.chunks; }
  std::int64_t first_unit(std::int64_t chunk) const { return chunk * chunking.per_chunk; }
  std::int64_t last_unit(std::int64_t chunk) const {
    return std::min(units, (chunk + 1) * chunking.per_chunk);
  }
};

// Offsets of stat item `item` (row mode: outer stat dims only) for every operand.
inline void stat_offsets(const Plan& plan, std::int64_t item, std::int64_t* offsets) {
  const int end = plan.row ? plan.stat.count - 1 : plan.stat.count;
  for (int op = 0; op < plan.operands; ++op) offsets[op] = plan.stat.offset(item, op, end);
}

template <class T>
inline double as_double(T value) {
  return detail::load<double>(value);
}

// Shifted float64 sums of one contiguous-or-strided run, optionally masked.
template <class T>
inline void accumulate_run(const T* x, std::int64_t stride, const std::uint8_t* mask,
                           std::int64_t mask_stride, std::int64_t n, double shift, double* sum,
                           double* squares, double& count) {
  std::int64_t i = 0;
  if (!mask && stride == 1) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const double d = as_double(x[i + l]) - shift;
        sum[l] += d;
        squares[l] += d * d;
      }
    }
    for (; i < n; ++i) {
      const double d = as_double(x[i]) - shift;
      sum[0] += d;
      squares[0] += d * d;
    }
    count += static_cast<double>(n);
    return;
  }
  for (; i < n; ++i) {
    if (mask && !mask[i * mask_stride]) continue;
    const double d = as_double(x[i * stride]) - shift;
    sum[0] += d;
    squares[0] += d * d;
    count += 1.0;
  }
}

inline double sum_lanes(const double* lanes) {
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Batch moments per statistic: count, mean and biased variance (operands: x, mask).
template <class T>
void moments(const Plan& plan, const T* x, const std::uint8_t* mask, double* count, double* mean,
             double* var) {
  const Geometry geo(plan);
  const std::int64_t stats = geo.outer * geo.inner;
  const std::int64_t chunks = geo.chunking.chunks;
  std::vector<Moments> partial(static_cast<std::size_t>(stats * chunks));
  const LoopNest& red = plan.reduced;
  const LoopDim& last = red.dims[red.count - 1];

#pragma omp parallel
  {
    std::vector<double> scratch(plan.row ? static_cast<std::size_t>(3 * geo.inner) : 0);
#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < geo.items(); ++item) {
      const std::int64_t so = item / chunks, chunk = item % chunks;
      std::int64_t base[detail::kMaxOperands];
      stat_offsets(plan, so, base);
      const std::int64_t u0 = geo.first_unit(chunk), u1 = geo.last_unit(chunk);
      NestWalker walk(red, geo.unit_dims, plan.operands, u0);
      if (plan.row) {
        const std::int64_t ci_count = geo.inner;
        const std::int64_t xs = plan.stat.dims[plan.stat.count - 1].stride[0];
        double* shift = scratch.data();
        double* sum = shift + ci_count;
        double* squares = sum + ci_count;
        std::fill(sum, sum + 2 * ci_count, 0.0);
        double rows = 0.0;
        bool shifted = false;
        for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
          if (mask && !mask[base[1] + walk.offset[1]]) continue;
          const T* row = x + base[0] + walk.offset[0];
          if (!shifted) {
            for (std::int64_t c = 0; c < ci_count; ++c) shift[c] = as_double(row[c * xs]);
            shifted = true;
          }
          if (xs == 1) {
            for (std::int64_t c = 0; c < ci_count; ++c) {
              const double d = as_double(row[c]) - shift[c];
              sum[c] += d;
              squares[c] += d * d;
            }
          } else {
            for (std::int64_t c = 0; c < ci_count; ++c) {
              const double d = as_double(row[c * xs]) - shift[c];
              sum[c] += d;
              squares[c] += d * d;
            }
          }
          rows += 1.0;
        }
        for (std::int64_t c = 0; c < ci_count; ++c) {
          partial[static_cast<std::size_t>((so * ci_count + c) * chunks + chunk)] =
              detail::moments_from_shifted_sums(rows, shifted ? shift[c] : 0.0, sum[c], squares[c]);
        }
      } else {
        double sum[kLanes] = {}, squares[kLanes] = {};
        double n = 0.0, shift = 0.0;
        bool shifted = false;
        for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
          const T* run = x + base[0] + walk.offset[0];
          const std::uint8_t* run_mask = mask ? mask + base[1] + walk.offset[1] : nullptr;
          if (!shifted) {
            for (std::int64_t i = 0; i < geo.run && !shifted; ++i) {
              if (run_mask && !run_mask[i * last.stride[1]]) continue;
              shift = as_double(run[i * last.stride[0]]);
              shifted = true;
            }
          }
          accumulate_run(run, last.stride[0], run_mask, last.stride[1], geo.run, shift, sum,
                         squares, n);
        }
        partial[static_cast<std::size_t>(so * chunks + chunk)] =
            detail::moments_from_shifted_sums(n, shift, sum_lanes(sum), sum_lanes(squares));
      }
    }
  }

  for (std::int64_t k = 0; k < stats; ++k) {
    Moments total;
    for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
      detail::merge_into(total, partial[static_cast<std::size_t>(k * chunks + chunk)]);
    }
    count[k] = total.count;
    mean[k] = total.mean;
    var[k] = total.count > 0.0 ? total.m2 / total.count : 0.0;
  }
}

// out = (in - shift) * scale + offset per statistic (operands: in, out).
template <class T, class Acc>
void affine(const Plan& plan, const T* in, T* out, const Acc* shift, const Acc* scale,
            const Acc* offset) {
  const Geometry geo(plan);
  const std::int64_t chunks = geo.chunking.chunks;
  const LoopNest& red = plan.reduced;
  const LoopDim& last = red.dims[red.count - 1];
#pragma omp parallel for schedule(static)
  for (std::int64_t item = 0; item < geo.items(); ++item) {
    const std::int64_t so = item / chunks, chunk = item % chunks;
    std::int64_t base[detail::kMaxOperands];
    stat_offsets(plan, so, base);
    const std::int64_t u0 = geo.first_unit(chunk), u1 = geo.last_unit(chunk);
    NestWalker walk(red, geo.unit_dims, plan.operands, u0);
    if (plan.row) {
      const std::int64_t n = geo.inner;
      const LoopDim& features = plan.stat.dims[plan.stat.count - 1];
      const Acc* m = shift + so * n;
      const Acc* a = scale + so * n;
      const Acc* b = offset + so * n;
      for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
        const T* src = in + base[0] + walk.offset[0];
        T* dst = out + base[1] + walk.offset[1];
        if (features.stride[0] == 1 && features.stride[1] == 1) {
          for (std::int64_t c = 0; c < n; ++c) {
            dst[c] = detail::store<T>((detail::load<Acc>(src[c]) - m[c]) * a[c] + b[c]);
          }
        } else {
          for (std::int64_t c = 0; c < n; ++c) {
            dst[c * features.stride[1]] = detail::store<T>(
                (detail::load<Acc>(src[c * features.stride[0]]) - m[c]) * a[c] + b[c]);
          }
        }
      }
    } else {
      const Acc m = shift[so], a = scale[so], b = offset[so];
      const std::int64_t n = geo.run, xs = last.stride[0], ys = last.stride[1];
      for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
        const T* src = in + base[0] + walk.offset[0];
        T* dst = out + base[1] + walk.offset[1];
        if (xs == 1 && ys == 1) {
          for (std::int64_t i = 0; i < n; ++i) {
            dst[i] = detail::store<T>((detail::load<Acc>(src[i]) - m) * a + b);
          }
        } else {
          for (std::int64_t i = 0; i < n; ++i) {
            dst[i * ys] = detail::store<T>((detail::load<Acc>(src[i * xs]) - m) * a + b);
          }
        }
      }
    }
  }
}

// Per statistic, over every position: sum(dy) and sum(dy * (x - shift)) (operands: dy, x).
template <class T>
void backward_sums(const Plan& plan, const T* dy, const T* x, const double* shift, double* sum_dy,
                   double* sum_dy_centered) {
  const Geometry geo(plan);
  const std::int64_t stats = geo.outer * geo.inner;
  const std::int64_t chunks = geo.chunking.chunks;
  std::vector<double> partial(static_cast<std::size_t>(2 * stats * chunks));
  const LoopNest& red = plan.reduced;
  const LoopDim& last = red.dims[red.count - 1];

#pragma omp parallel
  {
    std::vector<double> scratch(plan.row ? static_cast<std::size_t>(2 * geo.inner) : 0);
#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < geo.items(); ++item) {
      const std::int64_t so = item / chunks, chunk = item % chunks;
      std::int64_t base[detail::kMaxOperands];
      stat_offsets(plan, so, base);
      const std::int64_t u0 = geo.first_unit(chunk), u1 = geo.last_unit(chunk);
      NestWalker walk(red, geo.unit_dims, plan.operands, u0);
      if (plan.row) {
        const std::int64_t n = geo.inner;
        const LoopDim& features = plan.stat.dims[plan.stat.count - 1];
        const double* m = shift + so * n;
        double* s_dy = scratch.data();
        double* s_dyx = s_dy + n;
        std::fill(s_dy, s_dy + 2 * n, 0.0);
        for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
          const T* g = dy + base[0] + walk.offset[0];
          const T* v = x + base[1] + walk.offset[1];
          if (features.stride[0] == 1 && features.stride[1] == 1) {
            for (std::int64_t c = 0; c < n; ++c) {
              const double gd = as_double(g[c]);
              s_dy[c] += gd;
              s_dyx[c] += gd * (as_double(v[c]) - m[c]);
            }
          } else {
            for (std::int64_t c = 0; c < n; ++c) {
              const double gd = as_double(g[c * features.stride[0]]);
              s_dy[c] += gd;
              s_dyx[c] += gd * (as_double(v[c * features.stride[1]]) - m[c]);
            }
          }
        }
        for (std::int64_t c = 0; c < n; ++c) {
          const std::size_t at = static_cast<std::size_t>(2 * ((so * n + c) * chunks + chunk));
          partial[at] = s_dy[c];
          partial[at + 1] = s_dyx[c];
        }
      } else {
        double s_dy[kLanes] = {}, s_dyx[kLanes] = {};
        const double m = shift[so];
        const std::int64_t n = geo.run, gs = last.stride[0], xs = last.stride[1];
        for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
          const T* g = dy + base[0] + walk.offset[0];
          const T* v = x + base[1] + walk.offset[1];
          std::int64_t i = 0;
          if (gs == 1 && xs == 1) {
            for (; i + kLanes <= n; i += kLanes) {
              for (int l = 0; l < kLanes; ++l) {
                const double gd = as_double(g[i + l]);
                s_dy[l] += gd;
                s_dyx[l] += gd * (as_double(v[i + l]) - m);
              }
            }
          }
          for (; i < n; ++i) {
            const double gd = as_double(g[i * gs]);
            s_dy[0] += gd;
            s_dyx[0] += gd * (as_double(v[i * xs]) - m);
          }
        }
        const std::size_t at = static_cast<std::size_t>(2 * (so * chunks + chunk));
        partial[at] = sum_lanes(s_dy);
        partial[at + 1] = sum_lanes(s_dyx);
      }
    }
  }

  for (std::int64_t k = 0; k < stats; ++k) {
    double total_dy = 0.0, total_dyx = 0.0;
    for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
      const std::size_t at = static_cast<std::size_t>(2 * (k * chunks + chunk));
      total_dy += partial[at];
      total_dyx += partial[at + 1];
    }
    sum_dy[k] = total_dy;
    sum_dy_centered[k] = total_dyx;
  }
}

// dx = scale * (dy - valid * (offset + (x - shift) * slope)) (operands: dy, x, dx, mask).
template <class T, class Acc>
void backward_dx(const Plan& plan, const T* dy, const T* x, const std::uint8_t* mask, T* dx,
                 const detail::Coefficients<Acc>& k) {
  const Geometry geo(plan);
  const std::int64_t chunks = geo.chunking.chunks;
  const LoopNest& red = plan.reduced;
  const LoopDim& last = red.dims[red.count - 1];
#pragma omp parallel for schedule(static)
  for (std::int64_t item = 0; item < geo.items(); ++item) {
    const std::int64_t so = item / chunks, chunk = item % chunks;
    std::int64_t base[detail::kMaxOperands];
    stat_offsets(plan, so, base);
    const std::int64_t u0 = geo.first_unit(chunk), u1 = geo.last_unit(chunk);
    NestWalker walk(red, geo.unit_dims, plan.operands, u0);
    if (plan.row) {
      const std::int64_t n = geo.inner;
      const LoopDim& f = plan.stat.dims[plan.stat.count - 1];
      const Acc* m = k.shift + so * n;
      const Acc* a = k.scale + so * n;
      const Acc* b = k.slope + so * n;
      const Acc* o = k.offset + so * n;
      for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
        const T* g = dy + base[0] + walk.offset[0];
        const T* v = x + base[1] + walk.offset[1];
        T* out = dx + base[2] + walk.offset[2];
        const bool valid = !mask || mask[base[3] + walk.offset[3]];
        if (valid) {
          for (std::int64_t c = 0; c < n; ++c) {
            const Acc gd = detail::load<Acc>(g[c * f.stride[0]]);
            const Acc xc = detail::load<Acc>(v[c * f.stride[1]]) - m[c];
            out[c * f.stride[2]] = detail::store<T>(a[c] * (gd - (o[c] + xc * b[c])));
          }
        } else {
          for (std::int64_t c = 0; c < n; ++c) {
            out[c * f.stride[2]] = detail::store<T>(detail::load<Acc>(g[c * f.stride[0]]) * a[c]);
          }
        }
      }
    } else {
      const Acc m = k.shift[so], a = k.scale[so], b = k.slope[so], o = k.offset[so];
      const std::int64_t n = geo.run;
      const std::int64_t gs = last.stride[0], xs = last.stride[1], ds = last.stride[2];
      const std::int64_t ms = mask ? last.stride[3] : 0;
      for (std::int64_t u = u0; u < u1; ++u, walk.next()) {
        const T* g = dy + base[0] + walk.offset[0];
        const T* v = x + base[1] + walk.offset[1];
        T* out = dx + base[2] + walk.offset[2];
        if (!mask && gs == 1 && xs == 1 && ds == 1) {
          for (std::int64_t i = 0; i < n; ++i) {
            const Acc xc = detail::load<Acc>(v[i]) - m;
            out[i] = detail::store<T>(a * (detail::load<Acc>(g[i]) - (o + xc * b)));
          }
          continue;
        }
        const std::uint8_t* valid = mask ? mask + base[3] + walk.offset[3] : nullptr;
        for (std::int64_t i = 0; i < n; ++i) {
          Acc value = detail::load<Acc>(g[i * gs]);
          if (!valid || valid[i * ms]) value -= o + (detail::load<Acc>(v[i * xs]) - m) * b;
          out[i * ds] = detail::store<T>(a * value);
        }
      }
    }
  }
}

}  // namespace batchnorm::cpu
