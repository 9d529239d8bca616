// The chunk kernels for the compiler's base instruction set: the fallback on every CPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cpu/dispatch.hpp"

#define BATCHNORM_CPU_NS baseline
#include "cpu/chunk_kernels.hpp"

namespace batchnorm::cpu {

const KernelSet& baseline_kernels() {
  static const KernelSet set = baseline::make_kernel_set(detail::Elements{});
  return set;
}

}  // namespace batchnorm::cpu
