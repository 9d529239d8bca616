// Canonical loop layouts. Any strided input plus a set of feature axes (and optional ghost
// batching) becomes two loop nests: "stat" dims, whose row-major index names a statistic
// (ghost group g, feature c) as g * C + c, and "reduced" dims summed over. Adjacent dims that
// are contiguous together in every operand are merged, so NHWC lands on one (rows, C) loop and
// NCHW on (N, C, H*W); anything else stays a general strided nest.
#pragma once

#include <cstdint>

#include "batchnorm/batchnorm.hpp"
#include "core/config.hpp"

namespace batchnorm::detail {

inline constexpr int kMaxOperands = 4;
inline constexpr int kMaxLoopDims = kMaxRank + 1;

struct LoopDim {
  std::int64_t size = 1;
  std::int64_t stride[kMaxOperands] = {};
};

// Loop dims, outermost first.
struct LoopNest {
  int count = 0;
  LoopDim dims[kMaxLoopDims];

  BATCHNORM_HD std::int64_t total() const {
    std::int64_t n = 1;
    for (int i = 0; i < count; ++i) n *= dims[i].size;
    return n;
  }

  // Element offsets for operand `op` of the row-major linear index over dims [0, end).
  BATCHNORM_HD std::int64_t offset(std::int64_t index, int op, int end) const {
    std::int64_t result = 0;
    for (int i = end - 1; i >= 0; --i) {
      const std::int64_t size = dims[i].size;
      result += (index % size) * dims[i].stride[op];
      index /= size;
    }
    return result;
  }
};

struct Plan {
  LoopNest stat;
  LoopNest reduced;
  int operands = 0;
  std::int64_t groups = 1;
  std::int64_t features = 1;
  // Row mode: the innermost stat dim is unit-stride in every data operand (and constant in the
  // mask), so kernels vectorize across features. Otherwise the innermost reduced dim is the
  // inner run (plane mode).
  bool row = false;
};

// Operand strides are given per original axis. `mask_operand` (or -1) names the operand that is
// a mask (stride 0 on feature axes); it does not need unit stride for row mode.
Plan make_plan(const TensorRef& shape_source, std::uint32_t feature_axes, std::int64_t groups,
               const TensorRef* const* operands, int operand_count, int mask_operand);

// Work split into fixed-size chunks that depend only on the shape, never on the thread count:
// the key to bitwise-reproducible reductions.
struct Chunking {
  std::int64_t per_chunk = 1;
  std::int64_t chunks = 0;
};

inline constexpr std::int64_t kChunkElements = 16384;
inline constexpr std::int64_t kMaxChunks = 64;

// `min_per_chunk`: the fewest units a chunk may hold (where a chunk's own cost, per statistic,
// must be spread over enough units), unless that leaves more than kMaxChunks chunks.
inline Chunking make_chunking(std::int64_t units, std::int64_t elements_per_unit,
                              std::int64_t min_per_chunk = 1) {
  Chunking c;
  if (units <= 0) return c;
  const std::int64_t per_unit = elements_per_unit > 0 ? elements_per_unit : 1;
  c.per_chunk = kChunkElements / per_unit > 1 ? kChunkElements / per_unit : 1;
  if (c.per_chunk < min_per_chunk) c.per_chunk = min_per_chunk;
  c.chunks = (units + c.per_chunk - 1) / c.per_chunk;
  if (c.chunks > kMaxChunks) c.chunks = kMaxChunks;
  // Chunks of equal size (within a unit): a short last chunk left a team's threads uneven shares
  // ((784, 64) rows made chunks of 256, 256, 256 and 16 rows: 512 rows for one of two threads, 272
  // for the other), where equal ones give each thread the same share wherever the count of
  // chunks is a multiple of the threads.
  const std::int64_t balanced = (units + c.chunks - 1) / c.chunks;
  if (balanced >= min_per_chunk) c.per_chunk = balanced;
  c.chunks = (units + c.per_chunk - 1) / c.per_chunk;
  return c;
}

// Steps through the row-major multi-index of the dims [0, end) of a nest, keeping one element
// offset per operand, without a division per step.
struct NestWalker {
  const LoopNest* nest;
  int end;
  int operands;
  std::int64_t index[kMaxLoopDims] = {};
  std::int64_t offset[kMaxOperands] = {};

  NestWalker(const LoopNest& n, int end_dim, int operand_count, std::int64_t start)
      : nest(&n), end(end_dim), operands(operand_count) {
    for (int i = end - 1; i >= 0; --i) {
      const std::int64_t size = n.dims[i].size;
      index[i] = start % size;
      start /= size;
      for (int op = 0; op < operands; ++op) offset[op] += index[i] * n.dims[i].stride[op];
    }
  }

  void next() {
    for (int i = end - 1; i >= 0; --i) {
      const LoopDim& d = nest->dims[i];
      for (int op = 0; op < operands; ++op) offset[op] += d.stride[op];
      if (++index[i] < d.size) return;
      for (int op = 0; op < operands; ++op) offset[op] -= d.stride[op] * d.size;
      index[i] = 0;
    }
  }
};

}  // namespace batchnorm::detail
