// The chunk kernels of cpu/dispatch.hpp, written once over the 16-lane blocks of cpu/simd.hpp and
// compiled once per instruction set. Reductions keep 16 float64 lanes per statistic (lane i of a
// run takes its elements i, i + 16, ...; rows of a few features share the lanes, see
// packed_row_moments), fuse no multiply-adds (the build compiles these units with
// -ffp-contract=off) and add their lanes in a fixed order, so their results depend neither on
// threads, chunk placement or loop blocking nor on the instruction set.
// Not a normal header: included once by each cpp/src/cpu/isa_*.cpp inside its target region, after
// every header it depends on (so that nothing shared is compiled for a wider instruction set).
#ifndef BATCHNORM_CPU_NS
#error "cpu/chunk_kernels.hpp is included by the kernel translation units only"
#endif

#include <cstdint>
#include <optional>

#include "cpu/coefficients.hpp"
#include "cpu/dispatch.hpp"
#include "cpu/simd.hpp"

namespace batchnorm::cpu::BATCHNORM_CPU_NS {

using detail::LoopDim;
using detail::LoopNest;
using detail::Moments;
using detail::NestWalker;
using detail::Plan;
using Index = std::int64_t;

template <class T>
inline double as_double(T value) {
  return detail::load<double>(value);
}

inline Index min_index(Index a, Index b) { return a < b ? a : b; }

// Spans shorter than this keep plain stores: streaming them would leave many partial cache lines
// (at their unaligned ends), which defeat write combining.
inline constexpr Index kMinStreamBytes = 2048;

// Elements before p starts a cache line (where streaming begins), or -1 if it never does.
template <class T>
inline Index stream_head(const T* p, Index n) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  if (address % sizeof(T) != 0) return -1;
  return min_index(
      static_cast<Index>((kStreamAlign - address % kStreamAlign) % kStreamAlign / sizeof(T)), n);
}

// Coefficients of a span: the same for every lane (plane mode: one statistic), or read from
// feature-periodic arrays at the span's current feature (row mode: rows of C features).
// The per-block methods of these coefficient classes are always inlined: where GCC's inlining
// budget for a kernel unit ran short, it called them out of line once a block of lanes (a
// vzeroupper before each call), which took 3x the time of a (32, 32, 8, 8) NCHW inference.
template <class A, int N>
struct UniformCoefficients {
  Vec<A> value[N];
  __attribute__((always_inline)) Vec<A> get(int i) const { return value[i]; }
  __attribute__((always_inline)) void advance(Index) {}
  __attribute__((always_inline)) void next_block() {}
};

template <class A, int N>
struct PeriodicCoefficients {
  const A* array[N];
  Index feature, features, block_step;
  PeriodicCoefficients(const A* const (&arrays)[N], Index first_feature, Index count)
      : feature(first_feature), features(count), block_step(kLanes % count) {
    for (int i = 0; i < N; ++i) array[i] = arrays[i];
  }
  __attribute__((always_inline)) Vec<A> get(int i) const { return load(array[i] + feature); }
  __attribute__((always_inline)) void advance(Index n) { feature = (feature + n) % features; }
  __attribute__((always_inline)) void next_block() {
    feature += block_step;
    if (feature >= features) feature -= features;
  }
};

// Coefficients of a span made of back-to-back runs of `run` (>= kLanes) elements, run j taking
// the j-th entry of each array: a block of lanes straddles at most two runs. The block's lanes
// are kept and made again only where they can change (a block at either end of a run), so a
// run of 64 elements (an 8 x 8 plane) broadcasts its coefficients once, not once per block.
template <class A, int N>
struct SegmentedCoefficients {
  const A* array[N];
  Index item = 0, at = 0, run, last;  // current run, position within it, last run
  Vec<A> value[N];                    // the lanes of the block at `at`
  SegmentedCoefficients(const A* const (&arrays)[N], Index items, Index run_length)
      : run(run_length), last(items - 1) {
    for (int i = 0; i < N; ++i) array[i] = arrays[i];
    make_block();
  }
  __attribute__((always_inline)) Vec<A> get(int i) const { return value[i]; }
  __attribute__((always_inline)) void advance(Index n) {
    at += n;
    item += at / run;
    at %= run;
    make_block();
  }
  __attribute__((always_inline)) void next_block() {
    at += kLanes;
    if (at >= run) {
      at -= run;
      ++item;
    }
    // Inside a run, away from its ends, a block has the previous block's lanes.
    if (at < kLanes || at + kLanes > run) make_block();
  }

 private:
  __attribute__((always_inline)) void make_block() {
    const Index left = run - at;
    if (left >= kLanes) {
      for (int i = 0; i < N; ++i) value[i] = splat(array[i][item]);
      return;
    }
    // Past the last run lie only tail lanes that are never stored.
    const Index next = item < last ? item + 1 : item;
    const Mask first = mask_first(static_cast<int>(left));
    for (int i = 0; i < N; ++i) {
      value[i] = blend(first, splat(array[i][item]), splat(array[i][next]));
    }
  }
};

// Prefetches into L2 the lines of a block of lanes `distance` bytes past p. Always inlined: GCC
// deems a function that only prefetches free of side effects and drops the calls.
template <class T>
__attribute__((always_inline)) inline void prefetch_lanes(const T* p, Index distance) {
  const char* ahead = reinterpret_cast<const char*>(p) + distance;
  __builtin_prefetch(ahead, 0, 2);
  if constexpr (sizeof(T) * kLanes > 64) __builtin_prefetch(ahead + 64, 0, 2);
}

// Row-mode elementwise spans prefetch their inputs this far ahead, into L2 as the row reductions
// do: the hardware prefetchers alone left a core's (65536, 512) normalize pass at about two thirds
// of its copy speed. Plane spans do so where a unit's short runs lie back to back (one long
// span); long runs are left to the hardware (the same prefetch cost the (32, 64, 112, 112) NCHW
// passes about 10%), and other short runs are fetched ahead by whole units (a unit ahead for the
// elementwise passes, about 4 KB ahead for the unmasked statistics).
inline constexpr Index kSpanPrefetchBytes = Index{16} << 10;

// ---- elementwise spans -------------------------------------------------------------------------

// The elementwise formulas, one block of lanes at a time, in one place: every normalize and dx
// path (spans, strided, rows together) computes them with the same operations, so their results
// agree bit for bit. k holds (shift, scale, offset) for a normalize, (shift, scale, slope,
// offset) for a dx.
template <class A, class Coefficients>
__attribute__((always_inline)) inline Vec<A> normalized(Vec<A> v, const Coefficients& k) {
  return fmadd(sub(v, k.get(0)), k.get(1), k.get(2));
}
// (x - shift) * slope + offset: the part of dx that x contributes.
template <class A, class Coefficients>
__attribute__((always_inline)) inline Vec<A> dx_correction(Vec<A> v, const Coefficients& k) {
  return fmadd(sub(v, k.get(0)), k.get(2), k.get(3));
}
// scale * (dy - correction).
template <class A, class Coefficients>
__attribute__((always_inline)) inline Vec<A> dx_from(Vec<A> g, Vec<A> correction,
                                                     const Coefficients& k) {
  return mul(k.get(1), sub(g, correction));
}

// y = (x - shift) * scale + offset over n contiguous elements; kPrefetch: prefetch x ahead.
template <bool kPrefetch, class T, class Coefficients>
void affine_span(const T* x, T* y, Index n, Coefficients k, bool nontemporal) {
  using A = detail::compute_t<T>;
  const auto apply = [&](Vec<A> v) { return normalized<A>(v, k); };
  Index i = 0;
  nontemporal = nontemporal && n * Index{sizeof(T)} >= kMinStreamBytes;
  if (nontemporal) {
    const Index head = stream_head(y, n);
    nontemporal = head >= 0;
    if (head > 0) {
      store_first(y, apply(load_first(x, static_cast<int>(head))), static_cast<int>(head));
      k.advance(head);
      i = head;
    }
  }
  if (nontemporal) {
    for (; i + kLanes <= n; i += kLanes, k.next_block()) {
      if constexpr (kPrefetch) prefetch_lanes(x + i, kSpanPrefetchBytes);
      stream(y + i, apply(load(x + i)));
    }
  } else {
    for (; i + kLanes <= n; i += kLanes, k.next_block()) {
      if constexpr (kPrefetch) prefetch_lanes(x + i, kSpanPrefetchBytes);
      store(y + i, apply(load(x + i)));
    }
  }
  if (i < n) {
    const int tail = static_cast<int>(n - i);
    store_first(y + i, apply(load_first(x + i, tail)), tail);
  }
}

template <class T, class Coefficients>
void affine_strided(const T* x, Index xs, T* y, Index ys, Index n, Coefficients k) {
  using A = detail::compute_t<T>;
  for (Index i = 0; i < n; i += kLanes) {
    const int lanes = static_cast<int>(min_index(kLanes, n - i));
    const Vec<A> v = load_strided(x + i * xs, xs, lanes);
    store_strided(y + i * ys, ys, normalized<A>(v, k), lanes);
  }
}

// Which positions of a dx span take the correction terms.
enum class Valid { all, none, masked };

// The lanes of a dx span's elements i.. i + lanes - 1 whose mask byte is set, one byte an element.
inline Mask valid_lanes(const std::uint8_t* mask, Index i, int lanes) {
  return lanes == kLanes ? mask_bytes(mask + i) : mask_bytes_first(mask + i, lanes);
}

// A row mask over a span of whole rows of at most kLanes features, their bytes back to back: a
// block's lanes take their rows' bytes by one shuffle (spread_rows), with the table of the
// feature the block starts at. Blocks are asked for in order, from the span's start.
struct RowLanes {
  // Per first feature f: lane j's row, counted from the block's first row ((f + j) / features).
  std::uint8_t lane_row[kLanes][kLanes];
  // Per first feature f: the rows a whole block moves on, and the next block's first feature
  // (tables, not a division a block: the next block's shuffle waits on them).
  std::uint8_t block_rows[kLanes], next_feature[kLanes];
  Index features;
  explicit RowLanes(Index row_features) : features(row_features) {
    for (Index f = 0; f < features; ++f) {
      std::uint8_t row = 0;
      Index feature = f;  // of lane j, in its row
      for (Index j = 0; j < kLanes; ++j) {
        lane_row[f][j] = row;
        if (++feature == features) feature = 0, ++row;
      }
      block_rows[f] = row;
      next_feature[f] = static_cast<std::uint8_t>(feature);
    }
  }
};

// The position of a span's next block among its rows (RowLanes).
struct RowLanesAt {
  const RowLanes* table;
  const std::uint8_t* valid;  // the mask byte of the block's first row
  Index rows_left;            // rows from that one to the span's end
  Index feature = 0;          // the block's first feature in its row
};

// (The position i is not read: dx_span asks for its head, whole blocks and tail in order, and
// `at` follows them.)
inline Mask valid_lanes(RowLanesAt& at, Index /* i */, int lanes) {
  const Mask m = spread_rows(at.valid, static_cast<int>(min_index(at.rows_left, kLanes)),
                             at.rows_left, at.table->lane_row[at.feature]);
  Index rows;
  if (lanes == kLanes) {
    rows = at.table->block_rows[at.feature];
    at.feature = at.table->next_feature[at.feature];
  } else {  // (a span's head or tail)
    rows = (at.feature + lanes) / at.table->features;
    at.feature = (at.feature + lanes) % at.table->features;
  }
  at.valid += rows;
  at.rows_left -= rows;
  return m;
}

// dx = scale * (dy - valid * (offset + (x - shift) * slope)) over n contiguous elements; with
// Valid::masked, `mask` says which lanes are valid (valid_lanes): one byte per element, or a
// RowLanesAt for a row mask.
template <Valid kValid, bool kPrefetch, class T, class Coefficients,
          class MaskBytes = const std::uint8_t*>
void dx_span(const T* dy, const T* x, T* dx, MaskBytes mask, Index n, Coefficients k,
             bool nontemporal) {
  using A = detail::compute_t<T>;
  const auto apply = [&](Index i, int lanes) {
    if (kPrefetch && lanes == kLanes) {
      // x too where this span does not read it: the x ahead belongs to spans that will.
      prefetch_lanes(dy + i, kSpanPrefetchBytes);
      prefetch_lanes(x + i, kSpanPrefetchBytes);
    }
    const Vec<A> g = lanes == kLanes ? load(dy + i) : load_first(dy + i, lanes);
    if constexpr (kValid == Valid::none) {
      return mul(k.get(1), g);
    } else {
      const Vec<A> v = lanes == kLanes ? load(x + i) : load_first(x + i, lanes);
      Vec<A> correction = dx_correction<A>(v, k);
      if constexpr (kValid == Valid::masked) {
        correction = select(valid_lanes(mask, i, lanes), correction);
      }
      return dx_from<A>(g, correction, k);
    }
  };
  Index i = 0;
  nontemporal = nontemporal && n * Index{sizeof(T)} >= kMinStreamBytes;
  if (nontemporal) {
    const Index head = stream_head(dx, n);
    nontemporal = head >= 0;
    if (head > 0) {
      store_first(dx, apply(0, static_cast<int>(head)), static_cast<int>(head));
      k.advance(head);
      i = head;
    }
  }
  if (nontemporal) {
    for (; i + kLanes <= n; i += kLanes, k.next_block()) stream(dx + i, apply(i, kLanes));
  } else {
    for (; i + kLanes <= n; i += kLanes, k.next_block()) store(dx + i, apply(i, kLanes));
  }
  if (i < n) {
    const int tail = static_cast<int>(n - i);
    store_first(dx + i, apply(i, tail), tail);
  }
}

// The same over strided operands (general layouts); `mask` may be null (all valid).
template <class T, class Coefficients>
void dx_strided(const T* dy, Index gs, const T* x, Index xs, T* dx, Index ds,
                const std::uint8_t* mask, Index ms, Index n, Coefficients k) {
  using A = detail::compute_t<T>;
  for (Index i = 0; i < n; i += kLanes) {
    const int lanes = static_cast<int>(min_index(kLanes, n - i));
    const Vec<A> g = load_strided(dy + i * gs, gs, lanes);
    const Vec<A> v = load_strided(x + i * xs, xs, lanes);
    Vec<A> correction = dx_correction<A>(v, k);
    if (mask) correction = select(mask_strided(mask + i * ms, ms, lanes), correction);
    store_strided(dx + i * ds, ds, dx_from<A>(g, correction, k), lanes);
  }
}

// ---- plane mode ----------------------------------------------------------------------------

// Shifted float64 sums of a chunk's valid elements of one statistic, lane by lane: the sum and
// the sum of squares of the elements less the shift. The vectors have no initializers:
// plane_moments keeps an array of kMaxBlockItems of these, and zeroing it took 28 KB of stores a
// call (8% of an (8, 64, 56, 56) NCHW masked training forward in cache). Users set them.
struct ShiftedSums {
  D shift, sum, squares;
  Index count = 0;

  // A whole block of lanes at values (not counted: callers count whole runs).
  template <class T>
  __attribute__((always_inline)) void add_block(const T* values) {
    const D d = sub_on_fma(load_wide(values), shift);
    sum = add_on_fma(sum, d);
    squares = add(squares, mul(d, d));
  }

  // The lanes m selects of v (not counted). The subtraction and the running sum go to the
  // multiply-add units, as in add_block: with plain ones the adders carried three of the four
  // operations besides the conversions.
  __attribute__((always_inline)) void add_selected(D v, Mask m) {
    const D d = sub_select_on_fma(m, v, shift);
    sum = add_on_fma(sum, d);
    squares = add(squares, mul(d, d));
  }

  // The first `tail` elements at values, the last of a run (not counted either).
  template <class T>
  __attribute__((always_inline)) void add_tail(const T* values, int tail, Mask tail_lanes) {
    const D d = select(tail_lanes, sub(widen(load_first(values, tail)), shift));
    sum = add(sum, d);
    squares = add(squares, mul(d, d));
  }
};

// Adds one run (n elements, stride xs; `valid` null or one byte per element at stride ms) to s.
template <class T>
void add_run(ShiftedSums& state, const T* values, Index xs, const std::uint8_t* valid, Index ms,
             Index n) {
  // A local copy, not the referenced state, so the accumulators stay in registers along the run.
  ShiftedSums run{state.shift, state.sum, state.squares};
  Index count = 0;
  const auto add_block = [&](D v, Mask m) {
    run.add_selected(v, m);
    count += lanes_set(m);
  };
  Index i = 0;
  if (xs == 1 && !valid) {
    for (; i + kLanes <= n; i += kLanes) run.add_block(values + i);
    count += i;
    if (i < n) {
      const int tail = static_cast<int>(n - i);
      add_block(widen(load_first(values + i, tail)), mask_first(tail));
    }
  } else if (xs == 1 && ms == 1) {
    // The valid elements are counted apart from the blocks, which then count no lanes (a move
    // from the mask register, a popcount and two more instructions each).
    count += nonzero_count(valid, n);
    for (; i + kLanes <= n; i += kLanes) {
      // The masked blocks cost more than the hardware prefetchers run ahead: (32, 64, 112, 112)
      // with an 80% mask went from about 1.3x to 1.2x a plain training forward. (Unmasked runs
      // lost about 10% with it.)
      prefetch_lanes(values + i, kSpanPrefetchBytes);
      run.add_selected(load_wide(values + i), mask_bytes(valid + i));
    }
    if (i < n) {
      const int tail = static_cast<int>(n - i);
      run.add_selected(widen(load_first(values + i, tail)), mask_bytes_first(valid + i, tail));
    }
  } else {
    for (; i < n; i += kLanes) {
      const int lanes = static_cast<int>(min_index(kLanes, n - i));
      add_block(widen(load_strided(values + i * xs, xs, lanes)),
                valid ? mask_strided(valid + i * ms, ms, lanes) : mask_first(lanes));
    }
  }
  state.sum = run.sum;
  state.squares = run.squares;
  state.count += count;
}

// Index of the first valid element of a run, or -1.
inline Index first_valid(const std::uint8_t* valid, Index ms, Index n) {
  if (!valid) return n > 0 ? 0 : -1;
  for (Index i = 0; i < n; ++i) {
    if (valid[i * ms]) return i;
  }
  return -1;
}

// Runs shorter than this are prefetched ahead: a block's short runs of one unit make a stretch of
// a few KB, too short for the hardware prefetchers (which stop at each page).
inline constexpr Index kPrefetchRunBytes = 4096;

// Prefetches `count` runs of run_bytes, `step` elements apart, from p. Always inlined: GCC deems a
// function that only prefetches free of side effects and drops the calls.
template <class T>
__attribute__((always_inline)) inline void prefetch_runs(const T* p, Index count, Index step,
                                                         Index run_bytes) {
  for (Index j = 0; j < count; ++j) {
    const char* run = reinterpret_cast<const char*>(p + j * step);
    for (Index b = 0; b < run_bytes; b += 64) __builtin_prefetch(run + b, 0, 2);
  }
}

// Prefetches the runs of a block in the unit after `walk`'s.
template <class T>
__attribute__((always_inline)) inline void prefetch_next_unit(const NestWalker& walk, const T* base,
                                                              int op, const ItemBlock& items,
                                                              Index run_bytes) {
  NestWalker next = walk;
  next.next();
  prefetch_runs(base + next.offset[op], items.count, items.step[op], run_bytes);
}

// Units a reduction over a group of statistics' short runs reads ahead of the unit it sums: about
// kPrefetchRunBytes of the group's runs (0: long runs, left to the hardware).
inline Index units_ahead(Index run_bytes, int group) {
  if (run_bytes >= kPrefetchRunBytes) return 0;
  const Index units = kPrefetchRunBytes / (run_bytes * group);
  return units > 0 ? units : 1;
}

// Shifted sums of G (at most 4) statistics of a block over units [u0, u1) of contiguous runs of n
// elements, `step` elements apart (x at the first of them). The group's sums stay in registers
// through the walk over the units, where a walk taking all the block's statistics in each unit
// keeps them in memory; every lane adds the same elements in the same order either way. (Named
// variables in a function of their own: GCC leaves arrays indexed in a loop, or sums inlined
// into a larger function, in memory.)
template <int G, class T>
__attribute__((noinline)) void shifted_sums_of_group(const LoopNest& red, const T* x, Index step,
                                                     Index n, Index u0, Index u1,
                                                     const double* first, D* sum_out,
                                                     D* squares_out) {
  static_assert(G >= 1 && G <= 4, "a group has one to four statistics");
  const Index full = n - n % kLanes;
  const int tail = static_cast<int>(n % kLanes);
  const Mask tail_lanes = mask_first(tail);
  const Index run_bytes = n * Index{sizeof(T)};
  const Index ahead = units_ahead(run_bytes, G);
  // Sums past the group's G are never used (nor kept: the compiler drops them).
  const auto start = [&](int g) {
    return ShiftedSums{splat(first[g < G ? g : 0]), splat(0.0), splat(0.0)};
  };
  ShiftedSums s0 = start(0), s1 = start(1), s2 = start(2), s3 = start(3);
  NestWalker walk(red, red.count - 1, 1, u0), lead(red, red.count - 1, 1, u0 + ahead);
  for (Index u = u0; u < u1; ++u, walk.next()) {
    if (ahead > 0 && u + ahead < u1) {
      prefetch_runs(x + lead.offset[0], G, step, run_bytes);
      lead.next();
    }
    // The group's runs side by side: one loop, whose chains of additions are independent.
    const T* values = x + walk.offset[0];
    for (Index i = 0; i < full; i += kLanes) {
      s0.add_block(values + i);
      if constexpr (G > 1) s1.add_block(values + step + i);
      if constexpr (G > 2) s2.add_block(values + 2 * step + i);
      if constexpr (G > 3) s3.add_block(values + 3 * step + i);
    }
    if (tail) {
      s0.add_tail(values + full, tail, tail_lanes);
      if constexpr (G > 1) s1.add_tail(values + step + full, tail, tail_lanes);
      if constexpr (G > 2) s2.add_tail(values + 2 * step + full, tail, tail_lanes);
      if constexpr (G > 3) s3.add_tail(values + 3 * step + full, tail, tail_lanes);
    }
  }
  const auto put = [&](int g, const ShiftedSums& sums) {
    sum_out[g] = sums.sum;
    squares_out[g] = sums.squares;
  };
  put(0, s0);
  if constexpr (G > 1) put(1, s1);
  if constexpr (G > 2) put(2, s2);
  if constexpr (G > 3) put(3, s3);
}

// plane_moments without a mask on contiguous runs: every run counts whole, and each statistic's
// shift is its first element in the chunk. The statistics go kRegisterStats at a time.
template <class T>
void plane_moments_dense(const Plan& plan, const T* x, ItemBlock items, Index u0, Index u1,
                         Moments* out) {
  const LoopNest& red = plan.reduced;
  const Index n = red.dims[red.count - 1].size;
  if (u0 >= u1 || n == 0) {
    for (Index j = 0; j < items.count; ++j) out[j] = Moments{};
    return;
  }
  const Index step = items.step[0];
  const T* start = x + NestWalker(red, red.count - 1, 1, u0).offset[0];
  double first[kMaxBlockItems];
  for (Index j = 0; j < items.count; ++j) first[j] = as_double(start[j * step]);
  D sum[kMaxBlockItems], squares[kMaxBlockItems];
  Index j = 0;
  for (; j + kRegisterStats <= items.count; j += kRegisterStats) {
    shifted_sums_of_group<kRegisterStats>(red, x + j * step, step, n, u0, u1, first + j, sum + j,
                                          squares + j);
  }
  for (; j < items.count; ++j) {
    shifted_sums_of_group<1>(red, x + j * step, step, n, u0, u1, first + j, sum + j, squares + j);
  }
  const auto count = static_cast<double>((u1 - u0) * n);
  for (j = 0; j < items.count; ++j) {
    out[j] =
        detail::moments_from_shifted_sums(count, first[j], lane_sum(sum[j]), lane_sum(squares[j]));
  }
}

// Contiguous runs without a mask go to plane_moments_dense. Otherwise the block's statistics walk
// the units in order, each taking its own run of a unit in turn: consecutive statistics' runs are
// usually adjacent in memory, so this reads long stretches.
template <class T>
void plane_moments(const Plan& plan, const T* x, const std::uint8_t* mask, ItemBlock items,
                   Index u0, Index u1, Moments* out) {
  const LoopNest& red = plan.reduced;
  const LoopDim& run = red.dims[red.count - 1];
  const Index n = run.size, xs = run.stride[0], ms = mask ? run.stride[1] : 0;
  if (!mask && xs == 1) {
    plane_moments_dense(plan, x, items, u0, u1, out);
    return;
  }
  ShiftedSums state[kMaxBlockItems];
  double first[kMaxBlockItems];
  bool found[kMaxBlockItems] = {};
  const Index run_bytes = xs == 1 ? n * Index{sizeof(T)} : 0;
  NestWalker walk(red, red.count - 1, mask ? 2 : 1, u0);
  for (Index u = u0; u < u1; ++u, walk.next()) {
    if (run_bytes < kPrefetchRunBytes && u + 1 < u1) {
      prefetch_next_unit(walk, x, 0, items, run_bytes);
    }
    for (Index j = 0; j < items.count; ++j) {
      const T* values = x + walk.offset[0] + j * items.step[0];
      const std::uint8_t* valid = mask ? mask + walk.offset[1] + j * items.step[1] : nullptr;
      if (valid && ms == 0) {
        if (!*valid) continue;
        valid = nullptr;
      }
      if (!found[j]) {
        // The shift is the chunk's first valid element: the sums then stay near the spread.
        const Index at = first_valid(valid, ms, n);
        if (at < 0) continue;
        first[j] = as_double(values[at * xs]);
        state[j] = ShiftedSums{splat(first[j]), splat(0.0), splat(0.0)};
        found[j] = true;
      }
      add_run(state[j], values, xs, valid, ms, n);
    }
  }
  for (Index j = 0; j < items.count; ++j) {
    out[j] = found[j] ? detail::moments_from_shifted_sums(static_cast<double>(state[j].count),
                                                          first[j], lane_sum(state[j].sum),
                                                          lane_sum(state[j].squares))
                      : Moments{};
  }
}

// Largest block span (statistics x run) whose coefficients are expanded per element (on the
// stack); longer spans of runs of at least kLanes use segmented coefficients.
inline constexpr Index kMaxExpanded = 1024;

// Coefficients of the block's statistics laid out per element of a unit's contiguous span (all
// runs back to back), plus kLanes wrapped entries: the span then runs as one flat stretch.
template <class A, int N>
struct Expanded {
  A values[N][kMaxExpanded + kLanes];
  const A* rows[N];
  Expanded(const A* const (&per_item)[N], Index items, Index run) {
    const Index span = items * run;
    for (int c = 0; c < N; ++c) {
      for (Index j = 0; j < items; ++j) {
        for (Index p = j * run; p < (j + 1) * run; ++p) values[c][p] = per_item[c][j];
      }
      for (Index p = span; p < span + kLanes; ++p) values[c][p] = values[c][p % span];
      rows[c] = values[c];
    }
  }
};

// How a block's units are walked by the elementwise kernels: run by run, or (runs back to back
// in every data operand) as one stretch per unit with expanded coefficients (short spans) or
// segmented ones (runs of at least a block of lanes).
enum class Span { runs, expanded, segmented };

inline Span span_kind(const LoopDim& run, const ItemBlock& items, int data_operands) {
  if (items.count < 2) return Span::runs;
  for (int op = 0; op < data_operands; ++op) {
    if (run.stride[op] != 1 || items.step[op] != run.size) return Span::runs;
  }
  if (items.count * run.size <= kMaxExpanded) return Span::expanded;
  return run.size >= kLanes ? Span::segmented : Span::runs;
}

template <class T>
void plane_affine(const Plan& plan, const T* x, T* y, ItemBlock items,
                  AffineCoefficients<const detail::compute_t<T>*> k, Index u0, Index u1,
                  bool nontemporal) {
  using A = detail::compute_t<T>;
  const LoopNest& red = plan.reduced;
  const LoopDim& run = red.dims[red.count - 1];
  const Index n = run.size;
  const Index run_bytes = run.stride[0] == 1 ? n * Index{sizeof(T)} : 0;
  const bool prefetch = run_bytes < kPrefetchRunBytes;
  NestWalker walk(red, red.count - 1, 2, u0);
  const Span kind = span_kind(run, items, 2);
  if (kind == Span::expanded) {
    const Index span = items.count * n;
    const Expanded<A, 3> e({k.shift, k.scale, k.offset}, items.count, n);
    for (Index u = u0; u < u1; ++u, walk.next()) {
      if (prefetch && u + 1 < u1) prefetch_next_unit(walk, x, 0, items, run_bytes);
      affine_span<false>(x + walk.offset[0], y + walk.offset[1], span,
                         PeriodicCoefficients<A, 3>(e.rows, 0, span), nontemporal);
    }
  } else if (kind == Span::segmented) {
    // A unit's short runs back to back make one long span, prefetched like a row's.
    const auto walk_units = [&](auto prefetch_span) {
      for (Index u = u0; u < u1; ++u, walk.next()) {
        affine_span<decltype(prefetch_span)::value>(
            x + walk.offset[0], y + walk.offset[1], items.count * n,
            SegmentedCoefficients<A, 3>({k.shift, k.scale, k.offset}, items.count, n), nontemporal);
      }
    };
    if (prefetch) {
      walk_units(std::true_type{});
    } else {
      walk_units(std::false_type{});
    }
  } else {
    for (Index u = u0; u < u1; ++u, walk.next()) {
      if (prefetch && u + 1 < u1) prefetch_next_unit(walk, x, 0, items, run_bytes);
      for (Index j = 0; j < items.count; ++j) {
        const T* in = x + walk.offset[0] + j * items.step[0];
        T* out = y + walk.offset[1] + j * items.step[1];
        const UniformCoefficients<A, 3> coefficients{
            {splat(k.shift[j]), splat(k.scale[j]), splat(k.offset[j])}};
        if (run.stride[0] == 1 && run.stride[1] == 1) {
          affine_span<false>(in, out, n, coefficients, nontemporal);
        } else {
          affine_strided(in, run.stride[0], out, run.stride[1], n, coefficients);
        }
      }
    }
  }
  if (nontemporal) stream_fence();
}

template <class T>
void plane_sums(const Plan& plan, const T* dy, const T* x, ItemBlock items, const double* shift,
                Index u0, Index u1, double* sums) {
  const LoopNest& red = plan.reduced;
  const LoopDim& run = red.dims[red.count - 1];
  const Index n = run.size, gs = run.stride[0], xs = run.stride[1];
  D sum_dy[kMaxBlockItems], sum_dyx[kMaxBlockItems];
  for (Index j = 0; j < items.count; ++j) sum_dy[j] = sum_dyx[j] = splat(0.0);
  const Index run_bytes = gs == 1 && xs == 1 ? n * Index{sizeof(T)} : 0;
  NestWalker walk(red, red.count - 1, 2, u0);
  for (Index u = u0; u < u1; ++u, walk.next()) {
    if (run_bytes < kPrefetchRunBytes && u + 1 < u1) {
      prefetch_next_unit(walk, dy, 0, items, run_bytes);
      prefetch_next_unit(walk, x, 1, items, run_bytes);
    }
    for (Index j = 0; j < items.count; ++j) {
      const T* g = dy + walk.offset[0] + j * items.step[0];
      const T* v = x + walk.offset[1] + j * items.step[1];
      const D m = splat(shift[j]);
      D total = sum_dy[j], total_x = sum_dyx[j];
      // Lanes past the run's end are zeroed after centering: even an infinite shift adds nothing.
      // The sum of dy and the centering go to the multiply-add units (as in the statistics), so
      // the adders carry only the conversions and the other sum.
      const auto add_block = [&](D dyv, D centered) {
        total = add_on_fma(total, dyv);
        total_x = add(total_x, mul(dyv, centered));
      };
      if (gs == 1 && xs == 1) {
        Index i = 0;
        for (; i + kLanes <= n; i += kLanes) {
          add_block(load_wide(g + i), sub_on_fma(load_wide(v + i), m));
        }
        if (i < n) {
          const int tail = static_cast<int>(n - i);
          add_block(widen(load_first(g + i, tail)),
                    select(mask_first(tail), sub(widen(load_first(v + i, tail)), m)));
        }
      } else {
        for (Index i = 0; i < n; i += kLanes) {
          const int lanes = static_cast<int>(min_index(kLanes, n - i));
          add_block(widen(load_strided(g + i * gs, gs, lanes)),
                    select(mask_first(lanes), sub(widen(load_strided(v + i * xs, xs, lanes)), m)));
        }
      }
      sum_dy[j] = total;
      sum_dyx[j] = total_x;
    }
  }
  for (Index j = 0; j < items.count; ++j) {
    sums[2 * j] = lane_sum(sum_dy[j]);
    sums[2 * j + 1] = lane_sum(sum_dyx[j]);
  }
}

template <class T>
void plane_dx(const Plan& plan, const T* dy, const T* x, T* dx, const std::uint8_t* mask,
              ItemBlock items, DxCoefficients<const detail::compute_t<T>*> k, Index u0, Index u1,
              bool nontemporal) {
  using A = detail::compute_t<T>;
  const LoopNest& red = plan.reduced;
  const LoopDim& run = red.dims[red.count - 1];
  const Index n = run.size;
  const Index gs = run.stride[0], xs = run.stride[1], ds = run.stride[2];
  const Index ms = mask ? run.stride[3] : 0;
  const Index run_bytes = gs == 1 && xs == 1 ? n * Index{sizeof(T)} : 0;
  const bool prefetch = run_bytes < kPrefetchRunBytes;
  const auto prefetch_next = [&](const NestWalker& walk) {
    prefetch_next_unit(walk, dy, 0, items, run_bytes);
    prefetch_next_unit(walk, x, 1, items, run_bytes);
  };
  NestWalker walk(red, red.count - 1, plan.operands, u0);
  const Span kind = mask ? Span::runs : span_kind(run, items, 3);
  if (kind == Span::expanded) {
    const Index span = items.count * n;
    const Expanded<A, 4> e({k.shift, k.scale, k.slope, k.offset}, items.count, n);
    for (Index u = u0; u < u1; ++u, walk.next()) {
      if (prefetch && u + 1 < u1) prefetch_next(walk);
      dx_span<Valid::all, false>(dy + walk.offset[0], x + walk.offset[1], dx + walk.offset[2], mask,
                                 span, PeriodicCoefficients<A, 4>(e.rows, 0, span), nontemporal);
    }
    if (nontemporal) stream_fence();
    return;
  }
  if (kind == Span::segmented) {
    // As in plane_affine: short runs back to back are prefetched like a row.
    const auto walk_units = [&](auto prefetch_span) {
      for (Index u = u0; u < u1; ++u, walk.next()) {
        dx_span<Valid::all, decltype(prefetch_span)::value>(
            dy + walk.offset[0], x + walk.offset[1], dx + walk.offset[2], mask, items.count * n,
            SegmentedCoefficients<A, 4>({k.shift, k.scale, k.slope, k.offset}, items.count, n),
            nontemporal);
      }
    };
    if (prefetch) {
      walk_units(std::true_type{});
    } else {
      walk_units(std::false_type{});
    }
    if (nontemporal) stream_fence();
    return;
  }
  const bool contiguous = gs == 1 && xs == 1 && ds == 1;
  for (Index u = u0; u < u1; ++u, walk.next()) {
    if (prefetch && u + 1 < u1) prefetch_next(walk);
    for (Index j = 0; j < items.count; ++j) {
      const T* g = dy + walk.offset[0] + j * items.step[0];
      const T* v = x + walk.offset[1] + j * items.step[1];
      T* out = dx + walk.offset[2] + j * items.step[2];
      const std::uint8_t* valid = mask ? mask + walk.offset[3] + j * items.step[3] : nullptr;
      const UniformCoefficients<A, 4> coefficients{
          {splat(k.shift[j]), splat(k.scale[j]), splat(k.slope[j]), splat(k.offset[j])}};
      if (contiguous && (!valid || ms == 0)) {
        if (valid && !*valid) {
          dx_span<Valid::none, false>(g, v, out, valid, n, coefficients, nontemporal);
        } else {
          dx_span<Valid::all, false>(g, v, out, valid, n, coefficients, nontemporal);
        }
      } else if (contiguous && ms == 1) {
        dx_span<Valid::masked, false>(g, v, out, valid, n, coefficients, nontemporal);
      } else {
        dx_strided(g, gs, v, xs, out, ds, valid, ms, n, coefficients);
      }
    }
  }
  if (nontemporal) stream_fence();
}

// ---- row mode ------------------------------------------------------------------------------

// Calls f(offsets, rows) for the rows [u0, u1) in runs: maximal stretches of consecutive rows
// along the innermost reduced dim when `coalesce` (rows contiguous in every data operand), else
// single rows.
template <class F>
void for_each_row_run(const LoopNest& red, int operands, Index u0, Index u1, bool coalesce, F&& f) {
  if (!coalesce) {
    NestWalker walk(red, red.count, operands, u0);
    for (Index u = u0; u < u1; ++u, walk.next()) f(walk.offset, Index{1});
    return;
  }
  const LoopDim& inner = red.dims[red.count - 1];
  Index j = u0 % inner.size;
  NestWalker walk(red, red.count - 1, operands, u0 / inner.size);
  for (Index u = u0; u < u1; walk.next(), j = 0) {
    const Index rows = min_index(inner.size - j, u1 - u);
    std::int64_t offsets[detail::kMaxOperands];
    for (int op = 0; op < operands; ++op) offsets[op] = walk.offset[op] + j * inner.stride[op];
    f(static_cast<const std::int64_t*>(offsets), rows);
    u += rows;
  }
}

inline constexpr int kRowBlock = 8;
// The backward sums read two rows (dy and x) per row of a block: 8 rows made 16 streams whose
// lines, for rows of a power of two bytes, all fall in the same L1 set and evicted each other
// ((128, 1024) backward: 110 us with 8, 82 us with 4, on one Zen 4 core; rows of 1040 features
// took 74 and 70 us). The order of the rows in each feature's sums is the same either way.
inline constexpr int kSumsRowBlock = 4;

// The row reductions read a block of rows feature block by feature block, so each row is a short
// stream the hardware prefetchers barely follow: they prefetch every line themselves, into L2
// (prefetcht1), this far ahead. Prefetches into L1 (prefetcht0) held the few L1 miss buffers and
// gained nothing; L2 prefetches doubled a core's rate on the (65536, 512) statistics (Zen 4).
inline constexpr Index kRowPrefetchMin = Index{32} << 10;
inline constexpr Index kRowPrefetchMax = Index{256} << 10;

// Two row blocks ahead (rows are usually back to back), within [kRowPrefetchMin, kRowPrefetchMax].
template <class T>
Index row_prefetch_distance(Index features) {
  const Index bytes = 2 * kRowBlock * features * Index{sizeof(T)};
  return bytes < kRowPrefetchMin ? kRowPrefetchMin
                                 : (bytes > kRowPrefetchMax ? kRowPrefetchMax : bytes);
}

template <class T>
__attribute__((always_inline)) inline void prefetch_row(const T* row, Index features,
                                                        Index distance) {
  const char* ahead = reinterpret_cast<const char*>(row) + distance;
  const Index bytes = features * Index{sizeof(T)};
  for (Index b = 0; b < bytes; b += 64) __builtin_prefetch(ahead + b, 0, 2);
}

// Rows of at most kMaxPackedFeatures features lying back to back are reduced several to a block of
// lanes: kLanes / features whole rows, lane j taking feature j % features of each block's row
// j / features (the lanes past the last whole row add what follows and are never read). One row
// to a block left most lanes idle and paid a tail load per row: (32, 224, 224, 3) channels-last
// took 32% of the copy probe's speed in training, 22% in backward. A run's blocks alternate
// between two sets of sums (independent chains of additions); at the chunk's end the sets are
// added, then a feature's lanes in lane order: the result depends only on the chunk's rows.
inline constexpr Index kMaxPackedFeatures = kLanes / 2;

// Lanes of a packed block that hold whole rows.
inline int packed_lanes(Index features) { return static_cast<int>(kLanes / features * features); }

// Calls add(i, sums, tail) for the packed block at element i of a run of n elements, for each
// block in order: sums is `even` or `odd` by turns from the run's start (two independent chains of
// additions); tail is 0 where a whole block of kLanes elements can be loaded, else the elements
// left (load and use only those: whole rows, fewer than kLanes, so at most `lanes`). The loop of
// pairs names each set directly, so its sums stay in registers.
template <class Sums, class Add>
__attribute__((always_inline)) inline void for_each_packed_block(Index n, int lanes, Sums& even,
                                                                 Sums& odd, Add&& add) {
  Index i = 0;
  for (; i + lanes + kLanes <= n; i += 2 * lanes) {
    add(i, even, 0);
    add(i + lanes, odd, 0);
  }
  for (bool second = false; i < n; i += lanes, second = !second) {
    const int tail = n - i >= kLanes ? 0 : static_cast<int>(n - i);
    if (second) {
      add(i, odd, tail);
    } else {
      add(i, even, tail);
    }
  }
}

// Feature c's copies in a and in b (at c, c + features, ... below width), added in that order
// into a[c] and b[c].
inline void fold_copies(double* a, double* b, Index features, Index width) {
  for (Index c = 0; c < features; ++c) {
    double total_a = 0.0, total_b = 0.0;
    for (Index k = c; k < width; k += features) {
      total_a += a[k];
      total_b += b[k];
    }
    a[c] = total_a;
    b[c] = total_b;
  }
}

// A chunk without a valid row: zero moments for every feature, and a count of 0 (a loop, not
// std::fill: no shared template instantiated for this target).
inline Index no_valid_rows(Index features, double* mean, double* m2) {
  for (Index c = 0; c < features; ++c) mean[c] = m2[c] = 0.0;
  return 0;
}

// Each feature's mean and sum of squared deviations from its shifted sums over `count` rows.
inline void moments_of_rows(double count, const double* shift, const double* sum,
                            const double* squares, Index features, double* mean, double* m2) {
  for (Index c = 0; c < features; ++c) {
    const Moments m = detail::moments_from_shifted_sums(count, shift[c], sum[c], squares[c]);
    mean[c] = m.mean;
    m2[c] = m.m2;
  }
}

template <class T>
Index packed_row_moments(const Plan& plan, const T* x, Index u0, Index u1, double* mean,
                         double* m2) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const int lanes = packed_lanes(features);
  const T* first_row = x + NestWalker(red, red.count, 1, u0).offset[0];
  // Shift by the chunk's first row, as row_moments does.
  double shift[kLanes] = {};
  for (int j = 0; j < lanes; ++j) shift[j] = as_double(first_row[j % features]);
  ShiftedSums even{load(static_cast<const double*>(shift)), splat(0.0), splat(0.0)};
  ShiftedSums odd = even;
  for_each_row_run(red, 1, u0, u1, true, [&](const std::int64_t* offsets, Index rows) {
    const T* values = x + offsets[0];
    for_each_packed_block(rows * features, lanes, even, odd,
                          [&](Index i, ShiftedSums& sums, int tail) {
                            if (tail == 0) {
                              sums.add_block(values + i);
                            } else {
                              sums.add_tail(values + i, tail, mask_first(tail));
                            }
                          });
  });
  double sum[kLanes], squares[kLanes];
  store(sum, add(even.sum, odd.sum));
  store(squares, add(even.squares, odd.squares));
  fold_copies(sum, squares, features, lanes);
  moments_of_rows(static_cast<double>(u1 - u0), shift, sum, squares, features, mean, m2);
  return u1 - u0;
}

// The chunk's first row whose mask byte is set (operands x, mask), or null.
template <class T>
const T* first_valid_row(const LoopNest& red, const T* x, const std::uint8_t* mask, Index u0,
                         Index u1) {
  NestWalker walk(red, red.count, 2, u0);
  for (Index u = u0; u < u1; ++u, walk.next()) {
    if (mask[walk.offset[1]]) return x + walk.offset[0];
  }
  return nullptr;
}

// packed_row_moments with a mask of one byte per row, the bytes of a run's rows back to back: a
// block's lanes count where their row is valid (its bytes spread to the lanes by one shuffle),
// and the shift is the chunk's first valid row.
template <class T>
Index packed_masked_row_moments(const Plan& plan, const T* x, const std::uint8_t* mask, Index u0,
                                Index u1, double* mean, double* m2) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const int lanes = packed_lanes(features);
  const T* first_row = first_valid_row(red, x, mask, u0, u1);
  if (!first_row) return no_valid_rows(features, mean, m2);
  double shift[kLanes] = {};
  std::uint8_t lane_row[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    if (j < lanes) shift[j] = as_double(first_row[j % features]);
    lane_row[j] = static_cast<std::uint8_t>(j < lanes ? j / features : 0x80);
  }
  ShiftedSums even{load(static_cast<const double*>(shift)), splat(0.0), splat(0.0)};
  ShiftedSums odd = even;
  const int whole_block_rows = lanes / static_cast<int>(features);
  Index count = 0;
  for_each_row_run(red, 2, u0, u1, true, [&](const std::int64_t* offsets, Index rows) {
    const T* values = x + offsets[0];
    const std::uint8_t* valid = mask + offsets[1];  // the mask byte of the block's first row
    Index row = 0;                                  // and the row's index in the run
    // The valid rows are counted apart from the blocks, which then count no lanes (a move from
    // the mask register, a popcount and an add each): an in-cache masked training forward of
    // (8, 64, 64, 3) went from 1.32x to 1.23x a plain one.
    count += nonzero_count(valid, rows);
    for_each_packed_block(
        rows * features, lanes, even, odd, [&](Index i, ShiftedSums& sums, int tail) {
          const int block_rows = tail == 0 ? whole_block_rows : tail / static_cast<int>(features);
          const Mask m = spread_rows(valid, block_rows, rows - row, lane_row);
          valid += block_rows;
          row += block_rows;
          sums.add_selected(tail == 0 ? load_wide(values + i) : widen(load_first(values + i, tail)),
                            m);
        });
  });
  double sum[kLanes], squares[kLanes];
  store(sum, add(even.sum, odd.sum));
  store(squares, add(even.squares, odd.squares));
  fold_copies(sum, squares, features, lanes);
  moments_of_rows(static_cast<double>(count), shift, sum, squares, features, mean, m2);
  return count;
}

// Sums of dy and dy * (x - shift) of one set of a packed run's blocks.
struct BackwardSums {
  D sum_dy = splat(0.0), sum_dyx = splat(0.0);

  // A block of lanes, dy and x centered (on the multiply-add units as in plane_sums).
  __attribute__((always_inline)) void add_block(D g, D centered) {
    sum_dy = add_on_fma(sum_dy, g);
    sum_dyx = add(sum_dyx, mul(g, centered));
  }
};

template <class T>
void packed_row_sums(const Plan& plan, const T* dy, const T* x, const double* shift, Index u0,
                     Index u1, double* sum_dy, double* sum_dyx) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const int lanes = packed_lanes(features);
  double shift_lanes[kLanes] = {};
  for (int j = 0; j < lanes; ++j) shift_lanes[j] = shift[j % features];
  const D m = load(static_cast<const double*>(shift_lanes));
  BackwardSums even, odd;
  for_each_row_run(red, 2, u0, u1, true, [&](const std::int64_t* offsets, Index rows) {
    const T* g = dy + offsets[0];
    const T* v = x + offsets[1];
    for_each_packed_block(
        rows * features, lanes, even, odd, [&](Index i, BackwardSums& sums, int tail) {
          if (tail == 0) {
            sums.add_block(load_wide(g + i), sub_on_fma(load_wide(v + i), m));
            return;
          }
          // Lanes past the data are zeroed after centering, as in plane_sums.
          sums.add_block(widen(load_first(g + i, tail)),
                         select(mask_first(tail), sub(widen(load_first(v + i, tail)), m)));
        });
  });
  double totals[kLanes], centered_totals[kLanes];
  store(totals, add(even.sum_dy, odd.sum_dy));
  store(centered_totals, add(even.sum_dyx, odd.sum_dyx));
  fold_copies(totals, centered_totals, features, lanes);
  for (Index c = 0; c < features; ++c) {
    sum_dy[c] = totals[c];
    sum_dyx[c] = centered_totals[c];
  }
}

// Rows of more features that leave a tail block each ((N, 24): a block and half a block a row) are
// reduced as groups of kLanes / gcd(features, kLanes) consecutive rows, which fill whole blocks,
// read like rows of that many features: (524288, 24) spent 1.6x the time of (262144, 48) in
// training. A run's last rows, fewer than a group, add into the first row's sums as rows of their
// own. At the chunk's end a feature adds its copies in the group in order. (The grouped sums live
// on the stack: three arrays of kMaxGroupedWidth float64 values, 24 KB.)
inline constexpr Index kMaxGroupedWidth = 1024;

inline Index greatest_common_divisor(Index a, Index b) {
  while (b != 0) {
    const Index r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// Rows to a group (1: the rows are reduced one by one).
inline Index row_group(Index features) {
  if (features % kLanes == 0) return 1;
  const Index group = kLanes / greatest_common_divisor(features, kLanes);
  return group * features <= kMaxGroupedWidth ? group : 1;
}

// Calls add(starts, count, width) for the rows of a run of `rows` rows at `values`: blocks of up to
// `block` (at most kRowBlock) whole groups read as rows of width group * features, then blocks of
// the single rows left (width features); starts points at each one's first element.
template <class T, class Add>
__attribute__((always_inline)) inline void for_each_group_block(const T* values, Index rows,
                                                                Index features, Index group,
                                                                int block, Add&& add) {
  const T* starts[kRowBlock];
  Index r = 0;
  while (r + group <= rows) {
    int count = 0;
    for (; count < block && r + group <= rows; ++count, r += group) {
      starts[count] = values + r * features;
    }
    add(starts, count, group * features);
  }
  while (r < rows) {
    int count = 0;
    for (; count < block && r < rows; ++count, ++r) starts[count] = values + r * features;
    add(starts, count, features);
  }
}
static_assert(kSumsRowBlock <= kRowBlock, "for_each_group_block holds at most kRowBlock rows");

// Adds up to kRowBlock rows into per-feature float64 sums of (x - shift) and its square. The sums
// of one feature take the rows in order either way; blocking rows only saves accumulator traffic.
// `first`: the chunk's first block, whose sums start from zero instead of being read (zeroing
// them ahead cost a store per feature and chunk, as much as a few rows' work on short chunks).
template <class T>
void add_rows(const T* const* rows, int count, Index features, const double* shift, double* sum,
              double* squares, Index ahead, bool first) {
  Index c = 0;
  for (; c + kLanes <= features; c += kLanes) {
    const D s = load(shift + c);
    D total = first ? splat(0.0) : load(sum + c);
    D total_squares = first ? splat(0.0) : load(squares + c);
    for (int r = 0; r < count; ++r) {
      prefetch_lanes(rows[r] + c, ahead);
      const D d = sub_on_fma(load_wide(rows[r] + c), s);
      total = add_on_fma(total, d);
      total_squares = add(total_squares, mul(d, d));
    }
    store(sum + c, total);
    store(squares + c, total_squares);
  }
  if (c < features) {
    const int tail = static_cast<int>(features - c);
    const D s = load_first(shift + c, tail);
    D total = first ? splat(0.0) : load_first(sum + c, tail);
    D total_squares = first ? splat(0.0) : load_first(squares + c, tail);
    for (int r = 0; r < count; ++r) {
      const D d = sub(widen(load_first(rows[r] + c, tail)), s);
      total = add(total, d);
      total_squares = add(total_squares, mul(d, d));
    }
    store_first(sum + c, total, tail);
    store_first(squares + c, total_squares, tail);
  }
}

template <class T>
Index grouped_row_moments(const Plan& plan, const T* x, Index group, Index u0, Index u1,
                          double* mean, double* m2) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const Index width = group * features;
  double shift[kMaxGroupedWidth], sum[kMaxGroupedWidth], squares[kMaxGroupedWidth];
  // Shift by the chunk's first row, as row_moments does.
  const T* first_row = x + NestWalker(red, red.count, 1, u0).offset[0];
  for (Index c = 0; c < width; ++c) {
    shift[c] = as_double(first_row[c % features]);
    sum[c] = squares[c] = 0.0;
  }
  const Index ahead = row_prefetch_distance<T>(width);
  for_each_row_run(red, 1, u0, u1, true, [&](const std::int64_t* offsets, Index rows) {
    for_each_group_block(x + offsets[0], rows, features, group, kRowBlock,
                         [&](const T* const* starts, int count, Index columns) {
                           add_rows(starts, count, columns, shift, sum, squares, ahead, false);
                         });
  });
  fold_copies(sum, squares, features, width);
  moments_of_rows(static_cast<double>(u1 - u0), shift, sum, squares, features, mean, m2);
  return u1 - u0;
}

// add_rows for `count` whole groups of `group` rows with a row mask: a lane adds where its row's
// mask byte is set. valid[r] is the mask byte of group r's first row (the group's bytes back to
// back, `readable[r]` bytes readable from there); block c of a group takes lane j from its row
// lane_row[c + j].
template <class T>
void add_masked_groups(const T* const* groups, const std::uint8_t* const* valid,
                       const Index* readable, int count, Index group, Index width,
                       const std::uint8_t* lane_row, const double* shift, double* sum,
                       double* squares, Index ahead) {
  const int rows = static_cast<int>(group);
  for (Index c = 0; c < width; c += kLanes) {
    ShiftedSums block{load(shift + c), load(sum + c), load(squares + c)};
    for (int r = 0; r < count; ++r) {
      prefetch_lanes(groups[r] + c, ahead);
      block.add_selected(load_wide(groups[r] + c),
                         spread_rows(valid[r], rows, readable[r], lane_row + c));
    }
    store(sum + c, block.sum);
    store(squares + c, block.squares);
  }
}

// grouped_row_moments with a mask of one byte per row, the bytes of a run's rows back to back: a
// group's lanes count where their row is valid, as in packed_masked_row_moments (a random 80% mask
// on (524288, 24) made row by row took 1.8x the time of a plain training forward). The shift is
// the chunk's first valid row; a run's last rows, fewer than a group, add as rows of their own.
template <class T>
Index grouped_masked_row_moments(const Plan& plan, const T* x, const std::uint8_t* mask,
                                 Index group, Index u0, Index u1, double* mean, double* m2) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const Index width = group * features;
  const T* first_row = first_valid_row(red, x, mask, u0, u1);
  if (!first_row) return no_valid_rows(features, mean, m2);
  double shift[kMaxGroupedWidth], sum[kMaxGroupedWidth], squares[kMaxGroupedWidth];
  std::uint8_t lane_row[kMaxGroupedWidth];
  for (Index c = 0; c < width; ++c) {
    shift[c] = as_double(first_row[c % features]);
    sum[c] = squares[c] = 0.0;
    lane_row[c] = static_cast<std::uint8_t>(c / features);
  }
  const Index ahead = row_prefetch_distance<T>(width);
  Index count = 0;
  for_each_row_run(red, 2, u0, u1, true, [&](const std::int64_t* offsets, Index rows) {
    const T* values = x + offsets[0];
    const std::uint8_t* run_mask = mask + offsets[1];
    count += nonzero_count(run_mask, rows);
    for_each_group_block(values, rows, features, group, kRowBlock,
                         [&](const T* const* starts, int n, Index columns) {
                           if (columns == width) {
                             const std::uint8_t* valid[kRowBlock];
                             Index readable[kRowBlock];
                             for (int i = 0; i < n; ++i) {
                               const Index row = (starts[i] - values) / features;
                               valid[i] = run_mask + row;
                               readable[i] = rows - row;
                             }
                             add_masked_groups(starts, valid, readable, n, group, width, lane_row,
                                               shift, sum, squares, ahead);
                             return;
                           }
                           const T* kept[kRowBlock];
                           int kept_count = 0;
                           for (int i = 0; i < n; ++i) {
                             if (run_mask[(starts[i] - values) / features])
                               kept[kept_count++] = starts[i];
                           }
                           if (kept_count > 0)
                             add_rows(kept, kept_count, features, shift, sum, squares, ahead,
                                      false);
                         });
  });
  fold_copies(sum, squares, features, width);
  moments_of_rows(static_cast<double>(count), shift, sum, squares, features, mean, m2);
  return count;
}

template <class T>
Index row_moments(const Plan& plan, const T* x, const std::uint8_t* mask, Index u0, Index u1,
                  double* scratch, double* mean, double* m2) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  if (u0 < u1 && rows_back_to_back(red, features, 1)) {
    if (!mask && features <= kMaxPackedFeatures) {
      return packed_row_moments(plan, x, u0, u1, mean, m2);
    }
    // A row mask with its bytes back to back (the mask operand steps one byte a row).
    const bool row_bytes = mask && red.dims[red.count - 1].stride[1] == 1;
    if (row_bytes && features <= kMaxPackedFeatures) {
      return packed_masked_row_moments(plan, x, mask, u0, u1, mean, m2);
    }
    const Index group = row_group(features);
    if (group > 1 && !mask) return grouped_row_moments(plan, x, group, u0, u1, mean, m2);
    if (group > 1 && row_bytes) {
      return grouped_masked_row_moments(plan, x, mask, group, u0, u1, mean, m2);
    }
  }
  double* shift = scratch;
  double* sum = scratch + features;
  double* squares = sum + features;
  const Index ahead = row_prefetch_distance<T>(features);
  const T* rows[kRowBlock];
  int pending = 0;
  Index count = 0;
  NestWalker walk(red, red.count, mask ? 2 : 1, u0);
  for (Index u = u0; u < u1; ++u, walk.next()) {
    const T* row = x + walk.offset[0];
    if (mask && !mask[walk.offset[1]]) {
      // add_rows prefetches, for each row it reads, the row `ahead` bytes past it: a skipped row
      // still prefetches its own, which would otherwise come from memory on demand (each 1% of
      // rows skipped cost 4% of the time on (32, 112, 112, 64)).
      prefetch_row(row, features, ahead);
      continue;
    }
    if (count++ == 0) {
      // Shift by the chunk's first valid row: sums stay near the data's spread.
      for (Index c = 0; c < features; ++c) shift[c] = as_double(row[c]);
    }
    rows[pending++] = row;
    if (pending == kRowBlock) {
      add_rows(rows, pending, features, shift, sum, squares, ahead, count == kRowBlock);
      pending = 0;
    }
  }
  if (pending > 0) add_rows(rows, pending, features, shift, sum, squares, ahead, count == pending);
  if (count == 0) return no_valid_rows(features, mean, m2);
  moments_of_rows(static_cast<double>(count), shift, sum, squares, features, mean, m2);
  return count;
}

template <class T>
void add_backward_rows(const T* const* dy_rows, const T* const* x_rows, int count, Index features,
                       const double* shift, double* sum_dy, double* sum_dyx, Index ahead,
                       bool first) {
  Index c = 0;
  for (; c + kLanes <= features; c += kLanes) {
    const D m = load(shift + c);
    D total = first ? splat(0.0) : load(sum_dy + c);
    D total_x = first ? splat(0.0) : load(sum_dyx + c);
    for (int r = 0; r < count; ++r) {
      prefetch_lanes(dy_rows[r] + c, ahead);
      prefetch_lanes(x_rows[r] + c, ahead);
      // On the multiply-add units as in plane_sums.
      const D g = load_wide(dy_rows[r] + c);
      total = add_on_fma(total, g);
      total_x = add(total_x, mul(g, sub_on_fma(load_wide(x_rows[r] + c), m)));
    }
    store(sum_dy + c, total);
    store(sum_dyx + c, total_x);
  }
  if (c < features) {
    const int tail = static_cast<int>(features - c);
    const D m = load_first(shift + c, tail);
    D total = first ? splat(0.0) : load_first(sum_dy + c, tail);
    D total_x = first ? splat(0.0) : load_first(sum_dyx + c, tail);
    for (int r = 0; r < count; ++r) {
      const D g = widen(load_first(dy_rows[r] + c, tail));
      total = add(total, g);
      total_x = add(total_x, mul(g, sub(widen(load_first(x_rows[r] + c, tail)), m)));
    }
    store_first(sum_dy + c, total, tail);
    store_first(sum_dyx + c, total_x, tail);
  }
}

template <class T>
void grouped_row_sums(const Plan& plan, const T* dy, const T* x, const double* shift, Index group,
                      Index u0, Index u1, double* sum_dy, double* sum_dyx) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const Index width = group * features;
  double shift_copies[kMaxGroupedWidth], totals[kMaxGroupedWidth],
      centered_totals[kMaxGroupedWidth];
  for (Index c = 0; c < width; ++c) {
    shift_copies[c] = shift[c % features];
    totals[c] = centered_totals[c] = 0.0;
  }
  const Index ahead = row_prefetch_distance<T>(width);
  for_each_row_run(red, 2, u0, u1, true, [&](const std::int64_t* offsets, Index rows) {
    // x's rows lie in its run as dy's do in theirs.
    const T* dy_run = dy + offsets[0];
    const T* x_run = x + offsets[1];
    for_each_group_block(dy_run, rows, features, group, kSumsRowBlock,
                         [&](const T* const* dy_rows, int count, Index columns) {
                           const T* x_rows[kSumsRowBlock];
                           for (int r = 0; r < count; ++r)
                             x_rows[r] = x_run + (dy_rows[r] - dy_run);
                           add_backward_rows(dy_rows, x_rows, count, columns, shift_copies, totals,
                                             centered_totals, ahead, false);
                         });
  });
  fold_copies(totals, centered_totals, features, width);
  for (Index c = 0; c < features; ++c) {
    sum_dy[c] = totals[c];
    sum_dyx[c] = centered_totals[c];
  }
}

template <class T>
void row_sums(const Plan& plan, const T* dy, const T* x, const double* shift, Index u0, Index u1,
              double* sum_dy, double* sum_dyx) {
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  if (u0 == u1) {
    for (Index c = 0; c < features; ++c) sum_dy[c] = sum_dyx[c] = 0.0;
    return;
  }
  if (rows_back_to_back(red, features, 2)) {
    if (features <= kMaxPackedFeatures) {
      packed_row_sums(plan, dy, x, shift, u0, u1, sum_dy, sum_dyx);
      return;
    }
    const Index group = row_group(features);
    if (group > 1) {
      grouped_row_sums(plan, dy, x, shift, group, u0, u1, sum_dy, sum_dyx);
      return;
    }
  }
  const Index ahead = row_prefetch_distance<T>(features);
  const T* dy_rows[kSumsRowBlock];
  const T* x_rows[kSumsRowBlock];
  int pending = 0;
  bool first = true;  // (as in row_moments: the first block's sums start from zero)
  NestWalker walk(red, red.count, 2, u0);
  for (Index u = u0; u < u1; ++u, walk.next()) {
    dy_rows[pending] = dy + walk.offset[0];
    x_rows[pending++] = x + walk.offset[1];
    if (pending == kSumsRowBlock) {
      add_backward_rows(dy_rows, x_rows, pending, features, shift, sum_dy, sum_dyx, ahead, first);
      pending = 0;
      first = false;
    }
  }
  if (pending > 0) {
    add_backward_rows(dy_rows, x_rows, pending, features, shift, sum_dy, sum_dyx, ahead, first);
  }
}

// Rows whose features fill whole blocks of lanes go kRowsTogether at a time: each block of
// coefficients is then loaded once for those rows, where a flat span loads it for every row
// (three or four loads a block of lanes against the data's one or two: in cache, the load ports
// bounded these passes; (64, 256) inference went from 1.9 to 1.7 us). Each element takes the same
// operations. Outputs written with streaming stores (large, from memory) keep the flat spans.
inline constexpr int kRowsTogether = 4;
// Rows longer than this stay one at a time: rows 4 KB apart fall into the same sets of the L1
// cache, and four of them with their outputs thrashed it ((128, 1024) inference 1.5x the time).
inline constexpr Index kMaxRowsTogetherBytes = 2048;

template <class T>
bool rows_together(Index rows, Index features, bool nontemporal) {
  return !nontemporal && rows >= kRowsTogether && features % kLanes == 0 &&
         features * Index{sizeof(T)} <= kMaxRowsTogetherBytes;
}

// y = (x - shift) * scale + offset over R rows of `features` elements from x and y.
template <int R, class T, class A>
__attribute__((always_inline)) inline void affine_row_group(const T* x, T* y, Index features,
                                                            const A* const (&k)[3]) {
  for (Index c = 0; c < features; c += kLanes) {
    const UniformCoefficients<A, 3> block{{load(k[0] + c), load(k[1] + c), load(k[2] + c)}};
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const Index i = r * features + c;
      prefetch_lanes(x + i, kSpanPrefetchBytes);
      store(y + i, normalized<A>(load(x + i), block));
    }
  }
}

template <class T, class A>
void affine_rows(const T* x, T* y, Index rows, Index features, const A* const (&k)[3]) {
  Index r = 0;
  for (; r + kRowsTogether <= rows; r += kRowsTogether) {
    affine_row_group<kRowsTogether>(x + r * features, y + r * features, features, k);
  }
  for (; r < rows; ++r) affine_row_group<1>(x + r * features, y + r * features, features, k);
}

// dx = scale * (dy - (offset + (x - shift) * slope)) over R rows of `features` elements.
template <int R, class T, class A>
__attribute__((always_inline)) inline void dx_row_group(const T* dy, const T* x, T* dx,
                                                        Index features, const A* const (&k)[4]) {
  for (Index c = 0; c < features; c += kLanes) {
    const UniformCoefficients<A, 4> block{
        {load(k[0] + c), load(k[1] + c), load(k[2] + c), load(k[3] + c)}};
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const Index i = r * features + c;
      prefetch_lanes(dy + i, kSpanPrefetchBytes);
      prefetch_lanes(x + i, kSpanPrefetchBytes);
      store(dx + i, dx_from<A>(load(dy + i), dx_correction<A>(load(x + i), block), block));
    }
  }
}

template <class T, class A>
void dx_rows(const T* dy, const T* x, T* dx, Index rows, Index features, const A* const (&k)[4]) {
  Index r = 0;
  for (; r + kRowsTogether <= rows; r += kRowsTogether) {
    const Index at = r * features;
    dx_row_group<kRowsTogether>(dy + at, x + at, dx + at, features, k);
  }
  for (; r < rows; ++r) {
    const Index at = r * features;
    dx_row_group<1>(dy + at, x + at, dx + at, features, k);
  }
}

// Rows whose coefficient arrays outgrow the L1 cache (three of 2048 floats took 24 KB of its
// 32) go a tile of kWideTileBytes of data at a time, over blocks of kWideRowBlock rows: the
// tile's coefficients stay in L1 while its rows stream. As one span, (6272, 4096) inference ran
// at 46% of the copy probe, (12544, 2048) at 60-77%, against 92-94% at 512 to 1536 features.
// The dx pass keeps its spans: tiled alike, its (6272, 4096) and (256, 7, 7, 2048) backwards
// stayed at 72-79%.
inline constexpr Index kWideRowCoefficientBytes = 4096;
inline constexpr Index kWideTileBytes = kMinStreamBytes;  // (streamed where the output is)
inline constexpr Index kWideRowBlock = 8;

template <class A>
bool wide_rows(Index features) {
  return features * Index{sizeof(A)} > kWideRowCoefficientBytes;
}

template <class T, class A>
void affine_wide_rows(const T* x, T* y, Index rows, Index features, const A* const (&k)[3],
                      bool nontemporal) {
  const Index tile = kWideTileBytes / Index{sizeof(T)};
  for (Index r0 = 0; r0 < rows; r0 += kWideRowBlock) {
    const Index r1 = min_index(rows, r0 + kWideRowBlock);
    for (Index c0 = 0; c0 < features; c0 += tile) {
      const Index n = min_index(tile, features - c0);
      for (Index r = r0; r < r1; ++r) {
        const Index at = r * features + c0;
        affine_span<true>(x + at, y + at, n, PeriodicCoefficients<A, 3>(k, c0, features),
                          nontemporal);
      }
    }
  }
}

template <class T>
void row_affine(const Plan& plan, const T* x, T* y,
                AffineCoefficients<const detail::compute_t<T>*> k, Index u0, Index u1,
                bool nontemporal) {
  using A = detail::compute_t<T>;
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const LoopDim& inner = red.dims[red.count - 1];
  const bool contiguous = inner.stride[0] == features && inner.stride[1] == features;
  const A* const arrays[3] = {k.shift, k.scale, k.offset};
  for_each_row_run(red, 2, u0, u1, contiguous, [&](const std::int64_t* offsets, Index rows) {
    const T* in = x + offsets[0];
    T* out = y + offsets[1];
    if (rows_together<T>(rows, features, nontemporal)) {
      affine_rows(in, out, rows, features, arrays);
    } else if (wide_rows<A>(features)) {
      affine_wide_rows(in, out, rows, features, arrays, nontemporal);
    } else {
      affine_span<true>(in, out, rows * features, PeriodicCoefficients<A, 3>(arrays, 0, features),
                        nontemporal);
    }
  });
  if (nontemporal) stream_fence();
}

template <class T>
void row_dx(const Plan& plan, const T* dy, const T* x, T* dx, const std::uint8_t* mask,
            DxCoefficients<const detail::compute_t<T>*> k, Index u0, Index u1, bool nontemporal) {
  using A = detail::compute_t<T>;
  const LoopNest& red = plan.reduced;
  const Index features = plan.stat.dims[plan.stat.count - 1].size;
  const LoopDim& inner = red.dims[red.count - 1];
  // A row mask whose bytes lie back to back (one a row) keeps the runs: each stretch of rows
  // alike goes as one span. Row by row, (8, 64, 64, 3) channels-last backward after a masked
  // forward took 14x the time of an unmasked one (a call per row of three elements).
  const bool mask_runs = !mask || inner.stride[3] == 1;
  const bool contiguous = mask_runs && inner.stride[0] == features && inner.stride[1] == features &&
                          inner.stride[2] == features;
  const A* const arrays[4] = {k.shift, k.scale, k.slope, k.offset};
  // Rows of a few features under such a mask go as one span whose blocks take their rows' bytes
  // (RowLanes): a random mask leaves stretches of a few rows, and a call each for three-feature
  // rows took 3x the time of the unmasked pass. The portable baseline spreads the bytes lane by
  // lane and keeps the stretches: padding masks (long stretches) took 2x the time with its lanes.
  std::optional<RowLanes> rows_lanes;
  if (kShuffledRows && mask && mask_runs && features <= kLanes) rows_lanes.emplace(features);
  for_each_row_run(
      red, plan.operands, u0, u1, contiguous, [&](const std::int64_t* offsets, Index rows) {
        const PeriodicCoefficients<A, 4> coefficients(arrays, 0, features);
        const T* g = dy + offsets[0];
        const T* v = x + offsets[1];
        T* out = dx + offsets[2];
        if (rows_lanes) {
          dx_span<Valid::masked, true>(g, v, out, RowLanesAt{&*rows_lanes, mask + offsets[3], rows},
                                       rows * features, coefficients, nontemporal);
        } else if (mask) {  // (a single row where the runs are not kept: one stretch)
          const std::uint8_t* valid = mask + offsets[3];
          for (Index r = 0; r < rows;) {
            const bool on = valid[r] != 0;
            Index end = r + 1;
            while (end < rows && (valid[end] != 0) == on) ++end;
            const Index at = r * features, n = (end - r) * features;
            if (on) {
              dx_span<Valid::all, true>(g + at, v + at, out + at, mask, n, coefficients,
                                        nontemporal);
            } else {
              dx_span<Valid::none, true>(g + at, v + at, out + at, mask, n, coefficients,
                                         nontemporal);
            }
            r = end;
          }
        } else if (rows_together<T>(rows, features, nontemporal)) {
          dx_rows(g, v, out, rows, features, arrays);
        } else {
          dx_span<Valid::all, true>(g, v, out, mask, rows * features, coefficients, nontemporal);
        }
      });
  if (nontemporal) stream_fence();
}

// ChunkKernels::merge_moments, in this instruction set's vectors: compiled with the baseline
// build's SSE2, the merge of a row layout's chunks took a tenth of a (128, 1024) training call.
// Each feature takes the same operations in the same order as a scalar loop would.
inline void merge_moments(const double* chunk_mean, const double* chunk_m2, double mean_weight,
                          double m2_weight, double* mean, double* m2, Index n) {
  const D w = splat(mean_weight), w2 = splat(m2_weight);
  Index c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const D m = load(mean + c);
    const D delta = sub(load(chunk_mean + c), m);
    store(mean + c, add(m, mul(delta, w)));
    store(m2 + c, add(load(m2 + c), add(load(chunk_m2 + c), mul(mul(delta, delta), w2))));
  }
  if (c < n) {
    const int tail = static_cast<int>(n - c);
    const D m = load_first(mean + c, tail);
    const D delta = sub(load_first(chunk_mean + c, tail), m);
    store_first(mean + c, add(m, mul(delta, w)), tail);
    store_first(m2 + c,
                add(load_first(m2 + c, tail),
                    add(load_first(chunk_m2 + c, tail), mul(mul(delta, delta), w2))),
                tail);
  }
}

template <class T>
ChunkKernels<T> make_kernels() {
  using A = detail::compute_t<T>;
  return {&plane_moments<T>,
          &plane_affine<T>,
          &plane_sums<T>,
          &plane_dx<T>,
          &row_moments<T>,
          &row_affine<T>,
          &row_sums<T>,
          &row_dx<T>,
          &plain_train_coefficients<A>,
          &inference_coefficients<A>,
          &backward_coefficients<A>,
          &merge_moments};
}

// The kernels of every element type (detail::Elements), as the dispatch keeps them.
template <class... Es>
KernelSet make_kernel_set(detail::TypeList<Es...>) {
  return {make_kernels<typename Es::type>()...};
}

}  // namespace batchnorm::cpu::BATCHNORM_CPU_NS
