// The calling thread's CUDA stream. Defined in every build, with or without CUDA, so that code
// selecting a stream runs unchanged everywhere; only the CUDA backend reads it.
#include "batchnorm/batchnorm.hpp"

namespace batchnorm {

namespace {
// Per thread, like a framework's "current stream": threads driving different streams do not
// interfere.
thread_local void* current_cuda_stream = nullptr;
}  // namespace

void set_cuda_stream(void* stream) { current_cuda_stream = stream; }

void* cuda_stream() { return current_cuda_stream; }

}  // namespace batchnorm
