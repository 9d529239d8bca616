// Picks the chunk kernels for this CPU once per process.
#include "cpu/dispatch.hpp"

#include <cstdlib>
#include <cstring>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace batchnorm::cpu {

namespace {

Isa widest_supported() {
#if BATCHNORM_CPU_X86
  __builtin_cpu_init();
  // libgcc also checks that the OS saves the vector registers (XCR0) before reporting these.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::avx2;
  }
#endif
  return Isa::baseline;
}

Isa choose() {
  const Isa best = widest_supported();
  const char* requested = std::getenv("BATCHNORM_CPU_ISA");
  if (!requested) return best;
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
    if (std::strcmp(requested, isa_name(isa)) == 0 && isa < best) return isa;
  }
  return best;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::baseline:
      break;
  }
  return "baseline";
}

Isa active_isa() {
  static const Isa isa = choose();
  return isa;
}

const KernelSet& active_kernels() {
  static const KernelSet& set = []() -> const KernelSet& {
    switch (active_isa()) {
#if BATCHNORM_CPU_X86
      case Isa::avx512:
        return avx512_kernels();
      case Isa::avx2:
        return avx2_kernels();
#endif
      default:
        return baseline_kernels();
    }
  }();
  return set;
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace batchnorm::cpu
