// IEEE binary16 values for the tests' 16-bit data, written apart from the library's own
// conversions (which are not public): the tests make float16 inputs with it and read float16
// outputs back.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace bntest {

// The float16 bits of `value`, rounded toward zero. Zero and normal float16 numbers only, which
// is what the tests' data hold; the tests compare against the decoded input, so the rounding
// mode does not matter.
inline std::uint16_t float16_bits(float value) {
  const auto sign = static_cast<std::uint16_t>(std::signbit(value) ? 0x8000u : 0u);
  if (value == 0.0f) return sign;
  int exponent = 0;
  const float fraction = std::frexp(std::fabs(value), &exponent);  // in [0.5, 1)
  const int biased = exponent - 1 + 15;
  if (biased < 1 || biased > 30) throw std::out_of_range("value outside float16's normal range");
  const auto mantissa = static_cast<std::uint16_t>((2.0f * fraction - 1.0f) * 1024.0f);
  return static_cast<std::uint16_t>(sign | (biased << 10) | mantissa);
}

// The value of float16 bits (any finite value, subnormals included).
inline float float16_value(std::uint16_t bits) {
  const int biased = (bits >> 10) & 0x1f;
  const float mantissa = static_cast<float>(bits & 0x3ffu);
  const float magnitude =
      biased == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1.0f + mantissa / 1024.0f, biased - 15);
  return (bits & 0x8000u) ? -magnitude : magnitude;
}

}  // namespace bntest
