// 16-bit storage types (IEEE binary16 and bfloat16) with float conversion, usable on host and
// device. Kernels read them, compute in float32 and round back once on store.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/config.hpp"

namespace batchnorm::detail {

BATCHNORM_HD inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

BATCHNORM_HD inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

struct float16 {
  std::uint16_t bits;
};

struct bfloat16 {
  std::uint16_t bits;
};

BATCHNORM_HD inline float to_float(float16 h) {
#if defined(__CUDA_ARCH__)
  // GPUs convert in one instruction, exactly as the code below.
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(h.bits));
  return value;
#else
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_float(sign);
  // Subnormal half: exact in float as mantissa * 2^-24.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
#endif
}

// Round-to-nearest-even, with overflow to infinity and NaN kept quiet, as IEEE casts do.
BATCHNORM_HD inline float16 to_float16(float value) {
#if defined(__CUDA_ARCH__)
  // The GPU's conversion rounds alike (to nearest even, overflow to infinity); a NaN becomes
  // the canonical quiet NaN.
  float16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(value));
  return h;
#else
  const std::uint32_t bits = float_bits(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf or NaN
    return {static_cast<std::uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u))};
  }
  if (magnitude >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};  // overflow
  if (magnitude < 0x38800000u) {                 // result is subnormal or zero in half
    if (magnitude < 0x33000000u) return {sign};  // below half of the smallest subnormal
    // value = mantissa * 2^(e - 150) and a half subnormal counts units of 2^-24.
    const std::uint32_t shift = 126u - (magnitude >> 23);
    const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    std::uint32_t half = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return {static_cast<std::uint16_t>(sign | half)};
  }
  std::uint32_t rebased = magnitude - 0x38000000u;  // exponent bias 127 -> 15
  const std::uint32_t rest = rebased & 0x1fffu;
  rebased >>= 13;
  if (rest > 0x1000u || (rest == 0x1000u && (rebased & 1u))) ++rebased;
  return {static_cast<std::uint16_t>(sign | rebased)};
#endif
}

BATCHNORM_HD inline float to_float(bfloat16 b) {
  return bits_float(static_cast<std::uint32_t>(b.bits) << 16);
}

BATCHNORM_HD inline bfloat16 to_bfloat16(float value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // One instruction from sm_80 on, rounding alike.
  bfloat16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(value));
  return b;
#else
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    return {static_cast<std::uint16_t>((bits >> 16) | 0x40u)};
  }
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<std::uint16_t>((bits + rounding) >> 16)};
#endif
}

// Uniform load/store between a storage type and the compute type.
template <class Acc>
BATCHNORM_HD inline Acc load(float value) {
  return static_cast<Acc>(value);
}
template <class Acc>
BATCHNORM_HD inline Acc load(double value) {
  return static_cast<Acc>(value);
}
template <class Acc>
BATCHNORM_HD inline Acc load(float16 value) {
  return static_cast<Acc>(to_float(value));
}
template <class Acc>
BATCHNORM_HD inline Acc load(bfloat16 value) {
  return static_cast<Acc>(to_float(value));
}

template <class T>
struct Store;
template <>
struct Store<float> {
  template <class Acc>
  BATCHNORM_HD static float apply(Acc value) {
    return static_cast<float>(value);
  }
};
template <>
struct Store<double> {
  template <class Acc>
  BATCHNORM_HD static double apply(Acc value) {
    return static_cast<double>(value);
  }
};
template <>
struct Store<float16> {
  template <class Acc>
  BATCHNORM_HD static float16 apply(Acc value) {
    return to_float16(static_cast<float>(value));
  }
};
template <>
struct Store<bfloat16> {
  template <class Acc>
  BATCHNORM_HD static bfloat16 apply(Acc value) {
    return to_bfloat16(static_cast<float>(value));
  }
};

template <class T, class Acc>
BATCHNORM_HD inline T store(Acc value) {
  return Store<T>::apply(value);
}

// The arithmetic type a storage type computes in: float, except double for double data.
template <class T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <class T>
using compute_t = typename ComputeType<T>::type;

}  // namespace batchnorm::detail
