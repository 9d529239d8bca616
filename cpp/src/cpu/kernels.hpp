// The parallel passes of the CPU backend, templated on the storage type T: OpenMP loops that hand
// fixed chunks of a Plan (core/layout.hpp) to the vectorized chunk kernels of the instruction
// set picked at run time (cpu/dispatch.hpp). Chunks depend on the shape only, and their partial
// results merge in chunk order, so every result is bitwise the same for any number of threads.
// Plane layouts also have fused passes that finish a feature while its data is in cache.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "core/half.hpp"
#include "core/layout.hpp"
#include "core/math.hpp"
#include "cpu/dispatch.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace batchnorm::cpu {

using detail::Chunking;
using detail::LoopNest;
using detail::Moments;
using detail::Plan;
using Index = std::int64_t;

// Row-mode chunks hold at least this many rows (see Geometry).
inline constexpr Index kMinChunkRows = 16;
// Row-mode merges take this many features per job.
inline constexpr Index kMergeColumns = 256;
// A pass gets one thread per this many elements, so a call below twice this runs on the calling
// thread and no team is started or left spinning for it, and a mid-sized call does not wake every
// core of a large machine. On 2 cores, two threads beat one from about 50K elements
// ((16, 7, 7, 64), (128, 1024), (32, 64, 8, 8)).
inline constexpr Index kElementsPerThread = Index{1} << 14;
// A lone row normalize pass (an inference call) costs less per element than the other passes,
// about 0.3 cycles in cache, so its team pays only where, in whole chunks, the busiest thread's
// share is at least this many elements per thread past the first below the whole pass. On 2
// cores, one thread against two:
// (32, 1024) 4.2 against 4.9 us, (48, 1024) 5.6 against 6.2 (three chunks: two for one thread),
// (16, 7, 7, 64) 4.1 against 3.4, (256, 256) 5.7 against 4.4.
inline constexpr Index kRowNormalizeSaving = 24576;
// Outputs at least this large are written with non-temporal stores: they would not stay in cache
// anyway, and bypassing it saves the read-for-ownership and keeps the input cached.
inline constexpr Index kStreamBytes = Index{16} << 20;

// Whether an elementwise pass over `elements` values of T writes with non-temporal stores.
template <class T>
inline bool streams(Index elements) {
  return elements * Index{sizeof(T)} >= kStreamBytes;
}

// Calls of the CPU backend running now, in any thread of the process.
inline std::atomic<int> calls_in_flight{0};
// The threads the calling thread's current call may use: its share of the cores.
inline thread_local int call_threads = 1;

// Held for the duration of a call: concurrent calls (from several Python threads, say) split the
// cores between them instead of each starting a full team. A call's share is fixed when it starts
// (one that started alone keeps its full team), so N calls use at most max_threads times
// 1 + 1/2 + ... + 1/N threads: about twice the cores for four calls, not four times.
class CallShare {
 public:
  CallShare() {
    const int calls = calls_in_flight.fetch_add(1, std::memory_order_relaxed) + 1;
    call_threads = std::max(1, max_threads() / calls);
  }
  ~CallShare() { calls_in_flight.fetch_sub(1, std::memory_order_relaxed); }
  CallShare(const CallShare&) = delete;
  CallShare& operator=(const CallShare&) = delete;

 private:
};

// Threads for a pass over `elements`: one per kElementsPerThread, at most the call's share.
inline int team_size(Index elements) {
  return static_cast<int>(std::clamp<Index>(elements / kElementsPerThread, 1, call_threads));
}

// team_size, but no more threads than work items to share.
inline int team_for(Index elements, Index work_items) {
  return static_cast<int>(std::min<Index>(team_size(elements), std::max<Index>(work_items, 1)));
}

// Threads for a lone row normalize pass of `items` chunks: at most `team`, fewer where the busiest
// thread's whole chunks would save too little of the pass (kRowNormalizeSaving).
inline int row_normalize_team(Index elements, Index items, int team) {
  const Index per_item = elements / std::max<Index>(items, 1);
  for (; team > 1; --team) {
    const Index share = (items + team - 1) / team * per_item;
    if (elements - share >= (team - 1) * kRowNormalizeSaving) break;
  }
  return team;
}

// The loops of a parallel region (parallel_region): each shares its iterations among the region's
// threads, with a barrier at its end, or runs them all where the region has one thread.
class SharedLoops {
 public:
  explicit SharedLoops(bool team) : team_(team) {}
  // Iterations handed out one at a time as threads become free (work of uneven cost).
  template <class Body>
  void dynamic(Index n, Body&& body) const {
    if (team_) {
#pragma omp for schedule(dynamic)
      for (Index i = 0; i < n; ++i) body(i);
    } else {
      for (Index i = 0; i < n; ++i) body(i);
    }
  }
  // Which way a thread walks its share in `fixed`.
  enum class Order { in_order, last_first };
  // Iterations split into contiguous shares, one per thread, the same for the same n and team
  // size; each thread runs body(i) over its own share in `order`. Row passes over the same chunks
  // one after the other get, on each thread, the chunks its core read, in one stretch of memory.
  // Handed out as threads became free, on 2 cores (C++ API, calls in a loop) the row cases took
  // up to 1.3x this time ((64, 28, 28, 256) backward 4.89 against 3.81 ms, (64, 128, 1024)
  // training 1.98 against 1.54 ms). The plane passes keep `dynamic`: with fixed shares,
  // (256, 2048, 7, 7) NCHW backward fell from 77-88% to 64-67% of batchnorm-bench's copy probe.
  template <class Body>
  void fixed(Index n, Body&& body, Order order = Order::in_order) const {
    Index first = 0, last = n;
    if (team_) {
      const Index threads = omp_get_num_threads(), t = omp_get_thread_num();
      first = n * t / threads;
      last = n * (t + 1) / threads;
    }
    if (order == Order::last_first) {
      for (Index i = last; i-- > first;) body(i);
    } else {
      for (Index i = first; i < last; ++i) body(i);
    }
    if (team_) {
#pragma omp barrier
    }
  }

 private:
  bool team_;
};

// Runs region(loops) once on each of `threads` threads. One thread runs it directly, outside any
// OpenMP construct: libgomp starts a team for a parallel region even where its `if` clause is
// false, and wakes a futex (a system call) when it ends, about 0.4 us a region, a tenth of a small
// call. (The loops of a one-thread region are plain loops, not orphaned worksharing constructs,
// which would bind to a parallel region of the caller's if there were one.)
template <class Region>
void parallel_region(int threads, Region&& region) {
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    region(SharedLoops(true));
  } else {
    region(SharedLoops(false));
  }
}

// body(i) for every i in [0, n) on `threads` threads (at most n), handed out dynamically.
template <class Body>
void parallel_for(int threads, Index n, Body&& body) {
  const int team = static_cast<int>(std::min<Index>(threads, std::max<Index>(n, 1)));
  parallel_region(team, [&](const SharedLoops& loops) { loops.dynamic(n, body); });
}

// Geometry shared by the passes: which chunks exist and how work items map onto them.
struct Geometry {
  Index inner = 1;  // row mode: features per row; plane mode: 1
  Index outer = 1;  // stat items: stat count / inner
  Index run = 1;    // plane mode: inner reduced run length; row mode: 1
  Index units = 0;  // rows (row mode) or outer reduced indices (plane mode)
  Chunking chunking;

  explicit Geometry(const Plan& plan) {
    const LoopNest& stat = plan.stat;
    const LoopNest& red = plan.reduced;
    if (plan.row) {
      inner = stat.dims[stat.count - 1].size;
      outer = stat.total() / std::max<Index>(inner, 1);
      units = red.total();
    } else {
      outer = stat.total();
      run = red.dims[red.count - 1].size;
      units = run > 0 ? red.total() / run : 0;
    }
    // A row chunk starts its per-feature sums from a shift and ends in per-feature moments
    // and a merge (~20 operations a feature): at least kMinChunkRows rows keep that a small
    // share of a chunk's work, where wide rows would leave a chunk only a row or two.
    chunking = detail::make_chunking(units, inner * run, plan.row ? kMinChunkRows : 1);
  }

  Index chunks() const { return chunking.chunks; }
  Index items() const { return outer * chunking.chunks; }
  // Threads for a row pass: team_size, but no more than there are items (chunks) to share. A
  // few long rows are one chunk ((16, 2048) is one chunk of 16 rows), where a second thread only
  // cost its start ((16, 2048) inference on two threads: 1.3x the time of one).
  int team() const { return team_for(elements(), items()); }
  Index elements() const { return outer * inner * units * run; }
  Index first_unit(Index chunk) const { return chunk * chunking.per_chunk; }
  Index last_unit(Index chunk) const { return std::min(units, (chunk + 1) * chunking.per_chunk); }
};

// Element offset of stat item `item` (row mode: outer stat dims only) in operand `op`.
inline Index stat_offset(const Plan& plan, Index item, int op) {
  return plan.stat.offset(item, op, plan.row ? plan.stat.count - 1 : plan.stat.count);
}

template <class P>
inline P* at_offset(P* base, Index offset) {
  return base ? base + offset : nullptr;
}

inline std::size_t size(Index n) { return static_cast<std::size_t>(n); }

// A thread's scratch memory for the partial results of its calls, kept between calls. A training
// loop needs the same sizes at every step, and for wide rows a fresh allocation each call cost
// more than the call's arithmetic: the C library gave the memory back to the system at each free
// and took page faults to get it again ((1, 4096) training: 122 us against 36 us). Memory is
// handed out as a stack (released in the reverse order, as scoped buffers are); when a call's
// buffers did not fit in one block, the blocks become one block of their total size once the
// call has released them all. Up to kKeptScratchBytes stay with a thread between calls.
class Scratch {
 public:
  static constexpr std::size_t kKeptScratchBytes = std::size_t{4} << 20;

  static Scratch& of_this_thread() {
    thread_local Scratch scratch;
    return scratch;
  }

  void* acquire(std::size_t bytes) {
    bytes = rounded(bytes);
    if (blocks_.empty() || blocks_.back().used + bytes > blocks_.back().size) {
      const std::size_t last = blocks_.empty() ? 0 : blocks_.back().size;
      blocks_.push_back(Block::of(std::max(bytes, 2 * last)));
    }
    Block& block = blocks_.back();
    void* memory = block.start() + block.used;
    block.used += bytes;
    ++live_;
    return memory;
  }

  void release(std::size_t bytes) {
    bytes = rounded(bytes);
    // The block that holds the latest buffer is the last one with something in use.
    std::size_t b = blocks_.size() - 1;
    while (blocks_[b].used == 0) --b;
    blocks_[b].used -= bytes;
    if (--live_ > 0) return;
    std::size_t total = 0;
    for (const Block& block : blocks_) total += block.size;
    if (blocks_.size() > 1 || total > kKeptScratchBytes) {
      blocks_.clear();
      if (total <= kKeptScratchBytes) blocks_.push_back(Block::of(total));
    }
  }

 private:
  // Buffers start on a cache line (and suit any vector load).
  static constexpr std::size_t kAlign = 64;
  // Every buffer takes at least one line, so that the one in use last is always found.
  static std::size_t rounded(std::size_t bytes) {
    return (std::max<std::size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  }
  struct Block {
    std::unique_ptr<unsigned char[]> memory;
    std::size_t size = 0, used = 0;
    static Block of(std::size_t bytes) {
      return {std::unique_ptr<unsigned char[]>(new unsigned char[bytes + kAlign]), bytes, 0};
    }
    unsigned char* start() const {
      const auto address = reinterpret_cast<std::uintptr_t>(memory.get());
      return memory.get() + (kAlign - address % kAlign) % kAlign;
    }
  };
  std::vector<Block> blocks_;
  std::size_t live_ = 0;
};

// Partial results that a pass writes in full before they are read, left uninitialized (a
// std::vector would zero them first, and for wide rows they are large: a (128, 1024) training
// call's chunk moments are 128 KB, whose zeroing took a third of the call), in the scratch memory
// of the thread that makes the buffer, which must also be the one that ends it (a scoped local).
template <class V>
class PartialBuffer {
 public:
  explicit PartialBuffer(Index n)
      : bytes_(size(n) * sizeof(V)),
        values_(static_cast<V*>(Scratch::of_this_thread().acquire(bytes_))) {}
  ~PartialBuffer() { Scratch::of_this_thread().release(bytes_); }
  PartialBuffer(const PartialBuffer&) = delete;
  PartialBuffer& operator=(const PartialBuffer&) = delete;
  V* data() { return values_; }
  const V* data() const { return values_; }
  V& operator[](std::size_t i) { return values_[i]; }
  const V& operator[](std::size_t i) const { return values_[i]; }

 private:
  std::size_t bytes_;
  V* values_;
};

// Runs chunk(o, first_unit, last_unit) for each work item of a row-mode elementwise pass (outer
// statistic item o, a chunk of its rows): each thread takes the share of items whose statistics
// or sums it made (SharedLoops::fixed, as the reductions share them), the last first. The
// reduction read its share in order, so the items it read last may still be in that core's
// caches; starting from them reads those from cache instead of memory (on the profiled machine,
// reading 128 MB last chunk first right after reading it in order took 0.90-0.93x the time of a
// second in-order read). Elementwise results do not depend on the order.
template <class Chunk>
void row_chunks_last_first(const SharedLoops& loops, const Geometry& geo, Chunk&& chunk) {
  const Index chunks = geo.chunks();
  loops.fixed(
      geo.items(),
      [&](Index item) {
        const Index c = item % chunks;
        chunk(item / chunks, geo.first_unit(c), geo.last_unit(c));
      },
      SharedLoops::Order::last_first);
}

// Row-mode passes read each coefficient array kRowWrap entries past its C features, entry C + i
// being feature i mod C, so that a block of 16 lanes starting at any feature reads its
// coefficients contiguously.
inline constexpr Index kRowWrap = 16;

// The coefficient arrays of a row-mode pass as its kernels read them: per outer item, C +
// kRowWrap entries. With one outer item (every call without ghost batches) the caller's arrays,
// which have kRowWrap entries of room past their C, get those entries written in place; with
// several the arrays are copied into that layout.
template <class A, int N>
class RowCoefficients {
 public:
  // Laid out from `arrays`' values now, or (filled == false) only made ready for fill(), which
  // allocates nothing (for a parallel region that computes the coefficients first).
  RowCoefficients(A* const (&arrays)[N], Index outer, Index features, bool filled = true)
      : outer_(outer), features_(features), width_(features + kRowWrap) {
    if (outer > 1) copies_.resize(size(N * outer * width_));
    for (int i = 0; i < N; ++i) {
      base_[i] = outer > 1 ? copies_.data() + i * outer * width_ : arrays[i];
    }
    if (filled) fill(arrays);
  }
  // Lays out `arrays`' current values.
  void fill(A* const (&arrays)[N]) {
    for (int i = 0; i < N; ++i) {
      if (outer_ == 1) {
        for (Index j = features_; j < width_; ++j) arrays[i][j] = arrays[i][j - features_];
        continue;
      }
      for (Index o = 0; o < outer_; ++o) {
        A* row = copies_.data() + (i * outer_ + o) * width_;
        std::copy(arrays[i] + o * features_, arrays[i] + (o + 1) * features_, row);
        for (Index j = features_; j < width_; ++j) row[j] = row[j - features_];
      }
    }
  }
  // Whether fill() reads no entry outside [first, last) of the arrays: with one outer item it
  // only copies the first kRowWrap entries past the last, so the thread that computed a block
  // starting at 0 can fill at once, without a step of one thread between two barriers.
  bool fill_reads_only(Index first, Index last) const {
    return outer_ == 1 && first == 0 && last >= std::min(features_, kRowWrap);
  }
  // Array i at outer item o.
  const A* at(int i, Index o) const { return base_[i] + o * width_; }

 private:
  Index outer_, features_, width_;
  const A* base_[N];
  std::vector<A> copies_;
};

// Plane mode: statistics per block, so that a block's runs of one unit make a stretch of about
// kBlockSpan elements (long runs: one statistic per block).
inline Index items_per_block(const Geometry& geo) {
  return std::clamp<Index>(kBlockSpan / std::max<Index>(geo.run, 1), 1, kMaxBlockItems);
}

// The fused passes' blocks of features: as few as with items_per_block each, and the largest as
// small as that count allows, since each block is one thread's work ((32, 64, 8, 8) made blocks
// of 50 and 14 features, three quarters of the call for one of two threads).
inline Index even_block_items(const Geometry& geo, Index features) {
  const Index most = items_per_block(geo);
  const Index blocks = (features + most - 1) / most;
  return blocks > 0 ? (features + blocks - 1) / blocks : most;
}

// Calls f(first, block) for the statistics [k0, k1) in blocks of at most `per_block`, never
// across a row of the innermost stat dim (where the step between statistics changes).
template <class F>
void for_each_block(const Plan& plan, Index k0, Index k1, Index per_block, F&& f) {
  const detail::LoopDim& inner = plan.stat.dims[plan.stat.count - 1];
  ItemBlock block;
  for (int op = 0; op < plan.operands; ++op) block.step[op] = inner.stride[op];
  while (k0 < k1) {
    const Index row_end = (k0 / inner.size + 1) * inner.size;
    block.count = std::min({per_block, k1 - k0, row_end - k0});
    f(k0, block);
    k0 += block.count;
  }
}

struct Block {
  Index first;
  ItemBlock items;
};

// Elementwise plane passes: where the runs of a stat row lie back to back in every data operand
// (contiguous NCHW), each unit of a row is one long stretch, so work splits by units (about 64K
// elements per piece, and at least a piece per thread: (16, 64, 8, 8) made one piece, which left
// the second of two threads idle) instead of by statistics, and every thread streams
// sequentially.
struct RowPieces {
  Index rows = 0, width = 0, units_per_piece = 1, pieces = 0;
};

inline RowPieces row_pieces(const Plan& plan, const Geometry& geo, int data_operands, int threads) {
  const detail::LoopDim& inner = plan.stat.dims[plan.stat.count - 1];
  const detail::LoopDim& run = plan.reduced.dims[plan.reduced.count - 1];
  RowPieces p;
  if (inner.size < 2 || geo.run < 16) return p;
  for (int op = 0; op < data_operands; ++op) {
    if (run.stride[op] != 1 || inner.stride[op] != geo.run) return p;
  }
  p.width = inner.size;
  p.rows = geo.outer / inner.size;
  const Index per_thread = (geo.units + threads - 1) / threads;  // (threads >= 1)
  p.units_per_piece =
      std::max<Index>(1, std::min((Index{1} << 16) / (p.width * geo.run), per_thread));
  p.pieces = (geo.units + p.units_per_piece - 1) / p.units_per_piece;
  return p;
}

inline ItemBlock whole_row(const Plan& plan, Index width) {
  ItemBlock block;
  block.count = width;
  for (int op = 0; op < plan.operands; ++op) {
    block.step[op] = plan.stat.dims[plan.stat.count - 1].stride[op];
  }
  return block;
}

inline std::vector<Block> blocks_of(const Plan& plan, Index stats, Index per_block) {
  std::vector<Block> blocks;
  for_each_block(plan, 0, stats, per_block,
                 [&](Index first, const ItemBlock& items) { blocks.push_back({first, items}); });
  return blocks;
}

// Work split of an elementwise plane pass: whole stat rows in pieces of units where `pieces`
// applies (back-to-back runs), else blocks of statistics by chunks of units. Calls
// run(first statistic, items, first unit, end unit) for each piece of work, in parallel.
template <class Run>
void for_each_plane_piece(const Plan& plan, const Geometry& geo, const RowPieces& rp, int threads,
                          Run&& run) {
  if (rp.pieces > 0) {
    const ItemBlock row = whole_row(plan, rp.width);
    parallel_for(threads, rp.rows * rp.pieces, [&](Index item) {
      const Index first = item / rp.pieces * rp.width, u0 = item % rp.pieces * rp.units_per_piece;
      run(first, row, u0, std::min(geo.units, u0 + rp.units_per_piece));
    });
    return;
  }
  const Index chunks = geo.chunks();
  const std::vector<Block> blocks = blocks_of(plan, geo.outer, items_per_block(geo));
  const auto work = static_cast<Index>(blocks.size()) * chunks;
  parallel_for(threads, work, [&](Index item) {
    const Block& b = blocks[size(item / chunks)];
    const Index chunk = item % chunks;
    run(b.first, b.items, geo.first_unit(chunk), geo.last_unit(chunk));
  });
}

// Runs block(o, c0, c1) for each block of up to kMergeColumns columns [c0, c1) of each outer
// statistic item o of a row layout, split evenly among the region's threads (the merges of a
// row-mode reduction's chunks).
template <class Block>
void row_column_blocks(const SharedLoops& loops, const Geometry& geo, Block&& block) {
  const Index features = geo.inner;
  const Index column_blocks = (features + kMergeColumns - 1) / kMergeColumns;
  loops.fixed(geo.outer * column_blocks, [&](Index job) {
    const Index c0 = job % column_blocks * kMergeColumns;
    block(job / column_blocks, c0, std::min(features, c0 + kMergeColumns));
  });
}

// Chan's merge of a row-mode reduction's chunks for n columns, in chunk order, as
// detail::merge_into does it per statistic (a chunk has one count for all its features, so the
// weights are computed once per chunk): chunk j's count is chunk_count[j], its means and sums of
// squared deviations start at chunk_mean + j * pitch and chunk_m2 + j * pitch. Writes the
// columns' count, mean and biased variance.
template <class T>
void merge_row_chunks(const ChunkKernels<T>& kernels, const double* chunk_count,
                      const double* chunk_mean, const double* chunk_m2, Index pitch, Index chunks,
                      Index n, double* count, double* mean, double* var) {
  double total = 0.0;  // (var holds the sums of squared deviations until the end)
  for (Index chunk = 0; chunk < chunks; ++chunk) {
    const double weight = chunk_count[chunk];
    const double* means = chunk_mean + chunk * pitch;
    const double* m2 = chunk_m2 + chunk * pitch;
    if (weight == 0.0) continue;
    if (total == 0.0) {
      std::copy(means, means + n, mean);
      std::copy(m2, m2 + n, var);
      total = weight;
      continue;
    }
    const double merged = total + weight;
    kernels.merge_moments(means, m2, weight / merged, total * weight / merged, mean, var, n);
    total = merged;
  }
  for (Index c = 0; c < n; ++c) {
    count[c] = total;
    if (total == 0.0) mean[c] = 0.0;
    var[c] = total > 0.0 ? var[c] / total : 0.0;
  }
}

// The per-chunk partial moments of a row-mode statistics pass, in the scratch memory of the
// thread that makes them (the caller of the parallel region).
struct RowPartials {
  PartialBuffer<double> count, mean, m2;
  explicit RowPartials(const Geometry& geo)
      : count(geo.items()), mean(geo.items() * geo.inner), m2(geo.items() * geo.inner) {}
};

// The loops of a row-mode statistics pass within a parallel region: each chunk's moments (each
// thread its own share), then Chan's merge of the chunks per block of columns (a fixed loop), after
// which finished(first, last) runs on the thread that merged statistics [first, last): their
// count, mean and biased variance are final there.
template <class T, class Finished>
void row_moments_loops(const SharedLoops& loops, const Plan& plan, const Geometry& geo, const T* x,
                       const std::uint8_t* mask, RowPartials& part, double* count, double* mean,
                       double* var, Finished&& finished) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Index features = geo.inner, chunks = geo.chunks();
  PartialBuffer<double> scratch(3 * features);  // set from the first valid row
  loops.fixed(geo.items(), [&](Index item) {
    const Index o = item / chunks, chunk = item % chunks;
    part.count[size(item)] = static_cast<double>(kernels.row_moments(
        plan, x + stat_offset(plan, o, 0), at_offset(mask, mask ? stat_offset(plan, o, 1) : 0),
        geo.first_unit(chunk), geo.last_unit(chunk), scratch.data(),
        part.mean.data() + item * features, part.m2.data() + item * features));
  });
  row_column_blocks(loops, geo, [&](Index o, Index c0, Index c1) {
    const Index at = o * features + c0;
    const Index first_item = o * chunks;
    merge_row_chunks(kernels, part.count.data() + first_item,
                     part.mean.data() + first_item * features + c0,
                     part.m2.data() + first_item * features + c0, features, chunks, c1 - c0,
                     count + at, mean + at, var + at);
    finished(at, o * features + c1);
  });
}

// Batch moments per statistic: count, mean and biased variance (operands: x, mask).
template <class T>
void moments(const Plan& plan, const T* x, const std::uint8_t* mask, double* count, double* mean,
             double* var) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Geometry geo(plan);
  const Index stats = geo.outer * geo.inner, chunks = geo.chunks();
  if (plan.row) {
    RowPartials part(geo);
    parallel_region(geo.team(), [&](const SharedLoops& loops) {
      row_moments_loops(loops, plan, geo, x, mask, part, count, mean, var, [](Index, Index) {});
    });
    return;
  }
  const std::vector<Block> blocks = blocks_of(plan, stats, items_per_block(geo));
  const auto work = static_cast<Index>(blocks.size()) * chunks;
  std::vector<Moments> partial(size(stats * chunks));  // [chunk][statistic]
  parallel_region(team_for(geo.elements(), work), [&](const SharedLoops& loops) {
    loops.dynamic(work, [&](Index item) {
      const Block& b = blocks[size(item / chunks)];
      const Index chunk = item % chunks;
      kernels.plane_moments(plan, x + stat_offset(plan, b.first, 0),
                            at_offset(mask, mask ? stat_offset(plan, b.first, 1) : 0), b.items,
                            geo.first_unit(chunk), geo.last_unit(chunk),
                            partial.data() + chunk * stats + b.first);
    });
    loops.fixed(stats, [&](Index k) {
      Moments total;
      for (Index chunk = 0; chunk < chunks; ++chunk) {
        detail::merge_into(total, partial[size(chunk * stats + k)]);
      }
      count[k] = total.count;
      mean[k] = total.mean;
      var[k] = total.count > 0.0 ? total.m2 / total.count : 0.0;
    });
  });
}

// The loop of a row-mode normalize pass within a parallel region (the items read last by a
// statistics pass first).
template <class T, class Acc>
void row_affine_loop(const SharedLoops& loops, const Plan& plan, const Geometry& geo, const T* in,
                     T* out, const RowCoefficients<Acc, 3>& k) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const bool stream = streams<T>(geo.elements());
  row_chunks_last_first(loops, geo, [&](Index o, Index u0, Index u1) {
    kernels.row_affine(plan, in + stat_offset(plan, o, 0), out + stat_offset(plan, o, 1),
                       {k.at(0, o), k.at(1, o), k.at(2, o)}, u0, u1, stream);
  });
}

// out = (in - shift) * scale + offset per statistic (operands: in, out). Each array has
// kRowWrap entries of room past its statistics, which a row-mode pass may overwrite.
template <class T, class Acc>
void affine(const Plan& plan, const T* in, T* out, Acc* shift, Acc* scale, Acc* offset) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Geometry geo(plan);
  const bool stream = streams<T>(geo.elements());
  const int threads = team_size(geo.elements());
  if (plan.row) {
    const RowCoefficients<Acc, 3> k({shift, scale, offset}, geo.outer, geo.inner);
    const int team = row_normalize_team(geo.elements(), geo.items(), geo.team());
    parallel_region(
        team, [&](const SharedLoops& loops) { row_affine_loop(loops, plan, geo, in, out, k); });
    return;
  }
  for_each_plane_piece(plan, geo, row_pieces(plan, geo, 2, threads), threads,
                       [&](Index first, const ItemBlock& items, Index u0, Index u1) {
                         kernels.plane_affine(plan, in + stat_offset(plan, first, 0),
                                              out + stat_offset(plan, first, 1), items,
                                              {shift + first, scale + first, offset + first}, u0,
                                              u1, stream);
                       });
}

// The totals of a row-mode backward's chunk sums for n columns: chunk j's sums of dy start at
// partial + j * pitch, its sums of dy * (x - shift) `second` values later. Chunk by chunk across
// the columns, each column's sum in chunk order from zero: the same additions as column by
// column, but independent ones side by side (a column's chain of dependent additions took 15%
// of a (128, 1024) backward).
inline void add_row_chunk_sums(const double* partial, Index pitch, Index second, Index chunks,
                               Index n, double* total_dy, double* total_dyx) {
  std::fill(total_dy, total_dy + n, 0.0);
  std::fill(total_dyx, total_dyx + n, 0.0);
  for (Index chunk = 0; chunk < chunks; ++chunk) {
    const double* part = partial + chunk * pitch;
    for (Index c = 0; c < n; ++c) {
      total_dy[c] += part[c];
      total_dyx[c] += part[second + c];
    }
  }
}

// The loops of a row-mode backward sums pass within a parallel region: each chunk's sums into
// `partial` (2 * items * features values, [outer][chunk][sum][feature]; each thread its own share,
// `fixed`), then their totals in chunk order per block of columns (a fixed loop), after which
// finished(first, last) runs on the thread that added statistics [first, last).
template <class T, class Finished>
void row_sums_loops(const SharedLoops& loops, const Plan& plan, const Geometry& geo, const T* dy,
                    const T* x, const double* shift, double* partial, double* sum_dy,
                    double* sum_dy_centered, Finished&& finished) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Index width = geo.inner, chunks = geo.chunks();
  loops.fixed(geo.items(), [&](Index item) {
    const Index o = item / chunks, chunk = item % chunks;
    double* part = partial + 2 * item * width;
    kernels.row_sums(plan, dy + stat_offset(plan, o, 0), x + stat_offset(plan, o, 1),
                     shift + o * width, geo.first_unit(chunk), geo.last_unit(chunk), part,
                     part + width);
  });
  row_column_blocks(loops, geo, [&](Index o, Index c0, Index c1) {
    const Index at = o * width + c0;
    add_row_chunk_sums(partial + 2 * o * chunks * width + c0, 2 * width, width, chunks, c1 - c0,
                       sum_dy + at, sum_dy_centered + at);
    finished(at, o * width + c1);
  });
}

// Per statistic, over every position: sum(dy) and sum(dy * (x - shift)) (operands: dy, x).
template <class T>
void backward_sums(const Plan& plan, const T* dy, const T* x, const double* shift, double* sum_dy,
                   double* sum_dy_centered) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Geometry geo(plan);
  const Index stats = geo.outer * geo.inner, chunks = geo.chunks();
  if (plan.row) {
    PartialBuffer<double> partial(2 * geo.items() * geo.inner);
    parallel_region(geo.team(), [&](const SharedLoops& loops) {
      row_sums_loops(loops, plan, geo, dy, x, shift, partial.data(), sum_dy, sum_dy_centered,
                     [](Index, Index) {});
    });
    return;
  }
  const std::vector<Block> blocks = blocks_of(plan, stats, items_per_block(geo));
  const auto work = static_cast<Index>(blocks.size()) * chunks;
  PartialBuffer<double> partial(2 * stats * chunks);  // [chunk][statistic][sum]
  parallel_region(team_for(geo.elements(), work), [&](const SharedLoops& loops) {
    loops.dynamic(work, [&](Index item) {
      const Block& b = blocks[size(item / chunks)];
      const Index chunk = item % chunks;
      kernels.plane_sums(plan, dy + stat_offset(plan, b.first, 0),
                         x + stat_offset(plan, b.first, 1), b.items, shift + b.first,
                         geo.first_unit(chunk), geo.last_unit(chunk),
                         partial.data() + 2 * (chunk * stats + b.first));
    });
    loops.fixed(stats, [&](Index k) {
      double total_dy = 0.0, total_dyx = 0.0;
      for (Index chunk = 0; chunk < chunks; ++chunk) {
        total_dy += partial[size(2 * (chunk * stats + k))];
        total_dyx += partial[size(2 * (chunk * stats + k) + 1)];
      }
      sum_dy[k] = total_dy;
      sum_dy_centered[k] = total_dyx;
    });
  });
}

// The loop of a row-mode dx pass within a parallel region (the items read last by the sums
// pass first).
template <class T, class Acc>
void row_dx_loop(const SharedLoops& loops, const Plan& plan, const Geometry& geo, const T* dy,
                 const T* x, const std::uint8_t* mask, T* dx, const RowCoefficients<Acc, 4>& k) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const bool stream = streams<T>(geo.elements());
  row_chunks_last_first(loops, geo, [&](Index o, Index u0, Index u1) {
    kernels.row_dx(plan, dy + stat_offset(plan, o, 0), x + stat_offset(plan, o, 1),
                   dx + stat_offset(plan, o, 2),
                   at_offset(mask, mask ? stat_offset(plan, o, 3) : 0),
                   {k.at(0, o), k.at(1, o), k.at(2, o), k.at(3, o)}, u0, u1, stream);
  });
}

// dx = scale * (dy - valid * (offset + (x - shift) * slope)) (operands: dy, x, dx, mask). The
// arrays of k have kRowWrap entries of room, as affine's.
template <class T, class Acc>
void backward_dx(const Plan& plan, const T* dy, const T* x, const std::uint8_t* mask, T* dx,
                 const detail::Coefficients<Acc>& k) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Geometry geo(plan);
  const bool stream = streams<T>(geo.elements());
  const int threads = team_size(geo.elements());
  if (plan.row) {
    const RowCoefficients<Acc, 4> rows({k.shift, k.scale, k.slope, k.offset}, geo.outer, geo.inner);
    parallel_region(geo.team(), [&](const SharedLoops& loops) {
      row_dx_loop(loops, plan, geo, dy, x, mask, dx, rows);
    });
    return;
  }
  // Masked passes keep the blocks: the mask's runs are not back to back with the data's.
  for_each_plane_piece(plan, geo, mask ? RowPieces{} : row_pieces(plan, geo, 3, threads), threads,
                       [&](Index i, const ItemBlock& items, Index u0, Index u1) {
                         kernels.plane_dx(
                             plan, dy + stat_offset(plan, i, 0), x + stat_offset(plan, i, 1),
                             dx + stat_offset(plan, i, 2),
                             at_offset(mask, mask ? stat_offset(plan, i, 3) : 0), items,
                             {k.shift + i, k.scale + i, k.slope + i, k.offset + i}, u0, u1, stream);
                       });
}

// ---- row passes split by columns -----------------------------------------------------------

// A row-mode call whose data stay in the caches from one pass to the next (a loop of small calls)
// splits its features among the threads instead of its rows for its statistics or sums: each
// thread reduces its columns over every chunk, merges them and takes their coefficients, all in
// its own core's caches; the normalize and dx passes keep the row split (split by columns, each
// thread wrote half of every row, and the normalize pass took 1.5-3x the time). Split by rows, each
// block of columns merged the partial results of every chunk, half of them written moments before
// by the other core: a (128, 1024) training forward on two Zen 4 cores spent 14 us in its
// statistics, against 10 us where each thread merged only partial results of its own. The chunks,
// the row kernels (column_team keeps both splits on the generic ones) and the merge order are those
// of the row split, so results are bitwise the same. The split applies where every thread gets at
// least kMinSplitColumns features and where an operand holds at most kMaxSplitBytes per thread
// (beyond it the data come from memory anyway, where whole rows per thread stream better).
inline constexpr Index kMinSplitColumns = 256;
inline constexpr Index kMaxSplitBytes = Index{512} << 10;
// Column blocks start on a multiple of this many features: a multiple of the kernels' 16 lanes,
// so that a block's lanes and tail are the full row's.
inline constexpr Index kSplitAlign = 16;
// The fused row passes fill the coefficients' wrap from the first block of columns alone
// (RowCoefficients::fill_reads_only): both splits' first blocks must hold kRowWrap columns.
static_assert(kMergeColumns >= kRowWrap && kMinSplitColumns >= kRowWrap);

// Threads that split a row-mode call's features (one outer item, rows back to back in its
// `data_operands` data operands, `bytes` per data operand), or 0 where the call splits its rows.
// Rows back to back keep every column block on the generic row kernels, as the full rows are
// (at 512 features or more no row grouping applies): rows that overlap in memory (a strided
// view whose rows are a block's width apart) sent a block to the grouped kernels, whose order
// of additions differs.
inline int column_team(const Plan& plan, const Geometry& geo, int data_operands, Index bytes) {
  const int team = geo.team();
  if (team < 2 || geo.outer != 1 || geo.inner < team * kMinSplitColumns) return 0;
  if (!rows_back_to_back(plan.reduced, geo.inner, data_operands)) return 0;
  return bytes <= team * kMaxSplitBytes ? team : 0;
}

// The first feature of thread t's columns among `team` (t == team: the end).
inline Index split_column(Index features, int team, Index t) {
  if (t >= team) return features;
  return features / kSplitAlign * t / team * kSplitAlign;
}

// `plan` restricted to `width` features of each row: the kernels then read width values a row,
// the rows as far apart as before.
inline Plan column_plan(const Plan& plan, Index width) {
  Plan columns = plan;
  columns.stat.dims[columns.stat.count - 1].size = width;
  return columns;
}

// The statistics of a row-mode training forward split by columns among the region's `team`
// threads (column_team): each thread's chunk moments and their merge for its own columns, after
// which finished(first, last) runs on that thread for its columns [first, last). Ends with a
// barrier.
template <class T, class Finished>
void column_moments_loops(const SharedLoops& loops, const Plan& plan, const Geometry& geo, int team,
                          const T* x, const std::uint8_t* mask, double* count, double* mean,
                          double* var, Finished&& finished) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Index features = geo.inner, chunks = geo.chunks();
  loops.fixed(team, [&](Index t) {
    const Index c0 = split_column(features, team, t);
    const Index width = split_column(features, team, t + 1) - c0;
    const Plan columns = column_plan(plan, width);
    PartialBuffer<double> scratch(3 * width), chunk_mean(chunks * width), chunk_m2(chunks * width);
    double chunk_count[detail::kMaxChunks];
    for (Index chunk = 0; chunk < chunks; ++chunk) {
      chunk_count[chunk] = static_cast<double>(kernels.row_moments(
          columns, x + c0, mask, geo.first_unit(chunk), geo.last_unit(chunk), scratch.data(),
          chunk_mean.data() + chunk * width, chunk_m2.data() + chunk * width));
    }
    merge_row_chunks(kernels, chunk_count, chunk_mean.data(), chunk_m2.data(), width, chunks, width,
                     count + c0, mean + c0, var + c0);
    finished(c0, c0 + width);
  });
}

// The sums of a row-mode training backward split by columns among the region's `team` threads
// (column_team), as column_moments_loops splits the statistics.
template <class T, class Finished>
void column_sums_loops(const SharedLoops& loops, const Plan& plan, const Geometry& geo, int team,
                       const T* dy, const T* x, const double* shift, double* sum_dy,
                       double* sum_dy_centered, Finished&& finished) {
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Index features = geo.inner, chunks = geo.chunks();
  loops.fixed(team, [&](Index t) {
    const Index c0 = split_column(features, team, t);
    const Index width = split_column(features, team, t + 1) - c0;
    const Plan columns = column_plan(plan, width);
    PartialBuffer<double> partial(2 * chunks * width);
    for (Index chunk = 0; chunk < chunks; ++chunk) {
      double* part = partial.data() + 2 * chunk * width;
      kernels.row_sums(columns, dy + c0, x + c0, shift + c0, geo.first_unit(chunk),
                       geo.last_unit(chunk), part, part + width);
    }
    add_row_chunk_sums(partial.data(), 2 * width, width, chunks, width, sum_dy + c0,
                       sum_dy_centered + c0);
    finished(c0, c0 + width);
  });
}

// ---- fused row pass ------------------------------------------------------------------------

// Training forward on a row layout (of the statistics and the output alike) with one group, in
// one parallel region: the statistics (as
// `moments`), then each block of columns' coefficients and moving statistics as soon as its
// merge is done (coefficients(first, last) for statistics [first, last), false where one of
// their scales needs the split path), then the normalize pass (as `affine`) with the shift,
// scale and offset arrays in `k` (kRowWrap entries of room each). Separate passes start a
// second region and compute every coefficient on one thread while the others wait. Returns
// false where some block's coefficients returned false, having normalized nothing: the caller
// computes those statistics again and normalizes. Results are bitwise the separate passes'.
template <class T, class Acc, class BlockCoefficients>
bool train_rows_fused(const Plan& stats_plan, const Plan& apply_plan, const T* x, T* y,
                      const std::uint8_t* mask, double* count, double* mean, double* var,
                      Acc* const (&k)[3], BlockCoefficients&& coefficients) {
  const Geometry sg(stats_plan), ag(apply_plan);
  // Made here (for several outer items, a copy of every array), filled in the region once the
  // coefficients are known. Inside the region a thread takes only scratch of a few values a
  // feature (PartialBuffer), from memory it keeps from call to call.
  RowCoefficients<Acc, 3> rows(k, ag.outer, ag.inner, false);
  // With one outer item in both plans the thread that finishes the first block of columns fills
  // (every path's first block holds at least kRowWrap columns, or all of them). The statistics
  // plan can have several where the apply plan has one: a (B, T) mask of a (B, T, C) input
  // normalized over T and C keeps the statistics' T and C apart (the mask steps along T only),
  // while x and y merge them, and no block of C < kRowWrap columns holds what fill() reads.
  const bool fill_early = ag.outer == 1 && sg.outer == 1;
  std::atomic<bool> plain{true};
  const auto finished = [&](Index first, Index last) {
    if (!coefficients(first, last)) plain.store(false);
    if (fill_early && rows.fill_reads_only(first, last)) rows.fill(k);
  };
  const auto normalize = [&](const SharedLoops& loops) {
    // (Every thread reads the same value: the statistics' loops ended with a barrier.)
    if (!plain.load()) return;
    if (!fill_early) loops.fixed(1, [&](Index) { rows.fill(k); });  // one thread; others wait
    row_affine_loop(loops, apply_plan, ag, x, y, rows);
  };
  if (const int team = column_team(stats_plan, sg, 1, sg.elements() * Index{sizeof(T)})) {
    parallel_region(team, [&](const SharedLoops& loops) {
      column_moments_loops(loops, stats_plan, sg, team, x, mask, count, mean, var, finished);
      normalize(loops);
    });
  } else {
    RowPartials part(sg);
    parallel_region(sg.team(), [&](const SharedLoops& loops) {
      row_moments_loops(loops, stats_plan, sg, x, mask, part, count, mean, var, finished);
      normalize(loops);
    });
  }
  return plain.load();
}

// Training backward on a row layout (of the sums and dx alike) with one group, in one parallel
// region: the sums (as `backward_sums`, shifted by shift[k]), each block of columns'
// coefficients, dgamma and dbeta as soon as its sums are added (coefficients(first, last)),
// then the dx pass (as `backward_dx`) with the shift, scale, slope and offset arrays in `k`
// (kRowWrap entries of room each). Results are bitwise the separate passes'.
template <class T, class Acc, class BlockCoefficients>
void backward_rows_fused(const Plan& sums_plan, const Plan& dx_plan, const T* dy, const T* x,
                         const std::uint8_t* mask, T* dx, const double* shift, double* sum_dy,
                         double* sum_dy_centered, Acc* const (&k)[4],
                         BlockCoefficients&& coefficients) {
  const Geometry sg(sums_plan), dg(dx_plan);
  // Made here, filled in the region once the coefficients are known (as in train_rows_fused).
  RowCoefficients<Acc, 4> rows(k, dg.outer, dg.inner, false);
  const bool fill_early = dg.outer == 1 && sg.outer == 1;  // (as in train_rows_fused)
  const auto finished = [&](Index first, Index last) {
    coefficients(first, last);
    if (fill_early && rows.fill_reads_only(first, last)) rows.fill(k);
  };
  const auto differentiate = [&](const SharedLoops& loops) {
    if (!fill_early) loops.fixed(1, [&](Index) { rows.fill(k); });  // one thread; others wait
    row_dx_loop(loops, dx_plan, dg, dy, x, mask, dx, rows);
  };
  if (const int team = column_team(sums_plan, sg, 2, sg.elements() * Index{sizeof(T)})) {
    parallel_region(team, [&](const SharedLoops& loops) {
      column_sums_loops(loops, sums_plan, sg, team, dy, x, shift, sum_dy, sum_dy_centered,
                        finished);
      differentiate(loops);
    });
    return;
  }
  PartialBuffer<double> partial(2 * sg.items() * sg.inner);
  parallel_region(sg.team(), [&](const SharedLoops& loops) {
    row_sums_loops(loops, sums_plan, sg, dy, x, shift, partial.data(), sum_dy, sum_dy_centered,
                   finished);
    differentiate(loops);
  });
}

// ---- fused plane passes --------------------------------------------------------------------

// Whether the fused passes apply: plane layouts, and enough feature blocks to share among the
// threads evenly (each thread finishes whole blocks). The choice never changes a result: a fused
// pass computes exactly what the separate passes compute.
inline bool fusable(const Plan& first, const Plan& second, Index feature_blocks, int threads) {
  if (first.row || second.row) return false;
  return feature_blocks >= threads &&
         (feature_blocks % threads == 0 || feature_blocks >= 4 * threads);
}

// Training forward on a plane layout, one block of features at a time: the moments of their
// ghost groups (in the chunks and merge order of `moments`), their coefficients and moving
// statistics (detail::train_feature), then their output while their data is still in cache.
// Fills context, var and `coefficients` (groups * features each) like the separate passes.
// Returns false (doing nothing) where not fusable.
template <class T>
bool train_forward_fused(const Plan& stats_plan, const Plan& apply_plan, const T* x, T* y,
                         const std::uint8_t* mask, const detail::TrainScalars& scalars,
                         const detail::WeightPtrs<detail::compute_t<T>>& weights,
                         TrainingContext& context, double* var,
                         const detail::Coefficients<detail::compute_t<T>>& coefficients) {
  using Acc = detail::compute_t<T>;
  const Geometry sg(stats_plan), ag(apply_plan);
  const Index features = stats_plan.features, groups = stats_plan.groups;
  const Index per_block = even_block_items(sg, features);
  const Index feature_blocks = (features + per_block - 1) / per_block;
  const int threads = team_size(sg.elements());
  if (!fusable(stats_plan, apply_plan, feature_blocks, threads)) return false;
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Index chunks = sg.chunks();
  const bool stream = streams<T>(ag.elements());
  const Acc* shift = coefficients.shift;
  const Acc* scale = coefficients.scale;
  const Acc* offset = coefficients.offset;
  const detail::GroupStats group_stats{
      context.count.data(),   context.mean.data(),   var,
      context.inv_std.data(), context.zscale.data(), context.zshift.data()};
  parallel_for(threads, feature_blocks, [&](Index fb) {
    const Index c0 = fb * per_block, c1 = std::min(features, c0 + per_block);
    for (Index g = 0; g < groups; ++g) {
      for_each_block(stats_plan, g * features + c0, g * features + c1, per_block,
                     [&](Index first, const ItemBlock& items) {
                       Moments total[kMaxBlockItems], part[kMaxBlockItems];
                       for (Index chunk = 0; chunk < chunks; ++chunk) {
                         kernels.plane_moments(
                             stats_plan, x + stat_offset(stats_plan, first, 0),
                             at_offset(mask, mask ? stat_offset(stats_plan, first, 1) : 0), items,
                             sg.first_unit(chunk), sg.last_unit(chunk), part);
                         for (Index j = 0; j < items.count; ++j)
                           detail::merge_into(total[j], part[j]);
                       }
                       for (Index j = 0; j < items.count; ++j) {
                         const Index k = first + j;
                         context.count[size(k)] = total[j].count;
                         context.mean[size(k)] = total[j].mean;
                         var[k] = total[j].count > 0.0 ? total[j].m2 / total[j].count : 0.0;
                       }
                     });
    }
    for (Index c = c0; c < c1; ++c) {
      detail::train_feature<Acc, Acc>(c, features, groups, scalars, group_stats, weights,
                                      coefficients);
    }
    for (Index g = 0; g < groups; ++g) {
      for_each_block(apply_plan, g * features + c0, g * features + c1, per_block,
                     [&](Index first, const ItemBlock& items) {
                       kernels.plane_affine(apply_plan, x + stat_offset(apply_plan, first, 0),
                                            y + stat_offset(apply_plan, first, 1), items,
                                            {shift + first, scale + first, offset + first}, 0,
                                            ag.units, stream);
                     });
    }
  });
  return true;
}

// Backward on a plane layout, one block of features at a time: the sums of their groups (chunks
// and order of `backward_sums`, shifted by shift[k]), then `coefficients(c, sums, out)` fills
// feature c's dx coefficients (and dgamma/dbeta), then their dx while dy and x are in cache.
// Returns false (doing nothing) where not fusable.
template <class T, class FeatureCoefficients>
bool backward_fused(const Plan& sums_plan, const Plan& dx_plan, const T* dy, const T* x, T* dx,
                    const std::uint8_t* mask, const double* shift, Index groups,
                    FeatureCoefficients&& coefficients) {
  using Acc = detail::compute_t<T>;
  const Geometry sg(sums_plan), dg(dx_plan);
  const Index features = sums_plan.features, stats = groups * features;
  const Index per_block = even_block_items(sg, features);
  const Index feature_blocks = (features + per_block - 1) / per_block;
  const int threads = team_size(sg.elements());
  if (!fusable(sums_plan, dx_plan, feature_blocks, threads)) return false;
  const ChunkKernels<T>& kernels = cpu::kernels<T>();
  const Index chunks = sg.chunks();
  const bool stream = streams<T>(dg.elements());
  std::vector<double> sum_dy(size(stats)), sum_dyx(size(stats));
  std::vector<Acc> k_shift(size(stats)), k_scale(size(stats)), k_slope(size(stats)),
      k_offset(size(stats));
  const detail::Coefficients<Acc> out{k_shift.data(), k_scale.data(), k_slope.data(),
                                      k_offset.data()};
  const detail::BackwardSums sums{sum_dy.data(), sum_dyx.data()};
  parallel_for(threads, feature_blocks, [&](Index fb) {
    const Index c0 = fb * per_block, c1 = std::min(features, c0 + per_block);
    for (Index g = 0; g < groups; ++g) {
      for_each_block(sums_plan, g * features + c0, g * features + c1, per_block,
                     [&](Index first, const ItemBlock& items) {
                       double part[2 * kMaxBlockItems];
                       for (Index j = 0; j < items.count; ++j) {
                         sum_dy[size(first + j)] = sum_dyx[size(first + j)] = 0.0;
                       }
                       for (Index chunk = 0; chunk < chunks; ++chunk) {
                         kernels.plane_sums(sums_plan, dy + stat_offset(sums_plan, first, 0),
                                            x + stat_offset(sums_plan, first, 1), items,
                                            shift + first, sg.first_unit(chunk),
                                            sg.last_unit(chunk), part);
                         for (Index j = 0; j < items.count; ++j) {
                           sum_dy[size(first + j)] += part[2 * j];
                           sum_dyx[size(first + j)] += part[2 * j + 1];
                         }
                       }
                     });
    }
    for (Index c = c0; c < c1; ++c) coefficients(c, sums, out);
    for (Index g = 0; g < groups; ++g) {
      for_each_block(dx_plan, g * features + c0, g * features + c1, per_block,
                     [&](Index first, const ItemBlock& items) {
                       kernels.plane_dx(
                           dx_plan, dy + stat_offset(dx_plan, first, 0),
                           x + stat_offset(dx_plan, first, 1), dx + stat_offset(dx_plan, first, 2),
                           at_offset(mask, mask ? stat_offset(dx_plan, first, 3) : 0), items,
                           {k_shift.data() + first, k_scale.data() + first, k_slope.data() + first,
                            k_offset.data() + first},
                           0, dg.units, stream);
                     });
    }
  });
  return true;
}

}  // namespace batchnorm::cpu
