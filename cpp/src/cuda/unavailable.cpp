// Stand-in for the CUDA backend in builds without CUDA: same symbols, each call explains why
// it cannot run. Keeps the bindings and the dispatch free of #ifdefs.
#include <stdexcept>

#include "batchnorm/batchnorm.hpp"
#include "core/backend.hpp"
#include "cuda/runtime.hpp"

namespace batchnorm {

namespace {
// Kept even without CUDA so that code setting a stream runs unchanged on every build.
thread_local void* current_cuda_stream = nullptr;
}  // namespace

void set_cuda_stream(void* stream) { current_cuda_stream = stream; }

void* cuda_stream() { return current_cuda_stream; }

}  // namespace batchnorm

namespace batchnorm::detail {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "batchnorm was built without CUDA support; rebuild with BATCHNORM_ENABLE_CUDA=ON and nvcc "
      "available to run on CUDA devices");
}
}  // namespace

bool CudaBackend::available() { return false; }

template <class T>
void CudaBackend::train_forward(const Plan&, const Plan&, const T*, T*, const std::uint8_t*,
                                const TrainScalars&, const WeightPtrs<compute_t<T>>&,
                                TrainingContext&, const Communicator*) {
  no_cuda();
}
template <class T>
void CudaBackend::infer_forward(const Plan&, const T*, T*, double,
                                const WeightPtrs<compute_t<T>>&) {
  no_cuda();
}
template <class T>
void CudaBackend::train_backward(const Plan&, const Plan&, const T*, const T*, T*,
                                 const std::uint8_t*, const WeightPtrs<compute_t<T>>&,
                                 const TrainingContext&, compute_t<T>*, compute_t<T>*,
                                 const Communicator*) {
  no_cuda();
}
template <class T>
void CudaBackend::infer_backward(const Plan&, const Plan&, const T*, const T*, T*, double,
                                 const WeightPtrs<compute_t<T>>&, compute_t<T>*, compute_t<T>*) {
  no_cuda();
}

BATCHNORM_INSTANTIATE_BACKEND(CudaBackend)

}  // namespace batchnorm::detail

namespace batchnorm::cuda {

int device_count() { return 0; }

void* allocate(std::size_t, int) { detail::no_cuda(); }

void release(void*) noexcept {}

void copy(void*, const void*, std::size_t) { detail::no_cuda(); }

void synchronize(int) { detail::no_cuda(); }

}  // namespace batchnorm::cuda
