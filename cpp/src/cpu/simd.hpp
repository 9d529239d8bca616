// Vector primitives of one instruction set for the chunk kernels (cpu/chunk_kernels.hpp). Every
// instruction set offers the same 16-lane blocks (F: float, D: double), so the kernels are written
// once and their reductions have the same lane structure everywhere.
// Not a normal header: a kernel translation unit (cpp/src/cpu/isa_*.cpp) includes it once, inside
// its target region, with BATCHNORM_CPU_NS naming the instruction set and BATCHNORM_CPU_AVX512 or
// BATCHNORM_CPU_AVX2 defined (neither: the portable baseline).
#ifndef BATCHNORM_CPU_NS
#error "cpu/simd.hpp is included by the kernel translation units only (cpp/src/cpu/isa_*.cpp)"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/half.hpp"

#if defined(BATCHNORM_CPU_AVX512) || defined(BATCHNORM_CPU_AVX2) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace batchnorm::cpu::BATCHNORM_CPU_NS {

using detail::bfloat16;
using detail::float16;

// Lanes per block on every instruction set.
inline constexpr int kLanes = 16;
// Streaming (non-temporal) stores start at this byte alignment: whole cache lines.
inline constexpr std::uintptr_t kStreamAlign = 64;

#if defined(BATCHNORM_CPU_AVX512)

// Statistics a reduction over short runs keeps in registers at once: each takes six of the 32
// vector registers (its shift, sum and sum of squares, two each).
inline constexpr int kRegisterStats = 4;
// Whether spread_rows is one shuffle (a lane loop on the portable baseline).
inline constexpr bool kShuffledRows = true;

struct F {
  __m512 v;
};
struct D {
  __m512d lo, hi;
};
using Mask = __mmask16;

inline F splat(float a) { return {_mm512_set1_ps(a)}; }
inline D splat(double a) { return {_mm512_set1_pd(a), _mm512_set1_pd(a)}; }
inline F add(F a, F b) { return {_mm512_add_ps(a.v, b.v)}; }
inline D add(D a, D b) { return {_mm512_add_pd(a.lo, b.lo), _mm512_add_pd(a.hi, b.hi)}; }
inline F sub(F a, F b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline D sub(D a, D b) { return {_mm512_sub_pd(a.lo, b.lo), _mm512_sub_pd(a.hi, b.hi)}; }
inline F mul(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline D mul(D a, D b) { return {_mm512_mul_pd(a.lo, b.lo), _mm512_mul_pd(a.hi, b.hi)}; }
inline F fmadd(F a, F b, F c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline D fmadd(D a, D b, D c) {
  return {_mm512_fmadd_pd(a.lo, b.lo, c.lo), _mm512_fmadd_pd(a.hi, b.hi, c.hi)};
}
// a + b and a - b, rounded exactly as add and sub round them (a * 1 is exact), but issued to the
// multiply-add units: reductions that would queue every operation on the adders (Zen 4 has two
// of each) then spread over both kinds.
inline D add_on_fma(D a, D b) {
  const __m512d one = _mm512_set1_pd(1.0);
  return {_mm512_fmadd_pd(a.lo, one, b.lo), _mm512_fmadd_pd(a.hi, one, b.hi)};
}
inline D sub_on_fma(D a, D b) {
  const __m512d one = _mm512_set1_pd(1.0);
  return {_mm512_fmsub_pd(a.lo, one, b.lo), _mm512_fmsub_pd(a.hi, one, b.hi)};
}
inline D widen(F a) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1));
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(a.v)), _mm512_cvtps_pd(high)};
}
// widen(load(p)) converting each half from memory: no shuffle to split a loaded vector (one
// fewer instruction per 16 values in the statistics' and sums' arithmetic-bound loops).
inline D load_wide(const float* p) {
  return {_mm512_cvtps_pd(_mm256_loadu_ps(p)), _mm512_cvtps_pd(_mm256_loadu_ps(p + 8))};
}
inline D load_wide(const float16* p) {
  const __m128i* bits = reinterpret_cast<const __m128i*>(p);
  return {_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(bits))),
          _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(bits + 1)))};
}
// Eight bfloat16 lanes as float32 (the 16-lane form follows below; the AVX2 kernels have this
// one too).
inline __m256 widen_bfloat16(__m128i bits) {
  // Value j to the high half of lane j, the low halves zeroed (one permutation).
  const __m256i to_high_halves = _mm256_set_epi16(7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
  return _mm256_castsi256_ps(
      _mm256_maskz_permutexvar_epi16(0xaaaa, to_high_halves, _mm256_castsi128_si256(bits)));
}
inline D load_wide(const bfloat16* p) {
  const __m128i* bits = reinterpret_cast<const __m128i*>(p);
  return {_mm512_cvtps_pd(widen_bfloat16(_mm_loadu_si128(bits))),
          _mm512_cvtps_pd(widen_bfloat16(_mm_loadu_si128(bits + 1)))};
}

inline Mask mask_first(int n) { return static_cast<Mask>((1u << n) - 1u); }
inline Mask mask_bytes(const std::uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm_test_epi8_mask(bytes, bytes);
}
inline Mask mask_bytes_first(const std::uint8_t* p, int n) {
  const __m128i bytes = _mm_maskz_loadu_epi8(mask_first(n), p);
  return _mm_test_epi8_mask(bytes, bytes);
}
// Lane j set where rows[lane_row[j]] is nonzero, for the first n rows. lane_row[j] is below 16,
// or at least 0x80 for a lane left unset (below 0x80 the shuffles read only its low four bits).
// The caller may read `readable` bytes at rows (at least n).
inline Mask spread_rows(const std::uint8_t* rows, int n, std::int64_t /* readable */,
                        const std::uint8_t* lane_row) {
  const __m128i bytes = _mm_maskz_loadu_epi8(mask_first(n), rows);
  const __m128i lanes =
      _mm_shuffle_epi8(bytes, _mm_loadu_si128(reinterpret_cast<const __m128i*>(lane_row)));
  return _mm_test_epi8_mask(lanes, lanes);
}
inline int lanes_set(Mask m) { return __builtin_popcount(m); }
// Nonzero bytes among the n at p, 64 at a time.
inline std::int64_t nonzero_count(const std::uint8_t* p, std::int64_t n) {
  std::int64_t count = 0, i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i bytes = _mm512_loadu_si512(p + i);
    count += __builtin_popcountll(_mm512_test_epi8_mask(bytes, bytes));
  }
  if (i < n) {
    const __m512i bytes = _mm512_maskz_loadu_epi8(~std::uint64_t{0} >> (64 - (n - i)), p + i);
    count += __builtin_popcountll(_mm512_test_epi8_mask(bytes, bytes));
  }
  return count;
}
inline F select(Mask m, F a) { return {_mm512_maskz_mov_ps(m, a.v)}; }
// Lanes of a where m is set, of b elsewhere.
inline F blend(Mask m, F a, F b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
inline D blend(Mask m, D a, D b) {
  return {_mm512_mask_blend_pd(static_cast<__mmask8>(m), b.lo, a.lo),
          _mm512_mask_blend_pd(static_cast<__mmask8>(m >> 8), b.hi, a.hi)};
}
inline D select(Mask m, D a) {
  return {_mm512_maskz_mov_pd(static_cast<__mmask8>(m), a.lo),
          _mm512_maskz_mov_pd(static_cast<__mmask8>(m >> 8), a.hi)};
}
// select(m, sub(a, b)) in one instruction per half, on the multiply-add units (as sub_on_fma).
inline D sub_select_on_fma(Mask m, D a, D b) {
  const __m512d one = _mm512_set1_pd(1.0);
  return {_mm512_maskz_fmsub_pd(static_cast<__mmask8>(m), a.lo, one, b.lo),
          _mm512_maskz_fmsub_pd(static_cast<__mmask8>(m >> 8), a.hi, one, b.hi)};
}

inline F load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline D load(const double* p) { return {_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8)}; }
inline F load(const float16* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline F widen_bfloat16(__m256i bits) {
  // Value j to the high half of lane j, the low halves zeroed: one permutation, where a widening
  // and a shift took two (measured on AMD Zen 4, in cache, one thread: a bfloat16 backward 5%
  // faster; Intel's AVX-512 cores split this permutation in two micro-operations).
  const __m512i to_high_halves =
      _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0,
                       3, 0, 2, 0, 1, 0, 0, 0);
  return {_mm512_castsi512_ps(
      _mm512_maskz_permutexvar_epi16(0xaaaaaaaau, to_high_halves, _mm512_castsi256_si512(bits)))};
}
inline F load(const bfloat16* p) {
  return widen_bfloat16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Tails: masked loads and stores touch no element past n.
inline F load_first(const float* p, int n) { return {_mm512_maskz_loadu_ps(mask_first(n), p)}; }
inline D load_first(const double* p, int n) {
  const Mask m = mask_first(n);
  return {_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p),
          _mm512_maskz_loadu_pd(static_cast<__mmask8>(m >> 8), p + 8)};
}
inline F load_first(const float16* p, int n) {
  return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask_first(n), p))};
}
inline F load_first(const bfloat16* p, int n) {
  return widen_bfloat16(_mm256_maskz_loadu_epi16(mask_first(n), p));
}

inline __m256i to_float16_bits(F a) {
  return _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// Round to nearest even; a NaN stays a quiet NaN (as detail::to_bfloat16). Six operations: a
// bfloat16 output pass was bound by its conversion's ten (the whole 2^32 float patterns give the
// same bits as detail::to_bfloat16 with either).
inline __m256i to_bfloat16_bits(F a) {
  const __m512i bits = _mm512_castps_si512(a.v);
  // Add 0x7fff, or 0x8000 where the kept half is odd (its lowest bit, bit 16, set).
  const __mmask16 odd = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x10000));
  __m512i rounded = _mm512_mask_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd,
                                          bits, _mm512_set1_epi32(0x8000));
  // A NaN keeps its high half with the quiet bit (bit 22) set.
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
  // Each lane's high half, in lane order, to the low 256 bits (one permutation).
  const __m512i high_halves =
      _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 31, 29, 27, 25, 23, 21, 19,
                       17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi16(high_halves, rounded));
}

inline void store(float* p, F a) { _mm512_storeu_ps(p, a.v); }
inline void store(double* p, D a) {
  _mm512_storeu_pd(p, a.lo);
  _mm512_storeu_pd(p + 8, a.hi);
}
inline void store(float16* p, F a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_float16_bits(a));
}
inline void store(bfloat16* p, F a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bfloat16_bits(a));
}
inline void store_first(float* p, F a, int n) { _mm512_mask_storeu_ps(p, mask_first(n), a.v); }
inline void store_first(double* p, D a, int n) {
  const Mask m = mask_first(n);
  _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), a.lo);
  _mm512_mask_storeu_pd(p + 8, static_cast<__mmask8>(m >> 8), a.hi);
}
inline void store_first(float16* p, F a, int n) {
  _mm256_mask_storeu_epi16(p, mask_first(n), to_float16_bits(a));
}
inline void store_first(bfloat16* p, F a, int n) {
  _mm256_mask_storeu_epi16(p, mask_first(n), to_bfloat16_bits(a));
}

// Non-temporal stores of a whole block; p is aligned to the block's size (at most 64 bytes).
inline void stream(float* p, F a) { _mm512_stream_ps(p, a.v); }
inline void stream(double* p, D a) {
  _mm512_stream_pd(p, a.lo);
  _mm512_stream_pd(p + 8, a.hi);
}
inline void stream(float16* p, F a) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_float16_bits(a));
}
inline void stream(bfloat16* p, F a) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bfloat16_bits(a));
}
inline void stream_fence() { _mm_sfence(); }

#elif defined(BATCHNORM_CPU_AVX2)

// One statistic's shift, sum and sum of squares take twelve of the 16 vector registers.
inline constexpr int kRegisterStats = 1;
inline constexpr bool kShuffledRows = true;

struct F {
  __m256 lo, hi;
};
struct D {
  __m256d v0, v1, v2, v3;
};
// One byte per lane, 0xff where the lane is selected.
struct Mask {
  __m128i bytes;
};

inline F splat(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline D splat(double a) {
  const __m256d v = _mm256_set1_pd(a);
  return {v, v, v, v};
}
inline F add(F a, F b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline D add(D a, D b) {
  return {_mm256_add_pd(a.v0, b.v0), _mm256_add_pd(a.v1, b.v1), _mm256_add_pd(a.v2, b.v2),
          _mm256_add_pd(a.v3, b.v3)};
}
inline F sub(F a, F b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline D sub(D a, D b) {
  return {_mm256_sub_pd(a.v0, b.v0), _mm256_sub_pd(a.v1, b.v1), _mm256_sub_pd(a.v2, b.v2),
          _mm256_sub_pd(a.v3, b.v3)};
}
inline F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline D mul(D a, D b) {
  return {_mm256_mul_pd(a.v0, b.v0), _mm256_mul_pd(a.v1, b.v1), _mm256_mul_pd(a.v2, b.v2),
          _mm256_mul_pd(a.v3, b.v3)};
}
inline F fmadd(F a, F b, F c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline D fmadd(D a, D b, D c) {
  return {_mm256_fmadd_pd(a.v0, b.v0, c.v0), _mm256_fmadd_pd(a.v1, b.v1, c.v1),
          _mm256_fmadd_pd(a.v2, b.v2, c.v2), _mm256_fmadd_pd(a.v3, b.v3, c.v3)};
}
// a + b and a - b on the multiply-add units, rounded as add and sub round them (as for AVX-512).
inline D add_on_fma(D a, D b) {
  const __m256d one = _mm256_set1_pd(1.0);
  return {_mm256_fmadd_pd(a.v0, one, b.v0), _mm256_fmadd_pd(a.v1, one, b.v1),
          _mm256_fmadd_pd(a.v2, one, b.v2), _mm256_fmadd_pd(a.v3, one, b.v3)};
}
inline D sub_on_fma(D a, D b) {
  const __m256d one = _mm256_set1_pd(1.0);
  return {_mm256_fmsub_pd(a.v0, one, b.v0), _mm256_fmsub_pd(a.v1, one, b.v1),
          _mm256_fmsub_pd(a.v2, one, b.v2), _mm256_fmsub_pd(a.v3, one, b.v3)};
}
inline D widen(F a) {
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(a.lo)),
          _mm256_cvtps_pd(_mm256_extractf128_ps(a.lo, 1)),
          _mm256_cvtps_pd(_mm256_castps256_ps128(a.hi)),
          _mm256_cvtps_pd(_mm256_extractf128_ps(a.hi, 1))};
}
// widen(load(p)) converting each quarter from memory (as for AVX-512).
inline D load_wide(const float* p) {
  return {_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p + 4)),
          _mm256_cvtps_pd(_mm_loadu_ps(p + 8)), _mm256_cvtps_pd(_mm_loadu_ps(p + 12))};
}

inline Mask mask_first(int n) {
  const __m128i lanes = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm_cmpgt_epi8(_mm_set1_epi8(static_cast<char>(n)), lanes)};
}
inline Mask nonzero_bytes(__m128i bytes) {
  return {_mm_xor_si128(_mm_cmpeq_epi8(bytes, _mm_setzero_si128()), _mm_set1_epi8(-1))};
}
inline Mask mask_bytes(const std::uint8_t* p) {
  return nonzero_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Mask mask_bytes_first(const std::uint8_t* p, int n) {
  alignas(16) std::uint8_t copy[kLanes] = {};
  std::memcpy(copy, p, static_cast<std::size_t>(n));
  return nonzero_bytes(_mm_load_si128(reinterpret_cast<const __m128i*>(copy)));
}
inline int lanes_set(Mask m) { return __builtin_popcount(_mm_movemask_epi8(m.bytes)); }
// Nonzero bytes among the n at p, 32 at a time.
inline std::int64_t nonzero_count(const std::uint8_t* p, std::int64_t n) {
  std::int64_t count = 0, i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const auto zeros = static_cast<unsigned>(
        _mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_setzero_si256())));
    count += 32 - __builtin_popcount(zeros);
  }
  for (; i < n; ++i) count += p[i] != 0;
  return count;
}
inline F select(Mask m, F a) {
  const __m256i lo = _mm256_cvtepi8_epi32(m.bytes);
  const __m256i hi = _mm256_cvtepi8_epi32(_mm_srli_si128(m.bytes, 8));
  return {_mm256_and_ps(_mm256_castsi256_ps(lo), a.lo),
          _mm256_and_ps(_mm256_castsi256_ps(hi), a.hi)};
}
inline __m256d lane_mask_pd(__m128i bytes) {
  return _mm256_castsi256_pd(_mm256_cvtepi8_epi64(bytes));
}
inline D select(Mask m, D a) {
  return {_mm256_and_pd(lane_mask_pd(m.bytes), a.v0),
          _mm256_and_pd(lane_mask_pd(_mm_srli_si128(m.bytes, 4)), a.v1),
          _mm256_and_pd(lane_mask_pd(_mm_srli_si128(m.bytes, 8)), a.v2),
          _mm256_and_pd(lane_mask_pd(_mm_srli_si128(m.bytes, 12)), a.v3)};
}
// Lanes of a where m is set, of b elsewhere.
inline F blend(Mask m, F a, F b) {
  const __m256 lo = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(m.bytes));
  const __m256 hi = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(m.bytes, 8)));
  return {_mm256_blendv_ps(b.lo, a.lo, lo), _mm256_blendv_ps(b.hi, a.hi, hi)};
}
inline D blend(Mask m, D a, D b) {
  return {_mm256_blendv_pd(b.v0, a.v0, lane_mask_pd(m.bytes)),
          _mm256_blendv_pd(b.v1, a.v1, lane_mask_pd(_mm_srli_si128(m.bytes, 4))),
          _mm256_blendv_pd(b.v2, a.v2, lane_mask_pd(_mm_srli_si128(m.bytes, 8))),
          _mm256_blendv_pd(b.v3, a.v3, lane_mask_pd(_mm_srli_si128(m.bytes, 12)))};
}

inline F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline D load(const double* p) {
  return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4), _mm256_loadu_pd(p + 8),
          _mm256_loadu_pd(p + 12)};
}
inline F load(const float16* p) {
  const __m128i* bits = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(bits)), _mm256_cvtph_ps(_mm_loadu_si128(bits + 1))};
}
inline __m256 widen_bfloat16(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline F load(const bfloat16* p) {
  const __m128i* bits = reinterpret_cast<const __m128i*>(p);
  return {widen_bfloat16(_mm_loadu_si128(bits)), widen_bfloat16(_mm_loadu_si128(bits + 1))};
}

inline __m128i to_float16_bits(__m256 a) {
  return _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// Round to nearest even; a NaN stays a quiet NaN (as detail::to_bfloat16). 32-bit results.
inline __m256i to_bfloat16_wide(__m256 a) {
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256 nan = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan));
}
inline __m256i to_bfloat16_bits(F a) {
  // packus interleaves the 128-bit halves; the permute restores the lane order.
  const __m256i packed = _mm256_packus_epi32(to_bfloat16_wide(a.lo), to_bfloat16_wide(a.hi));
  return _mm256_permute4x64_epi64(packed, 0xd8);
}

inline void store(float* p, F a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void store(double* p, D a) {
  _mm256_storeu_pd(p, a.v0);
  _mm256_storeu_pd(p + 4, a.v1);
  _mm256_storeu_pd(p + 8, a.v2);
  _mm256_storeu_pd(p + 12, a.v3);
}
inline void store(float16* p, F a) {
  __m128i* bits = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(bits, to_float16_bits(a.lo));
  _mm_storeu_si128(bits + 1, to_float16_bits(a.hi));
}
inline void store(bfloat16* p, F a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bfloat16_bits(a));
}

inline void stream(float* p, F a) {
  _mm256_stream_ps(p, a.lo);
  _mm256_stream_ps(p + 8, a.hi);
}
inline void stream(double* p, D a) {
  _mm256_stream_pd(p, a.v0);
  _mm256_stream_pd(p + 4, a.v1);
  _mm256_stream_pd(p + 8, a.v2);
  _mm256_stream_pd(p + 12, a.v3);
}
inline void stream(float16* p, F a) {
  const __m256i bits = _mm256_set_m128i(to_float16_bits(a.hi), to_float16_bits(a.lo));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
}
inline void stream(bfloat16* p, F a) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bfloat16_bits(a));
}
inline void stream_fence() { _mm_sfence(); }

#else  // portable baseline: plain loops the compiler vectorizes for the base instruction set

inline constexpr int kRegisterStats = 1;
inline constexpr bool kShuffledRows = false;

struct F {
  float v[kLanes];
};
struct D {
  double v[kLanes];
};
struct Mask {
  bool v[kLanes];
};

template <class V, class S>
inline V splat_lanes(S a) {
  V r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = a;
  return r;
}
inline F splat(float a) { return splat_lanes<F>(a); }
inline D splat(double a) { return splat_lanes<D>(a); }

#define BATCHNORM_CPU_LANEWISE(name, expr)            \
  inline F name(F a, F b) {                           \
    F r;                                              \
    for (int i = 0; i < kLanes; ++i) r.v[i] = (expr); \
    return r;                                         \
  }                                                   \
  inline D name(D a, D b) {                           \
    D r;                                              \
    for (int i = 0; i < kLanes; ++i) r.v[i] = (expr); \
    return r;                                         \
  }
BATCHNORM_CPU_LANEWISE(add, a.v[i] + b.v[i])
BATCHNORM_CPU_LANEWISE(sub, a.v[i] - b.v[i])
BATCHNORM_CPU_LANEWISE(mul, a.v[i] * b.v[i])
#undef BATCHNORM_CPU_LANEWISE

// Without hardware FMA a fused multiply-add would be a slow library call: multiply, then add.
inline F fmadd(F a, F b, F c) { return add(mul(a, b), c); }
inline D fmadd(D a, D b, D c) { return add(mul(a, b), c); }
inline D add_on_fma(D a, D b) { return add(a, b); }
inline D sub_on_fma(D a, D b) { return sub(a, b); }
inline D widen(F a) {
  D r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<double>(a.v[i]);
  return r;
}

inline Mask mask_first(int n) {
  Mask m;
  for (int i = 0; i < kLanes; ++i) m.v[i] = i < n;
  return m;
}
inline Mask mask_bytes(const std::uint8_t* p) {
  Mask m;
  for (int i = 0; i < kLanes; ++i) m.v[i] = p[i] != 0;
  return m;
}
inline Mask mask_bytes_first(const std::uint8_t* p, int n) {
  Mask m;
  for (int i = 0; i < kLanes; ++i) m.v[i] = i < n && p[i] != 0;
  return m;
}
// Lane j set where rows[lane_row[j]] is nonzero, for the first n rows. lane_row[j] is below 16,
// or at least 0x80 for a lane left unset (below 0x80 the shuffles read only its low four bits).
// The caller may read `readable` bytes at rows (at least n).
inline Mask spread_rows(const std::uint8_t* rows, int n, std::int64_t /* readable */,
                        const std::uint8_t* lane_row) {
  Mask m;
  for (int i = 0; i < kLanes; ++i) m.v[i] = lane_row[i] < n && rows[lane_row[i]] != 0;
  return m;
}
inline int lanes_set(Mask m) {
  int n = 0;
  for (int i = 0; i < kLanes; ++i) n += m.v[i];
  return n;
}
// Nonzero bytes among the n at p.
inline std::int64_t nonzero_count(const std::uint8_t* p, std::int64_t n) {
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < n; ++i) count += p[i] != 0;
  return count;
}
inline F select(Mask m, F a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : 0.0f;
  return a;
}
inline D select(Mask m, D a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : 0.0;
  return a;
}
// Lanes of a where m is set, of b elsewhere.
template <class V>
inline V blend(Mask m, V a, const V& b) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : b.v[i];
  return a;
}

template <class T>
inline auto load(const T* p) {
  using A = detail::compute_t<T>;
  std::conditional_t<std::is_same_v<A, double>, D, F> r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = detail::load<A>(p[i]);
  return r;
}
template <class T, class V>
inline void store(T* p, const V& a) {
  for (int i = 0; i < kLanes; ++i) p[i] = detail::store<T>(a.v[i]);
}

#if defined(__SSE2__)
// Baseline x86-64 has 16-byte non-temporal stores.
inline void stream(float* p, F a) {
  for (int i = 0; i < kLanes; i += 4) _mm_stream_ps(p + i, _mm_loadu_ps(a.v + i));
}
inline void stream(double* p, D a) {
  for (int i = 0; i < kLanes; i += 2) _mm_stream_pd(p + i, _mm_loadu_pd(a.v + i));
}
template <class T>
inline void stream(T* p, F a) {
  alignas(16) T bits[kLanes];
  store(bits, a);
  __m128i* out = reinterpret_cast<__m128i*>(p);
  const __m128i* in = reinterpret_cast<const __m128i*>(bits);
  _mm_stream_si128(out, _mm_load_si128(in));
  _mm_stream_si128(out + 1, _mm_load_si128(in + 1));
}
inline void stream_fence() { _mm_sfence(); }
#else
template <class T, class V>
inline void stream(T* p, const V& a) {
  store(p, a);
}
inline void stream_fence() {}
#endif

#endif

#if !defined(BATCHNORM_CPU_AVX512)
// Tails through a zero-filled block on the stack: nothing past n is read or written.
template <class T>
inline auto load_first(const T* p, int n) {
  T block[kLanes] = {};
  std::memcpy(block, p, sizeof(T) * static_cast<std::size_t>(n));
  return load(static_cast<const T*>(block));
}
template <class T, class V>
inline void store_first(T* p, const V& a, int n) {
  T block[kLanes];
  store(block, a);
  std::memcpy(p, block, sizeof(T) * static_cast<std::size_t>(n));
}
#endif

#if defined(BATCHNORM_CPU_AVX2)
// Tails by masked loads, where the copy above calls memcpy for every tail. (16, 64, 7, 7) NCHW, a
// tail per 49-element map, one thread: float32 training 28.1 -> 18.5 us, backward 45.8 -> 27.8 us.
// Intel guarantees that masked-out elements never fault; AMD leaves it to the implementation, so
// a masked load is taken only where its whole block lies within the page of its first element
// (mapped: that element is data), and elsewhere the copy stays.
inline bool within_one_page(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % 4096 + bytes <= 4096;
}
// The address `bytes` past p, formed as an integer: past the data a pointer would be invalid.
template <class T>
inline const T* bytes_past(const T* p, std::size_t bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<std::uintptr_t>(p) + bytes);
}
inline __m256i lanes_below(int n, int from) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - from), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i wide_lanes_below(int n, int from) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n - from), _mm256_setr_epi64x(0, 1, 2, 3));
}
inline F load_first(const float* p, int n) {
  if (!within_one_page(p, sizeof(float) * kLanes)) return load_first<float>(p, n);
  return {_mm256_maskload_ps(p, lanes_below(n, 0)),
          _mm256_maskload_ps(bytes_past(p, 32), lanes_below(n, 8))};
}
inline D load_first(const double* p, int n) {
  if (!within_one_page(p, sizeof(double) * kLanes)) return load_first<double>(p, n);
  return {_mm256_maskload_pd(p, wide_lanes_below(n, 0)),
          _mm256_maskload_pd(bytes_past(p, 32), wide_lanes_below(n, 4)),
          _mm256_maskload_pd(bytes_past(p, 64), wide_lanes_below(n, 8)),
          _mm256_maskload_pd(bytes_past(p, 96), wide_lanes_below(n, 12))};
}
// The first n of 16 16-bit elements, zero past n: pairs of them through a 32-bit masked load (AVX2
// has no 16-bit one), an odd last element put into its pair's low half.
inline __m256i load_first_bits16(const std::uint16_t* p, int n) {
  const int pairs = n / 2;
  __m256i bits = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), lanes_below(pairs, 0));
  if (n % 2 != 0) {
    const __m256i pair =
        _mm256_cmpeq_epi32(_mm256_set1_epi32(pairs), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    bits = _mm256_or_si256(bits, _mm256_and_si256(pair, _mm256_set1_epi32(p[n - 1])));
  }
  return bits;
}
inline F load_first(const float16* p, int n) {
  if (!within_one_page(p, sizeof(float16) * kLanes)) return load_first<float16>(p, n);
  const __m256i bits = load_first_bits16(reinterpret_cast<const std::uint16_t*>(p), n);
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(bits)),
          _mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1))};
}
inline F load_first(const bfloat16* p, int n) {
  if (!within_one_page(p, sizeof(bfloat16) * kLanes)) return load_first<bfloat16>(p, n);
  const __m256i bits = load_first_bits16(reinterpret_cast<const std::uint16_t*>(p), n);
  return {widen_bfloat16(_mm256_castsi256_si128(bits)),
          widen_bfloat16(_mm256_extracti128_si256(bits, 1))};
}
// Lane j set where rows[lane_row[j]] is nonzero, for the first n rows. lane_row[j] is below 16,
// or at least 0x80 for a lane left unset (below 0x80 the shuffles read only its low four bits).
// The caller may read `readable` bytes at rows (at least n).
inline Mask spread_rows(const std::uint8_t* rows, int n, std::int64_t readable,
                        const std::uint8_t* lane_row) {
  // The rows' bytes as a mask (0 or 0xff each), so the shuffle's result is one too.
  const __m128i valid = readable >= kLanes
                            ? _mm_and_si128(mask_bytes(rows).bytes, mask_first(n).bytes)
                            : mask_bytes_first(rows, n).bytes;  // (a run's last blocks)
  return {_mm_shuffle_epi8(valid, _mm_loadu_si128(reinterpret_cast<const __m128i*>(lane_row)))};
}
#endif

#if !defined(BATCHNORM_CPU_AVX512)
inline D sub_select_on_fma(Mask m, D a, D b) { return select(m, sub_on_fma(a, b)); }
#endif

template <class A>
using Vec = std::conditional_t<std::is_same_v<A, double>, D, F>;

inline D widen(D a) { return a; }
// Lanes of p widened to float64; instruction sets with a faster form for float overload it.
template <class T>
inline D load_wide(const T* p) {
  return widen(load(p));
}

// Lanes of a strided run gathered into a block (zero past n), and scattered back.
template <class T>
inline auto load_strided(const T* p, std::int64_t stride, int n) {
  T block[kLanes] = {};
  for (int i = 0; i < n; ++i) block[i] = p[i * stride];
  return load(static_cast<const T*>(block));
}
template <class T, class V>
inline void store_strided(T* p, std::int64_t stride, const V& a, int n) {
  T block[kLanes];
  store(block, a);
  for (int i = 0; i < n; ++i) p[i * stride] = block[i];
}
inline Mask mask_strided(const std::uint8_t* p, std::int64_t stride, int n) {
  std::uint8_t bytes[kLanes] = {};
  for (int i = 0; i < n; ++i) bytes[i] = p[i * stride];
  return mask_bytes(bytes);
}

// The 16 lanes summed by the same fixed tree on every instruction set.
inline double lane_sum(const D& a) {
  double lanes[kLanes];
  store(lanes, a);
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

}  // namespace batchnorm::cpu::BATCHNORM_CPU_NS
