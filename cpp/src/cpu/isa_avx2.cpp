// The chunk kernels compiled for AVX2 with FMA and F16C (x86-64-v3), picked at run time when the
// CPU has it.
#include "cpu/dispatch.hpp"

#if BATCHNORM_CPU_X86
// Every header the kernels use comes first, outside the target region: only the kernels below
// (in their own namespace) are compiled for avx2, never an inline function another unit shares.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#define BATCHNORM_CPU_NS avx2
#define BATCHNORM_CPU_AVX2
#pragma GCC push_options
// GCC 12's own intrinsic headers trip -Wmaybe-uninitialized (their _mm*_undefined_* idiom).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
#include "cpu/chunk_kernels.hpp"

namespace batchnorm::cpu {

const KernelSet& avx2_kernels() {
  static const KernelSet set = avx2::make_kernel_set(detail::Elements{});
  return set;
}

}  // namespace batchnorm::cpu
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
