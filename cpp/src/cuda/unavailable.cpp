// Stand-in for the CUDA backend in builds without CUDA: every operation and device service
// explains why it cannot run, and cuda_available() is false. Keeps the core, the bindings and
// the bench free of #ifdefs.
#include <stdexcept>

#include "core/backend.hpp"
#include "cuda/runtime.hpp"

namespace batchnorm::detail {

namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "batchnorm was built without CUDA support; rebuild with BATCHNORM_ENABLE_CUDA=ON and nvcc "
      "available to run on CUDA devices");
}

struct Unavailable {
  static bool available() { return false; }

  template <class Call>
  static void run(const Call&) {
    no_cuda();
  }
};

constexpr Backend kUnavailable = Backend::of<Unavailable>();

}  // namespace

const Backend& cuda_backend() { return kUnavailable; }

}  // namespace batchnorm::detail

namespace batchnorm::cuda {

int device_count() { return 0; }

bool built() { return false; }

void* allocate(std::size_t, int) { detail::no_cuda(); }

void release(void*) noexcept {}

void* allocate_on_stream(std::size_t, int) { detail::no_cuda(); }

void used(void*) { detail::no_cuda(); }

void release_after_use(void*) noexcept {}

void copy(void*, const void*, std::size_t) { detail::no_cuda(); }

void copy_on_stream(void*, const void*, std::size_t) { detail::no_cuda(); }

void wait_for_stream(void*, int) { detail::no_cuda(); }

void synchronize(int) { detail::no_cuda(); }

std::shared_ptr<const DeviceStatistics> statistics_in(double*, std::int64_t, std::int64_t) {
  detail::no_cuda();
}

}  // namespace batchnorm::cuda
