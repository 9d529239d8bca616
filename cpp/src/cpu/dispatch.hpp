// Run-time choice of the CPU instruction set and the table of chunk kernels compiled for it. The
// kernels are built once per instruction set (cpp/src/cpu/isa_*.cpp), so the library never needs
// the build machine's CPU; the widest set this CPU and OS support is picked on first use.
#pragma once

#include <cstdint>

#include "core/elements.hpp"
#include "core/half.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"

// x86-64 with GCC: AVX2 and AVX-512 kernels are compiled next to the baseline (target pragmas).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BATCHNORM_CPU_X86 1
#else
#define BATCHNORM_CPU_X86 0
#endif

namespace batchnorm::cpu {

enum class Isa : std::uint8_t { baseline, avx2, avx512 };

const char* isa_name(Isa isa);

// The widest instruction set this CPU supports, lowered (never raised) by the environment
// variable BATCHNORM_CPU_ISA = baseline | avx2 | avx512. Decided once per process.
Isa active_isa();

// The threads a call may use: OpenMP's maximum team size (1 in builds without OpenMP).
int max_threads();

// Whether the rows of a row-mode plan lie back to back, `features` elements apart along the
// innermost reduced dim, in each of the first `data_operands` operands.
inline bool rows_back_to_back(const detail::LoopNest& red, std::int64_t features,
                              int data_operands) {
  if (red.count == 0) return false;
  const detail::LoopDim& inner = red.dims[red.count - 1];
  for (int op = 0; op < data_operands; ++op) {
    if (inner.stride[op] != features) return false;
  }
  return true;
}

// Folded coefficients: forward out = (in - shift) * scale + offset; backward
// dx = scale * (dy - valid * (offset + (x - shift) * slope)). P is a value (plane mode: one
// statistic) or an array (row mode: entry i belongs to feature i mod C, for i < C + 16, so a
// block of 16 lanes starting at any feature reads its coefficients contiguously).
template <class P>
struct AffineCoefficients {
  P shift, scale, offset;
};
template <class P>
struct DxCoefficients {
  P shift, scale, slope, offset;
};

// A block of consecutive statistics of a plane layout: `count` of them (at most kMaxBlockItems
// for the reductions), `step[op]` elements apart in operand op (the innermost stat dim's strides).
inline constexpr std::int64_t kMaxBlockItems = 64;
// Blocks of short runs cover about this many elements per unit: a stretch of ~12 KB of float32
// per sample, long enough to stream, small enough that a block stays in L2 between passes.
inline constexpr std::int64_t kBlockSpan = 3200;
struct ItemBlock {
  std::int64_t count = 1;
  std::int64_t step[detail::kMaxOperands] = {};
};

// Serial kernels over one chunk of a Plan (core/layout.hpp). Pointers are at the base of the
// first statistic of the block (plane mode) or of the outer statistic item (row mode) in every
// operand; units are the outer reduced indices [u0, u1) (plane mode: runs of the innermost
// reduced dim; row mode: rows of C contiguous features). Per-statistic arrays (coefficients,
// shifts, results) start at the block's first statistic. Sums use 16 float64 lanes per statistic,
// summed by a fixed tree, so a chunk's result depends on its data only; `stream` asks for
// non-temporal output stores.
template <class T>
struct ChunkKernels {
  using A = detail::compute_t<T>;
  using Plan = detail::Plan;
  using Index = std::int64_t;

  // Moments of the valid elements, shifted by the chunk's first valid element (operands: x, mask).
  void (*plane_moments)(const Plan& plan, const T* x, const std::uint8_t* mask, ItemBlock items,
                        Index u0, Index u1, detail::Moments* out);
  // y = (x - shift) * scale + offset (operands: x, y).
  void (*plane_affine)(const Plan& plan, const T* x, T* y, ItemBlock items,
                       AffineCoefficients<const A*> k, Index u0, Index u1, bool stream);
  // sums[2j] = sum(dy), sums[2j + 1] = sum(dy * (x - shift[j])) over every position (operands:
  // dy, x).
  void (*plane_sums)(const Plan& plan, const T* dy, const T* x, ItemBlock items,
                     const double* shift, Index u0, Index u1, double* sums);
  // dx with a per-element mask or none (operands: dy, x, dx, mask).
  void (*plane_dx)(const Plan& plan, const T* dy, const T* x, T* dx, const std::uint8_t* mask,
                   ItemBlock items, DxCoefficients<const A*> k, Index u0, Index u1, bool stream);

  // Per-feature moments of the valid rows into mean[C] and m2[C] (sums of squared deviations);
  // returns the number of valid rows. `scratch` holds 3 * C doubles (operands: x, mask).
  Index (*row_moments)(const Plan& plan, const T* x, const std::uint8_t* mask, Index u0, Index u1,
                       double* scratch, double* mean, double* m2);
  void (*row_affine)(const Plan& plan, const T* x, T* y, AffineCoefficients<const A*> k, Index u0,
                     Index u1, bool stream);
  // Per-feature sum(dy) and sum(dy * (x - shift)) into sum_dy[C], sum_dy_centered[C].
  void (*row_sums)(const Plan& plan, const T* dy, const T* x, const double* shift, Index u0,
                   Index u1, double* sum_dy, double* sum_dy_centered);
  // dx with a per-row mask or none (operands: dy, x, dx, mask).
  void (*row_dx)(const Plan& plan, const T* dy, const T* x, T* dx, const std::uint8_t* mask,
                 DxCoefficients<const A*> k, Index u0, Index u1, bool stream);

  // The per-feature coefficients of the common calls, every feature in one loop
  // (cpu/coefficients.hpp): a training forward with one group, no renorm and no adjustment
  // (with the moving-statistics update), an inference, a training backward with one group. The
  // forward ones return false where a scale may need the per-feature path's split.
  bool (*plain_train_coefficients)(Index features, const detail::TrainScalars& s,
                                   detail::GroupStats stats, detail::WeightPtrs<A> w,
                                   detail::Coefficients<A> out);
  bool (*inference_coefficients)(Index features, double epsilon, detail::WeightPtrs<A> w,
                                 detail::Coefficients<A> out);
  void (*backward_coefficients)(Index features, const double* count, const double* mean,
                                const double* inv_std, const double* zscale, const double* zshift,
                                const A* gamma, detail::BackwardSums sums, A* dgamma, A* dbeta,
                                detail::Coefficients<A> out);
  // Chan's merge of a chunk's moments into the running ones of n features, the weights given:
  // delta = chunk_mean - mean; mean += delta * mean_weight; m2 += chunk_m2 + delta^2 * m2_weight.
  void (*merge_moments)(const double* chunk_mean, const double* chunk_m2, double mean_weight,
                        double m2_weight, double* mean, double* m2, Index n);
};

// The chunk kernels of every element type for one instruction set, ChunkKernels<T> being the
// base of type T.
template <class List>
struct KernelTable;
template <class... Es>
struct KernelTable<detail::TypeList<Es...>> : ChunkKernels<typename Es::type>... {};
using KernelSet = KernelTable<detail::Elements>;

const KernelSet& baseline_kernels();
#if BATCHNORM_CPU_X86
const KernelSet& avx2_kernels();
const KernelSet& avx512_kernels();
#endif

const KernelSet& active_kernels();

template <class T>
const ChunkKernels<T>& kernels() {
  return active_kernels();
}

}  // namespace batchnorm::cpu
